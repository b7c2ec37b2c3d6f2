"""core/scan.py: the one pass over a score set. Its classes against numpy's frexp, its histogram against a
direct count, and every ranking, tie count and summary that reads it against the same computation on the
plain scores (which keys every score): equal rankings, supports and tie counts, in every edge case the
counts must get right (ties, a mass of zeros, NaN, ±inf, subnormals, -0, K past the support, excluded
weights, bfloat16/float16, tensors of many chunks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import superweight.core.modes as modes
import superweight.core.overlap as overlap
import superweight.core.scan as scan_mod
from superweight.config import PerturbConfig
from superweight.core.candidates import Changeable
from superweight.core.overlap import tied_counts
from superweight.core.scan import Scan, ScoreSet, code_of, codes
from superweight.core.score_summary import score_summary
from superweight.core.selections import rank, rule


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 scores, so small tensors span many chunks (and a ranking step several scan chunks)."""
    for mod in (scan_mod, modes, overlap):
        monkeypatch.setattr(mod, "CHUNK", 64)
    modes.PLAN_SHORT.clear()
    yield
    assert modes.PLAN_SHORT == []  # the scan's counts never promised more than a ranking found


def _special(rng, n):
    """Scores with every class the scan distinguishes."""
    s = rng.lognormal(-3, 3, n)
    s[rng.random(n) < 0.2] = 0.0
    s[rng.random(n) < 0.05] = 1.5  # a repeated value
    return s


def test_codes_and_histogram_match_frexp():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.lognormal(0, 30, 5000), [0.0, -0.0, 1e-40, 3e-45, 2.0**-126, 2.0**-127, 1.0, 2.0,
                                                      np.inf, -np.inf, np.nan, -3.0, -1e-42, 3.4e38]])
    x = torch.tensor(v, dtype=torch.float32)
    f = x.double().numpy()
    got = codes(x).numpy().astype(np.int64)
    finite = np.isfinite(f)
    m, e = np.frexp(np.abs(f[finite]))
    e = np.where(np.abs(f[finite]) < 2.0**-126, 0, e + 126)
    assert np.array_equal(got[finite] & 255, e)
    assert np.array_equal(got[finite] >> 8, np.signbit(f[finite]).astype(np.int64))
    assert all(code_of(float(a)) == int(c) for a, c in zip(f[finite], got[finite]))
    h = Scan({"a": x[:3000], "b": x[3000:]}).histogram()
    pos = f[finite & (f > 0)]
    edges = h["hist_log10_edges"].numpy()
    assert int(h["n_zero"]) == int((f == 0).sum()) >= 2
    assert int(h["hist_count"].sum()) == pos.size
    # bin 0 of the grid: subnormals [2^-149, 2^-126); then octaves [2^j, 2^(j+1)): count each directly
    bounds = 2.0 ** np.round(edges / np.log10(2.0))
    want = [((pos >= lo) & (pos < hi)).sum() for lo, hi in zip(bounds[:-1], bounds[1:])]
    assert np.array_equal(h["hist_count"].numpy(), want)
    assert edges[0] == pytest.approx(-149 * np.log10(2.0))  # subnormals present: the grid starts at 2^-149


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scan_counts_sums_and_maxima(dtype):
    rng = np.random.default_rng(1)
    s = {f"t{i}": torch.tensor(_special(rng, 777), dtype=dtype) for i in range(3)}
    s["t1"][:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-41 if dtype == torch.float32 else 1e-7])
    sc = Scan(s)
    for i, t in enumerate(s.values()):
        d = t.double()
        assert int(sc.positive()[i]) == int((torch.isfinite(d) & (d > 0)).sum())
        assert int(sc.finite()[i]) == int(torch.isfinite(d).sum())
        np.testing.assert_allclose(sc.sums[i], float(d.sum()), rtol=1e-5)
        assert np.isnan(sc.maxima[i]) if torch.isnan(d).any() else sc.maxima[i] == float(d.max())
    assert sc.negative_finite() == 0
    s["t0"][0] = -2.0
    assert Scan(s).negative_finite() == 1


def _weights(rng, scores, zero_share):
    return {n: torch.where(torch.tensor(rng.random(t.shape) < zero_share), 0.0, 1.0 + torch.rand(t.shape))
            for n, t in scores.items()}


CASES = ["plain", "ties", "zeros", "tiny_support", "nonfinite", "subnormal"]


def _scores(case, rng, dtype):
    shapes = [(37, 29), (300,), (5, 7, 11), (1,), (64 * 5,)]
    out = {}
    for i, sh in enumerate(shapes):
        n = int(np.prod(sh))
        if case == "plain":
            v = rng.lognormal(0, 2, n)
        elif case == "ties":
            v = rng.integers(0, 6, n).astype(float)  # few values: ties at every boundary, zeros among them
        elif case == "zeros":
            v = np.where(rng.random(n) < 0.97, 0.0, rng.lognormal(0, 1, n))  # a mass of zeros (act_outlier)
        elif case == "tiny_support":
            v = np.zeros(n)
            v[rng.integers(0, n, 2)] = rng.lognormal(0, 1, 2)  # support far below K
        elif case == "nonfinite":
            v = rng.lognormal(0, 1, n)
            v[rng.random(n) < 0.1] = np.nan
            v[rng.random(n) < 0.05] = np.inf
            v[rng.random(n) < 0.05] = -np.inf
        else:  # subnormal
            v = np.where(rng.random(n) < 0.5, rng.uniform(1e-45, 1e-39, n), rng.lognormal(-80, 2, n))
        out[f"layers.{i}.w"] = torch.tensor(v, dtype=dtype).reshape(sh)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_scan_rankings_equal_the_plain_ones(small_chunks, case, dtype, masked):
    """Top-K and Bottom-K, their supports and their tie counts, equal with and without the scan."""
    if case == "subnormal" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 flushes these to zero or its own subnormals: covered by float32")
    rng = np.random.default_rng(abs(hash((case, str(dtype), masked))) % 2**32)
    scores = _scores(case, rng, dtype)
    weights = _weights(rng, scores, 0.01 if masked else 0.0)

    def mask():
        return Changeable("zero", lambda n: weights[n], PerturbConfig()) if masked else None

    for selection in ("top_k", "bottom_k"):
        for k in (1, 3, 50, 400, 5000):
            for seed in (0, 7):
                fast = rank(ScoreSet(scores), k, "global", selection, seed, mask_fn=mask())
                plain = rank(dict(scores), k, "global", selection, seed, mask_fn=mask())
                assert modes._scan_plan(ScoreSet(scores), k, rule(selection), mask()) is not None
                assert torch.equal(fast.pid, plain.pid) and torch.equal(fast.flat, plain.flat), (selection, k, seed)
                assert torch.equal(fast.score.isnan(), plain.score.isnan())
                assert (fast.support, fast.n_candidates) == (plain.support, plain.n_candidates)
                ks = [1, 2, 10, k]
                got = tied_counts(ScoreSet(scores), fast, ks, mask())
                assert got == tied_counts(dict(scores), plain, ks, mask())
                for kk in ks:  # by brute force: candidates whose score equals the K-th selected one's
                    n = min(kk, len(fast))
                    if n:
                        v = float(scores[fast.names[int(fast.pid[n - 1])]].reshape(-1)[int(fast.flat[n - 1])])
                        want = sum(int((((t.double() == v) if not np.isnan(v) else t.isnan())
                                        & (weights[nm] != 0)).sum()) for nm, t in scores.items())
                        assert got[kk] == want, (kk, v)


def test_negative_scores_rank_bottom_k_without_the_scan(small_chunks):
    """A signed score set: Bottom-K's first floor cannot come from the octave counts; the ranking reads
    the scores (no plan) and still equals the plain one; Top-K keeps its plan."""
    rng = np.random.default_rng(5)
    s = {"a": torch.tensor(rng.normal(0, 1, 500), dtype=torch.float32)}
    bottom = modes.Rule("bottom_k", lambda x: -x, torch.isfinite, False, "asc")
    assert modes._scan_plan(ScoreSet(s), 10, bottom, None) is None
    top = modes.Rule("top_k", lambda x: x, lambda x: torch.isfinite(x) & (x > 0), True, "desc")
    assert modes._scan_plan(ScoreSet(s), 10, top, None) is not None
    for sel in ("top_k", "bottom_k"):
        a, b = rank(ScoreSet(s), 20, "global", sel, 3), rank(s, 20, "global", sel, 3)
        assert torch.equal(a.flat, b.flat)


def test_a_dense_mask_reads_every_score(small_chunks):
    """More than 1/64 of a tensor unchangeable: no sparse list (LookupError), no plan, the same ranking."""
    rng = np.random.default_rng(6)
    scores = {**_scores("plain", rng, torch.float32), "big": torch.tensor(rng.lognormal(0, 1, 5000), dtype=torch.float32)}
    weights = _weights(rng, scores, 0.3)  # 1,500 of 5,000 unchangeable: more than 1024 and 1/64
    m = Changeable("zero", lambda n: weights[n], PerturbConfig())
    with pytest.raises(LookupError):
        m.excluded("big")
    rule = modes.Rule("top_k", lambda x: x, lambda x: torch.isfinite(x) & (x > 0), True, "desc")
    assert modes._scan_plan(ScoreSet(scores), 10, rule, m) is None
    a = rank(ScoreSet(scores), 100, "global", "top_k", 1, mask_fn=m)
    b = rank(dict(scores), 100, "global", "top_k", 1, mask_fn=Changeable("zero", lambda n: weights[n], PerturbConfig()))
    assert torch.equal(a.flat, b.flat) and torch.equal(a.pid, b.pid) and a.support == b.support


def test_the_plan_reads_only_chunks_past_the_floor(small_chunks, monkeypatch):
    """One tensor of 64 chunks with its few large scores in one chunk: Top-10 keys only that chunk's
    entries past the first floor, never a whole chunk."""
    s = torch.rand(64 * 64, dtype=torch.float32) * 0.5
    s[64 * 40 + 3 : 64 * 40 + 13] = torch.arange(10, dtype=torch.float32) + 4.0
    keyed = []
    real = modes.Rule.keys

    def spy(self, x, m):
        keyed.append(x.numel())
        return real(self, x, m)

    monkeypatch.setattr(modes.Rule, "keys", spy)
    r = rank(ScoreSet({"w": s}), 10, "global", "top_k")
    assert sorted(r.flat.tolist()) == list(range(64 * 40 + 3, 64 * 40 + 13))
    assert sum(keyed) == 10  # first floor 4 = 2^2: exactly the ten planted scores pass it


def test_summary_of_a_score_set_equals_a_direct_computation():
    rng = np.random.default_rng(8)
    s = {"a": torch.tensor(rng.lognormal(0, 3, (40, 50)), dtype=torch.float32),
         "b": torch.tensor(np.where(rng.random(3000) < 0.5, 0.0, rng.lognormal(-5, 1, 3000)), dtype=torch.float32)}
    got = score_summary(s, 100)
    allv = torch.cat([t.reshape(-1).double() for t in s.values()])
    top = torch.sort(allv, descending=True).values[:100]
    assert torch.equal(got["top_score"].double(), top)
    assert torch.allclose(got["param_sum"], torch.tensor([float(t.double().sum()) for t in s.values()],
                                                         dtype=torch.float64), rtol=1e-6)
    assert got["param_max"].tolist() == [float(t.max()) for t in s.values()]
    assert int(got["n_zero"]) == int((allv == 0).sum())
    assert int(got["hist_count"].sum()) == int((allv > 0).sum())


def test_infinite_boundaries_and_overflowing_sums():
    """±inf sit in the top exponent code (a tie count at an inf boundary reads their chunks), and a float32
    partial sum that overflows is redone in float64 (the sum of 3e38 + 3e38 is finite in float64)."""
    import math

    assert code_of(math.inf) == 255 and code_of(-math.inf) == 511
    s = {"a": torch.full((10,), math.inf), "b": torch.rand(10) + 0.5}
    r = rank(s, 20, "global", "random_k", 0)
    k1 = next(k for k in range(1, 21) if math.isinf(float(r.score[k - 1])))
    assert tied_counts(ScoreSet(s), r, [k1]) == tied_counts(dict(s), r, [k1]) == {k1: 10}
    got = score_summary({"a": torch.tensor([3e38, 3e38, 1.0])}, 2)["param_sum"]
    assert float(got[0]) == pytest.approx(6e38)


def test_uniform_draw_maps_ordinals_through_the_excluded_list():
    """random_k's j-th candidate of a tensor, from the sorted excluded list (j + #{i: e_i - i <= j}), is
    the j-th True of the mask, for excluded weights at the ends, in runs and none; the draw over a
    sparse-listed mask equals the draw over the same mask given as a plain function."""
    rng = np.random.default_rng(11)
    for n, p in ((1, 0.0), (7, 0.5), (500, 0.01), (500, 0.002), (4096, 0.0)):
        w = torch.tensor(rng.normal(0, 1, n), dtype=torch.float32)
        w[rng.random(n) < p] = 0
        w[0] = 0 if n > 1 else w[0]
        if n > 3:
            w[-3:] = 0  # a run of excluded weights at the end
        m = Changeable("zero", lambda _: w, PerturbConfig())
        keep = torch.nonzero(w != 0).squeeze(1)
        if keep.numel() == 0:
            continue
        ordinal = torch.arange(keep.numel())
        assert torch.equal(modes._candidate_flat(m, "w", ordinal), keep)
    scores = {f"t{i}": torch.rand(300) for i in range(3)}
    weights = {k: torch.where(torch.rand(300) < 0.01, 0.0, 1.0) for k in scores}
    listed = Changeable("zero", lambda nm: weights[nm], PerturbConfig())
    plain = lambda nm: weights[nm] != 0  # noqa: E731 - a mask with no excluded list
    a = rank(scores, 200, "global", "random_k", 4, 1, mask_fn=listed)
    b = rank(scores, 200, "global", "random_k", 4, 1, mask_fn=plain)
    assert torch.equal(a.pid, b.pid) and torch.equal(a.flat, b.flat)
    assert all(float(weights[a.names[int(p)]][int(f)]) != 0 for p, f in zip(a.pid, a.flat))


def test_tie_counts_kept_by_the_ranking_equal_a_full_count(small_chunks, monkeypatch):
    """A ranking by score keeps, for each of its nonzero scores, how many candidates score exactly that
    (counted from the entries it read past its floor): equal to a brute-force count over every candidate,
    ties at the boundary included; the tie counts then read no score. Past TIE_BUDGET kept entries the
    ranking keeps none and the tie counts read the scores: the same counts."""
    rng = np.random.default_rng(12)
    scores = _scores("ties", rng, torch.float32)
    weights = _weights(rng, scores, 0.01)
    mask = Changeable("zero", lambda n: weights[n], PerturbConfig())
    for selection, k in (("top_k", 300), ("bottom_k", 1000)):  # Bottom-1000 reaches past the zeros
        r = rank(ScoreSet(scores), k, "global", selection, 3, mask_fn=mask)
        assert r.tied and r.tied[0] is mask and r.tied[1], selection
        for v, n in r.tied[1].items():
            assert v != 0
            assert n == sum(int(((t.double() == v) & (weights[nm] != 0)).sum()) for nm, t in scores.items())
        ks = [1, 10, k]
        read = []
        real = Scan.may_hold
        monkeypatch.setattr(Scan, "may_hold", lambda self, *a: read.append(a) or real(self, *a))
        got = tied_counts(ScoreSet(scores), r, ks, mask)
        monkeypatch.setattr(Scan, "may_hold", real)
        assert read == []  # every boundary score counted while ranking (or a zero, by the scan): no chunk read
        monkeypatch.setattr(modes, "TIE_BUDGET", 5)
        r2 = rank(ScoreSet(scores), k, "global", selection, 3, mask_fn=mask)
        monkeypatch.setattr(modes, "TIE_BUDGET", 1 << 22)
        assert r2.tied is None and torch.equal(r2.flat, r.flat)
        assert tied_counts(ScoreSet(scores), r2, ks, mask) == got
        assert got[k] == r.tied[1][float(r.score[k - 1])] > 1  # a tie at the boundary
        other = Changeable("zero", lambda n: torch.ones_like(weights[n]), PerturbConfig())  # another mask: its own
        assert tied_counts(ScoreSet(scores), r, ks, other) == tied_counts(dict(scores), r, ks, other)
