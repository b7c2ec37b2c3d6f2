"""Rank stability: Jaccard of Top-K sets, seed × seed per metric and metric × metric."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import TEMPLATE


def _sym_matrix(labels: list, pairs: dict) -> np.ndarray:
    n = len(labels)
    m = np.full((n, n), np.nan)
    for i in range(n):
        m[i, i] = 1.0
    for (a, b), v in pairs.items():
        i, j = labels.index(a), labels.index(b)
        m[i, j] = m[j, i] = v
    return m


def stability_heatmaps(stab: pd.DataFrame, k: int | None = None, mode: str | None = None) -> dict[str, go.Figure]:
    """{'stability_seeds': seed×seed Jaccard per metric, 'stability_metrics': metric×metric Jaccard
    (mean over seeds)} at one K (default: the largest K present). Missing kinds give no figure."""
    figs: dict[str, go.Figure] = {}
    if stab.empty:
        return figs
    mode = mode or str(stab["mode"].iloc[0])
    s = stab[stab["mode"] == mode]
    k = int(k if k is not None else s["k"].max())
    s = s[s["k"] == k]
    seeds_part = s[s["kind"] == "seed"]
    if not seeds_part.empty:
        metrics = list(dict.fromkeys(seeds_part["metric_a"]))
        fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.08)
        for j, metric in enumerate(metrics, start=1):
            p = seeds_part[seeds_part["metric_a"] == metric]
            seeds = sorted(set(p["seed_a"]) | set(p["seed_b"]))
            m = _sym_matrix(seeds, {(int(a), int(b)): v for a, b, v in zip(p["seed_a"], p["seed_b"], p["jaccard"])})
            lab = [f"seed {x}" for x in seeds]
            fig.add_trace(go.Heatmap(z=m, x=lab, y=lab, zmin=0, zmax=1, colorscale="Viridis",
                                     text=np.round(m, 3), texttemplate="%{text}", showscale=j == len(metrics),
                                     colorbar=dict(title="Jaccard")), row=1, col=j)
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(title=f"Top-{k} rank stability across seeds (calibration batches), mode={mode}",
                          template=TEMPLATE, height=420, width=max(480, 360 * len(metrics)))
        figs["stability_seeds"] = fig
    met_part = s[s["kind"] == "metric"]
    if not met_part.empty:
        mean = met_part.groupby(["metric_a", "metric_b"], sort=False)["jaccard"].mean()
        metrics = list(dict.fromkeys(list(met_part["metric_a"]) + list(met_part["metric_b"])))
        m = _sym_matrix(metrics, {(a, b): v for (a, b), v in mean.items()})
        fig = go.Figure(go.Heatmap(z=m, x=metrics, y=metrics, zmin=0, zmax=1, colorscale="Viridis",
                                   text=np.round(m, 3), texttemplate="%{text}", colorbar=dict(title="Jaccard")))
        n_seeds = met_part["seed_a"].nunique()
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(title=f"Top-{k} overlap between metrics (mean over {n_seeds} seed(s)), mode={mode}",
                          template=TEMPLATE, height=460, width=560)
        figs["stability_metrics"] = fig
    return figs

