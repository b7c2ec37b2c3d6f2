"""The typed experiment configuration: one `RunConfig` of nested dataclasses describes a whole experiment.

This module imports nothing from the package (it is the bottom of the import graph). Each field carries a
one-line doc (the comment after it), which `superweight <command> --help` prints through simple-parsing.
Parsing the command line and YAML files lives in `arguments.py`; checking names against the registries
and the model's capabilities lives in `validation.py`.

The W&B config, sweep YAMLs and manifests use the FLAT dotted form of this tree (`model.name`,
`perturb.scale`, ...): `to_flat` / `from_flat` convert, and `config_hash` identifies what changes results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A bad user input. The CLI prints it as one line and exits with code 2, writing nothing."""


DEFAULT_MODEL = "smollm2-135m"

# The fixed choices of the config, declared once: the parser, `--help` and validation read them from here.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantize = Literal["none", "8bit", "4bit"]
Attention = Literal["auto", "eager", "sdpa"]
TextFormat = Literal["auto", "lines", "plain"]
Bos = Literal["auto", "never"]
ScoreDtype = Literal["float32", "bfloat16"]
Saliency = Literal["abs", "obd"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
ScoreArtifacts = Literal["reference", "upload", "none"]
PlotFormat = Literal["html", "png", "svg", "pdf", "json", "none"]


def list_of(choice: Any, default: list[str]):
    """A list option whose items are the values of the Literal type `choice` (the parser checks each item:
    simple-parsing cannot convert list items to a Literal itself)."""
    return field(default_factory=lambda: list(default),
                 metadata={"custom_args": {"type": str, "choices": get_args(choice)}})


def typed_items(obj, prefix: str = ""):
    """(dotted key, declared type, value) of every leaf field of a config dataclass tree."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from typed_items(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], v


def choices(tp) -> tuple[str, ...]:
    """The valid values of a Literal type, or of the items of a list of one; () for any other type."""
    if get_origin(tp) is list:
        tp = get_args(tp)[0]
    return get_args(tp) if get_origin(tp) is Literal else ()


@dataclass
class ModelConfig:
    """Which model, on which device, in which dtype."""

    name: str = DEFAULT_MODEL  # embedded alias (smollm2-135m, gemma3-270m), Hugging Face id, local dir or .gguf file
    gguf_file: str | None = None  # GGUF file name inside `name` (a dir or hub repo)
    dtype: Dtype = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    device_map: str | None = None  # "auto" shards a large model across GPUs with accelerate
    quantize: Quantize = "none"  # bitsandbytes weights (8bit also runs on the CPU)
    attn_implementation: Attention = "auto"  # attention kernel (auto: the model's default)
    gradient_checkpointing: bool = False  # recompute activations in backward (large models)
    trust_remote_code: bool = False  # run the model repo's own code (never on unless asked)
    revision: str | None = None  # hub revision (branch, tag or commit)


@dataclass
class DataConfig:
    """The corpus and its windows: evaluation (fixed) and calibration (per seed), never overlapping."""

    corpus: str = "boolq"  # boolq | lambada | wikitext2 | wikitext103 | c4 (online) | path to a text file
    text_format: TextFormat = "auto"  # text files: lines (one document per line), plain (one document), auto
    seq_len: int = 128  # tokens per window
    stride: int | None = None  # evaluation stride (None = disjoint windows); context tokens are not scored
    eval_windows: int = 8  # evaluation windows, spread evenly over the corpus (0 = all windows of the split)
    calib_windows: int = 8  # calibration windows per seed, drawn from the windows not used for evaluation
    max_documents: int | None = None  # use only the first N documents of the corpus (quick runs)
    bos: Bos = "auto"  # auto: a BOS token starts the stream, or every window when the model needs it (Gemma)


@dataclass
class ScoreConfig:
    """Sensitivity metrics and how their scores are computed and stored."""

    metrics: list[str] = field(default_factory=lambda: ["magnitude", "grad_x_weight", "grad_squared", "act_mag", "act_outlier"])  # sensitivity metrics to score
    batch_size: int = 1  # calibration windows per backward (the "b" of the metric definitions)
    include: str | None = None  # regex over parameter names to score (default: >=2-D weights of the blocks, routers excluded)
    exclude: str | None = None  # regex over parameter names to leave out
    dtype: ScoreDtype = "float32"  # score buffer dtype (bfloat16: largest models)
    offload: bool = False  # keep score buffers in host memory (largest models)
    probes: int = 16  # hutchinson_diag: Rademacher probes
    saliency: Saliency = "abs"  # hutchinson_diag: abs (|diag H|) or obd (|1/2 diag(H) w^2|)
    outlier_threshold: float = 50.0  # act_outlier: a spike is |y| > threshold and > 50 x the layer's median token max
    cache: str = "compact"  # on-disk score cache: compact (what the run reads, = true) | full (every score) | false


@dataclass
class SelectConfig:
    """Which weights are perturbed: Top-K of a metric and the controls at the same K."""

    topk: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])  # K grid, evaluated from one ranking
    modes: list[str] = field(default_factory=lambda: ["global"])  # global | per_layer | per_row
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k", "matched_k"])  # control selections at the same K
    control_draws: int = 2  # independent draws of each random control (random_k, matched_k) per seed and K
    save_top: int = 1000  # ranked weights per (metric, seed, mode, selection) written to rankings.csv


@dataclass
class PerturbConfig:
    """What is done to the selected weights (undone bit-exactly after each evaluation)."""

    names: list[str] = field(default_factory=lambda: ["zero"])  # zero | sign_flip | gauss_noise | bit_flip
    scale: float = 1.0  # sign_flip: w <- -scale w; gauss_noise: noise std (relative to |w| or absolute)
    relative: bool = True  # gauss_noise: noise std relative to |w|
    prob: float = 1.0  # bit_flip: probability that each selected weight flips
    bits: str = "random"  # bit_flip: random | exponent_msb | sign | an integer bit position


@dataclass
class EvalConfig:
    """Evaluation of every perturbed model: perplexity windows and downstream tasks."""

    batch_size: int = 8  # evaluation windows per forward
    tasks: list[str] = field(default_factory=list)  # downstream tasks: lambada | hellaswag
    task_limit: int = 200  # examples per downstream task


@dataclass
class TrackConfig:
    """Weights & Biases tracking."""

    mode: WandbMode = "auto"  # auto: online with credentials, else offline
    project: str = "superweight"  # W&B project
    entity: str | None = None  # W&B entity (user or team)
    group: str | None = None  # W&B group (a sweep sets it)
    name: str | None = None  # W&B run name (default: the out_dir's name)
    tags: list[str] = field(default_factory=list)  # W&B tags
    dir: str | None = None  # where wandb writes its run dirs (default: out_dir)
    requeue_on_sigterm: bool = False  # SIGTERM marks the run preempting (W&B requeues it) instead of stopped
    scores: ScoreArtifacts = "reference"  # score-set artifacts: reference (a file:// reference to the cache: no copy, no upload), upload (the file, once per cache key) or none


@dataclass
class RunConfig:
    """One experiment: score -> select -> perturb -> evaluate, for every metric, seed, K and selection."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: TrackConfig = field(default_factory=TrackConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # calibration seeds (also seed the controls and stochastic perturbations)
    out_dir: str = "outputs/default"  # where the result files go; rerunning the same command resumes
    cache_dir: str | None = None  # score/model/token cache (default: $SUPERWEIGHT_CACHE or ~/.cache/superweight)
    resume: bool = True  # reuse finished rows of an interrupted run in the same out_dir
    plots: list[PlotFormat] = list_of(PlotFormat, ["html", "png", "svg", "pdf"])  # plot formats in out_dir/plots

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "score": ScoreConfig, "select": SelectConfig,
            "perturb": PerturbConfig, "eval": EvalConfig, "wandb": TrackConfig}

# Keys that never change a result (where files go, how they are tracked and drawn, whether to resume). A
# key ending in "." is a whole section. The one list: config_hash, sweep run names and figure variants use it.
NON_RESULT_KEYS = ("out_dir", "wandb.", "resume", "cache_dir", "plots", "score.cache")


def is_result_key(dotted: str) -> bool:
    return not any(dotted == k or (k.endswith(".") and dotted.startswith(k)) for k in NON_RESULT_KEYS)


def to_flat(cfg: RunConfig | dict) -> dict[str, Any]:
    """{"model.name": ..., "perturb.scale": ..., "seeds": [...]}: the one config shape of W&B and sweeps."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in to_flat(v).items()})
        else:
            out[k] = v
    return out


def from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` (nested) or `to_flat()` (dotted) output; unknown keys are ignored."""
    nested: dict[str, Any] = {}
    for k, v in d.items():
        if "." in k:
            sec, _, leaf = k.partition(".")
            nested.setdefault(sec, {})[leaf] = v
        elif isinstance(v, dict):
            nested.setdefault(k, {}).update(v)
        else:
            nested[k] = v
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        v = nested.get(f.name)
        if f.name in SECTIONS:
            sec = SECTIONS[f.name]
            names = {x.name for x in dataclasses.fields(sec)}
            kwargs[f.name] = sec(**{kk: vv for kk, vv in (v or {}).items() if kk in names})
        elif v is not None:
            kwargs[f.name] = v
    return RunConfig(**kwargs)


def config_hash(cfg: RunConfig, code_version: str = "") -> str:
    """Hash of what determines the results: every result key, plus the version of the code computing them
    (so a fixed metric never resumes or serves rows of the buggy one)."""
    d = {k: v for k, v in to_flat(cfg).items() if is_result_key(k)}
    d["_code"] = code_version
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "DataConfig", "ScoreConfig", "SelectConfig", "PerturbConfig",
    "EvalConfig", "TrackConfig", "SECTIONS", "NON_RESULT_KEYS", "is_result_key", "to_flat", "from_dict",
    "config_hash", "DEFAULT_MODEL", "choices",
]
