"""The vocabulary of parameters: which weights a run scores and perturbs, their names, layers, module
types and index naming, how to read a quantized weight's real values, and content hashes of the weights.

Every weight is addressed as (parameter name, flat index into the parameter's storage). A 2-D weight's flat
index f is (row, col) = divmod(f, cols); a fused mixture-of-experts parameter [E, R, C] (Mixtral, Qwen-MoE,
OLMoE keep experts as 3-D parameters) is (expert, row, col). Nothing here loads a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

import torch

from ..config import ConfigError

_LAYER_RX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
# MoE routers: a [num_experts, hidden] weight deciding which experts a token visits (Mixtral / Qwen-MoE /
# OLMoE `mlp.gate`, gpt-oss `mlp.router`, Qwen-MoE's `shared_expert_gate`). Not scored by default: changing
# a router weight reroutes tokens rather than scaling a feature channel (a different question), and gradient
# metrics see only the smooth top-k path, not the expert choice. score.include=... opts them in.
ROUTER_RX = re.compile(r"(?:^|\.)(?:gate|router|shared_expert_gate)\.weight$")
# Fused mixture-of-experts weights: one 3-D parameter [E, out, in] per projection of a block's `experts` module
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def layer_of(name: str) -> int:
    """Transformer block index of a parameter name, -1 outside the blocks (embeddings, final norm, head)."""
    m = _LAYER_RX.search(name)
    return int(m.group(1)) if m else -1


def module_type(name: str) -> str:
    """Short module type for layer histograms, e.g. 'mlp.down_proj', 'self_attn.q_proj' or, for fused
    experts, 'mlp.experts.down_proj' (the parameter is the module)."""
    m = _LAYER_RX.search(name)
    rest = name[m.end():] if m else name
    if rest.endswith(".weight") or rest.endswith(".bias"):
        return rest.rsplit(".", 1)[0]
    return rest


def is_router(name: str) -> bool:
    return bool(ROUTER_RX.search(name))


def index_names(shape: tuple[int, ...], flat: int) -> dict[str, int]:
    """Readable coordinates of flat index `flat`: {row, col} for a 2-D weight ([out, in] for Linear),
    {expert, row, col} for a fused 3-D expert parameter, {row: 0, col: flat} for 1-D."""
    if len(shape) >= 3:
        per = shape[-2] * shape[-1]
        e, rest = divmod(flat, per)
        r, c = divmod(rest, shape[-1])
        return {"expert": e, "row": r, "col": c}
    if len(shape) == 2:
        r, c = divmod(flat, shape[1])
        return {"row": r, "col": c}
    return {"row": 0, "col": flat}


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

    Default: every >=2-D weight inside the transformer blocks (attention and MLP matrices, fused 3-D expert
    weights), MoE routers and fused expert biases excluded (see ROUTER_RX). Embeddings, lm_head, norms and routers are opt-in via
    `include` (a regex over names). Tied parameters appear once."""
    out = {}
    rx_in = re.compile(include) if include else None
    rx_ex = re.compile(exclude) if exclude else None
    for name, p in unique_named_parameters(model):
        if rx_in is not None:
            ok = bool(rx_in.search(name))
        else:
            ok = p.ndim >= 2 and layer_of(name) >= 0 and not is_router(name) and not name.endswith("_bias")
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


# --- devices and numerics --------------------------------------------------------------------------


def input_device(model) -> torch.device:
    """Where input ids must go (the embedding's device, also under device_map="auto")."""
    return model.get_input_embeddings().weight.device


def model_context(model) -> int | None:
    """The longest input the model takes (from its config), or None when it does not say."""
    c = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def autocast_ctx(device: torch.device, model: torch.nn.Module):
    """bf16 autocast on CUDA (the GPU default: bf16 matmuls, fp32 softmax/log-softmax/norm reductions), nothing
    on CPU (fp32 reference numerics) and nothing for a model whose weights were loaded in fp32 (`dtype=float32`
    on a GPU means fp32 compute, e.g. to reproduce CPU numbers)."""
    if device.type != "cuda" or getattr(model, "dtype", None) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


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


# --- owning modules --------------------------------------------------------------------------------


def owner(model, name: str) -> tuple[str, torch.nn.Module, str]:
    """(module name, module, attribute) holding parameter `name`."""
    mod_name, _, attr = name.rpartition(".")
    return mod_name, model.get_submodule(mod_name), attr


def is_conv1d(mod: torch.nn.Module) -> bool:
    """GPT-2 style Conv1D: y = x @ W + b with W stored [in, out] (transposed vs nn.Linear)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def is_linear(mod: torch.nn.Module) -> bool:
    """nn.Linear and its quantized subclasses (bitsandbytes Linear8bitLt / Linear4bit)."""
    return isinstance(mod, torch.nn.Linear)


def weight_kind(model, name: str) -> str:
    """How a parameter is used, which decides what activation metrics can do with it:
    'linear' (W [out, in], y = x Wᵀ), 'conv1d' (W [in, out], y = x W), 'experts' (a fused [E, ., .] expert
    parameter of a mixture-of-experts block), or 'other' (embeddings, norms, routers' own classes, ...)."""
    mod_name, mod, attr = owner(model, name)
    if attr == "weight" and is_linear(mod):
        return "linear"
    if attr == "weight" and is_conv1d(mod):
        return "conv1d"
    p = getattr(mod, attr, None)
    if attr in EXPERT_WEIGHTS and isinstance(p, torch.Tensor) and p.ndim == 3 and isinstance(getattr(mod, "num_experts", None), int):
        return "experts"
    return "other"


# --- quantized weights (bitsandbytes) ----------------------------------------------------------------
# 8-bit (Int8Params: int8 [out, in] + fp32 row scale SCB, W = int8 * SCB[row] / 127): flat indices address
#   single weights, so magnitude / act_mag / act_outlier (on the dequantized W), zero and bit_flip (XOR on
#   the stored int8: the hardware-fault model) are meaningful. There are no weight gradients (the int8
#   matmul has no weight backward); sign_flip / gauss_noise would need re-quantization.
# 4-bit (Params4bit: two 4-bit codes per uint8, block-wise absmax): a flat index is a byte holding two
#   weights, so no metric or perturbation addresses single weights; score unquantized parameters instead.
# What each metric / perturbation accepts is declared on its registry entry (`quantized=`).


def quant_kind(p: torch.Tensor) -> str:
    """'int8' (bitsandbytes Int8Params or any int8 storage), '4bit' (Params4bit) or 'none' (floating point)."""
    cls = type(p).__name__
    if cls == "Params4bit":
        return "4bit"
    if cls == "Int8Params" or p.dtype == torch.int8:
        return "int8"
    return "none"


def int8_row_scale(p: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor | None:
    """The fp32 per-row scale of a bitsandbytes int8 weight, wherever bitsandbytes keeps it: on the
    parameter (`weight.SCB`, before the first forward) or in the module's matmul state (`state.SCB`,
    where Linear8bitLt moves it at its first forward)."""
    scb = getattr(p, "SCB", None)
    if scb is None and module is not None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def require_gradients(params: dict[str, torch.Tensor], what: str, valid: str = "") -> None:
    """One ConfigError line when a parameter cannot carry a weight gradient (quantized integer storage):
    `what` needs them; `valid` names what works instead."""
    for n, p in params.items():
        if not p.is_floating_point():
            raise ConfigError(f"{what} needs weight gradients, but '{n}' is stored as "
                              f"{str(p.dtype).replace('torch.', '')} (quantized, no gradients)"
                              + (f"; valid metrics for quantized weights: {valid}" if valid else ""))


def weight_values(p: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
    """The real-valued weights of parameter `p`, shaped like it (flat index i = the weight stored at flat
    index i of p): p itself for floating-point storage; for bitsandbytes int8, W = int8 · SCB[row] / 127
    (pass the owning module so the scale is found after a forward, see int8_row_scale)."""
    kind = quant_kind(p)
    if kind == "none":
        return p.detach()
    if kind == "int8":
        scb = int8_row_scale(p, module)
        if scb is None or scb.numel() != p.shape[0]:
            raise ConfigError(f"int8 weight of shape {tuple(p.shape)} has no per-row scale (SCB); "
                              "valid: bitsandbytes Int8Params loaded with quantize=8bit")
        return p.detach().float() * (scb.detach().float().to(p.device).unsqueeze(1) / 127.0)
    raise ConfigError("4-bit weights (two per byte, block-wise scales) have no per-index values; valid: quantize=8bit or none")


# --- content hashes ----------------------------------------------------------------------------------


def _update(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    step = (64 << 20) // max(t.element_size(), 1)  # 64 MiB slices: no full byte copy of a huge tensor
    for s in range(0, t.numel(), step):
        h.update(t[s : s + step].view(torch.uint8).numpy().data)


def param_hash(model, names: list[str] | None = None) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): proves bit-exact restore."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        if names is not None and name not in names:
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        _update(h, t)
    return h.hexdigest()


def fingerprint(model) -> str:
    """Content hash of every byte of every parameter (names, dtypes, shapes, values; tied weights once).

    Every byte, not a sample: a checkpoint that differs from another in one ablated weight (exactly what
    this field produces) must not be served the other's cached scores. blake2b runs at ~1 GB/s per core."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in unique_named_parameters(model):
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
        _update(h, p)
    return h.hexdigest()
