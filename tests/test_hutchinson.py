"""superweight.core.hutchinson (the memory-lean Hutchinson estimator behind hutchinson_diag) against independent
computations on tiny models:
  * the exact Hessian (torch.func.hessian of a loss written here): per-probe z ⊙ (H z) for the same probes,
    cross-layer blocks and both routes (fused Linear, generic) included; exactness when averaged over *all*
    sign patterns (probes enumerated by the test, not drawn by the code);
  * an independent Hessian-vector product (torch.func forward-over-reverse) with the same i.i.d. probes;
  * the probes: ±1, balanced, uncorrelated, deterministic, E[z zᵀ] = I, checked by counting;
  * the fused route against plain autograd (generic route), also under bf16 autocast and with bf16 weights;
  * input errors. (The statistics of the estimate over seeds, SDPA / eager / checkpointing agreement and
    the metric wrapper: tests/test_metrics.py; its memory against measured RSS: tests/test_plan.py.)
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call, grad, hessian, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, LlamaConfig,
                          LlamaForCausalLM, MixtralConfig, Phi3Config)

from superweight.core import hutchinson as H
from superweight.core.hutchinson import estimator as HE
from superweight.core.hutchinson import state as HS
from superweight.core.hutchinson.patching import _is_glu_mlp
from superweight.config import ConfigError
from superweight.core.metrics import lm_loss
from superweight.core.params import eligible_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(hidden=8, layers=2, vocab=32, attn="eager", dtype=torch.float64, inter=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def batches_for(vocab, n=2, T=10, seed=1):
    ids = torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))
    return [ids[i : i + 1] for i in range(n)]


def estimate(model, params, batches, probes, seed=0, **kw):
    return H.hessian_diagonal(model, params, batches, probes=probes, seed=seed, **kw)


def ref_loss(model, ids, overrides):
    """Mean next-token NLL, written independently of superweight.core.loss.lm_loss and of core.hutchinson."""
    logits = functional_call(model, overrides, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()


def exact_hessian(model, params, batches):
    """The full Hessian over the concatenated scored parameters (flattened in dict order), float64."""
    names = list(params)

    def loss_of(*ws):
        return sum(ref_loss(model, ids, dict(zip(names, ws))) for ids in batches) / len(batches)

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no forward-mode AD
        blocks = hessian(loss_of, argnums=tuple(range(len(names))))(*[params[n].detach() for n in names])
    sizes = [params[n].numel() for n in names]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                      for i in range(len(names))], 0).double().detach()


def flat(d, names):
    return torch.cat([d[n].reshape(-1).double() for n in names])


def probe_vec(params, seed, k, kind):
    return torch.cat([H.probe_tensor(n, p.shape, seed, k, kind).reshape(-1).double() for n, p in params.items()])


# scored parameters in different layers and roles: three take the fused Linear route, the norm weight the
# generic one
MIXED = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
         "model.layers.0.self_attn.v_proj.weight", "model.layers.1.post_attention_layernorm.weight"]


@pytest.fixture(scope="module")
def mixed():
    out = {}
    for attn in ("eager", "sdpa"):
        model = tiny(attn=attn)
        allp = dict(model.named_parameters())
        params = {n: allp[n] for n in MIXED}
        batches = batches_for(32)
        out[attn] = (model, params, batches, exact_hessian(model, params, batches))
    return out


# --------------------------------------------------------------------------------------------------
# the estimate against the exact Hessian


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["rank1", "iid"])
def test_each_probe_gives_exactly_z_times_hz(mixed, attn, kind):
    """Same probes, H z from the exact Hessian: d = (1/P) Σ_k z_k ⊙ (H z_k), cross-layer blocks included;
    saliency abs = |d|, obd = |½ d w²|."""
    model, params, batches, Hm = mixed[attn]
    P, seed = 3, 11
    ref = sum(probe_vec(params, seed, k, kind) * (Hm @ probe_vec(params, seed, k, kind)) for k in range(P)) / P
    assert (ref < 0).any() and (ref > 0).any()  # both signs: the magnitude is what is ranked
    got = flat(estimate(model, params, batches, P, seed, probe_kind=kind), list(params))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()))
    assert H.fused_modules(model, params).keys() == set(MIXED[:3])  # both routes exercised
    if kind == "rank1" and attn == "sdpa":
        w2 = flat({n: p.detach() for n, p in params.items()}, list(params)) ** 2
        ab = estimate(model, params, batches, P, seed, saliency="abs")
        obd = estimate(model, params, batches, P, seed, saliency="obd")
        assert all(v.dtype == torch.float32 and v.shape == params[n].shape for n, v in ab.items())
        tol = 1e-7 * float(ref.abs().max())
        torch.testing.assert_close(flat(ab, list(params)), ref.abs(), rtol=1e-5, atol=tol)
        torch.testing.assert_close(flat(obd, list(params)), (0.5 * ref * w2).abs(), rtol=1e-5, atol=tol * float(w2.max()))


@pytest.mark.parametrize("kind", ["rank1", "iid"])
def test_average_over_all_sign_patterns_is_the_exact_diagonal(monkeypatch, kind):
    """E[z zᵀ] = I holds exactly for the uniform average over every sign pattern a probe kind can take:
    2^(rows+cols) (a, b) pairs for rank1, 2^n matrices for iid. Feeding all of them (enumerated here, not
    drawn by the code) as probes 0..P-1 must give diag(H) to rounding error (the scored down_proj is 4 x 2)."""
    model = tiny(hidden=4, layers=1, vocab=16, inter=2)
    name = "model.layers.0.mlp.down_proj.weight"
    p = dict(model.named_parameters())[name]
    params, batches = {name: p}, batches_for(16, n=2, T=8)
    r, c = p.shape
    if kind == "rank1":
        pats = [(torch.tensor(s[:r], dtype=torch.int8), torch.tensor(s[r:], dtype=torch.int8))
                for s in itertools.product((-1, 1), repeat=r + c)]
    else:
        pats = [(torch.tensor(s, dtype=torch.int8).reshape(r, c),) for s in itertools.product((-1, 1), repeat=r * c)]
    monkeypatch.setattr(HS, "probe_factors", lambda n, shape, seed, k, kind: pats[k])
    d = estimate(model, params, batches, len(pats), probe_kind=kind)[name]
    diag = exact_hessian(model, params, batches).diagonal()
    assert float(diag.abs().min()) > 0
    torch.testing.assert_close(d.reshape(-1).double(), diag, rtol=1e-5, atol=1e-8 * float(diag.abs().max()))


def test_iid_matches_forward_over_reverse_hvp():
    """An independent Hessian-vector product (torch.func.jvp of torch.func.grad) with the same i.i.d. probes,
    on every eligible weight (tied embedding included: the generic route) of a 2-layer SDPA model."""
    model = tiny(hidden=8, attn="sdpa", vocab=32)
    params = eligible_parameters(model)
    batches = batches_for(32)
    P = 2
    ref = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    w0 = {n: p.detach() for n, p in params.items()}
    for ids in batches:
        for k in range(P):
            z = {n: H.probe_tensor(n, p.shape, 0, k, "iid").to(p.dtype) for n, p in params.items()}
            with sdpa_kernel([SDPBackend.MATH]):
                _, hz = jvp(grad(lambda w: ref_loss(model, ids, w)), (w0,), (z,))
            for n in ref:
                ref[n] += z[n] * hz[n].detach() / (P * len(batches))
    got = estimate(model, params, batches, P, probe_kind="iid")
    for n in params:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-5, atol=1e-7 * float(ref[n].abs().max()))


# --------------------------------------------------------------------------------------------------
# probes (checked by counting and against reference draws made here, not by re-implementing the generator)


@pytest.mark.parametrize("kind", ["rank1", "iid"])
def test_probes_are_pm1_balanced_and_deterministic(kind):
    shape = (1000, 1000)
    name = "model.layers.3.mlp.up_proj.weight"
    z = H.probe_tensor(name, shape, 7, 5, kind)
    assert z.shape == shape and z.dtype == torch.int8
    assert set(torch.unique(z).tolist()) == {-1, 1}
    n = z.numel()
    # iid: Binomial(n, ½); rank1: ½ + ½ (2p_a − 1)(2p_b − 1), std ½ / sqrt(rows · cols) as well
    assert abs(float((z == 1).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)
    for f in H.probe_factors(name, shape, 7, 5, kind):
        assert abs(float((f == 1).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(f.numel())
    assert torch.equal(z, H.probe_tensor(name, shape, 7, 5, kind))
    others = [H.probe_tensor(name, shape, 7, 6, kind), H.probe_tensor(name, shape, 8, 5, kind),
              H.probe_tensor("model.layers.3.mlp.gate_proj.weight", shape, 7, 5, kind)]
    for o in others:  # another probe, seed or tensor: uncorrelated
        assert abs(float((z.double() * o.double()).mean())) < 5 / math.sqrt(n)
    v = H.probe_tensor("model.norm.weight", (4096,), 7, 5, kind)  # 1-D: i.i.d. for both kinds
    assert set(torch.unique(v).tolist()) == {-1, 1} and abs(float((v == 1).double().mean()) - 0.5) < 5 * 0.5 / 64


@pytest.mark.parametrize("kind", ["rank1", "iid"])
def test_probe_second_moment_is_identity(kind):
    """mean over K probes of z zᵀ → I (unbiasedness of the estimator), entry by entry within 5 sigma."""
    K, shape = 2000, (3, 4)
    Z = torch.stack([H.probe_tensor("w", shape, 0, k, kind).reshape(-1).double() for k in range(K)])
    M = Z.T @ Z / K  # its diagonal is 1 for any ±1 vector: only the off-diagonal can fail
    off = M - torch.diag(M.diagonal())
    assert float(off.abs().max()) < 5 / math.sqrt(K)


def test_probes_are_the_same_in_every_process():
    """The probe stream is part of the scores (and of their cache key): it must not depend on the process
    (Python's hash() is salted per process). Another interpreter with another PYTHONHASHSEED draws the same
    probes; a rank-1 probe is the outer product of its two factors."""
    import os
    import subprocess
    import sys

    expr = ("([H.probe_key(0, 0, 'w', s) for s in ('row', 'col', 'iid')], "
            "H.probe_tensor('a.weight', (3, 4), 3, 2, 'rank1').tolist(), "
            "H.probe_tensor('a.weight', (3, 4), 3, 2, 'iid').tolist())")
    outs = {subprocess.run([sys.executable, "-c", f"from superweight.core import hutchinson as H; print(repr({expr}))"],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout.strip() for h in (1, 2)}
    assert outs == {repr(eval(expr))}
    z = H.probe_tensor("a.weight", (3, 4), 3, 2, "rank1")
    a, b = H.probe_factors("a.weight", (3, 4), 3, 2, "rank1")
    assert torch.equal(z, a[:, None] * b[None, :])


# --------------------------------------------------------------------------------------------------
# routes, precision, the loss, bad input


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_route_equals_generic_route(monkeypatch, arch):
    """Linear / Conv1D weights through the custom nodes vs plain autograd double backward with hooks."""
    if arch == "llama":
        model = tiny(hidden=16, vocab=64, attn="sdpa", dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                           bos_token_id=0, eos_token_id=0)).eval()
    params = eligible_parameters(model)
    assert len(H.fused_modules(model, params)) == len(params)
    batches = batches_for(64)
    a = estimate(model, params, batches, 2)
    monkeypatch.setattr(HE, "fused_modules", lambda model, params: {})
    b = estimate(model, params, batches, 2)
    for n in params:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6 * float(b[n].abs().max()))  # fp32 sums


FAMILIES = {  # attention, norm and MLP variants the recomputation and the routes meet
    "gemma2": lambda: Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64),
    "phi3": lambda: Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64),
    "mixtral": lambda: MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lean_fused_path_equals_textbook_double_backward_across_families(monkeypatch, family):
    """The default path (fused routes, recomputed internals) against lean=False with every weight on the
    generic route (plain autograd double backward), on every eligible weight, fused experts included."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    params = eligible_parameters(model)
    batches = batches_for(64)
    a = estimate(model, params, batches, 2)
    monkeypatch.setattr(HE, "fused_modules", lambda model, params: {})
    b = estimate(model, params, batches, 2, lean=False)
    for n in params:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6 * float(b[n].abs().max()))  # fp32 sums
    assert any(float(v.abs().sum()) > 0 for v in a.values())


@pytest.mark.parametrize("setting", ["autocast", "bf16_weights"])
def test_low_precision_fused_route_matches_plain_autograd(monkeypatch, setting):
    """bf16 autocast over fp32 weights (the CUDA path's casting) and bf16 weights: the fused route against
    the generic one (autograd's own casting), within bf16 rounding; scores accumulate in fp32."""
    model = tiny(hidden=16, vocab=64, attn="sdpa", dtype=torch.bfloat16 if setting == "bf16_weights" else torch.float32)
    params = eligible_parameters(model)
    batches = batches_for(64)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"):
            return estimate(model, params, batches, 4, probe_kind="iid")

    a = run()
    monkeypatch.setattr(HE, "fused_modules", lambda model, params: {})
    b = run()
    num = sum(float((a[n] - b[n]).square().sum()) for n in params)
    den = sum(float(b[n].square().sum()) for n in params)
    assert math.sqrt(num / den) < 0.05
    assert all(v.dtype == torch.float32 for v in a.values())


def test_lean_loss_is_lm_loss_and_lean_changes_nothing(mixed):
    """next_token_loss (with the recomputed cross-entropy or without) is metrics.lm_loss, and lean=False
    (every internal kept in the graph) gives the same estimate."""
    model, params, batches, _ = mixed["sdpa"]
    for lean in (True, False):
        torch.testing.assert_close(H.next_token_loss(model, batches[0], lean), lm_loss(model, batches[0]))
    a = estimate(model, params, batches, 2)
    b = estimate(model, params, batches, 2, lean=False)
    for n in params:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7 * float(b[n].abs().max()))  # fp32 buffers


def test_leaves_torch_and_the_model_as_it_found_them():
    model = tiny(hidden=16, vocab=64, attn="sdpa", dtype=torch.float32)
    params = eligible_parameters(model)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    estimate(model, params, batches_for(64), 2)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_bad_input():
    model = tiny(hidden=16, vocab=64, dtype=torch.float32)
    params = eligible_parameters(model)
    b = batches_for(64)
    with pytest.raises(ConfigError, match="probes"):
        estimate(model, params, b, 0)
    with pytest.raises(ConfigError, match="saliency"):
        estimate(model, params, b, 1, saliency="nope")
    with pytest.raises(ConfigError, match="probe kind"):
        estimate(model, params, b, 1, probe_kind="gauss")
    with pytest.raises(ConfigError, match="probe kind"):
        H.probe_tensor("w", (2, 2), 0, 0, "gauss")
    q = {"q": torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)}
    with pytest.raises(ConfigError, match="quantized"):
        estimate(model, q, b, 1)


def test_gated_mlp_is_recognised_by_what_its_forward_computes():
    """Llama's MLP is recomputed locally; a subclass whose forward computes anything else is not (and the
    check leaves no grad or forward behind)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = tiny(hidden=16, dtype=torch.float32).model.layers[0].mlp
    assert type(mlp) is LlamaMLP and _is_glu_mlp(mlp)

    class Scaled(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    class UpOnly(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.up_proj(x))

    for cls in (Scaled, UpOnly):
        other = cls(mlp.config)
        other.load_state_dict(mlp.state_dict())
        assert not _is_glu_mlp(other)
    mlp.forward = lambda x: x  # an instance forward is never the class's
    assert not _is_glu_mlp(mlp)
    assert all(p.grad is None for p in mlp.parameters())
