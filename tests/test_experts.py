"""Mixture-of-experts support on tiny random Mixtral / Qwen2-MoE / OLMoE / gpt-oss models of the installed
transformers: fused 3-D expert weights scored (act_mag, act_outlier, gradients), named, ranked and perturbed.

Every activation quantity is checked against a brute-force reference written out here (router top-k by hand
from `mlp.gate.weight`, gate/up rows sliced by hand, an explicit loop over experts and tokens), which uses
nothing from superweight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from superweight.core import experts, params
from superweight.core.selections import rank
from superweight.edge.ranking_rows import ranking_rows
from superweight.config import ConfigError, PerturbConfig, ScoreConfig
from superweight.core.metrics import METRICS, ScoreContext
from superweight.core.detector import find_outliers, outlier_modules, ravel
from superweight.core.perturbation import perturbed

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------------
# builders


def make_mixtral(seed=0, layers=2, experts=4, top_k=2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def make_qwen2_moe(seed=0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                         shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen2MoeForCausalLM(cfg).eval()


def make_olmoe(seed=0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=64, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    return OlmoeForCausalLM(cfg).eval()


def make_gpt_oss(seed=0):
    """Transposed layout ([E, in, out], x @ W), biases, interleaved gate/up with a custom _apply_gate."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # biases start at 0: make them count
        for n, p in model.named_parameters():
            if n.endswith("_bias"):
                p.normal_(0, 0.1)
    return model


BUILDERS = {"mixtral": make_mixtral, "qwen2_moe": make_qwen2_moe, "olmoe": make_olmoe}
EXPERT_NAMES = [f"model.layers.{i}.mlp.experts.{k}" for i in range(2) for k in ("gate_up_proj", "down_proj")]


def batches(n=4, T=16, bs=2, seed=0):
    ids = torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))
    return [ids[i : i + bs] for i in range(0, n, bs)]


def forward_all(model, bs):
    with torch.no_grad():
        for ids in bs:
            model(input_ids=ids, use_cache=False)


def ctx_for(model, bs, ps=None, **score):
    return ScoreContext(model, ps if ps is not None else params.eligible_parameters(model), bs,
                        ScoreConfig(**score), CPU, progress=False)


def block_inputs(model, bs):
    """{layer: [N, H] input of each sparse block (mlp)} captured by pre-hooks, concatenated over batches."""
    got: dict[int, list] = {}
    hs = []
    for i, layer in enumerate(model.model.layers):
        hs.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: got.setdefault(i, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    try:
        forward_all(model, bs)
    finally:
        for h in hs:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def brute_force_expert_inputs(model, bs):
    """{param name: sumsq [E, in]} and {layer: tokens per expert}, by hand: top-k of x @ W_router.T, then for
    each expert and each token routed to it, gate = x @ Wgu[e][:I].T, up = x @ Wgu[e][I:].T, h = silu(gate)*up."""
    X = block_inputs(model, bs)
    ref, counts = {}, {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        x = X[i].double()
        Wr = mlp.gate.weight.detach().double()
        k = mlp.gate.top_k
        topk = torch.topk(x @ Wr.T, k, dim=-1).indices  # softmax is monotone: same top-k as the probabilities
        Wgu = mlp.experts.gate_up_proj.detach().double()
        E, twoI, H = Wgu.shape
        I = twoI // 2
        s_up = torch.zeros(E, H, dtype=torch.float64)
        s_dn = torch.zeros(E, I, dtype=torch.float64)
        cnt = torch.zeros(E, dtype=torch.int64)
        for e in range(E):
            for t in range(x.shape[0]):
                if e in topk[t].tolist():
                    xt = x[t]
                    h = F.silu(Wgu[e, :I] @ xt) * (Wgu[e, I:] @ xt)
                    s_up[e] += xt**2
                    s_dn[e] += h**2
                    cnt[e] += 1
        ref[f"model.layers.{i}.mlp.experts.gate_up_proj"] = s_up
        ref[f"model.layers.{i}.mlp.experts.down_proj"] = s_dn
        counts[i] = cnt
    return ref, counts


# --------------------------------------------------------------------------------------------------
# 0. what the installed transformers does (the layout experts.py relies on)


def test_installed_layout_names_shapes_and_forward():
    model = make_mixtral()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "layers.0.mlp" in n}
    assert shapes == {"model.layers.0.mlp.gate.weight": (4, 32),
                      "model.layers.0.mlp.experts.gate_up_proj": (4, 128, 32),
                      "model.layers.0.mlp.experts.down_proj": (4, 32, 64)}
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate).__name__ == "MixtralTopKRouter" and not isinstance(mlp.gate, torch.nn.Linear)
    ex = mlp.experts
    assert (ex.has_gate, ex.has_bias, ex.is_transposed, ex.is_concatenated) == (True, False, False, True)
    assert model.config._experts_implementation == "grouped_mm"  # the default, also on CPU
    assert list(experts.experts_modules(model)) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert experts.is_experts_module(ex) and not experts.is_experts_module(mlp.gate)

    # The experts' output, rebuilt by hand from (x, top_k_index, top_k_weights): y = sum_k w_k * D_e h,
    # h = silu(G_e[:I] x) * (G_e[I:] x)  -> layout [E, out, in] with gate rows first, x @ W.T.
    for impl in ("grouped_mm", "batched_mm", "eager"):
        model.set_experts_implementation(impl)
        cap = {}
        h1 = ex.register_forward_pre_hook(lambda m, a: cap.update(args=a))
        h2 = ex.register_forward_hook(lambda m, a, o: cap.update(out=o))
        with torch.no_grad():
            model(input_ids=batches()[0], use_cache=False)
        h1.remove(), h2.remove()
        x, idx, w = cap["args"]
        I = ex.gate_up_proj.shape[1] // 2
        ref = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for s in range(idx.shape[1]):
                e = int(idx[t, s])
                h = F.silu(ex.gate_up_proj[e, :I] @ x[t]) * (ex.gate_up_proj[e, I:] @ x[t])
                ref[t] += w[t, s] * (ex.down_proj[e] @ h)
        torch.testing.assert_close(cap["out"], ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 1. act_mag for fused experts


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_act_mag_experts_matches_brute_force(arch, impl):
    model = BUILDERS[arch]()
    model.set_experts_implementation(impl)
    bs = batches()
    elig = params.eligible_parameters(model)
    names = [n for n in elig if params.weight_kind(model, n) == "experts"]
    assert sorted(names) == sorted(EXPERT_NAMES)
    ref, counts = brute_force_expert_inputs(model, bs)
    with experts.ExpertInputNorms(model, names) as acc:
        forward_all(model, bs)
    for i in range(2):
        assert acc.tokens[f"model.layers.{i}.mlp.experts"].tolist() == counts[i].tolist()
    for n in names:
        torch.testing.assert_close(acc.sumsq[n].double(), ref[n], rtol=1e-5, atol=1e-7)
    standalone = experts.act_mag_experts(model, bs, names)
    # the metric, on every eligible weight of the MoE model (dense attention / shared expert included)
    scores = METRICS["act_mag"].fn(ctx_for(model, bs, elig))
    assert set(scores) == set(elig)
    for n in names:
        W = model.get_parameter(n).detach().double()
        expect = W.abs() * ref[n].sqrt().unsqueeze(1)  # [E, out, in] * ||x_in|| per expert
        for s in (standalone[n], scores[n]):
            assert s.shape == W.shape and s.dtype == torch.float32
            torch.testing.assert_close(s.double(), expect, rtol=1e-5, atol=1e-7)


def test_act_mag_expert_without_tokens_scores_zero():
    model = make_mixtral()
    mlp = model.model.layers[1].mlp
    orig = mlp.gate.forward

    def never_expert_3(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, 32), mlp.gate.weight)
        logits[:, 3] = -float("inf")
        p = logits.softmax(-1)
        v, i = torch.topk(p, 2, dim=-1)
        return logits, v / v.sum(-1, keepdim=True), i

    mlp.gate.forward = never_expert_3
    n = "model.layers.1.mlp.experts.down_proj"
    ps = {m: model.get_parameter(m) for m in (n, "model.layers.1.mlp.experts.gate_up_proj")}
    try:
        s = experts.act_mag_experts(model, batches(), list(ps))
        sm = METRICS["act_mag"].fn(ctx_for(model, batches(), ps))
    finally:
        mlp.gate.forward = orig
    for t in (s[n], sm[n]):
        assert float(t[3].abs().sum()) == 0.0 and float(t[:3].abs().sum()) > 0


@pytest.mark.parametrize("arch", [*BUILDERS, "gpt_oss"])
def test_recomputation_reproduces_the_experts_output(arch):
    """sum_k w_k * expert_output(e_k, expert_hidden(e_k, x)) == the experts module's own output (grouped_mm),
    for [E, out, in] layouts and gpt-oss's transposed, biased, interleaved one."""
    model = make_gpt_oss() if arch == "gpt_oss" else BUILDERS[arch]()
    name, ex = next(iter(experts.experts_modules(model).items()))
    cap = {}
    h1 = ex.register_forward_pre_hook(lambda m, a, k: cap.update(xiw=experts.bind_experts_args(m, a, k)),
                                      with_kwargs=True)
    h2 = ex.register_forward_hook(lambda m, a, o: cap.update(out=o))
    with torch.no_grad():
        model(input_ids=batches()[0], use_cache=False)
        h1.remove(), h2.remove()
        x, idx, w = cap["xiw"]
        ref = torch.zeros_like(x)
        for e, tok, kpos in experts.routed_tokens(idx, ex.num_experts):
            y = experts.expert_output(ex, e, experts.expert_hidden(ex, e, x[tok]))
            ref.index_add_(0, tok, y * w[tok, kpos, None])
    torch.testing.assert_close(cap["out"].reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)
    if arch == "gpt_oss":
        assert experts.in_axis(ex) == 1 and experts.out_axis(ex) == 2
        n = f"{name}.down_proj"
        assert params.weight_kind(model, n) == "experts"
        s = experts.act_mag_experts(model, batches(), [n])[n]  # [E, in, out]: norm broadcast over the last axis
        ratio = s / ex.down_proj.detach().abs()
        torch.testing.assert_close(ratio, ratio[:, :, :1].expand_as(ratio))
        elig = params.eligible_parameters(model)
        assert n in elig and f"{name}.down_proj_bias" not in elig  # the 2-D [E, out] bias is not a weight
        assert "model.layers.0.mlp.router.weight" not in elig
        assert params.is_router("model.layers.0.mlp.router.weight")


def test_routed_tokens_skips_sentinels_and_matches_one_hot():
    idx = torch.tensor([[0, 2], [2, 4], [1, 0], [3, 2]])  # 4 = expert-parallel sentinel for E=4
    got = {e: (t.tolist(), p.tolist()) for e, t, p in experts.routed_tokens(idx, 4)}
    assert got == {0: ([0, 2], [0, 1]), 1: ([2], [0]), 2: ([0, 1, 3], [1, 0, 1]), 3: ([3], [0])}
    # independent reference: one-hot over (token, slot)
    for e, (tok, pos) in got.items():
        t, p = torch.nonzero(idx == e, as_tuple=True)
        assert (tok, pos) == (t.tolist(), p.tolist())


# --------------------------------------------------------------------------------------------------
# 2. the Super Weight detector for experts


PLANT = dict(layer=1, expert=2, row=7, col=5)
PLANTED_PARAM = "model.layers.1.mlp.experts.down_proj"
PLANTED_FLAT = (2 * 32 + 7) * 64 + 5  # [4, 32, 64] row-major


def plant_expert_super_weight(model, layer=1, expert=2, row=7, col=5, gain=20.0, value=10.0):
    """Expert `expert` of block `layer`: amplify intermediate channel `col` (its gate and up rows x gain, so
    |h_col| dominates that expert's input at every token) and set down_proj[expert][row, col] = value, so its
    output channel `row` spikes at every token routed to it."""
    ex = model.model.layers[layer].mlp.experts
    I = ex.down_proj.shape[2]
    with torch.no_grad():
        ex.gate_up_proj[expert, col] *= gain
        ex.gate_up_proj[expert, I + col] *= gain
        ex.down_proj[expert, row, col] = value
    return ex


def test_detector_finds_the_planted_expert_weight():
    model = make_mixtral()
    plant_expert_super_weight(model, **PLANT)
    bs = batches()
    with experts.ExpertInputNorms(model, EXPERT_NAMES) as acc:
        forward_all(model, bs)
    n_routed = int(acc.tokens["model.layers.1.mlp.experts"][2])
    assert n_routed >= 8  # the planted expert does receive tokens

    cands, stats = find_outliers(model, bs, threshold=20.0)
    assert {(c.param, c.expert, c.row, c.col) for c in cands} == {(PLANTED_PARAM, 2, 7, 5)}
    c = cands[0]
    assert c.layer == 1 and c.out_channel == 7 and c.in_channel == 5 and c.weight == 10.0
    assert c.flat_index == PLANTED_FLAT == ravel((4, 32, 64), 2, 7, 5)
    assert c.occurrences <= n_routed and abs(c.activation) > 20.0
    assert abs(c.activation) > 50 * c.layer_typical_max
    assert [s["n_candidates"] for s in stats] == [0, 1]
    assert c.score == pytest.approx(abs(c.input_activation * c.weight), rel=1e-5)

    # act_outlier, the metric, on every eligible weight: nonzero only at the planted weight
    s = METRICS["act_outlier"].fn(ctx_for(model, bs, outlier_threshold=20.0))
    nz = {(n, int(i)) for n, t in s.items() for i in torch.nonzero(t.reshape(-1)).squeeze(1)}
    assert nz == {(PLANTED_PARAM, PLANTED_FLAT)}
    assert float(s[PLANTED_PARAM].reshape(-1)[PLANTED_FLAT]) == pytest.approx(c.score)

    # weighted=True (spike as seen in the block output, times the routing weight) finds the same weight
    cw, _ = find_outliers(model, bs, threshold=20.0, weighted=True)
    assert {(x.expert, x.row, x.col) for x in cw} == {(2, 7, 5)}


def test_detector_on_the_transposed_gpt_oss_layout():
    """gpt-oss down_proj is [E, in, out] (x @ W): the candidate of a spike at output channel c driven by input
    channel j is down_proj[e][j, c], i.e. row = the input channel, col = the output channel."""
    model = make_gpt_oss()
    ex = model.model.layers[1].mlp.experts
    e, j, c = 2, 5, 7
    with torch.no_grad():  # interleaved gate/up: columns 2j and 2j+1 of gate_up_proj[e] ([H, 2I]) feed h_j
        ex.gate_up_proj[e][:, 2 * j] *= 20
        ex.gate_up_proj[e][:, 2 * j + 1] *= 20
        ex.gate_up_proj_bias[e][2 * j] = 3.0
        ex.gate_up_proj_bias[e][2 * j + 1] = 3.0
        ex.down_proj[e][j, c] = 10.0
    bs = batches()
    name = "model.layers.1.mlp.experts.down_proj"
    flat = (e * 48 + j) * 32 + c  # [4, 48, 32] row-major
    cands, _ = find_outliers(model, bs, threshold=20.0)
    assert [(x.param, x.expert, x.row, x.col, x.out_channel, x.in_channel, x.flat_index) for x in cands] == [
        (name, e, j, c, c, j, flat)]
    assert cands[0].weight == 10.0
    s = METRICS["act_outlier"].fn(ctx_for(model, bs, outlier_threshold=20.0))
    assert {(n, int(i)) for n, t in s.items() for i in torch.nonzero(t.reshape(-1)).squeeze(1)} == {(name, flat)}
    assert params.index_names(tuple(ex.down_proj.shape), flat) == {"expert": e, "row": j, "col": c}


def test_detector_clean_model_has_no_candidates():
    model = make_mixtral()
    bs = batches()
    assert find_outliers(model, bs, threshold=20.0)[0] == []
    cands, stats = find_outliers(model, bs, threshold=20.0)
    assert cands == [] and sorted(s["param"] for s in stats) == [n for n in EXPERT_NAMES if "down" in n]
    s = METRICS["act_outlier"].fn(ctx_for(model, bs, outlier_threshold=20.0))
    assert all(float(t.abs().sum()) == 0.0 for t in s.values())
    assert outlier_modules(model) == {}  # dense down projections only; fused experts go through experts.py


def test_zeroing_the_planted_weight_with_superweight_perturbation_removes_the_spike():
    model = make_mixtral()
    plant_expert_super_weight(model, **PLANT)
    bs = batches()
    c = find_outliers(model, bs, threshold=20.0)[0][0]
    p = {c.param: model.get_parameter(c.param)}
    with perturbed(p, {c.param: torch.tensor([c.flat_index])}, "zero", PerturbConfig()) as info:
        assert info["changed"] == 1 and float(model.get_parameter(c.param).detach()[2, 7, 5]) == 0.0
        assert find_outliers(model, bs, threshold=20.0)[0] == []
        assert find_outliers(model, bs, threshold=20.0)[0] == []
    assert float(model.get_parameter(c.param).detach()[2, 7, 5]) == 10.0
    assert [(x.expert, x.row, x.col) for x in find_outliers(model, bs, threshold=20.0)[0]] == [(2, 7, 5)]


# --------------------------------------------------------------------------------------------------
# 3. routers


def test_router_predicate_and_eligibility():
    for arch, build in BUILDERS.items():
        model = build()
        names = [n for n, _ in model.named_parameters()]
        routers = sorted(n for n in names if params.is_router(n))
        expect = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
        if arch == "qwen2_moe":
            expect = sorted(expect + [f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in range(2)])
        assert routers == expect, arch
        assert not any(params.is_router(n) for n in names if "gate_proj" in n)
        elig = params.eligible_parameters(model)
        assert not set(elig) & set(routers)
        assert set(EXPERT_NAMES) <= set(elig)
        assert all(params.weight_kind(model, n) == "experts" for n in EXPERT_NAMES)
        # opt-in: score.include reaches them
        assert set(params.eligible_parameters(model, include=r"mlp\.gate\.weight$")) == {
            f"model.layers.{i}.mlp.gate.weight" for i in range(2)}

    # The router runs F.linear(x, W) on every token of the block (so Wanda's |W| * ||x|| would apply), but
    # its class is not an nn.Linear: act_mag rejects an opted-in router with a clear error.
    model = make_mixtral()
    r = model.model.layers[0].mlp.gate
    got = []
    h = r.register_forward_hook(lambda m, a, o: got.append(a[0].detach().reshape(-1, 32)))
    bs = batches()
    forward_all(model, bs)
    h.remove()
    x = torch.cat(got)
    torch.testing.assert_close(x, block_inputs(model, bs)[0])  # the router sees every token of the block
    assert params.weight_kind(model, "model.layers.0.mlp.gate.weight") == "other"
    ps = params.eligible_parameters(model, include=r"layers\.0\.mlp\.gate\.weight$")
    with pytest.raises(ConfigError, match="act_mag cannot score 'model.layers.0.mlp.gate.weight'"):
        METRICS["act_mag"].fn(ctx_for(model, bs, ps))
    mag = METRICS["magnitude"].fn(ctx_for(model, bs, ps))
    assert torch.equal(mag["model.layers.0.mlp.gate.weight"], r.weight.detach().abs())


# --------------------------------------------------------------------------------------------------
# 4. naming


def test_naming_of_3d_params():
    shape = (4, 32, 64)
    for f in (0, 1, 63, 64, 2047, 2048, PLANTED_FLAT, 4 * 32 * 64 - 1):
        e, r, c = (int(v) for v in torch.unravel_index(torch.tensor(f), shape))
        assert params.index_names(shape, f) == {"expert": e, "row": r, "col": c}
        assert ravel(shape, e, r, c) == f
    assert params.index_names((32, 64), 70) == {"row": 1, "col": 6}
    n = "model.layers.0.mlp.experts.down_proj"
    assert params.layer_of(n) == 0 and params.module_type(n) == "mlp.experts.down_proj"
    assert params.module_type("model.layers.3.mlp.experts.gate_up_proj") == "mlp.experts.gate_up_proj"
    assert params.module_type("model.layers.3.mlp.gate.weight") == "mlp.gate"
    assert params.module_type("model.layers.3.mlp.down_proj.weight") == "mlp.down_proj"  # dense: unchanged


def test_ranking_rows_and_per_row_on_3d():
    model = make_mixtral()
    n = PLANTED_PARAM
    p = model.get_parameter(n)
    s = torch.zeros(p.shape)
    s[2, 7, 5] = 1.0
    r = rank({n: s}, 1, "global", "top_k")
    row = ranking_rows(r, {n: dict(enumerate(p.detach().reshape(-1).tolist()))}, 1)[0]
    assert row["flat_index"] == PLANTED_FLAT
    assert (row["expert"], row["row"], row["col"]) == (2, 7, 5)
    assert row["module"] == "mlp.experts.down_proj" and row["layer"] == 1 and row["param"] == n
    assert row["value"] == float(p.detach()[2, 7, 5])
    # dense weights carry expert = -1
    d = "model.layers.0.self_attn.q_proj.weight"
    sd = torch.zeros(model.get_parameter(d).shape)
    sd[3, 4] = 1.0
    rowd = ranking_rows(rank({d: sd}, 1), {d: {3 * sd.shape[1] + 4: 0.5}}, 1)[0]
    assert (rowd["expert"], rowd["row"], rowd["col"]) == (-1, 3, 4)

    # per_row: one group per OUTPUT ROW of each expert (E * R groups of C weights), not one per expert
    sc = torch.rand(p.shape, generator=torch.Generator().manual_seed(0))
    rr = rank({n: sc}, 1, "per_row", "top_k")
    assert len(rr) == 4 * 32
    best = sc.reshape(4 * 32, 64).argmax(1) + torch.arange(4 * 32) * 64  # brute force: argmax of each row
    assert sorted(rr.flat.tolist()) == sorted(best.tolist())
    rr3 = rank({n: sc}, 3, "per_row", "top_k")
    assert len(rr3) == 3 * 4 * 32
    groups = {}
    for f in rr3.flat.tolist():
        c = params.index_names(tuple(p.shape), f)
        groups.setdefault((c["expert"], c["row"]), []).append(c["col"])
    assert len(groups) == 4 * 32
    for (e, rw), cols in groups.items():
        assert sorted(cols) == sorted(torch.topk(sc[e, rw], 3).indices.tolist())


# --------------------------------------------------------------------------------------------------
# 5. gradient metrics and perturbations on 3-D parameters


def test_gradient_metrics_on_3d_match_plain_autograd():
    model = make_mixtral()
    bs = [ids[:1] for ids in batches(n=3, bs=1)]
    ps = params.eligible_parameters(model)
    assert "model.layers.0.mlp.experts.down_proj" in ps and "model.layers.0.mlp.gate.weight" not in ps
    ctx = ctx_for(model, bs, ps)
    gxw, gsq = METRICS["grad_x_weight"].fn(ctx), METRICS["grad_squared"].fn(ctx)
    names = list(ps)
    gs = []
    for ids in bs:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        gs.append(dict(zip(names, torch.autograd.grad(loss, [ps[n] for n in names]))))
    for n in names:
        gbar = sum(g[n] for g in gs) / len(gs)
        torch.testing.assert_close(gxw[n], (gbar * ps[n].detach()).abs(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(gsq[n], sum(g[n] ** 2 for g in gs) / len(gs), rtol=1e-4, atol=1e-12)
        assert gxw[n].shape == ps[n].shape
    # grouped_mm and eager experts give the same gradients
    model.set_experts_implementation("eager")
    gxw_eager = METRICS["grad_x_weight"].fn(ctx_for(model, bs, ps))
    for n in names:
        torch.testing.assert_close(gxw_eager[n], gxw[n], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["zero", "sign_flip", "gauss_noise", "bit_flip"])
def test_perturbations_on_3d_touch_one_expert_weight_and_restore(name):
    model = make_mixtral()
    n = PLANTED_PARAM
    p = model.get_parameter(n)
    e, r, c = 2, 7, 5
    ids = batches()[0]
    with torch.no_grad():
        base = model(input_ids=ids, use_cache=False).logits
    before = p.detach().clone()
    h0 = params.param_hash(model)
    cfg = PerturbConfig(bits="exponent_msb") if name == "bit_flip" else PerturbConfig()
    with perturbed({n: p}, {n: torch.tensor([PLANTED_FLAT])}, name, cfg, seed=0) as info:
        assert info["changed"] == 1
        assert torch.nonzero(p.detach() != before).tolist() == [[e, r, c]]
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
        assert not torch.equal(out, base)  # the experts' forward reads the perturbed fused tensor
    assert params.param_hash(model) == h0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, base)
