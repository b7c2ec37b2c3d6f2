"""The per-(metric, seed) score summary written to sensitivity_scores.safetensors: what a score set looks like
without keeping it (the full set is one fp32 number per weight).

    top_pid, top_flat, top_score   the global top entries (Top-K over every scored weight, no candidate mask)
    param_sum, param_max           Σ s and max s of each scored tensor (float64, in parameter order)
    hist_log10_edges               B + 1 edges (float64) of quarter-decade bins of log10 s (multiples of
                                   0.25), from the lowest to the highest non-empty bin
    hist_count                     B counts (int64): bin i holds edges[i] <= log10 s < edges[i+1], so
                                   Σ hist_count = #{finite s > 0}
    n_zero                         #{s == 0} (int64 scalar); negative and non-finite scores are in neither
"""

from __future__ import annotations

import torch

from .selections import rank

BIN_WIDTH = 0.25  # decades per bin: edges are multiples of 1/4, exact in binary
LOG10_MIN, LOG10_MAX = -46, 39  # the log10 range of positive finite float32 values (subnormals included)
HIST_BINS = int((LOG10_MAX - LOG10_MIN) / BIN_WIDTH)  # bins of the fixed grid, before trimming
CHUNK = 1 << 22  # elements per step of the pass over a tensor (bounds the temporaries)


def log10_histogram(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hist_log10_edges, hist_count and n_zero (module docstring) in one chunked pass: each finite s > 0
    falls in bin floor((log10 s − LOG10_MIN) / BIN_WIDTH) of a fixed grid (log10 in float32; exact int64
    counts), then the grid is trimmed to the bins from the first to the last non-empty one."""
    count = torch.zeros(HIST_BINS, dtype=torch.int64)
    n_zero = 0
    for s in scores.values():
        flat = s.detach().reshape(-1)
        for i in range(0, flat.numel(), CHUNK):
            x = flat[i : i + CHUNK].float()
            n_zero += int((x == 0).sum())
            lx = torch.log10(x[torch.isfinite(x) & (x > 0)])
            if lx.numel():
                idx = lx.sub_(LOG10_MIN).div_(BIN_WIDTH).floor_().clamp_(0, HIST_BINS - 1).long()
                count += torch.bincount(idx, minlength=HIST_BINS).cpu()
    nz = torch.nonzero(count).squeeze(1)
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.numel() else (-LOG10_MIN * 4, -LOG10_MIN * 4 + 1)
    edges = LOG10_MIN + BIN_WIDTH * torch.arange(lo, hi + 1, dtype=torch.float64)
    return {"hist_log10_edges": edges, "hist_count": count[lo:hi].clone(), "n_zero": torch.tensor(n_zero, dtype=torch.int64)}


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
