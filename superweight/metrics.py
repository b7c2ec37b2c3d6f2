"""Sensitivity metrics: which weights matter? One decorated function per metric in `METRICS`.

Notation (DESIGN.md): L_b = mean token NLL of calibration batch b = 1..B, g_b = dL_b/dw.

Every metric gets a `ScoreContext` and returns {param name: score tensor shaped like the weight} (float32
unless `score.dtype=bfloat16`). Higher score = more important. The science core imports no W&B/plotting.

Gradient metrics never hold a full set of `.grad` tensors: each parameter's gradient is folded into its
score buffer by a `register_post_accumulate_grad_hook` the moment autograd finishes it, and freed at once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ScoreConfig


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

    Memory: model + one score buffer per weight + activations; each `.grad` is freed inside its hook, so
    at most the gradients autograd is still accumulating live at once (never a full set). Offloaded
    buffers (score.offload) get a blocking device-to-host copy: a non_blocking one could be read before it
    lands. Gradient checkpointing, when enabled on the model, is made active (`checkpointing_active`).
    """
    from .models import QUANT_METRICS, checkpointing_active

    for n, p in ctx.params.items():
        if not p.is_floating_point():
            raise ConfigError(f"{desc} needs weight gradients, but '{n}' is stored as {str(p.dtype).replace('torch.', '')} "
                              f"(quantized, no gradients); valid metrics for quantized weights: {', '.join(QUANT_METRICS)}")
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
    """s = |w|. Calibration-free baseline: are large weights the important ones? (8-bit weights: |w| of the
    dequantized w = int8 · row scale, see models.weight_values.)"""
    from .models import weight_values

    return {n: weight_values(p).abs().to(ctx.score_dtype) for n, p in ctx.params.items()}


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


# --------------------------------------------------------------------------------------------------
# Second-order and activation metrics (issue 3)


def _owner(model, name: str) -> tuple[str, torch.nn.Module]:
    """(module name, module) owning parameter `name`, which must be that module's `.weight`."""
    mod_name, _, attr = name.rpartition(".")
    if attr != "weight":
        raise ConfigError(f"activation metrics score module weights only; '{name}' is not a '.weight' parameter")
    return mod_name, model.get_submodule(mod_name)


def _is_conv1d(mod: torch.nn.Module) -> bool:
    """GPT-2 style Conv1D: y = x @ W + b with W stored [in, out] (transposed vs nn.Linear)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _in_features_axis(name: str, mod: torch.nn.Module, metric: str) -> int:
    """Axis of the weight tensor that indexes the module's input features (1 for Linear, 0 for Conv1D)."""
    if isinstance(mod, torch.nn.Linear):
        return 1
    if _is_conv1d(mod):
        return 0
    raise ConfigError(
        f"{metric} cannot score '{name}': module type {type(mod).__name__} is not supported; "
        "valid module types: Linear, Conv1D (exclude the parameter with score.exclude)"
    )


def _forward_all(ctx: ScoreContext, desc: str) -> None:
    """Forward every calibration batch once (hooks do the work), without autograd."""
    with torch.no_grad():
        for ids in tqdm(ctx.batches, desc=desc, disable=not ctx.progress, leave=False):
            with autocast_ctx(ctx.device):
                ctx.model(input_ids=ids.to(_input_device(ctx.model)), use_cache=False)


def _input_device(model) -> torch.device:
    from .models import input_device

    return input_device(model)


@contextlib.contextmanager
def double_backward_ready(model) -> Iterator[None]:
    """Make the model twice differentiable for the duration, then restore it.

    * SDPA: the fused CPU/CUDA attention kernels have no double backward, so SDPA is pinned to its MATH
      backend (`torch.nn.attention.sdpa_kernel`), which is plain differentiable ops; the model keeps
      attn_implementation="sdpa".
    * other fused attention (flash_attention_2, ...): switched to "eager" and switched back afterwards.
    * gradient checkpointing, when enabled, is made active in eval mode (`models.checkpointing_active`);
      non-reentrant checkpointing supports double backward.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    switched = impl not in (None, "eager", "sdpa")
    if switched:
        model.set_attn_implementation("eager")
    from .models import checkpointing_active

    try:
        with checkpointing_active(model), sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switched:
            model.set_attn_implementation(impl)


def rademacher_probe(params: list[torch.Tensor], seed: int, probe: int) -> list[torch.Tensor]:
    """Probe z (entries ±1, each with probability 1/2) for every tensor, a pure function of (seed, probe).

    Drawn on the CPU so that the same (seed, probe) gives the same z on every device and backend."""
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + 7_919 * int(probe) + 12_345)
    out = []
    for p in params:
        z = torch.randint(0, 2, p.shape, generator=g, dtype=torch.int8).mul_(2).sub_(1)
        out.append(z.to(device=p.device, dtype=p.dtype))
    return out


@register_metric("hutchinson_diag", params=("batch_size", "probes", "saliency"))
def hutchinson_diag(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of the calibration loss L = (1/B) sum_b L_b:

        d = (1/P) sum_{k=1..P} z_k ⊙ (H z_k),   z_k Rademacher (±1), H = ∂²L/∂w² (over the scored weights),

    unbiased since E[z zᵀ] = I. H z comes from double backward: g_b = ∂L_b/∂w (create_graph=True), then
    H_b z = ∂(g_b · z)/∂w; the probes of a batch reuse one forward and first backward, and z_k is the same
    for every batch (seeded from (seed, k)), so the batch average is exactly z_k ⊙ (H z_k).
    score.saliency: "abs" -> s = |d|; "obd" -> s = ½ · d · w² (Optimal Brain Damage, the predicted loss
    increase when w -> 0; may be negative, and negative = least important).
    Memory: one fp32 accumulator per weight, one probe at a time. Cost ≈ fwd+bwd + P double backwards per batch.
    Attention: see `double_backward_ready` (SDPA pinned to its math backend; checkpointing honoured).
    """
    from .models import QUANT_METRICS

    for n, p in ctx.params.items():
        if not p.is_floating_point():
            raise ConfigError(f"hutchinson_diag needs weight gradients, but '{n}' is stored as "
                              f"{str(p.dtype).replace('torch.', '')} (quantized); valid metrics for quantized "
                              f"weights: {', '.join(QUANT_METRICS)}")
    names = list(ctx.params)
    ps = [ctx.params[n] for n in names]
    B, P = len(ctx.batches), int(ctx.cfg.probes)
    if P <= 0:
        raise ConfigError(f"score.probes must be > 0, got {P}")
    if ctx.cfg.saliency not in ("abs", "obd"):
        raise ConfigError(f"unknown saliency '{ctx.cfg.saliency}'; valid choices: abs, obd")
    acc = [ctx.buffer_like(p) if ctx.score_dtype == torch.float32 else
           torch.zeros(p.shape, dtype=torch.float32, device=torch.device("cpu") if ctx.cfg.offload else p.device)
           for p in ps]
    with grads_only_for(ctx.model, ctx.params), double_backward_ready(ctx.model):
        for ids in tqdm(ctx.batches, desc="hutchinson_diag", disable=not ctx.progress, leave=False):
            with autocast_ctx(ctx.device):
                loss = lm_loss(ctx.model, ids)
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not live:  # the loss does not depend on the scored weights (or only linearly): H z = 0
                del grads, loss
                continue
            for k in range(P):
                zs = rademacher_probe(ps, ctx.seed, k)
                gz = sum((grads[i].float() * zs[i].float()).sum() for i in live)
                hv = torch.autograd.grad(gz, [ps[i] for i in live], retain_graph=k < P - 1, allow_unused=True)
                for i, h in zip(live, hv):
                    if h is not None:
                        acc[i].add_((zs[i].float() * h.float()).to(acc[i].device))
                del zs, gz, hv
            del grads, loss
    out = {}
    for n, p, a in zip(names, ps, acc):
        a.div_(B * P)
        if ctx.cfg.saliency == "obd":
            a.mul_(p.detach().to(a.device, torch.float32).square()).mul_(0.5)
        else:
            a.abs_()
        out[n] = a.to(ctx.score_dtype)
    return out


@register_metric("act_mag")
def act_mag(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Wanda's score s_ij = |w_ij| · ‖x_j‖₂, x_j the j-th input feature of the weight's Linear over all
    calibration tokens (‖x_j‖₂ = sqrt(sum_tokens x_j²), accumulated in fp32 by forward hooks, no autograd).
    nn.Linear weights are [out, in] (column j); GPT-2 Conv1D weights are [in, out] (row j). Other module
    types raise ConfigError."""
    from .models import weight_values

    owners = {}
    for n in ctx.params:
        mod_name, mod = _owner(ctx.model, n)
        owners[n] = (mod, _in_features_axis(n, mod, "act_mag"))
    sumsq: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(n, axis):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            s = x.detach().reshape(-1, x.shape[-1]).float().square().sum(0)
            if n in sumsq:
                sumsq[n].add_(s.to(sumsq[n].device))
            else:
                sumsq[n] = s

        return hook

    try:
        for n, (mod, axis) in owners.items():
            handles.append(mod.register_forward_hook(make_hook(n, axis), with_kwargs=True))
        _forward_all(ctx, "act_mag")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, p in ctx.params.items():
        axis = owners[n][1]
        buf = ctx.buffer_like(p).float()
        buf.copy_(weight_values(p).abs())
        if n in sumsq:
            norm = sumsq.pop(n).sqrt_()
            buf.mul_(norm.unsqueeze(0) if axis == 1 else norm.unsqueeze(1))
        else:  # the module never ran on the calibration data: no input, no importance
            buf.zero_()
        out[n] = buf.to(ctx.score_dtype)
    return out


# --- the Super Weight detector ---------------------------------------------------------------------

OUTLIER_MODULE_RX = re.compile(r"(?:^|\.)(?:down_proj|mlp\.c_proj|fc2|w2)$")


@dataclass
class OutlierCandidate:
    """One super-weight candidate: weight[row, col] of an MLP down projection."""

    param: str  # e.g. model.layers.2.mlp.down_proj.weight
    layer: int
    row: int  # index into the weight tensor (Linear: output channel; Conv1D: input channel)
    col: int
    out_channel: int  # the spike's channel in the module output
    in_channel: int  # the input channel with the largest |input| at the spike's token
    flat_index: int
    weight: float  # w[row, col]
    activation: float  # the spike: output value with the largest |value| over this candidate's occurrences
    input_activation: float  # x[in_channel] at that same token
    score: float  # max over occurrences of |x_in · w|
    occurrences: int  # spiking (token, channel) elements that point at this weight
    layer_typical_max: float  # median over tokens of max_c |y[t, c]| in this layer
    layer_threshold: float  # max(outlier_threshold, outlier_ratio * layer_typical_max)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


OUTLIER_RATIO = 50.0  # a spike must also exceed this multiple of the layer's typical (median) token max


def outlier_modules(model, params: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[str, torch.nn.Module]]:
    """{weight name: (module name, module)} of the MLP down projections (names ending in down_proj,
    mlp.c_proj, fc2 or w2), restricted to `params` when given."""
    out = {}
    for mod_name, mod in model.named_modules():
        if not OUTLIER_MODULE_RX.search(mod_name) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        pname = f"{mod_name}.weight"
        if params is not None and pname not in params:
            continue
        _in_features_axis(pname, mod, "act_outlier")
        out[pname] = (mod_name, mod)
    return out


@torch.no_grad()
def find_outliers(model, batches: list[torch.Tensor], threshold: float, ratio: float = OUTLIER_RATIO,
                  params: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
                  progress: bool = False) -> tuple[list[OutlierCandidate], list[dict]]:
    """The Super Weight detector (Yu et al. 2024, "The Super Weight in Large Language Models").

    Hooks every MLP down projection y = W x and runs the calibration batches twice:
      pass 1: the layer's typical max m_l = median over tokens t of max_c |y_l[t, c]|;
      pass 2: a spike is an output element with |y_l[t, c]| > max(threshold, ratio · m_l) (a massive
              activation: above the absolute threshold *and* far above what the layer's tokens usually
              reach). Its candidate weight is W[c, j*] with j* = argmax_j |x_l[t, j]| (the input channel
              that dominates that token), scored by |x_l[t, j*] · W[c, j*]| (max over occurrences).
    Returns (candidates sorted by score desc, per-layer stats rows) without keeping activations: memory is
    one float per token per layer plus the candidates.
    """
    mods = outlier_modules(model, params)
    if not mods:
        return [], []
    from .models import layer_of, weight_values

    dev = device or _input_device(model)
    tokmax: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    layer_max: dict[str, float] = {n: 0.0 for n in mods}
    thresholds: dict[str, float] = {}
    found: dict[tuple[str, int, int], dict] = {}
    phase = ["typical"]

    def make_hook(pname, mod):
        conv = _is_conv1d(mod)

        def hook(m, args, kwargs, output):
            x = (args[0] if args else kwargs.get("input", kwargs.get("x"))).detach()
            y = output[0] if isinstance(output, tuple) else output
            ay = y.detach().float().abs().reshape(-1, y.shape[-1])  # [tokens, out]
            if phase[0] == "typical":
                tm = ay.amax(-1)
                tokmax[pname].append(tm.cpu())
                layer_max[pname] = max(layer_max[pname], float(tm.max()))
                return
            thr = thresholds[pname]
            hit = torch.nonzero(ay > thr)
            if hit.numel() == 0:
                return
            xf = x.float().reshape(-1, x.shape[-1])
            tok, ch = hit[:, 0], hit[:, 1]
            j = xf[tok].abs().argmax(-1)
            xj = xf[tok, j]
            w = weight_values(mod.weight)
            wv = (w[j, ch] if conv else w[ch, j]).float()
            sc = (xj * wv).abs()
            yv = y.detach().float().reshape(-1, y.shape[-1])[tok, ch]
            for c, jj, s, yy, xx, ww in zip(ch.tolist(), j.tolist(), sc.tolist(), yv.tolist(), xj.tolist(), wv.tolist()):
                key = (pname, c, jj)
                e = found.get(key)
                if e is None:
                    found[key] = e = {"score": s, "n": 0, "act": yy, "x": xx, "w": ww}
                e["n"] += 1
                if abs(yy) > abs(e["act"]):
                    e["act"], e["x"] = yy, xx
                e["score"] = max(e["score"], s)

        return hook

    handles = [mod.register_forward_hook(make_hook(p, mod), with_kwargs=True) for p, (_, mod) in mods.items()]
    try:
        for ph in ("typical", "detect"):
            phase[0] = ph
            if ph == "detect":
                for p in mods:
                    typ = float(torch.cat(tokmax[p]).median()) if tokmax[p] else 0.0
                    thresholds[p] = max(float(threshold), float(ratio) * typ)
            for ids in tqdm(batches, desc=f"act_outlier/{ph}", disable=not progress, leave=False):
                with autocast_ctx(dev):
                    model(input_ids=ids.to(_input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats, typical = [], {}
    for p, (mod_name, mod) in mods.items():
        typ = float(torch.cat(tokmax[p]).median()) if tokmax[p] else 0.0
        typical[p] = typ
        stats.append({"param": p, "layer": layer_of(p), "max_abs_output": layer_max[p], "typical_max": typ,
                      "threshold": thresholds[p], "n_candidates": sum(1 for k in found if k[0] == p)})
    cands = []
    for (p, c, j), e in found.items():
        conv = _is_conv1d(mods[p][1])
        shape = tuple(params[p].shape) if params is not None else tuple(mods[p][1].weight.shape)
        row, col = (j, c) if conv else (c, j)
        cands.append(OutlierCandidate(
            param=p, layer=layer_of(p), row=row, col=col, out_channel=c, in_channel=j,
            flat_index=row * shape[1] + col, weight=e["w"], activation=e["act"], input_activation=e["x"],
            score=e["score"], occurrences=e["n"], layer_typical_max=typical[p], layer_threshold=thresholds[p]))
    cands.sort(key=lambda c: (-c.score, c.param, c.flat_index))
    return cands, stats


@register_metric("act_outlier", params=("outlier_threshold",))
def act_outlier(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Super Weight detector as a metric (see `find_outliers`): s = |x_j* · W[c, j*]| (max over spiking
    tokens) at each candidate W[c, j*] of an MLP down projection, where c is the channel of a massive output
    activation (|y| > max(score.outlier_threshold, OUTLIER_RATIO · the layer's median token max)) and j* the
    largest-|input| channel at that token; every other weight scores 0 (so Top-K beyond the candidates is a
    tie at 0, broken by parameter order and flat index)."""
    cands, _ = find_outliers(ctx.model, ctx.batches, ctx.cfg.outlier_threshold, OUTLIER_RATIO, ctx.params,
                             ctx.device, ctx.progress)
    out = {n: ctx.buffer_like(p) for n, p in ctx.params.items()}
    for c in cands:
        flat = out[c.param].view(-1)
        flat[c.flat_index] = max(float(flat[c.flat_index]), c.score)
    return out
