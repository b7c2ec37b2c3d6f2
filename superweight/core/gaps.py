"""The research answer: Top-K minus control ΔNLL gaps per (perturbation, mode, metric, K, control), and the
per-selection effects (the error bars of the Δ-vs-K figures), each with a 95% interval from
`superweight.stats.gap_interval` over seeds, control draws and evaluation windows.

A gap's interval depends on that gap's rows alone (the interval is closed-form), so a run's gaps.csv and the
one `superweight figures` pools from the same rows are equal, whatever other rows either table holds. With
one calibration seed the interval cannot hold the seed-to-seed variance: `conditional_on` names what it is
conditional on ("calibration seed", or "calibration seed and control draw" with one draw), and no headline
uses such a gap as a finding. Rows of a Top-K past its metric's support (`past_support`) make no gap.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..stats import conditional_on, gap_interval
from .results import past_support, per_window_delta
from .selections import SELECTIONS

GAP_COLUMNS = ["perturbation", "mode", "metric", "k", "control", "gap_nll", "gap_nll_lo", "gap_nll_hi",
               "conditional_on", "top_delta_nll", "control_delta_nll", "n_seeds", "n_draws", "n_windows",
               "match_err_median", "match_err_max", "seed_gaps"]
EFFECT_COLUMNS = ["perturbation", "mode", "metric", "selection", "k", "delta_nll", "delta_nll_lo", "delta_nll_hi",
                  "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "delta_ppl", "delta_ppl_lo", "delta_ppl_hi",
                  "conditional_on", "n_seeds", "n_draws", "n_windows"]


def _draw(r: dict):
    d = r.get("draw")
    try:
        return int(d)
    except (TypeError, ValueError):
        return 0


def _collect(rows: list[dict], baseline: dict, key) -> dict:
    """{key(row): {seed: {draw: (per-window ΔNLL or None, ΔNLL)}}} without past-support rows; a (seed, draw)
    seen twice (pooled runs that repeat a seed) is counted once, the first."""
    by: dict = {}
    for r in rows:
        if past_support(r):
            continue
        by.setdefault(key(r), {}).setdefault(int(r["seed"]), {}).setdefault(
            _draw(r), (per_window_delta(r, baseline), float(r["delta_nll"])))
    return by


def _label(selection: str, n_seeds: int, n_draws: int) -> str:
    """`conditional_on` of a selection's rows: a selection that is not a random draw (top_k, bottom_k: fixed
    by the seed) has no draw to be conditional on."""
    random = selection in SELECTIONS and SELECTIONS.get(selection).random
    return conditional_on(n_seeds, n_draws if random else 2)


def _interval(top: list | None, ctl: list[list], n: np.ndarray) -> tuple[float, float]:
    """gap_interval of top − ctl (top None: of −ctl), NaN without per-window data."""
    if any(d is None for cs in ctl for d in cs) or (top is not None and any(d is None for d in top)):
        return float("nan"), float("nan")
    T = top if top is not None else [np.zeros(n.size) for _ in ctl]
    return gap_interval(T, ctl, n)


def gaps(rows: list[dict], baseline: dict) -> pd.DataFrame:
    """gap = ΔNLL(top_k) − ΔNLL(control) per (perturbation, mode, metric, K, control): the mean over the seeds
    that have both of (Top-K ΔNLL − the mean over the control's draws), with its `gap_interval`. A matched
    control also reports the relative |w| error of its matches, |w_match| / |w_top| − 1: `match_err_median`
    (the median of its rows' medians) and `match_err_max` (of its rows' signed largest errors, the one largest
    in absolute value). `seed_gaps`: the gap of each seed (Top-K ΔNLL − mean over its draws), ";"-joined in
    seed order, so a reader sees seeds that disagree (one seed that found another Top-K) instead of one mean:
    the interval assumes normal seed effects and cannot see a cluster its seeds never found.

    Rows from several runs pool (a sweep that puts each seed in its own run) when they share the evaluation
    windows (edge/figures.py checks). Rows without per-window data give the point estimate only."""
    if not rows:
        return pd.DataFrame(columns=GAP_COLUMNS)
    n = np.asarray(baseline.get("window_tokens") or [], float)
    by: dict = {}
    for (pert, mode, metric, k, sel), per_seed in _collect(
            rows, baseline, lambda r: (r["perturbation"], r["mode"], r["metric"], int(r["k"]), r["selection"])).items():
        by.setdefault((pert, mode, metric, k), {})[sel] = per_seed
    errs: dict = {}  # matched controls: |w_match| / |w_top| − 1 of their rows (row medians, row maxima)
    for r in rows:
        if "match_err_median" in r and not past_support(r):
            e = errs.setdefault((r["perturbation"], r["mode"], r["metric"], int(r["k"]), r["selection"]),
                                {"median": [], "max": []})
            for stat in ("median", "max"):
                try:
                    e[stat].append(float(r[f"match_err_{stat}"]))
                except (TypeError, ValueError):
                    pass
    out = []
    for key, sels in by.items():
        if "top_k" not in sels:
            continue
        for control, per_seed in sels.items():
            if control == "top_k":
                continue
            seeds = sorted(set(per_seed) & set(sels["top_k"]))
            if not seeds:
                continue
            tops = [next(iter(sels["top_k"][s].values())) for s in seeds]
            ctls = [list(per_seed[s].values()) for s in seeds]
            top = float(np.mean([t[1] for t in tops]))
            ctl = float(np.mean([np.mean([c[1] for c in cs]) for cs in ctls]))
            lo, hi = _interval([t[0] for t in tops], [[c[0] for c in cs] for cs in ctls], n)
            n_draws = min(len(cs) for cs in ctls)
            err = errs.get(key + (control,), {})
            out.append({"perturbation": key[0], "mode": key[1], "metric": key[2], "k": key[3], "control": control,
                        "gap_nll": top - ctl, "gap_nll_lo": lo, "gap_nll_hi": hi,
                        "conditional_on": _label(control, len(seeds), n_draws),
                        "top_delta_nll": top, "control_delta_nll": ctl, "n_seeds": len(seeds),
                        "n_draws": max(len(cs) for cs in ctls), "n_windows": int(n.size),
                        "match_err_median": _nan_stat(np.median, err.get("median", [])),
                        "match_err_max": _nan_stat(lambda v: v[int(np.argmax(np.abs(v)))], err.get("max", [])),
                        "seed_gaps": ";".join(f"{t[1] - np.mean([c[1] for c in cs]):.4g}" for t, cs in zip(tops, ctls))})
    return pd.DataFrame(out, columns=GAP_COLUMNS)


def _nan_stat(fn, values: list) -> float:
    v = np.asarray([x for x in values if math.isfinite(x)], float)
    return float(fn(v)) if v.size else float("nan")


def _exp(v: float) -> float:
    return v if not math.isfinite(v) else (math.exp(v) if v < 700 else float("inf"))


def effects(rows: list[dict], baseline: dict) -> pd.DataFrame:
    """Mean ΔNLL per (perturbation, mode, metric, selection, K) over seeds and draws, with its `gap_interval`
    (the selection against no control); the PPL ratio and ΔPPL with the interval carried through their
    monotone maps (ratio = exp(ΔNLL), ΔPPL = PPL_base · (exp(ΔNLL) − 1)). The error bars of the Δ-vs-K figures."""
    if not rows:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    n = np.asarray(baseline.get("window_tokens") or [], float)
    base_ppl = float(baseline["ppl"])
    out = []
    for key, per_seed in _collect(rows, baseline, lambda r: (r["perturbation"], r["mode"], r["metric"],
                                                               r["selection"], int(r["k"]))).items():
        ctls = [list(per_seed[s].values()) for s in sorted(per_seed)]
        mean = float(np.mean([np.mean([c[1] for c in cs]) for cs in ctls]))
        lo, hi = _interval(None, [[c[0] for c in cs] for cs in ctls], n)
        lo, hi = -hi, -lo  # the interval of −(−ΔNLL)
        out.append({"perturbation": key[0], "mode": key[1], "metric": key[2], "selection": key[3], "k": key[4],
                    "delta_nll": mean, "delta_nll_lo": lo, "delta_nll_hi": hi,
                    "ppl_ratio": _exp(mean), "ppl_ratio_lo": _exp(lo), "ppl_ratio_hi": _exp(hi),
                    "delta_ppl": base_ppl * (_exp(mean) - 1), "delta_ppl_lo": base_ppl * (_exp(lo) - 1),
                    "delta_ppl_hi": base_ppl * (_exp(hi) - 1),
                    "conditional_on": _label(key[3], len(ctls), min(len(cs) for cs in ctls)),
                    "n_seeds": len(ctls), "n_draws": max(len(cs) for cs in ctls), "n_windows": int(n.size)})
    return pd.DataFrame(out, columns=EFFECT_COLUMNS)
