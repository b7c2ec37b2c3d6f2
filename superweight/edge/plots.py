"""The figures of an experiment (never imported by the science core), built from the files a run writes to
its out_dir, so they can be rebuilt from any set of finished runs, local or downloaded from W&B:

* Δ vs K (plot_effects.py): per metric, each selection's effect against K with its interval;
* layer / module sensitivity (plot_layers.py): where the score mass and the top weights sit;
* rank stability (plot_stability.py): Jaccard of Top-K sets across seeds and metrics.

Writing them (HTML, JSON, PNG, SVG) is export.py; colours and labels are style.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..core.results import aggregate_over_seeds, jaccard_from_rankings  # noqa: F401 (figures.py uses them)
from .export import FORMATS, chrome_available, figure_json, save_figures  # noqa: F401 (the public API)
from .plot_effects import delta_vs_k
from .plot_layers import layer_histograms, read_score_summary, score_mass  # noqa: F401
from .plot_stability import stability_heatmaps
from .style import SELECTION_COLORS, SELECTION_LABELS, VALUES  # noqa: F401


# ---------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------
def figures_from_tables(results: pd.DataFrame, stability: pd.DataFrame | None = None,
                        score_summary: tuple | None = None, k: int | None = None,
                        effects: pd.DataFrame | None = None) -> dict[str, go.Figure]:
    """All figures for one result table (one run, or several runs concatenated)."""
    figs: dict[str, go.Figure] = {}
    if results is not None and not results.empty:
        combos = results[["perturbation", "mode"]].drop_duplicates().itertuples(index=False)
        for pert, mode in combos:
            suffix = "" if results[["perturbation", "mode"]].drop_duplicates().shape[0] == 1 else f"__{pert}__{mode}"
            for value in VALUES:
                if value in results.columns:
                    figs[f"{value}_vs_k{suffix}"] = delta_vs_k(results, value, pert, mode, effects=effects)
    if score_summary is not None:
        summary, meta = score_summary
        if summary:
            figs["layer_sensitivity"] = layer_histograms(summary, meta, by="layer")
            figs["module_sensitivity"] = layer_histograms(summary, meta, by="module")
    if stability is not None and not stability.empty:
        figs.update(stability_heatmaps(stability, k=k))
    return figs


def run_figures(out_dir: str | Path, k: int | None = None) -> dict[str, go.Figure]:
    """Figures of one finished run, read from its out_dir files."""
    out = Path(out_dir)
    results = pd.read_csv(out / "results.csv") if (out / "results.csv").exists() else None
    stab = pd.read_csv(out / "stability.csv") if (out / "stability.csv").exists() else None
    scores = out / "sensitivity_scores.safetensors"
    summary = read_score_summary(scores) if scores.exists() else None
    eff = pd.read_csv(out / "effects.csv") if (out / "effects.csv").exists() else None
    return figures_from_tables(results, stab, summary, k=k, effects=eff)

