"""Perturbations: hand-computed bit patterns, flip statistics, Gaussian noise against its formula, exact
restore (hash of every parameter) for every perturbation x dtype, NaN/Inf handling, O(K) locality, and the
integer (bitsandbytes int8) storage path."""

import math

import pytest
import torch

from superweight.config import ConfigError, PerturbConfig, RunConfig
from superweight.core.evaluation import evaluate_lm
from superweight.core.params import param_hash
from superweight.core.perturbation import (
    PERTURBATIONS, bit_flip, changeable, gauss_noise, parse_bits, perturbed, sign_flip, supports, xor_bits, zero,
)
from superweight.run.validation import check_capabilities

IV = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
      torch.bfloat16: torch.int16, torch.int8: torch.int8, torch.uint8: torch.uint8}


def bits_of(t: torch.Tensor) -> list[int]:
    """Raw storage as unsigned Python ints (two's complement resolved), for hex literals."""
    width = t.element_size() * 8
    return [v & ((1 << width) - 1) for v in t.contiguous().view(IV[t.dtype]).tolist()]


def flip_all(w: torch.Tensor, bits: str) -> torch.Tensor:
    return bit_flip(w, PerturbConfig(names=["bit_flip"], prob=1.0, bits=bits), torch.Generator().manual_seed(0))


# --- hand-computed bit patterns ------------------------------------------------------------------------


def test_exponent_msb_of_002_bf16():
    # 0.02 in fp32 is 0x3CA3D70A. bf16 keeps the top 16 bits, rounding to nearest: the dropped half 0xD70A
    # is > 0x8000, so 0x3CA3 rounds up to 0x3CA4 = sign 0 | exponent 0b01111001 (121) | mantissa 0b0100100
    # (36): (1 + 36/128) * 2^(121-127) = 1.28125 * 2^-6 = 0.02001953125.
    # Exponent MSB = bit 14: 0x3CA4 ^ 0x4000 = 0x7CA4: exponent 121 + 128 = 249 -> 1.28125 * 2^122.
    w = torch.tensor([0.02], dtype=torch.bfloat16)
    assert bits_of(w) == [0x3CA4]
    assert w.item() == 0.02001953125
    assert parse_bits("exponent_msb", torch.bfloat16) == 14
    f = flip_all(w, "exponent_msb")
    assert bits_of(f) == [0x7CA4]
    assert f.item() == 1.28125 * 2.0**122


def test_exponent_msb_of_002_fp16_fp32_fp64():
    # fp16: 0.02 = 1.28 * 2^-6: exponent field -6 + 15 = 9 (0b01001), mantissa round(0.28 * 1024) = 287
    # (0x11F): (9 << 10) | 0x11F = 0x251F. Bit 14 (exponent MSB): 0x651F, exponent 25 -> (1 + 287/1024) * 2^10
    # = 1024 + 287 = 1311 exactly.
    h = torch.tensor([0.02], dtype=torch.float16)
    assert bits_of(h) == [0x251F]
    assert bits_of(flip_all(h, "exponent_msb")) == [0x651F]
    assert flip_all(h, "exponent_msb").item() == 1311.0
    # fp32: 0x3CA3D70A (exponent 121, mantissa 0x23D70A). Bit 30: 0x7CA3D70A, exponent 249 -> x * 2^128.
    f = torch.tensor([0.02], dtype=torch.float32)
    assert bits_of(f) == [0x3CA3D70A]
    assert parse_bits("exponent_msb", torch.float32) == 30
    g = flip_all(f, "exponent_msb")
    assert bits_of(g) == [0x7CA3D70A]
    assert g.item() == f.item() * 2.0**128
    # fp64: 0x3F947AE147AE147B (exponent 1017). Bit 62: 0x7F947AE147AE147B, exponent 1017 + 1024 -> x * 2^1024.
    d = torch.tensor([0.02], dtype=torch.float64)
    assert bits_of(d) == [0x3F947AE147AE147B]
    dd = flip_all(d, "exponent_msb")
    assert bits_of(dd) == [0x7F947AE147AE147B]
    assert dd.item() == math.ldexp(0.02, 1024)


@pytest.mark.parametrize("dtype,width", [(torch.float32, 32), (torch.float64, 64), (torch.float16, 16),
                                         (torch.bfloat16, 16)])
def test_sign_bit_every_float_dtype(dtype, width):
    # The top bit: 1 << 31, 1 << 63, 1 << 15 (which does not fit int16: its two's-complement mask is -32768).
    w = torch.tensor([0.02, -1.5, 0.0, 3.0], dtype=dtype)
    assert parse_bits("sign", dtype) == width - 1
    f = flip_all(w, "sign")
    assert [b ^ (1 << (width - 1)) for b in bits_of(w)] == bits_of(f)
    assert f.tolist() == [-v for v in w.tolist()]
    assert str(f[2].item()) == "-0.0"


def test_sign_bit_int16_literal():
    # bf16 1.0 = 0x3F80; sign flip -> 0xBF80 = -1.0; on the int16 view this is 0x3F80 ^ -32768 = -16512.
    w = torch.tensor([1.0], dtype=torch.bfloat16)
    f = flip_all(w, "15")
    assert f.view(torch.int16).item() == 0x3F80 - 0x8000 == -16512
    assert bits_of(f) == [0xBF80]
    assert f.item() == -1.0


def test_int8_and_uint8_storage():
    # int8 sign bit (bit 7): x ^ 0x80 = x - 128 for x >= 0, x + 128 for x < 0 (two's complement).
    q = torch.tensor([5, 0, 127, -1, -128, -5], dtype=torch.int8)
    assert parse_bits("sign", torch.int8) == 7
    assert flip_all(q, "sign").tolist() == [5 - 128, -128, -1, 127, 0, 123]
    # a low bit: bit 0 toggles parity, bit 2 adds or removes 4
    assert flip_all(q, "0").tolist() == [4, 1, 126, -2, -127, -6]
    assert flip_all(q, "2").tolist() == [1, 4, 123, -5, -124, -1]
    # uint8: bit 7 adds/removes 128 in plain binary
    u = torch.tensor([5, 0, 255, 128], dtype=torch.uint8)
    assert flip_all(u, "sign").tolist() == [133, 128, 127, 0]
    assert flip_all(u, "1").tolist() == [7, 2, 253, 130]
    with pytest.raises(ConfigError, match="exponent_msb"):
        parse_bits("exponent_msb", torch.int8)


@pytest.mark.parametrize("dtype,ulp", [(torch.float32, 2.0**-23), (torch.float16, 2.0**-10),
                                       (torch.bfloat16, 2.0**-7)])
def test_mantissa_lsb(dtype, ulp):
    # 1.0 has an all-zero mantissa; flipping bit 0 gives the next representable number, 1 + ulp.
    f = flip_all(torch.tensor([1.0, -2.0], dtype=dtype), "0")
    assert f.tolist() == [1.0 + ulp, -2.0 * (1.0 + ulp)]


def test_exponent_msb_makes_inf_and_nan():
    # 1.0 (fp32 0x3F800000, bf16 0x3F80, fp16 0x3C00) has exponent field 0111..1; its MSB flip gives the
    # all-ones exponent with a zero mantissa = +Inf. 1.5 has a nonzero mantissa: NaN.
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        f = flip_all(torch.tensor([1.0, 1.5], dtype=dt), "exponent_msb")
        assert f[0].item() == math.inf and math.isnan(f[1].item())


def test_bit_position_out_of_range():
    with pytest.raises(ConfigError, match="valid: 0..15"):
        parse_bits("16", torch.bfloat16)
    with pytest.raises(ConfigError, match="valid: 0..7"):
        parse_bits("8", torch.int8)
    with pytest.raises(ConfigError, match="unknown perturb.bits"):
        parse_bits("mantissa", torch.float32)
    with pytest.raises(ConfigError, match="outside"):
        xor_bits(torch.zeros(2, dtype=torch.float16), torch.tensor([3, 16]))


# --- probability ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [0.003, 0.3, 0.9])
def test_flip_count_is_binomial(prob):
    """Flipped count ~ Binomial(n, p): |count - np| < 5 sqrt(np(1-p)) (false alarm ~6e-7 per check); the
    flipped set is exactly {i: u_i < p} for u = rand(n) from the same seeded generator; each flipped weight
    differs in exactly one bit, and the random bit positions are uniform (chi-square, 31 dof, 5 sigma)."""
    n = 40_000
    w = torch.randn(n)
    cfg = PerturbConfig(names=["bit_flip"], prob=prob, bits="random")
    f = bit_flip(w, cfg, torch.Generator().manual_seed(123))
    x = (f.view(torch.int32) ^ w.view(torch.int32)).to(torch.int64) & 0xFFFFFFFF
    flipped = x != 0
    count = int(flipped.sum())
    mean, sd = n * prob, math.sqrt(n * prob * (1 - prob))
    assert abs(count - mean) < 5 * sd, (count, mean, sd)
    g = torch.Generator().manual_seed(123)
    u = torch.rand(n, generator=g)
    assert torch.equal(flipped, u < prob)
    pos = torch.log2(x[flipped].double())
    assert torch.equal(pos, pos.round())  # a power of two: exactly one bit
    if count > 3000:
        counts = torch.bincount(pos.long(), minlength=32).double()
        assert counts.numel() == 32
        expected = count / 32
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 31 + 5 * math.sqrt(2 * 31), chi2


def test_prob_zero_and_one():
    w = torch.randn(1000, dtype=torch.bfloat16)
    none = bit_flip(w, PerturbConfig(names=["bit_flip"], prob=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(none.view(torch.int16), w.view(torch.int16))
    every = bit_flip(w, PerturbConfig(names=["bit_flip"], prob=1.0), torch.Generator().manual_seed(0))
    assert bool((every.view(torch.int16) != w.view(torch.int16)).all())


# --- sign flip, zero, gaussian noise -----------------------------------------------------------------------


def test_zero_and_sign_flip_values():
    w = torch.tensor([0.5, -2.0, 3.25], dtype=torch.bfloat16)
    g = torch.Generator()
    assert zero(w, PerturbConfig(), g).tolist() == [0.0, 0.0, 0.0]
    assert sign_flip(w, PerturbConfig(scale=1.0), g).tolist() == [-0.5, 2.0, -3.25]
    assert sign_flip(w, PerturbConfig(scale=2.0), g).tolist() == [-1.0, 4.0, -6.5]
    d = torch.tensor([0.1 + 2.0**-50], dtype=torch.float64)  # not representable in fp32: stays exact in fp64
    assert sign_flip(d, PerturbConfig(scale=1.0), g).item() == -(0.1 + 2.0**-50)


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gauss_noise_formula(relative, dtype):
    torch.manual_seed(1)
    w = torch.randn(500).to(dtype)
    cfg = PerturbConfig(names=["gauss_noise"], scale=0.25, relative=relative)
    out = gauss_noise(w, cfg, torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(42)
    eps = torch.randn(500, generator=g, dtype=torch.float32).double()
    x = w.double()
    want = x + (0.25 * x.abs() if relative else 0.25) * eps
    assert out.dtype == dtype
    tol = {torch.float64: 1e-7, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]  # fp32 math, one rounding
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # reproducible for a seed, different for another
    again = gauss_noise(w, cfg, torch.Generator().manual_seed(42))
    assert torch.equal(out.view(IV[dtype]), again.view(IV[dtype]))
    other = gauss_noise(w, cfg, torch.Generator().manual_seed(43))
    assert not torch.equal(out, other)


def test_gauss_noise_relative_keeps_zero():
    w = torch.zeros(10)
    assert torch.equal(gauss_noise(w, PerturbConfig(scale=3.0, relative=True), torch.Generator().manual_seed(0)), w)


def test_perturbed_seeded_reproducibility(tiny_llama):
    params = dict(tiny_llama.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    sel = {name: torch.tensor([0, 5, 17, 30])}
    cfg = PerturbConfig(names=["gauss_noise"], scale=0.5)
    seen = []
    for seed in (3, 3, 4):
        with perturbed(params, sel, "gauss_noise", cfg, seed=seed):
            seen.append(params[name].detach().reshape(-1)[sel[name]].clone())
    assert torch.equal(seen[0], seen[1])
    assert not torch.equal(seen[0], seen[2])


# --- exact restore ---------------------------------------------------------------------------------------


class Int8Net(torch.nn.Module):
    """Integer storage like bitsandbytes' Int8Params (no gradient, int8 data)."""

    def __init__(self, dtype=torch.int8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
        self.w1 = torch.nn.Parameter(torch.randint(lo, hi, (16, 8), generator=g, dtype=dtype), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randint(lo, hi, (4, 32), generator=g, dtype=dtype), requires_grad=False)


def _selection(params: dict, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in list(params.items())[:3]:
        out[n] = torch.sort(torch.randperm(p.numel(), generator=g)[:k]).values
    return out


def _cfg(name: str) -> PerturbConfig:
    return PerturbConfig(names=[name], scale=0.5, prob=0.7, bits="random")


CASES = [(n, dt) for n in PERTURBATIONS for dt in (torch.float32, torch.float16, torch.bfloat16)]
CASES += [(n, dt) for n in ("zero", "bit_flip") for dt in (torch.int8, torch.uint8)]


@pytest.mark.parametrize("name,dtype", CASES)
def test_exact_restore(name, dtype):
    from conftest import make_tiny_llama

    model = Int8Net(dtype) if not dtype.is_floating_point else make_tiny_llama().to(dtype)
    params = {n: p for n, p in model.named_parameters() if p.ndim >= 2}
    sel = _selection(params, 20, seed=1)
    before = param_hash(model)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    with perturbed(params, sel, name, _cfg(name), seed=5) as info:
        assert info["n"] == 20 * len(sel)
        assert info["changed"] > 0
        inside = param_hash(model)
        # O(K) locality: exactly the selected elements may differ, every other element is untouched
        for n, p in params.items():
            diff = p.detach().reshape(-1).view(IV[dtype]) != snapshot[n].reshape(-1).view(IV[dtype])
            allowed = torch.zeros_like(diff)
            if n in sel:
                allowed[sel[n]] = True
            assert not bool((diff & ~allowed).any()), n
    assert inside != before
    assert param_hash(model) == before
    # also when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed(params, sel, name, _cfg(name), seed=5):
            assert param_hash(model) != before
            raise RuntimeError("boom")
    assert param_hash(model) == before


def test_restore_after_nan_and_eval_records_nonfinite():
    """An exponent-MSB flip of 1.5 gives NaN; evaluation reports nonfinite=True and NaN/Inf PPL, no crash."""
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    params = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        params[name].view(-1)[[3, 9]] = torch.tensor([1.5, 1.0])
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    base = evaluate_lm(model, ids, batch_size=2)
    assert not base.nonfinite and math.isfinite(base.ppl)
    before = param_hash(model)
    cfg = PerturbConfig(names=["bit_flip"], prob=1.0, bits="exponent_msb")
    with perturbed(params, {name: torch.tensor([3, 9])}, "bit_flip", cfg) as info:
        vals = params[name].detach().view(-1)[[3, 9]]
        assert math.isnan(vals[0].item()) and vals[1].item() == math.inf
        assert info["nonfinite"] == 2 and info["changed"] == 2
        res = evaluate_lm(model, ids, batch_size=2)
    assert res.nonfinite is True
    assert math.isnan(res.ppl) or res.ppl == math.inf
    assert math.isnan(res.nll) or res.nll == math.inf
    assert param_hash(model) == before
    again = evaluate_lm(model, ids, batch_size=2)
    assert again.as_dict() == base.as_dict()


def test_change_counts_hand_computed():
    """changed counts value changes (-0.0 == 0.0), delta_w_l2 / delta_w_linf / mean_abs_w over the selection."""
    params = {"w": torch.nn.Parameter(torch.tensor([0.5, -2.0, 3.25, 0.0, 1.0]), requires_grad=False)}
    with perturbed(params, {"w": torch.tensor([0, 1, 2])}, "zero", PerturbConfig()) as info:
        assert info["n"] == 3 and info["changed"] == 3 and info["bits_changed"] == 3 and info["nonfinite"] == 0
        assert info["delta_w_l2"] == pytest.approx(math.sqrt(0.25 + 4.0 + 3.25**2))
        assert info["delta_w_linf"] == 3.25
        assert info["mean_abs_w"] == pytest.approx(5.75 / 3)
    # a sign flip of 0.0 gives -0.0: its bits change, its value does not
    with perturbed(params, {"w": torch.tensor([3, 4])}, "sign_flip", PerturbConfig(scale=1.0)) as info:
        assert params["w"].view(-1)[3].item() == 0.0 and str(params["w"].view(-1)[3].item()) == "-0.0"
        assert info["changed"] == 1 and info["bits_changed"] == 2
        assert info["delta_w_l2"] == pytest.approx(2.0) and info["delta_w_linf"] == 2.0
        assert info["mean_abs_w"] == pytest.approx(0.5)
    with perturbed(params, {"w": torch.tensor([3])}, "zero", PerturbConfig()) as info:
        assert info["changed"] == 0 and info["bits_changed"] == 0 and info["delta_w_l2"] == 0.0
    assert params["w"].tolist() == [0.5, -2.0, 3.25, 0.0, 1.0]


def test_changeable_masks():
    """Selections are drawn from the weights a perturbation can change: zero, sign_flip and relative
    gauss_noise cannot change w = 0; absolute gauss_noise and bit_flip change any weight."""
    w = torch.tensor([0.0, -0.0, 1.0, -2.5])
    nz = [False, False, True, True]
    assert changeable("zero", w, PerturbConfig()).tolist() == nz
    assert changeable("sign_flip", w, PerturbConfig()).tolist() == nz
    assert changeable("gauss_noise", w, PerturbConfig(relative=True)).tolist() == nz
    assert changeable("gauss_noise", w, PerturbConfig(relative=False)).tolist() == [True] * 4
    assert changeable("bit_flip", w, PerturbConfig()).tolist() == [True] * 4
    # the masks are right: every weight outside the mask is left as it is by the perturbation
    for name in PERTURBATIONS:
        cfg = _cfg(name)
        out = PERTURBATIONS[name].fn(w, cfg, torch.Generator().manual_seed(0))
        outside = ~changeable(name, w, cfg)
        assert torch.equal(out[outside], w[outside]), name


def test_perturbed_rejects_unknown_name(tiny_llama):
    with pytest.raises(ConfigError, match="valid choices: .*bit_flip"):
        with perturbed(dict(tiny_llama.named_parameters()), {}, "melt", PerturbConfig()):
            pass


# --- integer / bitsandbytes int8 storage ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sign_flip", "gauss_noise"])
def test_float_only_perturbations_refuse_int8(name):
    model = Int8Net()
    params = dict(model.named_parameters())
    before = param_hash(model)
    with pytest.raises(ConfigError, match=r"needs floating-point weights, got int8 .*valid for quantized weights: zero, bit_flip"):
        with perturbed(params, {"w1": torch.tensor([0, 1]), "w2": torch.tensor([2])}, name, _cfg(name)):
            pass
    assert param_hash(model) == before
    # declared capabilities, and the up-front check of a run against the model's storage
    assert not supports(name, torch.int8) and supports(name, torch.bfloat16)
    assert all(supports(n, dt) for n in ("zero", "bit_flip") for dt in (torch.int8, torch.float32, torch.bfloat16))
    assert PERTURBATIONS.names(quantized=True) == ["zero", "bit_flip"]
    cfg = RunConfig()
    cfg.score.metrics, cfg.select.topk = ["magnitude"], [1]
    cfg.perturb.names = ["zero", name]
    with pytest.raises(ConfigError, match=name):
        check_capabilities(cfg, model, params)
    cfg.perturb.names = ["zero", "bit_flip"]
    check_capabilities(cfg, model, params)


def test_int8_zero_and_xor_on_stored_values():
    model = Int8Net()
    params = dict(model.named_parameters())
    w1 = params["w1"]
    orig = w1.detach().clone().view(-1)
    idx = torch.tensor([1, 7, 40])
    with perturbed(params, {"w1": idx}, "zero", PerturbConfig()):
        assert w1.view(-1)[idx].tolist() == [0, 0, 0]
    with perturbed(params, {"w1": idx}, "bit_flip", PerturbConfig(prob=1.0, bits="sign")):
        assert w1.view(-1)[idx].tolist() == [(v + 128) % 256 - 128 for v in (orig[idx] ^ -128).tolist()]
        assert w1.view(-1)[idx].tolist() == [v - 128 if v >= 0 else v + 128 for v in orig[idx].tolist()]
    assert torch.equal(w1.view(-1), orig)


def test_bitsandbytes_int8params_cpu():
    """Real bitsandbytes Linear8bitLt (bnb >= 0.45 quantizes and runs on the CPU too): weight is Int8Params
    holding the int8 codes CB (row scales SCB separate); a flip acts on the stored int8 code, the forward
    pass sees it, and restore is bit-exact (weight, SCB and the forward output)."""
    import bitsandbytes as bnb

    from conftest import make_int8_linear

    _, lin = make_int8_linear(32, 8)
    assert isinstance(lin.weight, bnb.nn.Int8Params)
    x = torch.randn(4, 32)
    y0 = lin(x).clone()
    params = {"weight": lin.weight}
    before = param_hash(lin)
    codes = lin.weight.data.clone().view(-1)
    idx = torch.tensor([0, 33, 100])
    cfg = RunConfig()
    cfg.score.metrics, cfg.select.topk, cfg.perturb.names = ["magnitude"], [1], ["sign_flip"]
    with pytest.raises(ConfigError, match="8-bit"):
        check_capabilities(cfg, lin, params)
    with perturbed(params, {"weight": idx}, "bit_flip", PerturbConfig(prob=1.0, bits="sign")):
        now = lin.weight.data.view(-1)
        assert now[idx].tolist() == [v - 128 if v >= 0 else v + 128 for v in codes[idx].tolist()]
        assert torch.equal(now[1:33], codes[1:33])  # neighbours untouched
        y1 = lin(x)
        assert not torch.allclose(y1, y0)
    assert param_hash(lin) == before
    with perturbed(params, {"weight": idx}, "zero", PerturbConfig()):
        assert lin.weight.data.view(-1)[idx].tolist() == [0, 0, 0]
        assert not torch.allclose(lin(x), y0)
    assert param_hash(lin) == before
    assert torch.equal(lin(x), y0)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS.names()))
def test_changeable_is_elementwise(name):
    """Selections read a perturbation's candidate mask at a few positions from those weights alone
    (core/candidates.Changeable.at): every `changeable` rule must be elementwise."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g)
    w[w.abs() < 0.3] = 0  # exact zeros: the rules that differ on them
    idx = torch.randperm(w.numel(), generator=g)[:200]
    for relative in (True, False):
        cfg = PerturbConfig(relative=relative)
        full = changeable(name, w, cfg).reshape(-1)
        assert torch.equal(changeable(name, w.reshape(-1)[idx], cfg), full[idx])
