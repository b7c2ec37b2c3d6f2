"""`superweight sweep SWEEP.yaml`: run a W&B sweep file locally, one run after another, exactly as
`wandb agent` runs it (see superweight.edge.sweep)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import parse_command
from ..config import ConfigError
from ..files import atomic_write_json, atomic_write_text
from ..edge.sweep import ENV_DIR, ENV_GROUP, param_file, plan, write_param_file
from .base import register


@dataclass
class SweepOptions:
    """superweight sweep's options."""

    path: list[str] = field(default_factory=list)  # the sweep YAML file
    dry_run: bool = False  # print the runs (and which are finished) without running them
    count: int | None = None  # run at most N runs (method random: how many to draw)
    seed: int = 0  # seed of method random's draws
    sweep_dir: str | None = None  # where the runs' out_dirs go (default outputs/sweeps/<name>-<hash>; a shared filesystem lets another machine resume)
    online: bool = False  # log to W&B online (default: offline runs under each out_dir; `wandb sync` uploads them)


@register("sweep", usage="usage: superweight sweep SWEEP.yaml [--dry-run] [--count N] [--seed S] [--sweep-dir DIR] "
                         "[--online]", options=SweepOptions, run_config=False)
def main(argv: list[str]) -> int:
    """Expands the YAML like the W&B sweep controller (grid: Cartesian product in parameter-name order;
    random: seeded draws), validates every run before the first starts, and starts each run the way the agent
    does (WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH in the agent's format, then the YAML's command line), with the
    YAML's project/entity. Finished runs are skipped, so a killed sweep resumes."""
    o, _ = parse_command(list(argv), SweepOptions, positional="path")
    if len(o.path) != 1:
        raise ConfigError("give one sweep YAML file; usage: superweight sweep sweeps/smoke.yaml [--dry-run]"
                          if not o.path else f"unexpected argument '{o.path[1]}': give one sweep YAML file")
    if o.count is not None and o.count <= 0:
        raise ConfigError(f"option '--count' must be > 0, got {o.count}")
    path = o.path[0]
    p = plan(path, o.count, o.seed, o.sweep_dir)
    root: Path = p["dir"]
    env_vars = {ENV_DIR: str(root), ENV_GROUP: p["group"]}  # no WANDB_SWEEP_ID: no such sweep on the server
    if not o.online:
        env_vars["WANDB_MODE"] = "offline"
    for key in ("project", "entity"):
        if p["sweep"].get(key):
            env_vars[f"WANDB_{key.upper()}"] = str(p["sweep"][key])
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars.items())
    n = len(p["runs"])
    todo = [r for r in p["runs"] if not r["finished"]]
    print(f"sweep {p['group']}: {n} runs ({n - len(todo)} finished, {len(todo)} to run) -> {root}")
    if o.dry_run:
        for i, r in enumerate(p["runs"], 1):
            state = "done" if r["finished"] else "todo"
            print(f"[{i}/{n} {state}] {prefix} WANDB_RUN_ID={r['run_id']} "
                  f"WANDB_SWEEP_PARAM_PATH={shlex.quote(str(param_file(root, p['group'], r['run_id'])))} "
                  f"{shlex.join(r['command'])}")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "sweep.json", {
        "group": p["group"], "source": str(path), "sweep": p["sweep"],
        "runs": [{"params": r["params"], "out_dir": r["out_dir"], "run_id": r["run_id"], "command": r["command"]}
                 for r in p["runs"]],
    })
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "WANDB_SWEEP_ID")}  # own wandb-core
    base.update(env_vars)
    base["PATH"] = str(Path(sys.executable).parent) + os.pathsep + base.get("PATH", "")
    failed = []
    for i, r in enumerate(p["runs"], 1):
        if r["finished"]:
            print(f"[{i}/{n}] finished, skipping: {r['out_dir']}")
            continue
        pfile = write_param_file(param_file(root, p["group"], r["run_id"]), r["params"])
        atomic_write_text(pfile.with_suffix(".json"), json.dumps(r["params"]))  # ${args_json_file}, as the agent
        env = {**base, "WANDB_RUN_ID": r["run_id"], "WANDB_SWEEP_PARAM_PATH": str(pfile)}
        print(f"[{i}/{n}] {shlex.join(r['command'])}", flush=True)
        rc = subprocess.run(r["command"], env=env).returncode
        if rc != 0:
            if rc in (130, -2):
                raise KeyboardInterrupt
            print(f"[{i}/{n}] failed with exit code {rc}: {r['out_dir']}", file=sys.stderr)
            failed.append(r["out_dir"])
    print(f"sweep {p['group']}: {n - len(failed)}/{n} runs finished under {root}")
    print(f"figures: superweight figures {root}")
    return 1 if failed else 0
