"""bitsandbytes 8-bit (LLM.int8) weights on the CPU: where the int8 codes and row scales live before and after
forwards, the dequantized values the metrics see (params.weight_values), and whether in-place edits of the
stored int8 (perturbation.perturbed) reach the next forward and are restored bit-exactly.

Where bitsandbytes keeps things (Linear8bitLt `lin`, Int8Params `w = lin.weight`):
                       before the first forward            after any forward
  int8 codes [out,in]  w.data  (w.CB is w.data)            w.data (lin.state.CB is w.data)   w.CB = None
  row scales [out] f32 w.SCB   (lin.state.SCB = None)      lin.state.SCB                    w.SCB = None
W = int8 * SCB[row] / 127. The dequantization references below are written out here."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from superweight.core import params
from superweight.config import ConfigError, PerturbConfig, ScoreConfig
from superweight.core.metrics import METRICS, ScoreContext
from superweight.core.perturbation import perturbed

bnb = pytest.importorskip("bitsandbytes")
from conftest import make_int8_linear  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" per call

DEQUANT = 7.874015718698502e-3  # bitsandbytes' 1/127 (float32-rounded), as in int8_vectorwise_dequant


def int8_linear():
    ref, lin = make_int8_linear(64, 32)
    return ref, lin.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("llama64")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def load_8bit(d):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                            device_map="cpu", dtype=torch.float32).eval()


def ids(seed=0, T=12):
    return torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(seed))


def same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()


def codes_in_use(lin):
    """The int8 matrix bitsandbytes' matmul reads: state.CB after the first forward, weight.CB before it."""
    for t in (lin.state.CB, getattr(lin.weight, "CB", None)):
        if t is not None:
            return t
    return lin.weight.data


def scales(lin):
    """Row scales wherever they are (the reference for params.int8_row_scale)."""
    return lin.weight.SCB if getattr(lin.weight, "SCB", None) is not None else lin.state.SCB


def dequant(lin):
    return lin.weight.detach().float() * (scales(lin).float().view(-1, 1) * DEQUANT)


def int8_modules(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear8bitLt"}


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", ["linear8bitlt", "from_pretrained"])
def test_where_cb_and_scb_live(builder, llama_dir):
    if builder == "from_pretrained":
        model = load_8bit(llama_dir)
        lin = model.model.layers[0].mlp.down_proj
        run = lambda: model(input_ids=ids(), use_cache=False)  # noqa: E731
        assert lin.state.threshold == 6.0  # BitsAndBytesConfig default llm_int8_threshold
        assert type(model.lm_head).__name__ == "Linear"  # lm_head is kept in fp32
    else:
        _, lin = int8_linear()
        run = lambda: lin(torch.randn(3, 64))  # noqa: E731
        assert lin.state.threshold == 0.0
    w = lin.weight
    assert type(w).__name__ == "Int8Params" and w.dtype == torch.int8 and params.quant_kind(w) == "int8"
    # before the first forward: codes in weight.data (weight.CB is the same tensor), scales in weight.SCB
    assert w.CB is not None and same_storage(w.CB, w.data) and w.SCB.dtype == torch.float32
    assert w.SCB.shape == (w.shape[0],) and lin.state.CB is None and lin.state.SCB is None
    scb = w.SCB
    assert params.int8_row_scale(w) is scb and params.int8_row_scale(w, lin) is scb
    with torch.no_grad():
        run()
    # after it: weight.CB / weight.SCB are None; the same tensors now hang on lin.state
    assert lin.weight is w and w.CB is None and w.SCB is None
    assert lin.state.SCB is scb and same_storage(lin.state.CB, w.data)
    assert params.int8_row_scale(w) is None and params.int8_row_scale(w, lin) is scb


def test_weight_values_before_and_after_any_number_of_forwards():
    ref, lin = int8_linear()
    W0 = params.weight_values(lin.weight, lin)
    assert torch.equal(params.weight_values(lin.weight), W0)  # a bare parameter works until the first forward
    assert W0.dtype == torch.float32 and W0.shape == (32, 64)
    torch.testing.assert_close(W0, dequant(lin), rtol=1e-6, atol=0)  # /127 vs bnb's f32(1/127)
    step = (lin.weight.SCB / 127).unsqueeze(1)
    assert bool(((W0 - ref.weight.detach()).abs() <= step * 1.0001).all())  # within one quantization step
    x = torch.randn(5, 64)
    for _ in range(3):
        with torch.no_grad():
            y = lin(x)
        assert torch.equal(params.weight_values(lin.weight, lin), W0)
        torch.testing.assert_close(y, F.linear(x, W0), rtol=0.05, atol=0.02)  # activations are int8 too
    # after a forward the parameter alone no longer carries its scales: the module is needed
    with pytest.raises(ConfigError, match="no per-row scale"):
        params.weight_values(lin.weight)
    holder = torch.nn.Sequential(lin)
    mod = params.owner(holder, "0.weight")[1]
    assert mod is lin and torch.equal(params.weight_values(lin.weight, mod), W0)


def test_weight_values_of_a_whole_8bit_model(llama_dir):
    from transformers import LlamaForCausalLM

    model = load_8bit(llama_dir)
    fp = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    mods = int8_modules(model)
    assert len(mods) == 14  # 7 Linear per block; lm_head stays fp32
    before = {n: params.weight_values(m.weight, m) for n, m in mods.items()}
    for n, m in mods.items():
        torch.testing.assert_close(before[n], dequant(m), rtol=1e-6, atol=0)
    for s in range(2):
        with torch.no_grad():
            model(input_ids=ids(s), use_cache=False)
    for n, m in mods.items():
        assert torch.equal(params.weight_values(m.weight, m), before[n])
        assert torch.equal(params.weight_values(m.weight, params.owner(model, f"{n}.weight")[1]), before[n])
        step = (scales(m) / 127).unsqueeze(1)
        assert bool(((before[n] - fp.get_submodule(n).weight.detach()).abs() <= step * 1.0001).all())


@pytest.mark.parametrize("when", ["before_first_forward", "after_forwards"])
@pytest.mark.parametrize("name", ["zero", "bit_flip"])
def test_inplace_int8_perturbation_reaches_the_next_forward(name, when):
    _, lin = int8_linear()
    _, twin = int8_linear()  # identical weights: the unperturbed reference
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = twin(x)
        if when == "after_forwards":
            lin(x), lin(x)
    assert (lin.state.CB is None) == (when == "before_first_forward")
    W = params.weight_values(lin.weight, lin)
    codes = lin.weight.detach().clone()
    h0 = params.param_hash(lin)
    r, c = 5, 9
    f = r * 64 + c
    cfg = PerturbConfig(bits="sign") if name == "bit_flip" else PerturbConfig()
    with perturbed({"w": lin.weight}, {"w": torch.tensor([f])}, name, cfg) as info:
        assert info["changed"] == 1
        new = int(lin.weight.detach()[r, c])
        assert new == (0 if name == "zero" else int(codes[r, c]) ^ -128)
        with torch.no_grad():
            y = lin(x)
        assert int(codes_in_use(lin)[r, c]) == new and same_storage(lin.weight.data, codes_in_use(lin))
        # only output channel r changes, by about x[:, c] * (W_new - W_old)[r, c]
        others = torch.arange(32) != r
        assert torch.equal(y[:, others], base[:, others])
        dw = (new - int(codes[r, c])) * float(scales(lin)[r]) * DEQUANT
        torch.testing.assert_close(y[:, r] - base[:, r], x[:, c] * dw, rtol=0.05, atol=0.02)
        assert not torch.equal(y[:, r], base[:, r])
        Wp = params.weight_values(lin.weight, lin)  # the metrics see the perturbed value too
        assert torch.nonzero(Wp != W).tolist() == [[r, c]]
    with torch.no_grad():
        assert torch.equal(lin(x), base)  # restored bit-exactly
    assert torch.equal(params.weight_values(lin.weight, lin), W) and torch.equal(lin.weight.detach(), codes)
    assert params.param_hash(lin) == h0


def test_rebinding_weight_data_is_silently_lost():
    """The trap: the matmul reads state.CB (weight.CB before the first forward); `weight.data = t` replaces only
    weight.data, and the forward then rebinds weight.data back to state.CB. perturbed() writes in place."""
    for first_forward in (False, True):
        _, lin = int8_linear()
        x = torch.randn(4, 64)
        with torch.no_grad():
            base = lin(x) if first_forward else F.linear(x, dequant(lin))
        lin.weight.data = torch.zeros_like(lin.weight.data)
        assert not same_storage(lin.weight.data, codes_in_use(lin))
        with torch.no_grad():
            y = lin(x)
        assert y.abs().max() > 0.1  # not zero weights: the old codes were used
        if first_forward:
            assert torch.equal(y, base)
        assert int(lin.weight.detach().abs().max()) > 0  # and weight.data is the old codes again


def test_full_model_metrics_after_forwards_and_zeroing(llama_dir):
    model = load_8bit(llama_dir)
    ps = params.eligible_parameters(model)
    mods = int8_modules(model)
    assert set(ps) == {f"{n}.weight" for n in mods}
    bs = [ids(0)[:1]]
    ctx = ScoreContext(model, ps, bs, ScoreConfig(), torch.device("cpu"), progress=False)
    mag0 = METRICS["magnitude"].fn(ctx)  # before any forward
    for n, m in mods.items():
        torch.testing.assert_close(mag0[f"{n}.weight"], dequant(m).abs(), rtol=1e-6, atol=0)
    with torch.no_grad():
        base = model(input_ids=ids(), use_cache=False).logits
    h0 = params.param_hash(model)
    # after a forward (scales moved to state.SCB): the same scores
    mag1 = METRICS["magnitude"].fn(ctx)
    assert all(torch.equal(mag1[n], mag0[n]) for n in ps)

    # act_mag on int8: |W_dequant| * ||x_j|| with x captured here by hooks
    got = {}
    hs = [m.register_forward_pre_hook(lambda mod, a, n=n: got.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
          for n, m in mods.items()]
    with torch.no_grad():
        for b in bs:
            model(input_ids=b, use_cache=False)
    for h in hs:
        h.remove()
    am = METRICS["act_mag"].fn(ctx)
    for n, m in mods.items():
        norm = torch.cat(got[n]).square().sum(0).sqrt()
        torch.testing.assert_close(am[f"{n}.weight"].double(), dequant(m).abs().double() * norm.unsqueeze(0),
                                   rtol=1e-5, atol=1e-7)

    n = "model.layers.0.mlp.down_proj.weight"
    p = ps[n]
    f = int(torch.argmax(p.detach().abs().reshape(-1)))  # the largest int8 code (|127|) of that matrix
    with perturbed({n: p}, {n: torch.tensor([f])}, "zero", PerturbConfig()) as info:
        assert info["changed"] == 1
        with torch.no_grad():
            out = model(input_ids=ids(), use_cache=False).logits
        assert (out - base).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids(), use_cache=False).logits, base)
    assert params.param_hash(model) == h0  # state_dict saves SCB from state.SCB after a forward
    assert f"{n.rsplit('.', 1)[0]}.SCB" in model.state_dict()
