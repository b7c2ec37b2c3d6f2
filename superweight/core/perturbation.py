"""Perturbations of selected weights, in place, with bit-exact restore. One function per perturbation in
`PERTURBATIONS`; each maps the K stored values of one tensor to their perturbed values.

`perturbed(params, selection, name, cfg, seed)` is the only way the experiment touches weights: it saves
just the K original elements, writes the perturbed ones, and writes the originals back in a `finally`, so
the model is bit-identical afterwards even if evaluation raises (never a deep copy; O(K) time and memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..config import ConfigError, PerturbConfig
from ..registry import Registry

# A perturbation's capabilities, declared where it is registered:
#   stochastic  uses the seeded generator (its result depends on the seed)
#   dtypes      storage dtypes it acts on ("float": floating point only; "int_view": any dtype with an
#               integer view, quantized int8 included)
#   quantized   meaningful on bitsandbytes int8 weights (acting on the stored int8)
#   changeable  fn(values, cfg) -> bool mask of the weights it can change: selections (Top-K and every
#               control) are drawn only from those, so a control never "perturbs" a weight into itself;
#               elementwise (each weight's own value decides: core/candidates.py asks for a few positions)
PERTURBATIONS = Registry("perturbation", stochastic=False, dtypes="float", quantized=False,
                         changeable=lambda w, cfg: torch.ones_like(w, dtype=torch.bool))
register_perturbation = PERTURBATIONS.register


def _nonzero(w: torch.Tensor, cfg: PerturbConfig) -> torch.Tensor:
    return w != 0


def supports(name: str, dtype: torch.dtype) -> bool:
    """Whether perturbation `name` can act on storage of `dtype`."""
    spec = PERTURBATIONS.get(name)
    if spec.dtypes == "float":
        return dtype.is_floating_point
    return dtype in INT_VIEW


def changeable(name: str, values: torch.Tensor, cfg: PerturbConfig) -> torch.Tensor:
    """Bool mask (shaped like `values`) of the weights perturbation `name` can change."""
    return PERTURBATIONS.get(name).changeable(values, cfg)


@register_perturbation("zero", dtypes="int_view", quantized=True, changeable=_nonzero)
def zero(w: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator) -> torch.Tensor:
    """w <- 0. Pruning the selected weights: the super-weight experiment's core intervention."""
    return torch.zeros_like(w)


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    """Arithmetic in fp32 for fp32/fp16/bf16 (one rounding back to storage), fp64 for fp64."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


@register_perturbation("sign_flip", changeable=_nonzero)
def sign_flip(w: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator) -> torch.Tensor:
    """w <- -scale * w (scale = perturb.scale, 1.0 flips the sign and keeps the magnitude exactly)."""
    _require_float(w, "sign_flip")
    return (-cfg.scale * w.to(_compute_dtype(w))).to(w.dtype)


@register_perturbation("gauss_noise", stochastic=True,
                       changeable=lambda w, cfg: w != 0 if cfg.relative else torch.ones_like(w, dtype=torch.bool))
def gauss_noise(w: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator) -> torch.Tensor:
    """w <- w + scale * |w| * eps (relative=True) or w + scale * eps (relative=False), eps ~ N(0, 1).

    eps = torch.randn(K, generator=gen, dtype=float32) on the CPU (seeded, device independent), one draw per
    selected weight in flat-index order; computed in fp32 (fp64 for fp64 weights) and rounded once."""
    _require_float(w, "gauss_noise")
    cdt = _compute_dtype(w)
    eps = torch.randn(w.numel(), generator=gen, dtype=torch.float32).to(device=w.device, dtype=cdt)
    x = w.to(cdt)
    std = cfg.scale * x.abs() if cfg.relative else torch.full_like(x, cfg.scale)
    return (x + std * eps).to(w.dtype)


def _require_float(w: torch.Tensor, name: str) -> None:
    if not w.is_floating_point():
        raise ConfigError(
            f"perturbation '{name}' needs floating-point weights, got {str(w.dtype).replace('torch.', '')} "
            "storage (quantized); valid for quantized weights: zero, bit_flip"
        )


# --- bit flips: XOR on the integer view of the storage (the hardware fault model) -------------------

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int8: torch.int8,
    torch.uint8: torch.uint8,
}
EXPONENT_MSB = {torch.float32: 30, torch.float64: 62, torch.float16: 14, torch.bfloat16: 14}
BIT_NAMES = ("random", "exponent_msb", "sign")


def parse_bits(spec: str, dtype: torch.dtype | None) -> int | None:
    """Bit position for a spec (None = a uniformly random bit per weight). dtype None: syntax check only.

    'sign' = the top bit; 'exponent_msb' = bit 30 (fp32), 14 (fp16/bf16); or an integer position.
    """
    spec = str(spec).strip()
    if spec not in BIT_NAMES:
        try:
            pos = int(spec)
        except ValueError:
            raise ConfigError(f"unknown perturb.bits '{spec}'; valid choices: {', '.join(BIT_NAMES)} or a bit position") from None
    else:
        pos = None
    if dtype is None:
        if pos is not None and pos < 0:
            raise ConfigError(f"perturb.bits={pos} is negative; valid: 0..(bits of the dtype - 1)")
        return pos
    if dtype not in INT_VIEW:
        raise ConfigError(f"bit_flip does not support {dtype}; valid: {', '.join(str(d) for d in INT_VIEW)}")
    width = torch.tensor([], dtype=dtype).element_size() * 8
    if spec == "sign":
        return width - 1
    if spec == "exponent_msb":
        if dtype not in EXPONENT_MSB:
            raise ConfigError(f"perturb.bits=exponent_msb has no meaning for {dtype} storage; valid: random, sign, 0..{width - 1}")
        return EXPONENT_MSB[dtype]
    if pos is not None and not (0 <= pos < width):
        raise ConfigError(f"perturb.bits={pos} is outside {str(dtype).replace('torch.', '')} (valid: 0..{width - 1})")
    return pos


def bit_masks(dtype: torch.dtype) -> torch.Tensor:
    """Table of XOR masks in the integer view of `dtype`: entry b = 1 << b for b < width, entry width = 0
    (no flip). Signed views hold the top bit as its two's-complement value -2^(width-1) (1 << 15 does not
    fit int16, 1 << 7 does not fit int8), so the XOR acts on exactly that one bit."""
    iv_dtype = INT_VIEW[dtype]
    width = torch.tensor([], dtype=dtype).element_size() * 8
    signed = iv_dtype != torch.uint8
    vals = [(1 << b) - ((1 << width) if signed and b == width - 1 else 0) for b in range(width)]
    return torch.tensor(vals + [0], dtype=iv_dtype)


def xor_bits(w: torch.Tensor, bit: torch.Tensor) -> torch.Tensor:
    """Flip bit position `bit[i]` of element i (bit < 0: leave it): w_int ^ (1 << bit) on the raw storage."""
    iv_dtype = INT_VIEW[w.dtype]
    width = w.element_size() * 8
    bit = bit.to(torch.int64).cpu()
    if bool((bit >= width).any()):
        raise ConfigError(f"bit position {int(bit.max())} is outside {str(w.dtype).replace('torch.', '')} (valid: 0..{width - 1})")
    mask = bit_masks(w.dtype)[torch.where(bit >= 0, bit, torch.full_like(bit, width))]
    iv = w.contiguous().view(iv_dtype)
    return (iv ^ mask.to(iv.device)).view(w.dtype)


@register_perturbation("bit_flip", stochastic=True, dtypes="int_view", quantized=True)
def bit_flip(w: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator) -> torch.Tensor:
    """Each selected weight flips one bit with probability `prob`: w_int <- w_int XOR (1 << b), on the integer
    view of its storage (fp32 -> int32, fp16/bf16 -> int16, fp64 -> int64, int8 -> int8, uint8 -> uint8;
    bitsandbytes int8 weights are flipped in their stored int8, the hardware-fault model).
    b = `bits`: a fixed position, 'sign' (top bit), 'exponent_msb' (30 fp32, 14 fp16/bf16, 62 fp64) or
    'random' (uniform over 0..width-1, drawn per weight). Draws: u = rand(K) then b = randint(width, K) from the
    seeded CPU generator; weight i flips iff u_i < prob, so the number flipped is Binomial(K, prob)."""
    pos = parse_bits(cfg.bits, w.dtype)
    width = w.element_size() * 8
    n = w.numel()
    flip = torch.rand(n, generator=gen) < cfg.prob
    bits = torch.randint(0, width, (n,), generator=gen) if pos is None else torch.full((n,), pos, dtype=torch.int64)
    bits = torch.where(flip, bits, torch.full_like(bits, -1))
    return xor_bits(w, bits)


# --- apply / restore ----------------------------------------------------------------------------------


def _flat(p: torch.Tensor) -> torch.Tensor:
    data = p.data
    if not data.is_contiguous():
        raise ConfigError("cannot perturb a non-contiguous parameter in place")
    return data.view(-1)


@contextlib.contextmanager
def perturbed(params: dict[str, torch.Tensor], selection: dict[str, torch.Tensor], name: str,
              cfg: PerturbConfig, seed: int = 0) -> Iterator[dict]:
    """Apply perturbation `name` to the selected flat indices; restore the exact bits on exit.

    Yields a dict with `n` (weights selected), `changed` (weights whose bits changed) and `nonfinite`
    (weights that became NaN/Inf, e.g. an exponent bit flip).
    """
    fn = PERTURBATIONS.get(name).fn
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 1)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    news: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            # Per tensor only gather / perturb / scatter_ (3 ops: the per-tensor overhead dominates when K
            # spreads over hundreds of tensors); the counts are computed once over all K afterwards.
            for pname in sorted(selection):
                flat = _flat(params[pname])
                idx = selection[pname]
                if idx.device != flat.device:
                    idx = idx.to(flat.device)
                orig = flat.index_select(0, idx)  # a copy of the K originals (perturbations never modify it)
                saved.append((flat, idx, orig))
                new = fn(orig, cfg, gen)
                flat.scatter_(0, idx, new)
                news.append(new)
            info = _change_counts([o for _, _, o in saved], news)
        yield info
    finally:
        with torch.no_grad():
            for flat, idx, orig in reversed(saved):
                flat.scatter_(0, idx, orig)


def _change_counts(origs: list[torch.Tensor], news: list[torch.Tensor]) -> dict:
    """The size of the perturbation, over all selected weights:
    n (selected), changed (weights whose *value* changed: -0.0 == 0.0, NaN counts as changed), bits_changed
    (weights whose stored bits changed: the baseline can be reused only when this is 0), nonfinite (new value
    NaN/Inf), delta_w_l2 = ‖w' − w‖₂, delta_w_linf = max |w' − w|, mean_abs_w = mean |w| of the selection
    (values in the storage's units: int8 codes for bitsandbytes int8 weights)."""
    info = {"n": sum(o.numel() for o in origs), "changed": 0, "bits_changed": 0, "nonfinite": 0,
            "delta_w_l2": 0.0, "delta_w_linf": 0.0, "mean_abs_w": float("nan")}
    if not origs:
        return info
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for o, n in zip(origs, news):
        g = groups.setdefault(n.dtype, ([], []))
        g[0].append(o)
        g[1].append(n)
    sq, linf, abs_sum = 0.0, 0.0, 0.0
    for dt, (os_, ns) in groups.items():
        o, n = torch.cat(os_), torch.cat(ns).to(os_[0].dtype)
        if dt in INT_VIEW and o.dtype == dt:
            iv = INT_VIEW[dt]
            info["bits_changed"] += int((n.view(iv) != o.view(iv)).sum())
        else:
            info["bits_changed"] += int((n != o).sum())
        on, nn_ = o.double(), n.double()
        info["changed"] += int((nn_ != on).sum())  # -0.0 == 0.0; NaN != anything
        d = (nn_ - on).abs()
        if n.is_floating_point():
            info["nonfinite"] += int((~torch.isfinite(n)).sum())
        sq += float(d.square().sum())
        linf = max(linf, float(d.max())) if d.numel() else linf
        abs_sum += float(on.abs().sum())
    info["delta_w_l2"] = sq ** 0.5
    info["delta_w_linf"] = linf
    info["mean_abs_w"] = abs_sum / max(info["n"], 1)
    return info
