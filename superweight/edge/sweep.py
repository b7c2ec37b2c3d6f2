"""W&B sweep files, expanded and run exactly as `wandb agent` runs them (the `superweight sweep` command
is commands/sweep.py):

  * the same YAML works unchanged with `wandb sweep SWEEP.yaml` + `wandb agent ID` on GPU VMs (give it a
    `project:`, or the project comes from the checkout's folder name);
  * `method: grid` expands like the W&B sweep controller: parameters sorted by name, the Cartesian product of
    their `values` (int_uniform / q_uniform become value lists) in that order, `run_cap` runs at most; `method:
    random` draws `run_cap` (or --count) runs with a seeded RNG (--seed, default 0); `bayes` needs the server;
  * each run is the agent's command line, built by wandb's own functions (`command_line`): every macro the
    agent knows (`${env}` -> /usr/bin/env, `${interpreter}` -> python, this interpreter's directory first on
    PATH, `${program}`, `${args}` -> one `--name=value` per parameter in name order with Python str() of the
    value, e.g. `--select.topk=[1, 10]`, `${args_no_equals}`, `${args_json_file}`, `${args_dict}`, ...,
    `${envvar:NAME}`); an unknown macro expands to nothing, as under the agent;
  * every run gets its own out_dir `<sweep dir>/<readable params>-<config hash>` (sweep dir default
    `outputs/sweeps/<sweep name>-<hash of the YAML>`), all runs share the W&B group `<name>-<hash>`,
    and a run whose progress log ends `finished` (same config and code) is skipped, so a killed sweep
    resumes where it stopped (the interrupted run itself resumes from its progress log).

Parameters are named by their full dotted config keys (`score.metrics`, `perturb.names`, `model.name`):
the W&B config of a run is flat with those keys, and the agent overrides exactly the keys it sweeps. An
alias (`metric`) or a section (`perturb`) would put a second, conflicting key into the config under the
agent; a value that is not what the run parses it to (`score.metrics: magnitude` for the list
`[magnitude]`, `perturb.bits: 30` for the text `'30'`) would show the runs table something the run did not
use. Both are refused (`check_param_names`, `check_param_values`) by `superweight sweep` (also --dry-run)
and by a run started under an agent, before anything is written or any W&B run exists. List options are
swept as lists: `score.metrics: {values: [[magnitude], [grad_x_weight]]}`.

Each local run is started the way the agent starts one: WANDB_RUN_ID (a stable id per parameter set, so a
rerun resumes the same W&B run) and WANDB_SWEEP_PARAM_PATH (`<sweep dir>/wandb/sweep-<group>/config-<run
id>.yaml` in the agent's format, which wandb applies over the run's config), then the YAML's command line:
local and agent runs record identical configs. WANDB_SWEEP_ID is left unset (a local sweep has no id on the
W&B server, which would refuse the run); the run finds its out_dir and group through SUPERWEIGHT_SWEEP_DIR
and SUPERWEIGHT_SWEEP_GROUP. Under a real `wandb agent` a run given no out_dir writes to
`$SUPERWEIGHT_SWEEP_ROOT/<sweep id>/<params>-<hash>` (default root `outputs/sweeps`): point
SUPERWEIGHT_SWEEP_ROOT at a shared filesystem so that a run W&B requeues on another VM resumes from the rows
already finished (without one it starts over, into the same W&B run).

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
from pathlib import Path

import yaml

from ..arguments import ALIASES, FIELDS, canonical_key, parse_config
from ..config import ConfigError, RunConfig, config_hash, is_result_key, to_flat
from ..files import atomic_write_text, read_jsonl, slug
from ..run.resume import PROGRESS_FILE
from ..resources import code_version
from ..run.validation import validate

SWEEP_KEYS = {"apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity",
              "project", "method", "command", "name", "run_cap", "metric", "metrics", "scheduler",
              "early_terminate", "parameters"}
METHODS = ("grid", "random")
DISTRIBUTIONS = ("constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform",
                 "q_uniform", "log_uniform_values")
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENV_DIR, ENV_GROUP, ENV_ROOT = "SUPERWEIGHT_SWEEP_DIR", "SUPERWEIGHT_SWEEP_GROUP", "SUPERWEIGHT_SWEEP_ROOT"
SECTIONS = sorted({k.split(".")[0] for k in FIELDS if "." in k})


def check_param_names(names, where: str) -> None:
    """Sweep parameters must be full dotted config keys (module docstring): one line naming the bad one."""
    for name in names:
        name = str(name)
        if name == "config":
            continue
        if name in FIELDS:
            continue
        if name in ALIASES:
            raise ConfigError(f"{where}: sweep parameter '{name}' is an alias; name it '{ALIASES[name]}' (the W&B "
                              f"config's key; under wandb agent the config would hold both '{name}' and "
                              f"'{ALIASES[name]}')")
        if name in SECTIONS:
            raise ConfigError(f"{where}: sweep parameter '{name}' is a config section; name one of its keys, e.g. "
                              f"'{next(k for k in FIELDS if k.startswith(name + '.'))}'")
        canonical_key(name)  # unknown option -> ConfigError with the valid names
        raise ConfigError(f"{where}: sweep parameter '{name}' is not a full dotted config key")


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
    check_param_names(params, f"sweep file '{path}'")
    for name, spec in params.items():
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


def command_line(sweep: dict, params: dict, json_file: str | Path | None = None) -> list[str]:
    """The command `wandb agent` runs for one parameter set, built by wandb's own functions
    (wandb.sdk.launch.sweeps.utils: create_sweep_command for `${envvar:NAME}`, create_sweep_command_args for
    `${args}`, `${args_no_equals}`, `${args_no_hyphens}`, `${args_no_boolean_flags}`, `${args_json}`,
    `${args_dict}`, `${args_append_hydra}`, `${args_override_hydra}`) and expanded by the agent's own rule
    (wandb_agent.Agent._command_run): a token that is exactly `${name}` becomes that macro's list (`${env}` ->
    /usr/bin/env, `${interpreter}` -> python, `${program}`, `${args_json_file}` -> json_file, where the
    caller writes the parameters as JSON); an unknown macro becomes nothing, as under the agent."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command([str(c) for c in sweep.get("command", DEFAULT_COMMAND)])
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(interpreter=["python"], program=[sweep.get("program")],
                  args_json_file=[str(json_file)] if json_file is not None else None)
    if os.name != "nt":
        macros["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for c in command:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            out += [str(x) for x in (macros.get(c[2:-1]) or [])]  # the agent's `replace_list or []`
        else:
            out.append(c)
    return out


def sweep_group(sweep: dict, path: str | Path) -> str:
    """`<name>-<8 hex of the YAML content>`: the W&B group and the local sweep directory name."""
    name = str(sweep.get("name") or Path(path).stem)
    h = hashlib.sha256(json.dumps(sweep, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{slug(name, 60)}-{h}"


# ---------------------------------------------------------------------------------------------------
# run directories
# ---------------------------------------------------------------------------------------------------
def _short_name(dotted: str) -> str:
    inv = {}
    for a, full in ALIASES.items():
        inv.setdefault(full, a)
    return inv.get(dotted, dotted)


def run_dir_name(cfg: RunConfig) -> str:
    """Readable name of a run from what differs from the default config, plus its config hash."""
    cur, ref = to_flat(cfg), to_flat(RunConfig())
    parts = []
    for k in sorted(cur):
        if not is_result_key(k) or cur[k] == ref.get(k):
            continue
        v = cur[k]
        v = "+".join(str(x) for x in v) if isinstance(v, list) else str(v)
        parts.append(f"{_short_name(k).split('.')[-1]}={Path(v).name if '/' in v else v}")
    return f"{slug('_'.join(parts), 100) or 'default'}-{config_hash(cfg)[:10]}"


def sweep_run_id(group: str, params: dict) -> str:
    """A stable W&B run id for one parameter set of a local sweep (a rerun resumes the same run)."""
    h = hashlib.sha256(json.dumps([group, params], sort_keys=True, default=str).encode()).hexdigest()
    return h[:12]


def apply_sweep_env(cfg: RunConfig, env=None) -> RunConfig:
    """Inside a sweep run: put a run left at the default out_dir under the sweep directory and set the
    W&B group (local sweeps), or under $SUPERWEIGHT_SWEEP_ROOT/<WANDB_SWEEP_ID>/ (a real wandb agent).
    Applied by `superweight run` (the command that needs it), not by the experiment."""
    env = os.environ if env is None else env
    base = env.get(ENV_DIR) or (str(Path(env.get(ENV_ROOT) or "outputs/sweeps") / env["WANDB_SWEEP_ID"])
                                if env.get("WANDB_SWEEP_ID") else None)
    if base and cfg.out_dir == RunConfig().out_dir:
        cfg.out_dir = str(Path(base) / run_dir_name(cfg))
    if env.get(ENV_GROUP) and cfg.wandb.group is None:
        cfg.wandb.group = env[ENV_GROUP]
    return cfg


def _same(a, b) -> bool:
    """A sweep value equals the parsed config value as W&B would store it (1 == 1.0; lists elementwise)."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def check_param_values(params: dict, cfg: RunConfig, where: str) -> None:
    """Each swept value is exactly what the run parses it to (module docstring): one line naming the first
    that is not, and how to write it."""
    flat = to_flat(cfg)
    for name, value in params.items():
        if name not in flat or _same(value, flat[name]):
            continue
        hint = ("; sweep a list option as lists, e.g. values: [[a], [b]]" if isinstance(flat[name], list)
                and not isinstance(value, list) else "")
        raise ConfigError(f"{where}: sweep parameter '{name}' is {_yaml_value(value)} in the W&B config but the run "
                          f"uses {_yaml_value(flat[name])}; write it as {_yaml_value(flat[name])}{hint}")


def agent_params(env=None) -> dict:
    """{name: value} of the run `wandb agent` started (its WANDB_SWEEP_PARAM_PATH file), or {}."""
    env = os.environ if env is None else env
    path = env.get("WANDB_SWEEP_PARAM_PATH")
    if not path:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"wandb agent: WANDB_SWEEP_PARAM_PATH '{path}' does not exist")
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in data.items()
            if k not in ("wandb_version", "_wandb")}  # _wandb: W&B's own key, sent in resume commands


def check_agent_run(cfg: RunConfig, env=None) -> None:
    """Under an agent (or a local sweep run like one): the swept names are full config keys and their values
    are what the run parsed. Raises ConfigError before anything is written or any W&B run exists."""
    params = agent_params(env)
    check_param_names(params, "wandb agent")
    check_param_values(params, cfg, "wandb agent")


def param_file(root: str | Path, group: str, run_id: str) -> Path:
    """Where wandb agent puts a run's parameter file (<WANDB_DIR>/wandb/sweep-<id>/config-<run id>.yaml);
    `${args_json_file}` is the same path with .json."""
    return (Path(root) / "wandb" / f"sweep-{group}" / f"config-{run_id}.yaml").resolve()


def write_param_file(path: str | Path, params: dict) -> Path:
    """The parameter file exactly as wandb agent writes it (config_util.save_config_file_from_dict)."""
    body = yaml.dump({k: {"value": v} for k, v in params.items()}, Dumper=yaml.SafeDumper,
                     default_flow_style=False, allow_unicode=True, sort_keys=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "wandb_version: 1\n\n" + body if params else "wandb_version: 1")
    return path


def is_finished(out_dir: str | Path, cfg: RunConfig) -> bool:
    """A run is finished when its progress log, written by the same config and code version, ends with the
    `finished` record that `superweight run` appends after the W&B run finished."""
    entries = read_jsonl(Path(out_dir) / PROGRESS_FILE)
    if not entries or entries[0].get("config_hash") != config_hash(cfg, code_version()):
        return False
    return any(e.get("key") == ["finished"] for e in entries[1:])


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
        run_id = sweep_run_id(group, params)
        cmd = command_line(sweep, params, param_file(root, group, run_id).with_suffix(".json"))
        args = agent_args(params)
        try:
            cfg = parse_config(args)
        except ConfigError as e:
            raise ConfigError(f"sweep run {i + 1} ({' '.join(args)}): {e}") from None
        check_param_values(params, cfg, f"sweep file '{path}'")
        try:
            cfg = validate(apply_sweep_env(cfg, {ENV_DIR: str(root), ENV_GROUP: group}))
        except ConfigError as e:
            raise ConfigError(f"sweep run {i + 1} ({' '.join(args)}): {e}") from None
        runs.append({"params": params, "command": cmd, "out_dir": cfg.out_dir, "finished": is_finished(cfg.out_dir, cfg),
                     "config": cfg, "run_id": run_id})
    return {"sweep": sweep, "group": group, "dir": root, "runs": runs}
