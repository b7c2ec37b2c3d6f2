"""The calibration loss for the double backward: `core.loss.lm_loss` with a cross-entropy whose backward
under create_graph has the analytic second derivative (no [N, vocab] fp32 temporaries kept)."""

from __future__ import annotations

import torch

from ..loss import lm_loss, next_token_nll
from .recompute import LEAN_PARTS


def _ce_grad(logits, lse, tgt, scale) -> torch.Tensor:
    """∂/∂logits of scale · mean_t (lse_t − logits[t, tgt_t]) over positions t < T−1: scale (p − onehot) / N."""
    b, T, V = logits.shape
    p = logits[:, :-1].reshape(-1, V).to(torch.float32, copy=True).sub_(lse[:, None]).exp_()
    p[torch.arange(p.shape[0], device=p.device), tgt] -= 1
    p.mul_(scale / p.shape[0])
    out = logits.new_empty(logits.shape)
    out[:, -1].zero_()
    out[:, :-1].copy_(p.view(b, T - 1, V))
    return out


class _CrossEntropy(torch.autograd.Function):
    """L = mean over next-token positions of −log softmax(fp32 logits)[target] (the same loss as
    core.loss.next_token_nll). Its backward under create_graph is `_CEGrad`, with the analytic second derivative:
    only the logits and the log-sum-exp [N] are kept, no [N, vocab] fp32 temporaries."""

    @staticmethod
    def forward(ctx, logits, tgt):
        lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        lse = torch.logsumexp(lg, -1)
        loss = (lse - lg.gather(1, tgt[:, None]).squeeze(1)).mean()
        ctx.save_for_backward(logits, lse, tgt)
        return loss

    @staticmethod
    def backward(ctx, go):
        logits, lse, tgt = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _CEGrad.apply(logits, lse, tgt, go), None
        return _ce_grad(logits, lse, tgt, go.float()), None


class _CEGrad(torch.autograd.Function):
    """G = scale (softmax(logits) − onehot)/N; backward: ∂<G, V>/∂logits = scale (p ⊙ v − p (p·v))/N per
    position (the softmax Jacobian), recomputing p from the logits and the log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, lse, tgt, go):
        ctx.save_for_backward(logits, lse, tgt, go)
        return _ce_grad(logits, lse, tgt, go.float())

    @staticmethod
    def backward(ctx, gg):
        logits, lse, tgt, go = ctx.saved_tensors
        b, T, V = logits.shape
        p = logits[:, :-1].reshape(-1, V).to(torch.float32, copy=True).sub_(lse[:, None]).exp_()
        v = gg[:, :-1].reshape(-1, V).to(torch.float32, copy=True)
        pv = torch.linalg.vecdot(p, v)[:, None]
        h = v.sub_(pv).mul_(p).mul_(go.float() / p.shape[0])
        out = logits.new_empty(logits.shape)
        out[:, -1].zero_()
        out[:, :-1].copy_(h.view(b, T - 1, V))
        return out, None, None, None


def lean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`core.loss.next_token_nll` through `_CrossEntropy` when it will be differentiated (grad mode on, logits
    requiring grad): the same value, and no [N, vocab] fp32 temporaries kept for the second backward."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropy.apply(logits, targets)
    return next_token_nll(logits, targets)


def next_token_loss(model, ids: torch.Tensor, lean: bool = True) -> torch.Tensor:
    """`core.loss.lm_loss`, with lean (and "loss" in LEAN_PARTS) through `lean_nll`."""
    return lm_loss(model, ids, lean_nll if lean and "loss" in LEAN_PARTS else next_token_nll)
