"""manifest.json: everything needed to reproduce or audit a run (config, seeds, code version, package
versions, hardware, model and data fingerprints, times). Never secrets: values are taken from the config
and library metadata only, and `scrub` drops anything that looks like a credential."""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "wandb", "numpy", "pandas", "plotly",
            "safetensors", "gguf", "simple-parsing", "superweight")
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)


def git_info(start: str | Path | None = None) -> dict:
    """Git SHA and dirty flag of the superweight checkout (None outside a repository)."""
    try:
        import git

        repo = git.Repo(Path(start or __file__).resolve().parent, search_parent_directories=True)
        return {"sha": repo.head.commit.hexsha, "dirty": repo.is_dirty(untracked_files=False),
                "branch": None if repo.head.is_detached else repo.active_branch.name}
    except Exception:
        return {"sha": None, "dirty": None, "branch": None}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def hardware() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def scrub(obj):
    """Drop values under secret-looking keys (defence in depth: the config has no such fields)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def build_manifest(config: dict, model: dict, data: dict, times: dict, extra: dict | None = None) -> dict:
    return scrub({
        "tool": "superweight",
        "config": config,
        "seeds": config.get("seeds"),
        "git": git_info(),
        "versions": versions(),
        "hardware": hardware(),
        "model": model,
        "data": data,
        "times": times,
        **(extra or {}),
    })
