"""Routing scored weights through the fused nodes: which modules qualify (a weight used only as the `.weight`
of a plain nn.Linear or transformers' Conv1D) and the instance-forward patch that sends them through
`ScoredLinear`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..params import is_conv1d
from .nodes import ScoredLinear
from .recompute import autocast_dtype
from .state import Run


def _is_plain_linear(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) and type(mod).forward is torch.nn.Linear.forward


def _is_conv1d(mod) -> bool:  # transformers' own Conv1D only: its forward is the one routed here
    return is_conv1d(mod) and type(mod).__module__.startswith("transformers")


def fused_modules(model, params: dict) -> dict[str, tuple[torch.nn.Module, bool]]:
    """{param name: (module, transposed)} for the scored weights whose only use is as the `.weight` of a
    plain nn.Linear (transposed=False) or GPT-2 Conv1D (True); the rest take the generic route."""
    ids = {id(p): n for n, p in params.items()}
    users: dict[str, list] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in ids:
                users.setdefault(ids[id(p)], []).append((mod, attr))
    out = {}
    for n, us in users.items():
        if len(us) != 1:
            continue
        mod, attr = us[0]
        if attr == "weight" and (_is_plain_linear(mod) or _is_conv1d(mod)):
            out[n] = (mod, not _is_plain_linear(mod))
    return out


@contextlib.contextmanager
def routed(fused: dict, run: Run) -> Iterator[None]:
    """For the duration, the modules of `fused` run through `ScoredLinear` (instance `forward`, or
    accelerate's `_old_forward` under device_map hooks)."""
    patched = []

    def make_forward(mod, name, transposed):
        def forward(x):  # nn.Linear.forward(input) / Conv1D.forward(x)
            dt = autocast_dtype(x.device)
            if dt is not None and x.dtype != dt and x.is_floating_point():
                x = x.to(dt)  # autocast's cast of the input, differentiable (outside the Function)
            with torch.autocast(x.device.type, enabled=False) if dt is not None else contextlib.nullcontext():
                return ScoredLinear.apply(x, mod.weight, mod.bias, run, name, transposed)

        return forward

    try:
        for name, (mod, transposed) in fused.items():
            attr = "_old_forward" if hasattr(mod, "_hf_hook") and hasattr(mod, "_old_forward") else "forward"
            had = attr in mod.__dict__
            patched.append((mod, attr, had, mod.__dict__.get(attr)))
            setattr(mod, attr, make_forward(mod, name, transposed))
        yield
    finally:
        for mod, attr, had, old in reversed(patched):
            if had:
                setattr(mod, attr, old)
            else:
                delattr(mod, attr)
