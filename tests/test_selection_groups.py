"""Controls that compare like with like (issue 18 items 3-5): matched_k's nearest-|w| fallback for the
largest weights, per-layer and per-row controls with Top-K's count per group, per-row groups that are output
neurons whatever the storage layout, and tie counts for a whole K grid in one pass. Each checked against an
independent computation (argmax over an axis, a sort, a brute-force count) or a property the code could
violate."""

import io
import sys

import numpy as np
import pytest
import torch

from superweight.core import matching
from superweight.core.matching import match_quality
from superweight.core.overlap import tied_counts
from superweight.core.selections import rank, rank_grid

DOWN = "model.layers.{}.mlp.down_proj.weight"


def pairs(r):
    return [(r.names[p], f) for p, f in zip(r.pid.tolist(), r.flat.tolist())]


def planted_big(seed: int = 0):
    """Two down_proj tensors of small weights (|w| <= 0.05), one free weight at 0.087, a Top-1 target at
    |w| = 2.0, and a q_proj weight at 1.9 (another module type: never a match)."""
    g = torch.Generator().manual_seed(seed)
    vals = {DOWN.format(i): 0.05 * (2 * torch.rand(64, 64, generator=g) - 1) for i in range(2)}
    vals["model.layers.0.self_attn.q_proj.weight"] = 0.05 * torch.rand(16, 16, generator=g)
    vals[DOWN.format(0)].view(-1)[10] = 2.0
    vals[DOWN.format(1)].view(-1)[77] = -0.087
    vals["model.layers.0.self_attn.q_proj.weight"].view(-1)[3] = 1.9
    scores = {n: torch.zeros_like(v) for n, v in vals.items()}
    scores[DOWN.format(0)].view(-1)[10] = 1.0
    return vals, scores


@pytest.mark.parametrize("pool", [1 << 18, 64])
def test_matched_k_takes_the_nearest_free_weight_for_the_largest(monkeypatch, pool):
    """|w| = 2.0 has no free candidate within ±100%: the match is the nearest free |w| of its module type
    (0.087), in every draw, whether the type is searched exactly or through the sample plus exact passes."""
    monkeypatch.setattr(matching, "POOL", pool)
    vals, scores = planted_big()
    top = rank(scores, 1, "global", "top_k")
    for draw in range(5):
        mk = rank(scores, 1, "global", "matched_k", seed=0, draw=draw, top=top, values=lambda n: vals[n])
        assert pairs(mk) == [(DOWN.format(1), 77)]
        q = match_quality(mk)
        assert q["match_err_max"] == pytest.approx(0.087 / 2.0 - 1) == q["match_err_median"]


def test_matched_k_rank_matches_the_tail():
    """Two targets above every free weight: the larger target takes the largest free weight, the next the
    next (rank matching); a target with free neighbours inside ±1% still draws among them."""
    vals, scores = planted_big()
    d0, d1 = vals[DOWN.format(0)].view(-1), vals[DOWN.format(1)].view(-1)
    d0[11] = 1.5
    d1[5] = 0.08
    d0[12], d1[40], d1[41] = 0.03, 0.0301, -0.02999  # a third target (0.03) with neighbours within 1%
    scores[DOWN.format(0)].view(-1)[11] = 0.9
    scores[DOWN.format(0)].view(-1)[12] = 0.8
    top = rank(scores, 3, "global", "top_k")
    got = pairs(rank(scores, 3, "global", "matched_k", seed=1, top=top, values=lambda n: vals[n]))
    assert got[:2] == [(DOWN.format(1), 77), (DOWN.format(1), 5)]
    w = abs(float(vals[got[2][0]].view(-1)[got[2][1]]))
    assert abs(w / 0.03 - 1) <= 0.01


def test_matched_k_grid_shares_its_pools_and_matches_like_one_k(monkeypatch):
    """rank_grid draws each K against that K's Top-K from one Matcher: the per-K selections have the
    sizes and the module types of their Top-K, and the exact passes over the weights do not grow with the
    number of Ks (the K_max pass serves the smaller Ks)."""
    monkeypatch.setattr(matching, "POOL", 256)
    g = torch.Generator().manual_seed(5)
    vals = {DOWN.format(i): torch.randn(64, 64, generator=g) for i in range(3)}
    scores = {n: v.abs() for n, v in vals.items()}  # Top-K = the largest |w|: their matches are in the tail
    top = rank(scores, 200, "global", "top_k")
    passes = {}
    real = matching.Matcher.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        passes[id(self)] = self

    monkeypatch.setattr(matching.Matcher, "__init__", spy)
    for ks in ([200], [1, 10, 50, 200]):
        mk = rank_grid(scores, ks, "global", "matched_k", seed=0, top=top, values=lambda n: vals[n])
        for k in ks:
            assert len(mk.take(k)) == k and not set(pairs(mk.take(k))) & set(pairs(top.take(k)))
    one, grid = [m.passes for m in passes.values()]
    assert grid <= one + 2, (one, grid)


def per_group(r, key):
    out = {}
    for (n, f) in pairs(r):
        out[key(n, f)] = out.get(key(n, f), 0) + 1
    return out


@pytest.mark.parametrize("mode", ["per_layer", "per_row"])
def test_grouped_controls_take_top_k_count_per_group(mode):
    """A sparse metric (3 informative scores in 2 tensors): every control selects, in each tensor / row,
    exactly as many weights as Top-K did there, at every K of the grid; the support is the largest group's
    informative count."""
    g = torch.Generator().manual_seed(0)
    vals = {DOWN.format(i): torch.randn(8, 16, generator=g) for i in range(3)}
    scores = {n: torch.zeros(8, 16) for n in vals}
    scores[DOWN.format(0)][2, 3] = 5.0
    scores[DOWN.format(0)][2, 9] = 4.0
    scores[DOWN.format(2)][6, 1] = 3.0
    key = (lambda n, f: n) if mode == "per_layer" else (lambda n, f: (n, f // 16))
    top = rank(scores, 4, mode, "top_k")
    assert top.support == 2  # tensor 0 and its row 2 hold two informative scores
    for control in ("random_k", "bottom_k", "matched_k"):
        r = rank_grid(scores, [1, 2, 4], mode, control, seed=0, draw=1, top=top, values=lambda n: vals[n])
        for k in (1, 2, 4):
            assert per_group(r.take(k), key) == per_group(top.take(k), key) if control != "matched_k" else \
                len(r.take(k)) == len(top.take(k)), (control, k)
    # without the Top-K ranking a control takes up to K in every group (the old behaviour)
    assert len(rank(scores, 2, mode, "random_k")) == 2 * (3 if mode == "per_layer" else 24)


def test_per_row_groups_output_neurons_of_conv1d_and_transposed_experts():
    """per_row groups the weights feeding one output neuron: a GPT-2 Conv1D weight [in, out] (input axis 0)
    and a transposed expert weight [E, in, out] (input axis 1) are grouped by column, not by stored row:
    Top-1 per row = argmax over the input axis."""
    g = torch.Generator().manual_seed(1)
    conv = torch.rand(6, 4, generator=g)  # [in=6, out=4]
    exp = torch.rand(2, 5, 3, generator=g)  # [E=2, in=5, out=3]
    lin = torch.rand(4, 6, generator=g)  # [out=4, in=6]
    scores = {"h.0.mlp.c_fc.weight": conv, "layers.0.mlp.experts.down_proj": exp, "layers.0.mlp.q.weight": lin}
    axis = {"h.0.mlp.c_fc.weight": 0, "layers.0.mlp.experts.down_proj": 1, "layers.0.mlp.q.weight": 1}
    r = rank(scores, 1, "per_row", "top_k", in_axis=axis.__getitem__)
    got = {n: sorted(f for m, f in pairs(r) if m == n) for n in scores}
    assert got["h.0.mlp.c_fc.weight"] == sorted((conv.argmax(0) * 4 + torch.arange(4)).tolist())
    e_idx = exp.argmax(1)  # [E, out]: the input index of each expert's output neuron
    assert got["layers.0.mlp.experts.down_proj"] == sorted(
        (e * 15 + int(e_idx[e, o]) * 3 + o) for e in range(2) for o in range(3))
    assert got["layers.0.mlp.q.weight"] == sorted((torch.arange(4) * 6 + lin.argmax(1)).tolist())
    # random_k in the same grouping: one per output neuron (4 + 6 + 4 groups)
    rr = rank(scores, 1, "per_row", "random_k", in_axis=axis.__getitem__)
    cols = {(n, f % 4) for n, f in pairs(rr) if n == "h.0.mlp.c_fc.weight"}
    assert len(rr) == 14 and len(cols) == 4


def test_experiment_in_axis_of_gpt2_conv1d():
    """The run's input axis of GPT-2's Conv1D weights is 0 (stored [in, out]) and 1 for a Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from superweight.core.experts import input_axis

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16))
    assert input_axis(m, "transformer.h.0.mlp.c_fc.weight") == 0
    assert input_axis(m, "transformer.h.0.attn.c_attn.weight") == 0
    lin = torch.nn.Sequential(torch.nn.Linear(3, 5))
    assert input_axis(lin, "0.weight") == 1


def test_tie_counts_for_a_k_grid_match_a_brute_force_count():
    """One pass for the whole grid equals counting, for each K, the candidates equal to the K-th score."""
    g = torch.Generator().manual_seed(4)
    scores = {f"t{i}.weight": torch.randint(0, 6, (7, 9), generator=g).float() for i in range(3)}
    mask = lambda n: (torch.arange(63) % 3 != 0).reshape(7, 9)  # noqa: E731
    ks = [1, 5, 20, 60]
    for sel in ("top_k", "bottom_k"):
        r = rank(scores, max(ks), "global", sel, seed=2, mask_fn=mask)
        allv = torch.cat([s.reshape(-1)[mask(n).reshape(-1)] for n, s in scores.items()])
        for k, n in tied_counts(scores, r, ks, mask).items():
            kth = float(r.score[min(k, len(r)) - 1])
            assert n == int((allv == kth).sum()), (sel, k)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.slow
def test_run_grouped_modes_compare_equal_numbers_of_weights(tmp_path, tok, one_thread):
    """act_outlier (a handful of informative scores) in per_layer and per_row modes on the planted tiny
    model: in every results row Top-K and each control perturb the same number of weights, and the
    support warning fires once per mode."""
    from test_controls import corpus_lines, plant

    from superweight.arguments import parse_config
    from superweight.run.experiment import Experiment

    plant(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n")
    cfg = parse_config([f"model={tmp_path / 'model'}", "metric=act_outlier", "topk=1,3", "seeds=0",
                        "select.modes=per_layer,per_row", "controls=random_k,bottom_k,matched_k",
                        "select.control_draws=1", "perturb=zero", "device=cpu", f"data.corpus={tmp_path / 'corpus.txt'}",
                        "data.seq_len=32", "data.eval_windows=2", "data.calib_windows=2",
                        "score.outlier_threshold=20.0", "score.cache=false", "wandb.mode=disabled", "plots=none",
                        f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"])
    old, err = sys.stderr, io.StringIO()
    sys.stderr = err
    try:
        df = Experiment(cfg, progress=False).run().table
    finally:
        sys.stderr = old
    assert err.getvalue().count("warning: act_outlier") == 2
    assert set(df["mode"]) == {"per_layer", "per_row"} and len(set(df["selection"])) == 4
    for key, g in df.groupby(["mode", "k", "perturbation"]):
        n = g["n_selected"].to_numpy()
        assert (n == n[0]).all() and 1 <= n[0] < 14, (key, g[["selection", "n_selected"]])


def test_gap_rows_carry_the_match_errors_of_their_control():
    """gaps.csv: a matched_k gap reports the median of its rows' median errors and the row error of largest
    magnitude (signed); a control without matches reports NaN."""
    from superweight.core.gaps import gaps

    base = dict(perturbation="zero", mode="global", metric="m", k=10)
    rows = [dict(base, selection="top_k", seed=s, draw=0, delta_nll=1.0) for s in (0, 1)]
    errs = {(0, 0): (0.01, -0.5), (0, 1): (0.03, 0.2), (1, 0): (-0.02, 0.4), (1, 1): (0.00, -0.1)}
    rows += [dict(base, selection="matched_k", seed=s, draw=d, delta_nll=0.1, match_err_median=a, match_err_max=b)
             for (s, d), (a, b) in errs.items()]
    rows += [dict(base, selection="random_k", seed=s, draw=0, delta_nll=0.0) for s in (0, 1)]
    g = gaps(rows, {}).set_index("control")
    assert g.loc["matched_k", "match_err_median"] == pytest.approx(0.005)
    assert g.loc["matched_k", "match_err_max"] == -0.5
    assert np.isnan(g.loc["random_k", "match_err_median"]) and np.isnan(g.loc["random_k", "match_err_max"])
