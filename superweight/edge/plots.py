"""The figures of an experiment (never imported by the science core), built from the files a run writes to
its out_dir, so they can be rebuilt from any set of finished runs, local or downloaded from W&B:

* Δ vs K (plot_effects.py): per metric, each selection's effect against K with its interval;
* layer / module sensitivity (plot_layers.py): where the score mass and the top weights sit;
* rank stability (plot_stability.py): Jaccard of Top-K sets across seeds and metrics;
* score distribution (plot_scores.py): the rank-score curve of every weight, the top few named;
* metric comparison (plot_comparison.py): each metric's gap to each control against K.

Writing them (HTML, JSON, PNG, SVG) is export.py; colours and labels are style.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..core.comparison import metric_comparison
from ..core.stability import jaccard_from_rankings  # noqa: F401 (figures.py uses it)
from ..core.summary import aggregate_over_seeds  # noqa: F401 (figures.py uses it)
from .export import FORMATS, chrome_available, figure_json, save_figures  # noqa: F401 (the public API)
from .plot_comparison import comparison_figure
from .plot_effects import delta_vs_k
from .plot_layers import read_score_summary, score_mass, sensitivity_heatmap  # noqa: F401
from .plot_scores import score_distribution
from .plot_stability import stability_heatmaps, supported_stability
from .style import SELECTION_COLORS, SELECTION_LABELS, VALUES  # noqa: F401


def figure_set(results: pd.DataFrame | None, *, effects: pd.DataFrame | None = None,
               scores: tuple | None = None, rankings: pd.DataFrame | None = None,
               stability: pd.DataFrame | None = None, comparison: pd.DataFrame | None = None,
               k: int | None = None, values=tuple(VALUES), title_suffix: str = "") -> dict[str, go.Figure]:
    """Every figure of one result set (a run, or the pooled runs of one variant), by file name:
    `<value>_vs_k[__<perturbation>__<mode>]`, `metric_comparison[...]`, `layer_sensitivity`,
    `module_sensitivity`, `score_distribution`, `stability_seeds`, `stability_metrics`.

    Stability comes from rankings.csv with each metric at a K it supports (plot_stability); without rankings,
    from a stability table. `k` is the K of the stability heatmaps and of the score distribution's threshold
    (default: the largest K of the results)."""
    figs: dict[str, go.Figure] = {}
    has = results is not None and not results.empty
    k_max = int(k if k is not None else (results["k"].max() if has else 0)) or None
    if has:
        combos = list(results[["perturbation", "mode"]].drop_duplicates().itertuples(index=False))
        for pert, mode in combos:
            suffix = "" if len(combos) == 1 else f"__{pert}__{mode}"
            for value in values:
                if value in results.columns:
                    figs[f"{value}_vs_k{suffix}"] = delta_vs_k(results, value, pert, mode, effects=effects,
                                                               title_suffix=title_suffix)
            if comparison is not None and not comparison.empty:
                c = comparison[(comparison["perturbation"] == pert) & (comparison["mode"] == mode)]
                if not c.empty:
                    figs[f"metric_comparison{suffix}"] = comparison_figure(c, pert, mode)
    if scores is not None and scores[0]:
        summary, meta = scores
        figs["layer_sensitivity"] = sensitivity_heatmap(summary, meta, by="layer")
        figs["module_sensitivity"] = sensitivity_heatmap(summary, meta, by="module")
        figs["score_distribution"] = score_distribution(summary, meta, k=k_max)
    stab = supported_stability(rankings, k_max) if rankings is not None and not rankings.empty and k_max else None
    if stab is not None and not stab.empty:
        figs.update(stability_heatmaps(stab, k=k_max, mode="global"))
    elif stability is not None and not stability.empty:
        figs.update(stability_heatmaps(stability, k=k_max))
    return figs


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def run_figures(out_dir: str | Path, k: int | None = None) -> dict[str, go.Figure]:
    """Figures of one finished run, read from its out_dir files (the same set `superweight figures` draws)."""
    out = Path(out_dir)
    scores = out / "sensitivity_scores.safetensors"
    eff, gp = _csv(out / "effects.csv"), _csv(out / "gaps.csv")
    comparison = _csv(out / "metric_comparison.csv")
    if comparison is None and gp is not None:
        comparison = metric_comparison(gp, eff)
    return figure_set(_csv(out / "results.csv"), effects=eff, scores=read_score_summary(scores) if scores.exists() else None,
                      rankings=_csv(out / "rankings.csv"), stability=_csv(out / "stability.csv"),
                      comparison=comparison, k=k)
