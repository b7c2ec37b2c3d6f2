"""The autograd nodes of the fused route (scored nn.Linear / GPT-2 Conv1D weights): the forward use, the use
inside the first backward, and the probe scalars <g_W, z> (`Probe` for fused weights, `GZ` for the generic
route). Their second-backward passes fold z ⊙ (H z) into the score buffers where it is produced."""

from __future__ import annotations

import torch


def _lin(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.t() if transposed else w


class ScoredLinear(torch.autograd.Function):
    """y = x Wlᵀ (+ b), Wl = W (Linear) or Wᵀ (Conv1D). Phase 1 backward: δ_in = δ Wl through `BackwardUse`,
    records `Probe`(x, δ), no weight gradient (skips a plain backward's δᵀx matmul). Phase 2 (the second
    backward reaching W's forward use): folds z ⊙ (δ'ᵀ x) into the score buffer, returns the input gradient."""

    @staticmethod
    def forward(ctx, x, w, b, run, name, transposed):
        ctx.run, ctx.name, ctx.transposed = run, name, transposed
        ctx.save_for_backward(x, w, b)
        wl = _lin(w, transposed).to(x.dtype)
        return torch.nn.functional.linear(x, wl, None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, w, b = ctx.saved_tensors
        run, name, tr = ctx.run, ctx.name, ctx.transposed
        gx = gb = None
        if run.phase == 1:
            if ctx.needs_input_grad[0]:
                gx = BackwardUse.apply(gy, w, run, name, tr)
            if gy.requires_grad:  # created here, not after the first backward: see `Probe`
                run.parts.append(Probe.apply(x, gy, run, name, tr))
        else:
            if ctx.needs_input_grad[0]:
                gx = gy @ _lin(w, tr).to(gy.dtype)
            run.fold_linear(name, tr, gy, x)
        if b is not None and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, gb, None, None, None


class BackwardUse(torch.autograd.Function):
    """δ_in = δ Wl, W's use inside the first backward. Its backward (phase 2) returns ∂/∂δ and folds W's
    other contribution to H z, z ⊙ (δᵀ ∂s/∂δ_in), into the score buffer."""

    @staticmethod
    def forward(ctx, gy, w, run, name, transposed):
        ctx.run, ctx.name, ctx.transposed = run, name, transposed
        ctx.save_for_backward(gy, w)
        return gy @ _lin(w, transposed).to(gy.dtype)

    @staticmethod
    def backward(ctx, ggx):
        gy, w = ctx.saved_tensors
        ctx.run.fold_linear(ctx.name, ctx.transposed, gy, ggx)
        ggy = ggx @ _lin(w, ctx.transposed).to(ggx.dtype).t() if ctx.needs_input_grad[0] else None
        return ggy, None, None, None, None


class Probe(torch.autograd.Function):
    """s_W = Σ_t δ_tᵀ Z x_t = <δᵀx, Z> for the current probe k (looked up in backward, so one graph serves
    every probe). Only its gradient is used, so the forward returns 0 instead of computing the value.
    Created inside the first backward, right after the layer's own nodes: autograd runs ready nodes in
    decreasing creation order, so in the second backward each layer's `Probe` runs next to that layer's
    first-backward nodes and its outputs are consumed at once instead of waiting for the whole sweep."""

    @staticmethod
    def forward(ctx, x, gy, run, name, transposed):
        ctx.run, ctx.name, ctx.transposed = run, name, transposed
        ctx.save_for_backward(x, gy)
        return x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, go):
        x, gy = ctx.saved_tensors
        run, name, tr = ctx.run, ctx.name, ctx.transposed
        f = run.factors(name, x.device, x.dtype)
        go = go.to(x.dtype)
        gx = ggy = None
        if len(f) == 2:  # ∂s/∂x_t = (δ_t·a) b, ∂s/∂δ_t = (x_t·b) a: matrix-vector products only
            a, b = (f[1], f[0]) if tr else f  # out factor, in factor
            if ctx.needs_input_grad[0]:
                gx = (gy @ a).mul_(go).unsqueeze(-1) * b
            if ctx.needs_input_grad[1]:
                ggy = (x @ b).mul_(go).unsqueeze(-1) * a
        else:
            z = f[0].t() if tr else f[0]  # [out, in]
            if ctx.needs_input_grad[0]:
                gx = (gy @ z).mul_(go)
            if ctx.needs_input_grad[1]:
                ggy = (x @ z.t()).mul_(go)
        return gx, ggy, None, None, None


class GZ(torch.autograd.Function):
    """<g, z_k> for a generic-route parameter (g: its gradient, with graph). The value is not computed; the
    backward returns z_k."""

    @staticmethod
    def forward(ctx, g, run, name):
        ctx.run, ctx.name = run, name
        ctx.meta = (g.device, g.dtype)
        return g.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, go):
        dev, dt = ctx.meta
        return ctx.run.dense(ctx.name, dev, dt) * go.to(dt), None, None
