"""The estimator: `hessian_diagonal`, one forward and first backward per batch shared by every probe."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ...config import ConfigError
from ..params import autocast_ctx, require_gradients
from .loss import next_token_loss
from .nodes import GZ
from .patching import double_backward_ready, lean_parts
from .probes import DEFAULT_PROBE_KIND, check_kind
from .routing import fused_modules, routed
from .state import Run

SALIENCIES = ("abs", "obd")



def hessian_diagonal(model, params: dict[str, torch.nn.Parameter], batches: list[torch.Tensor], *, probes: int,
                     seed: int = 0, saliency: str | None = None, probe_kind: str = DEFAULT_PROBE_KIND,
                     lean: bool = True, device: torch.device | None = None,
                     buffer_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of the mean next-token NLL over `batches` (token ids
    [b, T] each), for the weights `params`:

        d = (1/(B·P)) Σ_b Σ_{p<P} z_p ⊙ (H_b z_p),   z_p = probe_tensor(name, shape, seed, p, probe_kind).

    Returns {name: fp32 tensor shaped like the weight}: d (saliency=None), |d| ("abs") or |½ · d · w²|
    ("obd"). Memory: the fp32 buffers (from `buffer_like(p)`, default zeros on p's device) and the
    activations of one double backward, no weight-sized gradient, probe or H z set, and the same for any P
    (every probe reuses one forward and first backward per batch). Only `params` should require grad
    (metrics.hutchinson_diag arranges it with grads_only_for): other trainable parameters cost memory, not
    correctness. device: bf16 autocast on CUDA unless the model is fp32 (params.autocast_ctx); None = the
    first parameter's device. lean=False keeps the attention, norm, gated-MLP and loss internals in the
    graph instead of recomputing them (more memory, a little faster on CPU)."""
    require_gradients(params, "hutchinson_diag")
    B, P = len(batches), int(probes)
    if P <= 0:
        raise ConfigError(f"score.probes must be > 0, got {P}")
    if saliency is not None and saliency not in SALIENCIES:
        raise ConfigError(f"unknown saliency '{saliency}'; valid choices: {', '.join(SALIENCIES)}")
    check_kind(probe_kind)
    names = list(params)
    ps = [params[n] for n in names]
    if device is None:
        device = ps[0].device if ps else torch.device("cpu")
    if buffer_like is None:
        def buffer_like(p):
            return torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    acc = {n: buffer_like(p) for n, p in zip(names, ps)}
    run = Run(int(seed), probe_kind, acc, {n: tuple(p.shape) for n, p in zip(names, ps)})
    fused = fused_modules(model, params)
    generic = [n for n in names if n not in fused]

    def make_hook(name):  # the generic route: g (with graph) -> a GZ node in phase 1, fold z ⊙ Hz in phase 2
        def hook(p):
            g, p.grad = p.grad, None
            if run.phase == 1:
                if g.requires_grad:  # otherwise g does not depend on w: H z = 0 for this parameter
                    run.parts.append(GZ.apply(g, run, name))
            else:
                run.fold_dense(name, g)

        return hook

    handles = []
    with (lean_parts(model) if lean else contextlib.nullcontext()), double_backward_ready(model), \
            routed(fused, run), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        try:
            for n in generic:
                handles.append(params[n].register_post_accumulate_grad_hook(make_hook(n)))
            for ids in tqdm(batches, desc="hutchinson_diag", disable=not progress, leave=False):
                # phase 1: forward + first backward (create_graph): activation gradients and the <g_W, z>
                # nodes only; no weight gradient is formed
                run.phase, run.parts = 1, []
                with autocast_ctx(device, model):
                    loss = next_token_loss(model, ids, lean)
                torch.autograd.backward(loss, inputs=ps, create_graph=True)
                del loss
                parts, run.parts = run.parts, []
                if not parts:  # the loss is at most linear in the scored weights: H z = 0
                    continue
                s = torch.stack([t.float() for t in parts]).sum() if len(parts) > 1 else parts[0]
                del parts
                # phase 2: one second backward of s = Σ_W <g_W, z_k> per probe, on the same graph; the
                # nodes fold z_k ⊙ (H z_k) into the buffers as they produce it
                run.phase = 2
                for k in range(P):
                    run.k = k
                    run._factors.clear()
                    torch.autograd.backward(s, inputs=ps, retain_graph=k < P - 1)
                del s
        finally:
            for h in handles:
                h.remove()
            run.parts = []
    for n, p in zip(names, ps):
        a = acc[n].div_(B * P)
        if saliency == "obd":
            a.mul_(p.detach().to(a.device, torch.float32).square()).mul_(0.5)
        if saliency is not None:
            a.abs_()
    return acc
