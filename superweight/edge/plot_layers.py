"""Where the score sits: layer-wise and module-wise sensitivity from sensitivity_scores.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import PX_PER_IN, SINGLE_IN, print_size


def read_score_summary(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """sensitivity_scores.safetensors -> ({"metric.seedS": {field: array}}, metadata with parsed JSON)."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = dict(f.metadata() or {})
    arrays = load_file(str(path))
    meta = {k: json.loads(v) for k, v in meta.items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        run_key, field = key.rsplit(".", 1)
        out.setdefault(run_key, {})[field] = arr
    return out, meta


def score_mass(summary: dict[str, dict[str, np.ndarray]], meta: dict, by: str = "layer",
               top_n: int = 1000) -> pd.DataFrame:
    """Tidy table: metric, seed, group (layer or module), mass_share, top_share.

    mass_share = Σ param_sum over the group / Σ param_sum over all tensors;
    top_share  = share of the global top-N weights (N = min(top_n, stored entries with a score > 0)) whose tensor
                 is in the group.
    """
    groups = meta["layers"] if by == "layer" else meta["modules"]
    groups = np.asarray([str(g) for g in groups], dtype=object)
    rows = []
    for run_key, d in summary.items():
        metric, seed_s = run_key.rsplit(".", 1)
        seed = int(seed_s.removeprefix("seed"))
        ps = np.asarray(d["param_sum"], dtype=np.float64)
        total = ps.sum()
        n = min(top_n, len(d["top_pid"]))
        if "top_score" in d:  # past a sparse metric's support the stored entries score 0: filler, not top weights
            n = min(n, int((np.asarray(d["top_score"], dtype=np.float64) > 0).sum()))
        top_groups = groups[np.asarray(d["top_pid"][:n], dtype=np.int64)] if n else np.asarray([], dtype=object)
        for g in dict.fromkeys(groups):
            mask = groups == g
            rows.append({"metric": metric, "seed": seed, "group": g,
                         "mass_share": float(ps[mask].sum() / total) if total > 0 else float("nan"),
                         "top_share": float((top_groups == g).sum() / n) if n else float("nan"), "top_n": n})
    return pd.DataFrame(rows)


def _group_order(groups: Iterable[str], by: str) -> list[str]:
    groups = list(dict.fromkeys(groups))
    if by == "layer":
        def key(g):
            try:
                return int(g) if int(g) >= 0 else 10**9  # -1 (outside the blocks) last
            except ValueError:
                return 10**9
        return sorted(groups, key=key)
    return sorted(groups)


def _label(g: str, by: str) -> str:
    if g == "-1":
        return "other"  # embeddings, final norm, head: outside the blocks
    return g if by == "layer" else g.replace("self_attn.", "attn.")


def sensitivity_heatmap(summary, meta, by: str = "layer", top_n: int = 1000) -> go.Figure:
    """Group (layer or module type) × metric heatmaps, one column wide: left the share of the metric's total
    score mass in each group, right the share of its global top-N weights in each group (`score_mass`), both
    in percent and averaged over seeds. Every layer of a 32-layer model gets its own row."""
    t = score_mass(summary, meta, by=by, top_n=top_n)
    order = _group_order(t["group"], by)
    metrics = list(dict.fromkeys(t["metric"]))
    n = int(t["top_n"].max()) if len(t) else 0
    mean = t.groupby(["group", "metric"])[["mass_share", "top_share"]].mean()
    z = {c: np.array([[100 * mean[c].get((g, m), np.nan) for m in metrics] for g in order]) for c in
         ("mass_share", "top_share")}
    labels = [_label(g, by) for g in order]
    seeds = t["seed"].nunique()
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=["score mass (%)", f"top-{n} weights (%)"])
    row_px = 9 if len(order) > 16 else 16
    plot_h = max(len(order) * row_px, 110)
    label_px = 6 * max(len(m) for m in metrics) * 0.8 + 8 if metrics else 20  # rotated metric names
    margin = dict(l=58 if by == "module" else 36, r=8, t=52, b=int(label_px) + 40)
    for j, (col, what) in enumerate((("mass_share", "share of the metric's total score"),
                                     ("top_share", f"share of its global top-{n} weights")), start=1):
        zz = z[col]
        fig.add_trace(go.Heatmap(
            z=zz, x=metrics, y=labels, coloraxis=f"coloraxis{'' if j == 1 else j}", name=what, xgap=1, ygap=1,
            hovertemplate=f"%{{y}} / %{{x}}<br>{what}: %{{z:.2f}}%<extra></extra>"), row=1, col=j)
        cb_y = -(label_px + 6) / plot_h
        fig.update_layout({f"coloraxis{'' if j == 1 else j}": dict(
            colorscale="Viridis", cmin=0, cmax=float(np.nanmax(zz)) if np.isfinite(zz).any() else 1.0,
            colorbar=dict(orientation="h", x=0.25 if j == 1 else 0.77, xanchor="center", y=cb_y, yanchor="top",
                          len=0.42, thickness=7,
                          tickfont=dict(size=8), nticks=4))})
    fig.update_xaxes(tickangle=-90, tickfont=dict(size=8))
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=8 if row_px < 12 else 9), dtick=1)
    fig.update_yaxes(title_text="layer" if by == "layer" else "module", row=1, col=1)
    title = f"Sensitivity by {'layer' if by == 'layer' else 'module type'} ({seeds} seed{'s' if seeds != 1 else ''})"
    print_size(fig, SINGLE_IN, (plot_h + margin["t"] + margin["b"]) / PX_PER_IN, margin=margin)
    fig.update_layout(title_text=title)
    return fig
