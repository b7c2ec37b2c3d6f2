"""The result row: its schema (`results.csv`), the per-window paired ΔNLL against the baseline and its
95% paired t-interval, and the past-support rule (a Top-K row that selected fewer than K weights).

Every row is evaluated on the same windows as the baseline, so its ΔNLL is paired per window:
d_i = (NLL sum of window i, perturbed − baseline) / tokens_i, and the row reports ΔNLL = Σ D_i / Σ n_i with a
95% paired t-interval over windows (`delta_nll_lo`, `delta_nll_hi`). Gaps between selections are in gaps.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..stats import t_quantile

RESULT_COLUMNS = [
    "metric", "seed", "mode", "selection", "draw", "k", "n_selected", "support", "n_tied", "perturbation",
    "ppl", "nll", "acc", "delta_ppl", "delta_nll", "delta_nll_lo", "delta_nll_hi", "delta_acc", "ppl_ratio",
    "changed", "delta_w_l2", "delta_w_linf", "mean_abs_w", "match_ks", "match_err_median", "match_err_max", "nonfinite_weights", "nonfinite", "tokens",
]
PER_WINDOW = ("window_nll", "window_tokens")  # kept in perturbation_results.json / .progress.jsonl, not in CSV


def past_support(row: dict) -> bool:
    """A Top-K row past its metric's support: Top-K stopped at `support` < K weights (never padded), so it
    is no Top-K at that K and is left out of the gaps and the effects (the row itself stays in results.csv)."""
    if row.get("selection") != "top_k":
        return False
    try:
        sup = float(row.get("support"))
    except (TypeError, ValueError):
        return False
    return math.isfinite(sup) and int(row["k"]) > sup


def per_window_delta(row: dict, baseline: dict) -> np.ndarray | None:
    """d_i = (NLL sum of window i, row − baseline) / tokens_i, or None without per-window data."""
    a, b, n = row.get("window_nll"), baseline.get("window_nll"), baseline.get("window_tokens")
    if not a or not b or not n or len(a) != len(b):
        return None
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(a, float) - np.asarray(b, float)) / np.where(n > 0, n, np.nan)


def paired_ci(row: dict, baseline: dict) -> tuple[float, float]:
    """95% paired t-interval of ΔNLL over the evaluation windows (token-weighted mean, windows of equal length
    in practice): mean(d) ± t · sd(d) / sqrt(n)."""
    d = per_window_delta(row, baseline)
    if d is None or d.size < 2 or not np.all(np.isfinite(d)):
        return float("nan"), float("nan")
    n = np.asarray(baseline["window_tokens"], float)
    mean = float(np.sum(d * n) / np.sum(n))
    half = t_quantile(0.975, d.size - 1) * float(np.std(d, ddof=1)) / math.sqrt(d.size)
    return mean - half, mean + half


def make_row(keys: dict, res: dict, baseline: dict, pinfo: dict, extra: dict | None = None) -> dict:
    """One result row: its keys (metric, seed, mode, selection, draw, k, perturbation, ...), the evaluation
    `res`, deltas vs `baseline` with the paired CI, and the perturbation size `pinfo`."""
    row = {**keys, **res}
    row["delta_ppl"] = res["ppl"] - baseline["ppl"]
    row["delta_nll"] = res["nll"] - baseline["nll"]
    row["delta_acc"] = res["acc"] - baseline["acc"]
    row["ppl_ratio"] = res["ppl"] / baseline["ppl"] if baseline["ppl"] else float("nan")
    row["delta_nll_lo"], row["delta_nll_hi"] = paired_ci(res, baseline)
    row["changed"] = pinfo.get("changed", 0)
    row["nonfinite_weights"] = pinfo.get("nonfinite", 0)
    for k in ("delta_w_l2", "delta_w_linf", "mean_abs_w"):
        row[k] = pinfo.get(k, float("nan"))
    for k in list(res):
        if "/" in k and k in baseline:
            row[f"delta_{k}"] = res[k] - baseline[k]
    row.update(extra or {})
    return row


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """rows -> the results.csv table: schema columns first, task columns after, per-window lists dropped."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in PER_WINDOW} for r in rows])
    if df.empty:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    # the fixed schema whatever the controls (NaN where a row has no value, e.g. match_ks without matched_k)
    return df.reindex(columns=RESULT_COLUMNS + [c for c in df.columns if c not in RESULT_COLUMNS])
