"""Hutchinson probes: pure functions of (seed, probe index, parameter name), drawn on the CPU, the same on
every device. rank1 (default): z = a ⊗ b with a, b independent ±1 vectors (E[z zᵀ] = I, pairwise
independent entries); iid: the textbook i.i.d. ±1 tensor."""

from __future__ import annotations

import hashlib

import torch

from ...config import ConfigError

PROBE_KINDS = ("rank1", "iid")
DEFAULT_PROBE_KIND = "rank1"


def probe_key(seed: int, probe: int, name: str, stream: str) -> int:
    """63-bit generator seed: the first 8 bytes (little-endian) of BLAKE2b-64 of "seed/probe/name/stream",
    top bit cleared. Stable across processes, platforms and torch versions (no Python hash())."""
    h = hashlib.blake2b(f"{int(seed)}/{int(probe)}/{name}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def rademacher(shape, key: int) -> torch.Tensor:
    """int8 CPU tensor of ±1, each with probability ½: torch.randint(0, 2) from a CPU generator seeded with
    `key`, mapped 0 → -1, 1 → +1."""
    g = torch.Generator().manual_seed(int(key))
    return torch.randint(0, 2, tuple(shape), generator=g, dtype=torch.int8).mul_(2).sub_(1)


def check_kind(kind: str) -> None:
    if kind not in PROBE_KINDS:
        raise ConfigError(f"unknown probe kind '{kind}'; valid choices: {', '.join(PROBE_KINDS)}")


def probe_factors(name: str, shape, seed: int, probe: int, kind: str = DEFAULT_PROBE_KIND) -> tuple[torch.Tensor, ...]:
    """The probe of parameter `name` (shape `shape`) for (seed, probe) in factored form, int8 CPU tensors.

    rank1 and ≥ 2-D: (a, b) with z = a[:, None] * b[None, :] reshaped to `shape`; a = rademacher([shape[0]],
    probe_key(seed, probe, name, "row")), b = rademacher([numel / shape[0]], probe_key(..., "col")).
    iid, or a 0-/1-D parameter (both kinds): (z,), z = rademacher(shape, probe_key(seed, probe, name, "iid"))."""
    check_kind(kind)
    shape = tuple(shape)
    if kind == "rank1" and len(shape) >= 2:
        rows = int(shape[0])
        cols = int(torch.Size(shape).numel()) // rows if rows else 0
        return (rademacher((rows,), probe_key(seed, probe, name, "row")),
                rademacher((cols,), probe_key(seed, probe, name, "col")))
    return (rademacher(shape, probe_key(seed, probe, name, "iid")),)


def probe_tensor(name: str, shape, seed: int, probe: int, kind: str = DEFAULT_PROBE_KIND) -> torch.Tensor:
    """z_probe of parameter `name` as a dense int8 ±1 CPU tensor shaped like the parameter (the reference
    form of `probe_factors`: z = a ⊗ b for rank1)."""
    f = probe_factors(name, shape, seed, probe, kind)
    if len(f) == 1:
        return f[0]
    return (f[0][:, None] * f[1][None, :]).reshape(tuple(shape))
