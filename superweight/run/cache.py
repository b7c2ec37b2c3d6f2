"""Content-addressed on-disk cache of score sets.

A score set is keyed by everything that determines it: model fingerprint, data fingerprint, the
calibration windows of the seed (only for metrics that use calibration data), the metric and the
ScoreConfig fields it depends on, and the version of the code that computes scores (resources.code_version:
a fixed metric never serves the buggy version's scores). Sweeps therefore compute each (model, data, metric, seed) once however
many K x perturbation x control runs use it. Share the cache between VMs by pointing SUPERWEIGHT_CACHE (or
cache_dir=) at a shared filesystem: writes are atomic renames, so concurrent agents never see half files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_write
from ..resources import code_version


def score_key(parts: dict) -> str:
    """The cache key of a score set: a hash of everything that determines it, code version included."""
    parts = {**parts, "_code": code_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ScoreCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root) / "scores"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str, device: torch.device | None = None) -> dict[str, torch.Tensor] | None:
        p = self.path(key)
        if not self.enabled or not p.exists():
            self.misses += 1
            return None
        try:
            out = load_file(str(p), device=str(device) if device is not None else "cpu")
        except Exception:  # unreadable (e.g. disk full on an old write): recompute
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, scores: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        if not self.enabled:
            return
        cpu = {n: t.detach().contiguous().cpu() for n, t in scores.items()}
        md = {"meta": json.dumps(meta or {}, default=str)}
        atomic_write(self.path(key), lambda tmp: save_file(cpu, tmp, metadata=md))
