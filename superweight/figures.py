"""`superweight figures SOURCE... [--out DIR] [--k K] [--formats html,png,svg] [--values delta_ppl,...]`

Paper figures from several runs. A SOURCE is
  * a run's out_dir (it holds results.csv), or a directory of runs such as a sweep dir (searched for
    out_dirs; `wandb/` folders are not descended into);
  * an offline W&B run directory (`.../wandb/offline-run-*`): its logged artifacts are read back;
  * `wandb:ENTITY/PROJECT[/GROUP]` or `wandb:ENTITY/PROJECT --sweep ID` (online): the `results`,
    `rankings`, `scores` and `manifest` artifacts of those runs are downloaded through the W&B API.

The runs are pooled. Runs whose configs differ in anything other than the plotted axes (metric,
perturbation, seeds) and bookkeeping (out_dir, wandb, plots, resume, cache_dir) are *variants*
(e.g. bit-flip probability or model) and get their own figures, suffixed `__<variant>`. Within a variant:
Δ vs K uses every result row (mean ± std over seeds); layer/module histograms pool the score summaries
of all (metric, seed); rank stability is recomputed from rankings.csv (global mode, Jaccard of the
top-K rows, so metrics from different runs can be compared; K defaults to the largest K with enough
stored rows). Also writes `summary.csv` (mean, std, n over seeds per variant × perturbation × mode ×
metric × selection × K) and `runs.csv` (the runs used).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from .config import ConfigError
from .plots import (FORMATS, VALUES, aggregate_over_seeds, delta_vs_k, jaccard_from_rankings, layer_histograms,
                    read_score_summary, save_figures, stability_heatmaps)

AXES = ("score.metrics", "perturb.names", "seeds")
IGNORED = ("out_dir", "wandb", "plots", "resume", "cache_dir")


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


def materialize_offline_run(run_dir: Path, dest: Path) -> Path:
    """Copy the artifact files of an offline W&B run into an out_dir-like folder."""
    from .tracking import read_offline_run

    rec = read_offline_run(run_dir)
    out = dest / run_dir.name
    out.mkdir(parents=True, exist_ok=True)
    for art in rec["artifacts"]:
        if art["type"] in ("results", "rankings", "scores", "manifest"):
            for name, local in art["files"].items():
                if local and Path(local).is_file():
                    shutil.copyfile(local, out / name)
    if not (out / "results.csv").exists():
        raise ConfigError(f"offline W&B run '{run_dir}' has no results artifact")
    if not (out / "manifest.json").exists():
        (out / "manifest.json").write_text(json.dumps({"config": rec["config"]}))
    return out


def download_wandb_runs(spec: str, dest: Path, sweep: str | None = None) -> list[Path]:
    """Download the artifacts of the runs of ENTITY/PROJECT[/GROUP] (or of one sweep) via wandb.Api."""
    import wandb

    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"bad W&B source 'wandb:{spec}'; use wandb:ENTITY/PROJECT or wandb:ENTITY/PROJECT/GROUP")
    filters = {}
    if len(parts) == 3:
        filters["group"] = parts[2]
    if sweep:
        filters["sweep"] = sweep
    api = wandb.Api()
    out = []
    for run in api.runs(f"{parts[0]}/{parts[1]}", filters=filters):
        d = dest / run.id
        for art in run.logged_artifacts():
            if art.type in ("results", "rankings", "scores", "manifest"):
                art.download(root=str(d))
        if (d / "results.csv").exists():
            if not (d / "manifest.json").exists():
                (d / "manifest.json").write_text(json.dumps({"config": dict(run.config)}))
            out.append(d)
    if not out:
        raise ConfigError(f"no W&B runs with a results artifact in '{spec}'" + (f" sweep {sweep}" if sweep else ""))
    return out


# ---------------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


def _varying(configs: list[dict]) -> list[str]:
    keys = sorted(set().union(*[set(c) for c in configs])) if configs else []
    out = []
    for k in keys:
        if k in AXES or any(k == i or k.startswith(i + ".") for i in IGNORED):
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


def pooled_tables(runs: pd.DataFrame) -> dict[str, dict]:
    """{variant: {"results": df, "rankings": df|None, "scores": (summary, meta)|None}}."""
    out: dict[str, dict] = {}
    for variant, g in runs.groupby("variant", sort=False):
        res, ranks, summary, meta = [], [], {}, None
        seen_rank = set()
        for d in map(Path, g["dir"]):
            df = pd.read_csv(d / "results.csv")
            df.insert(0, "run", d.name)
            res.append(df)
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
                        "scores": (summary, meta) if summary else None}
    return out


def _slug(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", s).strip("_")[:80]


def build(run_dirs: list[Path], out_dir: Path, k: int | None = None, formats=("html", "png", "svg"),
          values=tuple(VALUES)) -> dict:
    """Write the figures, summary.csv and runs.csv to out_dir; return {"figures": names, "files": paths}."""
    if not run_dirs:
        raise ConfigError("no runs found (no results.csv under the given sources)")
    runs = load_runs(run_dirs)
    tables = pooled_tables(runs)
    figs = {}
    summaries = []
    for variant, t in tables.items():
        sfx = "" if len(tables) == 1 else f"__{_slug(variant)}"
        res = t["results"]
        combos = res[["perturbation", "mode"]].drop_duplicates()
        for pert, mode in combos.itertuples(index=False):
            csfx = sfx + ("" if len(combos) == 1 else f"__{pert}__{mode}")
            for v in values:
                if v in res.columns:
                    figs[f"{v}_vs_k{csfx}"] = delta_vs_k(res, v, pert, mode,
                                                         title_suffix="" if variant == "all" else f"<br>{variant}")
        for v in values:
            if v in res.columns:
                a = aggregate_over_seeds(res, v)
                a.insert(0, "value", v)
                a.insert(0, "variant", variant)
                summaries.append(a)
        if t["scores"] is not None:
            figs[f"layer_sensitivity{sfx}"] = layer_histograms(*t["scores"], by="layer")
            figs[f"module_sensitivity{sfx}"] = layer_histograms(*t["scores"], by="module")
        if t["rankings"] is not None and not t["rankings"].empty:
            ranks = t["rankings"]
            kk = k
            if kk is None:
                stored = ranks[ranks["mode"] == "global"].groupby(["metric", "seed"]).size()
                cands = [c for c in sorted({int(x) for x in res["k"]}) if len(stored) and c <= int(stored.min())]
                kk = cands[-1] if cands else None
            if kk is not None:
                stab = jaccard_from_rankings(ranks, int(kk))
                for name, fig in stability_heatmaps(stab, k=int(kk), mode="global").items():
                    figs[f"{name}{sfx}"] = fig
    out_dir.mkdir(parents=True, exist_ok=True)
    files = save_figures(figs, out_dir, list(formats))
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    summary.to_csv(out_dir / "summary.csv", index=False)
    runs.to_csv(out_dir / "runs.csv", index=False)
    return {"figures": list(figs), "files": files, "runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> dict:
    opts = {"sources": [], "out": None, "k": None, "formats": ["html", "png", "svg"], "values": list(VALUES),
            "sweep": None}
    it = iter(argv)
    for tok in it:
        key, eq, val = tok.partition("=")
        if key in ("--out", "--k", "--formats", "--values", "--sweep"):
            if not eq:
                val = next(it, None)
                if val is None:
                    raise ConfigError(f"option '{key}' needs a value")
            name = key[2:]
            if name == "k":
                try:
                    opts["k"] = int(val)
                except ValueError:
                    raise ConfigError(f"option '--k' takes an integer, got '{val}'") from None
                if opts["k"] <= 0:
                    raise ConfigError(f"option '--k' must be > 0, got {val}")
            elif name in ("formats", "values"):
                items = [x.strip() for x in val.split(",") if x.strip()]
                valid = FORMATS if name == "formats" else tuple(VALUES)
                for x in items:
                    if x not in valid:
                        raise ConfigError(f"unknown {name[:-1]} '{x}'; valid choices: {', '.join(valid)}")
                opts[name] = items
            else:
                opts[name] = val
        elif tok.startswith("-"):
            raise ConfigError(f"unknown option '{tok}'; valid: --out DIR, --k K, --formats html,png,svg, "
                              f"--values {','.join(VALUES)}, --sweep ID")
        else:
            opts["sources"].append(tok)
    if not opts["sources"]:
        raise ConfigError("no source given; usage: superweight figures OUT_DIR_OR_SWEEP_DIR... [--out DIR]")
    return opts


def resolve_sources(sources: list[str], tmp: Path, sweep: str | None = None) -> list[Path]:
    dirs: list[Path] = []
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


def main(argv: list[str]) -> int:
    opts = _parse(list(argv))
    with tempfile.TemporaryDirectory(prefix="superweight-figures-") as tmp:
        dirs = resolve_sources(opts["sources"], Path(tmp), opts["sweep"])
        default_out = (Path(opts["sources"][0]) / "figures" if len(opts["sources"]) == 1
                       and not opts["sources"][0].startswith("wandb:") and Path(opts["sources"][0]).is_dir()
                       and not (Path(opts["sources"][0]) / "results.csv").exists() else Path("figures"))
        out = Path(opts["out"]) if opts["out"] else default_out
        res = build(dirs, out, opts["k"], opts["formats"], opts["values"])
    print(f"{len(dirs)} runs, {res['runs']['variant'].nunique()} variant(s) -> {len(res['figures'])} figures in {out.resolve()}")
    for name in res["figures"]:
        print(f"  {name}")
    return 0
