"""The declared values the recipe's stages return (experiment.Experiment): what setup checked and built,
what load loaded, what the loop produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.ranking import Ranking
from ..inputs.data import Windows
from ..inputs.models import ModelInfo
from .cache import ScoreCache
from .resume import ResumeLog


@dataclass
class Prepared:
    """What setup returns: everything checked and the data built, before any weight is read."""

    tokenizer: object
    windows: Windows
    device: torch.device
    out: Path
    config_hash: str
    log: ResumeLog | None  # None: a command that keeps no rows (detect)


@dataclass
class Loaded:
    """What load returns: the model, the parameters a run scores and perturbs, and the score cache."""

    model: torch.nn.Module
    params: dict[str, torch.Tensor]
    modules: dict[str, torch.nn.Module]  # owner module of each eligible parameter (int8 dequantization)
    info: ModelInfo
    cache: ScoreCache


@dataclass
class Looped:
    """What the loop returns: every row, the rankings they were taken from, score summaries and cache keys."""

    rows: list[dict] = field(default_factory=list)
    rankings: dict[tuple, Ranking] = field(default_factory=dict)
    summaries: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    score_keys: dict[tuple[str, int], str] = field(default_factory=dict)
