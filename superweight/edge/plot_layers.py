"""Where the score sits: layer-wise and module-wise sensitivity from sensitivity_scores.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import TEMPLATE


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
    top_share  = share of the global top-N weights (N = min(top_n, stored)) whose tensor is in the group.
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


def layer_histograms(summary, meta, by: str = "layer", top_n: int = 1000) -> go.Figure:
    """Grouped bars per metric: score-mass share (top row) and top-N share (bottom row) per layer/module."""
    t = score_mass(summary, meta, by=by, top_n=top_n)
    order = _group_order(t["group"], by)
    n = int(t["top_n"].max()) if len(t) else 0
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14,
                        subplot_titles=["share of total score mass (mean over seeds)",
                                        f"share of the global top-{n} weights (mean over seeds)"])
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880"]
    for i, metric in enumerate(dict.fromkeys(t["metric"])):
        m = t[t["metric"] == metric].groupby("group")[["mass_share", "top_share"]].mean().reindex(order)
        color = palette[i % len(palette)]
        x = [f"L{g}" if by == "layer" and g != "-1" else ("other" if g == "-1" else g) for g in order]
        fig.add_trace(go.Bar(x=x, y=m["mass_share"], name=metric, marker_color=color, legendgroup=metric),
                      row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=m["top_share"], name=metric, marker_color=color, legendgroup=metric,
                             showlegend=False), row=2, col=1)
    fig.update_yaxes(title_text="share", row=1, col=1)
    fig.update_yaxes(title_text="share", row=2, col=1)
    fig.update_xaxes(title_text="layer" if by == "layer" else "module type", row=2, col=1)
    fig.update_layout(barmode="group", template=TEMPLATE, height=620, width=max(640, 26 * len(order) * max(1, t["metric"].nunique())),
                      title=f"Sensitivity by {'layer' if by == 'layer' else 'module type'}", legend_title_text="metric")
    return fig

