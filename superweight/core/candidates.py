"""The candidate mask of a perturbation as the selections read it: which weights `pert` can change (a
control never "perturbs" a weight into itself), without a whole-model mask in memory.

Every perturbation's `changeable` rule is elementwise (a weight's own value decides), so the mask at a few
positions comes from those weights alone: the tie counts and matched_k's exact passes ask only for the
entries they look at; a dense tensor (every weight changeable) answers None, "all", and is never masked.
"""

from __future__ import annotations

import torch

from ..config import PerturbConfig
from .perturbation import changeable


class Changeable:
    """The candidate mask of one perturbation, as the selections read it: `(name)` the bool mask of the weights
    `pert` can change, or None where it can change every weight of the tensor (no mask kept or applied; one
    tensor's mask is kept at a time: memory); `at(name, flat)` the mask at those positions only, from those
    weights alone (every `changeable` rule is elementwise); `count(name)` how many, memoized; `excluded(name)`
    the few weights it cannot change, memoized."""

    def __init__(self, pert: str, values, cfg: PerturbConfig):
        self.pert, self.values, self.cfg = pert, values, cfg
        self.counts: dict[str, int] = {}
        self.sparse: dict[str, torch.Tensor | None | bool] = {}  # excluded(): indices, None (none) or False (dense)
        self.kept: dict[str, torch.Tensor] = {}
        self.read: tuple[str, torch.Tensor] | None = None  # the last tensor's values (int8: one dequantization)

    def _values(self, name: str) -> torch.Tensor:
        if self.read is None or self.read[0] != name:
            self.read = None  # drop the last one first (memory)
            self.read = (name, self.values(name))
        return self.read[1]

    def __call__(self, name: str) -> torch.Tensor | None:
        if name in self.kept:
            return self.kept[name]
        if self.counts.get(name, -1) == self._values(name).numel():
            return None
        m = changeable(self.pert, self._values(name), self.cfg)
        self.counts[name] = n = int(m.sum())
        if n == m.numel():
            return None
        self.kept = {name: m}
        return m

    def at(self, name: str, flat: torch.Tensor) -> torch.Tensor | None:
        if name in self.kept:
            return self.kept[name].reshape(-1)[flat.to(self.kept[name].device)]
        if self.counts.get(name, -1) == self._values(name).numel():
            return None
        w = self._values(name).detach().reshape(-1)
        return changeable(self.pert, w[flat.to(w.device)], self.cfg)

    def count(self, name: str) -> int:
        if name not in self.counts:
            self(name)
        return self.counts[name]

    def excluded(self, name: str) -> torch.Tensor | None:
        """Flat indices of the weights `pert` cannot change (None: none), memoized when they are few (at
        most 1/64 of the tensor or 1024: a global ranking by score then reads the scores only past its floor);
        else the mask is dense and `excluded` raises LookupError (read the whole mask)."""
        if name not in self.sparse:
            m = self(name)
            if m is None:
                self.sparse[name] = None
            elif m.numel() - self.count(name) > max(m.numel() // 64, 1024):
                self.sparse[name] = False
            else:
                ex = torch.nonzero(~m.reshape(-1)).squeeze(1).cpu()
                self.sparse[name] = ex.to(torch.int32) if m.numel() < 2**31 else ex
        if self.sparse[name] is False:
            raise LookupError(f"{name}: {self.pert} leaves too many weights unchangeable for a sparse list")
        return self.sparse[name]
