"""What a run leaves in W&B besides its history: artifacts with lineage and the tables in the workspace.

Outputs (`log_outputs`), one artifact per kind, each version aliased only `run-<run id>` (and `latest`, which
W&B moves itself): an alias names one version per collection, so labels that many versions share are tags
and metadata instead: tags `cfg-<config hash>`, `sweep-<sweep id or local sweep group>`, `seed-<N>`;
metadata {config_hash, sweep_id, seeds, run, out_dir, config}. Online and offline log the same aliases,
tags and metadata.
  results-<model>   results.csv, gaps.csv, perturbation_results.json, results table (a column per result
                    config key, so merged tables tell runs apart)
  rankings-<model>  rankings.csv, selections.safetensors, stability*.csv
  plots-<model>     plots/*
  manifest-<model>  manifest.json

Score sets (`declare_score_sets`, inputs of the run): `scores-<model>-<metric>`, one version per cache key
(the content address of a score set), aliased `key-<cache key>` (one version per alias, as aliases mean),
tagged `seed-<N>`, metadata {cache_key, metric, seed, model_fingerprint, cache_path, host}. Never a staging
copy per run:
  * wandb.scores=reference (default): `add_reference(file://<cache file>, checksum=False)`: no hashing, no
    copy, no upload; the artifact records where the score set lives (a shared cache is readable from every VM);
  * wandb.scores=upload: the file itself, added with policy="immutable" (wandb uploads the cache file in
    place instead of copying it to its staging folder; the cache file is content-addressed and never rewritten);
  * wandb.scores=none: no score artifacts.
Online, the version with the run's key alias is looked up first (`use_artifact("name:key-<key>")`), so a
score set is logged (and with `upload`, uploaded) once per key across the project; only a new key logs a draft.
Offline, where use_artifact cannot look anything up, each run logs the draft (same key, same artifact).

Tables (`log_tables`): every CSV the run wrote to out_dir (the sink's list: results, gaps, metric
comparison, stability, ...) logged to the run as `tables/<name>` so it appears
in the workspace; W&B's limit for a logged table is wandb.Table.MAX_ROWS rows: a longer CSV is logged as its
first MAX_ROWS rows and `tables/<name>_rows` in the summary says how many it has (the artifact has them all).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd

from ..core.summary import finite_or_none
from ..resources import cache_root
from .run_identity import artifact_slug, config_columns, run_config, tag

MAX_ARTIFACT_TABLE_ROWS = 200_000


def table(df: pd.DataFrame, max_rows: int):
    """A wandb.Table of the first max_rows rows; non-finite floats become None (JSON holds no NaN/inf). Built
    from row lists, column by column (the same table as `wandb.Table(dataframe=...)`, which reads every cell
    through pandas indexing: 4.2 s for a 10,000-row rankings table against 1.6 s)."""
    import wandb

    df = df.head(max_rows)
    cols = [[finite_or_none(x) for x in df[c].tolist()] if pd.api.types.is_float_dtype(df[c]) else df[c].tolist()
            for c in df.columns]
    return wandb.Table(columns=list(df.columns), data=[list(r) for r in zip(*cols)])


def output_labels(run_id: str, config_hash: str, sweep_id: str | None, seeds) -> tuple[list, list]:
    """(aliases, tags) of every output artifact version of a run (module docstring)."""
    tags = [tag(f"cfg-{config_hash}")] + ([tag(f"sweep-{sweep_id}")] if sweep_id else [])
    return [f"run-{run_id}"], tags + [f"seed-{int(s)}" for s in seeds]


def log_outputs(run, cfg, result, out: Path, model: str, sweep_id: str | None, files: dict[str, list[str]]) -> None:
    """One artifact per kind of the files the sink wrote (`files`: kind -> paths relative to out_dir)."""
    import wandb

    aliases, tags = output_labels(run.id, result.config_hash, sweep_id, cfg.seeds)
    meta = {"out_dir": str(out.resolve()), "config_hash": result.config_hash, "run": run.id,
            "sweep_id": sweep_id, "seeds": list(cfg.seeds), "config": run_config(cfg)}
    df = result.table
    cols = config_columns(cfg)
    merged = df.assign(**{k: [v] * len(df) for k, v in cols.items()}) if len(df) else df
    for kind, present in files.items():
        if not present:
            continue
        art = wandb.Artifact(f"{kind}-{model}", type=kind, metadata=meta)
        for f in present:
            art.add_file(str(out / f), name=f)
        if kind == "results":
            art.add(table(merged, MAX_ARTIFACT_TABLE_ROWS), "results_table")
            if not result.gaps.empty:
                art.add(table(result.gaps, MAX_ARTIFACT_TABLE_ROWS), "gaps_table")
        run.log_artifact(art, aliases=aliases, tags=tags)


def csv_tables(out: Path, files: dict[str, list[str]]) -> dict[str, Path]:
    """{name: path} of the CSVs to show in the workspace, from the sink's files (kind -> paths)."""
    paths = [out / p for written in files.values() for p in written]
    return {Path(p).stem: Path(p) for p in paths if str(p).endswith(".csv") and Path(p).is_file()}


def log_tables(out: Path, files: dict[str, list[str]]) -> tuple[dict, dict]:
    """({`tables/<name>`: wandb.Table}, {`tables/<name>_rows`: rows}) of csv_tables (module docstring)."""
    import wandb

    media, summary = {}, {}
    for name, path in csv_tables(out, files).items():
        try:
            df = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        media[f"tables/{name}"] = table(df, wandb.Table.MAX_ROWS)
        summary[f"tables/{name}_rows"] = len(df)
    return media, summary


def declare_score_sets(run, cfg, result, model: str, offline: bool) -> dict:
    """The score sets this run read or computed, declared as its inputs (module docstring).
    Returns {"<metric>.seed<N>": "scores-<model>-<metric>:key-<cache key>"}."""
    import wandb

    if cfg.wandb.scores == "none":
        return {}
    root = cache_root(cfg.cache_dir) / "scores"
    names = {}
    for label, key in result.extra.get("score_keys", {}).items():
        path = root / f"{key}.safetensors"
        if not path.is_file():
            continue
        metric, _, seed = label.rpartition(".seed")
        name, alias = f"scores-{model}-{artifact_slug(metric)}", f"key-{key}"

        def draft():
            art = wandb.Artifact(name, type="scores", metadata={
                "cache_key": key, "metric": metric, "seed": int(seed), "cache_path": str(path.resolve()),
                "host": socket.gethostname(), "model_fingerprint": result.model.get("fingerprint")})
            if cfg.wandb.scores == "upload":
                art.add_file(str(path), name="scores.safetensors", policy="immutable")
            else:
                art.add_reference(path.resolve().as_uri(), name="scores.safetensors", checksum=False)
            return art

        labels = {"aliases": [alias], "tags": [f"seed-{int(seed)}"]}
        if offline:
            run.log_artifact(draft(), **labels)
        else:
            try:  # the version another run logged: no hashing, no upload
                run.use_artifact(f"{name}:{alias}", type="scores")
            except Exception:  # not found (or a lookup error: the draft path reports real failures)
                art = run.log_artifact(draft(), **labels)  # the first run with this key logs it ...
                art.wait()
                run.use_artifact(art)  # ... and declares it used, as every later run does
        names[label] = f"{name}:{alias}"
    return names
