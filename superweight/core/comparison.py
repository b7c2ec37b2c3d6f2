"""Which metric finds them? One table (`metric_comparison.csv`) from the gaps and effects tables of a run.

For each perturbation, mode and metric:
* `k_double_ppl`: the smallest K whose Top-K doubles perplexity, PPL_K / PPL_base = exp(mean ΔNLL) ≥ 2 (the
  effects table's PPL ratio: mean over seeds and draws of the per-row ΔNLL, then exp; `summary.smallest_k_doubling`,
  the definition the run summary uses too); `k_double_ppl_sure`: the smallest K whose ratio's lower 95% bound
  is ≥ 2, empty where the Top-K effects are conditional (one seed: the bound holds no seed-to-seed variance);
  `conditional_on`: what the gap's interval is conditional on (gaps.csv's column, "" for none);
* for each K and control: the Top-K minus control ΔNLL gap with its 95% interval, as the gaps table has it.

Metrics are ranked within each (perturbation, mode): first by `k_double_ppl` (smaller first, none last), then
by the mean gap over controls at their smallest K (larger first), then by name. `rank` 1 is the metric whose
few weights break the model soonest and most clearly beyond the controls.
"""

from __future__ import annotations

import math

import pandas as pd

from .summary import smallest_k_doubling

COMPARISON_COLUMNS = ["perturbation", "mode", "rank", "metric", "k_double_ppl", "k_double_ppl_sure", "k", "control",
                      "gap_nll", "gap_nll_lo", "gap_nll_hi", "conditional_on", "resolved", "top_ppl_ratio", "top_ppl_ratio_lo",
                      "top_ppl_ratio_hi"]


def _conditional(top: pd.DataFrame) -> bool:
    """Whether any Top-K effect row is conditional (one seed): its interval cannot bound the K that doubles."""
    return "conditional_on" in top and bool((top["conditional_on"].fillna("").astype(str) != "").any())


def metric_comparison(gaps: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """The table described in the module docstring: one row per (perturbation, mode, metric, K, control);
    `resolved` is True where the gap's interval excludes 0."""
    if gaps is None or gaps.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    g = gaps.copy()
    eff = effects if effects is not None else pd.DataFrame(columns=["perturbation", "mode", "metric", "selection", "k"])
    top = eff[eff["selection"] == "top_k"] if "selection" in eff else eff
    ratio_cols = {"ppl_ratio": "top_ppl_ratio", "ppl_ratio_lo": "top_ppl_ratio_lo", "ppl_ratio_hi": "top_ppl_ratio_hi"}
    keys = ["perturbation", "mode", "metric", "k"]
    if not top.empty:
        g = g.merge(top[keys + list(ratio_cols)].rename(columns=ratio_cols), on=keys, how="left")
    for c in ratio_cols.values():
        if c not in g:
            g[c] = math.nan
    g["resolved"] = (g["gap_nll_lo"] > 0) | (g["gap_nll_hi"] < 0)
    if "conditional_on" not in g:
        g["conditional_on"] = ""
    g["conditional_on"] = g["conditional_on"].fillna("").astype(str)
    g["resolved"] &= g["conditional_on"] == ""  # one seed: an interval conditional on it is no finding
    parts = []
    for (pert, mode), block in g.groupby(["perturbation", "mode"], sort=False):
        order = []
        for metric, m in block.groupby("metric", sort=False):
            t = top[(top["perturbation"] == pert) & (top["mode"] == mode) & (top["metric"] == metric)] \
                if not top.empty else top
            kd = smallest_k_doubling(t["k"], t["ppl_ratio"]) if len(t) else math.nan
            ks = smallest_k_doubling(t["k"], t["ppl_ratio_lo"]) if len(t) and not _conditional(t) else math.nan
            first = m[m["k"] == m["k"].min()]["gap_nll"].mean()
            order.append((math.isnan(kd), kd if not math.isnan(kd) else 0.0, -first, str(metric), metric, kd, ks))
        order.sort()
        for rank, (*_, metric, kd, ks) in enumerate(order, start=1):
            m = block[block["metric"] == metric].assign(rank=rank, k_double_ppl=kd, k_double_ppl_sure=ks)
            parts.append(m.sort_values("k", kind="stable"))  # controls in the gaps table's order
    out = pd.concat(parts, ignore_index=True)
    for c in ("k_double_ppl", "k_double_ppl_sure"):  # an integer K, empty where PPL never doubles
        out[c] = pd.array([None if math.isnan(x) else int(x) for x in out[c]], dtype="Int64")
    out["k"] = out["k"].astype(int)
    return out[COMPARISON_COLUMNS].reset_index(drop=True)


def comparison_text(table: pd.DataFrame) -> str:
    """stdout: per metric in rank order, the K that doubles PPL and each gap with its interval."""
    if table is None or table.empty:
        return ""
    lines = ["Which metric finds them (metric_comparison.csv): Top-K minus control ΔNLL gap, nats/token, 95% CI"]
    for (pert, mode), block in table.groupby(["perturbation", "mode"], sort=False):
        lines.append(f"  {pert}, {mode}:")
        for (rank, metric), m in block.groupby(["rank", "metric"], sort=True):
            kd, ks = m["k_double_ppl"].iloc[0], m["k_double_ppl_sure"].iloc[0]
            cond = sorted(set(m["conditional_on"].fillna("").astype(str)) - {""}) if "conditional_on" in m else []
            kd_s = "never" if pd.isna(kd) else f"at K={int(kd)}"
            if cond:  # one seed: no bound, the intervals are conditional on it
                kd_s += f" (intervals conditional on the {'; '.join(cond)}: no bound, not a finding)"
            elif not pd.isna(kd) and (pd.isna(ks) or ks != kd):
                kd_s += f" (its lower 95% bound at {'no K' if pd.isna(ks) else f'K={int(ks)}'})"
            lines.append(f"  {rank}. {metric}: PPL doubled {kd_s}")
            for k, mk in m.groupby("k", sort=True):
                gaps = "  ".join(f"{r.control} {r.gap_nll:+.4f} [{r.gap_nll_lo:+.4f}, {r.gap_nll_hi:+.4f}]"
                                 for r in mk.itertuples(index=False))
                lines.append(f"       K={k:<5} {gaps}")
    return "\n".join(lines)
