"""Process-wide patching for the duration of one estimate: SDPA, RMSNorm and gated-MLP forwards through the
local recomputation, and the model made twice differentiable (SDPA math kernel, eager attention,
checkpointing active). Everything is restored on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..params import checkpointing_active
from .recompute import LEAN_PARTS, recomputed


def _is_glu_mlp(mod) -> bool:
    """A gated MLP: Linear gate_proj, up_proj, down_proj and an act_fn without trainable parameters, whose
    forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (Llama, Mistral, Qwen2/3, Gemma, ...). The forward
    is checked by what it computes, not by its source: on two fixed random tokens it must equal that
    expression bit for bit (a forward that adds, scales or drops anything differs; one that raises, or a
    module in training mode with dropout, is simply not recomputed). Weights without values (fake or meta
    tensors: the memory planner's simulation) are judged by the structure alone."""
    if "forward" in mod.__dict__ or not callable(getattr(mod, "act_fn", None)):
        return False
    projs = [getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projs):
        return False
    if any(p.requires_grad for p in getattr(mod.act_fn, "parameters", lambda: [])()):
        return False
    w = projs[0].weight
    if not w.is_floating_point():
        return False
    if w.device.type == "meta" or isinstance(w, FakeTensor):  # no values (the memory planner): shape only
        return True
    x = torch.randn((2, projs[0].in_features), generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            got = mod(x)
            want = mod.down_proj(mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x))
    except Exception:  # noqa: BLE001 - any forward that cannot run on a plain [tokens, hidden] input
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.equal(got, want))


def _is_rmsnorm(mod) -> bool:
    return type(mod).__name__.endswith("RMSNorm") and not any(p.requires_grad for p in mod.parameters(recurse=True))


def _enabled_sdpa_backends() -> list:
    b = torch.backends.cuda
    on = [(SDPBackend.FLASH_ATTENTION, b.flash_sdp_enabled()), (SDPBackend.EFFICIENT_ATTENTION, b.mem_efficient_sdp_enabled()),
          (SDPBackend.CUDNN_ATTENTION, b.cudnn_sdp_enabled()), (SDPBackend.MATH, b.math_sdp_enabled())]
    return [k for k, v in on if v]


@contextlib.contextmanager
def lean_parts(model) -> Iterator[None]:
    """For the duration: SDPA, every RMSNorm without scored weights and the act(gate)·up product of gated
    MLPs (`_is_glu_mlp`) of `model` run through `recomputed`. SDPA keeps the kernels enabled on entry (fused ones
    included) for its forward and first-order backward, and uses the math kernel (twice differentiable)
    only for the second-order recomputation. Enter it before `double_backward_ready`, which pins the math
    kernel."""
    orig_sdpa = torch.nn.functional.scaled_dot_product_attention
    backends = _enabled_sdpa_backends() or [SDPBackend.MATH]

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        if dropout_p or kw or (isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad):
            return orig_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa, **kw)

        def fn2(q, k, v):
            return orig_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

        def fn(q, k, v):
            with sdpa_kernel(backends):
                return fn2(q, k, v)

        return recomputed(fn, query, key, value, fn2=fn2)

    patched = []
    try:
        if "attention" in LEAN_PARTS:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        for mod in model.modules():
            if "norm" in LEAN_PARTS and _is_rmsnorm(mod) and "forward" not in mod.__dict__:
                bound = mod.forward
                mod.forward = (lambda f: (lambda x, *a, **k: recomputed(lambda t: f(t, *a, **k), x)))(bound)
                patched.append(mod)
            elif "glu" in LEAN_PARTS and _is_glu_mlp(mod):
                mod.forward = (lambda m: (lambda x: m.down_proj(recomputed(lambda g, u: m.act_fn(g) * u,
                                                                      m.gate_proj(x), m.up_proj(x)))))(mod)
                patched.append(mod)
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig_sdpa
        for mod in patched:
            del mod.forward


@contextlib.contextmanager
def double_backward_ready(model) -> Iterator[None]:
    """Make the model twice differentiable for the duration, then restore it.

    * SDPA: the fused CPU/CUDA attention kernels have no double backward, so SDPA is pinned to its MATH
      backend (`torch.nn.attention.sdpa_kernel`); the model keeps attn_implementation="sdpa". Under lean
      (`lean_parts`, entered first) the fused kernel still runs the forward and first-order parts.
    * other fused attention (flash_attention_2, ...): switched to "eager" and switched back afterwards.
    * gradient checkpointing, when enabled, is made active in eval mode (`params.checkpointing_active`);
      non-reentrant checkpointing supports double backward.
    """
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    switched = impl not in (None, "eager", "sdpa")
    if switched:
        model.set_attn_implementation("eager")
    try:
        with checkpointing_active(model), sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switched:
            model.set_attn_implementation(impl)
