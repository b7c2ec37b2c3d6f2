"""Weights & Biases, as its users live in it (the only module that imports wandb).

`WandbTracker` is the experiment's tracker (experiment.Tracker): the run is live from before the model
loads until the end, and an interrupted run comes back into the same W&B run.

* `start`   wandb.init after the config and capabilities are validated (bad input creates no run).
            `run.config` is the FLAT dotted config (`model.name`, `perturb.scale`, ...), the keys a sweep
            YAML names, so `wandb agent` overriding a swept key changes only that key; the keys that say
            where a run ran rather than what it is (out_dir, cache_dir, wandb.dir, wandb.group) are left out
            (summary `meta/*`, the W&B group), so a run started by the agent and the same run started by
            `superweight sweep` have identical configs. The run id is the agent's (WANDB_RUN_ID) or the one
            in out_dir/wandb_run.json when the config hash matches (a rerun resumes the same run). Under an
            agent (WANDB_SWEEP_ID) project/entity/id come from the sweep, as wandb.init requires.
* `log_row` one history step per finished row: `row` (counter, the x axis of `row/*`), `progress`,
            `eta_s` and `row/<column>`. Rows a resumed online run already has (its starting step) are not
            logged twice; an offline rerun's record logs every row, so it alone holds the whole history.
* `log_stage` stage timings into the summary as they happen (`stage/<name>_s`); system metrics by W&B.
* `finish`  the summary (results.summary_metrics: baseline, deltas, gaps with CIs, headline), plots as
            images/charts (committed with the last row's step), and artifacts with lineage:
              results-<model>   results.csv, gaps.csv, perturbation_results.json, results table (with a
                                column per result config key, so merged tables tell runs apart)
              rankings-<model>  rankings.csv, selections.safetensors, stability*.csv
              plots-<model>     plots/*
              manifest-<model>  manifest.json
            each version aliased `cfg-<config hash>`, `run-<run id>` (and `sweep-<id>` in a sweep); inputs:
              scores-<model>-<metric>  one cached score set per seed, aliased `key-<cache key>` and `seed<N>`:
                                       identical content = one version, so the runs of a sweep that share a
                                       score set share one artifact digest (uploaded, or a file:// reference to
                                       the shared cache with wandb.scores=reference)
            declared with `use_artifact` online (the version with that key alias when it exists, else this
            run's draft: the lineage graph shows who shares it); offline, where use_artifact raises, logged by
            each run (same digest), named in `inputs/*` of the summary.
* `fail`    a crash marks the run failed (exit code 1, `meta/error`); SIGTERM exits 143 and, with
            wandb.requeue_on_sigterm=true, first marks the run preempting, so the sweep requeues it (W&B cannot
            tell a preempted VM from a UI Stop: both reach the run as SIGTERM from the agent, hence the
            explicit option); Ctrl-C exits 130.

Signals: signals.py (no W&B call is torn by a signal). Mode: wandb_mode.py (wandb's own credential lookup).
Offline runs go to `<wandb.dir or out_dir>/wandb/offline-run-*`; offline_runs.py reads them back with wandb's
reader. A W&B failure raises TrackingError (non-zero exit); the result files are already on disk. Nothing
secret is logged (manifest.scrub).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd

from ..config import TrackConfig, is_result_key, to_flat
from ..files import atomic_write_json
from .manifest import scrub
from .signals import Preempted, shielded
from .wandb_mode import resolve_mode
from ..resources import cache_root
from ..core.summary import finite_or_none, summary_metrics

MAX_TABLE_ROWS = 200_000
RUN_FILE = "wandb_run.json"
ROW_KEYS = ("metric", "seed", "mode", "selection", "draw", "k", "perturbation", "n_selected", "support", "ppl", "nll",
            "acc", "delta_ppl", "delta_nll", "delta_nll_lo", "delta_nll_hi", "ppl_ratio", "changed", "delta_w_l2",
            "mean_abs_w")
# where a run ran, not what it is: summary meta/<key> (and the W&B group), never run.config
LOCAL_KEYS = ("out_dir", "cache_dir", "wandb.dir", "wandb.group")
ARTIFACT_FILES = {
    "results": ["results.csv", "gaps.csv", "perturbation_results.json"],
    "rankings": ["rankings.csv", "selections.safetensors", "stability.csv", "stability_summary.csv"],
    "manifest": ["manifest.json"],
}


class TrackingError(RuntimeError):
    """W&B failed (init, logging or upload): the command exits non-zero; result files stay on disk."""


def _table(df: pd.DataFrame):
    import wandb

    df = df.head(MAX_TABLE_ROWS).copy()
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].map(finite_or_none).astype(object)
    return wandb.Table(dataframe=df)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def slug(s: str, n: int = 60) -> str:
    """A W&B artifact-name-safe slug (letters, digits, - _ .)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s).strip("/")).strip("_")[:n] or "model"


def model_slug(name: str) -> str:
    """The model part of artifact names: a hub id or alias as written (org_name), a local path by its
    last component (the same model on two VMs gets the same collection)."""
    p = Path(str(name))
    local = str(name).startswith(("/", ".", "~")) or p.suffix == ".gguf" or p.exists()
    return slug(p.name if local else str(name))


def run_config(cfg) -> dict:
    """run.config: the flat dotted config without LOCAL_KEYS (scrubbed)."""
    return scrub({k: v for k, v in to_flat(cfg).items() if k not in LOCAL_KEYS})


def config_columns(cfg) -> dict:
    """The result-relevant config keys as columns for merged results tables (model, dtype, prob, bits, ...)."""
    skip = ("score.metrics", "perturb.names", "seeds", "select.topk", "select.modes", "select.controls")
    out = {}
    for k, v in to_flat(cfg).items():
        if is_result_key(k) and k not in skip:
            out[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def _sweep_id() -> str | None:
    """The W&B sweep id (wandb agent), or the local sweep's group (`superweight sweep`)."""
    return os.environ.get("WANDB_SWEEP_ID") or os.environ.get("SUPERWEIGHT_SWEEP_GROUP") or None


# ---------------------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------------------
class WandbTracker:
    """experiment.Tracker backed by wandb (see the module docstring). `mode=disabled` does nothing."""

    def __init__(self, cfg, out_dir: str | Path):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.mode = resolve_mode(cfg.wandb.mode)
        self.run = None
        self.t0 = time.perf_counter()
        self.logged_before = 0  # rows the (resumed, online) W&B run already has
        self.computed = 0  # rows logged by this process after the resumed ones (for the ETA)
        self.resumed_rows = 0
        self.pending = False  # the last row's step is left open for the final media
        self._info: dict = {"mode": self.mode}

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self, exp) -> None:
        if self.mode == "disabled":
            return
        try:
            with shielded():
                self._init(exp)
        except BaseException as e:
            if self.run is not None:
                self.fail(e)
            if isinstance(e, Exception) and not isinstance(e, TrackingError):
                raise TrackingError(f"wandb.init failed: {type(e).__name__}: {' '.join(str(e).split())}"[:500]) from e
            raise

    def _init(self, exp) -> None:
        import wandb

        cfg, chash = self.cfg, exp.chash
        log = getattr(exp, "log", None)
        self.resumed_rows = sum(1 for k in getattr(log, "done", {}) if k and k[0] == "row")
        wdir = (Path(cfg.wandb.dir) if cfg.wandb.dir else self.out).resolve()  # absolute: a shared wandb-core
        wdir.mkdir(parents=True, exist_ok=True)                              # service may run in another cwd
        prev = {}
        try:
            prev = json.loads((self.out / RUN_FILE).read_text()) if (self.out / RUN_FILE).exists() else {}
        except json.JSONDecodeError:
            prev = {}
        kwargs = {}
        if not os.environ.get("WANDB_SWEEP_ID"):  # under an agent wandb.init ignores (and warns about) these
            default = TrackConfig().project
            kwargs["project"] = (os.environ.get("WANDB_PROJECT") or default) if cfg.wandb.project == default \
                else cfg.wandb.project
            kwargs["entity"] = cfg.wandb.entity
            if not os.environ.get("WANDB_RUN_ID") and prev.get("config_hash") == chash:
                kwargs["id"] = prev.get("id")
        self.staging = (wdir / "wandb" / "staging").resolve()
        with _env(WANDB_DATA_DIR=str(self.staging)):
            self.run = wandb.init(
                mode=self.mode, group=cfg.wandb.group, tags=list(cfg.wandb.tags) or None,
                name=cfg.wandb.name or self.out.resolve().name, config=run_config(cfg), dir=str(wdir),
                resume="allow", job_type="experiment", save_code=False, reinit="finish_previous", **kwargs,
            )
        run = self.run
        run.define_metric("row")
        run.define_metric("row/*", step_metric="row")
        self.logged_before = int(run.starting_step or 0) if run.resumed else 0
        self._info = {"mode": self.mode, "id": run.id, "project": run.project, "entity": run.entity or None,
                      "path": "/".join(p for p in (run.entity, run.project, run.id) if p),
                      "url": run.url if self.mode == "online" else None, "sweep_id": _sweep_id(),
                      "dir": str(Path(run.dir).parent.resolve()), "config_hash": chash}
        atomic_write_json(self.out / RUN_FILE, self._info)
        flat = to_flat(cfg)
        run.summary["meta/config_hash"] = chash
        run.summary["meta/out_dir"] = str(self.out.resolve())
        for k in LOCAL_KEYS[1:]:
            if flat.get(k) is not None:
                run.summary[f"meta/{k}"] = flat[k]
        run.summary["meta/requeue_on_sigterm"] = bool(cfg.wandb.requeue_on_sigterm)

    def info(self) -> dict:
        return {k: v for k, v in self._info.items() if k != "config_hash"}

    def log_row(self, row: dict, done: int, total: int) -> None:
        if self.run is None or done <= self.logged_before:
            return
        if done > self.resumed_rows:
            self.computed += 1
        rate = (time.perf_counter() - self.t0) / max(self.computed, 1)
        item = {"row": done, "progress": done / max(total, 1),
                "eta_s": round(rate * (total - done), 1) if self.computed else None}
        for k in ROW_KEYS:
            if k in row and row[k] is not None:
                v = row[k]
                item[f"row/{k}"] = v if isinstance(v, str) else finite_or_none(v)
        last = done >= total
        with shielded():
            self.run.log({k: v for k, v in item.items() if v is not None}, commit=not last)
        self.pending = last

    def log_stage(self, name: str, seconds: float) -> None:
        if self.run is not None:
            with shielded():
                self.run.summary[f"stage/{name}_s"] = round(seconds, 3)

    def finish(self, result) -> None:
        if self.run is None:
            return
        try:
            with shielded():
                self._publish(result)
                self.run.finish(exit_code=0)
                self.run = None
        except Exception as e:
            if isinstance(e, TrackingError):
                raise
            raise TrackingError(f"publishing to W&B failed: {type(e).__name__}: {' '.join(str(e).split())}"[:500]) from e

    def _publish(self, result) -> None:
        import wandb

        run, out, cfg = self.run, self.out, self.cfg
        with _env(WANDB_DATA_DIR=str(self.staging)):
            df = result.table
            summary = summary_metrics(df, result.baseline, result.gaps)
            summary["stage/total_s"] = round(time.perf_counter() - self.t0, 3)
            for k, v in summary.items():
                run.summary[k] = v
            media: dict = {}
            plot_dir = out / "plots"
            if plot_dir.is_dir():
                import plotly.io as pio

                for png in sorted(plot_dir.glob("*.png")):
                    media[f"plots/{png.stem}"] = wandb.Image(str(png))
                for js in sorted(plot_dir.glob("*.json")):
                    media[f"charts/{js.stem}"] = wandb.Plotly(pio.read_json(str(js)))
            if media or self.pending:
                run.log(media, commit=True)  # into the last row's step, when this process logged it
            self.pending = False
            model = model_slug(cfg.model.name)
            aliases = [f"cfg-{result.config_hash}", f"run-{run.id}"]
            if _sweep_id():
                aliases.append(f"sweep-{slug(_sweep_id(), 100)}")
            meta = {"out_dir": str(out.resolve()), "config_hash": result.config_hash, "run": run.id,
                    "config": run_config(cfg)}
            cols = config_columns(cfg)
            table = df.assign(**{k: [v] * len(df) for k, v in cols.items()}) if len(df) else df
            files = dict(ARTIFACT_FILES)
            if plot_dir.is_dir():
                files["plots"] = [str(p.relative_to(out)) for p in sorted(plot_dir.iterdir()) if p.is_file()]
            for kind, names in files.items():
                present = [f for f in names if (out / f).is_file()]
                if not present:
                    continue
                art = wandb.Artifact(f"{kind}-{model}", type=kind, metadata=meta)
                for f in present:
                    art.add_file(str(out / f), name=f)
                if kind == "results":
                    art.add(_table(table), "results_table")
                    if not result.gaps.empty:
                        art.add(_table(result.gaps), "gaps_table")
                run.log_artifact(art, aliases=aliases)
            for k, v in self.declare_inputs(result, model).items():
                run.summary[f"inputs/{k}"] = v

    def declare_inputs(self, result, model: str) -> dict:
        """The score sets this run read or computed, as artifacts named by their cache key (module docstring)."""
        import wandb

        if self.cfg.wandb.scores == "none":
            return {}
        root = cache_root(self.cfg.cache_dir) / "scores"
        names = {}
        for tag, key in result.extra.get("score_keys", {}).items():
            path = root / f"{key}.safetensors"
            if not path.is_file():
                continue
            metric, _, seed = tag.rpartition(".seed")
            name, alias = f"scores-{model}-{slug(metric)}", f"key-{key}"
            aliases = [alias, f"seed{seed}"]

            def draft():
                art = wandb.Artifact(name, type="scores",
                                     metadata={"cache_key": key, "metric": metric, "seed": int(seed),
                                               "model_fingerprint": result.model.get("fingerprint")})
                if self.cfg.wandb.scores == "reference":
                    art.add_reference(path.resolve().as_uri(), name=path.name)
                else:
                    art.add_file(str(path), name="scores.safetensors")
                return art

            if self.mode == "offline":  # use_artifact raises offline; the same content gives the same digest
                self.run.log_artifact(draft(), aliases=aliases)
            else:
                try:  # the version another run logged: no re-hash, no upload
                    self.run.use_artifact(f"{name}:{alias}", type="scores")
                except Exception:  # not found (ValueError) or a lookup error: the draft path reports real failures
                    self.run.use_artifact(draft(), aliases=aliases)  # logs it, then declares it used
            names[tag] = f"{name}:{alias}"
        return names

    def fail(self, exc: BaseException) -> None:
        """Close the run with the reason (never raises: the original exception is what matters)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            with shielded(drop=True):
                if isinstance(exc, Preempted):
                    requeue = bool(self.cfg.wandb.requeue_on_sigterm)
                    if requeue:
                        run.mark_preempting()
                    run.summary["meta/stopped"] = "SIGTERM, requeued" if requeue else "SIGTERM"
                    run.finish(exit_code=143)
                elif isinstance(exc, KeyboardInterrupt):
                    run.summary["meta/stopped"] = "interrupted"
                    run.finish(exit_code=130)
                else:
                    run.summary["meta/error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:1000]
                    run.finish(exit_code=1)
        except Exception as e:  # W&B itself is what failed: say so, keep the original error
            print(f"superweight: W&B could not record the end of the run: {type(e).__name__}: {e}", file=sys.stderr)
