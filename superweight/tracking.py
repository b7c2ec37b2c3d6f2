"""Weights & Biases, as its users live in it (the only module that imports wandb).

`WandbTracker` is the experiment's tracker (experiment.Tracker): the run is live from before the model
loads until the end, and an interrupted run comes back into the same W&B run.

* `start`   wandb.init after the config and capabilities are validated. `run.config` is the FLAT dotted
            config (`model.name`, `perturb.scale`, ...), the same keys a sweep YAML names, so `wandb agent`
            overriding a swept key changes only that key. The run id is the agent's (WANDB_RUN_ID) or the one
            in out_dir/wandb_run.json when the config hash matches (a rerun resumes the same run).
* `log_row` one history step per finished row: `row` (counter), `progress`, `eta_s` and `row/<column>`.
* `log_stage` stage timings into the summary as they happen (`stage/<name>_s`); system metrics by W&B.
* `finish`  the summary (results.summary_metrics: baseline, deltas, gaps with CIs, headline), plots as
            images/charts (committed with the last row's step), and artifacts with lineage:
              results-<model>   results.csv, gaps.csv, perturbation_results.json, results table
              rankings-<model>  rankings.csv, selections.safetensors, stability*.csv
              plots-<model>     plots/*
              manifest-<model>  manifest.json
            each version aliased `cfg-<config hash>`, `run-<run id>` (and `sweep-<id>` in a sweep); inputs:
              scores-<model>-<metric>  one cached score set per seed, aliased `key-<cache key>` and `seed<N>`:
                                       identical content = one version, so the runs of a sweep that share a
                                       score set share one artifact digest (uploaded, or a file:// reference to
                                       the shared cache with wandb.scores=reference)
            declared with `use_artifact` online (the lineage graph shows who shares it); offline, where
            use_artifact is unavailable, logged by each run (same digest), named in `inputs/*` of the summary.
* `fail`    a crash marks the run failed with the error; SIGTERM with wandb.requeue_on_sigterm marks it
            preempting (the agent requeues it) and exits non-zero; Ctrl-C exits 130 with a resume hint.

Mode: `auto` = WANDB_MODE when set, else online when credentials exist (WANDB_API_KEY or a netrc entry),
else offline; `disabled` logs nothing. Offline runs go to `<wandb.dir or out_dir>/wandb/offline-run-*` and
`wandb sync` uploads the whole history later. A W&B failure raises (non-zero exit); the result files are
already on disk. Nothing secret is logged (manifest.scrub).
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from .config import is_result_key, to_flat
from .io import atomic_write_json
from .manifest import scrub
from .resources import cache_root
from .results import summary_metrics

MAX_TABLE_ROWS = 200_000
RUN_FILE = "wandb_run.json"
ROW_KEYS = ("metric", "seed", "mode", "selection", "draw", "k", "perturbation", "n_selected", "support", "ppl", "nll",
            "acc", "delta_ppl", "delta_nll", "delta_nll_lo", "delta_nll_hi", "ppl_ratio", "changed", "delta_w_l2",
            "mean_abs_w")


class Preempted(SystemExit):
    """Raised by the SIGTERM handler of `superweight run` (exit code 143)."""

    def __init__(self):
        super().__init__(143)


# ---------------------------------------------------------------------------------------------------
# mode
# ---------------------------------------------------------------------------------------------------
def has_credentials(env=None) -> bool:
    """WANDB_API_KEY set, or a netrc entry for the W&B API host (what `wandb login` writes)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str, env=None) -> str:
    """auto -> WANDB_MODE if set, else online with credentials, else offline."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    wm = (env.get("WANDB_MODE") or "").strip().lower()
    if wm in ("offline", "dryrun"):
        return "offline"
    if wm == "disabled":
        return "disabled"
    if wm in ("online", "run"):
        return "online"
    return "online" if has_credentials(env) else "offline"


def _num(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _table(df: pd.DataFrame):
    import wandb

    df = df.head(MAX_TABLE_ROWS).copy()
    for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].map(_num).astype(object)
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


def config_columns(cfg) -> dict:
    """The result-relevant config keys as columns for merged results tables (model, dtype, prob, bits, ...)."""
    skip = ("score.metrics", "perturb.names", "seeds", "select.topk", "select.modes", "select.controls")
    out = {}
    for k, v in to_flat(cfg).items():
        if is_result_key(k) and k not in skip:
            out[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


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
        self.first_row: int | None = None
        self.pending = False  # the last row's step is left open for the final media
        self._info: dict = {"mode": self.mode}

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self, exp) -> None:
        if self.mode == "disabled":
            return
        import wandb

        cfg, chash = self.cfg, exp.chash
        wdir = (Path(cfg.wandb.dir) if cfg.wandb.dir else self.out).resolve()  # absolute: a shared wandb-core
        wdir.mkdir(parents=True, exist_ok=True)                              # service may run in another cwd
        prev = {}
        try:
            prev = json.loads((self.out / RUN_FILE).read_text()) if (self.out / RUN_FILE).exists() else {}
        except json.JSONDecodeError:
            prev = {}
        run_id = os.environ.get("WANDB_RUN_ID") or (prev.get("id") if prev.get("config_hash") == chash else None)
        self.staging = (wdir / "wandb" / "staging").resolve()
        with _env(WANDB_DATA_DIR=str(self.staging)):
            self.run = wandb.init(
                mode=self.mode, project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group,
                tags=list(cfg.wandb.tags) or None, name=cfg.wandb.name or self.out.resolve().name,
                config=scrub(to_flat(cfg)), dir=str(wdir), id=run_id, resume="allow", job_type="experiment",
                save_code=False, reinit="finish_previous",
            )
        run = self.run
        run.define_metric("row")
        run.define_metric("row/*", step_metric="row")
        self._info = {"mode": self.mode, "id": run.id, "project": run.project, "entity": run.entity or None,
                      "path": "/".join(p for p in (run.entity, run.project, run.id) if p),
                      "url": run.url if self.mode == "online" else None, "sweep_id": os.environ.get("WANDB_SWEEP_ID"),
                      "dir": str(Path(run.dir).parent.resolve()), "config_hash": chash}
        atomic_write_json(self.out / RUN_FILE, self._info)
        run.summary["meta/config_hash"] = chash
        run.summary["meta/out_dir"] = str(self.out.resolve())

    def info(self) -> dict:
        return {k: v for k, v in self._info.items() if k != "config_hash"}

    def log_row(self, row: dict, done: int, total: int) -> None:
        if self.run is None:
            return
        if self.first_row is None:
            self.first_row = done
        new = done - self.first_row + 1
        rate = (time.perf_counter() - self.t0) / max(new, 1)
        item = {"row": done, "progress": done / max(total, 1), "eta_s": rate * (total - done)}
        for k in ROW_KEYS:
            if k in row and row[k] is not None:
                v = row[k]
                item[f"row/{k}"] = v if isinstance(v, str) else _num(v)
        last = done >= total
        self.run.log(item, commit=not last)
        self.pending = last

    def log_stage(self, name: str, seconds: float) -> None:
        if self.run is not None:
            self.run.summary[f"stage/{name}_s"] = round(seconds, 3)

    def finish(self, result) -> None:
        if self.run is None:
            return
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
                run.log(media, commit=True)  # the last row's step, when this run logged it
            model = slug(cfg.model.name)
            aliases = [f"cfg-{result.config_hash}", f"run-{run.id}"]
            if os.environ.get("WANDB_SWEEP_ID"):
                aliases.append(f"sweep-{os.environ['WANDB_SWEEP_ID']}")
            meta = {"out_dir": str(out.resolve()), "config_hash": result.config_hash, "run": run.id,
                    "config": scrub(to_flat(cfg))}
            cols = config_columns(cfg)
            table = df.assign(**{k: [v] * len(df) for k, v in cols.items()}) if len(df) else df
            files = {
                "results": ["results.csv", "gaps.csv", "perturbation_results.json"],
                "rankings": ["rankings.csv", "selections.safetensors", "stability.csv", "stability_summary.csv"],
                "manifest": ["manifest.json"],
            }
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
            inputs = self.declare_inputs(result, model)
            for k, v in inputs.items():
                run.summary[f"inputs/{k}"] = v
        self.run.finish(exit_code=0)
        self.run = None

    def declare_inputs(self, result, model: str) -> dict:
        """The score sets this run read or computed, as artifacts named by their cache key (module docstring)."""
        import wandb

        if self.cfg.wandb.scores == "none":
            return {}
        keys = result.extra.get("score_keys", {})
        root = cache_root(self.cfg.cache_dir) / "scores"
        names = {}
        for tag, key in keys.items():
            path = root / f"{key}.safetensors"
            if not path.is_file():
                continue
            metric, _, seed = tag.partition(".seed")
            art = wandb.Artifact(f"scores-{model}-{slug(metric)}", type="scores",
                                 metadata={"cache_key": key, "metric": metric, "seed": int(seed),
                                           "model_fingerprint": result.model.get("fingerprint")})
            if self.cfg.wandb.scores == "reference":
                art.add_reference(path.resolve().as_uri(), name=path.name)
            else:
                art.add_file(str(path), name="scores.safetensors")
            aliases = [f"key-{key[:16]}", f"seed{seed}"]
            if self.mode == "offline":  # use_artifact needs a server; the same content gives the same digest
                self.run.log_artifact(art, aliases=aliases)
            else:
                self.run.use_artifact(art, aliases=aliases)
            names[tag] = f"{art.name}:key-{key[:16]}"
        return names

    def fail(self, exc: BaseException) -> None:
        if self.run is None:
            return
        run = self.run
        self.run = None
        if isinstance(exc, Preempted):
            if self.cfg.wandb.requeue_on_sigterm:
                run.mark_preempting()
            run.summary["meta/stopped"] = "SIGTERM"
            run.finish(exit_code=143)
        elif isinstance(exc, KeyboardInterrupt):
            run.summary["meta/stopped"] = "interrupted"
            run.finish(exit_code=130)
        else:
            run.summary["meta/error"] = f"{type(exc).__name__}: {exc}"[:1000]
            run.finish(exit_code=1)


# ---------------------------------------------------------------------------------------------------
# reading an offline run back (tests, figures from offline runs)
# ---------------------------------------------------------------------------------------------------
def _new_id() -> str:
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _wandb_cli() -> list[str]:
    exe = Path(sys.executable).parent / "wandb"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "wandb"]


def read_offline_run(run_dir: str | Path) -> dict:
    """Parse an offline run's .wandb record log with `wandb leet inspect --json` (wandb's own reader).

    Returns {"run": run record, "config": merged config, "summary": merged summary updates,
    "history": [history items], "artifacts": [{"name", "type", "metadata", "files": {path: local_path}}],
    "tables": {key: DataFrame}, "exit_code": int | None}."""
    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb")) if run_dir.is_dir() else []
    if run_dir.is_dir() and not logs:
        raise RuntimeError(f"no run-*.wandb record log in {run_dir}")
    target = logs[0] if logs else run_dir  # the record log itself: no `latest-run` lookup
    proc = subprocess.run([*_wandb_cli(), "leet", "inspect", "--json", str(target)], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect failed on {run_dir}: {proc.stderr.strip()[:500]}")
    out = {"run": {}, "config": {}, "summary": {}, "history": [], "artifacts": [], "tables": {}, "exit_code": None}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        t = rec.get("type")
        body = rec.get(t, {})
        if t == "run":
            out["run"] = body
            out["config"].update((body.get("config") or {}).get("update", {}))
        elif t == "config":
            out["config"].update(body.get("update", {}))
        elif t == "summary":
            out["summary"].update(body.get("update", {}))
        elif t == "history":
            out["history"].append(body.get("item", {}))
        elif t == "artifact":
            files = {c["path"]: c.get("local_path") for c in body.get("manifest", {}).get("contents", [])}
            meta = body.get("metadata")
            out["artifacts"].append({"name": body.get("name"), "type": body.get("type"), "files": files,
                                     "metadata": json.loads(meta) if isinstance(meta, str) and meta else meta})
        elif t == "exit":
            out["exit_code"] = body.get("exit_code", 0)
    out["config"].pop("_wandb", None)
    files_dir = run_dir / "files"
    for key, val in out["summary"].items():
        if key.endswith(".path") and out["summary"].get(key[:-5] + "._type") == "table-file":
            p = files_dir / val
            if p.exists():
                tab = json.loads(p.read_text())
                out["tables"][key[:-5]] = pd.DataFrame(tab["data"], columns=tab["columns"])
    return out


def offline_run_dirs(root: str | Path) -> list[Path]:
    """All `offline-run-*` directories under root (an out_dir or a wandb dir), oldest first."""
    return sorted(Path(root).rglob("offline-run-*"), key=lambda p: p.name)
