"""One registration style for every named thing a user picks: metrics, perturbations, selections, modes,
corpora, tasks and commands (in the spirit of lm-evaluation-harness's `@register_metric(...)`).

    METRICS = Registry("metric")

    @METRICS.register("magnitude", needs_gradients=False, quantized=True)
    def magnitude(ctx): ...

`METRICS["magnitude"]` is a `Spec`: the function, its docstring and the metadata given at registration
(the entry's capabilities), readable as attributes (`spec.needs_gradients`). `METRICS.get(name)` raises a
one-line ConfigError naming the valid choices. Adding an entry needs nothing else anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .config import ConfigError


class Spec:
    """A registered entry: `name`, `fn`, `doc` and the metadata given at registration, as attributes."""

    def __init__(self, name: str, fn: Callable, defaults: dict[str, Any], meta: dict[str, Any]):
        self.name, self.fn = name, fn
        self.doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        self.__dict__.update({**defaults, **meta})

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Registry:
    """Names -> Specs, in registration order. `defaults` are the metadata every entry has."""

    def __init__(self, kind: str, **defaults: Any):
        self.kind, self.defaults = kind, defaults
        self._entries: dict[str, Spec] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        unknown = set(meta) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.kind} '{name}': unknown metadata {sorted(unknown)}; known: {sorted(self.defaults)}")

        def deco(fn: Callable) -> Callable:
            self._entries[name] = Spec(name, fn, self.defaults, meta)
            return fn

        return deco

    def get(self, name: str) -> Spec:
        if name not in self._entries:
            valid = ", ".join(self._entries) or "(none available in this installation)"
            raise ConfigError(f"unknown {self.kind} '{name}'; valid choices: {valid}")
        return self._entries[name]

    def __getitem__(self, name: str) -> Spec:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, **where: Any) -> list[str]:
        """Names whose metadata match every `where` item, e.g. `METRICS.names(quantized=True)`."""
        return [n for n, s in self._entries.items() if all(getattr(s, k) == v for k, v in where.items())]

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()
