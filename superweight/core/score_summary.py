"""The per-(metric, seed) score summary written to sensitivity_scores.safetensors: what a score set looks like
without keeping it (the full set is one fp32 number per weight).

    top_pid, top_flat, top_score   the global top entries (Top-K over every scored weight, no candidate mask)
    param_sum, param_max           Σ s and max s of each scored tensor (float64, in parameter order)
    hist_log10_edges               B + 1 edges (float64) of equal-width bins of log10 s, spanning
                                   [floor(log10 min s), ceil(log10 max s)] over the finite s > 0
    hist_count                     B counts (int64): bin i holds edges[i] <= log10 s < edges[i+1] (the last
                                   bin closed), so Σ hist_count = #{finite s > 0}
    n_zero                         #{s == 0} (int64 scalar); negative and non-finite scores are in neither
"""

from __future__ import annotations

import math

import torch

from .selections import rank

HIST_BINS = 120
CHUNK = 1 << 22  # elements per step of a pass over a tensor (bounds the temporaries)


def _chunks(s: torch.Tensor):
    flat = s.detach().reshape(-1)
    for i in range(0, flat.numel(), CHUNK):
        yield flat[i : i + CHUNK]


def log10_histogram(scores: dict[str, torch.Tensor], bins: int = HIST_BINS) -> dict[str, torch.Tensor]:
    """hist_log10_edges, hist_count and n_zero (module docstring) in two chunked passes: the range, then the
    counts (exact int64, never a float histogram)."""
    lo, hi, n_zero = math.inf, -math.inf, 0
    for s in scores.values():
        for x in _chunks(s):
            x = x.double()
            pos = x[torch.isfinite(x) & (x > 0)]
            n_zero += int((x == 0).sum())
            if pos.numel():
                lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
    if lo > hi:  # no positive score: an empty histogram over one decade
        a, b = 0.0, 1.0
    else:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        b = b if b > a else a + 1
    edges = torch.linspace(a, b, bins + 1, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.int64)
    inner = edges[1:-1].contiguous()
    for s in scores.values():
        for x in _chunks(s):
            x = x.double()
            lx = torch.log10(x[torch.isfinite(x) & (x > 0)])
            if lx.numel():
                count += torch.bincount(torch.bucketize(lx, inner, right=True), minlength=bins)
    return {"hist_log10_edges": edges, "hist_count": count, "n_zero": torch.tensor(n_zero, dtype=torch.int64)}


def score_summary(scores: dict[str, torch.Tensor], top_saved: int) -> dict[str, torch.Tensor]:
    """The summary of one score set (module docstring), `top_saved` global top entries."""
    top = rank(scores, min(top_saved, sum(s.numel() for s in scores.values())), "global", "top_k")
    names = list(scores)
    return {
        "top_pid": top.pid, "top_flat": top.flat, "top_score": top.score.float(),
        "param_sum": torch.tensor([float(scores[n].double().sum()) for n in names], dtype=torch.float64),
        "param_max": torch.tensor([float(scores[n].float().max()) for n in names], dtype=torch.float64),
        **log10_histogram(scores),
    }
