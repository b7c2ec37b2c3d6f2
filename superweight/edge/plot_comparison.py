"""Which metric finds them? The Top-K minus control ΔNLL gap of every metric against K, one panel per control,
with the 95% intervals of the gaps table; metrics in the rank order of metric_comparison.csv, each named with
the K at which its Top-K doubles perplexity."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import DOUBLE_IN, SELECTION_LABELS, SINGLE_IN, metric_color, print_size


def comparison_figure(table: pd.DataFrame, perturbation: str | None = None, mode: str | None = None) -> go.Figure:
    """Panels per control, a line per metric: gap (Top-K minus control, nats/token) against K (log), error
    bars = the gap's 95% interval; the legend lists metrics by rank with the K that doubles PPL."""
    perturbation = perturbation or str(table["perturbation"].iloc[0])
    mode = mode or str(table["mode"].iloc[0])
    t = table[(table["perturbation"] == perturbation) & (table["mode"] == mode)]
    controls = [c for c in SELECTION_LABELS if c in set(t["control"])] + sorted(set(t["control"]) - set(SELECTION_LABELS))
    fig = make_subplots(rows=1, cols=max(1, len(controls)), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[f"vs {SELECTION_LABELS.get(c, c)}" for c in controls])
    ranked = t.drop_duplicates("metric").sort_values("rank")
    for _, row in ranked.iterrows():
        metric, kd = row["metric"], row["k_double_ppl"]
        name = f"{int(row['rank'])}. {metric} ({'PPL×2 at K=' + str(int(kd)) if not pd.isna(kd) else 'PPL never ×2'})"
        for j, control in enumerate(controls, start=1):
            a = t[(t["metric"] == metric) & (t["control"] == control)].sort_values("k")
            if a.empty:
                continue
            fig.add_trace(go.Scatter(
                x=a["k"], y=a["gap_nll"], mode="lines+markers", name=name, legendgroup=metric,
                showlegend=j == 1, line=dict(color=metric_color(metric), width=1.5), marker=dict(size=5),
                error_y=dict(type="data", symmetric=False, array=(a["gap_nll_hi"] - a["gap_nll"]).clip(lower=0),
                             arrayminus=(a["gap_nll"] - a["gap_nll_lo"]).clip(lower=0), thickness=1, width=2),
                hovertemplate=f"{metric} vs {control}<br>K=%{{x}}<br>gap %{{y:+.3f}}<extra></extra>"), row=1, col=j)
        for j in range(1, len(controls) + 1):
            fig.add_hline(y=0, line=dict(color="#888", width=0.8), row=1, col=j)
    fig.update_xaxes(type="log", dtick=1, title_text="K")
    fig.update_yaxes(title_text="ΔNLL gap, Top-K − control", row=1, col=1)
    width = SINGLE_IN if len(controls) == 1 else DOUBLE_IN
    n_metrics = len(ranked)
    legend_rows = -(-n_metrics // 3)
    height = 2.4 + 0.16 * legend_rows
    print_size(fig, width, height, legend=dict(orientation="h", xref="container", yref="container", x=0.0,
                                               xanchor="left", y=1 - 0.24 / height, yanchor="top", entrywidth=0.33,
                                               entrywidthmode="fraction"),
               margin=dict(l=50, r=8, t=52 + 16 * legend_rows, b=40))
    fig.update_layout(title_text=f"Which metric finds them? Gap to each control, 95% CI ({perturbation}, {mode})")
    return fig
