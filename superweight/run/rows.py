"""The plan of a run: every result row it will produce, as keys in loop order.

One row is (metric, seed, mode, candidate set, selection, draw, K, perturbation). The recipe's loop walks
this list (scores once per (metric, seed), one ranking per (mode, candidate set, selection, draw)), the
progress bar and the stop messages count it, and the resume log files rows under `RowKey.log_key`, so the
loop and the row count cannot disagree.

A *candidate set* is the set of weights a perturbation can change (`perturbation.changeable`): zeroing or
sign-flipping a weight that is already 0 changes nothing, so those perturbations draw from w != 0, while
`bit_flip` can change any weight. Perturbations with the same rule share one candidate set (and its
rankings); it is named by its perturbations joined with "+".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..config import PerturbConfig, RunConfig
from ..core.perturbation import changeable
from ..core.selections import SELECTIONS


def candidate_sets(names: list[str], cfg: PerturbConfig) -> dict[str, list[str]]:
    """{candidate-set name: its perturbations}, in the order of `names`: perturbations grouped by the weights
    they can change, i.e. by their `changeable` rule applied to the probe values (0, 1, -1)."""
    probe = torch.tensor([0.0, 1.0, -1.0])
    by_rule: dict[tuple, list[str]] = {}
    for p in names:
        by_rule.setdefault(tuple(changeable(p, probe, cfg).tolist()), []).append(p)
    return {"+".join(perts): perts for perts in by_rule.values()}


def candidate_rules(names: list[str], cfg: PerturbConfig) -> dict[str, str]:
    """{candidate-set name: its rule}, the rule naming which of the probe values (0, +1, -1) its perturbations
    can change, e.g. "changes(0,+,-)=011" for zero / sign_flip / relative noise. A set's rankings depend on
    the rule, not on the perturbations' names: the compact score cache is keyed by rules, so runs that differ
    only in a perturbation with the same rule share one compact set."""
    probe = torch.tensor([0.0, 1.0, -1.0])
    return {name: "changes(0,+,-)=" + "".join("1" if x else "0" for x in changeable(perts[0], probe, cfg).tolist())
            for name, perts in candidate_sets(names, cfg).items()}


@dataclass(frozen=True)
class RowKey:
    """Which row: the coordinates that name one perturb -> evaluate -> restore."""

    metric: str
    seed: int
    mode: str
    candidates: str  # the candidate set's name (its perturbations joined with "+")
    selection: str
    draw: int
    k: int
    perturbation: str

    @property
    def log_key(self) -> tuple:
        """The key of the row in the resume log (the candidate set follows from the perturbation)."""
        return ("row", self.metric, self.seed, self.mode, self.selection, self.draw, self.k, self.perturbation)

    @property
    def ranking_key(self) -> tuple:
        """The ranking the row takes its K weights from: (metric, seed, mode, selection, draw, candidates)."""
        return (self.metric, self.seed, self.mode, self.selection, self.draw, self.candidates)

    def columns(self) -> dict:
        """The row's key columns in results.csv."""
        d = asdict(self)
        del d["candidates"]
        return d


def selection_draws(cfg: RunConfig) -> list[tuple[str, int]]:
    """(selection, draw) in loop order: Top-K first, then each control; random controls are drawn
    `select.control_draws` times."""
    out = [("top_k", 0)]
    for control in cfg.select.controls:
        out += [(control, d) for d in range(cfg.select.control_draws if SELECTIONS.get(control).random else 1)]
    return out


def plan_rows(cfg: RunConfig) -> list[RowKey]:
    """Every row of the run, in loop order: metric, seed, mode, candidate set, selection (and draw), K,
    perturbation."""
    sets = candidate_sets(cfg.perturb.names, cfg.perturb)
    return [RowKey(metric, seed, mode, cname, selection, draw, k, pert)
            for metric in cfg.score.metrics for seed in cfg.seeds for mode in cfg.select.modes
            for cname, perts in sets.items() for selection, draw in selection_draws(cfg)
            for k in sorted(cfg.select.topk) for pert in perts]
