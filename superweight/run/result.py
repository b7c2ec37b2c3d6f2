"""What a run hands to the outside world: the finished `Result` (plain data), and the two interfaces the
command line plugs the edge into: a `Tracker` (W&B, told as the run goes) and a `Sink` (the out_dir files)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from ..config import RunConfig
from ..core.results import results_frame
from ..core.ranking import Ranking


class Tracker:
    """What the loop tells the outside world as it runs (the W&B tracker implements it; this one is silent)."""

    def start(self, exp) -> None: ...  # exp: the experiment.Experiment, set up (its config hash, resume log)
    def log_row(self, row: dict, done: int, total: int) -> None: ...
    def log_stage(self, name: str, seconds: float) -> None: ...
    def finish(self, result: "Result", files: dict[str, list[str]]) -> None: ...
    def fail(self, exc: BaseException) -> None: ...
    def info(self) -> dict:
        return {"mode": "disabled"}


class Sink:
    """Where a finished result goes (outputs.RunOutputs writes the out_dir files; this one keeps nothing)."""

    def write(self, result: "Result") -> dict[str, list[str]]:
        """Write the result; return the paths written, relative to out_dir, by kind (results, rankings, ...)."""
        return {}


@dataclass
class Result:
    """A finished run as plain data: no reference into the live model."""

    cfg: RunConfig
    config_hash: str
    baseline: dict
    rows: list[dict]
    rankings: dict[tuple, Ranking]  # (metric, seed, mode, selection, draw, candidate set) -> K_max ranking
    candidate_sets: list[str]  # candidate-set names, in loop order (the first one is the run's main set)
    stability: list[dict]
    gaps: pd.DataFrame
    score_summaries: dict[str, dict[str, torch.Tensor]]
    param_shapes: dict[str, tuple[int, ...]]  # eligible parameters, in ranking order
    weight_values: dict[str, dict[int, float]]  # name -> {flat index: real value} of every saved ranking entry
    model: dict
    data: dict
    timings: dict
    extra: dict = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        return results_frame(self.rows)


def saved_weight_values(rankings: dict[tuple, Ranking], save_top: int, values) -> dict[str, dict[int, float]]:
    """Real values of the weights rankings.csv lists (the first `save_top` entries of every ranking and of
    each K's own draw), read once per parameter (`values(name)`: one dequantization per 8-bit tensor)."""
    want: dict[str, set[int]] = {}
    for r in rankings.values():
        for rk in [*r.per_k.values(), r]:
            n = min(save_top, len(rk))
            for pid, f in zip(rk.pid[:n].tolist(), rk.flat[:n].tolist()):
                want.setdefault(rk.names[pid], set()).add(f)
    out = {}
    for name, flats in want.items():
        idx = sorted(flats)
        out[name] = dict(zip(idx, values(name).reshape(-1)[torch.tensor(idx)].float().tolist()))
    return out
