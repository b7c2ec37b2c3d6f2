"""`superweight detect`: the Super Weight detector, as a command.

Hooks every MLP down projection (down_proj / mlp.c_proj / fc2 / w2), runs the calibration windows of the
first seed, and finds massive activations: output elements |y[t, c]| > max(score.outlier_threshold,
50 x the layer's median per-token max |y|). The candidate super weight is down_proj.weight[row = c,
col = argmax_j |x[t, j]|], scored by |x_col * w| (see superweight.core.metrics.find_outliers).

Prints the layer summary and the candidates (layer, row, col, weight value, spike |activation|, input
activation), then evaluates perplexity on the evaluation windows with each of the top `candidates` (default
10) zeroed alone, and, for comparison, with `random` (default 5) random single weights of each same tensor
zeroed alone (seeded by the first seed). Writes out_dir/detect.json and out_dir/detect.csv.

Options: every `superweight run` option applies (model, data.*, score.outlier_threshold, score.include /
score.exclude, seeds, eval.batch_size, out_dir, ...), plus `candidates` and `random` (DetectOptions).

Example: superweight detect out_dir=outputs/detect data.eval_windows=16
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..arguments import parse_command
from ..config import ConfigError, PerturbConfig
from ..inputs.data import build_windows
from ..core.evaluation import evaluate_lm
from ..files import atomic_write, atomic_write_json
from ..inputs.models import bos_every_window, build_fake_model, load_model, load_model_config, model_context, model_info
from ..core.detector import OUTLIER_RATIO, expert_down_params, find_outliers, outlier_modules
from ..core.params import eligible_parameters, index_names, layer_of
from ..core.perturbation import perturbed
from ..run.validation import prepare_out_dir, validate
from .base import register


@dataclass
class DetectOptions:
    """superweight detect's own options."""

    candidates: int = 10  # how many top candidates to evaluate by zeroing each alone (0: detection only)
    random: int = 5  # random single weights per candidate tensor to zero for comparison


CSV_COLUMNS = ["kind", "rank", "param", "layer", "row", "col", "flat_index", "weight", "activation",
               "input_activation", "score", "occurrences", "ppl", "nll", "acc", "delta_ppl", "ppl_ratio"]


def check_down_projections(model, params) -> None:
    if not outlier_modules(model, params) and not expert_down_params(model, params):
        raise ConfigError("no MLP down projection among the eligible parameters (names ending in down_proj, "
                          "mlp.c_proj, fc2 or w2, or fused experts' down_proj); valid: a model with such modules and "
                          "score.include matching them")


def _fmt_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """Plain aligned text table; cols = [(key, format spec)]."""
    cells = [[k for k, _ in cols]] + [[format(r[k], f) if f else str(r[k]) for k, f in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


@register("detect", usage="usage: superweight detect [candidates=N] [random=N] [run options ...]", options=DetectOptions)
def main(argv: list[str]) -> int:
    """Find massive activations at the MLP down projections and the weight behind each; evaluate zeroing the
    top candidates alone, next to random single weights of the same tensors. Writes detect.json / detect.csv."""
    o, cfg = parse_command(list(argv), DetectOptions)
    for key in ("candidates", "random"):
        if getattr(o, key) < 0:
            raise ConfigError(f"option '{key}' must be an integer >= 0, got {getattr(o, key)}")
    opts = {"candidates": o.candidates, "random": o.random}
    cfg = validate(cfg)
    # what can fail on bad input fails on a model built from its config alone, before anything is written
    _, fake = build_fake_model(load_model_config(cfg.model, cfg.cache_dir), torch.float32, cfg.model.attn_implementation,
                               cfg.model.trust_remote_code)
    check_down_projections(fake, eligible_parameters(fake, cfg.score.include, cfg.score.exclude))
    del fake
    out = prepare_out_dir(cfg.out_dir)
    t0 = time.perf_counter()
    model, tok, device = load_model(cfg.model, cfg.cache_dir)
    params = eligible_parameters(model, cfg.score.include, cfg.score.exclude)
    check_down_projections(model, params)
    windows = build_windows(cfg.data, tok, cfg.cache_dir, context=model_context(model),
                            bos_every_window=bos_every_window(model))
    seed = cfg.seeds[0]
    calib = windows.calib(seed)
    bs = cfg.score.batch_size
    batches = [calib[i : i + bs] for i in range(0, calib.size(0), bs)]

    cands, stats = find_outliers(model, batches, cfg.score.outlier_threshold, OUTLIER_RATIO, params, device)
    print(f"Super Weight detector: {len(cands)} candidate(s) from {calib.numel()} calibration tokens "
          f"(spike: |y| > max({cfg.score.outlier_threshold:g}, {OUTLIER_RATIO:g} x layer median token max))")
    print(_fmt_table(stats, [("layer", ""), ("max_abs_output", ".1f"), ("typical_max", ".2f"),
                             ("threshold", ".1f"), ("n_candidates", "")]))

    ids, labels = windows.eval_inputs()
    base = evaluate_lm(model, ids, labels, cfg.eval.batch_size).as_dict()
    print(f"baseline eval: ppl={base['ppl']:.3f} over {base['tokens']} tokens")

    def zero_one(pname: str, flat: int) -> dict:
        with perturbed(params, {pname: torch.tensor([flat])}, "zero", PerturbConfig(), seed):
            r = evaluate_lm(model, ids, labels, cfg.eval.batch_size).as_dict()
        r["delta_ppl"] = r["ppl"] - base["ppl"]
        r["ppl_ratio"] = r["ppl"] / base["ppl"] if base["ppl"] else math.nan
        return r

    rows: list[dict] = []
    evaluated = cands[: opts["candidates"]]
    for i, c in enumerate(evaluated):
        rows.append({"kind": "candidate", "rank": i, **c.as_dict(), **zero_one(c.param, c.flat_index)})
    gen = torch.Generator().manual_seed(1_000_003 * seed + 4242)
    for pname in dict.fromkeys(c.param for c in evaluated):
        p = params[pname]
        taken = {c.flat_index for c in cands if c.param == pname}
        drawn: list[int] = []
        while len(drawn) < min(opts["random"], p.numel() - len(taken)):
            f = int(torch.randint(0, p.numel(), (1,), generator=gen))
            if f not in taken and f not in drawn:
                drawn.append(f)
        for j, f in enumerate(drawn):
            w = float(p.detach().reshape(-1)[f].float())
            rows.append({"kind": "random", "rank": j, "param": pname, "layer": layer_of(pname),
                         **index_names(tuple(p.shape), f), "flat_index": f, "weight": w, **zero_one(pname, f)})

    table = [{"kind": r["kind"], "layer": r["layer"], "row": r["row"], "col": r["col"], "weight": r["weight"],
              "activation": r.get("activation", math.nan), "input_activation": r.get("input_activation", math.nan),
              "score": r.get("score", math.nan), "ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"]} for r in rows]
    if table:
        print(_fmt_table(table, [("kind", ""), ("layer", ""), ("row", ""), ("col", ""), ("weight", ".4f"),
                                 ("activation", ".1f"), ("input_activation", ".1f"), ("score", ".1f"),
                                 ("ppl", ".3f"), ("ppl_ratio", ".3f")]))
    if len(cands) > len(evaluated):
        print(f"({len(cands) - len(evaluated)} more candidate(s) in detect.json; candidates=N evaluates more)")

    info = model_info(model, cfg.model, params)
    payload = {
        "config": cfg.to_dict(), "options": opts, "seed": seed, "model": info.__dict__,
        "rule": {"outlier_threshold": cfg.score.outlier_threshold, "outlier_ratio": OUTLIER_RATIO,
                 "calibration_tokens": int(calib.numel())},
        "baseline": base, "layers": stats, "candidates": [c.as_dict() for c in cands], "zeroing": rows,
        "elapsed_s": time.perf_counter() - t0,
    }
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    atomic_write(out / "detect.csv", lambda tmp: df.to_csv(tmp, index=False))
    atomic_write_json(out / "detect.json", payload)
    print(f"outputs: {out / 'detect.json'}, {out / 'detect.csv'}")
    return 0
