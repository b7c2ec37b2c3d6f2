"""Figures: the numbers drawn are checked against independent computations on synthetic tables;
static export writes real PNG/SVG files (needs a Chrome/Chromium: apt-get install chromium)."""

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from superweight.edge import plots
from superweight.core.results import EFFECT_COLUMNS, aggregate_over_seeds, jaccard_from_rankings


def synthetic_results(seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    rows = []
    for metric in ("magnitude", "grad_x_weight"):
        for seed in seeds:
            for sel in ("top_k", "random_k", "bottom_k"):
                for k in (1, 10, 100):
                    d = float(rng.normal(10 * np.log10(k) if sel == "top_k" else 0.0, 1.0))
                    rows.append({"metric": metric, "seed": seed, "mode": "global", "selection": sel, "k": k,
                                 "perturbation": "zero", "ppl": 40 + d, "delta_ppl": d, "delta_nll": d / 40,
                                 "delta_acc": -d / 100, "ppl_ratio": (40 + d) / 40})
    return pd.DataFrame(rows)


def test_aggregate_matches_numpy_and_counts_nonfinite():
    df = synthetic_results()
    df.loc[(df.metric == "magnitude") & (df.selection == "top_k") & (df.k == 100) & (df.seed == 2), "delta_ppl"] = np.inf
    agg = aggregate_over_seeds(df, "delta_ppl")
    for (metric, sel, k), g in df.groupby(["metric", "selection", "k"]):
        vals = [v for v in g["delta_ppl"] if np.isfinite(v)]
        row = agg[(agg.metric == metric) & (agg.selection == sel) & (agg.k == k)].iloc[0]
        assert row["mean"] == pytest.approx(sum(vals) / len(vals))
        sd = np.sqrt(sum((v - sum(vals) / len(vals)) ** 2 for v in vals) / (len(vals) - 1))
        assert row["std"] == pytest.approx(sd)
        assert row["count"] == len(vals)
        assert row["nonfinite"] == (3 - len(vals))
    assert int(agg["nonfinite"].sum()) == 1


def test_delta_vs_k_draws_seed_means_per_selection_on_log_axis():
    df = synthetic_results()
    fig = plots.delta_vs_k(df, "delta_ppl")
    assert [a.text for a in fig.layout.annotations] == ["magnitude", "grad_x_weight"]
    traces = {(t.xaxis, t.name): t for t in fig.data}
    assert len(fig.data) == 6  # 2 metrics x 3 selections
    t = traces[("x", "Top-K")]
    assert list(t.x) == [1, 10, 100]
    g = df[(df.metric == "magnitude") & (df.selection == "top_k")]
    expect = [g[g.k == k]["delta_ppl"].mean() for k in (1, 10, 100)]
    np.testing.assert_allclose(t.y, expect)
    np.testing.assert_allclose(t.error_y.array, [g[g.k == k]["delta_ppl"].std(ddof=1) for k in (1, 10, 100)])
    np.testing.assert_allclose(t.error_y.arrayminus, t.error_y.array)
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    assert t.line.color == plots.SELECTION_COLORS["top_k"]
    assert "over 3 seed(s)" in fig.layout.title.text
    ratio = plots.delta_vs_k(df, "ppl_ratio")
    assert ratio.layout.yaxis.type == "log"
    t = {(tr.xaxis, tr.name): tr for tr in ratio.data}[("x", "Top-K")]
    logs = [np.log(g[g.k == k]["ppl_ratio"].to_numpy()) for k in (1, 10, 100)]
    np.testing.assert_allclose(t.y, [np.exp(x.mean()) for x in logs])  # geometric mean
    np.testing.assert_allclose(np.array(t.y) - np.array(t.error_y.arrayminus),
                               [np.exp(x.mean() - x.std(ddof=1)) for x in logs])
    assert (np.array(t.y) - np.array(t.error_y.arrayminus) > 0).all()  # bars stay on the log axis
    with pytest.raises(ValueError):
        plots.delta_vs_k(df, "nonsense")


def test_delta_vs_k_with_effects_draws_the_confidence_intervals():
    """With results.effects (CIs over seeds, draws and windows), each point is the effect's mean and its bars
    reach the CI's ends."""
    df = synthetic_results()
    rows = []
    for (metric, sel, k), g in df.groupby(["metric", "selection", "k"]):
        m = float(g["delta_ppl"].mean())
        rows.append({"perturbation": "zero", "mode": "global", "metric": metric, "selection": sel, "k": k,
                     "delta_ppl": m, "delta_ppl_lo": m - 1.0 - k / 100, "delta_ppl_hi": m + 2.0})
    eff = pd.DataFrame(rows).reindex(columns=EFFECT_COLUMNS)
    fig = plots.delta_vs_k(df, "delta_ppl", effects=eff)
    t = {(tr.xaxis, tr.name): tr for tr in fig.data}[("x", "Top-K")]
    e = eff[(eff.metric == "magnitude") & (eff.selection == "top_k")].sort_values("k")
    np.testing.assert_allclose(t.y, e["delta_ppl"])
    np.testing.assert_allclose(t.error_y.array, [2.0, 2.0, 2.0])
    np.testing.assert_allclose(t.error_y.arrayminus, [1.01, 1.1, 2.0])
    assert "95% CI" in fig.layout.title.text


def _score_file(tmp_path):
    # 4 tensors: layers 0,0,1 and the head (-1); param_sum chosen by hand
    meta = {"param_names": json.dumps(["l0.q", "l0.down", "l1.q", "head"]),
            "layers": json.dumps([0, 0, 1, -1]),
            "modules": json.dumps(["self_attn.q_proj", "mlp.down_proj", "self_attn.q_proj", "lm_head"])}
    t = {
        "magnitude.seed0.param_sum": np.array([1.0, 3.0, 4.0, 2.0]),
        "magnitude.seed0.top_pid": np.array([1, 1, 2, 0, 3], dtype=np.int64),
        "magnitude.seed0.top_flat": np.arange(5, dtype=np.int64),
        "magnitude.seed1.param_sum": np.array([2.0, 2.0, 4.0, 2.0]),
        "magnitude.seed1.top_pid": np.array([2, 2, 2, 2, 1], dtype=np.int64),
        "magnitude.seed1.top_flat": np.arange(5, dtype=np.int64),
    }
    p = tmp_path / "sensitivity_scores.safetensors"
    save_file(t, str(p), metadata=meta)
    return p


def test_score_mass_by_layer_and_module(tmp_path):
    summary, meta = plots.read_score_summary(_score_file(tmp_path))
    t = plots.score_mass(summary, meta, by="layer", top_n=4)
    s0 = t[t.seed == 0].set_index("group")
    assert s0.loc["0", "mass_share"] == pytest.approx(4 / 10)
    assert s0.loc["1", "mass_share"] == pytest.approx(4 / 10)
    assert s0.loc["-1", "mass_share"] == pytest.approx(2 / 10)
    assert s0.loc["0", "top_share"] == pytest.approx(3 / 4)  # top-4 pids 1,1,2,0 -> layers 0,0,1,0
    m = plots.score_mass(summary, meta, by="module", top_n=4)
    s1 = m[m.seed == 1].set_index("group")
    assert s1.loc["self_attn.q_proj", "mass_share"] == pytest.approx(6 / 10)
    assert s1.loc["self_attn.q_proj", "top_share"] == pytest.approx(1.0)
    fig = plots.layer_histograms(summary, meta, by="layer", top_n=4)
    bars = [tr for tr in fig.data if tr.yaxis == "y"]
    assert list(bars[0].x) == ["L0", "L1", "other"]
    np.testing.assert_allclose(bars[0].y, [(0.4 + 0.4) / 2, (0.4 + 0.4) / 2, (0.2 + 0.2) / 2])


def _rankings():
    rows = []
    sets = {("a", 0): [1, 2, 3, 4], ("a", 1): [1, 2, 5, 6], ("b", 0): [1, 7, 8, 9], ("b", 1): [2, 3, 4, 9]}
    for (metric, seed), flats in sets.items():
        for r, f in enumerate(flats):
            rows.append({"metric": metric, "seed": seed, "mode": "global", "rank": r, "param": "w", "flat_index": f})
    return pd.DataFrame(rows), sets


def test_jaccard_from_rankings_and_heatmaps():
    df, sets = _rankings()
    stab = jaccard_from_rankings(df, k=4)
    def J(x, y):
        return len(set(x) & set(y)) / len(set(x) | set(y))
    got = {(r.a, r.b): r.jaccard for r in stab.itertuples()}
    assert got[("a/seed0", "a/seed1")] == pytest.approx(J(sets[("a", 0)], sets[("a", 1)]))
    assert got[("a/seed0", "b/seed0")] == pytest.approx(J(sets[("a", 0)], sets[("b", 0)]))
    assert ("a/seed0", "b/seed1") not in got  # different metric and seed: neither kind
    assert set(stab["kind"]) == {"seed", "metric"}
    assert jaccard_from_rankings(df, k=5).empty  # only 4 rows stored per set
    # rankings.csv holds every selection: only the Top-K rows are compared
    ctl = df.assign(selection="random_k", flat_index=df["flat_index"] + 100)
    both = pd.concat([df.assign(selection="top_k"), ctl], ignore_index=True)
    pd.testing.assert_frame_equal(jaccard_from_rankings(both, k=4), stab)
    figs = plots.stability_heatmaps(stab)
    z = np.array(figs["stability_seeds"].data[0].z)
    assert z[0, 0] == 1 and z[0, 1] == pytest.approx(J(sets[("a", 0)], sets[("a", 1)]))
    zm = np.array(figs["stability_metrics"].data[0].z)
    mean_ab = (J(sets[("a", 0)], sets[("b", 0)]) + J(sets[("a", 1)], sets[("b", 1)])) / 2
    assert zm[0, 1] == pytest.approx(mean_ab) and zm[1, 0] == pytest.approx(mean_ab)


def test_jaccard_from_rankings_uses_one_candidate_set():
    """rankings.csv keeps a Top-K per candidate set (`candidates`: perturbations that draw from other weights);
    stability compares the first candidate set's Top-K, as stability.csv does, never a union of two."""
    df, _ = _rankings()
    first = df.assign(selection="top_k", candidates="zero")
    other = df.assign(selection="top_k", candidates="bit_flip", flat_index=10 + df["rank"])
    pd.testing.assert_frame_equal(jaccard_from_rankings(pd.concat([first, other], ignore_index=True), k=4),
                                  jaccard_from_rankings(first, k=4))


def test_save_figures_writes_html_json_png_svg(tmp_path):
    figs = {"delta": plots.delta_vs_k(synthetic_results(), "delta_ppl")}
    written = plots.save_figures(figs, tmp_path / "plots", ["html", "json"])
    html = (tmp_path / "plots" / "delta.html").read_text()
    assert 'src="plotly.min.js"' in html and (tmp_path / "plots" / "plotly.min.js").stat().st_size > 1_000_000
    import plotly.io as pio

    back = pio.read_json(str(tmp_path / "plots" / "delta.json"))
    assert list(back.data[0].x) == [1, 10, 100] and back.layout.title.text == figs["delta"].layout.title.text
    assert len(written) == 2
    with pytest.raises(ValueError):
        plots.save_figures(figs, tmp_path / "x", ["gif"])
    if not plots.chrome_available():
        pytest.skip("no Chrome/Chromium for kaleido (apt-get install chromium)")
    written = plots.save_figures(figs, tmp_path / "plots", ["png", "svg"])
    png = (tmp_path / "plots" / "delta.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert w >= 800 and h >= 400  # scale 2 of the 760x440 layout
    svg = (tmp_path / "plots" / "delta.svg").read_text()
    assert svg.lstrip().startswith("<svg") and "Top-K" in svg
