"""Comparing selections and distributions: Jaccard overlap of two selections (rank stability), the
two-sample Kolmogorov-Smirnov distance (matched_k's |w| match), and the ties at a selection's boundary."""

from __future__ import annotations

import numpy as np
import torch

from .ranking import SHIFT, Mask, Ranking, Scores, bound_in, mask_at, mask_excluded

CHUNK = 1 << 20  # elements per step of the tie scan (bounds its fp64 temporaries; a scan chunk)


def jaccard(a: Ranking, b: Ranking) -> float:
    """|A ∩ B| / |A ∪ B| of two selections (by parameter name and flat index)."""
    if a.names == b.names:
        ka, kb = a.keys(), b.keys()
    else:
        idx = {n: i for i, n in enumerate(sorted(set(a.names) | set(b.names)))}
        ka = (torch.tensor([idx[a.names[p]] for p in a.pid.tolist()], dtype=torch.int64) << SHIFT) | a.flat
        kb = (torch.tensor([idx[b.names[p]] for p in b.pid.tolist()], dtype=torch.int64) << SHIFT) | b.flat
    if ka.numel() == 0 and kb.numel() == 0:
        return 1.0
    inter = int(torch.isin(ka, kb).sum())
    union = ka.numel() + kb.numel() - inter
    return inter / union


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| (0 = same distribution)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if a.size == 0 or b.size == 0:
        return float("nan")
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, "right") / a.size
    fb = np.searchsorted(b, x, "right") / b.size
    return float(np.max(np.abs(fa - fb)))


def _equal(x: torch.Tensor, val: float) -> torch.Tensor:
    """x == val exactly: in x's own dtype where it holds val (a Python float against an integer tensor would
    compare in float32: 2^24 + 1 == 2^24), else in fp64."""
    if x.is_floating_point() and bound_in(val, x.dtype, up=False) == val:
        return x == val
    if not x.is_floating_point() and float(val).is_integer():
        return x == int(val)
    return x.double() == val


def _count_candidates(hit: torch.Tensor, mask_fn: Mask | None, name: str, start: int) -> int:
    """How many of the chunk's entries flagged in `hit` (the chunk starts at flat `start`) are candidates: from
    the few excluded weights when the mask lists them, else from the chunk's mask."""
    n = int(torch.count_nonzero(hit))
    if mask_fn is None or n == 0:
        return n
    try:
        ex = mask_excluded(mask_fn, name)
    except LookupError:  # a dense mask: read it
        m = mask_fn(name)
        return n if m is None else int((hit & m.reshape(-1)[start : start + hit.numel()].to(hit.device)).sum())
    if ex is None:
        return n
    ex = ex.to(torch.int64)
    ex = ex[(ex >= start) & (ex < start + hit.numel())] - start
    return n - int(hit[ex.to(hit.device)].sum())


def _zeros_from_scan(scores: Scores, scan, pids: dict, names: list[str], mask_fn: Mask | None) -> int | None:
    """How many candidates score exactly ±0: the scan's zero counts less the zeros among the excluded weights
    (None where a mask does not list them: then they are compared like any other boundary value)."""
    total, per_tensor = 0, scan.per_tensor(scan.zeros)
    for name in names:
        zeros = int(per_tensor[pids[name]])
        try:
            ex = mask_excluded(mask_fn, name)
        except LookupError:
            return None
        if ex is not None and ex.numel() and zeros:
            s = scores[name].detach().reshape(-1)
            zeros -= int(torch.count_nonzero(s[ex.to(s.device)] == 0))
        total += zeros
    return total


def tied_counts(scores: Scores, ranking: Ranking, ks: list[int], mask_fn: Mask | None = None) -> dict[int, int]:
    """n_tied of each K-selection `ranking.take(k)` of a global ranking: how many candidates share the score
    of its last (K-th) selected entry, over all candidates (1 = no tie at the boundary; 0 = empty). One pass
    over the scores for the whole K grid: each chunk is compared in its own dtype with the range of the
    boundary values (widened to that dtype), and only the entries inside it are compared exactly (fp64) and
    checked against the candidate mask. With a scan of the scores, a chunk whose classes hold none of the
    boundary values is not read. No pass at all where every boundary is known: a ranking by score counts its
    own nonzero scores as it ranks (`ranking.tied`, used when `mask_fn` is the mask it was drawn with),
    and a boundary at 0 is the scan's zero count less the excluded zeros."""
    bound: dict[int, float] = {}
    for k in ks:
        n = min(int(k), len(ranking))
        if n:
            p, f = int(ranking.pid[n - 1]), int(ranking.flat[n - 1])
            bound[k] = float(scores[ranking.names[p]].detach().reshape(-1)[f].double())
    vals = sorted({v for v in bound.values() if not np.isnan(v)})
    want_nan = any(np.isnan(v) for v in bound.values())
    scan = getattr(scores, "scan", None)  # a scan of the scores (scan.py): chunks that hold no boundary value are skipped
    pids = {n: i for i, n in enumerate(scan.names)} if scan is not None and scan.exact else None
    # counted while it was ranked (modes.py), under its own mask: used for that mask only
    known = dict(ranking.tied[1]) if ranking.tied is not None and ranking.tied[0] is mask_fn else {}
    if pids is not None and 0.0 in vals:  # a boundary at 0 (a mass of zero scores): counted, never compared
        n_zero = _zeros_from_scan(scores, scan, pids, ranking.names, mask_fn)
        if n_zero is not None:
            known[0.0] = n_zero
    vals = [v for v in vals if v not in known]
    if not vals and not want_nan:
        return {k: known[bound[k]] if k in bound else 0 for k in ks}
    b = torch.tensor(vals, dtype=torch.float64)
    counts = torch.zeros(len(vals), dtype=torch.int64)
    n_nan = 0
    wanted = vals + ([float("nan")] if want_nan else [])
    for name in ranking.names:
        s = scores[name].detach().reshape(-1)
        for st in range(0, s.numel(), CHUNK):
            if pids is not None and not scan.may_hold(pids[name], st, st + CHUNK, wanted):
                continue
            x = s[st : st + CHUNK]
            if want_nan:
                nan = torch.nonzero(torch.isnan(x)).squeeze(1)
                m = mask_at(mask_fn, name, nan + st)
                n_nan += int(m.sum()) if m is not None else nan.numel()
            if vals:
                lo, hi = bound_in(vals[0], x.dtype, up=False), bound_in(vals[-1], x.dtype, up=True)
                inside = (x >= lo) & (x <= hi)  # NaN is in no range; exact below, in fp64
                n_in = int(torch.count_nonzero(inside))
                if n_in == 0:
                    continue
                if n_in * 4 > x.numel():  # a mass of ties (a metric scoring most weights 0): count each value
                    for j, val in enumerate(vals):
                        eq = _equal(x, val)
                        counts[j] += _count_candidates(eq, mask_fn, name, st)
                    continue
                idx = torch.nonzero(inside).squeeze(1)
                v = x[idx].double().cpu()
                i = torch.searchsorted(b, v).clamp_(max=len(vals) - 1)
                hit = b[i] == v
                m = mask_at(mask_fn, name, idx + st)  # the mask of the entries in range only
                if m is not None:
                    hit &= m.cpu()
                counts += torch.bincount(i[hit], minlength=len(vals))
    by_val = {**known, **dict(zip(vals, counts.tolist()))}
    return {k: (n_nan if np.isnan(bound[k]) else by_val[bound[k]]) if k in bound else 0 for k in ks}
