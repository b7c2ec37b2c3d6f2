"""Sensitivity metrics: which weights matter? One decorated function per metric in `METRICS`.

Notation (DESIGN.md): L_b = mean token NLL of calibration batch b = 1..B, g_b = dL_b/dw.

Every metric gets a `ScoreContext` and returns {param name: score tensor shaped like the weight} (float32
unless `score.dtype=bfloat16`). Higher score = more important. The science core imports no W&B/plotting.

Gradient metrics never hold a full set of `.grad` tensors: each parameter's gradient is folded into its
score buffer by a `register_post_accumulate_grad_hook` the moment autograd finishes it, and freed at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import ScoreConfig


@dataclass
class ScoreContext:
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]  # eligible weights, tied ones once
    batches: list[torch.Tensor]  # calibration token batches [b, T] (on CPU; moved as needed)
    cfg: ScoreConfig
    device: torch.device
    seed: int = 0
    progress: bool = True

    @property
    def score_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32

    def buffer_like(self, p: torch.Tensor) -> torch.Tensor:
        dev = torch.device("cpu") if self.cfg.offload else p.device
        return torch.zeros(p.shape, dtype=self.score_dtype, device=dev)


@dataclass
class MetricSpec:
    name: str
    fn: Callable[[ScoreContext], dict[str, torch.Tensor]]
    needs_calibration: bool = True  # False: the seed does not change the scores (e.g. magnitude)
    params: tuple[str, ...] = ()  # ScoreConfig fields that change the scores (for the cache key)
    doc: str = ""
    extra: dict = field(default_factory=dict)


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs_calibration: bool = True, params: tuple[str, ...] = ()):
    """Register `fn(ctx) -> {name: scores}` under `name`. Adding a metric needs nothing else."""

    def deco(fn):
        METRICS[name] = MetricSpec(name, fn, needs_calibration, params, (fn.__doc__ or "").strip())
        return fn

    return deco


def compute_scores(name: str, ctx: ScoreContext) -> dict[str, torch.Tensor]:
    return METRICS[name].fn(ctx)


# --------------------------------------------------------------------------------------------------
# Shared machinery


def autocast_ctx(device: torch.device):
    """bf16 autocast on CUDA (the GPU default), nothing on CPU (fp32 reference numerics)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the batch: L = -(1/N) sum_t log p(x_{t+1} | x_{<=t})."""
    from .models import input_device

    ids = ids.to(input_device(model))
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1).to(logits.device))


@contextlib.contextmanager
def grads_only_for(model, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """requires_grad only on the scored weights (saves the memory of every other gradient)."""
    saved = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None


def accumulate_gradients(ctx: ScoreContext, fold: Callable[[torch.Tensor, torch.Tensor], None], desc: str) -> dict[str, torch.Tensor]:
    """Run fwd+bwd on each calibration batch; `fold(buffer, grad)` is called in the post-accumulate hook.

    Memory: model + one score buffer per weight + activations; each `.grad` is freed inside its hook.
    """
    bufs = {n: ctx.buffer_like(p) for n, p in ctx.params.items()}
    handles = []

    def make_hook(buf):
        def hook(p):
            g = p.grad
            fold(buf, g if g.device == buf.device else g.to(buf.device, non_blocking=True))
            p.grad = None

        return hook

    with grads_only_for(ctx.model, ctx.params):
        for n, p in ctx.params.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(bufs[n])))
        try:
            for ids in tqdm(ctx.batches, desc=desc, disable=not ctx.progress, leave=False):
                with autocast_ctx(ctx.device):
                    loss = lm_loss(ctx.model, ids)
                loss.backward()
        finally:
            for h in handles:
                h.remove()
    return bufs


# --------------------------------------------------------------------------------------------------
# Metrics


@register_metric("magnitude", needs_calibration=False)
def magnitude(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """s = |w|. Calibration-free baseline: are large weights the important ones?"""
    return {n: p.detach().abs().to(ctx.score_dtype) for n, p in ctx.params.items()}


@register_metric("grad_x_weight", params=("batch_size",))
def grad_x_weight(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """s = |w * g_bar|, g_bar = (1/B) sum_b g_b: first-order Taylor estimate of |dL| when w -> 0."""
    B = len(ctx.batches)
    bufs = accumulate_gradients(ctx, lambda buf, g: buf.add_(g.to(buf.dtype)), "grad_x_weight")
    out = {}
    for n, p in ctx.params.items():
        buf = bufs.pop(n)
        buf.div_(B).mul_(p.detach().to(buf.device, buf.dtype)).abs_()
        out[n] = buf
    return out


@register_metric("grad_squared", params=("batch_size",))
def grad_squared(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """s = (1/B) sum_b g_b^2: the empirical Fisher diagonal (SqueezeLLM-style with score.batch_size=1)."""
    B = len(ctx.batches)
    bufs = accumulate_gradients(ctx, lambda buf, g: buf.add_(g.to(buf.dtype).square()), "grad_squared")
    return {n: b.div_(B) for n, b in bufs.items()}
