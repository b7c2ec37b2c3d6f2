"""Selection against naive references: one big Python sort (score, parameter order, flat index) for global,
per-tensor and per-row sorts for the other modes; heavy ties and NaN scores; the K-grid prefix property;
Random-K uniform, without replacement and seeded; K out of range; Jaccard against Python sets."""

import itertools
import math

import pytest
import torch

from superweight.config import ConfigError
from superweight.rank import jaccard, rank, sample_without_replacement


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


def sort_key(s: float, selection: str) -> float:
    """Larger is selected first; NaN ranks last (as the lowest possible key)."""
    if math.isnan(s):
        return -math.inf
    return s if selection == "top_k" else -s


def naive_global(scores, k, selection):
    entries = []
    for pid, (name, t) in enumerate(scores.items()):
        for f, s in enumerate(t.reshape(-1).tolist()):
            entries.append((name, f, s, pid))
    entries.sort(key=lambda e: (-sort_key(e[2], selection), e[3], e[1]))  # Python's sort is stable too
    return [(n, f) for n, f, _, _ in entries[:k]]


def naive_per_layer(scores, k, selection):
    out = []
    for name, t in scores.items():
        vals = t.reshape(-1).tolist()
        order = sorted(range(len(vals)), key=lambda f: (-sort_key(vals[f], selection), f))
        out.extend((name, f) for f in order[:k])
    return out


def naive_per_row(scores, k, selection):
    out = []
    for name, t in scores.items():
        m = t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)
        for r, row in enumerate(m.tolist()):
            order = sorted(range(len(row)), key=lambda c: (-sort_key(row[c], selection), c))
            out.extend((name, r * len(row) + c) for c in order[:k])
    return out


def pairs(r):
    return [(r.names[p], f) for p, f in zip(r.pid.tolist(), r.flat.tolist())]


def same_floats(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_matches_naive_sort(selection, seed):
    scores = tie_scores(seed)
    total = sum(t.numel() for t in scores.values())
    for k in (1, 7, 40, 90, total):
        r = rank(scores, k, "global", selection)
        want = naive_global(scores, k, selection)
        assert pairs(r) == want, (k, selection)
        assert r.group_rank.tolist() == list(range(k))
        # scores reported are the original values, NaN included
        flat_scores = {(n, f): s for n, t in scores.items() for f, s in enumerate(t.reshape(-1).tolist())}
        assert same_floats(r.score.tolist(), [flat_scores[p] for p in want])


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
def test_nan_scores_rank_last(selection):
    scores = {"w": torch.tensor([float("nan"), 1.0, float("nan"), 2.0, 0.5])}
    r = rank(scores, 5, "global", selection)
    order = r.flat.tolist()
    assert order[-2:] == [0, 2]
    assert order[:3] == ([3, 1, 4] if selection == "top_k" else [4, 1, 3])


def test_float64_scores_keep_precision():
    a = 1.0 + 2.0**-40  # equal to 1.0 in fp32
    scores = {"w": torch.tensor([1.0, a], dtype=torch.float64)}
    assert rank(scores, 1, "global", "top_k").flat.tolist() == [1]
    assert rank(scores, 1, "per_layer", "top_k").flat.tolist() == [1]
    assert rank(scores, 1, "global", "bottom_k").flat.tolist() == [0]


@pytest.mark.parametrize("selection", ["top_k", "bottom_k"])
def test_per_layer_and_per_row_match_naive(selection):
    scores = tie_scores(4)
    for k in (1, 3, 5):
        r = rank(scores, k, "per_layer", selection)
        assert sorted(pairs(r)) == sorted(naive_per_layer(scores, k, selection))
        # in group order: within each tensor, rank 0..k-1
        assert pairs(r) == naive_per_layer(scores, k, selection)
        rr = rank(scores, k, "per_row", selection)
        assert pairs(rr) == naive_per_row(scores, k, selection)
    assert pairs(rank(scores, 11, "per_layer", selection)) == naive_per_layer(scores, 11, selection)


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
@pytest.mark.parametrize("selection", ["top_k", "bottom_k", "random_k"])
def test_k_grid_prefix(mode, selection):
    """One ranking at the largest K serves the whole grid: take(k) equals a fresh ranking at k and
    take(small) is a subset of take(large)."""
    scores = tie_scores(7)
    kmax = {"global": 90, "per_layer": 11, "per_row": 5}[mode]
    full = rank(scores, kmax, mode, selection, seed=3)
    prev = set()
    for k in sorted({1, 2, kmax // 2, kmax}):
        sel = full.take(k)
        cur = set(pairs(sel))
        assert prev <= cur
        assert len(cur) == len(sel)
        if selection != "random_k":  # deterministic: the same as ranking directly at k
            assert pairs(sel) == pairs(rank(scores, k, mode, selection, seed=3))
        prev = cur
    if mode == "global":
        assert pairs(full.take(10)) == pairs(full)[:10]


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


@pytest.mark.parametrize("mode", ["global", "per_layer", "per_row"])
def test_random_k_seeded_without_replacement(mode):
    scores = tie_scores(0)
    k = {"global": 60, "per_layer": 11, "per_row": 4}[mode]
    a = rank(scores, k, mode, "random_k", seed=5)
    b = rank(scores, k, mode, "random_k", seed=5)
    c = rank(scores, k, mode, "random_k", seed=6)
    assert pairs(a) == pairs(b)
    assert pairs(a) != pairs(c)
    assert len(set(pairs(a))) == len(a)
    for name, f in pairs(a):
        assert 0 <= f < scores[name].numel()
    # random_k ignores the scores (same draw for other scores of the same shapes), reports the real ones
    other = {n: torch.randn(t.shape) for n, t in scores.items()}
    assert pairs(rank(other, k, mode, "random_k", seed=5)) == pairs(a)
    flat_scores = {(n, f): s for n, t in scores.items() for f, s in enumerate(t.reshape(-1).tolist())}
    assert same_floats(a.score.tolist(), [flat_scores[p] for p in pairs(a)])


def test_per_row_random_uniform_within_row():
    """A row of 4, K=1: each column is chosen with probability 1/4 (chi-square, 3 dof, 2000 seeds)."""
    scores = {"w": torch.zeros(1, 4)}
    counts = torch.zeros(4)
    for s in range(2000):
        counts[rank(scores, 1, "per_row", "random_k", seed=s).flat] += 1
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert chi2 < 3 + 5 * math.sqrt(6), chi2


def test_k_out_of_range():
    scores = tie_scores(0)
    total = sum(t.numel() for t in scores.values())
    for sel in ("top_k", "bottom_k", "random_k"):
        with pytest.raises(ConfigError, match=f"valid: 1..{total}"):
            rank(scores, total + 1, "global", sel)
        with pytest.raises(ConfigError, match="valid: 1..11"):
            rank(scores, 12, "per_layer", sel)
        with pytest.raises(ConfigError, match="row length"):
            rank(scores, 8, "per_row", sel)
        with pytest.raises(ConfigError, match=">= 1"):
            rank(scores, 0, "global", sel)
    with pytest.raises(ConfigError, match="valid choices: global, per_layer, per_row"):
        rank(scores, 1, "per_head", "top_k")
    with pytest.raises(ConfigError, match="valid choices: top_k, bottom_k, random_k"):
        rank(scores, 1, "global", "middle_k")


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
    bp = r.by_param()
    assert sum(v.numel() for v in bp.values()) == 50
    assert sorted((n, f) for n, v in bp.items() for f in v.tolist()) == sorted(pairs(r))
    for v in bp.values():
        assert torch.equal(v, torch.sort(v).values)
