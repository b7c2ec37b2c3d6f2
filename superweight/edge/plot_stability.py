"""Rank stability: Jaccard J(A, B) = |A∩B| / |A∪B| of Top-K sets, seed × seed per metric and metric × metric.

Each metric is shown at a K it supports: the plotted K (default the largest of the K grid) or, for a metric
that ranks fewer weights than that (a sparse metric's support, or fewer stored rows), all the weights it
ranks, labelled with that K; a pair of metrics is compared at the smaller of their two Ks. No metric is
dropped for having a small support.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.stability import STABILITY_COLUMNS, jaccard_from_rankings
from .style import DOUBLE_IN, SINGLE_IN, print_size


def _top_rows(rankings: pd.DataFrame, mode: str) -> pd.DataFrame:
    """The Top-K rows of one mode and of the first candidate set (as stability.csv compares)."""
    r = rankings[rankings["mode"] == mode]
    if "selection" in r.columns:
        r = r[r["selection"] == "top_k"]
    if "k" in r.columns:
        r = r[r["k"].isna()]  # the nested ranking, not a set drawn for one K
    if "candidates" in r.columns and len(r):
        r = r[r["candidates"] == r["candidates"].iloc[0]]
    return r


def supported_ks(rankings: pd.DataFrame, k: int, mode: str = "global") -> dict[str, int]:
    """Per metric the K its stability is shown at: min(k, the fewest Top-K rows stored for any of its seeds)."""
    stored = _top_rows(rankings, mode).groupby(["metric", "seed"], sort=False).size()
    out: dict[str, int] = {}
    for (metric, _seed), n in stored.items():
        out[metric] = min(out.get(metric, k), int(n), k)
    return out


def supported_stability(rankings: pd.DataFrame, k: int, mode: str = "global") -> pd.DataFrame:
    """stability.csv-like rows from rankings.csv with each metric at its supported K (`supported_ks`): seed
    pairs of metric m at K_m, metric pairs (a, b) at min(K_a, K_b)."""
    ks = supported_ks(rankings, k, mode)
    top = _top_rows(rankings, mode)
    parts = []
    metrics = list(ks)
    for i, a in enumerate(metrics):
        mine = jaccard_from_rankings(top[top["metric"] == a], ks[a], mode)
        parts.append(mine[mine["kind"] == "seed"])
        for b in metrics[i + 1:]:
            both = jaccard_from_rankings(top[top["metric"].isin([a, b])], min(ks[a], ks[b]), mode)
            parts.append(both[both["kind"] == "metric"])
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=STABILITY_COLUMNS)


def _sym_matrix(labels: list, pairs: dict) -> np.ndarray:
    n = len(labels)
    m = np.full((n, n), np.nan)
    for i in range(n):
        m[i, i] = 1.0
    for (a, b), v in pairs.items():
        i, j = labels.index(a), labels.index(b)
        m[i, j] = m[j, i] = v
    return m


def _largest_k(s: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows at the largest K present for each group of `keys`."""
    k_max = s.groupby(keys)["k"].transform("max")
    return s[s["k"] == k_max]


def stability_heatmaps(stab: pd.DataFrame, k: int | None = None, mode: str | None = None) -> dict[str, go.Figure]:
    """{'stability_seeds': seed×seed Jaccard per metric, 'stability_metrics': metric×metric Jaccard (mean over
    seeds)}. Each metric (and each pair) is drawn at the largest K it has in `stab` not above `k` (default:
    the largest K present); a metric at a smaller K than the others is labelled with its K. Missing kinds
    give no figure."""
    figs: dict[str, go.Figure] = {}
    if stab.empty:
        return figs
    mode = mode or str(stab["mode"].iloc[0])
    s = stab[stab["mode"] == mode]
    if k is not None:
        s = s[s["k"] <= int(k)]
    if s.empty:
        return figs
    k_all = int(s["k"].max())
    seeds_part = _largest_k(s[s["kind"] == "seed"], ["metric_a"])
    if not seeds_part.empty:
        metrics = list(dict.fromkeys(seeds_part["metric_a"]))
        kof = {m: int(seeds_part[seeds_part["metric_a"] == m]["k"].iloc[0]) for m in metrics}
        titles = [m if kof[m] == k_all else f"{m} (K={kof[m]})" for m in metrics]
        cols = min(len(metrics), 6)
        rows = -(-len(metrics) // cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.05,
                            vertical_spacing=0.2 / rows)
        for j, metric in enumerate(metrics):
            p = seeds_part[seeds_part["metric_a"] == metric]
            seeds = sorted(set(p["seed_a"]) | set(p["seed_b"]))
            m = _sym_matrix(seeds, {(int(a), int(b)): v for a, b, v in zip(p["seed_a"], p["seed_b"], p["jaccard"])})
            lab = [f"s{x}" for x in seeds]
            fig.add_trace(go.Heatmap(z=m, x=lab, y=lab, coloraxis="coloraxis", name=f"{metric}, K={kof[metric]}",
                                     text=np.round(m, 2), texttemplate="%{text}" if len(seeds) <= 4 else None,
                                     textfont=dict(size=8), xgap=1, ygap=1,
                                     hovertemplate=f"{metric}, K={kof[metric]}<br>%{{y}} vs %{{x}}: J=%{{z:.3f}}"
                                                   "<extra></extra>"),
                          row=j // cols + 1, col=j % cols + 1)
        fig.update_yaxes(autorange="reversed")
        for j in range(len(metrics)):
            if j % cols:  # the seed labels once per row
                fig.update_yaxes(showticklabels=False, row=j // cols + 1, col=j % cols + 1)
        fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1,
                                         colorbar=dict(title=dict(text="Jaccard", side="right"), thickness=8,
                                                       len=0.9, x=1.0, xanchor="left", tickfont=dict(size=8))))
        width = SINGLE_IN if cols <= 3 else DOUBLE_IN
        panel_in = (width - 0.9) / cols
        print_size(fig, width, 0.75 + rows * (panel_in + 0.25), margin=dict(l=28, r=48, t=52, b=20))
        fig.update_layout(title_text=f"Top-{k_all} stability across seeds ({mode})")
        figs["stability_seeds"] = fig
    met_part = _largest_k(s[s["kind"] == "metric"], ["metric_a", "metric_b"])
    if not met_part.empty:
        mean = met_part.groupby(["metric_a", "metric_b"], sort=False)["jaccard"].mean()
        kpair = met_part.groupby(["metric_a", "metric_b"], sort=False)["k"].first()
        metrics = list(dict.fromkeys(list(met_part["metric_a"]) + list(met_part["metric_b"])))
        m = _sym_matrix(metrics, {(a, b): v for (a, b), v in mean.items()})
        kmat = _sym_matrix(metrics, {(a, b): v for (a, b), v in kpair.items()})
        # a metric's own K: the largest K of any row it takes part in (its seed pairs, or its metric pairs)
        kown = {x: int(s[(s["metric_a"] == x) | (s["metric_b"] == x)]["k"].max()) for x in metrics}
        lab = [x if kown[x] == k_all else f"{x} (K={kown[x]})" for x in metrics]
        text = np.where(np.isnan(m), "", np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(m)))
        fig = go.Figure(go.Heatmap(z=m, x=lab, y=lab, zmin=0, zmax=1, colorscale="Viridis", name="Jaccard",
                                   text=text, texttemplate="%{text}", textfont=dict(size=8), xgap=1, ygap=1,
                                   customdata=kmat, hovertemplate="%{y} vs %{x}: J=%{z:.3f} at K=%{customdata}"
                                                                   "<extra></extra>",
                                   colorbar=dict(title=dict(text="Jaccard", side="right"), thickness=8,
                                                 tickfont=dict(size=8))))
        n_seeds = met_part["seed_a"].nunique()
        fig.update_yaxes(autorange="reversed")
        fig.update_xaxes(tickangle=-45)
        print_size(fig, SINGLE_IN, 3.1, margin=dict(l=90, r=8, t=30, b=80))
        fig.update_layout(title_text=f"Top-{k_all} overlap between metrics ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
        figs["stability_metrics"] = fig
    return figs
