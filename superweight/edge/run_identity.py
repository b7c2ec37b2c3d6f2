"""What the W&B runs table shows of a run: its name, group and job type, its undotted axis keys, and the flat
config it records (the keys a sweep names).

* Name: what varies first, so runs of a sweep read apart in the table:
  `<metrics> <perturbations>[(<perturbation options that differ from the default>)] seed<seeds> K<K grid>
  <model>[ <dtype>]`, e.g. `grad_x_weight sign_flip seed1 K1,10,100,1000,10000 smollm2-135m`.
* Group: `wandb.group` when given (a local sweep sets its sweep group), else the name without its seed
  part: the seeds of one configuration share a group, so the runs table aggregates them.
* Axis keys: each swept axis as one scalar, undotted config key that is no command-line option or alias
  (`axis_metric`, `axis_perturbation`, `axis_seed`, `axis_k`, `axis_model`, and `axis_<key with _ for .>` for
  every other result parameter the agent passed, e.g. `axis_perturb_prob`). A single value stays itself; several
  are joined by `,` (a list is no scalar the runs table can group by). The agent never passes them back: it
  passes only its sweep parameters, and `superweight run` refuses any other option.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import RunConfig, is_result_key, to_flat
from ..files import slug
from .manifest import scrub

# where a run ran, not what it is: summary meta/<key> (and the W&B group), never run.config
LOCAL_KEYS = ("out_dir", "cache_dir", "wandb.dir", "wandb.group")
AXES = {"axis_metric": "score.metrics", "axis_perturbation": "perturb.names", "axis_seed": "seeds",
        "axis_k": "select.topk", "axis_model": "model.name"}
NAME_MAX = 128


def artifact_slug(s: str, n: int = 60) -> str:
    """A W&B artifact-name-safe slug (letters, digits, - _ .)."""
    return slug(str(s).strip("/"), n, keep="_.-") or "model"


def tag(s: str) -> str:
    """A W&B artifact tag (letters, digits, _ and -: wandb's TAG_REGEX)."""
    return re.sub(r"[^\w-]+", "-", str(s)).strip("-")[:100] or "none"


def model_slug(name: str) -> str:
    """The model part of artifact names: a hub id or alias as written (org_name), a local path by its
    last component (the same model on two VMs gets the same collection)."""
    p = Path(str(name))
    local = str(name).startswith(("/", ".", "~")) or p.suffix == ".gguf" or p.exists()
    return artifact_slug(p.name if local else str(name))


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


def _scalar(v):
    if isinstance(v, (list, tuple)):
        return v[0] if len(v) == 1 else ",".join(str(x) for x in v)
    return v


def _parts(cfg) -> dict:
    flat, ref = to_flat(cfg), to_flat(RunConfig())
    pert = "+".join(flat["perturb.names"])
    opts = [f"{k.split('.')[-1]}={_scalar(v)}" for k, v in sorted(flat.items())
            if k.startswith("perturb.") and k != "perturb.names" and v != ref.get(k)]
    model = model_slug(flat["model.name"])
    if flat.get("model.dtype") != ref.get("model.dtype"):
        model += f" {flat['model.dtype']}"
    return {"metric": "+".join(flat["score.metrics"]), "perturbation": pert + (f"({','.join(opts)})" if opts else ""),
            "seed": "seed" + ",".join(str(s) for s in flat["seeds"]),
            "k": "K" + ",".join(str(k) for k in flat["select.topk"]), "model": model}


def run_name(cfg) -> str:
    """The run's display name (module docstring)."""
    return " ".join(_parts(cfg).values())[:NAME_MAX]


def run_group(cfg) -> str:
    """The W&B group (module docstring)."""
    if cfg.wandb.group:
        return str(cfg.wandb.group)
    return " ".join(v for k, v in _parts(cfg).items() if k != "seed")[:NAME_MAX]


def axis_config(cfg, swept: dict | None = None) -> dict:
    """The undotted scalar axis keys (module docstring); `swept` = the agent's parameters of this run."""
    flat = to_flat(cfg)
    out = {name: _scalar(flat[key]) for name, key in AXES.items()}
    out["axis_model"] = model_slug(flat["model.name"])
    for key in sorted(swept or {}):
        if key in flat and key not in AXES.values() and is_result_key(key):
            out["axis_" + key.replace(".", "_")] = _scalar(flat[key])
    return scrub(out)
