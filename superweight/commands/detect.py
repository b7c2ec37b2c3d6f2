"""`superweight detect`: the Super Weight detector, as a command.

Hooks every MLP down projection (down_proj / mlp.c_proj / fc2 / w2), runs the calibration windows of the
first seed, and finds massive activations: output elements |y[t, c]| > max(score.outlier_threshold,
50 x the layer's median per-token max |y|). The candidate super weight is down_proj.weight[row = c,
col = argmax_j |x[t, j]|], scored by |x_col * w| (see superweight.core.metrics.find_outliers).

Prints the layer summary and the candidates (layer, row, col, weight value, spike |activation|, input
activation), then evaluates perplexity on the evaluation windows with each of the top `candidates` (default
10) zeroed alone, and, for comparison, with `random` (default 5) random single weights of each same tensor
zeroed alone (random_k of the run's selection code, among the weights zeroing changes, seeded by the first
seed). The setup, loading, evaluation and row format are the run's (run/experiment.py: act_outlier, zero):
each zeroing is a result row as in results.csv, next to the candidate's coordinates. Writes
out_dir/detect.json and out_dir/detect.csv.

Options: every `superweight run` option applies (model, data.*, score.outlier_threshold, score.include /
score.exclude, seeds, eval.batch_size, out_dir, ...), plus `candidates` and `random` (DetectOptions).

Example: superweight detect out_dir=outputs/detect data.eval_windows=16
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch

from ..arguments import parse_command
from ..config import ConfigError
from ..core.detector import OUTLIER_RATIO, expert_down_params, find_outliers, outlier_modules
from ..core.params import index_names, layer_of
from ..core.perturbation import perturbed
from ..core.results import make_row
from ..core.selections import rank
from ..files import atomic_write, atomic_write_json
from ..run.experiment import Experiment
from ..run.validation import validate
from .base import register


@dataclass
class DetectOptions:
    """superweight detect's own options."""

    candidates: int = 10  # how many top candidates to evaluate by zeroing each alone (0: detection only)
    random: int = 5  # random single weights per candidate tensor to zero for comparison


CANDIDATE_COLUMNS = ["kind", "rank", "param", "layer", "row", "col", "flat_index", "weight", "activation",
                     "input_activation", "score", "occurrences"]
ROW_COLUMNS = ["ppl", "nll", "acc", "delta_ppl", "ppl_ratio", "delta_nll", "delta_nll_lo", "delta_nll_hi", "changed"]


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
    validate(cfg)  # every option as given (a bad metric name is still a bad input)
    cfg.score.metrics, cfg.perturb.names = ["act_outlier"], ["zero"]  # what detect computes and does
    exp = Experiment(cfg, progress=False, checks=[check_down_projections])
    # what can fail on bad input fails on a model built from its config alone, before anything is written
    exp.prepared = exp.setup(resume_log=False)
    t0 = time.perf_counter()
    exp.loaded = exp.load()
    seed = cfg.seeds[0]
    calib = exp.windows.calib(seed)
    bs = cfg.score.batch_size
    batches = [calib[i : i + bs] for i in range(0, calib.size(0), bs)]

    cands, stats = find_outliers(exp.model, batches, cfg.score.outlier_threshold, OUTLIER_RATIO, exp.params,
                                 exp.device)
    print(f"Super Weight detector: {len(cands)} candidate(s) from {calib.numel()} calibration tokens "
          f"(spike: |y| > max({cfg.score.outlier_threshold:g}, {OUTLIER_RATIO:g} x layer median token max))")
    print(_fmt_table(stats, [("layer", ""), ("max_abs_output", ".1f"), ("typical_max", ".2f"),
                             ("threshold", ".1f"), ("n_candidates", "")]))

    exp.baseline = base = exp.evaluate()
    print(f"baseline eval: ppl={base['ppl']:.3f} over {base['tokens']} tokens")

    def zero_one(pname: str, flat: int) -> dict:
        """The run's result row for zeroing weight `flat` of `pname` alone (perturb, evaluate, restore)."""
        with perturbed(exp.params, {pname: torch.tensor([flat])}, "zero", cfg.perturb, seed) as pinfo:
            res = exp.evaluate()
        return make_row({}, res, base, pinfo)

    rows: list[dict] = []
    evaluated = cands[: opts["candidates"]]
    for i, c in enumerate(evaluated):
        rows.append({"kind": "candidate", "rank": i, **c.as_dict(), **zero_one(c.param, c.flat_index)})
    zeroable = exp.mask_fn("zero")  # w != 0: zeroing a zero weight is no control
    for draw, pname in enumerate(dict.fromkeys(c.param for c in evaluated)):
        taken = torch.tensor([c.flat_index for c in cands if c.param == pname])

        def mask(name: str, pname=pname, taken=taken) -> torch.Tensor:
            m = zeroable(name)  # None: every weight of the tensor is nonzero
            m = torch.ones(exp.params[name].numel(), dtype=torch.bool) if m is None else m.reshape(-1).clone()
            m[taken] = False  # never a candidate
            return m

        p = exp.params[pname]
        r = rank({pname: torch.zeros(p.shape)}, max(opts["random"], 1), "global", "random_k", seed, draw, mask_fn=mask)
        values = exp.values(pname).reshape(-1)
        for j, f in enumerate(r.flat.tolist()[: opts["random"]]):
            rows.append({"kind": "random", "rank": j, "param": pname, "layer": layer_of(pname),
                         **index_names(tuple(p.shape), f), "flat_index": f, "weight": float(values[f].float()),
                         **zero_one(pname, f)})

    table = [{"kind": r["kind"], "layer": r["layer"], "row": r["row"], "col": r["col"], "weight": r["weight"],
              "activation": r.get("activation", math.nan), "input_activation": r.get("input_activation", math.nan),
              "score": r.get("score", math.nan), "ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"]} for r in rows]
    if table:
        print(_fmt_table(table, [("kind", ""), ("layer", ""), ("row", ""), ("col", ""), ("weight", ".4f"),
                                 ("activation", ".1f"), ("input_activation", ".1f"), ("score", ".1f"),
                                 ("ppl", ".3f"), ("ppl_ratio", ".3f")]))
    if len(cands) > len(evaluated):
        print(f"({len(cands) - len(evaluated)} more candidate(s) in detect.json; candidates=N evaluates more)")

    payload = {
        "config": cfg.to_dict(), "options": opts, "seed": seed, "model": exp.loaded.info.__dict__,
        "rule": {"outlier_threshold": cfg.score.outlier_threshold, "outlier_ratio": OUTLIER_RATIO,
                 "calibration_tokens": int(calib.numel())},
        "baseline": base, "layers": stats, "candidates": [c.as_dict() for c in cands], "zeroing": rows,
        "elapsed_s": time.perf_counter() - t0,
    }
    df = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS + ROW_COLUMNS)
    atomic_write(exp.out / "detect.csv", lambda tmp: df.to_csv(tmp, index=False))
    atomic_write_json(exp.out / "detect.json", payload)
    print(f"outputs: {exp.out / 'detect.json'}, {exp.out / 'detect.csv'}")
    return 0
