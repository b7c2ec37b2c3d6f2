"""Content-addressed on-disk cache of score sets.

A score set is keyed by everything that determines it: model fingerprint, data fingerprint, the
calibration windows of the seed (only for metrics that use calibration data), the metric and the
ScoreConfig fields it depends on, and the version of the code that computes scores (resources.code_version:
a fixed metric never serves the buggy version's scores). Share the cache between VMs by pointing
SUPERWEIGHT_CACHE (or cache_dir=) at a shared filesystem: writes are atomic renames, so concurrent agents
never see half files.

What a sweep reuses: a compact set serves every run with the same (metric, seed, selection options) whose
perturbations change the same weights (candidate-set rules, `run.rows.candidate_rules`: zero, sign_flip and
relative noise share one, bit_flip has its own), so a sweep over perturbations computes each (metric, seed)
once; a full set also serves other seeds of seed-free metrics (magnitude) and other K grids.

What is stored (score.cache):
  compact (default)  what the run's selections and outputs read from a score set (`CompactScores`): every
                     ranking of the (metric, seed), i.e. the top and bottom entries up to the run's largest K
                     per candidate set and mode, the controls' draws with each entry's score, the tie counts
                     at every K, and the score summary (top entries, per-tensor sums and maxima, log10
                     histogram: core/score_summary.py). Keyed by the score set's key plus everything the
                     rankings depend on (`ranking_spec`: seed, K grid, modes, controls, draws, candidate
                     rules): a run whose K grid, mode or controls differ misses and recomputes the scores,
                     never serving a short ranking. A set over COMPACT_MAX_ENTRIES entries (per_row at a
                     large K) is not stored.
  full               every score of every weight in fp32 (one number per weight); serves any run.
  false              nothing read or written.
A compact run also reads a full set when one is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..core.ranking import Ranking
from ..files import atomic_write
from ..resources import code_version

CACHE_MODES = ("compact", "full", "false")
_ALIASES = {"true": "compact", "yes": "compact", "on": "compact", "1": "compact",
            "no": "false", "off": "false", "0": "false", "none": "false"}
COMPACT_MAX_ENTRIES = 1 << 22  # ranking entries per compact set (about 100 MB): larger ones are not stored


def cache_mode(value) -> str:
    """score.cache as one of CACHE_MODES (booleans and true/false spellings accepted: true = compact)."""
    v = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if v not in CACHE_MODES:
        raise ConfigError(f"unknown score.cache '{value}'; valid choices: compact (= true, the default), full, false")
    return v


def score_key(parts: dict) -> str:
    """The cache key of a score set: a hash of everything that determines it, code version included."""
    parts = {**parts, "_code": code_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def compact_key(full_key: str, spec: dict) -> str:
    """The key of a compact set: the score set's key and the ranking spec it was taken for."""
    return score_key({"scores": full_key, "ranking": spec})


@dataclass
class CompactScores:
    """A score set reduced to what one run configuration reads from it (module docstring)."""

    names: list[str]
    rankings: dict[tuple, Ranking]  # (mode, selection, draw, *candidate-set group) -> the K_max ranking
    summary: dict[str, torch.Tensor]  # core.score_summary.score_summary

    def n_entries(self) -> int:
        return sum(len(r) + sum(len(x) for x in r.per_k.values()) for r in self.rankings.values())

    def to_file(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"summary.{k}": v.detach().clone().contiguous().cpu() for k, v in self.summary.items()}
        index = [[list(key), _pack(f"r{i}", r, tensors)] for i, (key, r) in enumerate(self.rankings.items())]
        return tensors, {"names": self.names, "rankings": index}

    @staticmethod
    def from_file(tensors: dict[str, torch.Tensor], meta: dict, shapes: list[tuple[int, ...]]) -> "CompactScores":
        names = meta["names"]
        rankings = {tuple(key): _unpack(m, tensors, names, shapes) for key, m in meta["rankings"]}
        summary = {k[len("summary."):]: v for k, v in tensors.items() if k.startswith("summary.")}
        return CompactScores(names, rankings, summary)


def _pack(prefix: str, r: Ranking, tensors: dict) -> dict:
    """A Ranking's fields as tensors (copied: safetensors refuses shared storage) and JSON metadata; names
    and shapes are stored once per set. Stats: arrays as tensors, anything else (e.g. n_tied {K: n}) as
    [key, value] pairs so that integer keys survive JSON."""
    meta: dict = {"_prefix": prefix}
    for f in dataclasses.fields(r):
        v = getattr(r, f.name)
        if f.name in ("names", "shapes", "tied"):  # tied: a pass-saver while the run ranks, never stored
            continue
        if isinstance(v, torch.Tensor):
            tensors[f"{prefix}.{f.name}"] = v.detach().clone().contiguous().cpu()
            meta[f.name] = "tensor"
        elif f.name == "stats":
            st = {}
            for k, x in v.items():
                if isinstance(x, np.ndarray):
                    tensors[f"{prefix}.stats.{k}"] = torch.from_numpy(np.array(x, copy=True))
                    st[k] = "array"
                else:
                    st[k] = {"pairs": [[a, b] for a, b in x.items()]} if isinstance(x, dict) else {"value": x}
            meta["stats"] = st
        elif f.name == "per_k":
            meta["per_k"] = [[k, _pack(f"{prefix}.k{k}", x, tensors)] for k, x in v.items()]
        else:
            meta[f.name] = {"value": v}
    return meta


def _unpack(meta: dict, tensors: dict, names: list[str], shapes: list) -> Ranking:
    prefix, kw = meta["_prefix"], {}
    for k, v in meta.items():
        if k == "_prefix":
            continue
        if v == "tensor":
            kw[k] = tensors[f"{prefix}.{k}"]
        elif k == "stats":
            kw[k] = {sk: tensors[f"{prefix}.stats.{sk}"].numpy() if sv == "array"
                     else (dict((a, b) for a, b in sv["pairs"]) if "pairs" in sv else sv["value"])
                     for sk, sv in v.items()}
        elif k == "per_k":
            kw[k] = {int(kk): _unpack(m, tensors, names, shapes) for kk, m in v}
        else:
            kw[k] = v["value"]
    return Ranking(names=names, shapes=shapes, **kw)


class ScoreCache:
    def __init__(self, root: str | Path, mode: str | bool = "compact"):
        self.root = Path(root) / "scores"
        self.mode = cache_mode(mode)
        self.enabled = self.mode != "false"
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def _load(self, key: str, device: torch.device | None = None):
        p = self.path(key)
        if not self.enabled or not p.exists():
            return None
        try:
            with safe_open(str(p), "pt", device=str(device) if device is not None else "cpu") as f:
                md = f.metadata() or {}
            return load_file(str(p), device=str(device) if device is not None else "cpu"), md
        except Exception:  # unreadable (e.g. disk full on an old write): recompute
            return None

    def get(self, key: str, device: torch.device | None = None, compact: str | None = None,
            names: list[str] | None = None, shapes: list | None = None,
            full: bool = True) -> "dict[str, torch.Tensor] | CompactScores | None":
        """The compact set under `compact` (compact mode; for parameters `names` of `shapes`), else the full
        set under `key` (unless `full` is False: the caller holds it already, nothing is loaded), else None;
        one hit or one miss either way."""
        if compact is not None and self.mode == "compact":
            got = self._load(compact)
            if got is not None and "compact" in got[1]:
                try:
                    c = CompactScores.from_file(got[0], json.loads(got[1]["compact"]), list(shapes or []))
                    if names is None or c.names == list(names):
                        self.hits += 1
                        return c
                except (KeyError, TypeError, ValueError):  # written by another layout: recompute
                    pass
        if not full:  # the caller holds the full set: a compact miss is the miss
            self.misses += 1
            return None
        got = self._load(key, device)
        if got is None or "compact" in got[1]:
            self.misses += 1
            return None
        self.hits += 1
        return got[0]

    def put(self, key: str, scores: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Store the full score set (score.cache=full only)."""
        if self.mode != "full":
            return
        cpu = {n: t.detach().contiguous().cpu() for n, t in scores.items()}
        md = {"meta": json.dumps(meta or {}, default=str)}
        atomic_write(self.path(key), lambda tmp: save_file(cpu, tmp, metadata=md))

    def put_compact(self, key: str, c: CompactScores, meta: dict | None = None) -> bool:
        """Store a compact set (score.cache=compact, at most COMPACT_MAX_ENTRIES entries); True if stored."""
        if self.mode != "compact" or c.n_entries() > COMPACT_MAX_ENTRIES:
            return False
        tensors, index = c.to_file()
        md = {"meta": json.dumps(meta or {}, default=str), "compact": json.dumps(index)}
        atomic_write(self.path(key), lambda tmp: save_file(tensors, tmp, metadata=md))
        return True
