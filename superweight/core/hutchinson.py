"""The Hutchinson estimate of the Hessian diagonal, lean enough for Llama-3.1-8B on one 80 GB GPU.

What it estimates. For the calibration loss L = (1/B) Σ_b L_b and the scored weights w, H_b = ∂²L_b/∂w²:

    diag(H) ≈ d = (1/(B·P)) Σ_b Σ_{p<P} z_p ⊙ (H_b z_p),     E[z zᵀ] = I,

unbiased for any probe distribution with E[z zᵀ] = I. Saliency: "abs" → |d|, "obd" → |½ · d · w²| (Optimal
Brain Damage's predicted loss increase when w → 0, ranked by magnitude, so non-negative), None → d itself.

Why not the textbook double backward. g = ∂L/∂w with create_graph=True, then H z = ∂(g·z)/∂w, holds a
weight-sized g, z and H z set next to the weights and the fp32 score buffers: at Llama-3.1-8B, bf16, seq
1024 the plan estimator (superweight.run.plan) puts that at 154.9 GiB (125.4 at seq 512). This module gets
H z without any weight-sized set; the same plan gives 56.4 GiB (48.7 at 512, 74.0 at 2048), of which
15.0 GiB are the bf16 weights and 26.0 GiB the fp32 score buffers. How:

1. No weight gradient. For a Linear layer y = x Wᵀ (x: [N, in], N tokens) with output gradient δ = ∂L_b/∂y,
   g_W = δᵀx, so for any probe Z shaped like W

       <g_W, Z> = Σ_t δ_tᵀ Z x_t.

   Scored nn.Linear / GPT-2 Conv1D weights run through `_ScoredLinear`. The first backward (create_graph)
   forms activation gradients only and records one `_Probe` node s_W = <δᵀx, Z> per layer; a second
   backward of s = Σ_W s_W gives H z. The same graph serves every probe p: Z is looked up when the
   second backward reaches the node.
2. H z is folded where it is produced. W enters s twice: through the forward (y = x Wᵀ) and through the
   first backward (δ_in = δ W, `_BackwardUse`). Each of the two nodes adds its share of z ⊙ (H z)_W into
   the fp32 score buffer itself and returns no gradient to W: autograd never holds a weight-sized partial
   H z waiting for W's second contribution.
3. Rank-1 Rademacher probes (`probe_tensor`): z = a ⊗ b with a, b independent ±1 vectors. Every entry is ±1
   with probability ½ and entries are pairwise independent, so E[z zᵀ] = I and each entry's variance,
   Σ_{j≠i} H_ij² / P, is exactly that of i.i.d. probes (it involves pairwise moments only; errors of entries
   sharing a row or column are correlated). The probe term then costs two matrix-vector products instead of
   two matmuls, and the fold z ⊙ (δᵀx) = (δ·a)ᵀ(x·b) is one `addmm_` into the buffer. probe_kind="iid"
   (the textbook i.i.d. z, regenerated per tensor) is kept as an option; it is slower (4.18× vs 2.85× a
   fwd+bwd for one probe on the CPU bench).
4. Local recomputation (lean=True, `LEAN_PARTS`). What remains of a double backward's memory is the first
   backward's graph. The parts without scored weights, the SDPA attention core, RMSNorm, act(gate)·up of
   gated MLPs and the cross-entropy, run through `_LeanFwd` / `_LeanBwd` (the loss through `_CrossEntropy` /
   `_CEGrad` with its analytic second derivative): only their inputs and output gradient are kept between
   the two backwards; their internals (T×T fp32 attention probabilities, fp32 norm temporaries, the
   [T, vocab] softmax) are recomputed one layer at a time when the second backward reaches them. SDPA keeps
   its fused kernel for the forward and first-order parts and uses the math kernel only transiently, for
   the second-order recomputation of one layer.
5. Anything else scored (embeddings, norm weights, a weight tied between an Embedding and a Linear, Linear
   subclasses with their own forward, fused expert tensors) takes a generic route: a post-accumulate-grad
   hook turns its gradient (with graph) into a `_GZ` node and frees it, and folds z ⊙ (H z) in the second
   backward. Correct, but autograd may hold such a parameter's H z partial sums.

Limits: eager attention keeps its T×T tensors (74.4 GiB at seq 1024, still fits); other fused attention
(flash_attention_2) is switched to eager for the duration (`double_backward_ready`); non-reentrant gradient
checkpointing works but saves nothing (the second backward needs the recomputed graph); torch.func,
reentrant checkpointing and torch.compile'd modules are untested. While it runs, `hessian_diagonal` patches
F.scaled_dot_product_attention and instance `forward`s, and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..config import ConfigError
from .params import autocast_ctx, checkpointing_active, input_device, is_conv1d

PROBE_KINDS = ("rank1", "iid")
DEFAULT_PROBE_KIND = "rank1"
SALIENCIES = ("abs", "obd")
# What lean=True recomputes instead of keeping in the graph. Plan estimator at Llama-3.1-8B, bf16, seq 1024
# (peak incl. 15.0 GiB weights + 26.0 GiB fp32 scores): all four 56.4 GiB; attention+loss+glu 59.9;
# attention+loss 66.0; none 89.3. On the CPU bench the recomputation costs <= ~0.2 fwd+bwd per probe.
LEAN_PARTS = ("attention", "norm", "glu", "loss")


# --------------------------------------------------------------------------------------------------
# Probes: pure functions of (seed, probe index, parameter name), drawn on the CPU, the same on every device


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


def _check_kind(kind: str) -> None:
    if kind not in PROBE_KINDS:
        raise ConfigError(f"unknown probe kind '{kind}'; valid choices: {', '.join(PROBE_KINDS)}")


def probe_factors(name: str, shape, seed: int, probe: int, kind: str = DEFAULT_PROBE_KIND) -> tuple[torch.Tensor, ...]:
    """The probe of parameter `name` (shape `shape`) for (seed, probe) in factored form, int8 CPU tensors.

    rank1 and ≥ 2-D: (a, b) with z = a[:, None] * b[None, :] reshaped to `shape`; a = rademacher([shape[0]],
    probe_key(seed, probe, name, "row")), b = rademacher([numel / shape[0]], probe_key(..., "col")).
    iid, or a 0-/1-D parameter (both kinds): (z,), z = rademacher(shape, probe_key(seed, probe, name, "iid"))."""
    _check_kind(kind)
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


# --------------------------------------------------------------------------------------------------
# Per-call state: the current probe and the fp32 score buffers the custom nodes fold into


@dataclass
class _Run:
    seed: int
    kind: str
    acc: dict  # name -> fp32 buffer of Σ z ⊙ (H z)
    shapes: dict  # name -> parameter shape
    phase: int = 1  # 1: first backward (create_graph), 2: second backward for probe k
    k: int = 0
    parts: list = field(default_factory=list)  # the scalars <g_W, z> (`_Probe`, `_GZ`) created in phase 1
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


# --------------------------------------------------------------------------------------------------
# Autograd nodes of the fused route (scored nn.Linear / Conv1D weights)


def _lin(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.t() if transposed else w


class _ScoredLinear(torch.autograd.Function):
    """y = x Wlᵀ (+ b), Wl = W (Linear) or Wᵀ (Conv1D). Phase 1 backward: δ_in = δ Wl through `_BackwardUse`,
    records `_Probe`(x, δ), no weight gradient (skips a plain backward's δᵀx matmul). Phase 2 (the second
    backward reaching W's forward use): folds z ⊙ (δ'ᵀ x) into the score buffer, returns the input gradient."""

    @staticmethod
    def forward(ctx, x, w, b, run, name, transposed):
        ctx.run, ctx.name, ctx.transposed = run, name, transposed
        ctx.save_for_backward(x, w, b)
        wl = _lin(w, transposed).to(x.dtype)
        return torch.nn.functional.linear(x, wl, None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, w, b = ctx.saved_tensors
        run, name, tr = ctx.run, ctx.name, ctx.transposed
        gx = gb = None
        if run.phase == 1:
            if ctx.needs_input_grad[0]:
                gx = _BackwardUse.apply(gy, w, run, name, tr)
            if gy.requires_grad:  # created here, not after the first backward: see `_Probe`
                run.parts.append(_Probe.apply(x, gy, run, name, tr))
        else:
            if ctx.needs_input_grad[0]:
                gx = gy @ _lin(w, tr).to(gy.dtype)
            run.fold_linear(name, tr, gy, x)
        if b is not None and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, gb, None, None, None


class _BackwardUse(torch.autograd.Function):
    """δ_in = δ Wl, W's use inside the first backward. Its backward (phase 2) returns ∂/∂δ and folds W's
    other contribution to H z, z ⊙ (δᵀ ∂s/∂δ_in), into the score buffer."""

    @staticmethod
    def forward(ctx, gy, w, run, name, transposed):
        ctx.run, ctx.name, ctx.transposed = run, name, transposed
        ctx.save_for_backward(gy, w)
        return gy @ _lin(w, transposed).to(gy.dtype)

    @staticmethod
    def backward(ctx, ggx):
        gy, w = ctx.saved_tensors
        ctx.run.fold_linear(ctx.name, ctx.transposed, gy, ggx)
        ggy = ggx @ _lin(w, ctx.transposed).to(ggx.dtype).t() if ctx.needs_input_grad[0] else None
        return ggy, None, None, None, None


class _Probe(torch.autograd.Function):
    """s_W = Σ_t δ_tᵀ Z x_t = <δᵀx, Z> for the current probe k (looked up in backward, so one graph serves
    every probe). Only its gradient is used, so the forward returns 0 instead of computing the value.
    Created inside the first backward, right after the layer's own nodes: autograd runs ready nodes in
    decreasing creation order, so in the second backward each layer's `_Probe` runs next to that layer's
    first-backward nodes and its outputs are consumed at once instead of waiting for the whole sweep."""

    @staticmethod
    def forward(ctx, x, gy, run, name, transposed):
        ctx.run, ctx.name, ctx.transposed = run, name, transposed
        ctx.save_for_backward(x, gy)
        return x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, go):
        x, gy = ctx.saved_tensors
        run, name, tr = ctx.run, ctx.name, ctx.transposed
        f = run.factors(name, x.device, x.dtype)
        go = go.to(x.dtype)
        gx = ggy = None
        if len(f) == 2:  # ∂s/∂x_t = (δ_t·a) b, ∂s/∂δ_t = (x_t·b) a: matrix-vector products only
            a, b = (f[1], f[0]) if tr else f  # out factor, in factor
            if ctx.needs_input_grad[0]:
                gx = (gy @ a).mul_(go).unsqueeze(-1) * b
            if ctx.needs_input_grad[1]:
                ggy = (x @ b).mul_(go).unsqueeze(-1) * a
        else:
            z = f[0].t() if tr else f[0]  # [out, in]
            if ctx.needs_input_grad[0]:
                gx = (gy @ z).mul_(go)
            if ctx.needs_input_grad[1]:
                ggy = (x @ z.t()).mul_(go)
        return gx, ggy, None, None, None


class _GZ(torch.autograd.Function):
    """<g, z_k> for a generic-route parameter (g: its gradient, with graph). The value is not computed; the
    backward returns z_k."""

    @staticmethod
    def forward(ctx, g, run, name):
        ctx.run, ctx.name = run, name
        ctx.meta = (g.device, g.dtype)
        return g.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, go):
        dev, dt = ctx.meta
        return ctx.run.dense(ctx.name, dev, dt) * go.to(dt), None, None


# --------------------------------------------------------------------------------------------------
# Local recomputation of the parts without scored weights (attention core, norms, gated product, loss)


def _autocast_dtype(device: torch.device):
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except (AttributeError, RuntimeError, TypeError):
        return None


class _Spec:
    """A pure function of its tensor inputs (no parameter that requires grad inside) plus the autocast state
    it ran under, so that it can be re-run identically inside backward."""

    def __init__(self, fn, device: torch.device, fn2=None):
        self.fn = fn  # forward and first-order vector-Jacobian products
        self.fn2 = fn2 or fn  # the second-order recomputation (must be twice differentiable)
        self.device_type = device.type
        self.dtype = _autocast_dtype(device)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def vjp(self, xs, need, dy, create_graph):
        with torch.enable_grad():
            xd = [x.detach().requires_grad_(i in need) for i, x in enumerate(xs)]
            with self.autocast():
                y = self.fn(*xd)
            gs = torch.autograd.grad(y, [xd[i] for i in need], dy, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(xd[i]) if g is None else g for i, g in zip(need, gs)]


class _LeanFwd(torch.autograd.Function):
    """y = fn(*xs), saving only xs. Its backward under create_graph (the first backward of the double
    backward) is `_LeanBwd`, which saves only xs and ∂L/∂y; otherwise a plain vector-Jacobian product by
    recomputation. No intermediate of fn is kept from the first to the second backward."""

    @staticmethod
    def forward(ctx, spec, *xs):
        ctx.spec = spec
        ctx.save_for_backward(*xs)
        with spec.autocast():
            return spec.fn(*xs)

    @staticmethod
    def backward(ctx, dy):
        xs = ctx.saved_tensors
        need = [i for i in range(len(xs)) if ctx.needs_input_grad[1 + i]]
        if not need:
            return (None,) * (1 + len(xs))
        if torch.is_grad_enabled():
            gs = _LeanBwd.apply(ctx.spec, tuple(need), len(xs), *xs, dy)
            gs = (gs,) if isinstance(gs, torch.Tensor) else gs
        else:
            gs = ctx.spec.vjp(xs, need, dy, False)
        out = [None] * len(xs)
        for i, g in zip(need, gs):
            out[i] = g
        return (None, *out)


class _LeanBwd(torch.autograd.Function):
    """(∂L/∂x_i for i in need) = the vjp of fn at xs with dy; its backward is the second-order vjp, by
    recomputing fn and its first backward locally with create_graph=True (freed when it returns)."""

    @staticmethod
    def forward(ctx, spec, need, n, *args):
        ctx.spec, ctx.need, ctx.n = spec, need, n
        ctx.save_for_backward(*args)
        gs = spec.vjp(args[:n], need, args[n], False)
        return tuple(gs) if len(gs) > 1 else gs[0]

    @staticmethod
    def backward(ctx, *ggs):
        args = ctx.saved_tensors
        spec, need, n = ctx.spec, ctx.need, ctx.n
        xs, dy = args[:n], args[n]
        want = [i for i in range(n + 1) if ctx.needs_input_grad[3 + i]]
        if not want:
            return (None,) * (3 + n + 1)
        with torch.enable_grad():
            xd = [x.detach().requires_grad_(i in need or i in want) for i, x in enumerate(xs)]
            dyd = dy.detach().requires_grad_(True)
            with spec.autocast():
                y = spec.fn2(*xd)
            gs = torch.autograd.grad(y, [xd[i] for i in need], dyd, create_graph=True, allow_unused=True)
            pairs = [(g, gg) for g, gg in zip(gs, ggs) if g is not None and g.requires_grad]
            targets = [(xd + [dyd])[i] for i in want]
            res = torch.autograd.grad([g for g, _ in pairs], targets, [gg for _, gg in pairs], allow_unused=True) \
                if pairs else [None] * len(targets)
        out = [None] * (n + 1)
        for i, r in zip(want, res):
            out[i] = r
        return (None, None, None, *out)


def _lean(fn, *xs, fn2=None):
    """fn(*xs) through `_LeanFwd` when grad mode is on and some input requires grad; else plainly. fn2: the
    same function for the second-order recomputation when fn itself is not twice differentiable."""
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return (fn2 or fn)(*xs)
    return _LeanFwd.apply(_Spec(fn, xs[0].device, fn2), *xs)


def _ce_grad(logits, lse, tgt, scale) -> torch.Tensor:
    """∂/∂logits of scale · mean_t (lse_t − logits[t, tgt_t]) over positions t < T−1: scale (p − onehot) / N."""
    b, T, V = logits.shape
    p = logits[:, :-1].reshape(-1, V).to(torch.float32, copy=True).sub_(lse[:, None]).exp_()
    p[torch.arange(p.shape[0], device=p.device), tgt] -= 1
    p.mul_(scale / p.shape[0])
    out = logits.new_empty(logits.shape)
    out[:, -1].zero_()
    out[:, :-1].copy_(p.view(b, T - 1, V))
    return out


class _CrossEntropy(torch.autograd.Function):
    """L = mean over next-token positions of −log softmax(fp32 logits)[target] (the same loss as
    metrics.lm_loss). Its backward under create_graph is `_CEGrad`, with the analytic second derivative:
    only the logits and the log-sum-exp [N] are kept, no [N, vocab] fp32 temporaries."""

    @staticmethod
    def forward(ctx, logits, tgt):
        lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        lse = torch.logsumexp(lg, -1)
        loss = (lse - lg.gather(1, tgt[:, None]).squeeze(1)).mean()
        ctx.save_for_backward(logits, lse, tgt)
        return loss

    @staticmethod
    def backward(ctx, go):
        logits, lse, tgt = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _CEGrad.apply(logits, lse, tgt, go), None
        return _ce_grad(logits, lse, tgt, go.float()), None


class _CEGrad(torch.autograd.Function):
    """G = scale (softmax(logits) − onehot)/N; backward: ∂<G, V>/∂logits = scale (p ⊙ v − p (p·v))/N per
    position (the softmax Jacobian), recomputing p from the logits and the log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, lse, tgt, go):
        ctx.save_for_backward(logits, lse, tgt, go)
        return _ce_grad(logits, lse, tgt, go.float())

    @staticmethod
    def backward(ctx, gg):
        logits, lse, tgt, go = ctx.saved_tensors
        b, T, V = logits.shape
        p = logits[:, :-1].reshape(-1, V).to(torch.float32, copy=True).sub_(lse[:, None]).exp_()
        v = gg[:, :-1].reshape(-1, V).to(torch.float32, copy=True)
        pv = torch.linalg.vecdot(p, v)[:, None]
        h = v.sub_(pv).mul_(p).mul_(go.float() / p.shape[0])
        out = logits.new_empty(logits.shape)
        out[:, -1].zero_()
        out[:, :-1].copy_(h.view(b, T - 1, V))
        return out, None, None, None


def next_token_loss(model, ids: torch.Tensor, lean: bool = True) -> torch.Tensor:
    """Mean next-token NLL on fp32 logits, L = -(1/N) Σ_t log p(x_{t+1} | x_{≤t}) (= metrics.lm_loss); with
    lean (and "loss" in LEAN_PARTS) through `_CrossEntropy`, which keeps no [N, vocab] fp32 temporaries
    for the second backward."""
    ids = ids.to(input_device(model))
    logits = model(input_ids=ids, use_cache=False).logits
    tgt = ids[:, 1:].reshape(-1).to(logits.device)
    if lean and "loss" in LEAN_PARTS and torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropy.apply(logits, tgt)
    lg = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), tgt)


_GLU_SRC = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def _is_glu_mlp(mod) -> bool:
    """A gated MLP whose class forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (Llama,
    Mistral, Qwen2/3, Gemma, ... in transformers), act_fn without trainable parameters."""
    if not all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) or "forward" in mod.__dict__:
        return False
    if any(p.requires_grad for p in getattr(mod.act_fn, "parameters", lambda: [])()):
        return False
    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):
        return False
    body = [ln.strip() for ln in src.splitlines()[1:] if ln.strip() and not ln.strip().startswith(("#", '"""'))]
    return body in ([f"down_proj = {_GLU_SRC}", "return down_proj"], [f"return {_GLU_SRC}"])


def _is_rmsnorm(mod) -> bool:
    return type(mod).__name__.endswith("RMSNorm") and not any(p.requires_grad for p in mod.parameters(recurse=True))


def _enabled_sdpa_backends() -> list:
    b = torch.backends.cuda
    on = [(SDPBackend.FLASH_ATTENTION, b.flash_sdp_enabled()), (SDPBackend.EFFICIENT_ATTENTION, b.mem_efficient_sdp_enabled()),
          (SDPBackend.CUDNN_ATTENTION, b.cudnn_sdp_enabled()), (SDPBackend.MATH, b.math_sdp_enabled())]
    return [k for k, v in on if v]


@contextlib.contextmanager
def _lean_parts(model) -> Iterator[None]:
    """For the duration: SDPA, every RMSNorm without scored weights and the act(gate)·up product of gated
    MLPs (`_is_glu_mlp`) of `model` run through `_lean`. SDPA keeps the kernels enabled on entry (fused ones
    included) for its forward and first-order backward, and uses the math kernel (twice differentiable)
    only for the second-order recomputation. Enter it before `double_backward_ready`, which pins the math
    kernel."""
    orig_sdpa = torch.nn.functional.scaled_dot_product_attention
    backends = _enabled_sdpa_backends() or [SDPBackend.MATH]

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        if dropout_p or kw or (isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad):
            return orig_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa, **kw)

        def fn2(q, k, v):
            return orig_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

        def fn(q, k, v):
            with sdpa_kernel(backends):
                return fn2(q, k, v)

        return _lean(fn, query, key, value, fn2=fn2)

    patched = []
    try:
        if "attention" in LEAN_PARTS:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        for mod in model.modules():
            if "norm" in LEAN_PARTS and _is_rmsnorm(mod) and "forward" not in mod.__dict__:
                bound = mod.forward
                mod.forward = (lambda f: (lambda x, *a, **k: _lean(lambda t: f(t, *a, **k), x)))(bound)
                patched.append(mod)
            elif "glu" in LEAN_PARTS and _is_glu_mlp(mod):
                mod.forward = (lambda m: (lambda x: m.down_proj(_lean(lambda g, u: m.act_fn(g) * u,
                                                                      m.gate_proj(x), m.up_proj(x)))))(mod)
                patched.append(mod)
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig_sdpa
        for mod in patched:
            del mod.forward


@contextlib.contextmanager
def double_backward_ready(model) -> Iterator[None]:
    """Make the model twice differentiable for the duration, then restore it.

    * SDPA: the fused CPU/CUDA attention kernels have no double backward, so SDPA is pinned to its MATH
      backend (`torch.nn.attention.sdpa_kernel`); the model keeps attn_implementation="sdpa". Under lean
      (`_lean_parts`, entered first) the fused kernel still runs the forward and first-order parts.
    * other fused attention (flash_attention_2, ...): switched to "eager" and switched back afterwards.
    * gradient checkpointing, when enabled, is made active in eval mode (`params.checkpointing_active`);
      non-reentrant checkpointing supports double backward.
    """
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    switched = impl not in (None, "eager", "sdpa")
    if switched:
        model.set_attn_implementation("eager")
    try:
        with checkpointing_active(model), sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switched:
            model.set_attn_implementation(impl)


# --------------------------------------------------------------------------------------------------
# Routing scored weights through the custom nodes


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
def _routed(fused: dict, run: _Run) -> Iterator[None]:
    """For the duration, the modules of `fused` run through `_ScoredLinear` (instance `forward`, or
    accelerate's `_old_forward` under device_map hooks)."""
    patched = []

    def make_forward(mod, name, transposed):
        def forward(x):  # nn.Linear.forward(input) / Conv1D.forward(x)
            dt = _autocast_dtype(x.device)
            if dt is not None and x.dtype != dt and x.is_floating_point():
                x = x.to(dt)  # autocast's cast of the input, differentiable (outside the Function)
            with torch.autocast(x.device.type, enabled=False) if dt is not None else contextlib.nullcontext():
                return _ScoredLinear.apply(x, mod.weight, mod.bias, run, name, transposed)

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


# --------------------------------------------------------------------------------------------------
# The estimator


def hessian_diagonal(model, params: dict[str, torch.nn.Parameter], batches: list[torch.Tensor], *, probes: int,
                     seed: int = 0, saliency: str | None = None, probe_kind: str = DEFAULT_PROBE_KIND,
                     lean: bool = True, device: torch.device | None = None,
                     buffer_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of the mean next-token NLL over `batches` (token ids
    [b, T] each), for the weights `params`:

        d = (1/(B·P)) Σ_b Σ_{p<P} z_p ⊙ (H_b z_p),   z_p = probe_tensor(name, shape, seed, p, probe_kind).

    Returns {name: fp32 tensor shaped like the weight}: d (saliency=None), |d| ("abs") or |½ · d · w²|
    ("obd"). Memory: the fp32 buffers (from `buffer_like(p)`, default zeros on p's device) and the
    activations of one double backward, no weight-sized gradient, probe or H z set, and the same for any P
    (every probe reuses one forward and first backward per batch). Only `params` should require grad
    (metrics.hutchinson_diag arranges it with grads_only_for): other trainable parameters cost memory, not
    correctness. device: bf16 autocast on CUDA unless the model is fp32 (params.autocast_ctx); None = the
    first parameter's device. lean=False keeps the attention, norm, gated-MLP and loss internals in the
    graph instead of recomputing them (more memory, a little faster on CPU)."""
    for n, p in params.items():
        if not p.is_floating_point():
            raise ConfigError(f"hutchinson_diag needs weight gradients, but '{n}' is stored as "
                              f"{str(p.dtype).replace('torch.', '')} (quantized)")
    B, P = len(batches), int(probes)
    if P <= 0:
        raise ConfigError(f"score.probes must be > 0, got {P}")
    if saliency is not None and saliency not in SALIENCIES:
        raise ConfigError(f"unknown saliency '{saliency}'; valid choices: {', '.join(SALIENCIES)}")
    _check_kind(probe_kind)
    names = list(params)
    ps = [params[n] for n in names]
    if device is None:
        device = ps[0].device if ps else torch.device("cpu")
    if buffer_like is None:
        def buffer_like(p):
            return torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    acc = {n: buffer_like(p) for n, p in zip(names, ps)}
    run = _Run(int(seed), probe_kind, acc, {n: tuple(p.shape) for n, p in zip(names, ps)})
    fused = fused_modules(model, params)
    generic = [n for n in names if n not in fused]

    def make_hook(name):  # the generic route: g (with graph) -> a _GZ node in phase 1, fold z ⊙ Hz in phase 2
        def hook(p):
            g, p.grad = p.grad, None
            if run.phase == 1:
                if g.requires_grad:  # otherwise g does not depend on w: H z = 0 for this parameter
                    run.parts.append(_GZ.apply(g, run, name))
            else:
                run.fold_dense(name, g)

        return hook

    handles = []
    with (_lean_parts(model) if lean else contextlib.nullcontext()), double_backward_ready(model), \
            _routed(fused, run), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        try:
            for n in generic:
                handles.append(params[n].register_post_accumulate_grad_hook(make_hook(n)))
            for ids in tqdm(batches, desc="hutchinson_diag", disable=not progress, leave=False):
                # phase 1: forward + first backward (create_graph): activation gradients and the <g_W, z>
                # nodes only; no weight gradient is formed
                run.phase, run.parts = 1, []
                with autocast_ctx(device, model):
                    loss = next_token_loss(model, ids, lean)
                torch.autograd.backward(loss, inputs=ps, create_graph=True)
                del loss
                parts, run.parts = run.parts, []
                if not parts:  # the loss is at most linear in the scored weights: H z = 0
                    continue
                s = torch.stack([t.float() for t in parts]).sum() if len(parts) > 1 else parts[0]
                del parts
                # phase 2: one second backward of s = Σ_W <g_W, z_k> per probe, on the same graph; the
                # nodes fold z_k ⊙ (H z_k) into the buffers as they produce it
                run.phase = 2
                for k in range(P):
                    run.k = k
                    run._factors.clear()
                    torch.autograd.backward(s, inputs=ps, retain_graph=k < P - 1)
                del s
        finally:
            for h in handles:
                h.remove()
            run.parts = []
    for n, p in zip(names, ps):
        a = acc[n].div_(B * P)
        if saliency == "obd":
            a.mul_(p.detach().to(a.device, torch.float32).square()).mul_(0.5)
        if saliency is not None:
            a.abs_()
    return acc
