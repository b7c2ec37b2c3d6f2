"""The per-(metric, seed) score summary written to sensitivity_scores.safetensors: what a score set looks like
without keeping it (the full set is one fp32 number per weight).

    top_pid, top_flat, top_score   the global top entries (Top-K over every scored weight, no candidate mask)
    param_sum, param_max           Σ s and max s of each scored tensor (float64, in parameter order; float32
                                   scores: the float64 sum of float32 partial sums over 2^20 scores)
    hist_log10_edges, hist_count,  the octave histogram of every positive finite score, log10 edges, and the
    n_zero                         zeros (scan.py: from the float bits, exact)
"""

from __future__ import annotations

import torch

from .scan import score_set
from .selections import rank


def score_summary(scores: dict[str, torch.Tensor], top_saved: int) -> dict[str, torch.Tensor]:
    """The summary of one score set (module docstring), `top_saved` global top entries: the histogram, sums
    and maxima from the set's scan (scan.py), the top entries from a ranking that reads it."""
    scores = score_set(scores)
    scan = scores.scan
    top = rank(scores, min(top_saved, sum(s.numel() for s in scores.values())), "global", "top_k")
    return {
        "top_pid": top.pid, "top_flat": top.flat, "top_score": top.score.float(),
        "param_sum": torch.tensor(scan.sums, dtype=torch.float64),
        "param_max": torch.tensor(scan.maxima, dtype=torch.float64),
        **scan.histogram(),
    }
