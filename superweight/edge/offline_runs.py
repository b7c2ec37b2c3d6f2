"""Reading an offline W&B run back (tests, `superweight figures` from offline runs) with wandb's own reader.

The `.wandb` file of `<dir>/wandb/offline-run-*` is wandb-core's transaction log; wandb 0.31 ships its reader
as `wandb leet inspect --json` (one JSON object per record, decoded by wandb-core itself). `read_offline_run`
runs that reader through wandb-core directly (`wandb.util.get_core_path`, the binary the CLI execs) and folds
the records into the run's config, summary, history and artifacts; no part of the block format is parsed here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd


def records(wandb_file: str | Path) -> list[dict]:
    """Every record of one .wandb log as wandb-core decodes it: {"num", "type", <type>: body}."""
    from wandb.util import get_core_path

    f = Path(wandb_file).resolve()
    cmd = [get_core_path(), "leet", "inspect", "--json", "--no-observability", "--run-file", str(f),
           str(f.parent.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"wandb-core could not read {f}: {' '.join(proc.stderr.split())[:300]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _tables(summary: dict, files_dir: Path) -> dict:
    """Tables logged to the run (summary values of `_type: table-file`, nested or flattened `key._type`)."""
    out = {}
    nested = {k: v for k, v in summary.items() if isinstance(v, dict)}
    for k, v in summary.items():
        if k.endswith("._type") and v == "table-file":
            nested[k[: -len("._type")]] = {"_type": v, "path": summary.get(k[: -len("._type")] + ".path")}
    for key, val in nested.items():
        if val.get("_type") == "table-file" and val.get("path") and (files_dir / val["path"]).is_file():
            tab = json.loads((files_dir / val["path"]).read_text())
            out[key] = pd.DataFrame(tab["data"], columns=tab["columns"])
    return out


def read_offline_run(run_dir: str | Path) -> dict:
    """One offline run, folded from wandb's decoded records.

    Returns {"run": run record (run_id, project, run_group, tags, display_name, ...), "config": merged config,
    "summary": merged summary, "history": [history items], "artifacts": [{"name", "type", "aliases", "tags",
    "digest", "metadata", "files": {path: local path or reference URI}}], "used": [use_artifact records],
    "tables": {summary key: DataFrame}, "preempting": bool, "exit_code": int | None (None: no exit record,
    the process was killed)}."""
    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb")) if run_dir.is_dir() else [run_dir]
    if not logs or not logs[0].is_file():
        raise RuntimeError(f"no run-*.wandb record log in {run_dir}")
    out = {"run": {}, "config": {}, "summary": {}, "history": [], "artifacts": [], "used": [], "tables": {},
           "preempting": False, "exit_code": None}
    for rec in records(logs[0]):
        t = rec.get("type")
        body = rec.get(t) or {}
        if t == "run":
            out["config"].update((body.get("config") or {}).get("update") or {})
            out["run"] = {k: v for k, v in body.items() if k not in ("config", "summary", "telemetry")}
        elif t == "config":
            out["config"].update(body.get("update") or {})
        elif t == "summary":
            out["summary"].update(body.get("update") or {})
            for item in body.get("remove") or []:
                key = ".".join(item["nested_key"]) if item.get("nested_key") else item.get("key")
                out["summary"].pop(key, None)
        elif t == "history":
            out["history"].append(body.get("item") or {})
        elif t == "artifact":
            out["artifacts"].append({
                "name": body.get("name"), "type": body.get("type"), "aliases": list(body.get("aliases") or []),
                "tags": list(body.get("tags") or []), "digest": body.get("digest"),
                "metadata": json.loads(body["metadata"]) if body.get("metadata") else None,
                "files": {c["path"]: c.get("local_path") or c.get("ref")
                          for c in (body.get("manifest") or {}).get("contents") or []}})
        elif t == "use_artifact":
            out["used"].append({"name": body.get("name"), "type": body.get("type")})
        elif t == "preempting":
            out["preempting"] = True
        elif t == "exit":
            out["exit_code"] = int(body.get("exit_code", 0))
    out["config"].pop("_wandb", None)
    out["tables"] = _tables(out["summary"], run_dir / "files")
    return out


def offline_run_dirs(root: str | Path) -> list[Path]:
    """All `offline-run-*` directories under root (an out_dir or a wandb dir), oldest first."""
    return sorted(Path(root).rglob("offline-run-*"), key=lambda p: p.name)
