"""`superweight sweep SWEEP.yaml [--dry-run] [--count N] [--seed S] [--sweep-dir DIR] [--online]`

Runs a W&B sweep file locally, offline, one run after another, as `wandb agent` would run it:

  * the same YAML works unchanged with `wandb sweep SWEEP.yaml` + `wandb agent ID` on GPU VMs;
  * `method: grid` expands like the W&B sweep controller: parameters sorted by name, the Cartesian
    product of their `values` (int_uniform / q_uniform become value lists) in that order, `run_cap`
    runs at most; `method: random` draws `run_cap` (or --count) runs with a seeded RNG (--seed, default 0);
    `bayes` needs the W&B server;
  * each run is the agent's command line: `command` with `${env}` -> /usr/bin/env, `${interpreter}` ->
    python (this interpreter's directory goes first on PATH), `${program}`, and `${args}` -> one
    `--name=value` per parameter (name order, Python str() of the value, e.g. `--topk=[1, 10]`);
  * every run gets its own out_dir `<sweep dir>/<readable params>-<config hash>` (sweep dir default
    `outputs/sweeps/<sweep name>-<hash of the YAML>`), all runs share the W&B group `<name>-<hash>`,
    and a run whose manifest.json says it was published with the same config is skipped, so a killed
    sweep resumes where it stopped (the interrupted run itself resumes from its progress log).

The run finds its out_dir and group through the environment (SUPERWEIGHT_SWEEP_DIR,
SUPERWEIGHT_SWEEP_GROUP), so the command line stays exactly the agent's. Under a real `wandb agent`
(WANDB_SWEEP_ID set) a run that was given no out_dir writes to `outputs/sweeps/<sweep id>/<params>-<hash>`.

Runs sharing (model, data, metric, seed) reuse one cached score set (content-addressed, under
SUPERWEIGHT_CACHE or cache_dir=); point that at a shared filesystem to share it between agents on VMs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from .config import ALIASES, FIELDS, ConfigError, RunConfig, _canonical_key, parse_config, validate

SWEEP_KEYS = {"apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity",
              "project", "method", "command", "name", "run_cap", "metric", "metrics", "scheduler",
              "early_terminate", "parameters"}
METHODS = ("grid", "random")
DISTRIBUTIONS = ("constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform",
                 "q_uniform", "log_uniform_values")
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
NON_RESULT_KEYS = ("out_dir", "wandb.", "cache_dir", "resume", "plots")  # not part of the run's name
ENV_DIR, ENV_GROUP = "SUPERWEIGHT_SWEEP_DIR", "SUPERWEIGHT_SWEEP_GROUP"


# ---------------------------------------------------------------------------------------------------
# the YAML
# ---------------------------------------------------------------------------------------------------
def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep YAML (W&B's top-level keys, a known method, known parameter names)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        sweep = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:200]
        raise ConfigError(f"sweep file '{path}' is not valid YAML: {first}") from None
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep file '{path}' must hold a mapping with method and parameters")
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"sweep file '{path}': unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    method = sweep.get("method")
    if method not in METHODS:
        extra = " (bayes needs the W&B server: use wandb sweep + wandb agent)" if method == "bayes" else ""
        raise ConfigError(f"sweep file '{path}': unknown method '{method}'{extra}; valid choices: {', '.join(METHODS)}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"sweep file '{path}': 'parameters' must be a non-empty mapping of name -> spec")
    for name, spec in params.items():
        if name != "config":
            _canonical_key(str(name))  # unknown option -> ConfigError with the valid names
        _distribution(name, spec)
    cmd = sweep.get("command", DEFAULT_COMMAND)
    if not isinstance(cmd, list) or not cmd:
        raise ConfigError(f"sweep file '{path}': 'command' must be a list, e.g. [${{env}}, ${{interpreter}}, -m, superweight, run, ${{args}}]")
    if "${program}" in cmd and not sweep.get("program"):
        raise ConfigError(f"sweep file '{path}': command uses ${{program}} but no 'program' is given")
    rc = sweep.get("run_cap")
    if rc is not None and (not isinstance(rc, int) or rc <= 0):
        raise ConfigError(f"sweep file '{path}': run_cap must be a positive integer, got {rc!r}")
    return sweep


def _distribution(name: str, spec) -> str:
    """The distribution of a parameter spec, inferred the way W&B does when `distribution` is absent."""
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep parameter '{name}' must be a mapping such as {{values: [...]}} or {{value: x}}, got {spec!r}")
    if "parameters" in spec:
        raise ConfigError(f"sweep parameter '{name}': nested parameters are not supported; use dotted names such as perturb.prob")
    dist = spec.get("distribution")
    if dist is None:
        if "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
        elif "min" in spec and "max" in spec:
            dist = "int_uniform" if isinstance(spec["min"], int) and isinstance(spec["max"], int) else "uniform"
        else:
            raise ConfigError(f"sweep parameter '{name}' needs value, values or min/max; got {sorted(spec)}")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"sweep parameter '{name}': unsupported distribution '{dist}'; valid choices: {', '.join(DISTRIBUTIONS)}")
    need = {"constant": ["value"], "categorical": ["values"], "categorical_w_probabilities": ["values", "probabilities"],
            "int_uniform": ["min", "max"], "uniform": ["min", "max"], "q_uniform": ["min", "max"],
            "log_uniform_values": ["min", "max"]}[dist]
    for k in need:
        if k not in spec:
            raise ConfigError(f"sweep parameter '{name}' ({dist}) needs '{k}'")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"sweep parameter '{name}': values must be a non-empty list")
    if dist == "log_uniform_values" and not spec["min"] > 0:
        raise ConfigError(f"sweep parameter '{name}': log_uniform_values needs min > 0")
    return dist


def _grid_values(name: str, spec: dict) -> list:
    dist = _distribution(name, spec)
    if dist == "constant":
        return [spec["value"]]
    if dist == "categorical":
        return list(spec["values"])
    if dist == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    if dist == "q_uniform":
        q = spec.get("q", 1.0)
        n = int(math.ceil((spec["max"] - spec["min"]) / q))
        return [spec["min"] + i * q for i in range(n)]  # numpy.arange(min, max, q), as W&B
    raise ConfigError(f"sweep parameter '{name}': distribution '{dist}' cannot be used with method grid; "
                      f"valid for grid: {', '.join(GRID_DISTRIBUTIONS)}")


def _sample(name: str, spec: dict, rng: random.Random):
    dist = _distribution(name, spec)
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        return rng.choice(spec["values"])
    if dist == "categorical_w_probabilities":
        return rng.choices(spec["values"], weights=spec["probabilities"], k=1)[0]
    if dist == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    if dist == "uniform":
        return rng.uniform(spec["min"], spec["max"])
    if dist == "q_uniform":
        q = spec.get("q", 1.0)
        v = round(rng.uniform(spec["min"], spec["max"]) / q) * q
        return int(v) if isinstance(q, int) else v
    return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))  # log_uniform_values


def expand(sweep: dict, count: int | None = None, seed: int = 0) -> list[dict]:
    """Parameter sets, each {name: value} with names sorted, in the order the runs will happen."""
    params = sweep["parameters"]
    names = sorted(params)
    cap = count if count is not None else sweep.get("run_cap")
    if sweep["method"] == "grid":
        values = [_grid_values(n, params[n]) for n in names]
        runs = [dict(zip(names, combo)) for combo in itertools.product(*values)]
        return runs[:cap] if cap else runs
    if not cap:
        raise ConfigError("method random needs run_cap in the sweep file or --count N")
    rng = random.Random(seed)
    return [{n: _sample(n, params[n], rng) for n in names} for _ in range(cap)]


def agent_args(params: dict) -> list[str]:
    """`${args}` exactly as wandb agent builds it: `--name=value` with Python str() of the value."""
    return [f"--{name}={value}" for name, value in params.items()]


def command_line(sweep: dict, params: dict) -> list[str]:
    """The agent's command: macros `${env}`, `${interpreter}`, `${program}`, `${args}`,
    `${args_no_hyphens}` expanded; `${envvar:NAME}` replaced by the environment value (or NAME)."""
    args = agent_args(params)
    macros = {
        "env": ["/usr/bin/env"] if os.name != "nt" else [],
        "interpreter": ["python"],
        "program": [str(sweep.get("program"))] if sweep.get("program") else [],
        "args": args,
        "args_no_hyphens": [a[2:] for a in args],
        "args_no_boolean_flags": [f"--{n}" if v is True else f"--{n}={v}" for n, v in params.items() if v is not False],
        "args_json": [json.dumps(params)],
    }
    out: list[str] = []
    for c in sweep.get("command", DEFAULT_COMMAND):
        c = str(c)
        c = re.sub(r"\$\{envvar:([A-Z0-9_]*)\}", lambda m: os.environ.get(m.group(1), m.group(1)), c)
        if c.startswith("${") and c.endswith("}") and c[2:-1] in macros:
            out.extend(macros[c[2:-1]])
        elif c.startswith("${") and c.endswith("}"):
            raise ConfigError(f"unknown sweep command macro '{c}'; valid: " + ", ".join("${" + m + "}" for m in macros))
        else:
            out.append(c)
    return out


def sweep_group(sweep: dict, path: str | Path) -> str:
    """`<name>-<8 hex of the YAML content>`: the W&B group and the local sweep directory name."""
    name = str(sweep.get("name") or Path(path).stem)
    h = hashlib.sha256(json.dumps(sweep, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{_slug(name, 60)}-{h}"


# ---------------------------------------------------------------------------------------------------
# run directories
# ---------------------------------------------------------------------------------------------------
def _slug(s: str, n: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", s).strip("_")[:n]


def _short_name(dotted: str) -> str:
    inv = {}
    for a, full in ALIASES.items():
        inv.setdefault(full, a)
    return inv.get(dotted, dotted)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_dir_name(cfg: RunConfig) -> str:
    """Readable name of a run from what differs from the default config, plus its config hash."""
    from .experiment import config_hash

    cur, ref = _flat(cfg.to_dict()), _flat(RunConfig().to_dict())
    parts = []
    for k in sorted(cur):
        if any(k == x or (x.endswith(".") and k.startswith(x)) for x in NON_RESULT_KEYS) or cur[k] == ref.get(k):
            continue
        v = cur[k]
        v = "+".join(str(x) for x in v) if isinstance(v, list) else str(v)
        parts.append(f"{_short_name(k).split('.')[-1]}={Path(v).name if '/' in v else v}")
    return f"{_slug('_'.join(parts), 100) or 'default'}-{config_hash(cfg)[:10]}"


def apply_sweep_env(cfg: RunConfig, env=None) -> RunConfig:
    """Inside a sweep run: put a run left at the default out_dir under the sweep directory and set the
    W&B group (local sweeps), or under outputs/sweeps/<WANDB_SWEEP_ID>/ (a real wandb agent)."""
    env = os.environ if env is None else env
    base = env.get(ENV_DIR) or (str(Path("outputs") / "sweeps" / env["WANDB_SWEEP_ID"]) if env.get("WANDB_SWEEP_ID") else None)
    if base and cfg.out_dir == RunConfig().out_dir:
        cfg.out_dir = str(Path(base) / run_dir_name(cfg))
    if env.get(ENV_GROUP) and cfg.wandb.group is None:
        cfg.wandb.group = env[ENV_GROUP]
    return cfg


def is_finished(out_dir: str | Path, cfg: RunConfig) -> bool:
    """A run is finished when its manifest says it was published (plots + W&B done, W&B not failed)
    by the same config (hash)."""
    from .experiment import config_hash

    p = Path(out_dir) / "manifest.json"
    if not p.exists():
        return False
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    pub = m.get("published")
    return bool(pub) and pub.get("wandb") != "failed" and m.get("config_hash") == config_hash(cfg)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def plan(path: str | Path, count: int | None = None, seed: int = 0, sweep_dir: str | None = None) -> dict:
    """Everything the sweep will do, validated before any run starts."""
    sweep = load_sweep(path)
    group = sweep_group(sweep, path)
    root = Path(sweep_dir) if sweep_dir else Path("outputs") / "sweeps" / group
    runs = []
    for i, params in enumerate(expand(sweep, count, seed)):
        cmd = command_line(sweep, params)
        args = agent_args(params)
        try:
            cfg = validate(apply_sweep_env(parse_config(args), {ENV_DIR: str(root), ENV_GROUP: group}))
        except ConfigError as e:
            raise ConfigError(f"sweep run {i + 1} ({' '.join(args)}): {e}") from None
        runs.append({"params": params, "command": cmd, "out_dir": cfg.out_dir, "finished": is_finished(cfg.out_dir, cfg),
                     "config": cfg})
    return {"sweep": sweep, "group": group, "dir": root, "runs": runs}


def _parse_argv(argv: list[str]) -> dict:
    opts = {"path": None, "dry_run": False, "count": None, "seed": 0, "sweep_dir": None, "online": False}
    it = iter(argv)
    for tok in it:
        key, _, val = tok.partition("=")
        if key in ("--dry-run", "--dry_run"):
            opts["dry_run"] = True
        elif key == "--online":
            opts["online"] = True
        elif key in ("--count", "--seed", "--sweep-dir", "--sweep_dir"):
            if not val:
                val = next(it, None)
                if val is None:
                    raise ConfigError(f"option '{key}' needs a value")
            k = key.lstrip("-").replace("-", "_")
            if k in ("count", "seed"):
                try:
                    opts[k] = int(val)
                except ValueError:
                    raise ConfigError(f"option '{key}' takes an integer, got '{val}'") from None
                if k == "count" and opts[k] <= 0:
                    raise ConfigError(f"option '--count' must be > 0, got {val}")
            else:
                opts[k] = val
        elif tok.startswith("-"):
            raise ConfigError(f"unknown option '{tok}'; valid: --dry-run, --count N, --seed S, --sweep-dir DIR, --online")
        elif opts["path"] is None:
            opts["path"] = tok
        else:
            raise ConfigError(f"unexpected argument '{tok}': give one sweep YAML file")
    if opts["path"] is None:
        raise ConfigError("no sweep file given; usage: superweight sweep sweeps/smoke.yaml [--dry-run]")
    return opts


def main(argv: list[str]) -> int:
    opts = _parse_argv(list(argv))
    p = plan(opts["path"], opts["count"], opts["seed"], opts["sweep_dir"])
    root: Path = p["dir"]
    env_vars = {ENV_DIR: str(root), ENV_GROUP: p["group"]}
    if not opts["online"]:
        env_vars["WANDB_MODE"] = "offline"
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars.items())
    n = len(p["runs"])
    todo = [r for r in p["runs"] if not r["finished"]]
    print(f"sweep {p['group']}: {n} runs ({n - len(todo)} finished, {len(todo)} to run) -> {root}")
    if opts["dry_run"]:
        for i, r in enumerate(p["runs"], 1):
            state = "done" if r["finished"] else "todo"
            print(f"[{i}/{n} {state}] {prefix} {shlex.join(r['command'])}")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    from .io import atomic_write_json

    atomic_write_json(root / "sweep.json", {
        "group": p["group"], "source": str(opts["path"]), "sweep": p["sweep"],
        "runs": [{"params": r["params"], "out_dir": r["out_dir"], "command": r["command"]} for r in p["runs"]],
    })
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # each run its own wandb-core
    env.update(env_vars)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    failed = []
    for i, r in enumerate(p["runs"], 1):
        if r["finished"]:
            print(f"[{i}/{n}] finished, skipping: {r['out_dir']}")
            continue
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
