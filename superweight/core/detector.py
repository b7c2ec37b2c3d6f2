"""The Super Weight detector (Yu et al. 2024, "The Super Weight in Large Language Models"): massive
activations at the MLP down projections, and the single weight that produces each.

One rule, one skeleton and one candidate type for dense and mixture-of-experts models. A *site* is a down
projection y = W x: a dense Linear / Conv1D module, or one expert's slice W[e] of a fused experts module
(experts.py recomputes each expert's input and output from the routed tokens). `find_outliers` is used by
the `act_outlier` metric (metrics.py) and by `superweight detect`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .experts import (bind_experts_args, expert_hidden, expert_output, experts_modules, is_transposed,
                      routed_tokens)
from .params import autocast_ctx, input_device, is_conv1d, is_linear, layer_of, weight_values

OUTLIER_MODULE_RX = re.compile(r"(?:^|\.)(?:down_proj|mlp\.c_proj|fc2|w2|dense_4h_to_h|fc_out)$")
OUTLIER_RATIO = 50.0  # a spike must also exceed this multiple of the layer's typical (median) token max


@dataclass
class OutlierCandidate:
    """One super-weight candidate: weight[row, col] of an MLP down projection (fused experts:
    down_proj[expert][row, col])."""

    param: str  # e.g. model.layers.2.mlp.down_proj.weight
    layer: int
    row: int  # index into the weight tensor (Linear: output channel; Conv1D: input channel)
    col: int
    out_channel: int  # the spike's channel in the module output
    in_channel: int  # the input channel with the largest |input| at the spike's token
    flat_index: int
    weight: float  # w[row, col]
    activation: float  # the spike: output value with the largest |value| over this candidate's occurrences
    input_activation: float  # x[in_channel] at that same token
    score: float  # max over occurrences of |x_in · w|
    occurrences: int  # spiking (token, channel) elements that point at this weight
    layer_typical_max: float  # median over tokens of max_c |y[t, c]| in this layer
    layer_threshold: float  # max(outlier_threshold, outlier_ratio * layer_typical_max)
    expert: int = -1  # fused mixture-of-experts down projection: the expert (row, col index its slice)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Spikes:
    """The spiking output elements of one call of one site, one entry per (token, out channel) element."""

    out_channel: torch.Tensor  # c
    in_channel: torch.Tensor  # j* = argmax_j |x[t, j]| at the spike's token
    score: torch.Tensor  # |x[t, j*] · W[c, j*]|
    activation: torch.Tensor  # y[t, c]
    input_activation: torch.Tensor  # x[t, j*]
    weight: torch.Tensor  # W[c, j*]


def fold_spikes(found: dict, site: tuple, spikes: Spikes) -> None:
    """Fold spike occurrences into `found[(*site, out channel, in channel)]`: count them, keep the largest
    score and the occurrence with the largest |activation| (its activation, input and weight value)."""
    for c, j, s, y, x, w in zip(spikes.out_channel.tolist(), spikes.in_channel.tolist(), spikes.score.tolist(),
                                spikes.activation.tolist(), spikes.input_activation.tolist(), spikes.weight.tolist()):
        key = (*site, c, j)
        d = found.get(key)
        if d is None:
            found[key] = d = {"score": s, "n": 0, "act": y, "x": x, "w": w}
        d["n"] += 1
        if abs(y) > abs(d["act"]):
            d["act"], d["x"] = y, x
        d["score"] = max(d["score"], s)


def ravel(shape: tuple[int, ...], *index: int) -> int:
    """Multi-index -> flat (row-major, contiguous) index."""
    f = 0
    for i, d in zip(index, shape):
        f = f * d + int(i)
    return f


def outlier_modules(model, params: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[str, torch.nn.Module]]:
    """{weight name: (module name, module)} of the dense MLP down projections (Linear / Conv1D modules named
    down_proj, mlp.c_proj, fc2 or w2), restricted to `params` when given. Fused experts: expert_down_params."""
    out = {}
    for mod_name, mod in model.named_modules():
        if not OUTLIER_MODULE_RX.search(mod_name) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        pname = f"{mod_name}.weight"
        if params is not None and pname not in params:
            continue
        if is_linear(mod) or is_conv1d(mod):
            out[pname] = (mod_name, mod)
    return out


def expert_down_params(model, params: dict | None = None) -> dict[str, tuple[str, torch.nn.Module]]:
    """{'<experts module>.down_proj': (module name, module)} of the fused experts modules, restricted to `params`."""
    out = {}
    for mod_name, mod in experts_modules(model).items():
        p = f"{mod_name}.down_proj"
        if params is None or p in params:
            out[p] = (mod_name, mod)
    return out


def spikes_at(y: torch.Tensor, x: torch.Tensor, weight: Callable[[], torch.Tensor], transposed: bool,
              threshold: float) -> Spikes | None:
    """The spikes of one down projection y = W x over n tokens (y [n, out] fp32, x [n, in]): elements with
    |y[t, c]| > threshold, each with its candidate W[c, j*], j* = argmax_j |x[t, j]|. `weight()` gives the
    real-valued weight, [out, in] or ([in, out]) when `transposed`; read only when something spikes."""
    hit = torch.nonzero(y.abs() > threshold)
    if hit.numel() == 0:
        return None
    xf = x.float()
    tok, ch = hit[:, 0], hit[:, 1]
    j = xf[tok].abs().argmax(-1)
    xj = xf[tok, j]
    w = weight()
    wv = (w[j, ch] if transposed else w[ch, j]).float()
    return Spikes(out_channel=ch, in_channel=j, score=(xj * wv).abs(), activation=y[tok, ch], input_activation=xj,
                  weight=wv)


@torch.no_grad()
def find_outliers(model, batches: list[torch.Tensor], threshold: float, ratio: float = OUTLIER_RATIO,
                  params: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
                  progress: bool = False, weighted: bool = False) -> tuple[list[OutlierCandidate], list[dict]]:
    """The Super Weight detector on every dense MLP down projection and every fused expert down projection.

    Hooks every down projection y = W x (fused experts: per routed (token, expert) pair, y_e = expert e's
    down_proj output before the routing weight, or times it with `weighted`, and x = act(gate)·up, the expert's
    own input) and runs the calibration batches twice:
      pass 1: the layer's typical max m_l = median over tokens t of max_c |y_l[t, c]|;
      pass 2: a spike is an output element with |y_l[t, c]| > max(threshold, ratio · m_l) (a massive
              activation: above the absolute threshold *and* far above what the layer's tokens usually
              reach). Its candidate weight is W[c, j*] with j* = argmax_j |x_l[t, j]| (the input channel
              that dominates that token), scored by |x_l[t, j*] · W[c, j*]| (max over occurrences).
    Returns (candidates sorted by score desc, per-layer stats rows, dense layers first) without keeping
    activations: memory is one float per token per layer plus the candidates.
    """
    dense, fused = outlier_modules(model, params), expert_down_params(model, params)
    dev = device or input_device(model)
    sites = {**{p: m for p, (_, m) in dense.items()}, **{p: m for p, (_, m) in fused.items()}}
    tokmax: dict[str, list[torch.Tensor]] = {p: [] for p in sites}
    layer_max = {p: 0.0 for p in sites}
    thresholds: dict[str, float] = {}
    found: dict[tuple, dict] = {}  # (param, [expert,] out channel, in channel) -> folded occurrences
    phase = ["typical"]

    def observe(pname: str, site: tuple, y: torch.Tensor, x: torch.Tensor, weight, transposed: bool) -> None:
        if phase[0] == "typical":
            tm = y.abs().amax(-1)
            tokmax[pname].append(tm.cpu())
            layer_max[pname] = max(layer_max[pname], float(tm.max()))
            return
        spikes = spikes_at(y, x, weight, transposed, thresholds[pname])
        if spikes is not None:
            fold_spikes(found, (pname, *site), spikes)

    def dense_hook(pname, mod):
        conv = is_conv1d(mod)

        def hook(m, args, kwargs, output):
            x = (args[0] if args else kwargs.get("input", kwargs.get("x"))).detach()
            y = output[0] if isinstance(output, tuple) else output
            observe(pname, (), y.detach().float().reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]),
                    lambda: weight_values(mod.weight, mod), conv)

        return hook

    def experts_hook(pname):
        def hook(mod, args, kwargs):
            x, idx, tw = bind_experts_args(mod, args, kwargs)
            x = x.detach()
            tw = tw.reshape(x.shape[0], -1)
            W = mod.down_proj.detach()
            for e, tok, kpos in routed_tokens(idx, mod.num_experts):
                h = expert_hidden(mod, e, x[tok])
                y = expert_output(mod, e, h).float()
                if weighted:
                    y = y * tw[tok, kpos].float().unsqueeze(-1)
                observe(pname, (e,), y, h, lambda e=e: W[e], is_transposed(mod))

        return hook

    handles = [mod.register_forward_hook(dense_hook(p, mod), with_kwargs=True) for p, (_, mod) in dense.items()]
    handles += [mod.register_forward_pre_hook(experts_hook(p), with_kwargs=True) for p, (_, mod) in fused.items()]
    try:
        for ph in ("typical", "detect") if sites else ():
            phase[0] = ph
            if ph == "detect":
                for p in sites:
                    typ = float(torch.cat(tokmax[p]).median()) if tokmax[p] else 0.0
                    thresholds[p] = max(float(threshold), float(ratio) * typ)
            for ids in tqdm(batches, desc=f"act_outlier/{ph}", disable=not progress, leave=False):
                with autocast_ctx(dev, model):
                    model(input_ids=ids.to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats, typical = [], {}
    for p in sites:
        typ = float(torch.cat(tokmax[p]).median()) if tokmax[p] else 0.0
        typical[p] = typ
        stats.append({"param": p, "layer": layer_of(p), "max_abs_output": layer_max[p], "typical_max": typ,
                      "threshold": thresholds[p], "n_candidates": sum(1 for k in found if k[0] == p)})
    cands = []
    for (p, *site, c, j), d in found.items():
        mod = sites[p]
        transposed = is_transposed(mod) if p in fused else is_conv1d(mod)
        shape = tuple(params[p].shape) if params is not None else tuple((mod.down_proj if p in fused else mod.weight).shape)
        row, col = (j, c) if transposed else (c, j)
        cands.append(OutlierCandidate(
            param=p, layer=layer_of(p), row=row, col=col, out_channel=c, in_channel=j,
            flat_index=ravel(shape, *site, row, col), weight=d["w"], activation=d["act"], input_activation=d["x"],
            score=d["score"], occurrences=d["n"], layer_typical_max=typical[p], layer_threshold=thresholds[p],
            expert=site[0] if site else -1))
    cands.sort(key=lambda c: (-c.score, c.param, c.flat_index))
    return cands, stats
