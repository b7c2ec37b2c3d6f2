"""The look shared by every figure: print sizes, fonts, selection colours, value labels.

Every figure is laid out at the size it is printed: a single journal column (3.5 in) or the full text width
(7 in), at 96 CSS px per inch (the unit of plotly's layout and of the PDF/SVG kaleido writes), so a PDF of a
single-column figure is 3.5 in wide and a 9 px font prints at 6.75 pt. PNGs are written at 300 dpi
(scale 300/96). The same figure object is the HTML for the screen (where it is narrower than any page) and
the PNG/SVG/PDF for the paper; its legend sits inside the figure.
"""

from __future__ import annotations

import plotly.graph_objects as go

PX_PER_IN = 96  # CSS px per inch: plotly's layout unit, and Chrome's when kaleido prints a PDF
SINGLE_IN = 3.5  # one journal column
DOUBLE_IN = 7.0  # the full text width
PNG_DPI = 300
FONT_PX = 10  # 7.5 pt at print size
TICK_PX = 9  # 6.75 pt
TITLE_PX = 11  # 8.25 pt
FONT_FAMILY = "Arial, Helvetica, sans-serif"

SELECTION_COLORS = {"top_k": "#d62728", "random_k": "#7f7f7f", "matched_k": "#2ca02c", "bottom_k": "#1f77b4"}
SELECTION_DASH = {"top_k": "solid", "random_k": "dash", "matched_k": "dashdot", "bottom_k": "dot"}
SELECTION_MARKERS = {"top_k": "circle", "random_k": "square", "matched_k": "triangle-up", "bottom_k": "diamond"}
SELECTION_LABELS = {"top_k": "Top-K", "random_k": "Random-K", "matched_k": "|w|-matched-K", "bottom_k": "Bottom-K"}
# metrics: a colour-blind-safe cycle (Okabe-Ito without black), so a metric keeps its colour in every figure
METRIC_PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999"]
VALUES = {
    "delta_ppl": ("ΔPPL", False),
    "delta_nll": ("ΔNLL (nats/token)", False),
    "delta_acc": ("Δ token accuracy", False),
    "ppl_ratio": ("PPL / baseline PPL", True),
}
TEMPLATE = "simple_white"


def px(inches: float) -> int:
    """Layout pixels of a length in inches."""
    return int(round(inches * PX_PER_IN))


def print_size(fig: go.Figure, width_in: float, height_in: float, *, legend: dict | None = None,
               margin: dict | None = None) -> go.Figure:
    """Lay `fig` out at its print size (width_in × height_in inches) with print fonts; the legend, when given,
    is placed inside the figure (paper coordinates within [0, 1] or in the top margin). The size is kept in
    layout.meta['print'] for the export and the reports."""
    fig.update_layout(
        template=TEMPLATE, width=px(width_in), height=px(height_in), autosize=False,
        font=dict(family=FONT_FAMILY, size=FONT_PX, color="#222"),
        title=dict(font=dict(size=TITLE_PX), x=0.0, xanchor="left", y=0.99, yanchor="top", pad=dict(l=4, t=2)),
        margin=margin or dict(l=46, r=8, t=48, b=38),
        legend=dict(font=dict(size=TICK_PX), bgcolor="rgba(255,255,255,0.8)", tracegroupgap=2,
                    itemwidth=30, **(legend or {})),
        hoverlabel=dict(font=dict(size=FONT_PX)),
    )
    fig.update_annotations(font_size=FONT_PX)  # subplot titles
    fig.update_xaxes(tickfont=dict(size=TICK_PX), title_font=dict(size=FONT_PX), title_standoff=4)
    fig.update_yaxes(tickfont=dict(size=TICK_PX), title_font=dict(size=FONT_PX), title_standoff=4)
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    meta["print"] = {"width_in": width_in, "height_in": height_in}
    fig.layout.meta = meta
    return fig


def column_width(n_panels: int, per_panel_in: float = 1.6) -> float:
    """Single column when the panels fit in 3.5 in at per_panel_in each, else the full text width."""
    return SINGLE_IN if n_panels * per_panel_in <= SINGLE_IN else DOUBLE_IN


KNOWN_METRICS = ("magnitude", "grad_x_weight", "grad_squared", "act_mag", "act_outlier", "hutchinson_diag")


def metric_color(metric: str) -> str:
    """The colour of a metric, the same in every figure (the shipped metrics first, others by name hash)."""
    if metric in KNOWN_METRICS:
        return METRIC_PALETTE[KNOWN_METRICS.index(metric)]
    return METRIC_PALETTE[len(KNOWN_METRICS) + sum(map(ord, metric)) % (len(METRIC_PALETTE) - len(KNOWN_METRICS))]
