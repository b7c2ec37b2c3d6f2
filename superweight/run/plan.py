"""The memory planner behind `superweight plan`: the peak memory of each metric and of evaluation, from a
model config alone.

    superweight plan model=meta-llama/Llama-3.1-8B seq_len=2048 batch=1 gpu_mem=80GB
    superweight plan model=./my-model dtype=bfloat16 score.dtype=bfloat16 model.gradient_checkpointing=true --json

How it estimates: the model is built from its config (`AutoConfig`; the embedded default's config needs no
conversion) inside `FakeTensorMode`, so every tensor has a shape, dtype and device but no storage and no
compute. The *real* code paths then run on it: each registered metric function (`metrics.METRICS`, with
its post-accumulate-grad hooks, autocast, gradient checkpointing) and the evaluation step
(`evaluation.window_stats`). A dispatch mode follows every storage they allocate and every one that dies,
so the estimate is

    peak = weights + max over time of (bytes of live storages created by the run)

exactly as the allocator would see it, minus what no Python-visible tensor holds (kernel workspaces,
the CUDA context). Targets:
  * device=cpu: what the run allocates on the host (tests check it against measured RSS, within 15%).
  * device=cuda (the default): SDPA runs as flash / memory-efficient attention there (O(T) memory, saves
    output + logsumexp); the simulation reproduces that memory. SDPA's math backend (O(T²) per head) runs
    where a metric pins it: hutchinson_diag's double backward now uses it only transiently, one layer at a
    time, to recompute that layer's attention for the second-order pass. `CUDA_OVERHEAD` (CUDA
    context + cuBLAS workspace) is added before comparing with `gpu_mem`; allocator fragmentation can add a
    few percent more. fp32 weights on CUDA run in fp32 (no autocast), as the plan simulates them.
  * score.offload=true: score buffers live in host memory; they are reported as `host_GiB` and not counted
    on the GPU.
  * quantize=8bit|4bit: weights are counted at 1 byte (+ one fp32 scale per row) / 0.5 byte (+ one fp32
    absmax per 64 weights) for the Linear layers of the blocks; gradient metrics are not available there
    (see validation.check_capabilities); evaluation adds one dequantized Linear weight for 4-bit.
  * device_map="auto": the figures are totals over all GPUs; weights and score buffers split by layer.
Metrics whose code needs real values (act_outlier's thresholds) fall back to an inference forward plus one
score buffer per weight; a metric registered with memory="forward_then_buffers" (act_outlier) allocates its
buffers after its forwards, so its peak is the max of the two (marked `approx`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
import weakref
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, RunConfig, ScoreConfig
from ..core.evaluation import window_stats
from ..core.metrics import METRICS, ScoreContext
from ..inputs.models import build_fake_model, load_model_config, pick_dtype
from ..core.params import eligible_parameters, layer_of, unique_named_parameters
from .validation import check_capabilities

GiB = 1 << 30
CUDA_OVERHEAD = int(1.0 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces: not torch allocations
DEFAULT_GPU_MEM = "80GB"


# --------------------------------------------------------------------------------------------------
# Memory accounting on fake tensors


class MemoryTracker:
    """Dispatch mode that counts the bytes of every storage created by an op while it lives.

    Storages that exist before `track()` (weights, inputs) are pre-registered and never counted. A storage
    is counted once however many views share it; it is released when its last tensor dies (weakref on the
    storage object, which PyTorch keeps one-to-one with the storage). Offloaded score buffers are tagged
    `host` (see `SimContext`)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                # Composite ops (cross_entropy_loss under inference_mode, ...) reach us whole: run their
                # decomposition inside the mode so that their intermediates are counted too.
                if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                        func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
                    with self:
                        out = func.decompose(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
                out = func(*args, **kwargs)
                if tracker.active:
                    tracker._register(out)
                return out

        self._mode_cls = _Mode
        self.live = 0
        self.peak = 0
        self.host_live = 0
        self.host_peak = 0
        self.active = True
        self.to_host = False
        self._seen: dict[int, weakref.ref] = {}

    def known(self, tensors) -> None:
        """Storages that exist already (weights, buffers, inputs): never counted."""
        for t in tensors:
            st = t.untyped_storage()
            self._seen[id(st)] = weakref.ref(st)

    def _free(self, n: int, host: bool) -> None:
        if host:
            self.host_live -= n
        else:
            self.live -= n

    def _register(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            r = self._seen.get(id(st))
            if r is not None and r() is st:
                continue
            n = int(st.nbytes())
            self._seen[id(st)] = weakref.ref(st)
            host = self.to_host
            weakref.finalize(st, self._free, n, host)
            if host:
                self.host_live += n
                self.host_peak = max(self.host_peak, self.host_live)
            else:
                self.live += n
                self.peak = max(self.peak, self.live)

    @contextlib.contextmanager
    def track(self):
        with self._mode_cls():
            yield self

    @contextlib.contextmanager
    def on_host(self):
        old, self.to_host = self.to_host, True
        try:
            yield
        finally:
            self.to_host = old


def _flash_like_sdpa():
    """A stand-in for F.scaled_dot_product_attention with the memory of the fused CUDA kernels: the output
    and an fp32 logsumexp [b, h, T] are allocated and saved with q, k, v; no T x T matrix exists."""

    class _Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    orig = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        fused = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
        if not fused:  # the caller pinned the math backend (double backward): simulate it as it is
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, **kw)
        return _Flash.apply(query, key, value)

    return orig, sdpa


@contextlib.contextmanager
def _fused_attention(enabled: bool):
    if not enabled:
        yield
        return
    orig, fake = _flash_like_sdpa()
    torch.nn.functional.scaled_dot_product_attention = fake
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


# --------------------------------------------------------------------------------------------------
# Inputs: options and the model config


def parse_size(s: str) -> int:
    """'80GB' / '80GiB' / '80' (GiB) / '81920MB' -> bytes. GB and GiB both mean 2^30 here (GPU vendors'
    "80GB" cards hold ~80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(s), flags=re.I)
    if not m:
        raise ConfigError(f"gpu_mem '{s}' is not a size; valid: a number with an optional unit, e.g. 80GB, 141GiB, 24576MB")
    v = float(m.group(1))
    unit = (m.group(2) or "G").upper().replace("I", "").replace("B", "") or "B"
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "B": 1}[unit]
    if unit == "B" and (m.group(2) or "").upper() != "B":
        mult = 1 << 30
    return int(v * mult)


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlanRow:
    what: str  # metric name or "evaluation"
    peak: int  # bytes on the device: weights + run
    weights: int
    run: int  # peak bytes of storages the run created (activations, buffers, gradients, temporaries)
    host: int = 0  # offloaded score buffers
    method: str = "simulated"  # simulated | approx | n/a
    note: str = ""

    def as_dict(self) -> dict:
        return {"what": self.what, "peak_bytes": self.peak, "weights_bytes": self.weights, "run_bytes": self.run,
                "host_bytes": self.host, "peak_GiB": round(self.peak / GiB, 3), "method": self.method,
                "note": self.note}


@dataclass
class Plan:
    model: str
    n_params: int
    n_eligible: int
    device: str
    dtype: str
    score_dtype: str
    seq_len: int
    score_batch: int
    eval_batch: int
    gradient_checkpointing: bool
    quantize: str
    gpu_mem: int | None
    overhead: int
    rows: list[PlanRow] = field(default_factory=list)

    def fits(self, row: PlanRow) -> bool | None:
        if self.gpu_mem is None or row.method == "n/a":
            return None
        return row.peak + self.overhead <= self.gpu_mem

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "rows"}
        d["rows"] = [{**r.as_dict(), "fits": self.fits(r)} for r in self.rows]
        return d

    def table(self) -> str:
        head = (f"plan: {self.model} ({self.n_params / 1e9:.3f}B params, {self.n_eligible / 1e9:.3f}B scored) on "
                f"{self.device}, weights {self.dtype}{'' if self.quantize == 'none' else ' ' + self.quantize}, "
                f"scores {self.score_dtype}, seq_len {self.seq_len}, score batch {self.score_batch}, eval batch "
                f"{self.eval_batch}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}")
        lines = [head]
        budget = ""
        if self.gpu_mem is not None:
            budget = f"budget {self.gpu_mem / GiB:.1f} GiB"
            if self.device == "cuda":
                budget += f" minus {self.overhead / GiB:.1f} GiB CUDA context"
        if budget:
            lines.append(budget)
        cols = f"{'what':<18}{'peak GiB':>10}{'weights':>10}{'run':>10}{'host':>9}  {'fits':<5} method"
        lines.append(cols)
        lines.append("-" * len(cols))
        for r in self.rows:
            f = self.fits(r)
            fs = "-" if f is None else ("yes" if f else "NO")
            if r.method == "n/a":
                lines.append(f"{r.what:<18}{'n/a':>10}{'':>10}{'':>10}{'':>9}  {'-':<5} {r.note}")
                continue
            lines.append(f"{r.what:<18}{r.peak / GiB:>10.2f}{r.weights / GiB:>10.2f}{r.run / GiB:>10.2f}"
                         f"{r.host / GiB:>9.2f}  {fs:<5} {r.method}{(': ' + r.note) if r.note else ''}")
        return "\n".join(lines)


def weight_bytes(model, quantize: str = "none") -> int:
    """Bytes of all parameters and buffers (tied weights once); quantized Linear weights of the blocks at
    int8 + fp32 row scale (8bit) or 4 bits + fp32 absmax per 64 weights (4bit)."""
    seen, total = set(), 0
    linear_weights = set()
    if quantize != "none":
        for mn, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and layer_of(mn + ".weight") >= 0:
                linear_weights.add(id(m.weight))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in linear_weights:
            n = t.numel()
            total += n + 4 * t.shape[0] if quantize == "8bit" else n // 2 + 4 * math.ceil(n / 64)
        else:
            total += t.numel() * t.element_size()
    return total


class SimContext:
    """Factory for the ScoreContext a metric sees in the simulation (offloaded buffers tagged as host)."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker

    def make(self, model, params, batches, cfg: ScoreConfig):
        tracker = self.tracker

        class _Ctx(ScoreContext):
            def buffer_like(self, p, dtype=None):
                if self.cfg.offload:
                    with tracker.on_host():
                        return torch.zeros(p.shape, dtype=dtype or self.score_dtype, device=p.device)
                return super().buffer_like(p, dtype)

        return _Ctx(model, params, batches, cfg, torch.device("cpu"), 0, False)


def _simulate(fake_mode, model, fn, known) -> tuple[int, int]:
    """Run `fn()` on the fake model; return (peak bytes created on the device, peak host bytes).

    No gc.collect() (0.5 s each in a big process): reference cycles free late here exactly as in a real run."""
    tracker = MemoryTracker()
    tracker.known(known)
    with fake_mode, tracker.track():
        result = fn(tracker)
        del result
    return tracker.peak, tracker.host_peak


def estimate(cfg: RunConfig, metrics: list[str] | None = None, gpu_mem: int | None = None,
             model=None, fake_mode=None, progress: bool = False) -> Plan:
    """Simulated peak memory of each metric in `metrics` (default: all registered) and of evaluation.

    `model`/`fake_mode`: a fake model built already (tests); otherwise built from the config."""
    device = "cpu" if cfg.model.device == "cpu" else "cuda"
    dtype = pick_dtype(cfg.model.dtype, torch.device(device))
    if model is None:
        config = load_model_config(cfg.model, cfg.cache_dir)
        fake_mode, model = build_fake_model(config, dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = eligible_parameters(model, cfg.score.include, cfg.score.exclude)
    n_params = sum(p.numel() for _, p in unique_named_parameters(model))
    wbytes = weight_bytes(model, cfg.model.quantize)
    known = list(model.parameters()) + list(model.buffers())
    T, bs, ebs = cfg.data.seq_len, cfg.score.batch_size, cfg.eval.batch_size
    fused = device == "cuda" and getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
    plan = Plan(cfg.model.name, n_params, sum(p.numel() for p in params.values()), device,
                str(dtype).replace("torch.", ""), cfg.score.dtype, T, bs, ebs, cfg.model.gradient_checkpointing,
                cfg.model.quantize, gpu_mem, CUDA_OVERHEAD if device == "cuda" else 0)
    names = list(METRICS) if metrics is None else metrics
    score_cfg = copy.deepcopy(cfg.score)
    score_cfg.probes = min(score_cfg.probes, 2)  # memory does not grow with probes (one at a time)
    buffers = sum(p.numel() for p in params.values()) * (2 if cfg.score.dtype == "bfloat16" else 4)

    def eval_fn(tracker):
        with torch.inference_mode():
            ids = torch.zeros(ebs, T, dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            return window_stats(logits, ids[:, 1:])

    def fwd_fn(tracker):
        with torch.inference_mode():
            return model(input_ids=torch.zeros(bs, T, dtype=torch.long), use_cache=False).logits

    with _fused_attention(fused):
        for name in names:
            spec = METRICS.get(name)
            if cfg.model.quantize != "none" and spec.needs_gradients:
                plan.rows.append(PlanRow(name, 0, wbytes, 0, method="n/a",
                                         note=f"needs weight gradients; {cfg.model.quantize} weights have none"))
                continue
            if progress:
                print(f"plan: simulating {name} ...", file=sys.stderr)
            sim = SimContext(None)

            def metric_fn(tracker, name=name):
                sim.tracker = tracker
                batches = [torch.zeros(bs, T, dtype=torch.long)]
                ctx = sim.make(model, params, batches, score_cfg)
                return spec.fn(ctx)

            try:
                if cfg.model.quantize != "none":
                    one = copy.deepcopy(cfg)
                    one.score.metrics, one.perturb.names = [name], []
                    check_capabilities(one, model, params)
                run, host = _simulate(fake_mode, model, metric_fn, known)
                method, note = "simulated", ""
            except ConfigError:
                raise
            except Exception as e:  # needs real values (data-dependent control flow): bound it
                fwd, _ = _simulate(fake_mode, model, fwd_fn, known)
                host = buffers if cfg.score.offload else 0
                dev_buffers = 0 if cfg.score.offload else buffers
                if spec.memory == "forward_then_buffers":
                    run, how = max(fwd, dev_buffers), "max(forward, score buffers)"
                else:
                    run, how = fwd + dev_buffers, "forward + score buffers"
                method, note = "approx", f"{how}; {type(e).__name__} on fake tensors"
            plan.rows.append(PlanRow(name, wbytes + run, wbytes, run, host, method, note))
        run, _ = _simulate(fake_mode, model, eval_fn, known)
        extra = 0
        if cfg.model.quantize == "4bit":  # bnb dequantizes one Linear weight per matmul
            extra = max(p.numel() * p.element_size() for p in params.values())
        plan.rows.append(PlanRow("evaluation", wbytes + run + extra, wbytes, run + extra))
    return plan
