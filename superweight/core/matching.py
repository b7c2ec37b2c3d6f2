"""The matched_k engine: for each Top-K weight, a free candidate of the same module type with nearly the
same |w|, none of them in Top-K and each used once ("is it just big weights?").

Per module type, targets in rank order. A target first draws uniformly among the free candidates whose |w|
lies in a relative window around its own |w| (±1%, widened to ±5%, 20%, 100% only when the window has no
free candidate): the match reproduces the |w| distribution of Top-K. A target with no free candidate
within ±100% (the largest weights: a super weight or magnitude's Top-K sit in the far tail) takes the
nearest free candidate by |w| (smallest |log(|w_match| / |w_top|)|), searched in windows ×4, ×16, ×256,
×65536, then among the type's extreme weights: rank matching, never a uniform draw.

Dense windows are served from a uniform random sample of the type's candidates (`POOL`); sparse ones from
an exact pass over the type's weights restricted to the windows still needed. Both are built once per
`Matcher` (one per seed, draw and candidate set) and shared by every K of the grid: a K needs no pass over
the weights that an earlier K already made.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .overlap import ks_distance
from .params import module_type
from .ranking import SHIFT, Mask, Ranking, groups, mask_at

WIDTHS = (0.01, 0.05, 0.2, 1.0)  # relative |w| windows of the uniform draw
NEAREST = (3.0, 15.0, 255.0, 65535.0)  # windows (×4 .. ×65536) searched for the nearest free candidate
POOL = 1 << 18  # candidates per module type sampled uniformly to serve the dense |w| windows
CHUNK = 1 << 22  # elements per step of a pass over a tensor (bounds its temporaries)
GATHER_WIDTH = 0.2  # an exact pass gathers the windows at this width at least (serves the narrower ones too)
_TINY = 1e-300  # |w| = 0 in the log distance


_LOW = (1 << 29) - 1  # the float64 mantissa bits below float32's: zero for every |w| read from fp32/bf16/fp16


def _by_value_then_key(v: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The order by |w| (v >= 0, float64), then by key: a weight gathered twice lies next to itself. Keys
    already increasing (a pool) and |w| read from weights of 32 bits or fewer: the float64 bits of v >= 0
    sort as v does and their 29 low bits are zero, so the position (= key order) fits there and one integer
    sort gives lexsort's order, 4x faster (7 ms against 30 for a pool of 2^18)."""
    bits = v.view(np.int64)
    if (key.size < 1 << 29 and not (bits & _LOW).any() and not (bits < 0).any()
            and bool((key[1:] > key[:-1]).all())):
        return np.argsort(bits | np.arange(key.size, dtype=np.int64))
    return np.lexsort((key, v))


@dataclass
class _Sorted:
    """Candidates (|w| ascending, float64) with their parameter id, flat index and int key (pid << 40 | flat:
    `taken` holds these)."""

    val: np.ndarray
    pid: np.ndarray
    flat: np.ndarray
    key: np.ndarray

    @staticmethod
    def of(vals, pids, flats) -> "_Sorted":
        v = np.concatenate(vals) if vals else np.empty(0)
        p = np.concatenate(pids) if pids else np.empty(0, np.int64)
        f = np.concatenate(flats) if flats else np.empty(0, np.int64)
        key = (p << SHIFT) | f
        o = _by_value_then_key(v, key)
        v, p, f, key = v[o], p[o], f[o], key[o]
        first = np.ones(key.size, dtype=bool)
        first[1:] = key[1:] != key[:-1]  # one entry per weight
        return _Sorted(v[first], p[first], f[first], key[first])

    def _span(self, lo: float, hi: float) -> tuple[int, int]:
        return int(np.searchsorted(self.val, lo, "left")), int(np.searchsorted(self.val, hi, "right"))

    def pick(self, lo: float, hi: float, taken: set, gen: np.random.Generator) -> int | None:
        """The key of a uniformly random entry with lo <= |w| <= hi that is not taken, or None."""
        s, b = self._span(lo, hi)
        if b <= s:
            return None
        for _ in range(8):  # rejection: taken entries are rare inside a window
            key = int(self.key[s + int(gen.integers(b - s))])
            if key not in taken:
                return key
        free = [k for k in self.key[s:b].tolist() if k not in taken]  # a window of mostly taken weights
        return free[int(gen.integers(len(free)))] if free else None

    def nearest(self, a: float, lo: float, hi: float, taken: set) -> int | None:
        """The key of the free entry with lo <= |w| <= hi nearest to |w| = a by |log(|w| / a)| (ties: the
        smaller |w|), walking outwards from a: O(taken entries passed)."""
        s, b = self._span(lo, hi)
        right = int(np.searchsorted(self.val, a, "left"))
        left = right - 1
        la = np.log(a + _TINY)
        while left >= s and int(self.key[left]) in taken:
            left -= 1
        while right < b and int(self.key[right]) in taken:
            right += 1
        if left < s and right >= b:
            return None
        dl = la - np.log(self.val[left] + _TINY) if left >= s else np.inf
        dr = np.log(self.val[right] + _TINY) - la if right < b else np.inf
        return int(self.key[left if dl <= dr else right])


def _merge(windows) -> list[list[float]]:
    out: list[list[float]] = []
    for lo, hi in sorted(windows):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def _subtract(want: list[list[float]], have: list[list[float]]) -> list[tuple[float, float]]:
    """Parts of the (merged) intervals `want` not inside the (merged) intervals `have` (closed intervals:
    the remainders keep their end points, so a weight at a boundary may be gathered twice; `_Sorted.of`
    keeps one)."""
    out = []
    for lo, hi in want:
        cur = lo
        for a, b in have:
            if b < cur or a > hi:
                continue
            if a > cur:
                out.append((cur, a))
            cur = max(cur, b)
            if cur >= hi:
                break
        if cur < hi or (cur == hi == lo):
            out.append((cur, hi))
    return out


@dataclass
class _Gathered:
    """The exact |w| windows of one module type gathered so far: every candidate in them (no draw involved,
    so Matchers of other draws over the same weights and candidates may share it)."""

    covered: list[list[float]] = field(default_factory=list)
    near: _Sorted | None = None


@dataclass
class Shared:
    """What the Matchers over the same weights and candidate mask may share, whatever their scores: each
    module type's exact |w| windows (every candidate in them: no draw involved) and each (seed, draw)'s uniform
    pools (no score involved). Sharing changes the cost of a draw, never the draw."""

    gathered: dict = field(default_factory=dict)  # module type -> _Gathered
    pools: dict = field(default_factory=dict)  # (seed, draw, module type) -> (_Sorted pool, exact)


@dataclass
class _Type:
    """One module type's candidates: the uniform pool (this draw's) and the exact windows (maybe shared)."""

    pids: list[int]
    gathered: _Gathered
    pool: _Sorted | None = None
    exact: bool = False


class Matcher:
    """matched_k for one (seed, draw, candidate set), shared across the K grid (`match(top.take(k), k)`).
    `shared` (a `Shared`) may be handed to every Matcher over the same weights and candidate mask (other
    draws, seeds, metrics): exact passes and pools are then made once."""

    def __init__(self, names: list[str], values: Callable[[str], torch.Tensor], mask_fn: Mask | None,
                 seed: int, draw: int, shared: Shared | None = None):
        self.names, self.values, self.mask_fn, self.seed, self.draw = names, values, mask_fn, int(seed), int(draw)
        self.shared = shared if shared is not None else Shared()
        self.types: dict[str, _Type] = {}
        for pid, n in enumerate(names):
            t = module_type(n)
            if t not in self.types:
                self.types[t] = _Type([], self.shared.gathered.setdefault(t, _Gathered()))
            self.types[t].pids.append(pid)
        self.passes = 0  # exact passes over a type's weights (gathers), for the bench and tests

    def _abs(self, pid: int) -> torch.Tensor:
        return self.values(self.names[pid]).detach().reshape(-1).abs()

    def _mask(self, pid: int) -> torch.Tensor | None:
        m = self.mask_fn(self.names[pid]) if self.mask_fn is not None else None
        return m.reshape(-1) if m is not None else None

    def abs_at(self, pid: torch.Tensor, flat: torch.Tensor) -> np.ndarray:
        """|w| of (pid, flat) entries, one values() call per tensor."""
        out = np.empty(pid.numel())
        for p, sel in groups(pid):
            w = self.values(self.names[p]).detach().reshape(-1)
            out[sel.numpy()] = w[flat[sel].to(w.device)].abs().double().cpu().numpy()  # |w| of these only
        return out

    def _pool(self, t: str) -> _Type:
        """The type's candidates: all of them when the type holds at most POOL weights, else a uniform random
        sample (POOL positions drawn with replacement, non-candidates and repeats dropped: every candidate
        is equally likely to be in it, so a uniform pick inside a |w| window of the sample is a uniform pick
        inside that window)."""
        ty = self.types[t]
        if ty.pool is not None:
            return ty
        key = (self.seed, self.draw, t)
        if key in self.shared.pools:
            ty.pool, ty.exact = self.shared.pools[key]
            return ty
        sizes = np.asarray([int(np.prod(self.values(self.names[p]).shape)) for p in ty.pids], dtype=np.int64)
        ty.exact = int(sizes.sum()) <= POOL
        vals, ps, fs = [], [], []
        if ty.exact:
            for pid in ty.pids:
                w, m = self._abs(pid), self._mask(pid)
                idx = torch.nonzero(m).squeeze(1) if m is not None else torch.arange(w.numel(), device=w.device)
                vals.append(w[idx.to(w.device)].double().cpu().numpy())
                fs.append(idx.cpu().numpy().astype(np.int64))
                ps.append(np.full(idx.numel(), pid, dtype=np.int64))
        else:
            gen = np.random.default_rng([self.seed, self.draw, 7_777, zlib.crc32(t.encode())])
            pos = np.sort(gen.integers(0, int(sizes.sum()), POOL))
            pos = pos[np.concatenate([[True], pos[1:] != pos[:-1]])]  # sorted, repeats dropped
            ends = np.cumsum(sizes)
            which = np.searchsorted(ends, pos, side="right")
            for j, pid in enumerate(ty.pids):
                sel = which == j
                if not sel.any():
                    continue
                flat = torch.from_numpy(pos[sel] - (ends[j] - sizes[j]))
                w, m = self.values(self.names[pid]).detach().reshape(-1), mask_at(self.mask_fn, self.names[pid], flat)
                if m is not None:
                    flat = flat[m.cpu()]
                vals.append(w[flat.to(w.device)].abs().double().cpu().numpy())
                fs.append(flat.numpy().astype(np.int64))
                ps.append(np.full(flat.numel(), pid, dtype=np.int64))
        ty.pool = _Sorted.of(vals, ps, fs)
        self.shared.pools[key] = (ty.pool, ty.exact)
        return ty

    def _gather(self, ty: _Type, windows: list[tuple[float, float]]) -> _Sorted:
        """Every candidate of the type whose |w| lies in one of the windows, from the windows gathered so far
        plus one chunked pass for the parts not yet covered (bucketize against the merged windows: inside =
        an odd bucket)."""
        need = _subtract(_merge(windows), ty.gathered.covered)
        if not need and ty.gathered.near is not None:
            return ty.gathered.near
        self.passes += 1
        bounds = np.asarray([x for lo_hi in _merge(need) for x in lo_hi], dtype=np.float64)
        b32 = bounds.astype(np.float32)  # float32 bounds widened outwards (the exact test is in float64)
        b32[0::2] = np.nextafter(b32[0::2], np.float32(-np.inf))
        b32[1::2] = np.nextafter(b32[1::2], np.float32(np.inf))
        near = ty.gathered.near
        vals, ps, fs = ([near.val], [near.pid], [near.flat]) if near is not None else ([], [], [])
        lo, hi = float(b32[0]), float(b32[-1])
        for pid in ty.pids:
            w = self.values(self.names[pid]).detach().reshape(-1)
            b = torch.from_numpy(b32).to(w.device)
            for s in range(0, w.numel(), CHUNK):
                x = w[s : s + CHUNK].abs().float()  # a copy (never abs_: .float() of fp32 is the weight itself)
                idx = torch.nonzero((x >= lo) & (x <= hi)).squeeze(1)  # the span of all windows: usually a tail
                if idx.numel() == 0:
                    continue
                x = x[idx]
                inside = torch.bucketize(x, b, right=True) % 2 == 1
                m = mask_at(self.mask_fn, self.names[pid], idx + s)  # the mask of the entries in range only
                if m is not None:
                    inside &= m.to(inside.device)
                idx = idx[inside]
                if idx.numel():
                    v = w[s : s + CHUNK][idx].abs().double().cpu().numpy()  # |w| in fp64 from the weights themselves
                    i = np.searchsorted(bounds, v, side="right")
                    ok = (i % 2 == 1) | ((i > 0) & (bounds[np.maximum(i - 1, 0)] == v))  # exact, closed windows
                    vals.append(v[ok])
                    fs.append(idx.cpu().numpy().astype(np.int64)[ok] + s)
                    ps.append(np.full(int(ok.sum()), pid, dtype=np.int64))
        ty.gathered.covered = _merge([*map(tuple, ty.gathered.covered), *need])
        ty.gathered.near = _Sorted.of(vals, ps, fs)
        return ty.gathered.near

    def _extremes(self, ty: _Type, m: int) -> _Sorted:
        """The m largest and m smallest candidates by |w| of each tensor of the type (the last resort of a
        target more than ×65536 away from every free candidate: above or below all of them)."""
        self.passes += 1
        vals, ps, fs = [], [], []
        for pid in ty.pids:
            w, msk = self._abs(pid), self._mask(pid)
            idx = torch.nonzero(msk).squeeze(1) if msk is not None else torch.arange(w.numel(), device=w.device)
            x = w[idx.to(w.device)].double()
            j = min(m, x.numel())
            for largest in (True, False):
                pos = torch.topk(x, j, largest=largest).indices
                vals.append(x[pos].cpu().numpy())
                fs.append(idx[pos.to(idx.device)].cpu().numpy().astype(np.int64))
                ps.append(np.full(j, pid, dtype=np.int64))
        return _Sorted.of(vals, ps, fs)

    def match(self, top: Ranking, k: int) -> Ranking:
        """The matched_k selection of Top-K set `top` (drawn for this K; group rank = its target's)."""
        tp = top.pid.tolist()
        tv = self.abs_at(top.pid, top.flat)
        mtype = [module_type(n) for n in self.names]
        taken = set(top.keys().tolist())  # never a Top-K weight, never twice
        out = np.full(len(tp), -1, dtype=np.int64)  # each target's match, as a key
        gen = np.random.default_rng([self.seed, self.draw, 7_777, int(k)])

        def window(i: int, width: float) -> tuple[float, float]:
            return (tv[i] / (1 + width), tv[i] * (1 + width)) if np.isfinite(width) else (0.0, np.inf)

        def assign(targets: list[int], width: float, source: _Sorted, nearest: bool) -> list[int]:
            left = []
            for i in targets:
                got = source.nearest(tv[i], *window(i, width), taken) if nearest else \
                    source.pick(*window(i, width), taken, gen)
                if got is None:
                    left.append(i)
                else:
                    out[i] = got
                    taken.add(got)
            return left

        for t in self.types:
            pending = [i for i, p in enumerate(tp) if mtype[p] == t]
            if not pending:
                continue
            ty = self._pool(t)
            for width in WIDTHS:  # uniform inside the window
                if not pending:
                    break
                rest = assign(pending, width, ty.pool, False)
                if rest and not ty.exact:  # sparse windows: every candidate in them, exactly
                    cover = max(width, GATHER_WIDTH)
                    rest = assign(rest, width, self._gather(ty, [window(i, cover) for i in rest]), False)
                pending = rest
            for width in NEAREST:  # the nearest free candidate
                if not pending:
                    break
                src = ty.pool if ty.exact else self._gather(ty, [window(i, width) for i in pending])
                pending = assign(pending, width, src, True)
            if pending:
                ext = self._extremes(ty, len(pending) + len(taken))
                pending = assign(pending, np.inf, ext, True)
        ok = out >= 0
        pid, flat = torch.from_numpy(out[ok] >> SHIFT), torch.from_numpy(out[ok] & ((1 << SHIFT) - 1))
        got = self.abs_at(pid, flat)
        okt = torch.from_numpy(ok)
        stats = {"target_abs_w": tv[ok], "match_abs_w": got}
        return Ranking(self.names, top.shapes, pid, flat, top.score[okt], top.group_rank[okt], top.mode, "matched_k",
                       None, top.n_candidates, stats, group=top.group[okt] if top.group is not None else None)


def match_errors(sel: Ranking) -> np.ndarray:
    """|w_match| / |w_top| − 1 of each matched pair (0 when both are 0)."""
    st = sel.stats
    t, m = np.asarray(st["target_abs_w"], float), np.asarray(st["match_abs_w"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, m / np.where(t > 0, t, 1.0) - 1, np.where(m > 0, np.inf, 0.0))


def match_quality(sel: Ranking) -> dict:
    """For a matched_k selection: `match_ks`, the KS distance between the |w| of its targets and its own;
    `match_err_median` and `match_err_max`, the median relative |w| error |w_match| / |w_top| − 1 and the
    error of largest magnitude (signed: −0.96 = a match 25× smaller than its target). {} otherwise."""
    st = sel.stats
    if not st or "target_abs_w" not in st:
        return {}
    err = match_errors(sel)
    return {"match_ks": ks_distance(st["target_abs_w"], st["match_abs_w"]),
            "match_err_median": float(np.median(err)) if err.size else float("nan"),
            "match_err_max": float(err[np.argmax(np.abs(err))]) if err.size else float("nan")}
