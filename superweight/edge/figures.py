"""Paper figures from several runs (the `superweight figures` command is commands/figures.py). A SOURCE is
  * a run's out_dir (it holds results.csv), or a directory of runs such as a sweep dir (searched for
    out_dirs; `wandb/` folders are not descended into);
  * a finished offline W&B run directory (`.../wandb/offline-run-*`): its logged artifacts are read back;
  * `wandb:ENTITY/PROJECT[/GROUP]` or `wandb:ENTITY/PROJECT --sweep ID` (online): the finished runs only
    (state `finished`: no running, crashed, preempted or stopped run); of each, the latest version it
    logged of its `results`, `rankings` and `manifest` artifacts, read from the artifact files (no table
    truncation; the results table also carries every result config key as a column).

The runs are pooled. Runs whose configs differ in anything other than the plotted axes (metric,
perturbation, seeds) and bookkeeping (out_dir, wandb, plots, resume, cache_dir) are *variants*
(e.g. bit-flip probability or model) and get their own figures, suffixed `__<variant>`. Within a variant:
Δ vs K uses every result row (a seed in two runs once); with per-window data (perturbation_results.json) the
Top-K minus control gaps and the per-selection effects get 95% CIs over seeds, draws and windows across the
runs that share the evaluation windows (`pooled_tables`; gaps.csv, effects.csv: a sweep that puts each seed
in its own run gets the same numbers as one run with all seeds); layer/module histograms pool the score summaries
of all (metric, seed); rank stability is recomputed from rankings.csv (global mode, Jaccard of the
top-K rows, so metrics from different runs can be compared; each metric at the largest K it supports, up to
the largest K of the runs or --k). The figures are plots.figure_set's, the same set a run draws into its plots/. Also writes
`metric_comparison.csv` (core/comparison.py), `summary.csv` (mean, std, n over seeds per variant × perturbation × mode ×
metric × selection × K) and `runs.csv` (the runs used; `note` names a run left out of the gaps and why).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import ConfigError, from_dict, is_result_key, to_flat
from ..core.comparison import metric_comparison
from .plots import (VALUES, delta_vs_k, figure_set, read_score_summary, save_figures, sensitivity_heatmap,  # noqa: F401
                    stability_heatmaps)
from ..core.gaps import effects, gaps
from ..core.summary import aggregate_over_seeds
from ..files import slug
from .offline_runs import read_offline_run

AXES = ("score.metrics", "perturb.names", "seeds")


# ---------------------------------------------------------------------------------------------------
# finding runs
# ---------------------------------------------------------------------------------------------------
def find_run_dirs(root: str | Path) -> list[Path]:
    """out_dirs under root (root itself if it holds results.csv); wandb/ folders are skipped."""
    root = Path(root)
    if (root / "results.csv").is_file():
        return [root]
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and p.name != "wandb" and not p.name.startswith("."):
            found.extend(find_run_dirs(p))
    return found


KINDS = ("results", "rankings", "manifest")  # the artifact types figures read


def _version(art) -> int:
    """`v12` -> 12 (an artifact version), -1 when unknown."""
    try:
        return int(str(art.version).lstrip("v"))
    except (TypeError, ValueError):
        return -1


def materialize_offline_run(run_dir: Path, dest: Path) -> Path:
    """Copy the artifact files of a finished offline W&B run into an out_dir-like folder (the last version
    of each artifact type it logged)."""
    rec = read_offline_run(run_dir)
    if rec["exit_code"] != 0:
        state = "has no end (killed)" if rec["exit_code"] is None else f"ended with exit code {rec['exit_code']}"
        raise ConfigError(f"offline W&B run '{run_dir}' {state}, so it is not a result; rerun it to finish, or "
                          "give its out_dir")
    out = dest / run_dir.name
    out.mkdir(parents=True, exist_ok=True)
    latest = {a["type"]: a for a in rec["artifacts"] if a["type"] in KINDS}
    for art in latest.values():
        for name, local in art["files"].items():
            if local and Path(local).is_file():
                shutil.copyfile(local, out / name)
    if not (out / "results.csv").exists():
        raise ConfigError(f"offline W&B run '{run_dir}' has no results artifact")
    if not (out / "manifest.json").exists():
        (out / "manifest.json").write_text(json.dumps({"config": from_dict(rec["config"]).to_dict()}))
    return out


def sweep_path(spec: str, sweep: str) -> tuple[str, str]:
    """(`ENTITY/PROJECT[/GROUP]`, sweep id) from a W&B source and --sweep, which may be the bare id or the
    `ENTITY/PROJECT/ID` that `wandb sweep` prints (its entity/project must then match the source's)."""
    parts = sweep.strip("/").split("/")
    if len(parts) == 1 and parts[0]:
        return spec, parts[0]
    if len(parts) == 4 and parts[2] == "sweeps":  # ENTITY/PROJECT/sweeps/ID, as in the sweep's URL
        parts = [parts[0], parts[1], parts[3]]
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"bad --sweep '{sweep}'; use the sweep id or ENTITY/PROJECT/ID as wandb sweep prints it")
    if spec and spec.split("/")[:2] != parts[:2]:
        raise ConfigError(f"--sweep '{sweep}' is in {parts[0]}/{parts[1]}, the source is wandb:{spec}")
    return spec or f"{parts[0]}/{parts[1]}", parts[2]


def download_wandb_runs(spec: str, dest: Path, sweep: str | None = None, api=None) -> list[Path]:
    """Download the artifacts of the finished runs of ENTITY/PROJECT[/GROUP] (or of one sweep) via wandb.Api:
    of each run, the latest version it logged of each of its results/rankings/manifest artifacts, read from
    the artifact files (tables are never truncated). Every run it skips is named on stderr with the reason
    (not finished: its state; finished without a results artifact)."""
    import sys

    import wandb

    if sweep:
        spec, sweep = sweep_path(spec, sweep)
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"bad W&B source 'wandb:{spec}'; use wandb:ENTITY/PROJECT or wandb:ENTITY/PROJECT/GROUP")
    filters = {}
    if len(parts) == 3:
        filters["group"] = parts[2]
    if sweep:
        filters["sweep"] = sweep
    if api is None:
        try:
            api = wandb.Api()
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:  # no key / a malformed key
            raise ConfigError(f"wandb:{spec} needs W&B credentials: {' '.join(str(e).split())}; run `wandb login` "
                              "(or set WANDB_API_KEY), or give local out_dirs / offline run dirs") from None
    out, skipped = [], []
    for run in api.runs(f"{parts[0]}/{parts[1]}", filters=filters):
        label = f"{run.id} ({getattr(run, 'name', None) or run.id})"
        if run.state != "finished":  # a crashed, running, preempted or stopped run is not a result
            why = " (the sweep requeues it; it counts once a rerun finishes)" if run.state == "preempted" else ""
            skipped.append(f"{label}: state {run.state}{why}")
            continue
        latest: dict[str, object] = {}
        for art in run.logged_artifacts():  # a resumed run may have logged several versions: the newest wins
            if art.type in KINDS and (art.type not in latest or _version(art) > _version(latest[art.type])):
                latest[art.type] = art
        d = dest / run.id
        for art in latest.values():
            art.download(root=str(d))
        if (d / "results.csv").exists():
            if not (d / "manifest.json").exists():
                (d / "manifest.json").write_text(json.dumps({"config": from_dict(dict(run.config)).to_dict()}))
            out.append(d)
        else:
            skipped.append(f"{label}: finished without a results artifact")
    for line in skipped:
        print(f"superweight: skipped W&B run {line}", file=sys.stderr)
    if not out:
        raise ConfigError(f"no finished W&B runs with a results artifact in '{spec}'" + (f" sweep {sweep}" if sweep else "")
                          + (f" ({len(skipped)} skipped, named above)" if skipped else ""))
    return out


# ---------------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------------
def _flat(d: dict) -> dict:
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, list) else v for k, v in to_flat(d or {}).items()}


def _varying(configs: list[dict]) -> list[str]:
    keys = sorted(set().union(*[set(c) for c in configs])) if configs else []
    out = []
    for k in keys:
        if k in AXES or not is_result_key(k):
            continue
        if len({str(c.get(k)) for c in configs}) > 1:
            out.append(k)
    return out


def load_runs(run_dirs: list[Path]) -> pd.DataFrame:
    """One row per run: dir, variant label, flattened config."""
    rows = []
    for d in run_dirs:
        m = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
        rows.append({"dir": str(d), "config": _flat(m.get("config", {}))})
    varying = _varying([r["config"] for r in rows])
    for r in rows:
        label = ",".join(f"{k.split('.')[-1]}={r['config'].get(k)}" for k in varying)
        r["variant"] = label or "all"
    return pd.DataFrame([{"dir": r["dir"], "variant": r["variant"], **{k: r["config"].get(k) for k in varying}}
                         for r in rows])


ROW_KEY = ("metric", "seed", "mode", "selection", "draw", "k", "perturbation")  # one evaluated selection


def window_identity(d: Path) -> tuple | None:
    """(data fingerprint, evaluation window indices) of a run from its manifest.json; None when it lacks them."""
    m = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
    data = m.get("data") or {}
    fp, idx = data.get("fingerprint"), data.get("eval_window_index")
    return (str(fp), tuple(int(i) for i in idx)) if fp and idx is not None else None


def _row_key(r) -> tuple:
    draw = r.get("draw")
    return tuple(str(r.get(c)) for c in ROW_KEY[:4]) + (str(int(draw)) if pd.notna(draw) else "0",
                                                        str(int(r["k"])), str(r.get("perturbation")))


def _against_reference(rows: list[dict], own: dict, ref: dict) -> tuple[list[dict], str]:
    """A run's per-window rows re-expressed against the pooled (first) run's baseline, keeping each row's
    per-window ΔNLL against its own baseline: window_nll' = ref_w + (window_nll − own_w). Runs on the same
    windows can still have other baseline NLLs (another device, dtype or kernel); measuring their rows against
    the first run's baseline would add the baseline difference to every ΔNLL. Returns (rows, note): the note
    says when the baselines differ (ΔPPL then uses the first run's baseline PPL)."""
    a, b = own.get("window_nll"), ref.get("window_nll")
    if not a or not b or len(a) != len(b) or np.array_equal(np.asarray(a, float), np.asarray(b, float)):
        return rows, ""
    shift = np.asarray(b, float) - np.asarray(a, float)
    out = [dict(r, window_nll=(np.asarray(r["window_nll"], float) + shift).tolist())
           if r.get("window_nll") and len(r["window_nll"]) == len(shift) else r for r in rows]
    diff = float(np.sum(a) / np.sum(own.get("window_tokens") or [1]) - np.sum(b) / np.sum(ref.get("window_tokens") or [1]))
    return out, (f"its baseline NLL differs from the first pooled run's by {diff:+.6f} nats/token (another device or "
                 "dtype?): its rows are pooled as per-window ΔNLL against its own baseline")


def pooled_tables(runs: pd.DataFrame) -> dict[str, dict]:
    """{variant: {"results": df, "rankings": df|None, "scores": (summary, meta)|None, "rows": per-window rows,
    "baseline": the shared baseline or None, "notes": {run dir: why it is (partly) left out}}}.

    Per-window rows (gaps.csv, effects.csv) pool only across runs with the same evaluation windows: the same
    data fingerprint and window indices (manifest.json), the identity most runs of the variant share. A run
    with other windows, no identity or no per-window data is named in `notes` with the reason. An evaluated
    selection (metric, seed, mode, selection, draw, K, perturbation) already seen in an earlier run is
    counted once (the first), in the results as in the per-window rows: a seed in two runs is one seed. Each
    run's rows keep their per-window ΔNLL against that run's own baseline (`_against_reference`), so runs
    with other baseline NLLs pool correctly; `baseline` is the first pooled run's."""
    out: dict[str, dict] = {}
    for variant, g in runs.groupby("variant", sort=False):
        res, ranks, summary, meta = [], [], {}, None
        rows, baseline, notes = [], None, {}
        seen_rank, seen_rows, seen_res = set(), {}, set()
        dirs = list(map(Path, g["dir"]))
        ids = {d: window_identity(d) for d in dirs if (d / "perturbation_results.json").exists()}
        counts = Counter(i for i in ids.values() if i is not None)
        ref = max(counts, key=lambda i: counts[i]) if counts else None  # Counter keeps first-seen order on ties
        for d in dirs:
            note = []
            df = pd.read_csv(d / "results.csv")
            keys = [_row_key(r) for r in df.to_dict("records")]
            dup = [k in seen_res for k in keys]
            seen_res.update(keys)
            df.insert(0, "run", d.name)
            res.append(df[[not x for x in dup]])
            if d not in ids:
                note.append("no per-window data (perturbation_results.json): left out of gaps.csv and effects.csv")
            elif ids[d] is None:
                note.append("its manifest.json has no data fingerprint and evaluation window indices: left out of "
                            "gaps.csv and effects.csv")
            elif ids[d] != ref:
                what = "data fingerprint" if ids[d][0] != ref[0] else "evaluation window indices"
                note.append(f"its {what} differs from the pooled runs' ({ids[d][0]} vs {ref[0]}): other evaluation "
                            "windows, left out of gaps.csv and effects.csv")
            else:
                pj = json.loads((d / "perturbation_results.json").read_text())
                baseline = baseline or pj["baseline"]
                own, why = _against_reference(pj["rows"], pj["baseline"], baseline)
                if why:
                    note.append(why)
                for r in own:
                    k = _row_key(r)
                    if k in seen_rows:
                        continue
                    seen_rows[k] = d.name
                    rows.append(r)
            twice = sorted({(k[0], k[1]) for k, x in zip(keys, dup) if x})
            if twice:
                note.append("already pooled from an earlier run, counted once: "
                            + ", ".join(f"{m} seed {s}" for m, s in twice))
            if note:
                notes[str(d)] = "; ".join(note)
            if (d / "rankings.csv").exists():
                r = pd.read_csv(d / "rankings.csv")
                keep = [key not in seen_rank for key in zip(r["metric"], r["seed"], r["mode"])]
                seen_rank.update(zip(r["metric"], r["seed"], r["mode"]))
                ranks.append(r[keep])
            if (d / "sensitivity_scores.safetensors").exists():
                s, m = read_score_summary(d / "sensitivity_scores.safetensors")
                for k, v in s.items():
                    summary.setdefault(k, v)
                meta = meta or m
        out[variant] = {"results": pd.concat(res, ignore_index=True),
                        "rankings": pd.concat(ranks, ignore_index=True) if ranks else None,
                        "scores": (summary, meta) if summary else None,
                        "rows": rows, "baseline": baseline, "notes": notes}
    return out


def build(run_dirs: list[Path], out_dir: Path, k: int | None = None, formats=("html", "png", "svg", "pdf"),
          values=tuple(VALUES)) -> dict:
    """Write the figures, metric_comparison.csv, summary.csv, gaps.csv and runs.csv to out_dir; return
    {"figures": names, "objects": {name: figure}, "files": paths, ...}."""
    if not run_dirs:
        raise ConfigError("no runs found (no results.csv under the given sources)")
    runs = load_runs(run_dirs)
    tables = pooled_tables(runs)
    figs = {}
    summaries, gap_tables, comparisons = [], [], []
    for variant, t in tables.items():
        sfx = "" if len(tables) == 1 else f"__{slug(variant)}"
        res = t["results"]
        eff = effects(t["rows"], t["baseline"]) if t["rows"] and t["baseline"] else None
        if eff is not None:
            gp = gaps(t["rows"], t["baseline"])
            gp.insert(0, "variant", variant)
            gap_tables.append(gp)
        for v in values:
            if v in res.columns:
                a = aggregate_over_seeds(res, v)
                a.insert(0, "value", v)
                a.insert(0, "variant", variant)
                summaries.append(a)
        comp = metric_comparison(gp, eff) if eff is not None else None
        if comp is not None and not comp.empty:
            comparisons.append(comp.assign(variant=variant)[["variant", *comp.columns]])
        for name, fig in figure_set(res, effects=eff, scores=t["scores"], rankings=t["rankings"], comparison=comp,
                                    k=k, values=values,
                                    title_suffix="" if variant == "all" else f" [{variant}]").items():
            figs[f"{name}{sfx}"] = fig
    out_dir.mkdir(parents=True, exist_ok=True)
    files = save_figures(figs, out_dir, list(formats))
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    summary.to_csv(out_dir / "summary.csv", index=False)
    notes = {d: n for t in tables.values() for d, n in t["notes"].items()}
    runs["note"] = [notes.get(d, "") for d in runs["dir"]]
    for d, n in notes.items():
        print(f"superweight: warning: run {d}: {n}", file=sys.stderr)
    runs.to_csv(out_dir / "runs.csv", index=False)
    gap_df = pd.concat(gap_tables, ignore_index=True) if gap_tables else pd.DataFrame()
    gap_df.to_csv(out_dir / "gaps.csv", index=False)
    comp_df = pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame()
    comp_df.to_csv(out_dir / "metric_comparison.csv", index=False)
    return {"figures": list(figs), "objects": figs, "files": files, "runs": runs, "summary": summary, "gaps": gap_df,
            "metric_comparison": comp_df}


def resolve_sources(sources: list[str], tmp: Path, sweep: str | None = None) -> list[Path]:
    """The out_dirs of the SOURCEs (module docstring). --sweep selects W&B runs: it needs a `wandb:` source
    or the ENTITY/PROJECT/ID form (which names the project itself); with local sources only it would select
    nothing, so it is refused rather than ignored."""
    dirs: list[Path] = []
    if sweep and "/" not in sweep.strip("/") and not any(s.startswith("wandb:") for s in sources):
        raise ConfigError(f"--sweep '{sweep}' selects W&B runs, but no source is wandb:ENTITY/PROJECT; give "
                          "wandb:ENTITY/PROJECT --sweep ID or --sweep ENTITY/PROJECT/ID (local sources are not "
                          "filtered by sweep: give the sweep's own directory instead)")
    if sweep and "/" in sweep and not any(s.startswith("wandb:") for s in sources):
        sources = [*sources, "wandb:"]  # --sweep ENTITY/PROJECT/ID names the project itself
    for s in sources:
        if s.startswith("wandb:"):
            dirs.extend(download_wandb_runs(s[len("wandb:"):], tmp / "wandb", sweep))
            continue
        p = Path(s)
        if not p.exists():
            raise ConfigError(f"source '{s}' does not exist; give an out_dir, a sweep dir, an offline W&B run dir "
                              "or wandb:ENTITY/PROJECT[/GROUP]")
        if p.is_dir() and list(p.glob("run-*.wandb")) and not (p / "results.csv").exists():
            dirs.append(materialize_offline_run(p, tmp / "offline"))
            continue
        found = find_run_dirs(p)
        if not found:
            raise ConfigError(f"source '{s}' holds no run (no results.csv found under it)")
        dirs.extend(found)
    return list(dict.fromkeys(dirs))
