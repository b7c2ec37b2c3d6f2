"""Uniform random draws of weights: seeded generators keyed by a name, and k distinct draws from range(n)
without an index over all n (random_k at K << N)."""

from __future__ import annotations

import torch

from ..config import ConfigError


def generator(seed: int, salt: str) -> torch.Generator:
    """A torch generator seeded by (seed, salt string): one independent stream per (selection, group, draw)."""
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
