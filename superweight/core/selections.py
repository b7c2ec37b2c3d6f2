"""Which weights get perturbed: Top-K of a metric and the controls at the same K. The research claim is
"Top-K weights matter more than other weights at the same K"; each control answers one way that claim
could be an artefact. Every selection draws from the same candidate set: the weights the perturbation can
change (`perturbation.changeable`: for `zero`, `sign_flip` and relative `gauss_noise`, w != 0; a checkpoint
from GGUF or pruning holds many exact zeros, and zeroing a zero is no control).

A selection is one decorated function, its ranking key (score -> key, larger first), with its rules as
registry metadata: `informative` (which entries it may rank), `support` (it reports how many there are),
`uniform` (its order is a uniform random draw: modes may draw directly), `random` (drawn
select.control_draws times), `control` (usable in select.controls), `needs_top` (built from the Top-K
set, one selection per K: then the function builds the selection itself), `order` ("desc": its key is the
score and it ranks finite scores > 0; "asc": its key is -score and it ranks finite scores: a global ranking
may then read a scan of the scores, scan.py, instead of keying every score). Modes (`modes.py`) only group
weights; they never look at a selection's name.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ConfigError
from ..registry import Registry
from .matching import Matcher, Shared
from .modes import MODES, InAxis, Rule
from .ranking import Mask, Ranking, Scores, gather

SELECTIONS = Registry("selection", control=True, random=False, needs_top=False, uniform=False, informative=None,
                      support=False, order=None)


def finite_positive(s: torch.Tensor) -> torch.Tensor:
    """A finite score > 0 (0 carries no information: act_outlier's non-candidates, exactly-zero gradients)."""
    return torch.isfinite(s) & (s > 0) if s.is_floating_point() else s > 0


def finite(s: torch.Tensor) -> torch.Tensor:
    """Any finite score (+inf never, NaN never)."""
    return torch.isfinite(s) if s.is_floating_point() else torch.ones_like(s, dtype=torch.bool)


@SELECTIONS.register("top_k", control=False, informative=finite_positive, support=True, order="desc")
def top_k(score: torch.Tensor) -> torch.Tensor:
    """The K highest informative scores (finite, > 0) among the candidates; a metric with fewer informative
    scores than K (act_outlier scores a handful of weights) selects only its support, never padded."""
    return score


@SELECTIONS.register("bottom_k", informative=finite, order="asc")
def bottom_k(score: torch.Tensor) -> torch.Tensor:
    """The K lowest finite scores among the candidates, ties drawn at random ("do unimportant weights do
    nothing?")."""
    return -score


@SELECTIONS.register("random_k", random=True, uniform=True)
def random_k(score: torch.Tensor) -> torch.Tensor:
    """K candidates uniformly at random, seeded by (seed, draw) and the same for every metric ("is any K
    enough?"): a constant key, so the seeded tie-break alone orders them."""
    return torch.zeros_like(score)


@SELECTIONS.register("matched_k", random=True, needs_top=True)
def matched_k(scores: Scores, k: int, *, top: Ranking, matcher: Matcher) -> Ranking:
    """For each Top-K weight a free candidate of the same module type with nearly the same |w| (uniform in
    a ±1% window widened to ±5%, 20%, 100%, then the nearest by |w|), none in Top-K and each used once
    ("is it just big weights?"); group rank = its target's. Drawn for each K against that K's Top-K
    (`rank_grid`): a prefix of the K_max match would exclude the Top-K_max weights, exactly the near-equal
    |w| neighbours a small K needs."""
    r = matcher.match(top, k)
    r.score = gather(scores, r.names, r.pid, r.flat)  # each matched weight's own score (auditable)
    return r


def rule(selection: str) -> Rule:
    spec = SELECTIONS.get(selection)
    return Rule(selection, None if spec.uniform else spec.fn, spec.informative, spec.support, spec.order)


def rank(scores: Scores, k: int, mode: str = "global", selection: str = "top_k", seed: int = 0, draw: int = 0,
         mask_fn: Mask | None = None, top: Ranking | None = None, values=None, in_axis: InAxis | None = None,
         matcher: Matcher | None = None) -> Ranking:
    """Rank for the largest K of the grid; `.take(k)` gives every smaller K.

    mask_fn(name) -> bool mask of the weights the selection may contain (None: all). A control given the
    Top-K ranking `top` in a grouped mode takes, per group, as many weights as Top-K did there. matched_k
    needs `top` and the weights (`values(name)`); in_axis(name) -> the input axis of a weight (per_row)."""
    if int(k) < 1:
        raise ConfigError(f"K={k} must be >= 1; valid: 1..number of eligible weights")
    mode_spec = MODES.get(mode)
    spec = SELECTIONS.get(selection)
    if spec.needs_top:
        if top is None or values is None:
            raise ValueError(f"{selection} needs the Top-K ranking and the weight values")
        matcher = matcher or Matcher(list(scores), values, mask_fn, seed, draw)
        return spec.fn(scores, int(k), top=top, matcher=matcher)
    quota = top.group_counts() if top is not None and top.group is not None and spec.control else None
    return mode_spec.fn(scores, int(k), rule(selection), seed, 0 if not spec.random else draw, mask_fn, quota,
                        in_axis)


def rank_grid(scores: Scores, ks: list[int], mode: str = "global", selection: str = "top_k", seed: int = 0,
              draw: int = 0, mask_fn: Mask | None = None, top: Ranking | None = None, values=None,
              in_axis: InAxis | None = None, shared: Shared | None = None) -> Ranking:
    """The selection for a whole K grid: one ranking at max(ks) whose `.take(k)` is each K's selection. A
    selection built from the Top-K set (needs_top: matched_k) is drawn for every K against `top.take(k)`,
    largest K first, sharing one Matcher (its pools and gathered windows), and kept in `per_k` (its K_max
    ranking is returned, carrying the others). `shared` (matching.Shared) shares matched_k's exact |w|
    windows and pools with every other draw over the same weights and mask."""
    ks = sorted({int(k) for k in ks})
    if not SELECTIONS.get(selection).needs_top:
        return rank(scores, ks[-1], mode, selection, seed, draw, mask_fn, top, values, in_axis)
    if top is None:
        raise ValueError(f"{selection} needs the Top-K ranking")
    matcher = Matcher(list(scores), values, mask_fn, seed, draw, shared) if values is not None else None
    per: dict[int, Ranking] = {}
    by_size: dict[int, Ranking] = {}  # Top-K sets are nested prefixes: equal sizes (past a support) = equal sets
    for k in reversed(ks):
        t = top.take(k)
        if len(t) not in by_size:
            by_size[len(t)] = rank(scores, k, mode, selection, seed, draw, mask_fn, t, values, in_axis, matcher)
        per[k] = by_size[len(t)]
    k_max = ks[-1]  # a new Ranking carrying the others (no reference to itself)
    return replace(per[k_max], per_k={k: r for k, r in per.items() if k != k_max}, k_max=k_max)
