"""The per-(metric, seed) score summary written to sensitivity_scores.safetensors: what a score set looks like
without keeping it (the full set is one fp32 number per weight).

    top_pid, top_flat, top_score   the global top entries (Top-K over every scored weight, no candidate mask)
    param_sum, param_max           Σ s and max s of each scored tensor (float64, in parameter order)
    hist_log10_edges, hist_count,  the log10 histogram of every score (core/histogram.py)
    n_zero
"""

from __future__ import annotations

import torch

from .histogram import log10_histogram
from .selections import rank

def score_summary(scores: dict[str, torch.Tensor], top_saved: int) -> dict[str, torch.Tensor]:
    """The summary of one score set (module docstring), `top_saved` global top entries."""
    top = rank(scores, min(top_saved, sum(s.numel() for s in scores.values())), "global", "top_k")
    names = list(scores)
    return {
        "top_pid": top.pid, "top_flat": top.flat, "top_score": top.score.float(),
        "param_sum": torch.tensor([float(torch.sum(scores[n].detach(), dtype=torch.float64)) for n in names],
                                  dtype=torch.float64),
        "param_max": torch.tensor([float(scores[n].detach().max()) for n in names], dtype=torch.float64),
        **log10_histogram(scores),
    }
