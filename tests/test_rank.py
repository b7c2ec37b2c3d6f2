"""Selection against naive references (top_k ranks only informative scores, finite and
> 0, and stops at the metric's support; bottom_k ranks finite scores; NaN is never selected; ties are broken
by a seeded hash of (seed, parameter, flat index), not by index).

The references are one big Python sort for global and per-tensor / per-row sorts for the other modes; heavy
ties, NaN and infinite scores; the K-grid prefix property; seeded, uniform tie-breaks; Random-K uniform,
without replacement and seeded; candidate masks; K beyond the candidates; Jaccard against Python sets."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from superweight.config import ConfigError, RunConfig
from superweight.core.params import eligible_parameters
from superweight.core.draws import sample_without_replacement
from superweight.core.matching import match_errors, match_quality
from superweight.core.overlap import jaccard, ks_distance, tied_counts
from superweight.core.ranking import tie_hash
from superweight.core.selections import rank
from superweight.run.validation import check_capabilities


def tie_scores(seed: int = 0, nan_frac: float = 0.05) -> dict[str, torch.Tensor]:
    """Integer-valued scores 0..4 (heavy ties) with some NaN, -inf and +inf, over tensors of mixed shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in [("b.weight", (6, 5)), ("a.weight", (4, 7)), ("c.weight", (3, 9)), ("d.bias", (11,))]:
        x = torch.randint(0, 5, shape, generator=g).float()
        u = torch.rand(shape, generator=g)
        x[u < nan_frac] = float("nan")
        x[(u >= nan_frac) & (u < nan_frac + 0.02)] = float("-inf")
        x[(u >= nan_frac + 0.02) & (u < nan_frac + 0.03)] = float("inf")
        out[name] = x
    return out  # dict order (b, a, c, d) is the parameter order, deliberately not alphabetical


def informative(s: float, selection: str) -> bool:
    """top_k: finite and > 0; bottom_k: finite. NaN and +-inf never."""
    if not math.isfinite(s):
        return False
    return s > 0 if selection == "top_k" else True


def sort_key(s: float, selection: str) -> float:
    """Larger is selected first."""
    return s if selection == "top_k" else -s


def entries(scores, selection, seed, mask=None):
    """Every candidate as (name, flat, score, u) with u the documented seeded tie-break key."""
    out = []
    for name, t in scores.items():
        u = tie_hash(seed, name, torch.arange(t.numel())).tolist()
        m = mask[name].reshape(-1).tolist() if mask is not None else [True] * t.numel()
        for f, s in enumerate(t.reshape(-1).tolist()):
            if informative(s, selection) and m[f]:
                out.append((name, f, s, u[f]))
    return out


def naive_sorted(cands, selection):
    """By (key desc, u asc): Python's sort of the documented order."""
    return sorted(cands, key=lambda e: (-sort_key(e[2], selection), e[3]))


def naive_global(scores, k, selection, seed=0, mask=None):
    return [(n, f) for n, f, _, _ in naive_sorted(entries(scores, selection, seed, mask), selection)[:k]]


def naive_per_layer(scores, k, selection, seed=0):
    out = []
    for name in scores:
        sub = [e for e in entries(scores, selection, seed) if e[0] == name]
        out.extend((n, f) for n, f, _, _ in naive_sorted(sub, selection)[:k])
    return out


def naive_per_row(scores, k, selection, seed=0):
    out = []
    for name, t in scores.items():
        cols = t.numel() // (t.shape[0] if t.ndim >= 2 else 1)
        sub = [e for e in entries(scores, selection, seed) if e[0] == name]
        for r in range(t.numel() // cols):
            row = [e for e in sub if e[1] // cols == r]
            out.extend((n, f) for n, f, _, _ in naive_sorted(row, selection)[:k])
    return out


def pairs(r):
    return [(r.names[p], f) for p, f in zip(r.pid.tolist(), r.flat.tolist())]


def flat_scores(scores):
    return {(n, f): s for n, t in scores.items() for f, s in enumerate(t.reshape(-1).tolist())}


def same_floats(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_matches_naive_sort(selection, seed):
    scores = tie_scores(seed)
    fs = flat_scores(scores)
    total = sum(t.numel() for t in scores.values())
    cands = entries(scores, selection, seed)
    support = len(cands)
    assert 0 < support < total  # the fixture has zeros, NaN and infinities outside the candidates
    by_key = sorted((sort_key(s, selection) for _, _, s, _ in cands), reverse=True)
    for k in (1, 7, 40, 90, total):
        r = rank(scores, k, "global", selection, seed=seed)
        n = min(k, support)
        assert len(r) == n  # stops at the support: never padded with zeros, NaN or infinities
        assert r.group_rank.tolist() == list(range(n))
        got = pairs(r)
        assert len(set(got)) == n
        keys = [sort_key(fs[p], selection) for p in got]
        # the selected multiset of scores is the naive sort's top-K multiset
        assert sorted(keys, reverse=True) == by_key[:n]
        # in ranking order (non-increasing key)
        assert keys == sorted(keys, reverse=True)
        # every candidate strictly above the K-th score is selected; the tied boundary is filled from the tied class
        kth = by_key[n - 1]
        above = {(nm, f) for nm, f, s, _ in cands if sort_key(s, selection) > kth}
        tied = {(nm, f) for nm, f, s, _ in cands if sort_key(s, selection) == kth}
        assert above <= set(got)
        assert set(got) - above <= tied
        assert len(set(got) - above) == n - len(above)
        # the exact order is (key desc, seeded hash asc)
        assert got == naive_global(scores, k, selection, seed)
        # scores reported are the original values; never NaN or infinite
        assert same_floats(r.score.tolist(), [fs[p] for p in got])
        assert all(math.isfinite(fs[p]) for p in got)
        if selection == "top_k":
            assert r.support == support and all(fs[p] > 0 for p in got)


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
@pytest.mark.parametrize("chunk", [8, 64])
def test_global_streaming_floor_matches_naive_sort_under_mass_ties(monkeypatch, selection, chunk):
    """The streaming global ranking in chunks smaller than the tensors: once K entries are held, a chunk's
    entries enter only above the K-th held key, or at it with a smaller tie-break. Scores mostly 0 (a metric
    like act_outlier: 0 for every weight but a few) and a candidate mask: the order is exactly the naive sort's,
    and the tie counts (mass-tie path: most of a chunk at the boundary) are exact counts."""
    import superweight.core.modes as modes
    import superweight.core.overlap as overlap

    monkeypatch.setattr(modes, "CHUNK", chunk)
    monkeypatch.setattr(overlap, "CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    scores = {f"l{i}.weight": torch.where(torch.rand(12, 10, generator=g) < 0.03, torch.rand(12, 10, generator=g),
                                          torch.zeros(12, 10)) for i in range(4)}
    mask = {n: torch.rand(12, 10, generator=g) > 0.1 for n in scores}
    for k in (1, 5, 30, 200):
        r = rank(scores, k, "global", selection, seed=3, mask_fn=lambda n: mask[n])
        assert pairs(r) == naive_global(scores, k, selection, 3, mask), k
        got = tied_counts(scores, r, [k], lambda n: mask[n])[k]
        if len(r):
            last = scores[r.names[int(r.pid[-1])]].reshape(-1)[int(r.flat[-1])]
            assert got == sum(int(((s == last) & mask[n]).sum()) for n, s in scores.items())


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
def test_nan_and_infinite_scores_never_selected(selection):
    scores = {"w": torch.tensor([float("nan"), 1.0, float("nan"), 2.0, 0.5, float("inf"), float("-inf"), 0.0])}
    r = rank(scores, 8, "global", selection)
    order = r.flat.tolist()
    if selection == "top_k":  # 0 carries no information either
        assert order == [3, 1, 4] and r.support == 3
    else:
        assert order == [7, 4, 1, 3]
    for mode in ("per_layer", "per_row"):
        assert rank(scores, 8, mode, selection).flat.tolist() == order


def test_float64_scores_keep_precision():
    a = 1.0 + 2.0**-40  # equal to 1.0 in fp32
    scores = {"w": torch.tensor([1.0, a], dtype=torch.float64)}
    assert rank(scores, 1, "global", "top_k").flat.tolist() == [1]
    assert rank(scores, 1, "per_layer", "top_k").flat.tolist() == [1]
    assert rank(scores, 1, "global", "bottom_k").flat.tolist() == [0]


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
def test_per_layer_and_per_row_match_naive(selection):
    scores = tie_scores(4)
    fs = flat_scores(scores)
    for seed in (0, 5):
        for k in (1, 3, 5):
            r = rank(scores, k, "per_layer", selection, seed=seed)
            want = naive_per_layer(scores, k, selection, seed)
            # in group order: within each tensor, rank 0..k-1
            assert pairs(r) == want
            for name in scores:  # per tensor: the multiset of the naive top-k
                got = sorted(sort_key(fs[p], selection) for p in pairs(r) if p[0] == name)
                ref = sorted(sort_key(s, selection) for n, _, s, _ in entries(scores, selection, seed) if n == name)
                assert got == sorted(ref, reverse=True)[:k][::-1]
            rr = rank(scores, k, "per_row", selection, seed=seed)
            assert pairs(rr) == naive_per_row(scores, k, selection, seed)
        assert pairs(rank(scores, 11, "per_layer", selection, seed=seed)) == naive_per_layer(scores, 11, selection, seed)


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
@pytest.mark.parametrize("selection", ["top_k", "bottom_k", "random_k"])
def test_k_grid_prefix(mode, selection):
    """One ranking at the largest K serves the whole grid: take(k) equals a fresh ranking at k and
    take(small) is a subset of take(large)."""
    scores = tie_scores(7)
    kmax = {"global": 90, "per_layer": 11, "per_row": 5}[mode]
    full = rank(scores, kmax, mode, selection, seed=3)
    prev = set()
    sizes = []
    for k in sorted({1, 2, kmax // 2, kmax}):
        sel = full.take(k)
        cur = set(pairs(sel))
        assert prev <= cur
        assert len(cur) == len(sel)
        sizes.append(len(sel))
        if selection != "random_k":  # deterministic: the same as ranking directly at k
            assert pairs(sel) == pairs(rank(scores, k, mode, selection, seed=3))
        prev = cur
    assert sizes[0] >= 1 and sizes == sorted(sizes)
    if mode == "global":
        assert pairs(full.take(10)) == pairs(full)[:10]


def _count_uniform(counts: dict, n_cells: int, n: int) -> float:
    exp = n / n_cells
    return sum((c - exp) ** 2 / exp for c in counts.values()) + exp * (n_cells - len(counts))


def test_tie_break_depends_on_seed_and_is_uniform():
    """All 5 scores tied, K=2: the ordered pair taken is uniform over the 20 ordered pairs across seeds
    (chi-square over 2000 seeds, 19 dof, bound mean + 5 sd), deterministic for one seed."""
    scores = {"x": torch.full((2,), 2.0), "y": torch.full((3, 1), 2.0)}
    for selection in ("top_k", "bottom_k"):
        counts: dict = {}
        n = 2000
        for seed in range(n):
            key = tuple(pairs(rank(scores, 2, "global", selection, seed=seed)))
            assert len(set(key)) == 2
            counts[key] = counts.get(key, 0) + 1
        assert len(counts) == 20
        chi2 = _count_uniform(counts, 20, n)
        assert chi2 < 19 + 5 * math.sqrt(38), (selection, chi2)
        assert pairs(rank(scores, 2, "global", selection, seed=11)) == pairs(rank(scores, 2, "global", selection, seed=11))


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
def test_boundary_ties_uniform_over_the_tied_class(mode):
    """Scores [9, 3, 3, 3, 3, 1] and K=3: 9 always, then 2 of the 4 tied 3s; the 6 subsets are equally
    likely across seeds (chi-square, 5 dof, 3000 seeds, bound mean + 5 sd); the 1 is never taken."""
    scores = {"w": torch.tensor([[9.0, 3.0, 3.0, 3.0, 3.0, 1.0]])}
    counts: dict = {}
    n = 3000
    for seed in range(n):
        r = rank(scores, 3, mode, "top_k", seed=seed)
        got = r.flat.tolist()
        assert got[0] == 0 and len(got) == 3
        assert set(got[1:]) <= {1, 2, 3, 4}
        assert tied_counts(scores, r, [3])[3] == 4
        key = frozenset(got[1:])
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    chi2 = _count_uniform(counts, 6, n)
    assert chi2 < 5 + 5 * math.sqrt(10), chi2


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
def test_tie_breaks_do_not_depend_on_the_parameter_order(mode, selection):
    """The tie hash is keyed by the parameter's name: reordering the score dict, or scoring fewer tensors,
    selects the same weights of each tensor."""
    scores = tie_scores(3)
    rev = dict(reversed(list(scores.items())))
    k = {"global": 40, "per_layer": 6, "per_row": 3}[mode]
    a, b = rank(scores, k, mode, selection, seed=2), rank(rev, k, mode, selection, seed=2)
    assert sorted(pairs(a)) == sorted(pairs(b))
    if mode != "global":
        one = {"a.weight": scores["a.weight"]}
        assert pairs(rank(one, k, mode, selection, seed=2)) == [p for p in pairs(a) if p[0] == "a.weight"]


def test_tie_break_is_not_by_index():
    """With index tie-breaks, the first tied entries would always win; seeded hashes pick others too."""
    scores = {"w": torch.ones(100)}
    firsts = [tuple(rank(scores, 5, "global", "top_k", seed=s).flat.tolist()) for s in range(20)]
    assert len(set(firsts)) == 20
    assert sum(set(f) == {0, 1, 2, 3, 4} for f in firsts) <= 1
    assert max(max(f) for f in firsts) > 50


def test_random_k_global_ordered_pairs_uniform():
    """K=2 draws over 7 weights in 2 tensors (sizes 3 and 4; the randperm path): all 42 ordered pairs
    (draw order) are equally likely. Chi-square over 4200 seeds, 41 dof: bound mean + 5 sd = 41 + 5 sqrt(82)."""
    scores = {"x": torch.zeros(3), "y": torch.zeros(2, 2)}
    counts = {}
    n_draws = 4200
    for seed in range(n_draws):
        r = rank(scores, 2, "global", "random_k", seed=seed)
        key = tuple(pairs(r))
        assert len(set(key)) == 2
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 42
    exp = n_draws / 42
    chi2 = sum((c - exp) ** 2 / exp for c in counts.values())
    assert chi2 < 41 + 5 * math.sqrt(82), chi2


def test_sample_without_replacement_rejection_path_uniform():
    """k * 4 < n uses repeated draws with duplicates dropped. Ordered pairs of 12 (132 cells, 6600 draws,
    131 dof) and the inclusion counts of 40 with k=3 (2000 draws) must both be uniform (5-sigma bounds)."""
    counts = torch.zeros(12, 12)
    for s in range(6600):
        d = sample_without_replacement(12, 2, torch.Generator().manual_seed(s))
        assert d[0] != d[1]
        counts[d[0], d[1]] += 1
    cells = counts[~torch.eye(12, dtype=torch.bool)]
    chi2 = float(((cells - 50) ** 2 / 50).sum())
    assert chi2 < 131 + 5 * math.sqrt(262), chi2
    inc = torch.zeros(40)
    for s in range(2000):
        d = sample_without_replacement(40, 3, torch.Generator().manual_seed(s))
        assert torch.unique(d).numel() == 3 and int(d.min()) >= 0 and int(d.max()) < 40
        inc[d] += 1
    exp = 2000 * 3 / 40
    chi2 = float(((inc - exp) ** 2 / exp).sum())
    assert chi2 < 39 + 5 * math.sqrt(78), chi2
    with pytest.raises(ConfigError):
        sample_without_replacement(3, 4, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
def test_random_k_seeded_without_replacement(mode):
    scores = tie_scores(0)
    k = {"global": 60, "per_layer": 11, "per_row": 4}[mode]
    a = rank(scores, k, mode, "random_k", seed=5)
    b = rank(scores, k, mode, "random_k", seed=5)
    c = rank(scores, k, mode, "random_k", seed=6)
    d = rank(scores, k, mode, "random_k", seed=5, draw=1)
    assert pairs(a) == pairs(b)
    assert pairs(a) != pairs(c)
    assert pairs(a) != pairs(d)  # another control draw of the same seed
    assert len(set(pairs(a))) == len(a)
    for name, f in pairs(a):
        assert 0 <= f < scores[name].numel()
    # random_k ignores the scores (same draw for other scores of the same shapes), reports the real ones
    other = {n: torch.randn(t.shape) for n, t in scores.items()}
    assert pairs(rank(other, k, mode, "random_k", seed=5)) == pairs(a)
    assert same_floats(a.score.tolist(), [flat_scores(scores)[p] for p in pairs(a)])


def test_per_row_random_uniform_within_row():
    """A row of 4, K=1: each column is chosen with probability 1/4 (chi-square, 3 dof, 2000 seeds)."""
    scores = {"w": torch.zeros(1, 4)}
    counts = torch.zeros(4)
    for s in range(2000):
        counts[rank(scores, 1, "per_row", "random_k", seed=s).flat] += 1
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert chi2 < 3 + 5 * math.sqrt(6), chi2


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
@pytest.mark.parametrize("selection", ["top_k", "bottom_k", "random_k"])
def test_selections_drawn_only_from_the_mask(mode, selection):
    """mask_fn (the weights a perturbation can change) bounds every selection; the masked-out weights hold
    the highest (top_k) and lowest (bottom_k) scores, so a selection ignoring the mask would take them."""
    g = torch.Generator().manual_seed(0)
    scores = {"p.weight": torch.rand(4, 6, generator=g) + 0.1, "q.weight": torch.rand(3, 6, generator=g) + 0.1}
    mask = {n: torch.rand(t.shape, generator=g) < 0.6 for n, t in scores.items()}
    for n in scores:
        scores[n][~mask[n]] = torch.where(torch.rand(int((~mask[n]).sum()), generator=g) < 0.5, 100.0, 1e-6)
    k = {"global": 30, "per_layer": 12, "per_row": 4}[mode]
    for seed in range(3):
        r = rank(scores, k, mode, selection, seed=seed, mask_fn=lambda n: mask[n])
        assert len(r) > 0
        for n, f in pairs(r):
            assert bool(mask[n].reshape(-1)[f]), (n, f)
        assert r.n_candidates == sum(int(m.sum()) for m in mask.values())
        if mode == "global":
            assert len(r) == min(k, r.n_candidates)
            if selection != "random_k":
                assert pairs(r) == naive_global(scores, k, selection, seed, mask)


def test_k_beyond_the_candidates_stops_at_the_support():
    """rank() never pads: K above the candidates returns the candidates (top_k: the support). The K range
    of a run is checked once, up front, against the eligible weights (validation.check_capabilities)."""
    scores = tie_scores(0)
    total = sum(t.numel() for t in scores.values())
    for sel in ("top_k", "bottom_k", "random_k"):
        r = rank(scores, total + 1, "global", sel)
        n_cand = len(entries(scores, sel, 0)) if sel != "random_k" else total
        assert len(r) == n_cand and len(set(pairs(r))) == n_cand
        pl = rank(scores, 12, "per_layer", sel)
        for n, t in scores.items():
            cand = sum(1 for e in entries(scores, sel, 0) if e[0] == n) if sel != "random_k" else t.numel()
            assert sum(1 for p in pairs(pl) if p[0] == n) == min(12, cand)
        pr = rank(scores, 12, "per_row", sel)  # longer than every row
        assert len(pr) == (len(entries(scores, sel, 0)) if sel != "random_k" else total)
        with pytest.raises(ConfigError, match=">= 1"):
            rank(scores, 0, "global", sel)
    with pytest.raises(ConfigError, match="valid choices: global, per_layer, per_row"):
        rank(scores, 1, "per_head", "top_k")
    with pytest.raises(ConfigError, match="valid choices: top_k, bottom_k, random_k"):
        rank(scores, 1, "global", "middle_k")


def test_k_out_of_range_is_a_config_error_up_front():
    model = make_tiny_llama()  # hidden 16, intermediate 32, 2 layers, 2 heads, 1 KV head
    params = eligible_parameters(model)
    total = sum(p.numel() for p in params.values())
    smallest = min(p.numel() for p in params.values())
    row = min(p.shape[1] for p in params.values())
    cfg = RunConfig()
    cfg.score.metrics, cfg.perturb.names = ["magnitude"], ["zero"]
    for modes, k, needle in ((["global"], total + 1, f"valid: 1..{total}"),
                             (["per_layer"], smallest + 1, f"valid: 1..{smallest}"),
                             (["per_row"], row + 1, "row length")):
        cfg.select.modes, cfg.select.topk = modes, [1, k]
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            check_capabilities(cfg, model, params)
        cfg.select.topk = [1, k - 1]
        check_capabilities(cfg, model, params)


def test_matched_k_same_module_type_similar_magnitude_disjoint_from_top():
    g = torch.Generator().manual_seed(0)
    values = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(8, 16, generator=g) for i in range(2)}
    values["model.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
    scores = {n: v.abs() * torch.rand(v.shape, generator=g) for n, v in values.items()}
    top = rank(scores, 20, "global", "top_k", seed=0)
    m = rank(scores, 20, "global", "matched_k", seed=0, draw=0, top=top, values=lambda n: values[n])
    m2 = rank(scores, 20, "global", "matched_k", seed=0, draw=1, top=top, values=lambda n: values[n])
    assert len(m) == 20 and pairs(m) != pairs(m2)
    assert not set(pairs(m)) & set(pairs(top))
    assert len(set(pairs(m))) == len(m)
    errs = match_errors(m)
    for (tn, tf), (mn, mf), e in zip(pairs(top), pairs(m), errs):
        assert tn.split(".")[-2] == mn.split(".")[-2]  # same module type
        a, b = float(values[tn].reshape(-1)[tf].abs()), float(values[mn].reshape(-1)[mf].abs())
        assert e == pytest.approx(b / a - 1)
    assert sum(abs(e) <= 0.05 for e in errs) >= 10  # most matches within ±5%
    assert m.group_rank.tolist() == top.group_rank.tolist()  # the K grid nests
    q = match_quality(m.take(10))
    assert 0 <= q["match_ks"] <= 1 and q["match_err_max"] == max(errs[:10].tolist(), key=abs)
    assert q["match_err_median"] == pytest.approx(float(np.median(errs[:10])))
    with pytest.raises(ValueError):
        rank(scores, 5, "global", "matched_k")


def test_ks_distance():
    assert ks_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_distance([1, 2], [3, 4]) == 1.0
    assert ks_distance([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert math.isnan(ks_distance([], [1]))


def test_jaccard_against_sets():
    scores = tie_scores(1)
    rankings = [rank(scores, 30, "global", "random_k", seed=s) for s in range(4)]
    rankings += [rank(scores, 30, "global", "top_k"), rank(scores, 30, "global", "bottom_k")]
    for a, b in itertools.product(rankings, repeat=2):
        for k in (1, 10, 30):
            A, B = set(pairs(a.take(k))), set(pairs(b.take(k)))
            assert jaccard(a.take(k), b.take(k)) == pytest.approx(len(A & B) / len(A | B), abs=0)
    # identical -> 1, disjoint -> 0
    assert jaccard(rankings[0], rankings[0]) == 1.0
    t = rank({"w": torch.arange(10.0)}, 3, "global", "top_k")
    b = rank({"w": torch.arange(10.0)}, 3, "global", "bottom_k")
    assert jaccard(t, b) == 0.0
    # different parameter lists: matched by name, not by position
    x = rank({"p": torch.tensor([3.0, 2, 1]), "q": torch.tensor([9.0, 0, 0])}, 2, "global", "top_k")
    y = rank({"q": torch.tensor([9.0, 0, 0]), "r": torch.tensor([5.0, 0, 0])}, 2, "global", "top_k")
    assert set(pairs(x)) == {("q", 0), ("p", 0)} and set(pairs(y)) == {("q", 0), ("r", 0)}
    assert jaccard(x, y) == pytest.approx(1 / 3)


def test_by_param_groups_sorted_indices():
    scores = tie_scores(2)
    r = rank(scores, 50, "global", "top_k")
    assert r.support >= 50
    bp = r.by_param()
    assert sum(v.numel() for v in bp.values()) == 50
    assert sorted((n, f) for n, v in bp.items() for f in v.tolist()) == sorted(pairs(r))
    for v in bp.values():
        assert torch.equal(v, torch.sort(v).values)


@pytest.mark.parametrize("chunk", [1, 1 << 20])
def test_scores_of_mixed_and_integer_dtypes_rank_and_tie_exactly(monkeypatch, chunk):
    """A comparison of a tensor with a Python float is made in the tensor's dtype: 0.1 of an fp64 score is
    not 0.1 of an fp32 one, and int64 scores above 2^24 are not float32 numbers. The streaming floor and the
    tie counts compare exactly (fp64) whatever the dtypes of the score dict."""
    import superweight.core.modes as modes
    import superweight.core.overlap as overlap

    monkeypatch.setattr(modes, "CHUNK", chunk)
    monkeypatch.setattr(overlap, "CHUNK", chunk)
    for seed in range(12):
        mixed = {"a.w": torch.tensor([0.1], dtype=torch.float64), "b.w": torch.tensor([0.1], dtype=torch.float32)}
        r = rank(mixed, 1, "global", "top_k", seed=seed)
        assert r.names[int(r.pid[0])] == "b.w"  # float32 0.1 = 0.100000001490116...: the larger score
        assert tied_counts(mixed, r, [1])[1] == 1
    bottom = {"a.w": torch.tensor([0.1], dtype=torch.float64), "b.w": torch.tensor([0.1, 0.1, 0.5], dtype=torch.float32)}
    r = rank(bottom, 1, "global", "bottom_k")
    assert r.names[int(r.pid[0])] == "a.w" and tied_counts(bottom, r, [1])[1] == 1
    big = {"i.w": torch.tensor([16777217, 16777216, 16777216, 16777216], dtype=torch.int64)}
    r = rank(big, 2, "global", "top_k")
    assert r.flat.tolist()[0] == 0 and tied_counts(big, r, [1, 2]) == {1: 1, 2: 3}


def test_tie_hash_is_splitmix64_of_index_name_and_seed_across_blocks(monkeypatch):
    """u = splitmix64(flat ^ (name_key ^ (seed * golden + salt * c))) & (2^63 - 1), against a pure-Python
    splitmix64, for indices inside and across the hash's blocks (a small block forces many)."""
    import superweight.core.ranking as ranking
    from superweight.core.ranking import name_key

    M = (1 << 64) - 1

    def ref(seed, name, f, salt=0):
        z = (f ^ (name_key(name) ^ ((seed * 0x9E3779B97F4A7C15) + salt * 0xD1B54A32D192ED03))) & M
        z = (z + 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return (z ^ (z >> 31)) & ((1 << 63) - 1)

    flat = torch.tensor([0, 1, 2, 7, 2**20 + 3, 2**39 + 5, 17, 4, 99, 1000], dtype=torch.int64)
    for block in (ranking.HASH_BLOCK, 3, 1):
        monkeypatch.setattr(ranking, "HASH_BLOCK", block)
        for seed, name, salt in ((0, "model.layers.0.mlp.down_proj.weight", 0), (7, "w", 3), (2**40, "x", 1)):
            got = tie_hash(seed, name, flat, salt).tolist()
            assert got == [ref(seed, name, f, salt) for f in flat.tolist()], block
            # per-row modes hash 2-D index tensors, transposed views too: element for element the same
            grid = flat.view(2, 5).t()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no deprecated out= resize (it sliced 2-D indices by rows)
                got2 = tie_hash(seed, name, grid, salt)
            assert got2.tolist() == [[ref(seed, name, f, salt) for f in row]
                                                                 for row in grid.tolist()], block
    assert tie_hash(0, "w", torch.empty(0, dtype=torch.int64)).numel() == 0


def test_matching_sort_by_value_then_key_is_lexsorts_order():
    """matched_k's candidate order (|w| ascending, then key): the one-integer-sort path (increasing keys, |w|
    from fp32/bf16 weights, zeros, inf and many ties) and the lexsort path (keys in any order, float64 |w|
    with low bits set) both give np.lexsort's order."""
    from superweight.core.matching import _by_value_then_key

    rng = np.random.default_rng(1)
    for trial in range(120):
        n = int(rng.integers(0, 2000))
        v = np.abs(rng.standard_normal(n))
        if trial % 4 == 0:
            v = v.astype(np.float32).astype(np.float64)
        elif trial % 4 == 1:
            v = torch.from_numpy(v).to(torch.bfloat16).double().numpy()
        elif trial % 4 == 2:  # a few distinct values: ties everywhere
            v = np.round(v, 1).astype(np.float32).astype(np.float64)
            v[rng.random(n) < 0.1] = 0.0
            v[rng.random(n) < 0.02] = np.inf
        key = np.sort(rng.choice(1 << 45, n, replace=False)) if trial % 5 else rng.integers(0, 1 << 45, n)
        assert np.array_equal(_by_value_then_key(v, key), np.lexsort((key, v))), trial
