"""Weights & Biases, as its users live in it: the experiment's tracker (experiment.Tracker).

The run is live from before the model loads until the end, and an interrupted run comes back into the same
W&B run. wandb is imported only by the edge (this module, lineage.py, wandb_mode.py, offline_runs.py).

* `start`   wandb.init after the config and capabilities are validated (bad input creates no run).
            `run.config` is the FLAT dotted config (`model.name`, `perturb.scale`, ...), the keys a sweep
            YAML names, so `wandb agent` overriding a swept key changes only that key, plus the undotted
            scalar axis keys (run_identity.py); the keys that say where a run ran (out_dir, cache_dir,
            wandb.dir, wandb.group) go to summary `meta/*`. Name, group and job type: run_identity.py.
            The run id is the agent's (WANDB_RUN_ID) or the one in out_dir/wandb_run.json when the config
            hash matches (a rerun resumes the same run). An id W&B refuses (a deleted run: W&B never reuses
            its id) is recorded in wandb_run.json (`refused_ids`) and the run starts under a new id, which is
            recorded too. Under an agent (WANDB_SWEEP_ID) project/entity/id come from the sweep.
            A resumed run's summary holds the earlier attempt's summary (wandb reloads it): the keys that
            described how that attempt ended (STALE_SUMMARY) are removed at every start.
* `log_row` one history step per finished row: `row` (counter, the x axis of `row/*`), `progress`,
            `eta_s` and `row/<column>`. Rows a resumed online run already has (its starting step) are not
            logged twice. An offline record cannot be resumed, so an offline rerun logs every row again; when
            it holds every row the earlier offline records of the same run id held, they are marked
            superseded with wandb's own `.wandb.synced` marker, and `wandb sync <out_dir>/wandb` uploads
            exactly one complete history per run (the newest record).
* `log_stage` stage timings into the summary as they happen (`stage/<name>_s`); system metrics by W&B.
* `finish`  the summary (results.summary_metrics: baseline, deltas, gaps with CIs, headline; plus the sweep
            metric `sweep/max_delta_nll_top_k`, finite for every run: SWEEP_NLL_CAP), plots as images/charts
            and the out_dir CSVs as tables (lineage.log_tables), committed with the last row's step; output
            artifacts (lineage.log_outputs). Then, outside the signal shield, the score sets the run used
            (lineage.declare_score_sets: a reference by default, never a staging copy), then `run.finish`.
            A SIGTERM/SIGINT that arrives once the W&B run is finished changes nothing: `late_signal` says
            which, and the command exits 0.
* `fail`    a crash marks the run failed (exit code 1, `meta/error`). SIGTERM (a preempted VM, `kill`, the
            agent's own stop command) exits 143 and, with wandb.requeue_on_sigterm=true (the shipped sweeps
            set it), first marks the run preempting, so the sweep controller requeues it. The agent's stop
            (`proc.terminate()` in wandb/wandb_agent.py: early termination, a stop sent to the agent) is the
            same SIGTERM, so under requeue_on_sigterm such a run is requeued too (README, W&B section).
            SIGINT (Ctrl-C, or a Stop in the W&B UI: wandb's run-stop checker interrupts the run's main thread
            with SIGINT) exits 130 and is never marked preempting: a stopped run is not requeued.

Signals: signals.py (no W&B call is torn by a signal). Mode: wandb_mode.py (wandb's own credential lookup).
Offline runs go to `<wandb.dir or out_dir>/wandb/offline-run-*`; offline_runs.py reads them back with wandb's
reader. A W&B failure raises TrackingError (non-zero exit); the result files are already on disk. Nothing
secret is logged (manifest.scrub).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from ..config import TrackConfig, to_flat
from ..core.summary import finite_or_none, summary_metrics, within_support
from ..files import atomic_write_json, atomic_write_text
from .lineage import declare_score_sets, log_outputs, log_tables
from .run_identity import LOCAL_KEYS, axis_config, model_slug, run_config, run_group, run_name
from .signals import Preempted, shielded
from .sweep import agent_params
from .wandb_mode import resolve_mode

RUN_FILE = "wandb_run.json"
ROW_KEYS = ("metric", "seed", "mode", "selection", "draw", "k", "perturbation", "n_selected", "support", "ppl", "nll",
            "acc", "delta_ppl", "delta_nll", "delta_nll_lo", "delta_nll_hi", "ppl_ratio", "changed", "delta_w_l2",
            "mean_abs_w")
STALE_SUMMARY = ("meta/stopped", "meta/error")  # how an earlier attempt ended: never true of this one
SWEEP_METRIC = "sweep/max_delta_nll_top_k"
SWEEP_NLL_CAP = 30.0  # nats/token (a perplexity ratio of e^30): a broken model (inf/NaN NLL) counts as this


class TrackingError(RuntimeError):
    """W&B failed (init, logging or upload): the command exits non-zero; result files stay on disk."""


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


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def sweep_id() -> str | None:
    """The W&B sweep id (wandb agent), or the local sweep's group (`superweight sweep`)."""
    return os.environ.get("WANDB_SWEEP_ID") or os.environ.get("SUPERWEIGHT_SWEEP_GROUP") or None


def sweep_metric(results) -> float:
    """The largest mean ΔNLL of a Top-K cell (mean over seeds and draws per perturbation, mode, metric, K),
    each cell capped to ±SWEEP_NLL_CAP and a non-finite one (inf or NaN: the perturbed model broke) counted
    as +SWEEP_NLL_CAP, so the sweep's sort key is a finite number for every run; 0.0 without Top-K rows.
    Top-K rows past their metric's support are left out (`within_support`, as in every summary)."""
    if results is None or results.empty or "delta_nll" not in results.columns:
        return 0.0
    results = within_support(results)
    top = results[results["selection"] == "top_k"]
    if top.empty:
        return 0.0
    import pandas as pd

    means = pd.to_numeric(top["delta_nll"], errors="coerce").groupby(
        [top["perturbation"], top["mode"], top["metric"], top["k"]], sort=False).mean()
    vals = [min(max(float(v), -SWEEP_NLL_CAP), SWEEP_NLL_CAP) if math.isfinite(float(v)) else SWEEP_NLL_CAP
            for v in means]
    return max(vals)


REFUSED_ID = "previously created and deleted"  # the server's GraphQL error for a deleted run's id


def refused_id(e: BaseException) -> bool:
    """W&B refused the run id itself: the server answers the upsert of a deleted run's id with HTTP 409 and the
    GraphQL error `run <id> was previously created and deleted; try a new run name`. wandb-core hands wandb.init
    the GraphQL message (not the HTTP status) as ErrorInfo COMMUNICATION, which wandb.init raises as
    wandb.errors.CommError (wandb/errors/util.py ProtobufErrorHandler). Any other error is not a refusal."""
    from wandb.errors import AuthenticationError, CommError

    return isinstance(e, CommError) and not isinstance(e, AuthenticationError) and REFUSED_ID in str(e).lower()


def swept_params() -> dict:
    """The agent's parameters of this run (its WANDB_SWEEP_PARAM_PATH file), or {}."""
    try:
        return agent_params()
    except Exception:  # checked (one clear line) before the tracker starts: see commands/run.py
        return {}


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
        self.last_row = 0  # the last row number this process logged
        self.pending = False  # the last row's step is left open for the final media
        self.late_signal: str | None = None  # SIGTERM/SIGINT that arrived after the W&B run finished
        self.marked_preempting = False
        self.record_dir: Path | None = None
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
                raise TrackingError(f"wandb.init failed: {_one_line(e)}") from e
            raise

    def _init(self, exp) -> None:
        import wandb

        cfg, chash = self.cfg, exp.chash
        log = getattr(exp, "log", None)
        self.resumed_rows = sum(1 for k in getattr(log, "done", {}) if k and k[0] == "row")
        wdir = (Path(cfg.wandb.dir) if cfg.wandb.dir else self.out).resolve()  # absolute: a shared wandb-core
        wdir.mkdir(parents=True, exist_ok=True)                              # service may run in another cwd
        try:
            prev = json.loads((self.out / RUN_FILE).read_text()) if (self.out / RUN_FILE).exists() else {}
        except json.JSONDecodeError:
            prev = {}
        refused = list(prev.get("refused_ids") or [])
        kwargs = {}
        if not os.environ.get("WANDB_SWEEP_ID"):  # under an agent wandb.init ignores (and warns about) these
            default = TrackConfig().project
            kwargs["project"] = (os.environ.get("WANDB_PROJECT") or default) if cfg.wandb.project == default \
                else cfg.wandb.project
            kwargs["entity"] = cfg.wandb.entity
            if not os.environ.get("WANDB_RUN_ID") and prev.get("config_hash") == chash and prev.get("id"):
                kwargs["id"] = prev["id"]
        self.staging = (wdir / "wandb" / "staging").resolve()
        init = dict(mode=self.mode, group=run_group(cfg), tags=list(cfg.wandb.tags) or None,
                    name=cfg.wandb.name or run_name(cfg), config={**run_config(cfg), **axis_config(cfg, swept_params())},
                    dir=str(wdir), resume="allow", job_type="experiment", save_code=False, reinit="finish_previous")
        with _env(WANDB_DATA_DIR=str(self.staging)):
            try:
                self.run = wandb.init(**init, **kwargs)
            except Exception as e:
                if not (kwargs.get("id") and refused_id(e)):
                    raise
                refused.append(kwargs.pop("id"))  # a deleted run's id: start a new run, say so
                print(f"superweight: W&B refused run id {refused[-1]} ({_one_line(e)[:200]}); starting a new "
                      "W&B run", file=sys.stderr)
                self.run = wandb.init(**init, **kwargs)
        run = self.run
        run.define_metric("row")
        run.define_metric("row/*", step_metric="row")
        self.logged_before = int(run.starting_step or 0) if run.resumed else 0
        self.record_dir = Path(run.dir).parent.resolve()
        self._info = {"mode": self.mode, "id": run.id, "project": run.project, "entity": run.entity or None,
                      "path": "/".join(p for p in (run.entity, run.project, run.id) if p),
                      "url": run.url if self.mode == "online" else None, "sweep_id": sweep_id(),
                      "dir": str(self.record_dir), "config_hash": chash}
        if refused:
            self._info["refused_ids"] = refused
        atomic_write_json(self.out / RUN_FILE, self._info)
        for k in STALE_SUMMARY:
            del run.summary[k]  # a remove record: wandb drops the key if the resumed summary has it
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
        self.last_row = done

    def log_stage(self, name: str, seconds: float) -> None:
        if self.run is not None:
            with shielded():
                self.run.summary[f"stage/{name}_s"] = round(seconds, 3)

    def finish(self, result, files: dict[str, list[str]]) -> None:
        """Publish `result` and the files the sink wrote (`files`: kind -> paths relative to out_dir)."""
        if self.run is None:
            return
        try:
            with shielded():
                model = self._publish(result, files)
            inputs = declare_score_sets(self.run, self.cfg, result, model, offline=self.mode == "offline")
            with shielded():
                for k, v in inputs.items():
                    self.run.summary[f"inputs/{k}"] = v
                self.run.finish(exit_code=0)
                self.run = None
                self._supersede_offline()
        except (Preempted, KeyboardInterrupt) as e:
            if self.run is not None:
                raise
            self.late_signal = "SIGTERM" if isinstance(e, Preempted) else "SIGINT"  # the run was complete
        except Exception as e:
            if isinstance(e, TrackingError):
                raise
            raise TrackingError(f"publishing to W&B failed: {_one_line(e)}") from e

    def _publish(self, result, files: dict[str, list[str]]) -> str:
        import wandb

        run, out, cfg = self.run, self.out, self.cfg
        with _env(WANDB_DATA_DIR=str(self.staging)):
            summary = summary_metrics(result.table, result.baseline, result.gaps)
            summary[SWEEP_METRIC] = sweep_metric(result.table)
            summary["stage/total_s"] = round(time.perf_counter() - self.t0, 3)
            media, rows = log_tables(out, files)
            summary.update(rows)
            for k, v in summary.items():
                run.summary[k] = v
            plots = files.get("plots", [])
            for f in (f for f in plots if f.endswith(".png")):
                media[f"plots/{Path(f).stem}"] = wandb.Image(str(out / f))
            for f in (f for f in plots if f.endswith(".json")):
                import plotly.io as pio

                media[f"charts/{Path(f).stem}"] = wandb.Plotly(pio.read_json(str(out / f)))
            if media or self.pending:
                run.log(media, commit=True)  # into the last row's step, when this process logged it
            self.pending = False
            model = model_slug(cfg.model.name)
            log_outputs(run, cfg, result, out, model, sweep_id(), files)
        return model

    def _supersede_offline(self) -> None:
        """Mark the earlier offline records of this run id synced once this record holds every row they held
        (module docstring): `wandb sync` then uploads one complete history per run."""
        if self.mode != "offline" or self.record_dir is None or self.last_row < self.resumed_rows:
            return
        run_id = self._info.get("id")
        for d in sorted(self.record_dir.parent.glob(f"offline-run-*-{run_id}")):
            if d.name >= self.record_dir.name:
                continue
            for f in d.glob("run-*.wandb"):
                atomic_write_text(f.with_suffix(".wandb.synced"),
                                  f"superseded by {self.record_dir.name}, which logged every row again\n")

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
                        self.marked_preempting = True
                    run.summary["meta/stopped"] = "SIGTERM, marked preempting (requeued)" if requeue else "SIGTERM"
                    run.finish(exit_code=143)
                elif isinstance(exc, KeyboardInterrupt):
                    run.summary["meta/stopped"] = "SIGINT (Ctrl-C or a W&B UI Stop), not requeued"
                    run.finish(exit_code=130)
                else:
                    run.summary["meta/error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:1000]
                    run.finish(exit_code=1)
                self._supersede_offline()
        except Exception as e:  # W&B itself is what failed: say so, keep the original error
            print(f"superweight: W&B could not record the end of the run: {type(e).__name__}: {e}", file=sys.stderr)
