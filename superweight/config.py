"""Typed experiment configuration and its parsing.

One `RunConfig` describes a whole experiment. It is parsed by simple-parsing from any of the forms a
researcher or `wandb agent` uses, all of which give the same config:

    superweight run model=X metric=grad_x_weight topk=100 controls=random_k,bottom_k seeds=0,1,2
    superweight run --model X --metric grad_x_weight --topk 100 --controls random_k bottom_k --seeds 0 1 2
    superweight run --model=X --score.metrics=grad_x_weight --select.controls="['random_k', 'bottom_k']"
    superweight run config=exp.yaml topk=10,100          # YAML file, then CLI overrides

`normalize_args` turns every form into canonical `--dotted.key v1 v2 ...` tokens (resolving short aliases
such as `metric` -> `score.metrics`), then simple-parsing builds the typed dataclass. `validate` checks
names against the registries and ranges, raising `ConfigError` (one line; the CLI exits with code 2).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin

import simple_parsing
import yaml


class ConfigError(ValueError):
    """A bad user input. The CLI prints it as one line and exits with code 2, writing nothing."""


DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # embedded alias (smollm2-135m), Hugging Face id, local dir or .gguf file
    gguf_file: str | None = None  # GGUF file name inside `name` (a dir or hub repo)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    device_map: str | None = None  # "auto" shards across GPUs with accelerate
    quantize: str = "none"  # none | 8bit | 4bit (bitsandbytes, CUDA only)
    attn_implementation: str = "auto"  # auto | eager | sdpa
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # never on unless asked
    revision: str | None = None


@dataclass
class DataConfig:
    corpus: str = "boolq"  # boolq | lambada | wikitext2 | wikitext103 | c4 (online) | path to a text file
    text_format: str = "auto"  # auto | lines (one document per line) | plain (one document)
    seq_len: int = 128  # tokens per window
    stride: int | None = None  # eval stride (None = disjoint windows); context tokens are masked
    eval_windows: int = 16  # fixed evaluation windows, the same for every seed
    calib_windows: int = 8  # calibration windows per seed, drawn from the disjoint calibration pool
    max_documents: int | None = None  # truncate the corpus (quick runs)
    bos: str = "auto"  # auto: windows start with BOS when the tokenizer adds one (Gemma, Llama-3) | never


@dataclass
class ScoreConfig:
    metrics: list[str] = field(default_factory=lambda: ["magnitude", "grad_x_weight", "grad_squared", "act_mag", "act_outlier"])
    batch_size: int = 1  # calibration windows per backward (the "b" of the metric definitions)
    include: str | None = None  # regex over parameter names; default: 2-D weights of the blocks
    exclude: str | None = None  # regex over parameter names to drop
    dtype: str = "float32"  # score buffer dtype: float32 | bfloat16 (largest models)
    offload: bool = False  # keep score buffers on the CPU (largest models)
    probes: int = 16  # hutchinson_diag: Rademacher probes
    saliency: str = "abs"  # hutchinson_diag: abs (|diag H|) | obd (1/2 diag(H) w^2)
    outlier_threshold: float = 50.0  # act_outlier: spike = |a| > threshold and > ratio x median max
    cache: bool = True  # content-addressed on-disk score cache


@dataclass
class SelectConfig:
    topk: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])  # K grid, one ranking
    modes: list[str] = field(default_factory=lambda: ["global"])  # global | per_layer | per_row
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    save_top: int = 1000  # rows per (metric, seed) in rankings.csv


@dataclass
class PerturbConfig:
    names: list[str] = field(default_factory=lambda: ["zero"])  # zero | sign_flip | gauss_noise | bit_flip
    scale: float = 1.0  # sign_flip: w <- -scale w; gauss_noise: std
    relative: bool = True  # gauss_noise: noise std relative to |w|
    prob: float = 1.0  # bit_flip: probability each selected weight flips
    bits: str = "random"  # bit_flip: random | exponent_msb | sign | an integer bit position


@dataclass
class EvalConfig:
    batch_size: int = 8
    tasks: list[str] = field(default_factory=list)  # downstream: lambada | hellaswag
    task_limit: int = 200  # examples per downstream task


@dataclass
class TrackConfig:
    mode: str = "auto"  # auto (online if credentials, else offline) | online | offline | disabled
    project: str = "superweight"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # where wandb writes its run dirs (default: out_dir)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: TrackConfig = field(default_factory=TrackConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    out_dir: str = "outputs/default"
    cache_dir: str | None = None  # score/model/token cache (default: $SUPERWEIGHT_CACHE or ~/.cache/superweight)
    resume: bool = True  # reuse finished rows of an interrupted run in the same out_dir
    plots: list[str] = field(default_factory=lambda: ["html", "png", "svg"])  # out_dir/plots formats; none = no plots

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Short names a researcher types; the seed's canonical command uses them.
ALIASES = {
    "model": "model.name",
    "gguf_file": "model.gguf_file",
    "dtype": "model.dtype",
    "device": "model.device",
    "quantize": "model.quantize",
    "metric": "score.metrics",
    "metrics": "score.metrics",
    "topk": "select.topk",
    "k": "select.topk",
    "mode": "select.modes",
    "modes": "select.modes",
    "controls": "select.controls",
    "perturb": "perturb.names",
    "perturbation": "perturb.names",
    "perturbations": "perturb.names",
    "corpus": "data.corpus",
    "seq_len": "data.seq_len",
    "tasks": "eval.tasks",
    "seed": "seeds",
}


def _field_types(cls=RunConfig, prefix="") -> dict[str, Any]:
    """Flatten the dataclass tree into {dotted.key: type}."""
    out = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    import typing

    resolved = typing.get_type_hints(cls)
    for name in hints:
        tp = resolved[name]
        if dataclasses.is_dataclass(tp):
            out.update(_field_types(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


FIELDS = _field_types()


def _is_list(tp) -> bool:
    return get_origin(tp) is list


def _is_bool(tp) -> bool:
    return tp is bool


def _split_value(raw: str) -> list[str]:
    """`a,b`, `['a', 'b']` and `[1, 10]` (what wandb agent passes) -> ['a', 'b']."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = [v.strip().strip("'\"") for v in raw[1:-1].split(",") if v.strip()]
        return [str(v) for v in val]
    return [v.strip() for v in raw.split(",") if v.strip() != ""]


def _canonical_key(key: str) -> str:
    key = key.strip().lstrip("-").replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FIELDS:
        valid = sorted(set(FIELDS) | set(ALIASES))
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown option '{key}'{hint}; valid options: {', '.join(valid)}")
    return key


def _looks_like_key(tok: str) -> bool:
    if tok.startswith("--"):
        return True
    m = re.match(r"^([A-Za-z_][\w.\-]*)=", tok)
    return bool(m)


def parse_pairs(argv: list[str]) -> tuple[list[tuple[str, list[str]]], str | None]:
    """Group argv into (canonical key, values) pairs, in order; also return a `config=` YAML path."""
    pairs: list[tuple[str, list[str]]] = []
    config_path = None
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not _looks_like_key(tok):
            raise ConfigError(f"unexpected argument '{tok}': use key=value or --key value")
        body = tok[2:] if tok.startswith("--") else tok
        if "=" in body:
            key, raw = body.split("=", 1)
            values_raw = [raw]
        else:
            key, values_raw = body, []
        i += 1
        while i < len(argv) and not _looks_like_key(argv[i]):  # `--seeds 0 1 2`, `seeds=0 1 2`
            values_raw.append(argv[i])
            i += 1
        if key in ("config", "config_path"):
            if len(values_raw) != 1:
                raise ConfigError("option 'config' takes one YAML file path")
            config_path = values_raw[0]
            continue
        ckey = _canonical_key(key)
        tp = FIELDS[ckey]
        values: list[str] = []
        for raw in values_raw:
            values.extend(_split_value(raw) if _is_list(tp) else [raw])
        if not values:
            if _is_bool(tp):
                values = ["true"]
            elif not _is_list(tp):
                raise ConfigError(f"option '{key}' needs a value")
        if not _is_list(tp) and len(values) != 1:
            raise ConfigError(f"option '{key}' takes one value, got {values}")
        pairs.append((ckey, values))
    return pairs, config_path


def pop_options(argv: list[str], names, flags=()) -> tuple[dict[str, str], list[str]]:
    """Take a command's own options out of argv (`name=v`, `--name v`, `--name=v`; names in `flags` may stand
    alone and mean "true"). Returns ({name: raw value}, the rest), the rest being run configuration."""
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        body = tok[2:] if tok.startswith("--") else tok
        key, eq, val = body.partition("=")
        key = key.replace("-", "_")
        if key in names and (eq or tok.startswith("--") or key in flags):
            if not eq:
                if key in flags:
                    val = "true"
                elif i + 1 < len(argv):
                    i += 1
                    val = argv[i]
                else:
                    raise ConfigError(f"option '{key}' needs a value")
            own[key] = val
        else:
            rest.append(tok)
        i += 1
    return own, rest


def _flatten_yaml(d: dict, prefix="") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # a section (perturb: {names: ..., scale: ...}); aliases apply to leaves only
            out.extend(_flatten_yaml(v, f"{key}."))
        else:
            out.append((key, v))
    return out


def load_yaml_pairs(path: str) -> list[tuple[str, list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of options, got {type(data).__name__}")
    pairs = []
    for key, v in _flatten_yaml(data):
        ckey = _canonical_key(key)
        tp = FIELDS[ckey]
        if isinstance(v, list):
            vals = [str(x) for x in v]
        elif v is None:
            vals = []
        else:
            vals = _split_value(str(v)) if _is_list(tp) else [str(v)]
        if not _is_list(tp) and len(vals) != 1:
            if v is None:  # explicit null for an optional field: keep the default
                continue
            raise ConfigError(f"config file '{path}': option '{key}' takes one value, got {v!r}")
        pairs.append((ckey, vals))
    return pairs


class _Parser(simple_parsing.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line, code 2
        for bad, valid in (("invalid int value", "an integer"), ("invalid float value", "a number"),
                           ("Boolean value expected", "true, false, yes, no, 1, 0")):
            if bad in message:
                message += f"; valid: {valid}"
                break
        raise ConfigError(message)


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse any of the supported argument forms (plus an optional YAML file) into a RunConfig."""
    argv = list(argv or [])
    pairs, config_path = parse_pairs(argv)
    if config_path is not None:
        pairs = load_yaml_pairs(config_path) + pairs
    merged: dict[str, list[str]] = {}
    for k, v in pairs:  # later wins: YAML < CLI, and the last CLI occurrence wins
        merged[k] = v
    tokens: list[str] = []
    for k, vals in merged.items():
        tp = FIELDS[k]
        if _is_list(tp):
            tokens.append(f"--{k}")
            tokens.extend(vals)
        elif tp in (str | None, int | None, float | None) and vals[0].lower() in ("none", "null", ""):
            continue  # keep the default None
        else:
            tokens.append(f"--{k}={vals[0]}")
    parser = _Parser(
        add_help=False,
        argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
        nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
    )
    parser.add_arguments(RunConfig, dest="config")
    ns = parser.parse_args(tokens)
    cfg: RunConfig = ns.config
    return cfg


def check_choice(what: str, value: str, choices) -> None:
    choices = list(choices)
    if value not in choices:
        valid = ", ".join(choices) if choices else "(none available in this installation)"
        raise ConfigError(f"unknown {what} '{value}'; valid choices: {valid}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every name against its registry and every number against its range (before any output)."""
    from .data import CORPORA
    from .metrics import METRICS
    from .perturb import PERTURBATIONS, parse_bits
    from .rank import CONTROLS, MODES

    for m in cfg.score.metrics:
        check_choice("metric", m, METRICS)
    if not cfg.score.metrics:
        raise ConfigError("no metric given; valid choices: " + ", ".join(METRICS))
    for m in cfg.select.modes:
        check_choice("mode", m, MODES)
    for c in cfg.select.controls:
        check_choice("control", c, CONTROLS)
    for p in cfg.perturb.names:
        check_choice("perturbation", p, PERTURBATIONS)
    check_choice("dtype", cfg.model.dtype, ["auto", "float32", "bfloat16", "float16"])
    check_choice("score dtype", cfg.score.dtype, ["float32", "bfloat16"])
    check_choice("quantize", cfg.model.quantize, ["none", "8bit", "4bit"])
    check_choice("attn_implementation", cfg.model.attn_implementation, ["auto", "eager", "sdpa"])
    check_choice("text_format", cfg.data.text_format, ["auto", "lines", "plain"])
    check_choice("data.bos", cfg.data.bos, ["auto", "never"])
    check_choice("saliency", cfg.score.saliency, ["abs", "obd"])
    check_choice("wandb mode", cfg.wandb.mode, ["auto", "online", "offline", "disabled"])
    for f in cfg.plots:
        check_choice("plot format", f, ["html", "png", "svg", "json", "none"])
    from .evaluate import TASKS

    for t in cfg.eval.tasks:
        check_choice("task", t, TASKS)
    if not (cfg.model.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.model.device)):
        raise ConfigError(f"unknown device '{cfg.model.device}'; valid choices: auto, cpu, cuda, cuda:N")
    corpus = cfg.data.corpus
    if corpus not in CORPORA and not (Path(corpus).suffix or "/" in corpus or Path(corpus).exists()):
        raise ConfigError(
            f"unknown corpus '{corpus}'; valid choices: {', '.join(CORPORA)} or a path to a text file"
        )
    if corpus not in CORPORA:  # a file: check it before a (possibly huge) model is loaded
        from .data import check_text_file

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
        "data.seq_len": cfg.data.seq_len,
        "data.eval_windows": cfg.data.eval_windows,
        "data.calib_windows": cfg.data.calib_windows,
        "score.batch_size": cfg.score.batch_size,
        "score.probes": cfg.score.probes,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.task_limit": cfg.eval.task_limit,
    }
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
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
    _check_dir("out_dir", cfg.out_dir)
    if cfg.cache_dir is not None:
        _check_dir("cache_dir", cfg.cache_dir)
    return cfg


def _check_dir(what: str, path: str) -> None:
    """`path` must be a directory, or creatable: its nearest existing ancestor is a writable directory."""
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
    import os

    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} '{path}' cannot be created: '{anc}' is not writable")


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (manifests, W&B configs)."""
    kwargs = {}
    for f in dataclasses.fields(RunConfig):
        v = d.get(f.name, None)
        tp = f.type if not isinstance(f.type, str) else None
        sub = {
            "model": ModelConfig, "data": DataConfig, "score": ScoreConfig, "select": SelectConfig,
            "perturb": PerturbConfig, "eval": EvalConfig, "wandb": TrackConfig,
        }.get(f.name)
        if sub is not None:
            kwargs[f.name] = sub(**(v or {}))
        elif v is not None:
            kwargs[f.name] = v
        del tp
    return RunConfig(**kwargs)


__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "DataConfig", "ScoreConfig", "SelectConfig",
    "PerturbConfig", "EvalConfig", "TrackConfig", "parse_config", "validate", "config_from_dict",
    "ALIASES", "FIELDS",
]
