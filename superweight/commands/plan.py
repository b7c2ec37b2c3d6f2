"""`superweight plan`: the peak memory of each metric and of evaluation, from a model config alone."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..arguments import parse_command, parse_pairs
from ..config import ConfigError
from ..run.plan import DEFAULT_GPU_MEM, estimate, parse_size
from ..core.metrics import METRICS
from ..run.validation import check_choice, validate
from .base import register


@dataclass
class PlanOptions:
    """superweight plan's own options."""

    gpu_mem: str = DEFAULT_GPU_MEM  # the GPU memory to plan for, e.g. 80GB, 141GiB, 24576MB (GB = GiB here)
    json: bool = False  # print the plan as JSON instead of a table
    batch: int | None = None  # windows per forward for scoring and evaluation (sets score.batch_size and eval.batch_size)


@register("plan", usage="usage: superweight plan [gpu_mem=80GB] [batch=N] [json] [run options ...]", options=PlanOptions)
def main(argv: list[str]) -> int:
    """The model is built from its config alone (FakeTensorMode: shapes, no storage) and the real metric and
    evaluation code runs on it, following every allocation: peak = weights + the largest live set of the run.
    Example: superweight plan model=meta-llama/Llama-3.1-8B seq_len=1024 metric=hutchinson_diag gpu_mem=80GB"""
    argv = list(argv)
    argv = [("--json" if a == "json" else a) for a in argv]  # `json` alone is the flag
    opts, cfg = parse_command(argv, PlanOptions)
    pairs, _, _ = parse_pairs(argv, {"gpu_mem": str, "json": bool, "batch": int | None})
    if opts.batch is not None:
        if opts.batch <= 0:
            raise ConfigError(f"batch must be > 0, got {opts.batch}")
        cfg.score.batch_size = cfg.eval.batch_size = opts.batch
    given = {k for k, _ in pairs}
    metrics = cfg.score.metrics if "score.metrics" in given else None
    if metrics is None:
        cfg.score.metrics = list(METRICS)
    validate(cfg)
    check_choice("plan device", cfg.model.device.split(":")[0], ["auto", "cpu", "cuda"])
    gpu_mem = parse_size(opts.gpu_mem)
    if cfg.model.device == "cpu" and "gpu_mem" not in given:
        gpu_mem = None
    plan = estimate(cfg, metrics, gpu_mem, progress=not opts.json)
    print(json.dumps(plan.as_dict(), indent=2) if opts.json else plan.table())
    return 0
