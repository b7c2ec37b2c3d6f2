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

import copy
import re
import sys
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, RunConfig
from ..core.evaluation import window_stats
from ..core.metrics import METRICS
from ..core.params import eligible_parameters, unique_named_parameters
from ..inputs.models import build_fake_model, load_model_config, pick_dtype
from .disk import DiskPlan, estimate_disk
from .simulation import SimContext, fused_attention, simulate, weight_bytes
from .validation import check_capabilities

GiB = 1 << 30
CUDA_OVERHEAD = int(1.0 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces: not torch allocations
DEFAULT_GPU_MEM = "80GB"


# --------------------------------------------------------------------------------------------------
# Inputs: options


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
    disk: DiskPlan | None = None

    def fits(self, row: PlanRow) -> bool | None:
        if self.gpu_mem is None or row.method == "n/a":
            return None
        return row.peak + self.overhead <= self.gpu_mem

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("rows", "disk")}
        d["rows"] = [{**r.as_dict(), "fits": self.fits(r)} for r in self.rows]
        d["disk"] = self.disk.as_dict() if self.disk is not None else None
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
        if self.disk is not None:
            d = self.disk
            lines.append(f"disk: score cache +{d.cache / 2**20:.1f} MiB ({d.score_sets} sets), out_dir ~"
                         f"{d.out_dir / 2**20:.1f} MiB{'; ' + d.note if d.note else ''}")
        return "\n".join(lines)


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

    with fused_attention(fused):
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
                run, host = simulate(fake_mode, model, metric_fn, known)
                method, note = "simulated", ""
            except ConfigError:
                raise
            except Exception as e:  # needs real values (data-dependent control flow): bound it
                fwd, _ = simulate(fake_mode, model, fwd_fn, known)
                host = buffers if cfg.score.offload else 0
                dev_buffers = 0 if cfg.score.offload else buffers
                if spec.memory == "forward_then_buffers":
                    run, how = max(fwd, dev_buffers), "max(forward, score buffers)"
                else:
                    run, how = fwd + dev_buffers, "forward + score buffers"
                method, note = "approx", f"{how}; {type(e).__name__} on fake tensors"
            plan.rows.append(PlanRow(name, wbytes + run, wbytes, run, host, method, note))
        run, _ = simulate(fake_mode, model, eval_fn, known)
        extra = 0
        if cfg.model.quantize == "4bit":  # bnb dequantizes one Linear weight per matmul
            extra = max(p.numel() * p.element_size() for p in params.values())
        plan.rows.append(PlanRow("evaluation", wbytes + run + extra, wbytes, run + extra))
    plan.disk = estimate_disk(cfg, [tuple(p.shape) for p in params.values()])
    return plan
