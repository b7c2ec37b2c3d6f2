"""The Super Weight detector (Yu et al. 2024, "The Super Weight in Large Language Models"): massive
activations at the MLP down projections, and the single weight that produces each.

`find_outliers` is used by the `act_outlier` metric (metrics.py) and by `superweight detect`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .experts import find_expert_outliers, fold_spikes
from .params import autocast_ctx, input_device, is_conv1d, is_linear, layer_of, weight_values

OUTLIER_MODULE_RX = re.compile(r"(?:^|\.)(?:down_proj|mlp\.c_proj|fc2|w2|dense_4h_to_h|fc_out)$")


@dataclass
class OutlierCandidate:
    """One super-weight candidate: weight[row, col] of an MLP down projection."""

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


OUTLIER_RATIO = 50.0  # a spike must also exceed this multiple of the layer's typical (median) token max


def outlier_modules(model, params: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[str, torch.nn.Module]]:
    """{weight name: (module name, module)} of the dense MLP down projections (Linear / Conv1D modules named
    down_proj, mlp.c_proj, fc2 or w2), restricted to `params` when given. Fused experts: experts.py."""
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


@torch.no_grad()
def find_outliers(model, batches: list[torch.Tensor], threshold: float, ratio: float = OUTLIER_RATIO,
                  params: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
                  progress: bool = False) -> tuple[list[OutlierCandidate], list[dict]]:
    """The Super Weight detector (Yu et al. 2024, "The Super Weight in Large Language Models"), on every dense
    MLP down projection and every fused expert down projection (experts.find_expert_outliers: the same rule per
    routed (token, expert) pair, candidate = down_proj[expert][row, col]).

    Hooks every MLP down projection y = W x and runs the calibration batches twice:
      pass 1: the layer's typical max m_l = median over tokens t of max_c |y_l[t, c]|;
      pass 2: a spike is an output element with |y_l[t, c]| > max(threshold, ratio · m_l) (a massive
              activation: above the absolute threshold *and* far above what the layer's tokens usually
              reach). Its candidate weight is W[c, j*] with j* = argmax_j |x_l[t, j]| (the input channel
              that dominates that token), scored by |x_l[t, j*] · W[c, j*]| (max over occurrences).
    Returns (candidates sorted by score desc, per-layer stats rows) without keeping activations: memory is
    one float per token per layer plus the candidates.
    """
    mods = outlier_modules(model, params)
    ecands, estats = find_expert_outliers(model, batches, threshold, ratio, params)
    experts = [OutlierCandidate(**{k: v for k, v in e.as_dict().items()}) for e in ecands]
    if not mods:
        experts.sort(key=lambda c: (-c.score, c.param, c.flat_index))
        return experts, estats
    dev = device or input_device(model)
    tokmax: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    layer_max: dict[str, float] = {n: 0.0 for n in mods}
    thresholds: dict[str, float] = {}
    found: dict[tuple[str, int, int], dict] = {}
    phase = ["typical"]

    def make_hook(pname, mod):
        conv = is_conv1d(mod)

        def hook(m, args, kwargs, output):
            x = (args[0] if args else kwargs.get("input", kwargs.get("x"))).detach()
            y = output[0] if isinstance(output, tuple) else output
            ay = y.detach().float().abs().reshape(-1, y.shape[-1])  # [tokens, out]
            if phase[0] == "typical":
                tm = ay.amax(-1)
                tokmax[pname].append(tm.cpu())
                layer_max[pname] = max(layer_max[pname], float(tm.max()))
                return
            thr = thresholds[pname]
            hit = torch.nonzero(ay > thr)
            if hit.numel() == 0:
                return
            xf = x.float().reshape(-1, x.shape[-1])
            tok, ch = hit[:, 0], hit[:, 1]
            j = xf[tok].abs().argmax(-1)
            xj = xf[tok, j]
            w = weight_values(mod.weight, mod)
            wv = (w[j, ch] if conv else w[ch, j]).float()
            sc = (xj * wv).abs()
            yv = y.detach().float().reshape(-1, y.shape[-1])[tok, ch]
            fold_spikes(found, (pname,), ch, j, sc, yv, xj, wv)

        return hook

    handles = [mod.register_forward_hook(make_hook(p, mod), with_kwargs=True) for p, (_, mod) in mods.items()]
    try:
        for ph in ("typical", "detect"):
            phase[0] = ph
            if ph == "detect":
                for p in mods:
                    typ = float(torch.cat(tokmax[p]).median()) if tokmax[p] else 0.0
                    thresholds[p] = max(float(threshold), float(ratio) * typ)
            for ids in tqdm(batches, desc=f"act_outlier/{ph}", disable=not progress, leave=False):
                with autocast_ctx(dev, model):
                    model(input_ids=ids.to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats, typical = [], {}
    for p, (mod_name, mod) in mods.items():
        typ = float(torch.cat(tokmax[p]).median()) if tokmax[p] else 0.0
        typical[p] = typ
        stats.append({"param": p, "layer": layer_of(p), "max_abs_output": layer_max[p], "typical_max": typ,
                      "threshold": thresholds[p], "n_candidates": sum(1 for k in found if k[0] == p)})
    cands = []
    for (p, c, j), e in found.items():
        conv = is_conv1d(mods[p][1])
        shape = tuple(params[p].shape) if params is not None else tuple(mods[p][1].weight.shape)
        row, col = (j, c) if conv else (c, j)
        cands.append(OutlierCandidate(
            param=p, layer=layer_of(p), row=row, col=col, out_channel=c, in_channel=j,
            flat_index=row * shape[1] + col, weight=e["w"], activation=e["act"], input_activation=e["x"],
            score=e["score"], occurrences=e["n"], layer_typical_max=typical[p], layer_threshold=thresholds[p]))
    cands += experts
    cands.sort(key=lambda c: (-c.score, c.param, c.flat_index))
    return cands, stats + estats
