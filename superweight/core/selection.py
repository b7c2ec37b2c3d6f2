"""Which weights get perturbed: Top-K of a metric and the controls at the same K, in global, per-layer and
per-row (Wanda's comparison group) modes, plus rank stability (Jaccard overlap).

The research claim is "Top-K weights matter more than other weights at the same K". Each control answers
one way that claim could be an artefact, and every selection is drawn from the same candidate set: the
weights the perturbation can change (`perturbation.changeable`: for `zero`, `sign_flip` and relative
`gauss_noise`, w != 0; a checkpoint from GGUF or pruning holds many exact zeros, and zeroing a zero is no
control).

* `top_k`     the K highest scores among the candidates whose score is informative (finite and > 0). A
              metric with fewer informative scores than K (act_outlier scores a handful of weights) selects
              only its support: never padded with ties.
* `bottom_k`  the K lowest finite scores among the candidates ("do unimportant weights do nothing?").
* `random_k`  K candidates drawn uniformly without replacement, seeded by (seed, draw) ("is any K enough?").
* `matched_k` for each Top-K weight, a random candidate of the same module type with nearly the same |w|
              (relative window, widened only as needed), none of them in Top-K ("is it just big weights?");
              `match_ks` reports the Kolmogorov-Smirnov distance between the two |w| distributions.

Ties are broken by a seeded random draw, never by index: the ranking key is (score, u) with u a hash of
(seed, parameter, flat index), uniform and independent of the order tensors are visited, so any prefix of
the ranking takes a uniformly random subset of the entries tied at its boundary. `n_tied` counts the
candidates tied with the K-th selected score.

A `Ranking` is ordered; selecting K keeps entries whose group rank is < K, so a K grid is a family of nested
sets from one ranking (the top-10 is the prefix of the top-100), for every selection.
Scale: global selection never concatenates all scores; it takes a per-tensor top-K and merges it into a
running buffer, so extra memory is O(K) beyond one tensor's temporaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..config import ConfigError
from .params import index_names, layer_of, module_type
from ..registry import Registry

_SHIFT = 40  # composite key = param index << 40 | flat index (tensors up to 1e12 elements)
Mask = Callable[[str], "torch.Tensor | None"]  # parameter name -> bool mask of candidates (None: all)


@dataclass
class Ranking:
    names: list[str]  # parameter order (pid indexes this)
    shapes: list[tuple[int, ...]]
    pid: torch.Tensor  # [M] int64
    flat: torch.Tensor  # [M] int64
    score: torch.Tensor  # [M] float32 (the metric's score of each entry, NaN kept)
    group_rank: torch.Tensor  # [M] int64, rank within the comparison group
    mode: str = "global"
    selection: str = "top_k"
    support: int | None = None  # informative candidates (top_k); None = unbounded
    n_candidates: int = 0  # weights the selection could draw from
    stats: dict = field(default_factory=dict)  # per-selection extras (matched_k: match quality)
    per_k: dict = field(default_factory=dict)  # K -> its own selection, for selections that do not nest (matched_k)
    k_max: int | None = None  # with per_k: the K this ranking itself was drawn for (not kept in per_k: no cycle)

    def __len__(self) -> int:
        return int(self.pid.numel())

    def take(self, k: int) -> "Ranking":
        """The K-selection: entries ranked < k in their group (a prefix for global mode), or the selection
        drawn for exactly this K when the selection does not nest (`per_k`)."""
        if self.per_k:
            if k in self.per_k:
                return self.per_k[k]
            if k != self.k_max:  # a prefix would silently be the wrong selection (it does not nest)
                raise ValueError(f"{self.selection} was drawn for K in {sorted([*self.per_k, self.k_max])}, not {k}")
        m = self.group_rank < k
        keep = m.numpy()
        stats = {key: v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == keep.shape else v
                 for key, v in self.stats.items()}  # per-entry arrays follow their entries
        return Ranking(self.names, self.shapes, self.pid[m], self.flat[m], self.score[m], self.group_rank[m],
                       self.mode, self.selection, self.support, self.n_candidates, stats)

    def by_param(self) -> dict[str, torch.Tensor]:
        """{param name: sorted flat indices} for perturbation."""
        return {self.names[pid]: torch.sort(self.flat[sel]).values for pid, sel in _groups(self.pid)}

    def keys(self) -> torch.Tensor:
        return (self.pid << _SHIFT) | self.flat

    def named_keys(self) -> set[tuple[str, int]]:
        return {(self.names[p], f) for p, f in zip(self.pid.tolist(), self.flat.tolist())}


# ---------------------------------------------------------------------------------------------------
# keys and seeded tie-breaks
# ---------------------------------------------------------------------------------------------------
_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def name_key(name: str) -> int:
    """A 64-bit key of a parameter name (stable across processes and parameter orders)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def tie_hash(seed: int, param: str | int, flat: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """u(seed, parameter, flat index): splitmix64 of (flat index, parameter name key, seed, salt), as a
    non-negative int64 (63 bits). A pseudo-random, seeded secondary key: among equal scores the smaller u
    ranks first. Keyed by the parameter's *name* (an int is taken as the key itself), so the tie-breaks do
    not depend on the order of the score dict nor on which other tensors are scored."""
    pkey = name_key(param) if isinstance(param, str) else int(param)
    x = flat.to(torch.int64) ^ _i64(pkey ^ ((int(seed) * 0x9E3779B97F4A7C15) + salt * 0xD1B54A32D192ED03))
    x = x + _i64(0x9E3779B97F4A7C15)
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _i64(0x94D049BB133111EB)
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return x & ((1 << 63) - 1)


def _key(score: torch.Tensor, selection: str) -> torch.Tensor:
    """Ranking key, larger = selected first: s for top_k, -s for bottom_k; NaN ranks last. fp64 and integer
    scores keep fp64 precision, others compare in fp32."""
    x = score.detach().reshape(-1)
    x = x.double() if x.dtype == torch.float64 or not x.is_floating_point() else x.float()
    if selection == "bottom_k":
        x = -x
    return torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _informative(score: torch.Tensor, selection: str) -> torch.Tensor:
    """Entries a selection may rank: top_k needs a finite score > 0 (0 carries no information: act_outlier's
    non-candidates, exactly-zero gradients); bottom_k any finite score (+inf never, NaN never)."""
    s = score.detach().reshape(-1)
    if selection == "top_k":
        return torch.isfinite(s) & (s > 0) if s.is_floating_point() else s > 0
    return torch.isfinite(s) if s.is_floating_point() else torch.ones_like(s, dtype=torch.bool)


def _order(vals: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices sorting by (vals desc, u asc)."""
    o1 = torch.argsort(u, stable=True)
    o2 = torch.argsort(vals[o1], descending=True, stable=True)
    return o1[o2]


def _best(vals: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best entries by (vals desc, u asc), in that order; O(n) selection then a sort of k."""
    if vals.numel() > k:
        kth = torch.topk(vals, k, sorted=False).values.min()
        gt = torch.nonzero(vals > kth).squeeze(1)
        eq = torch.nonzero(vals == kth).squeeze(1)
        need = k - gt.numel()
        eq = eq[torch.topk(-u[eq].double(), need, sorted=False).indices] if eq.numel() > need else eq
        pos = torch.cat([gt, eq])
    else:
        pos = torch.arange(vals.numel(), device=vals.device)
    return pos[_order(vals[pos], u[pos])]


def _candidates(scores, name, selection, mask_fn):
    """(key, candidate bool mask) of one tensor."""
    s = scores[name]
    ok = _informative(s, selection)
    m = mask_fn(name) if mask_fn is not None else None
    if m is not None:
        ok &= m.reshape(-1).to(ok.device)
    return _key(s, selection), ok


# ---------------------------------------------------------------------------------------------------
# registries: comparison groups (modes) and selections
# ---------------------------------------------------------------------------------------------------
MODES = Registry("mode")
# control: usable in select.controls; random: drawn (select.control_draws times); needs_top: built from Top-K,
# one selection per K (it matches that K's Top-K set, so the K grid does not nest: see `rank_grid`)
SELECTIONS = Registry("selection", control=True, random=False, needs_top=False)


def _gather(scores: dict[str, torch.Tensor], names: list[str], pid: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The original scores (NaN kept) of the selected entries, as float32 on the CPU: O(K)."""
    out = torch.empty(pid.numel(), dtype=torch.float32)
    for p, sel in _groups(pid):
        s = scores[names[p]].detach().reshape(-1)
        out[sel] = s[flat[sel].to(s.device)].float().cpu()
    return out


def _groups(pid: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(param id, positions of its entries)] with one sort, O(K log K)."""
    if pid.numel() == 0:
        return []
    order = torch.argsort(pid, stable=True)
    uniq, counts = torch.unique_consecutive(pid[order], return_counts=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist())))


def _gen(seed: int, salt: str) -> torch.Generator:
    h = 0
    for ch in salt:
        h = (h * 131 + ord(ch)) % (1 << 31)
    return torch.Generator().manual_seed(seed * 1_000_003 + h)


def _unique_in_order(x: torch.Tensor) -> torch.Tensor:
    uniq, inv = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(x.numel()), reduce="amin")
    return x[torch.sort(first).values]


def sample_without_replacement(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct uniform draws from range(n), in draw order, without an index over all n when k << n."""
    if k > n:
        raise ConfigError(f"K={k} is larger than the {n} candidate weights")
    if k * 4 >= n:
        return torch.randperm(n, generator=gen)[:k]
    drawn = torch.empty(0, dtype=torch.int64)
    while drawn.numel() < k:
        extra = torch.randint(0, n, (2 * (k - drawn.numel()) + 16,), generator=gen)
        drawn = _unique_in_order(torch.cat([drawn, extra]))
    return drawn[:k]


def _ranked_global(scores, k, selection, seed, mask_fn) -> Ranking:
    """top_k / bottom_k over all candidates by (key desc, u asc), merged tensor by tensor."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    vals, us, pids, idxs = [], [], [], []
    n_cand = 0
    waiting = 0

    def compact():
        nonlocal vals, us, pids, idxs, waiting
        v, u, p, i = torch.cat(vals), torch.cat(us), torch.cat(pids), torch.cat(idxs)
        pos = _best(v, u, k)
        vals, us, pids, idxs, waiting = [v[pos]], [u[pos]], [p[pos]], [i[pos]], pos.numel()

    for pid, n in enumerate(names):
        x, ok = _candidates(scores, n, selection, mask_fn)
        n_ok = int(ok.sum())
        n_cand += n_ok
        if n_ok == 0:
            continue
        if n_ok > k:  # this tensor's own k best, ties by u (computed for the tied entries only). Memory: the
            # key copy and a mask, never an index of every candidate (8 B each: 2x an fp32 score tensor)
            x = x.masked_fill_(~ok, float("-inf"))  # candidates' keys are finite, so -inf marks the rest
            del ok
            kth = torch.topk(x, k, sorted=False).values.min()
            cand = torch.nonzero(x >= kth).squeeze(1)
        else:
            cand = torch.nonzero(ok).squeeze(1)
        x = x[cand]
        u = tie_hash(seed, n, cand)
        if cand.numel() > k:
            pos = _best(x, u, k)
            cand, x, u = cand[pos], x[pos], u[pos]
        vals.append(x.cpu().double())
        us.append(u.cpu())
        pids.append(torch.full((cand.numel(),), pid, dtype=torch.int64))
        idxs.append(cand.cpu())
        waiting += cand.numel()
        if waiting > 2 * k:
            compact()
    if not vals:
        e = torch.empty(0, dtype=torch.int64)
        return Ranking(names, shapes, e, e, torch.empty(0), e, "global", selection, 0, n_cand)
    compact()
    best_p, best_i = pids[0], idxs[0]
    sc = _gather(scores, names, best_p, best_i)
    r = Ranking(names, shapes, best_p, best_i, sc, torch.arange(best_p.numel()), "global", selection,
                n_cand if selection == "top_k" else None, n_cand)
    return r


def _random_global(scores, k, seed, draw, mask_fn) -> Ranking:
    """K uniform draws without replacement over the concatenated candidate index space, in draw order."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    masks = {}
    counts = []
    for n in names:
        m = mask_fn(n) if mask_fn is not None else None
        if m is not None:
            m = m.reshape(-1)
            masks[n] = m
            counts.append(int(m.sum()))
        else:
            counts.append(scores[n].numel())
    sizes = torch.tensor(counts, dtype=torch.int64)
    total = int(sizes.sum())
    k = min(k, total)
    pos = sample_without_replacement(total, k, _gen(seed, f"random_k/global/{draw}"))
    ends = torch.cumsum(sizes, 0)
    pid = torch.searchsorted(ends, pos, right=True)
    ordinal = pos - (ends - sizes)[pid]
    flat = ordinal.clone()
    for p, sel in _groups(pid):
        m = masks.get(names[p])
        if m is not None:  # ordinal among the candidates -> flat index
            flat[sel] = torch.nonzero(m).squeeze(1).cpu()[ordinal[sel]]
    return Ranking(names, shapes, pid, flat, _gather(scores, names, pid, flat), torch.arange(k), "global",
                   "random_k", None, total)


@MODES.register("global")
def rank_global(scores, k, selection, seed=0, draw=0, mask_fn: Mask | None = None) -> Ranking:
    """K over all candidate weights of all scored tensors."""
    if selection == "random_k":
        return _random_global(scores, k, seed, draw, mask_fn)
    return _ranked_global(scores, k, selection, seed, mask_fn)


@MODES.register("per_layer")
def rank_per_layer(scores, k, selection, seed=0, draw=0, mask_fn: Mask | None = None) -> Ranking:
    """K per parameter tensor, ordered within the tensor by (key desc, u asc); random_k draws K uniformly
    without replacement per tensor (an independent seeded stream per tensor name and draw)."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    P, I, S, R = [], [], [], []
    n_cand = n_inf = 0
    for pid, n in enumerate(names):
        if selection == "random_k":
            m = mask_fn(n) if mask_fn is not None else None
            cand = torch.nonzero(m.reshape(-1)).squeeze(1).cpu() if m is not None else None
            size = cand.numel() if cand is not None else scores[n].numel()
            n_cand += size
            pick = sample_without_replacement(size, min(k, size), _gen(seed, f"random_k/{n}/{draw}"))
            i = cand[pick] if cand is not None else pick
        else:
            x, ok = _candidates(scores, n, selection, mask_fn)
            cand = torch.nonzero(ok).squeeze(1)
            n_cand += cand.numel()
            n_inf += cand.numel()
            pos = _best(x[cand], tie_hash(seed, n, cand), min(k, cand.numel()))
            i = cand[pos].cpu()
        P.append(torch.full((i.numel(),), pid, dtype=torch.int64))
        I.append(i)
        S.append(scores[n].detach().reshape(-1)[i.to(scores[n].device)].float().cpu())
        R.append(torch.arange(i.numel()))
    return Ranking(names, shapes, torch.cat(P), torch.cat(I), torch.cat(S), torch.cat(R), "per_layer", selection,
                   n_inf if selection == "top_k" else None, n_cand)


@MODES.register("per_row")
def rank_per_row(scores, k, selection, seed=0, draw=0, mask_fn: Mask | None = None) -> Ranking:
    """K per output row (Wanda compares weights within a row of each Linear): a weight's group is
    row = flat // cols of its tensor viewed as [shape[0], -1]; within a row by (key desc, u asc); random_k
    ranks each row's candidates by a seeded uniform key, i.e. a uniform random subset per row."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    P, I, S, R = [], [], [], []
    n_cand = 0
    for pid, n in enumerate(names):
        s = scores[n]
        rows = s.numel() // s.shape[-1] if s.ndim >= 2 else 1  # 3-D experts [E, out, in]: one group per expert row
        cols = s.numel() // rows
        flat_all = torch.arange(s.numel())
        if selection == "random_k":
            m = mask_fn(n) if mask_fn is not None else None
            ok = m.reshape(-1).cpu() if m is not None else torch.ones(s.numel(), dtype=torch.bool)
            x = torch.zeros(s.numel(), dtype=torch.float64)
            u = tie_hash(seed, n, flat_all, salt=1 + draw)
        else:
            x, ok = _candidates(scores, n, selection, mask_fn)
            x, ok = x.cpu(), ok.cpu()
            u = tie_hash(seed, n, flat_all)
        n_cand += int(ok.sum())
        x = torch.where(ok, x, torch.full_like(x, float("-inf"))).reshape(rows, cols)
        u = u.reshape(rows, cols)
        o1 = torch.argsort(u, dim=1, stable=True)
        o2 = torch.argsort(torch.gather(x, 1, o1), dim=1, descending=True, stable=True)
        order = torch.gather(o1, 1, o2)[:, :k]
        okr = torch.gather(ok.reshape(rows, cols), 1, order)
        flat = (torch.arange(rows).unsqueeze(1) * cols + order)[okr]
        rank_in_row = torch.arange(order.size(1)).expand(rows, -1)[okr]
        P.append(torch.full((flat.numel(),), pid, dtype=torch.int64))
        I.append(flat)
        S.append(s.detach().reshape(-1)[flat.to(s.device)].float().cpu())
        R.append(rank_in_row)
    return Ranking(names, shapes, torch.cat(P), torch.cat(I), torch.cat(S), torch.cat(R), "per_row", selection,
                   n_cand if selection == "top_k" else None, n_cand)


# --- selections --------------------------------------------------------------------------------------


@SELECTIONS.register("top_k", control=False)
def top_k(scores, k, mode, seed=0, draw=0, mask_fn=None, **_):
    """The K highest informative scores (finite, > 0) among the candidates; stops at the metric's support."""
    return MODES.get(mode).fn(scores, k, "top_k", seed, 0, mask_fn)


@SELECTIONS.register("bottom_k")
def bottom_k(scores, k, mode, seed=0, draw=0, mask_fn=None, **_):
    """The K lowest finite scores among the candidates (ties drawn at random)."""
    return MODES.get(mode).fn(scores, k, "bottom_k", seed, 0, mask_fn)


@SELECTIONS.register("random_k", random=True)
def random_k(scores, k, mode, seed=0, draw=0, mask_fn=None, **_):
    """K candidates uniformly at random (seeded by seed and draw; the same for every metric)."""
    return MODES.get(mode).fn(scores, k, "random_k", seed, draw, mask_fn)


@SELECTIONS.register("matched_k", random=True, needs_top=True)
def matched_k(scores, k, mode, seed=0, draw=0, mask_fn=None, top: Ranking | None = None, values=None, **_):
    """For each Top-K weight, a random candidate of the same module type with |w| in a relative window around
    the Top-K weight's |w| (±1%, widened to ±5%, 20%, 100%, any |w| only when the window has no free
    candidate), none of them in Top-K and each drawn once. Group rank = its Top-K target's. Drawn for each K
    of the grid against that K's Top-K (`rank_grid`): a prefix of the K_max match would exclude the Top-K_max
    weights, i.e. exactly the near-equal |w| neighbours a small-K match needs (magnitude's Top-1 at 9.25
    would be matched far outside its window because 9.125 is in the Top-1000)."""
    if top is None or values is None:
        raise ValueError("matched_k needs the Top-K ranking and the weight values")
    r = match_magnitudes(top, values, seed, draw, mask_fn)
    r.score = _gather(scores, r.names, r.pid, r.flat)  # each matched weight's own score (auditable)
    return r


WIDTHS = (0.01, 0.05, 0.2, 1.0, float("inf"))
POOL = 1 << 18  # candidates per module type sampled uniformly to serve the dense |w| windows
CHUNK = 1 << 22  # elements per step of a pass over a tensor (bounds its temporaries)
GATHER_WIDTH = 0.2  # an exact pass gathers the windows at this width at least (serves the narrower ones too)


@dataclass
class _Sorted:
    """Candidates (|w| ascending, float64) with their parameter id and flat index."""

    val: np.ndarray
    pid: np.ndarray
    flat: np.ndarray

    @staticmethod
    def of(vals, pids, flats) -> "_Sorted":
        v = np.concatenate(vals) if vals else np.empty(0)
        p = np.concatenate(pids) if pids else np.empty(0, np.int64)
        f = np.concatenate(flats) if flats else np.empty(0, np.int64)
        o = np.argsort(v, kind="stable")
        return _Sorted(v[o], p[o], f[o])

    def pick(self, lo: float, hi: float, taken: set, gen: np.random.Generator) -> tuple[int, int] | None:
        """A uniformly random entry with lo <= |w| <= hi that is not taken, or None."""
        s, b = int(np.searchsorted(self.val, lo, "left")), int(np.searchsorted(self.val, hi, "right"))
        if b <= s:
            return None
        for _ in range(8):  # rejection: taken entries are rare inside a window
            j = s + int(gen.integers(b - s))
            key = (int(self.pid[j]), int(self.flat[j]))
            if key not in taken:
                return key
        free = [(int(p), int(f)) for p, f in zip(self.pid[s:b], self.flat[s:b]) if (int(p), int(f)) not in taken]
        return free[int(gen.integers(len(free)))] if free else None


def _abs_values(values, name) -> torch.Tensor:
    return values(name).detach().reshape(-1).abs()


def _type_pool(values, mask_fn, names, pids, gen) -> tuple[_Sorted, bool]:
    """(candidates, exact): every candidate of these tensors when they hold at most POOL weights, else a
    uniform random sample of them (POOL positions drawn with replacement, non-candidates and repeats
    dropped: every candidate is equally likely to be in it, so a uniform pick inside a |w| window of the
    sample is a uniform pick inside that window)."""
    sizes = np.asarray([int(np.prod(values(names[p]).shape)) for p in pids], dtype=np.int64)
    exact = int(sizes.sum()) <= POOL
    vals, ps, fs = [], [], []
    if exact:
        for pid in pids:
            w = _abs_values(values, names[pid])
            m = mask_fn(names[pid]) if mask_fn is not None else None
            idx = torch.nonzero(m.reshape(-1)).squeeze(1) if m is not None else torch.arange(w.numel(), device=w.device)
            vals.append(w[idx.to(w.device)].double().cpu().numpy())
            fs.append(idx.cpu().numpy().astype(np.int64))
            ps.append(np.full(idx.numel(), pid, dtype=np.int64))
        return _Sorted.of(vals, ps, fs), True
    pos = np.sort(gen.integers(0, int(sizes.sum()), POOL))
    pos = pos[np.concatenate([[True], pos[1:] != pos[:-1]])]  # repeats dropped
    ends = np.cumsum(sizes)
    which = np.searchsorted(ends, pos, side="right")
    for j, pid in enumerate(pids):
        sel = which == j
        if not sel.any():
            continue
        flat = torch.from_numpy(pos[sel] - (ends[j] - sizes[j]))
        w = _abs_values(values, names[pid])
        m = mask_fn(names[pid]) if mask_fn is not None else None
        if m is not None:
            flat = flat[m.reshape(-1)[flat.to(m.device)].cpu()]
        vals.append(w[flat.to(w.device)].double().cpu().numpy())
        fs.append(flat.numpy().astype(np.int64))
        ps.append(np.full(flat.numel(), pid, dtype=np.int64))
    return _Sorted.of(vals, ps, fs), False


def _gather_windows(values, mask_fn, names, pids, windows: list[tuple[float, float]]) -> _Sorted:
    """Every candidate whose |w| lies in one of the windows: one chunked pass over the tensors, testing each
    weight against the union of the windows (merged, sorted: bucketize, inside = an odd bucket)."""
    merged: list[list[float]] = []
    for lo, hi in sorted(windows):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    bounds = np.asarray([x for lo_hi in merged for x in lo_hi], dtype=np.float64)
    # float32 bounds widened outwards (the exact test is in float64 on what is gathered)
    b32 = bounds.astype(np.float32)
    b32[0::2] = np.nextafter(b32[0::2], np.float32(-np.inf))
    b32[1::2] = np.nextafter(b32[1::2], np.float32(np.inf))
    vals, ps, fs = [], [], []
    for pid in pids:
        w = _abs_values(values, names[pid])
        m = mask_fn(names[pid]) if mask_fn is not None else None
        b = torch.from_numpy(b32).to(w.device)
        for s in range(0, w.numel(), CHUNK):
            x = w[s : s + CHUNK].float()
            inside = torch.bucketize(x, b, right=True) % 2 == 1
            if m is not None:
                inside &= m.reshape(-1)[s : s + CHUNK].to(inside.device)
            idx = torch.nonzero(inside).squeeze(1)
            if idx.numel():
                v = w[s : s + CHUNK][idx].double().cpu().numpy()
                i = np.searchsorted(bounds, v, side="right")
                ok = (i % 2 == 1) | ((i > 0) & (bounds[np.maximum(i - 1, 0)] == v))  # exact, closed windows
                vals.append(v[ok])
                fs.append(idx.cpu().numpy().astype(np.int64)[ok] + s)
                ps.append(np.full(int(ok.sum()), pid, dtype=np.int64))
    return _Sorted.of(vals, ps, fs)


def match_magnitudes(top: Ranking, values: Callable[[str], torch.Tensor], seed: int, draw: int,
                     mask_fn: Mask | None) -> Ranking:
    """matched_k (see `matched_k`). Per module type, targets in rank order; at each width a target first
    draws from a uniform random sample of the type's candidates (`_type_pool`; dense windows), and the
    targets it cannot serve get an exact pass over the type's weights restricted to their windows
    (`_gather_windows`; sparse windows: the tails of |w|). Either way the match is uniform over the free
    candidates of its window. Cost: O(POOL log POOL) per type plus at most two passes over the type's
    weights (windows at ±20%, then ±100%, for the targets left); never a sort of all weights."""
    names, shapes = top.names, top.shapes
    tp, tf = top.pid.tolist(), top.flat.tolist()
    tv = np.asarray([float(values(names[p]).reshape(-1)[f].abs().float()) for p, f in zip(tp, tf)], dtype=np.float64)
    mtype = [module_type(n) for n in names]
    by_type: dict[str, list[int]] = {}
    for pid, t in enumerate(mtype):
        by_type.setdefault(t, []).append(pid)
    taken = set(zip(tp, tf))  # never a Top-K weight, never twice
    out_p = np.full(len(tp), -1, dtype=np.int64)
    out_f = np.full(len(tp), -1, dtype=np.int64)
    width_used = np.zeros(len(tp))
    gen = np.random.default_rng([int(seed), int(draw), 7_777])

    def window(i: int, width: float) -> tuple[float, float]:
        a = tv[i]
        return (a / (1 + width), a * (1 + width)) if np.isfinite(width) else (-np.inf, np.inf)

    def assign(source, targets: list[int], width: float) -> list[int]:
        """Match each target (in rank order) from `source` at `width`; return the ones left unmatched."""
        left = []
        for i in targets:
            got = source.pick(*window(i, width), taken, gen)
            if got is None:
                left.append(i)
            else:
                out_p[i], out_f[i], width_used[i] = got[0], got[1], width
                taken.add(got)
        return left

    for t, pids in by_type.items():
        pending = [i for i, p in enumerate(tp) if mtype[p] == t]
        if not pending:
            continue
        pool, exact = _type_pool(values, mask_fn, names, pids, gen)
        near, cover = None, 0.0  # the exact candidates of the windows (at width `cover`) of the targets left
        for width in WIDTHS:
            if not pending:
                break
            rest = assign(pool, pending, width)
            if rest and not exact and np.isfinite(width):  # sparse windows: every candidate in them, exactly
                if near is None or cover < width:  # one pass serves the widths up to 0.2, one more 1.0
                    cover = max(width, GATHER_WIDTH)
                    near = _gather_windows(values, mask_fn, names, pids, [window(i, cover) for i in rest])
                rest = assign(near, rest, width)
            pending = rest
    ok = out_p >= 0
    pid = torch.from_numpy(out_p[ok])
    flat = torch.from_numpy(out_f[ok])
    got = np.asarray([float(values(names[p]).reshape(-1)[f].abs().float()) for p, f in zip(pid.tolist(), flat.tolist())])
    stats = {"target_abs_w": tv[ok], "match_abs_w": got, "width": width_used[ok]}
    return Ranking(names, shapes, pid, flat, top.score[torch.from_numpy(ok)], top.group_rank[torch.from_numpy(ok)],
                   top.mode, "matched_k", None, top.n_candidates, stats)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| (0 = same distribution)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if a.size == 0 or b.size == 0:
        return float("nan")
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, "right") / a.size
    fb = np.searchsorted(b, x, "right") / b.size
    return float(np.max(np.abs(fa - fb)))


def match_quality(sel: Ranking) -> dict:
    """For a matched_k selection (after take(k)): KS distance between the |w| of its targets and its own |w|,
    and the largest relative |w| window that was needed."""
    st = sel.stats
    if not st or "target_abs_w" not in st:
        return {}
    n = len(sel)
    return {"match_ks": ks_distance(st["target_abs_w"][:n], st["match_abs_w"][:n]),
            "match_max_width": float(np.max(st["width"][:n])) if n else float("nan")}


def rank(scores: dict[str, torch.Tensor], k: int, mode: str = "global", selection: str = "top_k", seed: int = 0,
         draw: int = 0, mask_fn: Mask | None = None, top: Ranking | None = None,
         values: Callable[[str], torch.Tensor] | None = None) -> Ranking:
    """Rank for the largest K of the grid; `.take(k)` gives every smaller K.

    mask_fn(name) -> bool mask of the weights the selection may contain (None: all); matched_k also needs
    the Top-K ranking (`top`) and the weights (`values(name)`)."""
    if int(k) < 1:
        raise ConfigError(f"K={k} must be >= 1; valid: 1..number of eligible weights")
    MODES.get(mode)
    spec = SELECTIONS.get(selection)
    return spec.fn(scores, int(k), mode, seed=seed, draw=draw, mask_fn=mask_fn, top=top, values=values)


def rank_grid(scores: dict[str, torch.Tensor], ks: list[int], mode: str = "global", selection: str = "top_k",
              seed: int = 0, draw: int = 0, mask_fn: Mask | None = None, top: Ranking | None = None,
              values: Callable[[str], torch.Tensor] | None = None) -> Ranking:
    """The selection for a whole K grid: one ranking at max(ks) whose `.take(k)` is each K's selection. A
    selection built from the Top-K set (needs_top: matched_k) is drawn for every K against `top.take(k)`
    and kept in `per_k` (its K_max ranking is returned, carrying the others)."""
    ks = sorted({int(k) for k in ks})
    if not SELECTIONS.get(selection).needs_top:
        return rank(scores, ks[-1], mode, selection, seed, draw, mask_fn, top, values)
    if top is None:
        raise ValueError(f"{selection} needs the Top-K ranking")
    per: dict[int, Ranking] = {}
    by_size: dict[int, Ranking] = {}  # Top-K sets are nested prefixes: equal sizes (past a support) = equal sets
    for k in ks:
        t = top.take(k)
        if len(t) not in by_size:
            by_size[len(t)] = rank(scores, k, mode, selection, seed, draw, mask_fn, t, values)
        per[k] = by_size[len(t)]
    kmax = ks[-1]  # a new Ranking carrying the others (no reference to itself)
    return replace(per[kmax], per_k={k: r for k, r in per.items() if k != kmax}, k_max=kmax)


def tied_counts(scores: dict[str, torch.Tensor], sel: Ranking, mask_fn: Mask | None = None) -> int:
    """n_tied of a selection: how many candidates share the score of its last (K-th) selected entry, over
    all candidates (1 = no tie at the boundary). Only meaningful for top_k / bottom_k in global mode."""
    if len(sel) == 0:
        return 0
    last = int(torch.argmax(sel.group_rank)) if sel.mode == "global" else len(sel) - 1
    # the boundary score in its own dtype (sel.score is float32: an fp64 or integer score would not compare)
    v = scores[sel.names[int(sel.pid[last])]].detach().reshape(-1)[int(sel.flat[last])]
    n = 0
    for name in sel.names:
        s = scores[name].detach().reshape(-1)
        hit = s == v.to(s.device) if not torch.isnan(v) else torch.isnan(s)
        m = mask_fn(name) if mask_fn is not None else None
        if m is not None:
            hit &= m.reshape(-1).to(hit.device)
        n += int(hit.sum())
    return n


def jaccard(a: Ranking, b: Ranking) -> float:
    """|A ∩ B| / |A ∪ B| of two selections (by parameter name and flat index)."""
    if a.names == b.names:
        ka, kb = a.keys(), b.keys()
    else:
        idx = {n: i for i, n in enumerate(sorted(set(a.names) | set(b.names)))}
        ka = (torch.tensor([idx[a.names[p]] for p in a.pid.tolist()], dtype=torch.int64) << _SHIFT) | a.flat
        kb = (torch.tensor([idx[b.names[p]] for p in b.pid.tolist()], dtype=torch.int64) << _SHIFT) | b.flat
    if ka.numel() == 0 and kb.numel() == 0:
        return 1.0
    inter = int(torch.isin(ka, kb).sum())
    union = ka.numel() + kb.numel() - inter
    return inter / union


def ranking_rows(r: Ranking, values: Callable[[str], torch.Tensor], limit: int) -> list[dict]:
    """Rows for rankings.csv: rank, param, layer, module, expert, row, col, flat_index, score, value (weight)."""
    rows = []
    n = min(limit, len(r))
    pids, flats = r.pid[:n].tolist(), r.flat[:n].tolist()
    for j in range(n):
        pid, f = pids[j], flats[j]
        name, shape = r.names[pid], r.shapes[pid]
        coords = index_names(shape, f)
        rows.append({
            "rank": int(r.group_rank[j]) if r.mode == "global" else j,
            "param": name, "layer": layer_of(name), "module": module_type(name),
            "expert": coords.get("expert", -1), "row": coords["row"], "col": coords["col"], "flat_index": f,
            "score": float(r.score[j]), "value": float(values(name).reshape(-1)[f].float()),
        })
    return rows
