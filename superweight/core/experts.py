"""Mixture-of-experts models: fused expert weights, their layout, and the inputs each expert actually received
(recomputed from the routed tokens), for the metrics and the Super Weight detector (detector.py).

What the installed transformers (5.x) does (verified on tiny Mixtral / Qwen2-MoE / OLMoE models):

* Experts are ONE module per layer, `<block>.experts`, holding fused 3-D `nn.Parameter`s (no `.weight`):
      gate_up_proj [E, 2*I, H]   rows 0..I-1 = gate, rows I..2I-1 = up      (Mixtral/Qwen2-MoE/OLMoE/Qwen3-MoE)
      down_proj    [E, H, I]
  Expert e computes  h = act(x @ gate_up_proj[e][:I].T) * (x @ gate_up_proj[e][I:].T),  y = h @ down_proj[e].T
  i.e. every expert slice is an nn.Linear-style [out, in] matrix (input features on the LAST axis).
  The decorator `@use_experts_implementation` sets flags on the module: `is_transposed` (gpt-oss: slices are
  [in, out], x @ W), `has_gate` (False: `up_proj` [E, I, H] + act_fn), `has_bias` (`*_bias` [E, out]),
  `is_concatenated` (False: gate/up interleaved; handled by the module's own `_apply_gate`).
* `experts.forward(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])` dispatches on
  `config._experts_implementation`: "grouped_mm" (the default, also on CPU), "batched_mm" or "eager" (a Python
  loop over hit experts). None of them calls a submodule per expert, so forward hooks cannot see per-expert
  inputs. Here a forward PRE-hook on the experts module reads (hidden_states, top_k_index, top_k_weights) and
  recomputes each expert's inputs with the expert's own weights (no grad) -- independent of the implementation.
* The router `<block>.gate` (`MixtralTopKRouter`, `Qwen2MoeTopKRouter`, `OlmoeTopKRouter`; gpt-oss: `.router`)
  is not an nn.Linear but holds `.weight` [E, H] used as F.linear(x, W) = x @ W.T on every token (gpt-oss adds a
  bias [E]). Qwen2-MoE also has `shared_expert_gate` (nn.Linear [1, H], sigmoid gate of the shared expert).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .params import EXPERT_WEIGHTS, input_device, owner, weight_kind


# --------------------------------------------------------------------------------------------------
# Discovery and layout


def is_experts_module(mod: torch.nn.Module) -> bool:
    """A fused-experts module: a 3-D nn.Parameter `down_proj` and an integer `num_experts` (Qwen2-MoE's
    dense `shared_expert` has a Linear `down_proj` and is not one)."""
    dp = getattr(mod, "down_proj", None)
    return isinstance(dp, torch.nn.Parameter) and dp.ndim == 3 and isinstance(getattr(mod, "num_experts", None), int)


def experts_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if is_experts_module(m)}


def expert_owner(model, name: str) -> tuple[str, torch.nn.Module, str] | None:
    """(experts module name, module, 'gate_up_proj' | 'up_proj' | 'down_proj') for a fused expert weight
    such as 'model.layers.0.mlp.experts.down_proj'; None for anything else."""
    mod_name, _, attr = name.rpartition(".")
    if attr not in EXPERT_WEIGHTS:
        return None
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return None
    if not is_experts_module(mod) or getattr(mod, attr, None) is None or getattr(mod, attr).ndim != 3:
        return None
    return mod_name, mod, attr


def is_transposed(mod: torch.nn.Module) -> bool:
    return bool(getattr(mod, "is_transposed", False))


def in_axis(mod: torch.nn.Module) -> int:
    """Axis of a 3-D expert weight [E, ., .] indexing the expert's INPUT features: 2 ([E, out, in], Mixtral,
    Qwen2-MoE, OLMoE), 1 for transposed layouts ([E, in, out], gpt-oss)."""
    return 1 if is_transposed(mod) else 2


def out_axis(mod: torch.nn.Module) -> int:
    return 3 - in_axis(mod)


def input_axis(model, name: str) -> int:
    """The axis of an eligible weight that runs along one output neuron's inputs (per_row groups by output
    neuron, as Wanda does): 0 for GPT-2 Conv1D ([in, out]), the experts module's own for fused experts
    ([E, out, in] or transposed [E, in, out]), else the last (nn.Linear [out, in])."""
    kind = weight_kind(model, name)
    if kind == "conv1d":
        return 0
    if kind == "experts":
        return in_axis(owner(model, name)[1])
    return model.get_parameter(name).ndim - 1


# --------------------------------------------------------------------------------------------------
# Routing and per-expert recomputation (exactly what the experts module computes for expert e)


def bind_experts_args(mod, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) from an experts call, whatever the
    argument names (Mixtral: top_k_index/top_k_weights, gpt-oss: router_indices/routing_weights)."""
    sig = inspect.signature(type(mod).forward)  # @wraps: the original forward's signature
    x, idx, w = list(sig.bind(mod, *args, **kwargs).arguments.values())[1:4]
    x = x.reshape(-1, x.shape[-1])
    return x, idx.reshape(x.shape[0], -1), w


def routed_tokens(top_k_index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(expert e, token indices, top-k slots)] for every expert that received tokens. Ids outside
    0..E-1 (expert-parallel sentinels) are skipped, as in the experts' own forward."""
    idx = top_k_index.reshape(top_k_index.shape[0], -1)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    pos = torch.nonzero((flat >= 0) & (flat < num_experts)).squeeze(1)
    ids = flat[pos]
    order = torch.sort(ids, stable=True).indices
    pos, ids = pos[order], ids[order]
    counts = torch.bincount(ids, minlength=num_experts).tolist()  # one host sync per call
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            p = pos[start : start + c]
            out.append((e, p // k, p % k))
        start += c
    return out


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x.to(w.dtype) @ w if transposed else F.linear(x.to(w.dtype), w)
    return y + b if b is not None else y


def expert_hidden(mod, e: int, x: torch.Tensor) -> torch.Tensor:
    """Input of expert e's down projection for its tokens x [n, H]: act(gate) * up (or act(up))."""
    t = is_transposed(mod)
    has_bias = bool(getattr(mod, "has_bias", False))
    if getattr(mod, "has_gate", True) and getattr(mod, "gate_up_proj", None) is not None:
        h = _linear(x, mod.gate_up_proj[e], mod.gate_up_proj_bias[e] if has_bias else None, t)
        if hasattr(mod, "_apply_gate"):
            return mod._apply_gate(h)
        g, u = h.chunk(2, dim=-1)
        return mod.act_fn(g) * u
    h = _linear(x, mod.up_proj[e], mod.up_proj_bias[e] if has_bias else None, t)
    return mod.act_fn(h)


def expert_output(mod, e: int, h: torch.Tensor) -> torch.Tensor:
    """Expert e's down-projection output for inputs h [n, I] (before the routing weight)."""
    b = mod.down_proj_bias[e] if getattr(mod, "has_bias", False) else None
    return _linear(h, mod.down_proj[e], b, is_transposed(mod))


# --------------------------------------------------------------------------------------------------
# act_mag (Wanda) for fused experts: s[e, i, j] = |W[e, i, j]| * ||x_j||_2 over the tokens routed to e


class ExpertInputNorms:
    """Context manager: while active, accumulates sumsq[name] = sum over the tokens routed to expert e of
    x_j^2, shaped [E, in_features] (fp32), for every requested fused expert weight `name`.

    gate_up_proj / up_proj input = the hidden state of each routed token (one index_add_, no loop);
    down_proj input = act(gate) * up of that expert, recomputed per hit expert with its own weights (costs
    one extra up projection per routed token, only when a down_proj is requested)."""

    def __init__(self, model, names: Iterable[str]):
        self.sumsq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}  # experts module name -> routed tokens per expert [E] int64
        self._want: dict[str, dict[str, str]] = {}  # experts module name -> {kind: param name}
        self._mods: dict[str, torch.nn.Module] = {}
        for n in names:
            own = expert_owner(model, n)
            if own is None:
                raise ValueError(f"'{n}' is not a fused expert weight (valid: <...>.experts.gate_up_proj|up_proj|down_proj)")
            mod_name, mod, kind = own
            self._want.setdefault(mod_name, {})[kind] = n
            self._mods[mod_name] = mod
        self._handles = []

    def _hook(self, mod_name):
        want = self._want[mod_name]

        def hook(mod, args, kwargs):
            x, idx, _ = bind_experts_args(mod, args, kwargs)
            x = x.detach()
            E = mod.num_experts
            with torch.no_grad():
                routes = routed_tokens(idx, E)
                up = want.get("gate_up_proj") or want.get("up_proj")
                cnt = self.tokens.setdefault(mod_name, torch.zeros(E, dtype=torch.int64))
                for e, tok, _ in routes:
                    cnt[e] += tok.numel()
                if up is not None:
                    buf = self.sumsq.get(up)
                    if buf is None:
                        buf = self.sumsq[up] = torch.zeros(E, x.shape[-1], dtype=torch.float32, device=x.device)
                    if routes:
                        e_ids = torch.cat([torch.full((t.numel(),), e, device=x.device) for e, t, _ in routes])
                        toks = torch.cat([t for _, t, _ in routes])
                        buf.index_add_(0, e_ids, x[toks].float().square())
                dn = want.get("down_proj")
                if dn is not None:
                    buf = self.sumsq.get(dn)
                    for e, tok, _ in routes:
                        h = expert_hidden(mod, e, x[tok]).float()
                        if buf is None:
                            buf = self.sumsq[dn] = torch.zeros(E, h.shape[-1], dtype=torch.float32, device=x.device)
                        buf[e].add_(h.square().sum(0))

        return hook

    def __enter__(self):
        for mod_name, mod in self._mods.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(mod_name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def scores(self, model, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """|W| * ||x||_2 broadcast over the output axis; zero for experts (or modules) that got no token."""
        mod_name, mod, kind = expert_owner(model, name)
        w = (getattr(mod, kind) if weight is None else weight).detach().float().abs()
        ss = self.sumsq.get(name)
        if ss is None:
            return torch.zeros_like(w)
        return w * ss.to(w.device).sqrt().unsqueeze(out_axis(mod))


@torch.no_grad()
def act_mag_experts(model, batches: list[torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Standalone Wanda scores for fused expert weights: {name: [E, R, C] fp32}."""
    names = list(names)
    dev = input_device(model)
    with ExpertInputNorms(model, names) as acc:
        for ids in batches:
            model(input_ids=ids.to(dev), use_cache=False)
    return {n: acc.scores(model, n) for n in names}
