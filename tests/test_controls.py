"""Controls that can fail, each checked against an independent computation.

A tiny Llama with a planted super weight (layers.0.mlp.down_proj[7, 5] = 20: a few frequent tokens drive a
massive activation in residual channel 7, and the LM head reads the corpus's unigram distribution from that
channel, so zeroing the weight wrecks the loss at those tokens), a block of exact-zero weights
(layers.1.self_attn.q_proj rows 0..7) and a metric with a support smaller than K (act_outlier; hand-made
score dicts for the unit tests). Selections are checked against sorts of |w| over w != 0, perturbation
sizes against hand arithmetic, confidence intervals against textbook t quantiles, a brute-force coverage
simulation and the identity gap(top, zero control) = effect(top).
"""

import math
import random
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_llama
from superweight.config import PerturbConfig, RunConfig
from safetensors import safe_open

from superweight.arguments import parse_config
from superweight.run.experiment import Experiment
from superweight.edge.outputs import RunOutputs
from superweight.core.params import module_type
from superweight.core.perturbation import _change_counts, changeable, perturbed
from superweight.core.gaps import effects, gaps
from superweight.core.results import paired_ci
from superweight.core.summary import aggregate_over_seeds
from superweight.core.matching import match_quality
from superweight.core.overlap import ks_distance, tied_counts
from superweight.core.ranking import tie_hash
from superweight.core.selections import rank, rank_grid

SUPER = ("model.layers.0.mlp.down_proj.weight", 7, 5)
ZERO_BLOCK = "model.layers.1.self_attn.q_proj.weight"  # rows 0..7 exactly 0
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be has or it not "
         "but had they she he we you all one").split()


# ---------------------------------------------------------------------------------------------------
# the planted model
# ---------------------------------------------------------------------------------------------------
def corpus_lines(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def plant(tok, hidden: int = 32):
    """The tiny model: see the module docstring. Spike tokens = the most frequent corpus tokens (~20% of
    positions, so the spike is an outlier against the layer's median token)."""
    ids = torch.tensor(tok("\n".join(corpus_lines()))["input_ids"])
    V = len(tok)
    cnt = torch.bincount(ids, minlength=V).double()
    order = torch.argsort(cnt, descending=True)
    share = torch.cumsum(cnt[order], 0) / cnt.sum()
    spike = order[: int((share < 0.2).sum()) + 1]
    logp = torch.log((cnt + 1e-3) / (cnt + 1e-3).sum()).float()
    m = make_tiny_llama(vocab_size=V, hidden=hidden, layers=2, seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        m.model.embed_tokens.weight[spike, 0] = 3.0
        mlp = m.model.layers[0].mlp
        mlp.gate_proj.weight[5] = 0.0
        mlp.gate_proj.weight[5, 0] = 1.0
        mlp.up_proj.weight[5] = 0.0
        mlp.up_proj.weight[5, 0] = 1.0
        mlp.down_proj.weight[SUPER[1], SUPER[2]] = 20.0
        m.lm_head.weight[:, SUPER[1]] = logp / math.sqrt(hidden)
        m.model.layers[1].self_attn.q_proj.weight[:8] = 0.0
    return m


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def planted(tok):
    m = plant(tok)
    params = {n: p for n, p in m.named_parameters() if ".layers." in n and p.ndim == 2}
    return m, params


def mask_for(params, pert: str):
    cfg = PerturbConfig()
    return lambda n: changeable(pert, params[n].detach(), cfg)


def values_of(params):
    return lambda n: params[n].detach()


def selected_values(r, params) -> torch.Tensor:
    return torch.tensor([float(params[r.names[p]].detach().reshape(-1)[f]) for p, f in zip(r.pid.tolist(), r.flat.tolist())])


def keyset(r) -> set:
    return {(r.names[p], f) for p, f in zip(r.pid.tolist(), r.flat.tolist())}


def all_weights(params) -> list[tuple[str, int, float]]:
    return [(n, f, v) for n, p in params.items() for f, v in enumerate(p.detach().reshape(-1).tolist())]


def test_planted_super_weight_wrecks_the_loss(planted, tok):
    """The fixture is what it claims: zeroing the one planted weight raises NLL by > 1 nat/token."""
    m, params = planted
    x = torch.tensor(tok("\n".join(corpus_lines()))["input_ids"][: 8 * 32]).view(8, 32)

    def nll():
        with torch.no_grad():
            lg = m(x).logits[:, :-1].float()
        return float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), x[:, 1:].reshape(-1)))

    before = nll()
    with perturbed(params, {SUPER[0]: torch.tensor([SUPER[1] * 64 + SUPER[2]])}, "zero", PerturbConfig()):
        after = nll()
    assert after - before > 1.0, (before, after)
    assert int((params[ZERO_BLOCK] == 0).sum()) >= 8 * 32


# ---------------------------------------------------------------------------------------------------
# selections over changeable weights
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pert", ["zero", "sign_flip"])
def test_every_selection_draws_from_nonzero_weights(planted, pert):
    m, params = planted
    K = 200
    mag = {n: p.detach().abs() for n, p in params.items()}
    mask = mask_for(params, pert)
    ref = sorted((abs(v), n, f) for n, f, v in all_weights(params) if v != 0)  # independent: a Python sort
    n_zero = sum(v == 0 for _, _, v in all_weights(params))
    assert n_zero > K  # Bottom-K of |w| without the candidate rule would be all zeros

    top = rank(mag, K, "global", "top_k", seed=0, mask_fn=mask)
    assert (top.names[int(top.pid[0])], int(top.flat[0])) == (SUPER[0], SUPER[1] * 64 + SUPER[2])
    assert sorted(selected_values(top, params).abs().tolist()) == sorted(a for a, _, _ in ref[-K:])
    bottom = rank(mag, K, "global", "bottom_k", seed=0, mask_fn=mask)
    assert sorted(selected_values(bottom, params).abs().tolist()) == [a for a, _, _ in ref[:K]]
    sels = {"top_k": top, "bottom_k": bottom}
    for draw in (0, 1):
        sels[f"random_k{draw}"] = rank(mag, K, "global", "random_k", seed=0, draw=draw, mask_fn=mask)
        sels[f"matched_k{draw}"] = rank(mag, K, "global", "matched_k", seed=0, draw=draw, mask_fn=mask, top=top,
                                        values=values_of(params))
    assert keyset(sels["random_k0"]) != keyset(sels["random_k1"])
    for name, r in sels.items():
        for k in (1, 10, K):
            sel = r.take(k)
            v = selected_values(sel, params)
            assert len(sel) == k and len(keyset(sel)) == k, name
            assert bool((v != 0).all()), f"{name} K={k} selected an exact zero"
            with perturbed(params, sel.by_param(), pert, PerturbConfig()) as info:
                assert info["n"] == k and info["changed"] == k, (name, k, info)
                assert info["mean_abs_w"] == pytest.approx(float(v.abs().mean()), rel=1e-6)
    assert not keyset(sels["matched_k0"]) & keyset(top)
    # the unmasked rule this replaces really was vacuous: Bottom-K of |w| = zeros that zero cannot change
    vacuous = rank(mag, K, "global", "bottom_k", seed=0)
    with perturbed(params, vacuous.by_param(), "zero", PerturbConfig()) as info:
        assert info["changed"] == 0


def test_a_metric_that_ranks_zeros_first_still_selects_nonzero_weights(planted):
    """grad_squared-like scores can rank w = 0 highly: Top-K must skip them too."""
    m, params = planted
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) + 10.0 * (p.detach() == 0) for n, p in params.items()}
    top = rank(scores, 300, "global", "top_k", seed=0, mask_fn=mask_for(params, "zero"))
    assert len(top) == 300 and bool((selected_values(top, params) != 0).all())
    # reference: the 300 highest scores among w != 0
    ref = sorted(((float(scores[n].reshape(-1)[f]), n, f) for n, f, v in all_weights(params) if v != 0), reverse=True)
    assert keyset(top) == {(n, f) for _, n, f in ref[:300]}


def brute_ks(a, b) -> float:
    a, b = list(a), list(b)
    return max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in a + b)


def test_matched_k_is_disjoint_and_matches_magnitudes(planted):
    m, params = planted
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}  # Top-K unrelated to |w|
    mask = mask_for(params, "zero")
    K = 150
    top = rank(scores, K, "global", "top_k", seed=0, mask_fn=mask)
    draws = [rank(scores, K, "global", "matched_k", seed=0, draw=d, mask_fn=mask, top=top, values=values_of(params))
             for d in range(2)]
    assert keyset(draws[0]) != keyset(draws[1])
    tvals = {int(r): (top.names[p], f) for r, p, f in zip(top.group_rank.tolist(), top.pid.tolist(), top.flat.tolist())}
    for mk in draws:
        assert len(mk) == K and len(keyset(mk)) == K and not keyset(mk) & keyset(top)
        for k in (10, K):
            sel, tsel = mk.take(k), top.take(k)
            a = selected_values(tsel, params).abs().numpy()
            b = selected_values(sel, params).abs().numpy()
            ks = brute_ks(a, b)
            assert ks_distance(a, b) == pytest.approx(ks)
            q = match_quality(sel)
            assert q["match_ks"] == pytest.approx(ks) and ks <= (0.2 if k == 10 else 0.1), (k, q)
        # each match: the same module type as its target, |w| within 1% for nearly all (the nearest free |w|
        # where a target's ±1% window has no free candidate left: here two, within 20%)
        errs = []
        for r, p, f in zip(mk.group_rank.tolist(), mk.pid.tolist(), mk.flat.tolist()):
            tn, tf = tvals[int(r)]
            assert module_type(mk.names[p]) == module_type(tn)
            w = abs(float(params[mk.names[p]].detach().reshape(-1)[f]))
            t = abs(float(params[tn].detach().reshape(-1)[tf]))
            assert w != 0
            errs.append(abs(w / t - 1))
        assert sum(e <= 0.01 for e in errs) >= 0.98 * K and max(errs) <= 0.2, sorted(errs)[-3:]
        # a matched weight carries its own score (auditable), not its target's
        assert torch.equal(mk.score, torch.tensor([float(scores[mk.names[p]].reshape(-1)[f])
                                                   for p, f in zip(mk.pid.tolist(), mk.flat.tolist())]))


def test_matched_k_is_drawn_per_k_against_that_ks_top_k():
    """matched_k at a small K must match that K's Top-K, not a prefix of the K_max match: the prefix would
    exclude every Top-K_max weight, i.e. exactly the near-equal |w| neighbours a Top-1 match needs."""
    g = torch.Generator().manual_seed(3)
    w = torch.linspace(0.01, 1.0, 4096)[torch.randperm(4096, generator=g)].reshape(64, 64)
    params = {"model.layers.0.mlp.down_proj.weight": torch.nn.Parameter(w)}
    scores = {n: p.detach().abs() for n, p in params.items()}  # Top-K = the largest |w|
    ks = [1, 500]
    top = rank(scores, max(ks), "global", "top_k")
    mk = rank_grid(scores, ks, "global", "matched_k", seed=0, draw=0, top=top, values=values_of(params))
    one, big = mk.take(1), mk.take(500)
    assert len(one) == 1 and len(big) == 500 and keyset(big) == keyset(mk) and mk.k_max == 500
    with pytest.raises(ValueError):  # not drawn for this K: a prefix would be the wrong selection
        mk.take(7)
    v1 = float(w.reshape(-1)[int(one.flat[0])])
    assert 0.99 * (1 - 0.01) <= v1 < 1.0 and abs(match_quality(one)["match_err_max"]) <= 0.01  # a ±1% neighbour
    assert not keyset(one) & keyset(top.take(1)) and not keyset(big) & keyset(top)
    # the K_max match of the same Top-1 target had to go outside ±5% (its neighbours are all in Top-500)
    j = int(torch.argmin(big.group_rank))
    assert float(w.reshape(-1)[int(big.flat[j])]) < 0.95
    # past a metric's support the Top-K sets are equal: drawn once, the same matched selection for each such K
    sparse = {n: torch.where(p.detach().abs() > 0.9995, p.detach().abs(), torch.zeros(())) for n, p in params.items()}
    top3 = rank(sparse, 10, "global", "top_k")
    assert len(top3) == 3
    m3 = rank_grid(sparse, [1, 5, 10], "global", "matched_k", seed=0, draw=0, top=top3, values=values_of(params))
    assert len(m3.take(5)) == len(m3.take(10)) == 3 and keyset(m3.take(5)) == keyset(m3.take(10))
    assert not keyset(m3.take(10)) & keyset(top3)
    # a nested selection is one ranking (take = prefix), unchanged by rank_grid
    rk = rank_grid(scores, ks, "global", "random_k", seed=0, draw=0)
    assert not rk.per_k and len(rk.take(1)) == 1 and keyset(rk.take(1)) <= keyset(rk)


@pytest.mark.parametrize("pool", [1 << 18, 256])
def test_matched_k_is_uniform_inside_the_window(monkeypatch, pool):
    """One target (|w| = 1) in a type of 2 x 4096 weights: 30 candidates within ±1% (20 in one tensor, 10 in
    the other) among dense weights elsewhere, and 5 more at exactly 1.01 (closed window). Over 700 draws
    each candidate is picked ~20 times (chi-square over 35 cells), whether the type is searched exactly
    (POOL above its size) or through the uniform sample plus the exact pass of the sparse windows."""
    import superweight.core.matching as matching

    monkeypatch.setattr(matching, "POOL", pool)
    g = torch.Generator().manual_seed(0)
    vals = {f"model.layers.{i}.mlp.down_proj.weight": 0.1 + 0.3 * torch.rand(64, 64, generator=g) for i in range(2)}
    inside = [(0, f) for f in range(100, 120)] + [(1, f) for f in range(7, 17)] + [(1, f) for f in range(50, 55)]
    a, b = vals["model.layers.0.mlp.down_proj.weight"].view(-1), vals["model.layers.1.mlp.down_proj.weight"].view(-1)
    a[0] = 1.0  # the target
    for pid, f in inside:
        (a if pid == 0 else b)[f] = 1.01 if f >= 50 and pid == 1 else 1.0 + 0.018 * (torch.rand((), generator=g).item() - 0.5)
    b[60] = 1.0102  # just outside ±1%
    scores = {n: torch.zeros_like(v) for n, v in vals.items()}
    scores["model.layers.0.mlp.down_proj.weight"].view(-1)[0] = 1.0
    top = rank(scores, 1, "global", "top_k")
    names = list(vals)
    counts = {key: 0 for key in inside}
    for draw in range(700):
        mk = rank(scores, 1, "global", "matched_k", seed=draw // 100, draw=draw % 100, top=top, values=lambda n: vals[n])
        key = (names.index(mk.names[int(mk.pid[0])]), int(mk.flat[0]))
        assert key in counts and abs(match_quality(mk)["match_err_max"]) <= 0.0101, key
        counts[key] += 1
    exp = 700 / len(inside)
    chi2 = sum((c - exp) ** 2 / exp for c in counts.values())
    assert chi2 < 70, (chi2, counts)  # 34 df: mean 34, sd 8


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_selections_read_the_weights_and_never_write_them(monkeypatch, mode):
    """Every selection, the tie counts and the score summary leave the weights and the scores bit-identical.
    fp32 weights handed over as themselves (`.float()` of an fp32 tensor is the tensor: an in-place op on it
    would change the model), with matched_k's uniform pool forced small (POOL = 64) so its exact passes over
    the sparse |w| windows run too; the scores are |w| (magnitude: the Top-K sit in the far tail)."""
    import superweight.core.matching as matching
    from superweight.core.score_summary import score_summary

    monkeypatch.setattr(matching, "POOL", 64)
    g = torch.Generator().manual_seed(5)
    vals = {f"model.layers.{i}.mlp.{t}.weight": torch.randn(48, 40, generator=g) for i in range(3)
            for t in ("down_proj", "up_proj")}
    vals["model.layers.1.mlp.down_proj.weight"][3, 7] = -25.0  # a super weight
    scores = {n: v.abs() for n, v in vals.items()}
    before = {n: (v.clone(), scores[n].clone()) for n, v in vals.items()}
    mask = lambda n: vals[n] != 0
    top = rank_grid(scores, [1, 10, 100], mode, "top_k", seed=0, mask_fn=mask)
    for selection in ("bottom_k", "random_k", "matched_k"):
        r = rank_grid(scores, [1, 10, 100], mode, selection, seed=0, draw=1, mask_fn=mask, top=top,
                      values=lambda n: vals[n])
        assert len(r.take(10)) == len(top.take(10))
    if mode == "global":
        tied_counts(scores, top, [1, 10, 100], mask)
        score_summary(scores, 50)
    for n, (w, s) in before.items():
        assert torch.equal(vals[n], w) and torch.equal(scores[n], s), n


def test_per_row_matched_k_take_keeps_its_stats(planted):
    """take(k) of a non-prefix (per_row) matched_k selection reports the KS of exactly its own entries."""
    m, params = planted
    g = torch.Generator().manual_seed(2)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    mask = mask_for(params, "zero")
    top = rank(scores, 3, "per_row", "top_k", seed=0, mask_fn=mask)
    mk = rank(scores, 3, "per_row", "matched_k", seed=0, mask_fn=mask, top=top, values=values_of(params))
    sel = mk.take(1)
    assert len(sel.stats["match_abs_w"]) == len(sel)
    assert np.allclose(np.sort(sel.stats["match_abs_w"]), np.sort(selected_values(sel, params).abs().numpy()))


def test_top_k_stops_at_the_support_and_never_selects_nan():
    scores = {"a.weight": torch.zeros(6, 8), "b.weight": torch.zeros(4, 5)}
    scores["a.weight"][0, :3] = torch.tensor([5.0, 4.0, 3.0])
    scores["b.weight"][1, 2] = 2.0
    scores["b.weight"][2, 0] = 1.0
    scores["a.weight"][3] = float("nan")
    scores["b.weight"][3, :2] = -1.0
    top = rank(scores, 50, "global", "top_k")
    assert top.support == 5 and len(top) == 5 and len(top.take(50)) == 5 and len(top.take(3)) == 3
    assert top.score.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    bottom = rank(scores, 50, "global", "bottom_k")
    assert len(bottom) == 50 - 0 and not bool(torch.isnan(bottom.score).any())
    assert bottom.score[:2].tolist() == [-1.0, -1.0]  # the lowest finite scores first
    assert len(rank(scores, 80, "global", "bottom_k")) == 6 * 8 + 4 * 5 - 8  # every finite score, no NaN


# ---------------------------------------------------------------------------------------------------
# ties
# ---------------------------------------------------------------------------------------------------
def tie_dict(dtype=torch.float32) -> dict[str, torch.Tensor]:
    """10 certain winners (3.0), 40 tied entries (2.0) over three tensors, the rest 1.0."""
    s = {"x.weight": torch.ones(8, 8, dtype=dtype), "y.weight": torch.ones(6, 6, dtype=dtype), "z.weight": torch.ones(30, dtype=dtype)}
    s["x.weight"].view(-1)[:10] = 3.0
    s["x.weight"].view(-1)[10:30] = 2.0
    s["y.weight"].view(-1)[5:15] = 2.0
    s["z.weight"][20:30] = 2.0
    return s


TIED = {("x.weight", f) for f in range(10, 30)} | {("y.weight", f) for f in range(5, 15)} | {("z.weight", f) for f in range(20, 30)}


def test_ties_are_drawn_uniformly_by_seed_and_counted():
    scores = tie_dict()
    counts = {key: 0 for key in TIED}
    subsets = set()
    n_seeds = 400
    for seed in range(n_seeds):
        r = rank(scores, 20, "global", "top_k", seed=seed)
        got = keyset(r)
        assert {("x.weight", f) for f in range(10)} <= got  # the certain winners, always
        tied = got & TIED
        assert len(tied) == 10
        subsets.add(frozenset(tied))
        for key in tied:
            counts[key] += 1
        if seed < 3:
            assert tied_counts(scores, r, [20, 10]) == {20: 40, 10: 10}
    assert len(subsets) == n_seeds  # a new boundary subset for every seed (C(40, 10) ~ 8.5e8 possible)
    # uniform: each tied entry is in 1/4 of the subsets; chi-square over 40 cells (E ~ 40 · 0.75 = 30)
    exp = n_seeds * 10 / 40
    chi2 = sum((c - exp) ** 2 / exp for c in counts.values())
    assert chi2 < 75, chi2
    # the boundary subset is the documented rule: the 10 tied entries with the smallest u(seed, name, index)
    for seed in (7, 8):
        u = sorted((int(tie_hash(seed, n, torch.tensor([f]))[0]), (n, f)) for n, f in TIED)
        assert keyset(rank(scores, 20, "global", "top_k", seed=seed)) & TIED == {key for _, key in u[:10]}
    # bottom_k draws its ties as well
    bsets = {frozenset(keyset(rank(scores, 70, "global", "bottom_k", seed=s))) for s in range(10)}
    assert len(bsets) == 10


def test_ties_do_not_depend_on_parameter_order_or_dtype():
    """The tie key hashes (seed, parameter *name*, flat index): the selected set is the same whatever the
    order of the score dict and whichever other (non-selected) tensors are scored; n_tied counts the tied
    class in fp64 too (the boundary score is compared in its own dtype)."""
    a = tie_dict()
    b = dict(reversed(list(a.items())))
    c = {"w.weight": torch.zeros(5, 5), **b}  # an extra tensor whose scores never reach the boundary
    for seed in range(5):
        ra = rank(a, 20, "global", "top_k", seed=seed)
        assert keyset(ra) == keyset(rank(b, 20, "global", "top_k", seed=seed)) == keyset(rank(c, 20, "global", "top_k", seed=seed))
        assert keyset(rank(a, 3, "per_layer", "top_k", seed=seed)) == keyset(rank(b, 3, "per_layer", "top_k", seed=seed))
    d = tie_dict(torch.float64)
    for t in d.values():
        t.mul_(1 + 1e-12)  # not representable in float32
    r = rank(d, 20, "global", "top_k", seed=0)
    assert tied_counts(d, r, [20])[20] == 40
    mask = lambda n: (torch.arange(d[n].numel()) % 2 == 0).reshape(d[n].shape)  # noqa: E731
    assert tied_counts(d, rank(d, 20, "global", "top_k", seed=0, mask_fn=mask), [20], mask)[20] == 20


def test_per_layer_and_per_row_ties_vary_with_the_seed():
    s = {"x.weight": torch.ones(4, 10)}
    rows = {frozenset(keyset(rank(s, 3, "per_row", "top_k", seed=seed))) for seed in range(10)}
    layers = {frozenset(keyset(rank(s, 3, "per_layer", "top_k", seed=seed))) for seed in range(10)}
    assert len(rows) == 10 and len(layers) == 10


# ---------------------------------------------------------------------------------------------------
# perturbation size
# ---------------------------------------------------------------------------------------------------
def test_change_counts_by_hand():
    w32 = torch.tensor([0.0, -0.0, 1.5, -2.0, 3.0])
    w16 = torch.tensor([0.5, 0.0], dtype=torch.float16)
    params = {"a": w32.clone(), "b": w16.clone()}
    sel = {"a": torch.arange(5), "b": torch.arange(2)}
    bits_before = params["a"].view(torch.int32).clone()
    with perturbed(params, sel, "sign_flip", PerturbConfig()) as info:
        assert info["n"] == 7 and info["changed"] == 4  # 1.5, -2, 3, 0.5: -0.0 == 0.0 is no change
        assert info["bits_changed"] == 7  # the zeros' sign bits did change
        assert info["delta_w_l2"] == pytest.approx(math.sqrt(3.0 ** 2 + 4.0 ** 2 + 6.0 ** 2 + 1.0 ** 2))
        assert info["delta_w_linf"] == 6.0
        assert info["mean_abs_w"] == pytest.approx((1.5 + 2.0 + 3.0 + 0.5) / 7)
    assert torch.equal(params["a"].view(torch.int32), bits_before)  # -0.0 restored bit-exactly
    with perturbed(params, sel, "zero", PerturbConfig()) as info:
        assert info["changed"] == 4 and info["bits_changed"] == 5  # -0.0 -> 0.0 changes a bit, not a value
        assert info["delta_w_l2"] == pytest.approx(math.sqrt(1.5 ** 2 + 2.0 ** 2 + 3.0 ** 2 + 0.5 ** 2))
        assert info["delta_w_linf"] == 3.0
    with perturbed(params, sel, "gauss_noise", PerturbConfig(scale=0.1)) as info:
        assert info["changed"] == 4  # relative noise leaves zeros at zero
    info = _change_counts([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, float("nan")])])
    assert info["changed"] == 1 and info["bits_changed"] == 0  # NaN counts as a changed value


# ---------------------------------------------------------------------------------------------------
# confidence intervals
# ---------------------------------------------------------------------------------------------------
T975 = {1: 12.7062, 4: 2.7764, 9: 2.2622, 11: 2.2010, 15: 2.1314, 19: 2.0930, 31: 2.0395, 99: 1.9842}  # textbook


@pytest.mark.parametrize("n", sorted(k + 1 for k in T975))
def test_paired_ci_is_a_paired_t_interval(n):
    rng = np.random.default_rng(n)
    base = rng.uniform(200, 300, n)
    delta = rng.normal(0.3, 0.2, n) * 127
    tokens = [127] * n
    lo, hi = paired_ci({"window_nll": list(base + delta)}, {"window_nll": list(base), "window_tokens": tokens})
    d = delta / 127
    mean, sd = sum(d) / n, math.sqrt(sum((x - sum(d) / n) ** 2 for x in d) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    assert lo == pytest.approx(mean - half, abs=2e-4 * sd) and hi == pytest.approx(mean + half, abs=2e-4 * sd)


def synth_rows(rng, gap: float, seeds=(0, 1, 2), draws: int = 3, W: int = 24, sd_win=0.3, sd_draw=0.2, sd_seed=0.1):
    """Rows of one metric/K: per-window ΔNLL of Top-K (mean 0.5 + gap) and of a control (mean 0.5), with
    shared window effects (paired), seed effects and draw effects."""
    n = np.full(W, 100.0)
    base = rng.uniform(3, 4, W) * n
    win = rng.normal(0, sd_win, W)
    rows = []
    for s in seeds:
        seed_eff = rng.normal(0, sd_seed)
        top = 0.5 + gap + win + seed_eff + rng.normal(0, 0.05, W)
        rows.append(dict(perturbation="zero", mode="global", metric="m", k=10, selection="top_k", seed=s, draw=0,
                         support=None, window_nll=list(base + top * n), delta_nll=float(np.sum(top * n) / n.sum())))
        for d in range(draws):
            c = 0.5 + win + rng.normal(0, sd_draw) + rng.normal(0, 0.05, W)
            rows.append(dict(perturbation="zero", mode="global", metric="m", k=10, selection="random_k", seed=s,
                             draw=d, support=None, window_nll=list(base + c * n), delta_nll=float(np.sum(c * n) / n.sum())))
    baseline = {"window_nll": list(base), "window_tokens": list(n), "ppl": 30.0}
    return rows, baseline


def test_gaps_point_estimate_is_the_seed_mean_of_top_minus_the_draw_mean():
    """The interval itself is checked in tests/test_stats.py (hand computations, simulated coverage)."""
    rows, base = synth_rows(np.random.default_rng(0), gap=0.4)
    g = gaps(rows, base)
    assert len(g) == 1
    r = g.iloc[0]
    top = np.mean([x["delta_nll"] for x in rows if x["selection"] == "top_k"])
    ctl = np.mean([np.mean([x["delta_nll"] for x in rows if x["selection"] == "random_k" and x["seed"] == s]) for s in range(3)])
    assert r.gap_nll == pytest.approx(top - ctl) and r.n_seeds == 3 and r.n_draws == 3 and r.n_windows == 24
    assert r.gap_nll_lo < r.gap_nll < r.gap_nll_hi and r.conditional_on == ""


def test_effects_agree_with_gaps_and_leave_out_rows_past_the_support():
    rng = np.random.default_rng(3)
    rows, base = synth_rows(rng, gap=0.4, draws=1)
    # a control that changed nothing: its windows are the baseline's, so gap(top, it) = effect(top)
    zero_ctl = [dict(r, selection="bottom_k", window_nll=list(base["window_nll"]), delta_nll=0.0)
                for r in rows if r["selection"] == "top_k"]
    only = [r for r in rows if r["selection"] == "top_k"] + zero_ctl
    g = gaps(only, base).set_index("control")
    e = effects(only, base).set_index("selection")
    assert g.loc["bottom_k", "gap_nll"] == pytest.approx(e.loc["top_k", "delta_nll"])
    assert g.loc["bottom_k", "gap_nll_lo"] == pytest.approx(e.loc["top_k", "delta_nll_lo"])
    assert g.loc["bottom_k", "gap_nll_hi"] == pytest.approx(e.loc["top_k", "delta_nll_hi"])
    assert e.loc["top_k", "ppl_ratio_lo"] == pytest.approx(math.exp(e.loc["top_k", "delta_nll_lo"]))
    assert e.loc["bottom_k", "delta_nll"] == 0.0 and e.loc["bottom_k", "delta_nll_lo"] == 0.0
    # Top-K at a K past its metric's support is no Top-K at that K: no gap, no effect
    past = [dict(r, support=5) for r in rows]
    assert gaps(past, base).empty
    assert set(effects(past, base)["selection"]) == {"random_k"}


# ---------------------------------------------------------------------------------------------------
# a real tiny run
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tok, one_thread):
    d = tmp_path_factory.mktemp("planted")
    plant(tok).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n")
    cfg = RunConfig()
    cfg.model.name, cfg.model.device = str(d / "model"), "cpu"
    cfg.data.corpus, cfg.data.seq_len, cfg.data.eval_windows, cfg.data.calib_windows = str(d / "corpus.txt"), 32, 8, 2
    cfg.score.metrics, cfg.score.outlier_threshold, cfg.score.cache = ["magnitude", "act_outlier"], 20.0, False
    cfg.select.topk, cfg.perturb.names, cfg.seeds = [1, 20], ["zero"], [0, 1]  # sign_flip: see test_change_counts_by_hand
    cfg.wandb.mode, cfg.out_dir, cfg.cache_dir = "disabled", str(d / "out"), str(d / "cache")
    err = []

    class Capture:
        def write(self, s):
            err.append(s)

        def flush(self):
            pass

    old, sys.stderr = sys.stderr, Capture()
    try:
        result = Experiment(cfg, progress=False).run()
    finally:
        sys.stderr = old
    return result, "".join(err)


def test_run_marks_the_support_warns_once_and_controls_change_k_weights(planted_run):
    result, err = planted_run
    df = result.table
    assert err.count("warning: act_outlier") == 1 and "magnitude gives" not in err
    ao = df[(df.metric == "act_outlier") & (df.selection == "top_k")]
    support = int(ao["support"].iloc[0])
    assert 1 <= support < 20 and (ao["support"] == support).all()
    assert (ao["n_selected"] == ao["k"].clip(upper=support)).all()
    assert set(result.gaps[result.gaps.metric == "act_outlier"]["k"]) == {1}  # no gap past the support
    agg = aggregate_over_seeds(df, "delta_nll")  # what the Δ-vs-K plots draw: no padding either
    assert set(agg[(agg.metric == "act_outlier") & (agg.selection == "top_k")]["k"]) == {1}
    assert set(agg[(agg.metric == "act_outlier") & (agg.selection == "random_k")]["k"]) == {1, 20}
    # act_outlier finds the planted weight; its Top-1 is magnitude's Top-1
    r = result.rankings[("act_outlier", 0, "global", "top_k", 0, "zero")]
    assert (r.names[int(r.pid[0])], int(r.flat[0])) == (SUPER[0], SUPER[1] * 64 + SUPER[2])
    for sel in ("bottom_k", "random_k", "matched_k"):
        c = df[df.selection == sel]
        assert (c["changed"] == c["n_selected"]).all() and (c["mean_abs_w"] > 0).all(), sel
        if sel != "matched_k":
            assert (c["n_selected"] == c["k"]).all(), sel
    # matched_k has one match per Top-K weight: it stops at the support too
    keys = ["metric", "seed", "k", "perturbation"]
    top_n = df[df.selection == "top_k"].set_index(keys)["n_selected"]
    mk = df[df.selection == "matched_k"].set_index(keys)["n_selected"]
    assert (mk == top_n.reindex(mk.index)).all()
    assert set(df[df.selection == "random_k"]["draw"]) == {0, 1}
    assert df[df.selection == "matched_k"]["match_ks"].notna().all()
    assert df[df.selection.isin(["top_k", "bottom_k"])]["n_tied"].ge(1).all()
    mag1 = df[(df.metric == "magnitude") & (df.selection == "top_k") & (df.k == 1)].set_index("seed")
    assert mag1.loc[0, "delta_w_l2"] == pytest.approx(20.0) and mag1.loc[0, "delta_w_linf"] == pytest.approx(20.0)
    assert mag1.loc[0, "delta_nll"] > 0.5 and mag1.loc[0, "delta_nll_lo"] > 0
    g = result.gaps.set_index(["metric", "k", "control", "perturbation"])
    for control in ("random_k", "bottom_k", "matched_k"):
        assert g.loc[("magnitude", 1, control, "zero"), "gap_nll_lo"] > 0.3, control
    bottom = df[(df.metric == "magnitude") & (df.selection == "bottom_k")]
    assert (bottom["delta_nll"].abs() < 0.05).all()


def test_matched_k_past_the_support_is_recorded_for_every_k(tmp_path, tok, one_thread):
    """act_outlier's support is below K = 20 and 30: its Top-20 and Top-30 are the same set, matched once,
    and both Ks' matched selections are written (selections.safetensors refuses tensors shared by two keys)."""
    plant(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n")
    cfg = parse_config([f"model={tmp_path / 'model'}", "metric=act_outlier", "topk=1,20,30", "seeds=0",
                        "controls=matched_k", "select.control_draws=1", "perturb=zero", "device=cpu",
                        f"data.corpus={tmp_path / 'corpus.txt'}", "data.seq_len=32", "data.eval_windows=2",
                        "data.calib_windows=2", "score.outlier_threshold=20.0", "score.cache=false",
                        "wandb.mode=disabled", "plots=none", f"out_dir={tmp_path / 'out'}",
                        f"cache_dir={tmp_path / 'cache'}"])
    result = Experiment(cfg, progress=False, sink=RunOutputs(cfg.out_dir)).run()
    mk = result.rankings[("act_outlier", 0, "global", "matched_k", 0, "zero")]
    assert mk.take(20) is not mk and keyset(mk.take(20)) == keyset(mk)
    with safe_open(str(tmp_path / "out" / "selections.safetensors"), "pt") as f:
        tag = "act_outlier.seed0.global.matched_k.draw0"
        a, b = f.get_tensor(f"{tag}.k20.flat"), f.get_tensor(f"{tag}.k30.flat")
        assert torch.equal(a, b) and 1 <= len(a) < 20 and len(f.get_tensor(f"{tag}.k1.flat")) == 1
    rk = pd.read_csv(tmp_path / "out" / "rankings.csv")
    assert set(rk.loc[rk.selection == "matched_k", "k"]) == {1, 20, 30} and rk.loc[rk.selection == "top_k", "k"].isna().all()


def test_matched_k_draws_share_their_exact_windows(monkeypatch):
    """The exact |w| windows hold every candidate in them (no draw involved): a second draw handed the first
    one's windows makes no pass over the weights, and still draws its own matches (its own pool and picks);
    a Matcher of the same (seed, draw) reuses that pool (no score involved) and draws the same."""
    import superweight.core.matching as matching
    from superweight.core.matching import Matcher, Shared

    monkeypatch.setattr(matching, "POOL", 64)
    g = torch.Generator().manual_seed(3)
    vals = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(64, 64, generator=g) for i in range(2)}
    scores = {n: v.abs() for n, v in vals.items()}
    top = rank(scores, 20, "global", "top_k")
    shared = Shared()
    first = Matcher(list(vals), lambda n: vals[n], None, 0, 0, shared)
    a = first.match(top, 20)
    second = Matcher(list(vals), lambda n: vals[n], None, 0, 1, shared)
    b = second.match(top, 20)
    alone = Matcher(list(vals), lambda n: vals[n], None, 0, 1)
    c = alone.match(top, 20)
    assert first.passes > 0 and second.passes == 0 and alone.passes > 0
    assert len(a) == len(b) == 20 and keyset(a) != keyset(b)
    assert keyset(b) == keyset(c)  # sharing changes the cost, never the draw
    again = Matcher(list(vals), lambda n: vals[n], None, 0, 1, shared)  # another metric's Matcher: same pools
    assert keyset(again.match(top, 20)) == keyset(c) and again.passes == 0
    assert again.types["mlp.down_proj"].pool is shared.pools[(0, 1, "mlp.down_proj")][0]


def test_changeable_mask_answers_like_the_full_mask():
    """core/candidates.Changeable: the full mask (None for a tensor every weight of which can change), the
    mask at positions and the count agree with `changeable` on the whole tensor, in any order of calls."""
    from superweight.core.candidates import Changeable

    g = torch.Generator().manual_seed(1)
    vals = {"a": torch.randn(30, 20, generator=g), "b": torch.randn(10, 10, generator=g) + 5}
    vals["a"][vals["a"].abs() < 0.5] = 0
    cfg = PerturbConfig()
    m = Changeable("zero", lambda n: vals[n], cfg)
    idx = torch.randperm(600, generator=g)[:50]
    full_a = changeable("zero", vals["a"], cfg).reshape(-1)
    assert torch.equal(m.at("a", idx), full_a[idx])  # before the full mask was ever built
    assert torch.equal(m("a").reshape(-1), full_a) and m.count("a") == int(full_a.sum()) < 600
    assert m("b") is None and m.count("b") == 100 and m.at("b", torch.arange(5)) is None
    assert torch.equal(m.at("a", idx), full_a[idx])  # after
    tied = rank({"a": torch.ones(30, 20)}, 5, "global", "bottom_k", mask_fn=m)
    assert tied_counts({"a": torch.ones(30, 20)}, tied, [5], m)[5] == int(full_a.sum())
    rk = rank({n: torch.zeros(v.shape) for n, v in vals.items()}, 200, "global", "random_k", mask_fn=m)
    assert all(vals[rk.names[p]].reshape(-1)[f] != 0 for p, f in zip(rk.pid.tolist(), rk.flat.tolist()))


def test_matched_k_windows_hold_fp64_weights_exactly(monkeypatch):
    """fp64 weights: the exact passes keep each candidate's |w| in fp64 as the weight holds it (a float32
    copy would move a weight across a window's edge), so every gathered |w| is the weight's own."""
    import superweight.core.matching as matching
    from superweight.core.matching import Matcher

    monkeypatch.setattr(matching, "POOL", 16)
    g = torch.Generator().manual_seed(4)
    vals = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(20, 20, generator=g, dtype=torch.float64)
            for i in range(3)}
    top = rank({n: v.abs() for n, v in vals.items()}, 30, "global", "top_k")
    m = Matcher(list(vals), lambda n: vals[n], None, 0, 0)
    r = m.match(top, 30)
    assert m.passes > 0 and len(r) == 30
    near = m.shared.gathered["mlp.down_proj"].near
    names = list(vals)
    want = [abs(float(vals[names[p]].reshape(-1)[f])) for p, f in zip(near.pid.tolist(), near.flat.tolist())]
    assert near.val.tolist() == want
    got = [abs(float(vals[r.names[p]].reshape(-1)[f])) for p, f in zip(r.pid.tolist(), r.flat.tolist())]
    assert r.stats["match_abs_w"].tolist() == got
