"""What a super weight looks like: the distribution of one metric's scores over every weight, as a rank-score
curve on log-log axes (score of the r-th largest weight against r), from the per-(metric, seed) summaries in
sensitivity_scores.safetensors, with no pass over the scores:

* ranks 1..N_top: the stored global top entries (`top_score`, exact);
* past them, from the log-scale histogram of all scores (`hist_log10_edges` e_0 < ... < e_B, `hist_count`
  c_0..c_{B-1}, bin j = [e_j, e_{j+1})): at each edge e_i, rank(10^{e_i}) = Σ_{j ≥ i} c_j, the number of
  scores ≥ 10^{e_i}. Scores of exactly 0 (`n_zero`) have no place on a log axis and are counted in the text.

A handful of weights standing orders of magnitude above the rest shows as the first few points far above the
curve's continuation. The largest K of the run is marked (its score is the Top-K threshold), and the top few
weights are named (layer, module, [row, col]).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import DOUBLE_IN, SINGLE_IN, metric_color, print_size


def rank_score_curve(entry: dict[str, np.ndarray]) -> pd.DataFrame:
    """Points (rank, score, source) of one summary entry: 'top' for the stored top entries, 'hist' for the
    histogram's continuation past them (ranks larger than the stored ones). Non-positive scores are left out."""
    top = np.asarray(entry.get("top_score", []), dtype=np.float64)
    top = top[np.isfinite(top) & (top > 0)]
    pts = [pd.DataFrame({"rank": np.arange(1, len(top) + 1, dtype=np.int64), "score": top, "source": "top"})]
    if "hist_count" in entry and "hist_log10_edges" in entry:
        edges = np.asarray(entry["hist_log10_edges"], dtype=np.float64)
        count = np.asarray(entry["hist_count"], dtype=np.int64)
        n_ge = np.cumsum(count[::-1])[::-1]  # n_ge[i] = Σ_{j >= i} count[j]: scores >= 10**edges[i]
        keep = n_ge > len(top)
        pts.append(pd.DataFrame({"rank": n_ge[keep], "score": 10.0 ** edges[:-1][keep], "source": "hist"}))
    out = pd.concat(pts, ignore_index=True)
    return out.sort_values("rank", kind="stable").reset_index(drop=True)


def weight_name(meta: dict, pid: int, flat: int) -> str:
    """Short name of one weight: 'L11 down_proj[507, 1229]' (layer, module, index in the tensor)."""
    names = meta.get("param_names") or []
    layers, modules, shapes = meta.get("layers") or [], meta.get("modules") or [], meta.get("param_shapes") or []
    module = str(modules[pid]).split(".")[-1] if pid < len(modules) else (names[pid] if pid < len(names) else f"#{pid}")
    layer = int(layers[pid]) if pid < len(layers) else -1
    idx = (", ".join(str(int(i)) for i in np.unravel_index(int(flat), tuple(shapes[pid])))
           if pid < len(shapes) and shapes[pid] else str(int(flat)))
    return f"{'' if layer < 0 else f'L{layer} '}{module}[{idx}]"


def _first_seed(summary: dict) -> dict[str, tuple[int, dict]]:
    """metric -> (its smallest seed, that seed's entry)."""
    out: dict[str, tuple[int, dict]] = {}
    for key, entry in summary.items():
        metric, seed_s = key.rsplit(".", 1)
        seed = int(seed_s.removeprefix("seed"))
        if metric not in out or seed < out[metric][0]:
            out[metric] = (seed, entry)
    return out


def score_distribution(summary: dict, meta: dict, k: int | None = None, n_named: int = 3) -> go.Figure:
    """One log-log rank-score panel per metric (its first seed): the stored top entries (solid), the
    histogram's continuation (dotted), the Top-K threshold at rank K (default: the largest K stored), and the
    top `n_named` weights marked 1..n and named in the panel."""
    per = _first_seed(summary)
    metrics = list(per)
    n = max(1, len(metrics))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{m} (seed {per[m][0]})" for m in metrics],
                        horizontal_spacing=0.09, vertical_spacing=0.16 if rows > 1 else 0.1)
    shown = set()
    for j, metric in enumerate(metrics):
        r, c = j // cols + 1, j % cols + 1
        seed, entry = per[metric]
        curve = rank_score_curve(entry)
        color = metric_color(metric)
        for source, label, dash in (("top", "stored top scores (exact)", "solid"),
                                    ("hist", "all weights (histogram)", "dot")):
            part = curve[curve["source"] == source]
            if source == "hist" and len(part):
                last_top = curve[curve["source"] == "top"].tail(1)  # join the two pieces
                part = pd.concat([last_top, part])
            if part.empty:
                continue
            if source not in shown:  # one neutral legend entry per line style (each metric has its own colour)
                fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label, legendgroup=source,
                                         line=dict(color="#444", dash=dash, width=1.5)), row=r, col=c)
                shown.add(source)
            fig.add_trace(go.Scatter(x=part["rank"], y=part["score"], mode="lines", name=f"{metric}: {label}",
                                     legendgroup=source, showlegend=False,
                                     line=dict(color=color, dash=dash, width=1.5),
                                     hovertemplate=f"{metric}<br>rank %{{x:,}}<br>score %{{y:.3g}}<extra></extra>"),
                          row=r, col=c)
        top = curve[curve["source"] == "top"]
        pid, flat = np.asarray(entry.get("top_pid", [])), np.asarray(entry.get("top_flat", []))
        named = min(n_named, len(top), len(pid))
        if named:
            fig.add_trace(go.Scatter(
                x=top["rank"][:named], y=top["score"][:named], mode="markers+text", name="top weights",
                legendgroup="named", showlegend="named" not in shown, text=[str(i + 1) for i in range(named)],
                textposition="middle right", textfont=dict(size=8), marker=dict(color="black", size=5),
                hovertext=[weight_name(meta, int(pid[i]), int(flat[i])) for i in range(named)],
                hovertemplate="%{hovertext}<br>score %{y:.3g}<extra></extra>"), row=r, col=c)
            shown.add("named")
        kk = min(k, len(top)) if k else len(top)
        lines = [f"{i + 1} {weight_name(meta, int(pid[i]), int(flat[i]))}" for i in range(named)]
        if kk and len(top):
            thr = float(top["score"].iloc[kk - 1])
            fig.add_trace(go.Scatter(x=[kk], y=[thr], mode="markers", name="Top-K threshold",
                                     legendgroup="thr", showlegend="thr" not in shown,
                                     marker=dict(symbol="line-ew-open", size=14, color="#d62728", line=dict(width=2)),
                                     hovertemplate=f"Top-{kk} threshold: score %{{y:.3g}}<extra></extra>"),
                          row=r, col=c)
            shown.add("thr")
            fig.add_vline(x=kk, line=dict(color="#d62728", dash="dash", width=1), row=r, col=c)
            lines.append(f"K={kk}: s(1)/s(K) = {float(top['score'].iloc[0]) / thr:.3g}")
        if "hist_count" not in entry and len(top):
            lines.append(f"ranks > {len(top):,} not stored")
        n_zero = int(np.asarray(entry.get("n_zero", 0)))
        if n_zero:
            lines.append(f"{n_zero:,} scores = 0")
        if lines:
            xref = "x domain" if j == 0 else f"x{j + 1} domain"
            yref = "y domain" if j == 0 else f"y{j + 1} domain"
            # bottom left: below a falling curve, where it never draws
            fig.add_annotation(text="<br>".join(lines), xref=xref, yref=yref, x=0.02, y=0.02, xanchor="left",
                               yanchor="bottom", showarrow=False, align="left", font=dict(size=8),
                               bgcolor="rgba(255,255,255,0.75)")
        fig.update_xaxes(type="log", dtick=1 if len(curve) and curve["rank"].max() < 1e5 else 2, row=r, col=c,
                         exponentformat="power")
        fig.update_yaxes(type="log", exponentformat="power", row=r, col=c)
        if r == rows:
            fig.update_xaxes(title_text="rank", row=r, col=c)
        if c == 1:
            fig.update_yaxes(title_text="score", row=r, col=c)
    width = SINGLE_IN if cols == 1 else DOUBLE_IN
    height = 0.8 + 2.0 * rows
    print_size(fig, width, height, legend=dict(orientation="h", xref="container", yref="container", x=0.0,
                                               xanchor="left", y=1 - 0.24 / height, yanchor="top"),
               margin=dict(l=50, r=10, t=68, b=40))
    fig.update_layout(title_text="Score distribution: the r-th largest score against r")
    return fig
