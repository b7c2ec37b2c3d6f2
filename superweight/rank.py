"""Selection of weights from scores: Top-K and the controls Bottom-K and Random-K, in global, per-layer
and per-row (Wanda's comparison group) modes, plus rank stability (Jaccard overlap).

A `Ranking` is an ordered list of (parameter, flat index, score) with each entry's rank inside its
comparison group. Selecting K keeps the entries whose group rank is < K, so a K grid is a family of nested
sets from one ranking (the top-10 is the prefix of the top-100), for Random-K too (draw order).

Determinism: ties break by (parameter order, flat index), so rankings are identical run to run.
Scale: global selection never concatenates all scores; it takes a stable top-K per tensor and merges it
into a running top-K buffer, so extra memory is O(K) beyond one tensor's temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ConfigError

MODES = ("global", "per_layer", "per_row")
SELECTIONS = ("top_k", "bottom_k", "random_k")
CONTROLS = ("random_k", "bottom_k")
_SHIFT = 40  # composite key = param index << 40 | flat index (tensors up to 1e12 elements)


@dataclass
class Ranking:
    names: list[str]  # parameter order (pid indexes this)
    shapes: list[tuple[int, ...]]
    pid: torch.Tensor  # [M] int64
    flat: torch.Tensor  # [M] int64
    score: torch.Tensor  # [M] float32
    group_rank: torch.Tensor  # [M] int64, rank within the comparison group
    mode: str = "global"
    selection: str = "top_k"

    def __len__(self) -> int:
        return int(self.pid.numel())

    def take(self, k: int) -> "Ranking":
        """The K-selection: entries ranked < k in their group (a prefix for global mode)."""
        m = self.group_rank < k
        return Ranking(self.names, self.shapes, self.pid[m], self.flat[m], self.score[m],
                       self.group_rank[m], self.mode, self.selection)

    def by_param(self) -> dict[str, torch.Tensor]:
        """{param name: sorted flat indices} for perturbation."""
        return {self.names[pid]: torch.sort(self.flat[sel]).values for pid, sel in _groups(self.pid)}

    def keys(self) -> torch.Tensor:
        return (self.pid << _SHIFT) | self.flat

    def named_keys(self) -> set[tuple[str, int]]:
        return {(self.names[p], f) for p, f in zip(self.pid.tolist(), self.flat.tolist())}


def _stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a 1-D tensor, ordered by (value desc, index asc); deterministic under ties. O(n)."""
    n = x.numel()
    if k >= n:
        idx = torch.arange(n, device=x.device)
    else:
        kth = torch.topk(x, k, sorted=False).values.min()
        gt = torch.nonzero(x > kth).squeeze(1)
        eq = torch.nonzero(x == kth).squeeze(1)[: k - gt.numel()]
        idx = torch.sort(torch.cat([gt, eq])).values
    vals = x[idx]
    order = torch.sort(vals, descending=True, stable=True).indices
    return vals[order], idx[order]


def _key(score: torch.Tensor, selection: str) -> torch.Tensor:
    """Ranking key, larger = selected first: s for top_k, -s for bottom_k; NaN ranks last (like -inf for
    top_k, +inf for bottom_k). fp64 and integer scores keep fp64 precision, others compare in fp32."""
    x = score.detach().reshape(-1)
    x = x.double() if x.dtype == torch.float64 or not x.is_floating_point() else x.float()
    if selection == "bottom_k":
        x = -x
    return torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _gather(scores: dict[str, torch.Tensor], names: list[str], pid: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The original scores (NaN kept) of the selected entries, as float32 on the CPU: O(K)."""
    out = torch.empty(pid.numel(), dtype=torch.float32)
    for p, sel in _groups(pid):
        s = scores[names[p]].detach().reshape(-1)
        out[sel] = s[flat[sel].to(s.device)].float().cpu()
    return out


def _groups(pid: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(param id, positions of its entries)] with one sort, O(K log K), not one K-long mask per param."""
    if pid.numel() == 0:
        return []
    order = torch.argsort(pid, stable=True)
    uniq, counts = torch.unique_consecutive(pid[order], return_counts=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist())))


def _unique_in_order(x: torch.Tensor) -> torch.Tensor:
    """x without repeats, keeping first occurrences in order."""
    uniq, inv = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(x.numel()), reduce="amin")
    return x[torch.sort(first).values]


def sample_without_replacement(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct uniform draws from range(n), in draw order, without an index over all n when k << n."""
    if k > n:
        raise ConfigError(f"K={k} is larger than the {n} eligible weights")
    if k * 4 >= n:
        return torch.randperm(n, generator=gen)[:k]
    drawn = torch.empty(0, dtype=torch.int64)
    while drawn.numel() < k:
        extra = torch.randint(0, n, (2 * (k - drawn.numel()) + 16,), generator=gen)
        drawn = _unique_in_order(torch.cat([drawn, extra]))
    return drawn[:k]


def _gen(seed: int, salt: str) -> torch.Generator:
    h = 0
    for ch in salt:
        h = (h * 131 + ord(ch)) % (1 << 31)
    return torch.Generator().manual_seed(seed * 1_000_003 + h)


def _topk_positions(v: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending) of the k largest entries of v, ties to the earliest positions. O(n), no sort."""
    kth = torch.topk(v, k, sorted=False).values.min()
    keep = v > kth
    eq = torch.nonzero(v == kth).squeeze(1)[: k - int(keep.sum())]
    keep[eq] = True
    return torch.nonzero(keep).squeeze(1)


def rank_global(scores: dict[str, torch.Tensor], k: int, selection: str, seed: int = 0) -> Ranking:
    """K over all eligible weights. top_k / bottom_k: the first K of all (param, index) entries sorted by
    key desc (s, or -s for bottom_k; NaN last), then parameter order, then flat index; computed as a
    stable per-tensor top-K merged into a running K buffer. random_k: K uniform draws without replacement
    over the concatenated index space, in draw order (seeded)."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    sizes = torch.tensor([scores[n].numel() for n in names], dtype=torch.int64)
    total = int(sizes.sum())
    if k > total:
        raise ConfigError(f"K={k} is larger than the {total} eligible weights; valid: 1..{total}")
    if selection == "random_k":
        pos = sample_without_replacement(total, k, _gen(seed, "random_k/global"))
        starts = torch.cumsum(sizes, 0) - sizes
        pid = torch.searchsorted(torch.cumsum(sizes, 0), pos, right=True)
        flat = pos - starts[pid]
        return Ranking(names, shapes, pid, flat, _gather(scores, names, pid, flat), torch.arange(k), "global", selection)
    # Candidates are kept in (param, index) order, so "ties go to the earlier entry" is "ties go to the
    # earlier position"; they are compacted to the K best whenever more than 2K wait, and sorted by key
    # once at the end. After the first compaction, `thr` (the K-th best key so far, a lower bound of the
    # final one) prunes each tensor in one comparison pass: only keys strictly above it can still enter.
    vals: list[torch.Tensor] = []
    pids: list[torch.Tensor] = []
    idxs: list[torch.Tensor] = []
    waiting, thr = 0, None

    def compact():
        nonlocal vals, pids, idxs, waiting, thr
        v, p, i = torch.cat(vals), torch.cat(pids), torch.cat(idxs)
        if v.numel() >= k:
            if v.numel() > k:
                pos = _topk_positions(v, k)
                v, p, i = v[pos], p[pos], i[pos]
            thr = float(v.min())
        vals, pids, idxs, waiting = [v], [p], [i], v.numel()

    for pid, n in enumerate(names):
        raw = scores[n].detach().reshape(-1)
        if thr is None:
            x = _key(raw, selection)
            cand = _topk_positions(x, k) if x.numel() > k else torch.arange(x.numel(), device=x.device)
            x = x[cand]
        elif raw.dtype in (torch.float32, torch.float64) and float(torch.tensor(thr, dtype=raw.dtype)) == thr:
            hit = raw > thr if selection != "bottom_k" else raw < -thr  # NaN compares False: never enters
            cand = torch.nonzero(hit).squeeze(1)
            x = _key(raw[cand], selection)
        else:  # low-precision or integer scores: compare the exact keys
            x = _key(raw, selection)
            cand = torch.nonzero(x > thr).squeeze(1)
            x = x[cand]
        if cand.numel() == 0:
            continue
        vals.append(x.cpu().double())
        pids.append(torch.full((cand.numel(),), pid, dtype=torch.int64))
        idxs.append(cand.cpu())
        waiting += cand.numel()
        if waiting > 2 * k or (thr is None and waiting >= k):  # memory: at most ~3K entries
            compact()
    compact()
    order = torch.sort(vals[0], descending=True, stable=True).indices  # stable: ties keep (param, index)
    best_p, best_i = pids[0][order], idxs[0][order]
    sc = _gather(scores, names, best_p, best_i)
    return Ranking(names, shapes, best_p, best_i, sc, torch.arange(best_p.numel()), "global", selection)


def rank_per_layer(scores: dict[str, torch.Tensor], k: int, selection: str, seed: int = 0) -> Ranking:
    """K per parameter tensor, ordered within the tensor by (key desc, flat index); random_k draws K
    uniformly without replacement per tensor (an independent seeded stream per tensor name)."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    smallest = min(scores[n].numel() for n in names)
    if k > smallest:
        raise ConfigError(f"K={k} per layer is larger than the smallest eligible tensor ({smallest}); valid: 1..{smallest}")
    P, I, S, R = [], [], [], []
    for pid, n in enumerate(names):
        if selection == "random_k":
            i = sample_without_replacement(scores[n].numel(), k, _gen(seed, f"random_k/{n}"))
            v = scores[n].reshape(-1)[i.to(scores[n].device)].float().cpu()
        else:
            i = _stable_topk(_key(scores[n], selection), k)[1].cpu()
            v = scores[n].detach().reshape(-1)[i.to(scores[n].device)].float().cpu()
        P.append(torch.full((i.numel(),), pid, dtype=torch.int64))
        I.append(i)
        S.append(v)
        R.append(torch.arange(i.numel()))
    return Ranking(names, shapes, torch.cat(P), torch.cat(I), torch.cat(S), torch.cat(R), "per_layer", selection)


def rank_per_row(scores: dict[str, torch.Tensor], k: int, selection: str, seed: int = 0) -> Ranking:
    """K per output row (Wanda compares weights within a row of each Linear): a weight's group is
    row = flat // cols of its tensor viewed as [shape[0], -1]; within a row by (key desc, column);
    random_k ranks each row by an i.i.d. uniform key, i.e. a uniform random permutation per row."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    P, I, S, R = [], [], [], []
    for pid, n in enumerate(names):
        s = scores[n]
        x = s.detach().reshape(s.shape[0], -1) if s.ndim >= 2 else s.detach().reshape(1, -1)
        rows, cols = x.shape
        if k > cols:
            raise ConfigError(f"K={k} per row is larger than the row length {cols} of {n}; valid: 1..{cols}")
        if selection == "random_k":
            keys = torch.rand(rows, cols, generator=_gen(seed, f"random_k/{n}"))
        else:
            keys = _key(x, selection).reshape(rows, cols).cpu()
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
        flat = (torch.arange(rows).unsqueeze(1) * cols + order).reshape(-1)
        P.append(torch.full((flat.numel(),), pid, dtype=torch.int64))
        I.append(flat)
        S.append(x.reshape(-1)[flat.to(x.device)].float().cpu())
        R.append(torch.arange(k).repeat(rows))
    return Ranking(names, shapes, torch.cat(P), torch.cat(I), torch.cat(S), torch.cat(R), "per_row", selection)


RANKERS: dict[str, Callable[..., Ranking]] = {
    "global": rank_global,
    "per_layer": rank_per_layer,
    "per_row": rank_per_row,
}


def rank(scores: dict[str, torch.Tensor], k: int, mode: str = "global", selection: str = "top_k", seed: int = 0) -> Ranking:
    """Rank for the largest K of the grid; `.take(k)` gives every smaller K."""
    if int(k) < 1:
        raise ConfigError(f"K={k} must be >= 1; valid: 1..number of eligible weights")
    if mode not in RANKERS:
        raise ConfigError(f"unknown mode '{mode}'; valid choices: {', '.join(RANKERS)}")
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown selection '{selection}'; valid choices: {', '.join(SELECTIONS)}")
    return RANKERS[mode](scores, k, selection, seed)


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


def ranking_rows(r: Ranking, scores: dict[str, torch.Tensor] | None, values: dict[str, torch.Tensor], limit: int) -> list[dict]:
    """Rows for rankings.csv: rank, param, layer, row, col, flat_index, score, value (weight)."""
    from .models import layer_of

    rows = []
    n = min(limit, len(r))
    for j in range(n):
        pid, f = int(r.pid[j]), int(r.flat[j])
        name, shape = r.names[pid], r.shapes[pid]
        cols = shape[-1] if len(shape) >= 2 else 1
        row, col = (f // cols, f % cols) if len(shape) >= 2 else (0, f)
        rows.append({
            "rank": int(r.group_rank[j]) if r.mode == "global" else j,
            "param": name,
            "layer": layer_of(name),
            "row": row,
            "col": col,
            "flat_index": f,
            "score": float(r.score[j]),
            "value": float(values[name].detach().reshape(-1)[f].float()),
        })
    return rows
