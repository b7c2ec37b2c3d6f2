"""A `Ranking`: the weights a selection picked, in order, addressed as (parameter, flat index), with the
seeded tie-break every selection shares and the streaming "k best" primitive.

Ties are broken by a seeded random draw, never by index: the ranking key is (score, u) with u a hash of
(seed, parameter name, flat index), uniform and independent of the order tensors are visited, so any prefix
of a ranking takes a uniformly random subset of the entries tied at its boundary.

A `Ranking` is ordered; selecting K keeps entries whose group rank is < K, so a K grid is a family of nested
sets from one ranking (the top-10 is the prefix of the top-100), for every selection that nests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

SHIFT = 40  # composite key = param index << 40 | flat index (tensors up to 1e12 elements)
Mask = Callable[[str], "torch.Tensor | None"]  # parameter name -> bool mask of candidates (None: all)


def bound_in(value: float, dtype: torch.dtype, up: bool) -> float | int:
    """A number that `dtype` holds exactly, at most `value` (up=False) or at least `value` (up=True). A
    comparison of a `dtype` tensor with it, made in that dtype, keeps every entry the exact comparison with
    `value` keeps (and maybe a few more): a cheap prefilter whose survivors are then compared exactly in fp64
    (a Python float is rounded to the tensor's dtype before a comparison: 0.1 of an fp64 tensor is not 0.1
    of an fp32 one)."""
    if not math.isfinite(value):
        return value
    if not dtype.is_floating_point:
        return math.ceil(value) if up else math.floor(value)
    if dtype == torch.float64:
        return value
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if (float(t) < value) if up else (float(t) > value):
        t = torch.nextafter(t, torch.tensor(float("inf") if up else float("-inf"), dtype=dtype))
    return float(t)


def mask_at(mask_fn: "Mask | None", name: str, flat: torch.Tensor) -> "torch.Tensor | None":
    """The candidate mask of tensor `name` at flat positions `flat` (None: all are candidates). A mask with an
    `at(name, flat)` method answers for those positions alone (its rule is elementwise), without building
    the whole tensor's mask; any other is built and indexed."""
    if mask_fn is None:
        return None
    at = getattr(mask_fn, "at", None)
    if at is not None:
        return at(name, flat)
    m = mask_fn(name)
    return None if m is None else m.reshape(-1)[flat.to(m.device)]


def mask_excluded(mask_fn: "Mask | None", name: str) -> "torch.Tensor | None":
    """The flat indices of tensor `name`'s non-candidates (None: every weight is a candidate), from a mask that
    lists them (an `excluded(name)` method); LookupError where it cannot (a dense mask, or no such method):
    read the whole mask instead."""
    if mask_fn is None:
        return None
    excluded = getattr(mask_fn, "excluded", None)
    if excluded is None:
        raise LookupError(f"{name}: the mask does not list its excluded weights")
    return excluded(name)


def mask_count(mask_fn: "Mask | None", name: str, numel: int) -> int:
    """How many candidates tensor `name` (numel weights) holds; memoized by a mask with a `count` method."""
    if mask_fn is None:
        return numel
    count = getattr(mask_fn, "count", None)
    if count is not None:
        return count(name)
    m = mask_fn(name)
    return numel if m is None else int(m.sum())
Scores = dict  # parameter name -> score tensor (the one narrow interface every ranking entry point reads)


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
    support: int | None = None  # informative candidates (top_k; per group in grouped modes); None = unbounded
    n_candidates: int = 0  # weights the selection could draw from
    stats: dict = field(default_factory=dict)  # per-selection extras (matched_k: match quality)
    per_k: dict = field(default_factory=dict)  # K -> its own selection, for selections that do not nest (matched_k)
    k_max: int | None = None  # with per_k: the K this ranking itself was drawn for (not kept in per_k: no cycle)
    group: torch.Tensor | None = None  # [M] int64 comparison group of each entry (grouped modes), None = one group
    # (mask, {score: candidates scoring exactly that}) for every nonzero score of this ranking, counted while
    # it was ranked under that candidate mask (modes.py), so its tie counts need no pass; None = not known.
    # Not carried by take(), not cached.
    tied: tuple | None = field(default=None, repr=False, compare=False)

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
                       self.mode, self.selection, self.support, self.n_candidates, stats,
                       group=self.group[m] if self.group is not None else None)

    def by_param(self) -> dict[str, torch.Tensor]:
        """{param name: sorted flat indices} for perturbation."""
        return {self.names[pid]: torch.sort(self.flat[sel]).values for pid, sel in groups(self.pid)}

    def keys(self) -> torch.Tensor:
        return (self.pid << SHIFT) | self.flat

    def named_keys(self) -> set[tuple[str, int]]:
        return {(self.names[p], f) for p, f in zip(self.pid.tolist(), self.flat.tolist())}

    def group_counts(self) -> dict[int, int]:
        """{comparison group: entries selected in it} (grouped modes; {} for one global group)."""
        if self.group is None or self.group.numel() == 0:
            return {}
        g, c = torch.unique(self.group, return_counts=True)
        return dict(zip(g.tolist(), c.tolist()))


def groups(pid: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(param id, positions of its entries)] with one sort, O(K log K)."""
    if pid.numel() == 0:
        return []
    order = torch.argsort(pid, stable=True)
    uniq, counts = torch.unique_consecutive(pid[order], return_counts=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist())))


def gather(scores: Scores, names: list[str], pid: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The original scores (NaN kept) of the selected entries, as float32 on the CPU: O(K)."""
    out = torch.empty(pid.numel(), dtype=torch.float32)
    for p, sel in groups(pid):
        s = scores[names[p]].detach().reshape(-1)
        out[sel] = s[flat[sel].to(s.device)].float().cpu()
    return out


# --- seeded tie-breaks --------------------------------------------------------------------------------
_M64 = (1 << 64) - 1
HASH_BLOCK = 1 << 18  # entries hashed at a time: 2 MB int64 buffers stay in cache (1M at once: 2x slower)


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
    # in place from here: two buffers (a mass of ties hashes millions); contiguous, so that it reads as a line
    out = flat.to(torch.int64, memory_format=torch.contiguous_format, copy=True)
    y = torch.empty(min(out.numel(), HASH_BLOCK), dtype=torch.int64, device=out.device)
    line = out.view(-1)  # blocks of elements, whatever the shape of `flat` (per-row modes pass 2-D indices)
    for st in range(0, line.numel(), HASH_BLOCK):  # blocks that stay in cache through the 11 passes: 2x faster
        x = line[st : st + HASH_BLOCK]
        t = y[: x.numel()]
        x ^= _i64(pkey ^ ((int(seed) * 0x9E3779B97F4A7C15) + salt * 0xD1B54A32D192ED03))
        x += _i64(0x9E3779B97F4A7C15)
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
            torch.bitwise_right_shift(x, shift, out=t)  # arithmetic shift; the mask makes it logical
            x ^= t.bitwise_and_((1 << (64 - shift)) - 1)
            if mul is not None:
                x *= _i64(mul)
        x.bitwise_and_((1 << 63) - 1)
    return out


def order(vals: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices sorting by (vals desc, u asc)."""
    o1 = torch.argsort(u, stable=True)
    o2 = torch.argsort(vals[o1], descending=True, stable=True)
    return o1[o2]


def best(vals: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best entries by (vals desc, u asc), in that order; O(n) selection then a sort of k."""
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=vals.device)
    if vals.numel() > k:
        kth = torch.topk(vals, k, sorted=False).values.min()
        gt = torch.nonzero(vals > kth).squeeze(1)
        eq = torch.nonzero(vals == kth).squeeze(1)
        need = k - gt.numel()
        eq = eq[torch.topk(-u[eq].double(), need, sorted=False).indices] if eq.numel() > need else eq
        pos = torch.cat([gt, eq])
    else:
        pos = torch.arange(vals.numel(), device=vals.device)
    return pos[order(vals[pos], u[pos])]
