"""Validation, in one place and before anything expensive: names against the registries, numbers against
their ranges, the output directory (created, with a probe file), and every capability a run will need
(metric x parameter kind x dtype x quantization, perturbation x storage) against the model's parameters.

The agreed sequence (experiment.Experiment.setup): `validate(cfg)` -> `check_capabilities` on a model
built from its config alone (fake tensors, no weights read) -> `prepare_out_dir` -> start tracking -> load
the weights -> `check_capabilities` again on the real parameters. A run never stops mid-way for a reason
it could have known at the start. Every failure is one ConfigError line naming the bad value and the
valid choices (the CLI prints it and exits with code 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig, choices, typed_items
from ..inputs.data import CORPORA, check_text_file
from ..core.evaluation import TASKS
from ..core.experts import input_axis
from ..core.metrics import METRICS
from ..core.params import layer_of, quant_kind, weight_kind
from ..core.perturbation import PERTURBATIONS, parse_bits, supports
from ..core.modes import MODES
from ..core.selections import SELECTIONS
from .cache import cache_mode

def check_choice(what: str, value: str, choices) -> None:
    choices = list(choices)
    if value not in choices:
        valid = ", ".join(choices) if choices else "(none available in this installation)"
        raise ConfigError(f"unknown {what} '{value}'; valid choices: {valid}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every name against its registry and every number against its range (writes nothing)."""
    if not cfg.score.metrics:
        raise ConfigError("no metric given; valid choices: " + ", ".join(METRICS))
    for m in cfg.score.metrics:
        METRICS.get(m)
    for m in cfg.select.modes:
        MODES.get(m)
    for c in cfg.select.controls:
        check_choice("control", c, SELECTIONS.names(control=True))
    for p in cfg.perturb.names:
        PERTURBATIONS.get(p)
    cfg.score.cache = cache_mode(cfg.score.cache)
    for key, tp, value in typed_items(cfg):  # the fixed choices, declared as Literal types in config.py
        valid = choices(tp)
        for v in (value if isinstance(value, list) else [value]) if valid else ():
            check_choice(key, v, valid)
    for t in cfg.eval.tasks:
        TASKS.get(t)
    if not (cfg.model.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.model.device)):
        raise ConfigError(f"unknown device '{cfg.model.device}'; valid choices: auto, cpu, cuda, cuda:N")
    corpus = cfg.data.corpus
    if corpus not in CORPORA and not (Path(corpus).suffix or "/" in corpus or Path(corpus).exists()):
        raise ConfigError(f"unknown corpus '{corpus}'; valid choices: {', '.join(CORPORA)} or a path to a text file")
    if corpus not in CORPORA:  # a file: check it before a (possibly huge) model is loaded
        check_text_file(corpus)
    if not cfg.select.topk:
        raise ConfigError("topk is empty; give one or more K > 0, e.g. topk=1,10,100")
    for k in cfg.select.topk:
        if k <= 0:
            raise ConfigError(f"topk must be > 0, got {k}")
    if not cfg.seeds:
        raise ConfigError("seeds is empty; give one or more integers, e.g. seeds=0,1,2")
    for s in cfg.seeds:
        if s < 0:
            raise ConfigError(f"seeds must be >= 0, got {s}")
    positive = {
        "data.seq_len": cfg.data.seq_len, "data.calib_windows": cfg.data.calib_windows,
        "score.batch_size": cfg.score.batch_size, "score.probes": cfg.score.probes,
        "eval.batch_size": cfg.eval.batch_size, "eval.task_limit": cfg.eval.task_limit,
        "select.control_draws": cfg.select.control_draws,
    }
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    if cfg.data.eval_windows < 0:
        raise ConfigError(f"data.eval_windows must be > 0 or 'all', got {cfg.data.eval_windows}")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    if cfg.data.stride is not None and not (0 < cfg.data.stride <= cfg.data.seq_len):
        raise ConfigError(f"data.stride must be in (0, seq_len={cfg.data.seq_len}], got {cfg.data.stride}")
    if not (0.0 <= cfg.perturb.prob <= 1.0):
        raise ConfigError(f"perturb.prob must be in [0, 1], got {cfg.perturb.prob}")
    if not (0 <= cfg.perturb.scale < float("inf")):  # also rejects nan
        raise ConfigError(f"perturb.scale must be >= 0 and finite, got {cfg.perturb.scale}")
    parse_bits(cfg.perturb.bits, None)  # raises ConfigError on a malformed spec
    for rx in (cfg.score.include, cfg.score.exclude):
        if rx is not None:
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"invalid regex '{rx}': {e}") from None
    check_dir("out_dir", cfg.out_dir)
    if cfg.cache_dir is not None:
        check_dir("cache_dir", cfg.cache_dir)
    return cfg


def check_dir(what: str, path: str) -> None:
    """`path` must be a directory, or creatable: its nearest existing ancestor is a directory (writability is
    proven by `prepare_out_dir`, since os.access says yes to root even where writes fail, e.g. /proc)."""
    if not str(path).strip():
        raise ConfigError(f"{what} is empty; valid: a directory path")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{what} '{path}' exists and is not a directory; valid: a directory path")
        return
    anc = p.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{what} '{path}' cannot be created: '{anc}' is a file; valid: a directory path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} '{path}' cannot be created: '{anc}' is not writable")


def prepare_out_dir(path: str | Path, what: str = "out_dir") -> Path:
    """Create the directory and write + delete a probe file in it: the only proof that results can be
    written (before a model is loaded). A failure is one ConfigError line."""
    p = Path(path).expanduser()
    probe = p / f".superweight-probe-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} '{path}' is not writable ({e.strerror or type(e).__name__}); valid: a "
                          "writable directory path") from None
    return p


def storage_kind(model, name: str, p: torch.Tensor, quantize: str = "none") -> str:
    """'int8', '4bit' or 'none' for a parameter; on a model built from its config (quantize given), the
    Linear weights of the blocks count as quantized the way bitsandbytes would load them."""
    kind = quant_kind(p)
    if kind == "none" and quantize != "none" and layer_of(name) >= 0 and weight_kind(model, name) == "linear":
        return "int8" if quantize == "8bit" else "4bit"
    return kind


def check_capabilities(cfg: RunConfig, model, params: dict[str, torch.Tensor], quantize: str | None = None) -> None:
    """Every (metric, parameter kind, dtype, quantization) and (perturbation, storage) a run will need, and
    the K grid against the candidate counts. `quantize`: treat block Linear weights as quantized (a model built
    from its config); None: read the storage of the real parameters."""
    quantize = cfg.model.quantize if quantize is None else quantize
    kinds = {n: weight_kind(model, n) for n in params}
    storage = {n: storage_kind(model, n, p, quantize) for n, p in params.items()}
    four = [n for n, k in storage.items() if k == "4bit"]
    if four:
        raise ConfigError(
            f"'{four[0]}' is a 4-bit weight (two per byte, block-wise scales): no flat index addresses one weight, "
            "so it cannot be scored or perturbed; valid: quantize=8bit or none, or score.include=<regex of "
            "unquantized parameters>")
    int8 = [n for n, k in storage.items() if k == "int8"]
    for m in cfg.score.metrics:
        spec = METRICS.get(m)
        if int8 and not spec.quantized:
            why = "needs weight gradients, which 8-bit weights do not have" if spec.needs_gradients else "is not defined on 8-bit weights"
            raise ConfigError(f"metric '{m}' {why} ('{int8[0]}'); valid metrics for quantize=8bit: "
                              f"{', '.join(METRICS.names(quantized=True))}")
        for n, kind in kinds.items():
            if kind not in spec.weight_kinds:
                raise ConfigError(f"metric '{m}' cannot score '{n}' (a {kind} weight); valid weight kinds for {m}: "
                                  f"{', '.join(spec.weight_kinds)}; leave it out with score.exclude='{re.escape(n)}'")
    dtypes = {torch.int8 if storage[n] == "int8" else p.dtype for n, p in params.items()}
    for q in cfg.perturb.names:
        spec = PERTURBATIONS.get(q)
        if int8 and not spec.quantized:
            raise ConfigError(f"perturbation '{q}' would need re-quantizing 8-bit weights; valid for quantize=8bit: "
                              f"{', '.join(PERTURBATIONS.names(quantized=True))}")
        for dt in dtypes:
            if not supports(q, dt):
                valid = ", ".join(x for x in PERTURBATIONS if supports(x, dt))
                raise ConfigError(f"perturbation '{q}' cannot act on {str(dt).replace('torch.', '')} storage; "
                                  f"valid for it: {valid}")
            if q == "bit_flip":
                parse_bits(cfg.perturb.bits, dt)
    n_eligible = sum(p.numel() for p in params.values())
    k_max = max(cfg.select.topk)
    if "global" in cfg.select.modes and k_max > n_eligible:
        raise ConfigError(f"topk={k_max} is larger than the {n_eligible} eligible weights; valid: 1..{n_eligible}")
    if "per_layer" in cfg.select.modes:
        name, n = min(((nm, p.numel()) for nm, p in params.items()), key=lambda x: x[1])
        if k_max > n:
            raise ConfigError(f"topk={k_max} with mode=per_layer is larger than the smallest eligible tensor "
                              f"{name} ({n} weights); valid: 1..{n}")
    if "per_row" in cfg.select.modes:
        name, n = min(((nm, p.shape[input_axis(model, nm)] if p.ndim >= 2 else p.numel()) for nm, p in params.items()),
                      key=lambda x: x[1])  # a row = one output neuron's inputs (Conv1D stores [in, out])
        if k_max > n:
            raise ConfigError(f"topk={k_max} with mode=per_row is larger than the row length {n} of {name}; valid: 1..{n}")
