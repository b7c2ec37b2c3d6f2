"""Memory accounting on fake tensors: a dispatch mode that follows every storage a run creates and frees
(`MemoryTracker`), a stand-in for the fused CUDA attention kernels' memory, the ScoreContext a metric sees
in the simulation, and `simulate`, which runs one piece of real code on a fake model and returns its peak."""

from __future__ import annotations

import contextlib
import math
import weakref

import torch

from ..config import ScoreConfig
from ..core.metrics import ScoreContext
from ..core.params import layer_of


class MemoryTracker:
    """Dispatch mode that counts the bytes of every storage created by an op while it lives.

    Storages that exist before `track()` (weights, inputs) are pre-registered and never counted. A storage
    is counted once however many views share it; it is released when its last tensor dies (weakref on the
    storage object, which PyTorch keeps one-to-one with the storage). Offloaded score buffers are tagged
    `host` (see `SimContext`)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                # Composite ops (cross_entropy_loss under inference_mode, ...) reach us whole: run their
                # decomposition inside the mode so that their intermediates are counted too.
                if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                        func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
                    with self:
                        out = func.decompose(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
                out = func(*args, **kwargs)
                if tracker.active:
                    tracker._register(out)
                return out

        self._mode_cls = _Mode
        self.live = 0
        self.peak = 0
        self.host_live = 0
        self.host_peak = 0
        self.active = True
        self.to_host = False
        self._seen: dict[int, weakref.ref] = {}

    def known(self, tensors) -> None:
        """Storages that exist already (weights, buffers, inputs): never counted."""
        for t in tensors:
            st = t.untyped_storage()
            self._seen[id(st)] = weakref.ref(st)

    def _free(self, n: int, host: bool) -> None:
        if host:
            self.host_live -= n
        else:
            self.live -= n

    def _register(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            r = self._seen.get(id(st))
            if r is not None and r() is st:
                continue
            n = int(st.nbytes())
            self._seen[id(st)] = weakref.ref(st)
            host = self.to_host
            weakref.finalize(st, self._free, n, host)
            if host:
                self.host_live += n
                self.host_peak = max(self.host_peak, self.host_live)
            else:
                self.live += n
                self.peak = max(self.peak, self.live)

    @contextlib.contextmanager
    def track(self):
        with self._mode_cls():
            yield self

    @contextlib.contextmanager
    def on_host(self):
        old, self.to_host = self.to_host, True
        try:
            yield
        finally:
            self.to_host = old


def flash_like_sdpa():
    """A stand-in for F.scaled_dot_product_attention with the memory of the fused CUDA kernels: the output
    and an fp32 logsumexp [b, h, T] are allocated and saved with q, k, v; no T x T matrix exists."""

    class _Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    orig = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        fused = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
        if not fused:  # the caller pinned the math backend (double backward): simulate it as it is
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, **kw)
        return _Flash.apply(query, key, value)

    return orig, sdpa


@contextlib.contextmanager
def fused_attention(enabled: bool):
    if not enabled:
        yield
        return
    orig, fake = flash_like_sdpa()
    torch.nn.functional.scaled_dot_product_attention = fake
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def weight_bytes(model, quantize: str = "none") -> int:
    """Bytes of all parameters and buffers (tied weights once); quantized Linear weights of the blocks at
    int8 + fp32 row scale (8bit) or 4 bits + fp32 absmax per 64 weights (4bit)."""
    seen, total = set(), 0
    linear_weights = set()
    if quantize != "none":
        for mn, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and layer_of(mn + ".weight") >= 0:
                linear_weights.add(id(m.weight))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in linear_weights:
            n = t.numel()
            total += n + 4 * t.shape[0] if quantize == "8bit" else n // 2 + 4 * math.ceil(n / 64)
        else:
            total += t.numel() * t.element_size()
    return total


class SimContext:
    """Factory for the ScoreContext a metric sees in the simulation (offloaded buffers tagged as host)."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker

    def make(self, model, params, batches, cfg: ScoreConfig):
        tracker = self.tracker

        class _Ctx(ScoreContext):
            def buffer_like(self, p, dtype=None):
                if self.cfg.offload:
                    with tracker.on_host():
                        return torch.zeros(p.shape, dtype=dtype or self.score_dtype, device=p.device)
                return super().buffer_like(p, dtype)

        return _Ctx(model, params, batches, cfg, torch.device("cpu"), 0, False)


def simulate(fake_mode, model, fn, known) -> tuple[int, int]:
    """Run `fn()` on the fake model; return (peak bytes created on the device, peak host bytes).

    No gc.collect() (0.5 s each in a big process): reference cycles free late here exactly as in a real run."""
    tracker = MemoryTracker()
    tracker.known(known)
    with fake_mode, tracker.track():
        result = fn(tracker)
        del result
    return tracker.peak, tracker.host_peak
