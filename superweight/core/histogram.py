"""The log-scale histogram of a score set, for the score-distribution figure (no full score set is kept):

    hist_log10_edges   B + 1 edges (float64), multiples of 1/4 decade, from the lowest to the highest non-empty bin
    hist_count         B counts (int64): bin i holds edges[i] <= log10 s < edges[i+1]; Σ = #{finite s > 0}
    n_zero             #{s == 0} (int64 scalar); negative and non-finite scores are in neither

One pass over each tensor, in chunks: each finite s > 0 falls in bin floor((log10 s − LOG10_MIN) / BIN_WIDTH) of
a fixed grid covering every positive float32, which is then trimmed to its non-empty span.
"""

from __future__ import annotations

import torch

BIN_WIDTH = 0.25  # decades per bin: edges are multiples of 1/4, exact in binary
LOG10_MIN, LOG10_MAX = -46, 39  # the log10 range of positive finite float32 values (subnormals included)
GRID_BINS = int((LOG10_MAX - LOG10_MIN) / BIN_WIDTH)
CHUNK = 1 << 22  # elements per step (bounds the temporaries)


def log10_histogram(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hist_log10_edges, hist_count and n_zero of every score in `scores` (module docstring)."""
    count = torch.zeros(GRID_BINS, dtype=torch.int64)
    n_zero = 0
    for s in scores.values():
        flat = s.detach().reshape(-1)
        for i in range(0, flat.numel(), CHUNK):
            x = flat[i:i + CHUNK].float()
            n_zero += int((x == 0).sum())
            # log10 of 0 is -inf, of a negative NaN, of +inf +inf: all three fall outside [0, GRID_BINS)
            b = torch.log10(x).sub_(LOG10_MIN).div_(BIN_WIDTH).floor_()
            b = b[(b >= 0) & (b < GRID_BINS)].long()
            count += torch.bincount(b.cpu(), minlength=GRID_BINS)
    nz = torch.nonzero(count).flatten()
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.numel() else (-LOG10_MIN * 4, -LOG10_MIN * 4 + 1)
    edges = LOG10_MIN + BIN_WIDTH * torch.arange(lo, hi + 1, dtype=torch.float64)
    return {"hist_log10_edges": edges, "hist_count": count[lo:hi].clone(),
            "n_zero": torch.tensor(n_zero, dtype=torch.int64)}
