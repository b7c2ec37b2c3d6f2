"""The look shared by every figure: selection colours, value labels, the plotly template."""

from __future__ import annotations

SELECTION_COLORS = {"top_k": "#d62728", "random_k": "#7f7f7f", "matched_k": "#2ca02c", "bottom_k": "#1f77b4"}
SELECTION_DASH = {"top_k": "solid", "random_k": "dash", "matched_k": "dashdot", "bottom_k": "dot"}
SELECTION_MARKERS = {"top_k": "circle", "random_k": "square", "matched_k": "triangle-up", "bottom_k": "diamond"}
SELECTION_LABELS = {"top_k": "Top-K", "random_k": "Random-K", "matched_k": "|w|-matched-K", "bottom_k": "Bottom-K"}
VALUES = {
    "delta_ppl": ("ΔPPL", False),
    "delta_nll": ("ΔNLL (nats/token)", False),
    "delta_acc": ("Δ token accuracy", False),
    "ppl_ratio": ("PPL / baseline PPL", True),
}
TEMPLATE = "plotly_white"
