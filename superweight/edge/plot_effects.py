"""Δ vs K: for each metric a panel, for each selection a line against K on a log axis."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.summary import aggregate_over_seeds
from .style import (DOUBLE_IN, SELECTION_COLORS, SELECTION_DASH, SELECTION_LABELS, SELECTION_MARKERS, SINGLE_IN, VALUES,
                    print_size)


def delta_vs_k(df: pd.DataFrame, value: str = "delta_ppl", perturbation: str | None = None,
               mode: str | None = None, title_suffix: str = "", effects: pd.DataFrame | None = None) -> go.Figure:
    """One panel per metric; one line per selection; x = K (log). With `effects` (results.effects: 95% CIs
    over seeds, control draws and evaluation windows) for ΔNLL / ΔPPL / PPL ratio, the line is its mean and
    the error bars its CI; otherwise mean over seeds ± std."""
    if value not in VALUES:
        raise ValueError(f"unknown value '{value}'; valid: {', '.join(VALUES)}")
    label, logy = VALUES[value]
    d = df
    perturbation = perturbation or str(d["perturbation"].iloc[0])
    mode = mode or str(d["mode"].iloc[0])
    d = d[(d["perturbation"] == perturbation) & (d["mode"] == mode)]
    if logy:  # geometric mean and ×/÷ geometric std over seeds: symmetric on the log axis, never below 0
        d = d.copy()
        v = pd.to_numeric(d[value], errors="coerce").to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            d[value] = np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)
    agg = aggregate_over_seeds(d, value)
    use_ci = effects is not None and not effects.empty and value in ("delta_nll", "delta_ppl", "ppl_ratio")
    if use_ci:
        e = effects[(effects["perturbation"] == perturbation) & (effects["mode"] == mode)]
        agg = agg.merge(e[["metric", "selection", "k", value, f"{value}_lo", f"{value}_hi"]],
                        on=["metric", "selection", "k"], how="left")
        agg["mean"] = agg[value].where(agg[value].notna(), np.exp(agg["mean"]) if logy else agg["mean"])
        agg["upper"] = (agg[f"{value}_hi"] - agg["mean"]).clip(lower=0)
        agg["lower"] = (agg["mean"] - agg[f"{value}_lo"]).clip(lower=0)
        agg["count"] = agg["count"].where(agg[f"{value}_lo"].isna(), 2)  # bars are shown for a CI
    elif logy:
        center = np.exp(agg["mean"])
        agg["upper"], agg["lower"] = np.exp(agg["mean"] + agg["std"]) - center, center - np.exp(agg["mean"] - agg["std"])
        agg["mean"] = center
    elif not use_ci:
        agg["upper"] = agg["lower"] = agg["std"]
    metrics = list(dict.fromkeys(d["metric"]))
    n = max(1, len(metrics))
    cols = n if n <= 4 else 3  # 5-6 metrics: two rows of three, each panel still ~2.2 in wide
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=metrics, shared_yaxes="all", shared_xaxes="all",
                        horizontal_spacing=0.03, vertical_spacing=0.16 if rows > 1 else 0.1)
    shown = set()
    for j, metric in enumerate(metrics):
        r, c = j // cols + 1, j % cols + 1
        for sel in [s for s in SELECTION_COLORS if s in set(agg["selection"])] + \
                   sorted(set(agg["selection"]) - set(SELECTION_COLORS)):
            a = agg[(agg["metric"] == metric) & (agg["selection"] == sel)].sort_values("k")
            if a.empty:
                continue
            fig.add_trace(go.Scatter(
                x=a["k"], y=a["mean"], mode="lines+markers", name=SELECTION_LABELS.get(sel, sel),
                legendgroup=sel, showlegend=sel not in shown,
                line=dict(color=SELECTION_COLORS.get(sel), dash=SELECTION_DASH.get(sel, "solid"), width=1.5),
                marker=dict(symbol=SELECTION_MARKERS.get(sel, "circle"), size=5),
                error_y=dict(type="data", symmetric=False, array=a["upper"], arrayminus=a["lower"],
                             visible=bool((a["count"] > 1).any()), thickness=1, width=2),
                customdata=np.stack([a["count"], a["std"]], axis=-1),
                hovertemplate="K=%{x}<br>mean=%{y:.4g}<br>std=%{customdata[1]:.3g}<br>seeds=%{customdata[0]}",
            ), row=r, col=c)
            shown.add(sel)
        fig.update_xaxes(type="log", dtick=1, row=r, col=c)
        if r == rows:
            fig.update_xaxes(title_text="K (weights perturbed)", row=r, col=c, showticklabels=True)
        if c == 1:
            fig.update_yaxes(title_text=label, row=r, col=c)
    if logy:
        fig.update_yaxes(type="log")
    n_bad = int(agg["nonfinite"].sum())
    seeds = sorted(set(d["seed"]))
    stat = ("mean, 95% CI over seeds, draws and windows" if use_ci else
            "geometric mean ×/÷ geometric std" if logy else "mean ± std")
    title = f"{label} vs K ({perturbation}, {mode}): {stat}, {len(seeds)} seed(s)"
    if n_bad:
        title += f"; {n_bad} non-finite omitted"
    width, height = SINGLE_IN if n == 1 else DOUBLE_IN, 0.8 + 1.9 * rows
    # title on the first line, the legend on the second (both inside the figure), then the panel titles
    print_size(fig, width, height, legend=dict(orientation="h", xref="container", yref="container", x=0.0,
                                               xanchor="left", y=1 - 0.24 / height, yanchor="top", title_text=""),
               margin=dict(l=50, r=8, t=68, b=40))
    fig.update_layout(title_text=title + title_suffix)
    return fig
