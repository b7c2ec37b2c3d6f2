"""The calibration loss every gradient metric differentiates: the mean next-token NLL on fp32 logits,

    L = -(1/N) Σ_t log p(x_{t+1} | x_{≤t}),   N = b·(T-1) positions of a [b, T] batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .params import input_device


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL of `targets` ([b·(T-1)], the ids shifted by one) under fp32 `logits` [b, T, V] (last position
    dropped)."""
    lg = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), targets)


def lm_loss(model, ids: torch.Tensor,
            nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_nll) -> torch.Tensor:
    """L for token ids [b, T] (moved to the model's input device). `nll(logits, targets)`: the
    cross-entropy to use (hutchinson passes one with an analytic second derivative)."""
    ids = ids.to(input_device(model))
    logits = model(input_ids=ids, use_cache=False).logits
    return nll(logits, ids[:, 1:].reshape(-1).to(logits.device))
