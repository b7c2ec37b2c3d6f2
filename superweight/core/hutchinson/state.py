"""The per-call state of one `hessian_diagonal` call: the current phase and probe, and the fp32 score
buffers the custom autograd nodes fold z ⊙ (H z) into."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .probes import probe_factors


@dataclass
class Run:
    seed: int
    kind: str
    acc: dict  # name -> fp32 buffer of Σ z ⊙ (H z)
    shapes: dict  # name -> parameter shape
    phase: int = 1  # 1: first backward (create_graph), 2: second backward for probe k
    k: int = 0
    parts: list = field(default_factory=list)  # the scalars <g_W, z> (`Probe`, `GZ`) created in phase 1
    _factors: dict = field(default_factory=dict)  # (name, k, device, dtype) -> vectors (tiny)

    def factors(self, name, device, dtype) -> tuple[torch.Tensor, ...]:
        """Probe k's factors of `name` on (device, dtype). Vectors (rank-1 factors, 1-D parameters) are
        cached for the current probe; weight-sized i.i.d. probes are regenerated at each use (holding them
        would be one more weight-sized set)."""
        key = (name, self.k, device, dtype)
        f = self._factors.get(key)
        if f is None:
            f = tuple(t.to(device=device, dtype=dtype)
                      for t in probe_factors(name, self.shapes[name], self.seed, self.k, self.kind))
            if all(t.dim() <= 1 for t in f):
                self._factors[key] = f
        return f

    def dense(self, name, device, dtype) -> torch.Tensor:
        f = self.factors(name, device, dtype)
        if len(f) == 1:
            return f[0]
        return (f[0][:, None] * f[1][None, :]).reshape(self.shapes[name])

    def fold_linear(self, name: str, transposed: bool, d: torch.Tensor, x: torch.Tensor) -> None:
        """acc_W += z ⊙ (dᵀ x) in W's linear form [out, in] (d: [N, out], x: [N, in]). Rank-1:
        z ⊙ (dᵀx) = (d·a)ᵀ (x·b), one matmul added into the buffer in place."""
        acc = self.acc[name]
        acc_l = acc.t() if transposed else acc
        d2, x2 = d.reshape(-1, d.shape[-1]), x.reshape(-1, x.shape[-1])
        f = self.factors(name, d.device, d.dtype)
        if len(f) == 2:
            a, b = (f[1], f[0]) if transposed else f  # (out factor, in factor) of the linear form
            A, Bm = (d2 * a).t(), x2 * b
            if acc_l.dtype == A.dtype and acc_l.device == A.device:
                acc_l.addmm_(A, Bm)
            else:
                acc_l.add_((A @ Bm).to(acc_l.device))
        else:
            z = f[0].t() if transposed else f[0]
            c = d2.t() @ x2
            c.mul_(z)
            acc_l.add_(c.to(acc_l.device))

    def fold_dense(self, name: str, h: torch.Tensor) -> None:
        """acc += z ⊙ h, h = (H z) of a generic-route parameter."""
        h = h.detach()
        acc = self.acc[name]
        acc.add_((h * self.dense(name, h.device, h.dtype)).to(acc.device))
