"""What a run says about itself: aggregates over seeds (summary.csv), the W&B summary with its headline keys,
and the stdout table. Plots only draw these tables and tracking only logs them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def within_support(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a results table that are not past their metric's support (`results.past_support`, the
    same rule on a table): a Top-K row with K > support selected fewer than K weights, so no summary uses it."""
    if df is None or df.empty or "support" not in df.columns or "selection" not in df.columns:
        return df
    sup = pd.to_numeric(df["support"], errors="coerce")
    return df[~((df["selection"] == "top_k") & sup.notna() & (pd.to_numeric(df["k"]) > sup))]


def smallest_k_doubling(k, ppl_ratio) -> float:
    """The K that doubles perplexity, one definition everywhere (summary, metric_comparison.csv, W&B): the
    smallest K whose Top-K PPL ratio PPL_K / PPL_base = exp(mean ΔNLL) is ≥ 2, the mean taken over seeds (and
    draws) of the per-row ΔNLL, i.e. the geometric mean of the per-row PPL ratios (not their arithmetic mean,
    which one broken seed can push past 2). `k`, `ppl_ratio`: aligned sequences; NaN where none doubles."""
    k = pd.to_numeric(pd.Series(list(k)), errors="coerce")
    r = pd.to_numeric(pd.Series(list(ppl_ratio)), errors="coerce")
    hit = k[(r >= 2.0).to_numpy()]
    return float(hit.min()) if len(hit) else math.nan


def aggregate_over_seeds(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean, sample std (ddof=1, 0 for one value) and count over seeds (and control draws) of `value` for each
    (perturbation, mode, metric, selection, k); non-finite values are dropped and counted. Top-K rows past
    their metric's support (`past_support`) are left out: the plots drawn from this show no padding."""
    keys = ["perturbation", "mode", "metric", "selection", "k"]
    df = within_support(df)
    d = df[keys + ["seed", value]].copy()
    d[value] = pd.to_numeric(d[value], errors="coerce")
    finite = np.isfinite(d[value].to_numpy(dtype=float))
    d["_nonfinite"] = ~finite
    d.loc[~finite, value] = np.nan
    g = d.groupby(keys, sort=True)
    out = g[value].agg(["mean", "count"]).reset_index()
    out["std"] = g[value].std(ddof=1).fillna(0.0).to_numpy()
    out["nonfinite"] = g["_nonfinite"].sum().to_numpy()
    return out


def finite_or_none(x) -> float | None:
    """float(x) when finite, else None (W&B summaries and JSON hold no NaN/inf)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def summary_metrics(results: pd.DataFrame, baseline: dict, gap: pd.DataFrame | None = None) -> dict:
    """The run summary (sortable in the W&B runs table): `baseline/<x>`; means over seeds and draws
    `delta_nll/<pert>/<mode>/<metric>/<selection>/k<K>` (same for delta_ppl, delta_acc); the gaps
    `gap_nll/<pert>/<mode>/<metric>/<control>/k<K>` with `_lo`/`_hi`; `max_delta_ppl/<metric>`;
    `headline/max_delta_ppl_<selection>`; `headline/k_to_double_ppl/<metric>` (`smallest_k_doubling`: the smallest
    K whose Top-K exp(mean ΔNLL) is ≥ 2, first perturbation and mode); `headline/max_gap_nll_random_k` (the largest
    Top-K − Random-K gap whose CI excludes 0, of the unconditional ones); `gap_nll_conditional_on` (what the
    intervals are conditional on, when a run has one seed). Top-K rows past their metric's support are left
    out of every key (`within_support`)."""
    out: dict = {}
    for k, v in baseline.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"baseline/{k}"] = finite_or_none(v)
    if results is None or results.empty:
        return out
    keys = ["perturbation", "mode", "metric", "selection", "k"]
    vals = [c for c in ("delta_ppl", "delta_nll", "delta_acc", "ppl_ratio") if c in results.columns]
    r = within_support(results)[keys + vals].copy()
    if r.empty:
        return out
    for c in vals:
        r[c] = pd.to_numeric(r[c], errors="coerce")
    means = r.groupby(keys, sort=False)[vals].mean()
    for (pert, mode, metric, sel, k), row in means.iterrows():
        for c in ("delta_ppl", "delta_nll", "delta_acc"):
            if c in row:
                out[f"{c}/{pert}/{mode}/{metric}/{sel}/k{k}"] = finite_or_none(row[c])
    m = means.reset_index()
    for metric, g in m[m["selection"] == "top_k"].groupby("metric", sort=False):
        out[f"max_delta_ppl/{metric}"] = finite_or_none(g["delta_ppl"].max())
    for sel, g in m.groupby("selection", sort=False):
        out[f"headline/max_delta_ppl_{sel}"] = finite_or_none(g["delta_ppl"].max())
    if "delta_nll" in m.columns:
        first = m[(m["perturbation"] == m["perturbation"].iloc[0]) & (m["mode"] == m["mode"].iloc[0])
                  & (m["selection"] == "top_k")]
        for metric, g in first.groupby("metric", sort=False):
            with np.errstate(over="ignore"):
                kd = smallest_k_doubling(g["k"], np.exp(g["delta_nll"].to_numpy(dtype=float)))
            if not math.isnan(kd):
                out[f"headline/k_to_double_ppl/{metric}"] = int(kd)
    if gap is not None and not gap.empty:
        for row in gap.itertuples(index=False):
            base = f"gap_nll/{row.perturbation}/{row.mode}/{row.metric}/{row.control}/k{row.k}"
            out[base] = finite_or_none(row.gap_nll)
            out[base + "_lo"] = finite_or_none(row.gap_nll_lo)
            out[base + "_hi"] = finite_or_none(row.gap_nll_hi)
        unconditional = gap["conditional_on"].fillna("") == "" if "conditional_on" in gap else True
        sig = gap[(gap["control"] == "random_k") & (gap["gap_nll_lo"] > 0) & unconditional]
        conditional = sorted(set(gap["conditional_on"].fillna("")) - {""}) if "conditional_on" in gap else []
        if conditional:  # one seed: the intervals hold no seed-to-seed variance, so no headline gap
            out["gap_nll_conditional_on"] = "; ".join(conditional)
        if not sig.empty:
            out["headline/max_gap_nll_random_k"] = finite_or_none(sig["gap_nll"].max())
    return out


def summary_table(df: pd.DataFrame, gap: pd.DataFrame | None = None) -> str:
    """stdout: mean ΔNLL per metric and K, Top-K next to the controls, and the gaps with their CIs (first
    mode and perturbation)."""
    df = within_support(df)
    if df is None or df.empty:
        return ""
    d = df[(df["mode"] == df["mode"].iloc[0]) & (df["perturbation"] == df["perturbation"].iloc[0])]
    piv = d.groupby(["metric", "k", "selection"])["ppl"].mean().unstack("selection")
    text = (f"mean PPL over seeds and draws ({d['mode'].iloc[0]}, {d['perturbation'].iloc[0]}):\n"
            + piv.to_string(float_format=lambda x: f"{x:.3f}"))
    if gap is not None and not gap.empty:
        g = gap[(gap["mode"] == d["mode"].iloc[0]) & (gap["perturbation"] == d["perturbation"].iloc[0])]
        cond = g["conditional_on"].fillna("") if "conditional_on" in g else pd.Series("", index=g.index)
        lines = [f"{r.metric:>16} K={r.k:<6} {r.control:<10} {r.gap_nll:+10.4f}  [{r.gap_nll_lo:+.4f}, {r.gap_nll_hi:+.4f}]"
                 + (f"  conditional on the {c}" if c else "") for r, c in zip(g.itertuples(index=False), cond)]
        text += ("\n\nΔNLL gap, Top-K minus control (nats/token), 95% CI over seeds, draws and windows"
                 + (" (with one seed: conditional on it, not a finding)" if (cond != "").any() else "") + ":\n"
                 + "\n".join(lines))
    return text
