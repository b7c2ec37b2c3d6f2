"""Every metric against an independent computation on tiny models (plain autograd per batch, the exact
Hessian from torch.func, hand-computed activation norms, a planted super weight), plus the Super Weight
detector on the real SmolLM2 (slow)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from torch.func import functional_call, hessian

from superweight.config import ConfigError, ScoreConfig
from superweight.core.hutchinson import probe_tensor
from superweight.core.metrics import METRICS, ScoreContext, compute_scores
from superweight.core.detector import find_outliers, outlier_modules
from superweight.core.params import eligible_parameters

CPU = torch.device("cpu")


def ctx_for(model, params, batches, seed=0, **cfg) -> ScoreContext:
    return ScoreContext(model, params, batches, ScoreConfig(**cfg), CPU, seed=seed, progress=False)


def token_batches(n_windows=4, T=12, vocab=64, batch_size=1, seed=0) -> list[torch.Tensor]:
    ids = torch.randint(0, vocab, (n_windows, T), generator=torch.Generator().manual_seed(seed))
    return [ids[i : i + batch_size] for i in range(0, n_windows, batch_size)]


def ref_loss(model, ids, overrides=None):
    """Mean next-token cross-entropy, written out independently of superweight.core.metrics.lm_loss."""
    if overrides is None:
        logits = model(input_ids=ids, use_cache=False).logits
    else:
        logits = functional_call(model, overrides, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()


def ref_grads(model, params, batches):
    """Per-batch gradients with plain torch.autograd.grad (no hooks, no .grad)."""
    out = []
    for ids in batches:
        names = list(params)
        g = torch.autograd.grad(ref_loss(model, ids), [params[n] for n in names])
        out.append(dict(zip(names, g)))
    return out


# --------------------------------------------------------------------------------------------------
# first-order metrics


@pytest.mark.parametrize("batch_size", [1, 2])
def test_gradient_metrics_match_plain_autograd(batch_size):
    model = make_tiny_llama()
    params = eligible_parameters(model)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)  # a flag the metric must restore exactly as it found it
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = token_batches(4, batch_size=batch_size)

    got = {m: compute_scores(m, ctx_for(model, params, batches, batch_size=batch_size))
           for m in ("magnitude", "grad_x_weight", "grad_squared")}

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    emb.requires_grad_(True)
    grads = ref_grads(model, params, batches)
    B = len(batches)
    for n, p in params.items():
        gbar = sum(g[n] for g in grads) / B
        torch.testing.assert_close(got["magnitude"][n], p.detach().abs())
        torch.testing.assert_close(got["grad_x_weight"][n], (p.detach() * gbar).abs(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got["grad_squared"][n], sum(g[n] ** 2 for g in grads) / B, rtol=1e-4, atol=1e-12)
        assert got["grad_x_weight"][n].dtype == torch.float32 and got["grad_x_weight"][n].shape == p.shape


def test_batch_size_changes_grad_squared_but_not_grad_x_weight():
    """g_bar is the same whatever the grouping (every window has T tokens); the Fisher of mean-of-2 is not."""
    model = make_tiny_llama()
    params = eligible_parameters(model)
    b1, b2 = token_batches(4, batch_size=1), token_batches(4, batch_size=2)
    gx1 = compute_scores("grad_x_weight", ctx_for(model, params, b1))
    gx2 = compute_scores("grad_x_weight", ctx_for(model, params, b2))
    gs1 = compute_scores("grad_squared", ctx_for(model, params, b1))
    gs2 = compute_scores("grad_squared", ctx_for(model, params, b2))
    n = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(gx1[n], gx2[n], rtol=1e-4, atol=1e-9)
    assert not torch.allclose(gs1[n], gs2[n], rtol=1e-3)


# --------------------------------------------------------------------------------------------------
# hutchinson_diag vs the exact Hessian

HNAME = "model.layers.0.mlp.down_proj.weight"


def tiny_hessian_setup():
    model = make_tiny_llama(vocab_size=32, hidden=8, layers=1)
    p = dict(model.named_parameters())[HNAME]
    batches = token_batches(2, T=12, vocab=32)

    def loss_of(w):
        return sum(ref_loss(model, ids, {HNAME: w}) for ids in batches) / len(batches)

    H = hessian(loss_of)(p.detach()).reshape(p.numel(), p.numel()).detach()
    return model, p, batches, H


@pytest.fixture(scope="module")
def hess():
    return tiny_hessian_setup()


def hutch(model, p, batches, probes, saliency="obd", seed=0):
    s = compute_scores("hutchinson_diag", ctx_for(model, {HNAME: p}, batches, seed, probes=probes, saliency=saliency))
    return s[HNAME]


def test_hutchinson_equals_its_definition_with_exact_hvp(hess):
    """Same probes, H z from the exact torch.func Hessian: d = mean_k z_k * (H z_k); saliency abs = |d|,
    obd = |½ d w²| (Optimal Brain Damage, ranked by magnitude: a large negative curvature term matters too)."""
    model, p, batches, H = hess
    P = 8
    ref = torch.zeros(p.numel(), dtype=torch.float64)
    for k in range(P):
        z = probe_tensor(HNAME, p.shape, 0, k).reshape(-1).double()
        ref += z * (H.double() @ z)
    ref /= P
    w2 = p.detach().reshape(-1).double() ** 2
    obd, ab = hutch(model, p, batches, P, "obd"), hutch(model, p, batches, P, "abs")
    assert (ref < 0).any() and (ref > 0).any()  # the estimate has both signs: the magnitude matters
    torch.testing.assert_close(ab.reshape(-1).double(), ref.abs(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(obd.reshape(-1).double(), (0.5 * ref * w2).abs(), rtol=1e-4, atol=1e-12)
    assert bool((obd >= 0).all())
    assert all(q.grad is None for q in model.parameters())
    assert all(q.requires_grad for q in model.parameters())


def hutchinson_mse_ratio(H, draw, P=32, S=60):
    """Mean over S seeds of the squared error of the P-probe Hutchinson estimate of diag(H), divided by the
    theory E||d_P - diag H||²/n = (1/P) mean_i sum_{j != i} H_ij² (exact for any probe with ±1 entries that
    are pairwise independent: the variance involves only pairwise moments). draw(seed, k) -> probe vector."""
    d = H.diagonal()
    theory = float((H.square().sum(1) - d.square()).mean()) / P
    mse = 0.0
    for s in range(S):
        Z = torch.stack([draw(s, k) for k in range(P)])  # [P, n]
        mse += float(((Z * (Z @ H.T)).mean(0) - d).square().mean()) / S
    return mse / theory


def test_hutchinson_estimator_statistics_match_theory(hess):
    """The probes hutchinson_diag uses (rank-1 Rademacher, hutchinson.probe_tensor), applied to the exact
    Hessian: over 60 seeds of P = 32 probes the mean squared error equals the theory (within ±25%, about 4
    standard errors), as it does for reference i.i.d. Rademacher probes drawn here, independently of the code
    under test. The check can fail: probes constant along rows (E[z zᵀ] != I) are biased and miss the band.
    (That the metric computes exactly mean_k z_k ⊙ (H z_k) for these probes: the test above.)"""
    _, p, _, H = hess
    H = H.double()
    shape, n = p.shape, p.numel()

    def ours(s, k):
        return probe_tensor(HNAME, shape, 100 + s, k).reshape(-1).double()

    def reference(s, k):
        g = torch.Generator().manual_seed(10_000 * s + k)
        return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).double()

    def row_constant(s, k):  # a broken probe: z_ij = a_i
        g = torch.Generator().manual_seed(10_000 * s + k)
        a = (torch.randint(0, 2, (shape[0], 1), generator=g) * 2 - 1).double()
        return a.expand(shape).reshape(-1)

    for draw in (ours, reference):
        z = draw(0, 0)
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    got, ref = hutchinson_mse_ratio(H, ours), hutchinson_mse_ratio(H, reference)
    assert 0.75 < got < 1.25 and 0.75 < ref < 1.25, (got, ref)
    broken = hutchinson_mse_ratio(H, row_constant)
    assert not 0.75 < broken < 1.25, broken
    # balanced: over many probes, the fraction of +1 entries is ½ for ours as for the reference
    many = torch.stack([ours(s, k) for s in range(20) for k in range(32)])
    assert abs(float((many == 1).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(20 * 32 * shape[0])


def test_hutchinson_estimate_concentrates_on_the_diagonal(hess):
    """The metric itself with many probes: |d| correlates with |diag H|, and obd = ½ |d| w²."""
    model, p, batches, H = hess
    d = H.diagonal().detach().abs()
    w2 = p.detach().reshape(-1) ** 2
    est = hutch(model, p, batches, 128, "abs").reshape(-1).detach()
    obd = hutch(model, p, batches, 128, "obd").reshape(-1).detach()
    torch.testing.assert_close(obd, 0.5 * est * w2, rtol=1e-5, atol=1e-14)
    assert torch.corrcoef(torch.stack([est, d]))[0, 1] > 0.8


def test_hutchinson_eager_sdpa_and_checkpointing_agree():
    """Same seed, same estimate with eager attention, SDPA (pinned to its math kernel: the fused CPU
    kernel has no double backward) and non-reentrant gradient checkpointing that really recomputes."""
    batches = token_batches(2, T=10)
    eager = make_tiny_llama(attn_implementation="eager")
    sdpa = make_tiny_llama(attn_implementation="sdpa")
    ckpt = make_tiny_llama(attn_implementation="eager")
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = {"n": 0}
    mlp, fwd = ckpt.model.layers[0].mlp, ckpt.model.layers[0].mlp.forward

    def counting_forward(*a, **k):  # module hooks do not fire during checkpoint recomputation; this does
        calls["n"] += 1
        return fwd(*a, **k)

    mlp.forward = counting_forward
    out = {}
    for tag, m in (("eager", eager), ("sdpa", sdpa), ("ckpt", ckpt)):
        out[tag] = compute_scores("hutchinson_diag", ctx_for(m, eligible_parameters(m), batches, probes=3))
    assert calls["n"] > len(batches), "checkpointed layers were not recomputed"
    assert sdpa.config._attn_implementation == "sdpa"
    assert not any(mod.training for mod in ckpt.modules())
    for n in out["eager"]:
        torch.testing.assert_close(out["sdpa"][n], out["eager"][n], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(out["ckpt"][n], out["eager"][n], rtol=1e-4, atol=1e-8)
    assert any(float(v.abs().sum()) > 0 for v in out["eager"].values())


def test_hutchinson_seed_and_probe_count_change_the_estimate(hess):
    model, p, batches, _ = hess
    a, b = hutch(model, p, batches, 4, seed=0), hutch(model, p, batches, 4, seed=1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, hutch(model, p, batches, 4, seed=0))
    assert METRICS["hutchinson_diag"].params == ("batch_size", "probes", "saliency")
    bf = compute_scores("hutchinson_diag", ctx_for(model, {HNAME: p}, batches, 0, probes=4, saliency="obd",
                                                   dtype="bfloat16"))[HNAME]
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), a, rtol=1e-2, atol=1e-9)  # fp32 accumulation, one final rounding
    with pytest.raises(ConfigError, match="saliency"):
        compute_scores("hutchinson_diag", ctx_for(model, {HNAME: p}, batches, probes=2, saliency="nope"))


# --------------------------------------------------------------------------------------------------
# act_mag (Wanda)


class LinearStack(torch.nn.Module):
    """Embedding -> Linear(8, 6) -> ReLU -> Linear(6, 5): small enough to recompute by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(20, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].fc_in = torch.nn.Linear(8, 6)
        self.layers[0].fc_out = torch.nn.Linear(6, 5, bias=False)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        h = torch.relu(self.layers[0].fc_in(self.emb(input_ids)))
        return SimpleNamespace(logits=self.layers[0].fc_out(h))


def test_act_mag_matches_hand_computation_on_a_linear_stack():
    m = LinearStack().eval()
    params = {"layers.0.fc_in.weight": m.layers[0].fc_in.weight, "layers.0.fc_out.weight": m.layers[0].fc_out.weight}
    batches = token_batches(3, T=7, vocab=20, batch_size=2)
    s = compute_scores("act_mag", ctx_for(m, params, batches))
    ids = torch.cat(batches)
    with torch.no_grad():
        x1 = m.emb(ids).reshape(-1, 8)
        x2 = torch.relu(x1 @ m.layers[0].fc_in.weight.T + m.layers[0].fc_in.bias)
    n1 = torch.sqrt((x1**2).sum(0))
    n2 = torch.sqrt((x2**2).sum(0))
    torch.testing.assert_close(s["layers.0.fc_in.weight"], m.layers[0].fc_in.weight.detach().abs() * n1[None, :])
    torch.testing.assert_close(s["layers.0.fc_out.weight"], m.layers[0].fc_out.weight.detach().abs() * n2[None, :])


def test_act_mag_tiny_llama_vs_captured_inputs():
    model = make_tiny_llama()
    params = eligible_parameters(model)
    batches = token_batches(3, T=9)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for n in params:
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        hooks.append(mod.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0].detach().clone())))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    s = compute_scores("act_mag", ctx_for(model, params, batches))
    for n, p in params.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[n]]).double()
        ref = p.detach().double().abs() * x.norm(dim=0)[None, :]
        torch.testing.assert_close(s[n].double(), ref, rtol=1e-5, atol=1e-7)


def test_act_mag_conv1d_and_unsupported_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    params = eligible_parameters(gpt)
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: weight [in=16, out=48]
    assert name in params and params[name].shape == (16, 48)
    batches = token_batches(2, T=8)
    seen = []
    h = gpt.get_submodule(name[: -len(".weight")]).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for ids in batches:
            gpt(input_ids=ids)
    h.remove()
    x = torch.cat([t.reshape(-1, 16) for t in seen])
    s = compute_scores("act_mag", ctx_for(gpt, params, batches))
    torch.testing.assert_close(s[name], params[name].detach().abs() * x.norm(dim=0)[:, None], rtol=1e-5, atol=1e-7)

    llama = make_tiny_llama()
    emb = eligible_parameters(llama, include=r"embed_tokens")
    with pytest.raises(ConfigError, match=r"act_mag cannot score 'model.embed_tokens.weight'.*valid weight kinds"):
        compute_scores("act_mag", ctx_for(llama, emb, batches))


# --------------------------------------------------------------------------------------------------
# act_outlier: the Super Weight detector


def plant_super_weight(model, layer=1, d=3, c=7, r=5, token=11, strength=5.0):
    """Make token `token` carry a large residual feature d that only layer `layer`'s MLP channel c reads,
    and put a large weight at down_proj[r, c]: the massive activation appears at output channel r of that
    layer's down_proj, only at that token, caused by exactly one weight (r, c)."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, d] = 0.0
        emb[token, :] = 0.0
        emb[token, d] = 1.0
        for i, blk in enumerate(model.model.layers):
            blk.self_attn.o_proj.weight[d, :] = 0.0  # nothing else writes feature d
            if i < layer:
                blk.mlp.down_proj.weight[d, :] = 0.0
        mlp = model.model.layers[layer].mlp
        mlp.gate_proj.weight[c, :] = 0.0
        mlp.up_proj.weight[c, :] = 0.0
        mlp.gate_proj.weight[c, d] = strength
        mlp.up_proj.weight[c, d] = strength
        mlp.down_proj.weight[r, c] = strength
    return f"model.layers.{layer}.mlp.down_proj.weight", r, c


def test_act_outlier_finds_a_planted_super_weight():
    model = make_tiny_llama()
    pname, r, c = plant_super_weight(model)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = ids[1, 5] = ids[2, 9] = 11
    batches = [ids[:2], ids[2:]]
    cands, stats = find_outliers(model, batches, threshold=20.0)
    assert [(k.param, k.row, k.col) for k in cands] == [(pname, r, c)]
    k = cands[0]
    assert k.occurrences == 3 and k.out_channel == r and k.in_channel == c
    assert abs(k.activation) > 20 * max(s["typical_max"] for s in stats)
    assert k.weight == pytest.approx(5.0)
    assert k.score == pytest.approx(abs(k.input_activation * k.weight), rel=1e-5)

    params = eligible_parameters(model)
    s = compute_scores("act_outlier", ctx_for(model, params, batches, outlier_threshold=20.0))
    assert set(s) == set(params)
    nonzero = [(n, i) for n, t in s.items() for i in torch.nonzero(t.reshape(-1)).reshape(-1).tolist()]
    assert nonzero == [(pname, r * params[pname].shape[1] + c)]
    assert float(s[pname][r, c]) == pytest.approx(k.score)

    # no token 11 in the batches: no massive activation, no candidate
    clean = [torch.where(b == 11, torch.zeros_like(b), b) for b in batches]
    assert find_outliers(model, clean, threshold=20.0)[0] == []


def test_outlier_modules_names_across_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = make_tiny_llama()
    assert sorted(outlier_modules(llama)) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    assert sorted(outlier_modules(gpt)) == [f"transformer.h.{i}.mlp.c_proj.weight" for i in range(2)]
    only0 = {"model.layers.0.mlp.down_proj.weight": llama.model.layers[0].mlp.down_proj.weight}
    assert list(outlier_modules(llama, only0)) == list(only0)


@pytest.mark.slow
def test_act_outlier_on_smollm_finds_a_catastrophic_weight(smollm):
    """Real SmolLM2-135M, one 64-token calibration window: zeroing the top candidate must hurt eval PPL far
    more than zeroing random single weights of the same tensor."""
    from superweight.config import DataConfig, PerturbConfig
    from superweight.inputs.data import build_windows
    from superweight.core.evaluation import evaluate_lm
    from superweight.core.perturbation import perturbed

    model, tok, _ = smollm
    w = build_windows(DataConfig(seq_len=64, eval_windows=2, calib_windows=1), tok)
    params = eligible_parameters(model)
    cands, _ = find_outliers(model, [w.calib(0)], threshold=50.0, params=params)
    assert cands, "no massive activation found in SmolLM2"
    top = cands[0]
    assert top.param.endswith("mlp.down_proj.weight")
    ids = w.eval_tokens
    base = evaluate_lm(model, ids).ppl
    with perturbed(params, {top.param: torch.tensor([top.flat_index])}, "zero", PerturbConfig()):
        hit = evaluate_lm(model, ids).ppl
    g = torch.Generator().manual_seed(0)
    rand = []
    for f in torch.randint(0, params[top.param].numel(), (2,), generator=g).tolist():
        with perturbed(params, {top.param: torch.tensor([f])}, "zero", PerturbConfig()):
            rand.append(evaluate_lm(model, ids).ppl)
    print(f"baseline {base:.2f}  zero {top.param}[{top.row},{top.col}] -> {hit:.2f}  random -> {rand}")
    assert hit > 2 * base
    assert max(abs(math.log(r / base)) for r in rand) < 0.05
    assert math.log(hit / base) > 10 * max(abs(math.log(r / base)) for r in rand) + 0.5


# --------------------------------------------------------------------------------------------------
# superweight detect (CLI)


@pytest.fixture(scope="module")
def planted_model_dir(tmp_path_factory, small_tokenizer):
    """A local HF dir: tiny random Llama with the small tokenizer and a super weight planted on ' the'."""
    tok = small_tokenizer
    the = tok(" the", add_special_tokens=False)["input_ids"][0]
    model = make_tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=2)
    pname, r, c = plant_super_weight(model, layer=1, d=3, c=7, r=5, token=the)
    d = tmp_path_factory.mktemp("planted")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, pname, r, c


def test_detect_cli_reports_the_planted_weight(planted_model_dir, tmp_path, capsys):
    import json

    import pandas as pd

    from superweight.commands import main

    d, pname, r, c = planted_model_dir
    out = tmp_path / "det"
    rc = main(["detect", f"model={d}", f"out_dir={out}", "data.seq_len=32", "data.eval_windows=2",
               "data.calib_windows=2", "--random", "2", "candidates=1", "wandb.mode=disabled"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "baseline eval" in printed and "candidate" in printed
    res = json.loads((out / "detect.json").read_text())
    top = res["candidates"][0]
    assert (top["param"], top["row"], top["col"]) == (pname, r, c)
    assert res["options"] == {"candidates": 1, "random": 2}
    df = pd.read_csv(out / "detect.csv")
    assert df["kind"].tolist() == ["candidate", "random", "random"]
    assert (df["param"] == pname).all()
    assert not ((df["kind"] == "random") & (df["row"] == r) & (df["col"] == c)).any()
    base = res["baseline"]["ppl"]
    assert df["ppl_ratio"].tolist() == pytest.approx((df["ppl"] / base).tolist())
    assert df.loc[0, "weight"] == pytest.approx(5.0)


@pytest.mark.parametrize("args, needle", [
    (["random=-1"], "random"),
    (["candidates=x"], "candidates"),
    (["score.include=q_proj"], "down projection"),
    (["metric=nope"], "nope"),
])
def test_detect_cli_bad_input_writes_nothing(planted_model_dir, tmp_path, capsys, args, needle):
    from superweight.commands import main

    d = planted_model_dir[0]
    out = tmp_path / "bad"
    assert main(["detect", f"model={d}", f"out_dir={out}", "data.seq_len=32", "data.eval_windows=2",
                 "data.calib_windows=2", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not out.exists()
