"""Local recomputation of parts without scored weights: `lean(fn, *xs)` keeps only fn's inputs (and, after
the first backward, its output gradient) in the graph and recomputes fn's internals one call at a time
when the second backward reaches it."""

from __future__ import annotations

import contextlib

import torch

# What lean=True recomputes instead of keeping in the graph (the saving of each part: README, Hutchinson).
LEAN_PARTS = ("attention", "norm", "glu", "loss")


def autocast_dtype(device: torch.device):
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except (AttributeError, RuntimeError, TypeError):
        return None


class _Spec:
    """A pure function of its tensor inputs (no parameter that requires grad inside) plus the autocast state
    it ran under, so that it can be re-run identically inside backward."""

    def __init__(self, fn, device: torch.device, fn2=None):
        self.fn = fn  # forward and first-order vector-Jacobian products
        self.fn2 = fn2 or fn  # the second-order recomputation (must be twice differentiable)
        self.device_type = device.type
        self.dtype = autocast_dtype(device)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def vjp(self, xs, need, dy, create_graph):
        with torch.enable_grad():
            xd = [x.detach().requires_grad_(i in need) for i, x in enumerate(xs)]
            with self.autocast():
                y = self.fn(*xd)
            gs = torch.autograd.grad(y, [xd[i] for i in need], dy, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(xd[i]) if g is None else g for i, g in zip(need, gs)]


class _LeanFwd(torch.autograd.Function):
    """y = fn(*xs), saving only xs. Its backward under create_graph (the first backward of the double
    backward) is `_LeanBwd`, which saves only xs and ∂L/∂y; otherwise a plain vector-Jacobian product by
    recomputation. No intermediate of fn is kept from the first to the second backward."""

    @staticmethod
    def forward(ctx, spec, *xs):
        ctx.spec = spec
        ctx.save_for_backward(*xs)
        with spec.autocast():
            return spec.fn(*xs)

    @staticmethod
    def backward(ctx, dy):
        xs = ctx.saved_tensors
        need = [i for i in range(len(xs)) if ctx.needs_input_grad[1 + i]]
        if not need:
            return (None,) * (1 + len(xs))
        if torch.is_grad_enabled():
            gs = _LeanBwd.apply(ctx.spec, tuple(need), len(xs), *xs, dy)
            gs = (gs,) if isinstance(gs, torch.Tensor) else gs
        else:
            gs = ctx.spec.vjp(xs, need, dy, False)
        out = [None] * len(xs)
        for i, g in zip(need, gs):
            out[i] = g
        return (None, *out)


class _LeanBwd(torch.autograd.Function):
    """(∂L/∂x_i for i in need) = the vjp of fn at xs with dy; its backward is the second-order vjp, by
    recomputing fn and its first backward locally with create_graph=True (freed when it returns)."""

    @staticmethod
    def forward(ctx, spec, need, n, *args):
        ctx.spec, ctx.need, ctx.n = spec, need, n
        ctx.save_for_backward(*args)
        gs = spec.vjp(args[:n], need, args[n], False)
        return tuple(gs) if len(gs) > 1 else gs[0]

    @staticmethod
    def backward(ctx, *ggs):
        args = ctx.saved_tensors
        spec, need, n = ctx.spec, ctx.need, ctx.n
        xs, dy = args[:n], args[n]
        want = [i for i in range(n + 1) if ctx.needs_input_grad[3 + i]]
        if not want:
            return (None,) * (3 + n + 1)
        with torch.enable_grad():
            xd = [x.detach().requires_grad_(i in need or i in want) for i, x in enumerate(xs)]
            dyd = dy.detach().requires_grad_(True)
            with spec.autocast():
                y = spec.fn2(*xd)
            gs = torch.autograd.grad(y, [xd[i] for i in need], dyd, create_graph=True, allow_unused=True)
            pairs = [(g, gg) for g, gg in zip(gs, ggs) if g is not None and g.requires_grad]
            targets = [(xd + [dyd])[i] for i in want]
            res = torch.autograd.grad([g for g, _ in pairs], targets, [gg for _, gg in pairs], allow_unused=True) \
                if pairs else [None] * len(targets)
        out = [None] * (n + 1)
        for i, r in zip(want, res):
            out[i] = r
        return (None, None, None, *out)


def recomputed(fn, *xs, fn2=None):
    """fn(*xs) through `_LeanFwd` when grad mode is on and some input requires grad; else plainly. fn2: the
    same function for the second-order recomputation when fn itself is not twice differentiable."""
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return (fn2 or fn)(*xs)
    return _LeanFwd.apply(_Spec(fn, xs[0].device, fn2), *xs)
