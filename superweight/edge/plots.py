"""Plotly figures of an experiment (never imported by the science core).

Three kinds of figure, each built from the files a run writes to its out_dir (so they can be rebuilt
from any set of finished runs, local or downloaded from W&B):

* **Δ vs K** (`delta_vs_k`): for each metric a panel, for each selection (Top-K / Random-K / Bottom-K)
  a line of the mean over seeds of Δ = value(perturbed) − value(baseline) against K on a log axis, with
  error bars = sample standard deviation over seeds (n−1 denominator; none for a single seed).
  Values: ΔPPL, ΔNLL, Δaccuracy and the PPL ratio r = PPL_perturbed / PPL_baseline on a log y axis,
  where the line is the geometric mean exp(mean log r) and the bars span exp(mean log r ± std log r). Rows whose
  evaluation is non-finite (e.g. a bit flip that produced Inf/NaN weights) are left out of the mean and
  counted in the title.
* **Layer-wise sensitivity** (`layer_histograms`): from `sensitivity_scores.safetensors`. The score
  mass of layer l is  M_l = Σ_{tensors t in layer l} Σ_i s_{t,i}  (the stored `param_sum` of every
  tensor), shown as the share M_l / Σ_l M_l so metrics with different units are comparable, averaged
  over seeds; the same grouped by module type (q_proj, ..., down_proj). A second row shows where the
  N highest-scoring weights sit: the share of the global top-N (N = min(1000, stored)) per layer/module.
* **Rank stability** (`stability_heatmaps`): Jaccard J(A,B) = |A∩B| / |A∪B| of Top-K sets, seed × seed
  for each metric and metric × metric averaged over seeds, at one K (default: the largest K).

`save_figures` writes each figure as HTML (plotly.js stored once per directory, so the HTML works
offline), Plotly JSON (read back by tracking for interactive W&B charts) and, through kaleido and a
headless Chrome/Chromium, PNG and SVG. Static export needs a Chrome: on Debian `apt-get install
chromium`; set BROWSER_PATH to use another one. Without one, PNG/SVG are skipped with a warning and
HTML/JSON are still written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..files import atomic_write, atomic_write_text
from ..core.results import aggregate_over_seeds, jaccard_from_rankings  # noqa: F401 (figures.py uses them)

FORMATS = ("html", "json", "png", "svg")
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


# ---------------------------------------------------------------------------------------------------
# Δ vs K
# ---------------------------------------------------------------------------------------------------
def delta_vs_k(df: pd.DataFrame, value: str = "delta_ppl", perturbation: str | None = None,
               mode: str | None = None, title_suffix: str = "", effects: pd.DataFrame | None = None) -> go.Figure:
    """One panel per metric; one line per selection; x = K (log). With `effects` (results.effects: 95% CIs
    over seeds, control draws and evaluation windows) for ΔNLL / ΔPPL / PPL ratio, the line is its mean and
    the error bars its CI; otherwise mean over seeds ± std."""
    if value not in VALUES:
        raise ValueError(f"unknown value '{value}'; valid: {', '.join(VALUES)}")
    label, logy = VALUES[value]
    d = df
    perturbation = perturbation or str(d["perturbation"].iloc[0])
    mode = mode or str(d["mode"].iloc[0])
    d = d[(d["perturbation"] == perturbation) & (d["mode"] == mode)]
    if logy:  # geometric mean and ×/÷ geometric std over seeds: symmetric on the log axis, never below 0
        d = d.copy()
        v = pd.to_numeric(d[value], errors="coerce").to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            d[value] = np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)
    agg = aggregate_over_seeds(d, value)
    use_ci = effects is not None and not effects.empty and value in ("delta_nll", "delta_ppl", "ppl_ratio")
    if use_ci:
        e = effects[(effects["perturbation"] == perturbation) & (effects["mode"] == mode)]
        agg = agg.merge(e[["metric", "selection", "k", value, f"{value}_lo", f"{value}_hi"]],
                        on=["metric", "selection", "k"], how="left")
        agg["mean"] = agg[value].where(agg[value].notna(), np.exp(agg["mean"]) if logy else agg["mean"])
        agg["upper"] = (agg[f"{value}_hi"] - agg["mean"]).clip(lower=0)
        agg["lower"] = (agg["mean"] - agg[f"{value}_lo"]).clip(lower=0)
        agg["count"] = agg["count"].where(agg[f"{value}_lo"].isna(), 2)  # bars are shown for a CI
    elif logy:
        center = np.exp(agg["mean"])
        agg["upper"], agg["lower"] = np.exp(agg["mean"] + agg["std"]) - center, center - np.exp(agg["mean"] - agg["std"])
        agg["mean"] = center
    elif not use_ci:
        agg["upper"] = agg["lower"] = agg["std"]
    metrics = list(dict.fromkeys(d["metric"]))
    fig = make_subplots(rows=1, cols=max(1, len(metrics)), subplot_titles=metrics, shared_yaxes=True,
                        horizontal_spacing=0.04)
    shown = set()
    for j, metric in enumerate(metrics, start=1):
        for sel in [s for s in SELECTION_COLORS if s in set(agg["selection"])] + \
                   sorted(set(agg["selection"]) - set(SELECTION_COLORS)):
            a = agg[(agg["metric"] == metric) & (agg["selection"] == sel)].sort_values("k")
            if a.empty:
                continue
            fig.add_trace(go.Scatter(
                x=a["k"], y=a["mean"], mode="lines+markers", name=SELECTION_LABELS.get(sel, sel),
                legendgroup=sel, showlegend=sel not in shown,
                line=dict(color=SELECTION_COLORS.get(sel), dash=SELECTION_DASH.get(sel, "solid")),
                marker=dict(symbol=SELECTION_MARKERS.get(sel, "circle"), size=8),
                error_y=dict(type="data", symmetric=False, array=a["upper"], arrayminus=a["lower"],
                             visible=bool((a["count"] > 1).any())),
                customdata=np.stack([a["count"], a["std"]], axis=-1),
                hovertemplate="K=%{x}<br>mean=%{y:.4g}<br>std=%{customdata[1]:.3g}<br>seeds=%{customdata[0]}",
            ), row=1, col=j)
            shown.add(sel)
        # one axis title for the row: per-panel titles overlap once there are several metrics
        title = "K (weights perturbed)" if j == (len(metrics) + 1) // 2 else None
        fig.update_xaxes(type="log", title_text=title, row=1, col=j)
    fig.update_yaxes(title_text=label, row=1, col=1)
    if logy:
        fig.update_yaxes(type="log")
    n_bad = int(agg["nonfinite"].sum())
    seeds = sorted(set(d["seed"]))
    stat = ("mean, 95% CI over seeds, control draws and evaluation windows" if use_ci else
            "geometric mean ×/÷ geometric std" if logy else "mean ± std")
    title = f"{label} vs K — perturbation={perturbation}, mode={mode}<br><sup>{stat} over {len(seeds)} seed(s)</sup>"
    if n_bad:
        title += f" ({n_bad} non-finite evaluations omitted)"
    fig.update_layout(title=title + title_suffix, template=TEMPLATE, autosize=True, height=480,
                      margin=dict(t=130), legend=dict(title_text="selection", orientation="h", yanchor="bottom",
                                                      y=1.08, xanchor="right", x=1.0))
    fig.layout.meta = {"static_width": max(640, 380 * len(metrics))}
    return fig


# ---------------------------------------------------------------------------------------------------
# Layer / module histograms
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Stability heatmaps
# ---------------------------------------------------------------------------------------------------
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


def _plain(obj):
    """Decode plotly's base64 typed arrays ({"dtype", "bdata"[, "shape"]}) into plain lists."""
    if isinstance(obj, dict):
        if set(obj) >= {"dtype", "bdata"} and set(obj) <= {"dtype", "bdata", "shape"}:
            import base64

            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
            if "shape" in obj:
                shape = [int(x) for x in str(obj["shape"]).split(",")]
                arr = arr.reshape(shape)
            return arr.tolist()
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def figure_json(fig: go.Figure) -> str:
    """Plotly JSON with plain number lists (readable by any plotly.js, e.g. W&B's chart panel)."""
    from plotly.utils import PlotlyJSONEncoder

    return json.dumps(_plain(json.loads(fig.to_json())), cls=PlotlyJSONEncoder)


def chrome_available() -> bool:
    """Whether kaleido can find a Chrome/Chromium for static export (BROWSER_PATH or the usual names)."""
    import os

    env = os.environ.get("BROWSER_PATH")
    if env:
        return os.access(env, os.X_OK)
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:
        return False


def save_figures(figs: dict[str, go.Figure], plot_dir: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write each figure as <name>.html/.json/.png/.svg under plot_dir; return the written paths.

    HTML references one plotly.min.js written next to it (works offline). PNG/SVG go through one kaleido
    call (one browser start for all figures); if no Chrome is found they are skipped with a warning."""
    formats = [f for f in formats if f != "none"]
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown plot format '{f}'; valid: {', '.join(FORMATS)}")
    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in figs.items():
        if "html" in formats:  # every file goes through temp + rename: a killed publish leaves no torn plot
            p = d / f"{name}.html"
            atomic_write(p, lambda tmp, fig=fig: fig.write_html(tmp, include_plotlyjs="directory", full_html=True))
            written.append(p)
        if "json" in formats:
            p = d / f"{name}.json"
            atomic_write_text(p, figure_json(fig))
            written.append(p)
    static = [f for f in formats if f in ("png", "svg")]
    if static and figs:
        if not chrome_available():
            print("superweight: warning: no Chrome/Chromium found for PNG/SVG export (apt-get install chromium, "
                  "or set BROWSER_PATH); wrote HTML/JSON only", file=sys.stderr)
        else:
            import plotly.io as pio

            targets, temps, fig_list = [], [], []
            for name, fig in figs.items():
                for f in static:
                    targets.append(d / f"{name}.{f}")
                    temps.append(d / f".{name}.tmp{os.getpid()}.{f}")  # kaleido picks the format by suffix
                    w = fig.layout.width or (fig.layout.meta or {}).get("static_width") if isinstance(fig.layout.meta, dict) else fig.layout.width
                    fig_list.append(go.Figure(fig).update_layout(width=w) if w else fig)
            try:
                pio.write_images(fig_list, temps, scale=2 if "png" in static else 1)
                for tmp, target in zip(temps, targets):
                    os.replace(tmp, target)
            finally:
                for tmp in temps:
                    tmp.unlink(missing_ok=True)
            written.extend(targets)
    return written
