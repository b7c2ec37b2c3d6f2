"""Sensitivity metrics: which weights matter? One decorated function per metric in `METRICS`.

Notation: L_b = mean token NLL of calibration batch b = 1..B, g_b = dL_b/dw.

Every metric gets a `ScoreContext` and returns {param name: score tensor shaped like the weight} (float32
unless `score.dtype=bfloat16`). Higher score = more important. The science core imports no W&B/plotting.

Gradient metrics never hold a full set of `.grad` tensors: each parameter's gradient is folded into its
score buffer by a `register_post_accumulate_grad_hook` the moment autograd finishes it, and freed at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, ScoreConfig
from .experts import ExpertInputNorms
from .hutchinson import DEFAULT_PROBE_KIND, hessian_diagonal
from .detector import OUTLIER_RATIO, find_outliers
from .loss import lm_loss
from .params import (autocast_ctx, checkpointing_active, input_device, owner, require_gradients, weight_kind,
                     weight_values)
from ..registry import Registry


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

    def buffer_device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.cfg.offload else p.device

    def buffer_like(self, p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A zero score buffer shaped like p (score.dtype unless `dtype`), in host memory with score.offload."""
        return torch.zeros(p.shape, dtype=dtype or self.score_dtype, device=self.buffer_device(p))


# A metric's capabilities, declared where it is registered (validation and the memory planner read them):
#   needs_calibration  the seed (calibration windows) changes the scores
#   needs_gradients    weight gradients (not available on 8-bit / 4-bit weights)
#   quantized          meaningful on bitsandbytes int8 weights (scored on the dequantized values)
#   weight_kinds       params.weight_kind values it can score ('linear', 'conv1d', 'experts', 'other')
#   memory             shape of its peak: 'buffers' (one score buffer per weight), 'forward' (+ inference
#                      activations), 'gradients' (+ one backward), 'second_order' (+ double backward),
#                      'forward_then_buffers' (forwards first, then buffers: peak = max of the two)
#   params             ScoreConfig fields that change the scores (part of the cache key)
METRICS = Registry("metric", needs_calibration=True, needs_gradients=False, quantized=False,
                   weight_kinds=("linear", "conv1d", "experts", "other"), memory="buffers", params=())
register_metric = METRICS.register


def compute_scores(name: str, ctx: ScoreContext) -> dict[str, torch.Tensor]:
    return METRICS.get(name).fn(ctx)


# --------------------------------------------------------------------------------------------------
# Shared machinery


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

    Memory: model + one score buffer per weight + activations; each `.grad` is freed inside its hook, so
    at most the gradients autograd is still accumulating live at once (never a full set). Offloaded
    buffers (score.offload) get a blocking device-to-host copy: a non_blocking one could be read before it
    lands. Gradient checkpointing, when enabled on the model, is made active (`checkpointing_active`).
    """
    require_gradients(ctx.params, desc, ", ".join(METRICS.names(quantized=True)))
    bufs = {n: ctx.buffer_like(p) for n, p in ctx.params.items()}
    handles = []

    def make_hook(buf):
        def hook(p):
            g = p.grad
            fold(buf, g if g.device == buf.device else g.to(buf.device))
            p.grad = None

        return hook

    with grads_only_for(ctx.model, ctx.params), checkpointing_active(ctx.model):
        for n, p in ctx.params.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(bufs[n])))
        try:
            for ids in tqdm(ctx.batches, desc=desc, disable=not ctx.progress, leave=False):
                with autocast_ctx(ctx.device, ctx.model):
                    loss = lm_loss(ctx.model, ids)
                loss.backward()
        finally:
            for h in handles:
                h.remove()
    return bufs


# --------------------------------------------------------------------------------------------------
# Metrics


@register_metric("magnitude", needs_calibration=False, quantized=True)
def magnitude(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """s = |w|. Calibration-free baseline: are large weights the important ones? (8-bit weights: |w| of the
    dequantized w = int8 · row scale, see params.weight_values.)"""
    return {n: weight_values(p, _module_of(ctx.model, n)).abs().to(ctx.score_dtype) for n, p in ctx.params.items()}


@register_metric("grad_x_weight", needs_gradients=True, memory="gradients", params=("batch_size",))
def grad_x_weight(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """s = |w * g_bar|, g_bar = (1/B) sum_b g_b: first-order Taylor estimate of |dL| when w -> 0."""
    B = len(ctx.batches)
    # in-place mixed-dtype ops (fp32 buffer, bf16 gradient/weight) upcast inside the kernel: no fp32 copy of
    # each gradient (H200, Llama-3.1-8B shapes, seq 1024: the metric went from 2.14x to 1.91x a fwd+bwd)
    # 1/B folded into the accumulation (alpha): one pass fewer over the buffers at the end
    bufs = accumulate_gradients(ctx, lambda buf, g: buf.add_(g, alpha=1.0 / B), "grad_x_weight")
    out = {}
    for n, p in ctx.params.items():
        buf = bufs.pop(n)
        buf.mul_(p.detach().to(buf.device)).abs_()
        out[n] = buf
    return out


@register_metric("grad_squared", needs_gradients=True, memory="gradients", params=("batch_size",))
def grad_squared(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """s = (1/B) sum_b g_b^2: the empirical Fisher diagonal (SqueezeLLM-style with score.batch_size=1)."""
    B = len(ctx.batches)
    return accumulate_gradients(ctx, lambda buf, g: buf.addcmul_(g, g, value=1.0 / B), "grad_squared")  # g²/B, fused


# --------------------------------------------------------------------------------------------------
# Second-order and activation metrics


def _module_of(model, name: str) -> torch.nn.Module | None:
    try:
        return owner(model, name)[1]
    except AttributeError:  # a parameter not reachable by name (tests pass bare tensors)
        return None


def _in_features_axis(model, name: str, metric: str) -> int:
    """Axis of the weight tensor that indexes its module's input features (1 for Linear, 0 for Conv1D)."""
    kind = weight_kind(model, name)
    if kind == "linear":
        return 1
    if kind == "conv1d":
        return 0
    raise ConfigError(f"{metric} cannot score '{name}': a {kind} weight; valid weight kinds for {metric}: "
                      f"{', '.join(METRICS.get(metric).weight_kinds)} (exclude it with score.exclude)")


def _forward_all(ctx: ScoreContext, desc: str) -> None:
    """Forward every calibration batch once (hooks do the work), without autograd."""
    with torch.no_grad():
        for ids in tqdm(ctx.batches, desc=desc, disable=not ctx.progress, leave=False):
            with autocast_ctx(ctx.device, ctx.model):
                ctx.model(input_ids=ids.to(input_device(ctx.model)), use_cache=False)


@register_metric("hutchinson_diag", needs_gradients=True, memory="second_order", params=("batch_size", "probes", "saliency"))
def hutchinson_diag(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of the calibration loss L = (1/B) sum_b L_b:

        diag(H) ≈ d = (1/P) sum_{p<P} z_p ⊙ (H z_p),   H = ∂²L/∂w² (over the scored weights),

    unbiased since E[z zᵀ] = I. z_p = a ⊗ b, a rank-1 Rademacher probe (a, b independent ±1 vectors; every
    entry ±1 with probability ½, pairwise independent), a pure function of (seed, p, weight name)
    (`hutchinson.probe_tensor`), the same for every batch and device. score.saliency: "abs" -> s = |d|;
    "obd" -> s = |½ · d · w²| (Optimal Brain Damage's predicted loss increase when w -> 0, ranked by
    magnitude: a large negative curvature term matters too).
    Memory: one fp32 accumulator per weight plus the activations of one double backward; no weight-sized
    gradient, probe or H z set (`hutchinson.hessian_diagonal`: Llama-3.1-8B at seq 1024 plans at 56.4 GiB).
    Cost ≈ 2.85 fwd+bwd for one probe, + 1.6 per extra probe (CPU bench); on an H200 at Llama-3.1-8B shapes
    6.99x and + 4.83x (launch-bound: ~16,700 kernels per probe). Attention: SDPA keeps its fused
    kernel except in the second-order recomputation (math kernel, one layer at a time); checkpointing honoured.
    """
    require_gradients(ctx.params, "hutchinson_diag", ", ".join(METRICS.names(quantized=True)))
    with grads_only_for(ctx.model, ctx.params):
        scores = hessian_diagonal(ctx.model, ctx.params, ctx.batches, probes=ctx.cfg.probes, seed=ctx.seed,
                                  saliency=ctx.cfg.saliency, probe_kind=DEFAULT_PROBE_KIND, device=ctx.device,
                                  buffer_like=lambda p: ctx.buffer_like(p, torch.float32),  # the planner tags offloaded ones
                                  progress=ctx.progress)
    return {n: scores.pop(n).to(ctx.score_dtype) for n in list(scores)}


@register_metric("act_mag", quantized=True, weight_kinds=("linear", "conv1d", "experts"), memory="forward")
def act_mag(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Wanda's score s_ij = |w_ij| · ‖x_j‖₂, x_j the j-th input feature of the weight's Linear over all
    calibration tokens (‖x_j‖₂ = sqrt(sum_tokens x_j²), accumulated in fp32 by forward hooks, no autograd).
    nn.Linear weights are [out, in] (column j); GPT-2 Conv1D weights are [in, out] (row j). Fused expert
    weights [E, out, in]: s_eij = |w_eij| · ‖x_j‖₂ over the tokens routed to expert e, i.e. the inputs each
    expert actually received (experts.ExpertInputNorms); an expert that got no token scores 0."""
    dense, fused = {}, []
    for n in ctx.params:
        if weight_kind(ctx.model, n) == "experts":
            fused.append(n)
        else:
            dense[n] = (owner(ctx.model, n)[1], _in_features_axis(ctx.model, n, "act_mag"))
    sumsq: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(n):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            s = x.detach().reshape(-1, x.shape[-1]).float().square().sum(0)
            if n in sumsq:
                sumsq[n].add_(s.to(sumsq[n].device))
            else:
                sumsq[n] = s

        return hook

    experts = ExpertInputNorms(ctx.model, fused)
    try:
        for n, (mod, _) in dense.items():
            handles.append(mod.register_forward_hook(make_hook(n), with_kwargs=True))
        with experts:
            _forward_all(ctx, "act_mag")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, p in ctx.params.items():
        if n not in dense:
            out[n] = experts.scores(ctx.model, n).to(ctx.buffer_device(p), ctx.score_dtype)
            continue
        mod, axis = dense[n]
        buf = ctx.buffer_like(p, torch.float32)
        buf.copy_(weight_values(p, mod).abs())
        if n in sumsq:
            norm = sumsq.pop(n).sqrt_()
            buf.mul_(norm.unsqueeze(0) if axis == 1 else norm.unsqueeze(1))
        else:  # the module never ran on the calibration data: no input, no importance
            buf.zero_()
        out[n] = buf.to(ctx.score_dtype)
    return out


@register_metric("act_outlier", quantized=True, memory="forward_then_buffers",
                 params=("outlier_threshold",))
def act_outlier(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Super Weight detector as a metric (see `find_outliers`): s = |x_j* · W[c, j*]| (max over spiking
    tokens) at each candidate W[c, j*] of an MLP down projection, where c is the channel of a massive output
    activation (|y| > max(score.outlier_threshold, OUTLIER_RATIO · the layer's median token max)) and j* the
    largest-|input| channel at that token; every other weight scores 0 and is outside the metric's support (Top-K
    stops at the candidates; it is never padded with ties). Mixture-of-experts: the same rule on each expert's
    down projection, per routed token (candidate = down_proj[expert][c, j*])."""
    found, _ = find_outliers(ctx.model, ctx.batches, ctx.cfg.outlier_threshold, OUTLIER_RATIO, ctx.params,
                             ctx.device, ctx.progress)
    out = {n: ctx.buffer_like(p) for n, p in ctx.params.items()}
    for c in found:
        flat = out[c.param].view(-1)
        flat[c.flat_index] = max(float(flat[c.flat_index]), c.score)
    return out
