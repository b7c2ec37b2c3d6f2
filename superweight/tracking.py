"""Weights & Biases: one run per experiment (the only module that imports wandb).

What is logged, from the files of a finished out_dir (so a run can be (re)published any time):

* `run.config`  = the full dataclass config, `RunConfig.to_dict()` (scrubbed of secret-looking keys).
* `run.summary` = the baseline (`baseline/ppl`, `baseline/nll`, `baseline/acc`, tasks) and the headline
  deltas, means over seeds of Δ = perturbed − baseline:
  `delta_ppl/<pert>/<mode>/<metric>/<selection>/k<K>` (same for `delta_nll`, `delta_acc`),
  `gap_ppl/<pert>/<mode>/<metric>/k<K>` = ΔPPL(top_k) − ΔPPL(random_k) at equal K (the answer to the
  research question), `max_delta_ppl/<metric>` = max over K, perturbations and modes of the Top-K mean
  ΔPPL, `headline/max_delta_ppl_<selection>` (max over metrics as well), and
  `headline/k_to_double_ppl/<metric>` = the smallest K whose Top-K mean PPL ratio is ≥ 2 (first
  perturbation and mode; absent if none). Non-finite means are logged as None.
* `wandb.Table`s `tables/results`, `tables/rankings` (the top rows of rankings.csv), `tables/stability`
  (≤ 200,000 rows each; a truncation is recorded in the summary).
* Artifacts typed `results` (results.csv, perturbation_results.json), `rankings` (rankings.csv,
  stability.csv), `scores` (sensitivity_scores.safetensors), `manifest` (manifest.json), `plots`
  (plots/*), named `<type>-<run id>`; PNGs also as `plots/<name>` images and Plotly JSON as interactive
  `charts/<name>`.

Mode: `auto` = `WANDB_MODE` when set, else online when credentials exist (WANDB_API_KEY or a netrc
entry for the W&B host), else offline; `disabled` logs nothing. wandb files go under `wandb.dir` or
out_dir (`<dir>/wandb/offline-run-*`), artifact staging copies under `<dir>/wandb/staging` so `wandb sync`
can upload them later. The run id is stored in `out_dir/wandb_run.json`: publishing the same out_dir
again (same config hash) resumes the same W&B run (`resume="allow"`). Nothing secret is logged: the
config has no credential fields, and manifest.scrub redacts secret-looking keys.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from .io import atomic_write_json

MAX_TABLE_ROWS = 200_000
ARTIFACT_FILES = {
    "results": ["results.csv", "perturbation_results.json"],
    "rankings": ["rankings.csv", "stability.csv", "stability_summary.csv"],
    "scores": ["sensitivity_scores.safetensors"],
    "manifest": ["manifest.json"],
}
RUN_FILE = "wandb_run.json"


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


# ---------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------
def _num(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def summary_metrics(results: pd.DataFrame, baseline: dict) -> dict:
    """Baseline and headline deltas (see the module docstring for the keys and formulas)."""
    out: dict = {}
    for k, v in baseline.items():
        if _num(v) is not None or isinstance(v, (int, float)):
            out[f"baseline/{k}"] = _num(v)
    if results is None or results.empty:
        return out
    keys = ["perturbation", "mode", "metric", "selection", "k"]
    vals = [c for c in ("delta_ppl", "delta_nll", "delta_acc", "ppl_ratio") if c in results.columns]
    r = results[keys + vals].copy()
    for c in vals:
        r[c] = pd.to_numeric(r[c], errors="coerce")
    means = r.groupby(keys, sort=False)[vals].mean()
    for (pert, mode, metric, sel, k), row in means.iterrows():
        for c in ("delta_ppl", "delta_nll", "delta_acc"):
            if c in row:
                out[f"{c}/{pert}/{mode}/{metric}/{sel}/k{k}"] = _num(row[c])
    sels = set(r["selection"])
    if "top_k" in sels and "random_k" in sels:
        for (pert, mode, metric, k), g in means.reset_index().groupby(["perturbation", "mode", "metric", "k"], sort=False):
            t = g[g["selection"] == "top_k"]["delta_ppl"]
            rnd = g[g["selection"] == "random_k"]["delta_ppl"]
            if len(t) and len(rnd):
                out[f"gap_ppl/{pert}/{mode}/{metric}/k{k}"] = _num(t.iloc[0] - rnd.iloc[0])
    m = means.reset_index()
    for metric, g in m[m["selection"] == "top_k"].groupby("metric", sort=False):
        out[f"max_delta_ppl/{metric}"] = _num(g["delta_ppl"].max())
    for sel, g in m.groupby("selection", sort=False):
        out[f"headline/max_delta_ppl_{sel}"] = _num(g["delta_ppl"].max())
    if "ppl_ratio" in m.columns:
        first = m[(m["perturbation"] == m["perturbation"].iloc[0]) & (m["mode"] == m["mode"].iloc[0])
                  & (m["selection"] == "top_k")]
        for metric, g in first.groupby("metric", sort=False):
            hit = g[g["ppl_ratio"] >= 2.0]["k"]
            if len(hit):
                out[f"headline/k_to_double_ppl/{metric}"] = int(hit.min())
    return out


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


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def log_run(cfg, out_dir: str | Path, config_hash: str | None = None) -> dict:
    """Log a finished out_dir to W&B. Returns {"mode", "id", "path", "url", "dir", ...}; with mode
    disabled returns {"mode": "disabled"} and touches nothing. Also records the same dict under
    "wandb" in out_dir/manifest.json (before the manifest artifact is logged)."""
    from .manifest import scrub

    out = Path(out_dir)
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        return {"mode": "disabled"}
    import wandb

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    config_hash = config_hash or manifest.get("config_hash")
    wdir = (Path(cfg.wandb.dir) if cfg.wandb.dir else out).resolve()  # absolute: a shared wandb-core
    wdir.mkdir(parents=True, exist_ok=True)                              # service may run in another cwd
    prev = {}
    if (out / RUN_FILE).exists():
        try:
            prev = json.loads((out / RUN_FILE).read_text())
        except json.JSONDecodeError:
            prev = {}
    run_id = None
    if not os.environ.get("WANDB_RUN_ID"):  # wandb agent sets the id of a sweep run
        run_id = prev.get("id") if prev.get("config_hash") == config_hash else None
        run_id = run_id or _new_id()
    results = pd.read_csv(out / "results.csv") if (out / "results.csv").exists() else pd.DataFrame()
    baseline = manifest.get("baseline") or {}

    with _env(WANDB_DATA_DIR=str((wdir / "wandb" / "staging").resolve())):
        run = wandb.init(
            mode=mode, project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group,
            tags=list(cfg.wandb.tags) or None, name=cfg.wandb.name or out.resolve().name,
            config=scrub(cfg.to_dict()), dir=str(wdir), id=run_id, resume="allow", job_type="experiment",
            save_code=False, reinit="finish_previous",
        )
        try:
            info = {"mode": mode, "id": run.id, "project": run.project, "entity": run.entity or None,
                    "path": "/".join(p for p in (run.entity, run.project, run.id) if p),
                    "url": run.url if mode == "online" else None,
                    "dir": str(Path(run.dir).parent.resolve()), "config_hash": config_hash}
            atomic_write_json(out / RUN_FILE, info)
            if manifest:
                manifest["wandb"] = {k: v for k, v in info.items() if k != "config_hash"}
                atomic_write_json(manifest_path, manifest)

            summary = summary_metrics(results, baseline)
            summary["meta/config_hash"] = config_hash
            summary["meta/out_dir"] = str(out.resolve())
            log: dict = {}
            for name in ("results", "rankings", "stability"):
                p = out / f"{name}.csv"
                if p.exists():
                    df = pd.read_csv(p)
                    if len(df) > MAX_TABLE_ROWS:
                        summary[f"tables/{name}_rows_dropped"] = len(df) - MAX_TABLE_ROWS
                    log[f"tables/{name}"] = _table(df)
            plot_dir = out / "plots"
            if plot_dir.is_dir():
                import plotly.io as pio

                for png in sorted(plot_dir.glob("*.png")):
                    log[f"plots/{png.stem}"] = wandb.Image(str(png))
                for js in sorted(plot_dir.glob("*.json")):
                    log[f"charts/{js.stem}"] = wandb.Plotly(pio.read_json(str(js)))
            run.log(log)
            for k, v in summary.items():
                run.summary[k] = v

            meta = {"out_dir": str(out.resolve()), "config_hash": config_hash, "run_name": run.name}
            kinds = dict(ARTIFACT_FILES)
            if plot_dir.is_dir():
                kinds["plots"] = [str(p.relative_to(out)) for p in sorted(plot_dir.iterdir()) if p.is_file()]
            for kind, files in kinds.items():
                present = [f for f in files if (out / f).is_file()]
                if not present:
                    continue
                art = wandb.Artifact(f"{kind}-{run.id}", type=kind, metadata=meta)
                for f in present:
                    art.add_file(str(out / f), name=f)
                run.log_artifact(art)
        finally:
            run.finish()
    return info


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
