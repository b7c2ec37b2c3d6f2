"""Figures: the numbers drawn are checked against independent computations on synthetic tables;
static export writes real PNG/SVG files (needs a Chrome/Chromium: apt-get install chromium)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from superweight.edge import plots
from superweight.core.gaps import EFFECT_COLUMNS
from superweight.core.stability import jaccard_from_rankings
from superweight.core.summary import aggregate_over_seeds


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
    assert "3 seed(s)" in fig.layout.title.text
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
    # a sparse metric: entries past its support score 0 and are not top weights
    sparse = {"s.seed0": {**summary["magnitude.seed0"], "top_score": np.array([3.0, 2.0, 0.0, 0.0, 0.0])}}
    t0 = plots.score_mass(sparse, meta, by="layer", top_n=4).set_index("group")
    assert t0.loc["0", "top_share"] == pytest.approx(1.0) and t0["top_n"].iloc[0] == 2  # pids 1, 1 -> layer 0
    m = plots.score_mass(summary, meta, by="module", top_n=4)
    s1 = m[m.seed == 1].set_index("group")
    assert s1.loc["self_attn.q_proj", "mass_share"] == pytest.approx(6 / 10)
    assert s1.loc["self_attn.q_proj", "top_share"] == pytest.approx(1.0)
    fig = plots.sensitivity_heatmap(summary, meta, by="layer", top_n=4)
    mass, top = fig.data
    assert list(mass.y) == ["0", "1", "other"] and list(mass.x) == ["magnitude"]
    np.testing.assert_allclose(np.asarray(mass.z)[:, 0], [100 * (0.4 + 0.4) / 2, 100 * (0.4 + 0.4) / 2, 100 * 0.2])
    # seed 0: top-4 pids 1,1,2,0 -> layers 0,0,1,0; seed 1: 2,2,2,2 -> layer 1
    np.testing.assert_allclose(np.asarray(top.z)[:, 0], [100 * (0.75 + 0) / 2, 100 * (0.25 + 1) / 2, 0])


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


@pytest.mark.slow  # four browser starts (8 s): the default set's PNG/SVG test runs the same path once
def test_one_tab_export_draws_what_kaleidos_own_path_draws(tmp_path, monkeypatch):
    """Images rendered one after another in one tab (no plotly.js reload between them), by a browser started
    before the figures exist (as the run's sink starts it), are the images kaleido's own path renders, each
    from a fresh page: byte-identical PNGs, in the order asked for (a second figure must not show the first
    one's state); an image that fails raises; a browser never used closes."""
    from superweight.edge import export

    if not plots.chrome_available():
        pytest.skip("no Chrome/Chromium for kaleido (apt-get install chromium)")
    assert export._one_tab_kaleido() is not None  # the fast path is the one under test
    early = export.Browser()
    res = synthetic_results()
    figs = {"ppl": plots.delta_vs_k(res, "delta_ppl"), "acc": plots.delta_vs_k(res, "delta_acc")}
    fast = export.save_figures(figs, tmp_path / "fast", ["png"], early)
    early.close()
    with monkeypatch.context() as m:
        m.setattr(export, "_one_tab_kaleido", lambda: None)
        slow = export.save_figures(figs, tmp_path / "slow", ["png"])
    assert [p.name for p in fast] == [p.name for p in slow] == ["ppl.png", "acc.png"]
    for a, b in zip(fast, slow):
        assert a.read_bytes() == b.read_bytes()
    assert fast[0].read_bytes() != fast[1].read_bytes()
    bad = {"fig": figs["ppl"].to_dict(), "path": tmp_path / "bad.bmp",
           "opts": {"format": "bmp", "width": 100, "height": 100, "scale": 1}}
    with pytest.raises(Exception):
        export.write_static([bad])
    assert not (tmp_path / "bad.bmp").exists()
    export.Browser().close()  # started and never used: closes


def test_a_hanging_static_export_is_stopped_and_the_html_kept(tmp_path, monkeypatch, capsys):
    """kaleido/Chrome can hang for good; a run must not hang with it (no manifest, no W&B publish, a sweep
    agent held). A browser whose render never returns is cancelled past its bound: its context exit runs
    (kaleido closes Chrome there), its thread ends, the half-written temp image is removed, the HTML/JSON
    are returned, and the warning says what is missing. A browser that renders in time is not affected."""
    import asyncio
    import threading

    from superweight.edge import export

    class Hangs:  # kaleido's interface as export uses it; writes one temp image, then never returns
        exits: list = []

        def __init__(self, **kw):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            Hangs.exits.append(exc[0])
            return False

        async def write_fig_from_object(self, specs, cancel_on_error=True):
            Path(specs[0]["path"]).write_bytes(b"half")
            await asyncio.sleep(3600)

    monkeypatch.setattr(export, "chrome_available", lambda: True)
    monkeypatch.setattr(export, "_one_tab_kaleido", lambda: Hangs)
    monkeypatch.setattr(export, "STATIC_TIMEOUT_S", 0.5)
    monkeypatch.setattr(export, "STATIC_TIMEOUT_PER_IMAGE_S", 0.0)
    res = synthetic_results()
    figs = {"ppl": plots.delta_vs_k(res, "delta_ppl"), "acc": plots.delta_vs_k(res, "delta_acc")}
    browser, box = export.Browser(), {}
    worker = threading.Thread(target=lambda: box.update(written=export.save_figures(
        figs, tmp_path, ["html", "json", "png", "pdf"], browser)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "save_figures hung with its browser"
    written = box["written"]
    assert sorted(p.name for p in written) == ["acc.html", "acc.json", "ppl.html", "ppl.json"]
    assert "did not finish in 0 s" in (err := capsys.readouterr().err) and "no PNG/PDF written" in err
    assert not browser._thread.is_alive() and Hangs.exits == [asyncio.CancelledError]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.html", "acc.json", "plotly.min.js", "ppl.html",
                                                          "ppl.json"]
    browser.close()  # stopped already: returns at once

    class Draws(Hangs):  # the same browser, in time
        async def write_fig_from_object(self, specs, cancel_on_error=True):
            for s in specs:
                Path(s["path"]).write_bytes(b"image")

    monkeypatch.setattr(export, "_one_tab_kaleido", lambda: Draws)
    monkeypatch.setattr(export, "STATIC_TIMEOUT_S", 60.0)
    written = export.save_figures(figs, tmp_path / "ok", ["png"])
    assert [p.name for p in written] == ["ppl.png", "acc.png"] and written[0].read_bytes() == b"image"
    assert Hangs.exits == [asyncio.CancelledError, None]

    class Fails(Hangs):  # kaleido's own timeout is kaleido's error, not the bound's
        async def write_fig_from_object(self, specs, cancel_on_error=True):
            raise asyncio.TimeoutError("kaleido's own")

    monkeypatch.setattr(export, "_one_tab_kaleido", lambda: Fails)
    with pytest.raises(TimeoutError, match="kaleido's own") as caught:
        export.save_figures(figs, tmp_path / "fails", ["png"])
    assert not isinstance(caught.value, export.StaticExportTimeout)
    assert sorted(p.name for p in (tmp_path / "fails").iterdir()) == []  # the temp folder is gone


# ---------------------------------------------------------------------------------------------------
# print sizes, stability at each metric's support, score distribution, metric comparison
# ---------------------------------------------------------------------------------------------------
def test_delta_vs_k_is_laid_out_at_print_size():
    five = pd.concat([synthetic_results().assign(metric=m) for m in ("a", "b", "c", "d", "e")])
    fig = plots.delta_vs_k(five, "delta_nll")
    assert fig.layout.meta["print"] == {"width_in": 7.0, "height_in": pytest.approx(0.8 + 2 * 1.9)}
    assert fig.layout.width == 672 and fig.layout.font.size >= 9  # 7 in at 96 px/in, >= 6.75 pt
    assert {t.xaxis for t in fig.data} == {"x", "x2", "x3", "x4", "x5"}  # 5 metrics on a 3 x 2 grid
    leg = fig.layout.legend
    assert leg.xref == "container" and 0 <= leg.x <= 1 and 0 <= leg.y <= 1  # inside the figure
    one = plots.delta_vs_k(synthetic_results().query("metric == 'magnitude'"), "delta_nll")
    assert one.layout.width == 336


def _support_rankings():
    """Top-K rows: metric a ranks 6 weights per seed, sparse metric s only 3 (its support)."""
    sets = {("a", 0): [1, 2, 3, 4, 5, 6], ("a", 1): [1, 2, 3, 7, 8, 9], ("s", 0): [1, 5, 9], ("s", 1): [1, 5, 10]}
    rows = [{"metric": m, "seed": sd, "mode": "global", "selection": "top_k", "rank": r, "param": "w",
             "flat_index": f} for (m, sd), fl in sets.items() for r, f in enumerate(fl)]
    rows += [{"metric": "a", "seed": 0, "mode": "global", "selection": "random_k", "rank": r, "param": "w",
              "flat_index": 50 + r} for r in range(6)]
    return pd.DataFrame(rows), sets


def test_stability_shows_a_small_support_at_its_support():
    df, sets = _support_rankings()
    def J(x, y):
        return len(set(x) & set(y)) / len(set(x) | set(y))
    from superweight.edge.plot_stability import supported_ks, supported_stability

    assert supported_ks(df, 4) == {"a": 4, "s": 3}
    stab = supported_stability(df, 4)
    got = {(r.a, r.b): (r.k, r.jaccard) for r in stab.itertuples()}
    assert got[("a/seed0", "a/seed1")] == (4, pytest.approx(J(sets[("a", 0)][:4], sets[("a", 1)][:4])))
    assert got[("s/seed0", "s/seed1")] == (3, pytest.approx(J(sets[("s", 0)], sets[("s", 1)])))
    assert got[("a/seed0", "s/seed0")] == (3, pytest.approx(J(sets[("a", 0)][:3], sets[("s", 0)])))
    figs = plots.stability_heatmaps(stab)
    seeds = figs["stability_seeds"]
    assert [a.text for a in seeds.layout.annotations] == ["a", "s (K=3)"]  # shown, labelled, not dropped
    assert "Top-4" in seeds.layout.title.text
    z = np.asarray(seeds.data[1].z)
    assert z[0, 1] == pytest.approx(J(sets[("s", 0)], sets[("s", 1)]))
    met = figs["stability_metrics"]
    assert list(met.data[0].x) == ["a", "s (K=3)"]
    mean = (J(sets[("a", 0)][:3], sets[("s", 0)]) + J(sets[("a", 1)][:3], sets[("s", 1)])) / 2
    assert np.asarray(met.data[0].z)[0, 1] == pytest.approx(mean)


def _scores_entry(rng, n=20_000, n_top=100, bins=40):
    s = rng.lognormal(0, 2, n)
    s[:3] = [5e4, 2e4, 1e4]  # three weights far above the rest
    s[-50:] = 0.0
    pos = s[s > 0]
    edges = np.linspace(np.log10(pos.min()), np.log10(pos.max()), bins + 1)
    count, _ = np.histogram(np.log10(pos), bins=edges)
    order = np.argsort(-s, kind="stable")[:n_top]
    return s, {"top_score": s[order].astype(np.float32), "top_pid": order % 2, "top_flat": order // 2,
               "hist_log10_edges": edges, "hist_count": count.astype(np.int64), "n_zero": np.array(50)}


def test_rank_score_curve_matches_the_scores():
    from superweight.edge.plot_scores import rank_score_curve

    s, entry = _scores_entry(np.random.default_rng(0))
    c = rank_score_curve(entry)
    top = c[c.source == "top"]
    np.testing.assert_allclose(top["score"], np.sort(s)[::-1][:100], rtol=1e-6)
    assert list(top["rank"]) == list(range(1, 101))
    hist = c[c.source == "hist"]
    assert len(hist) > 10 and (hist["rank"] > 100).all()
    for r, v in zip(hist["rank"], hist["score"]):  # rank = how many scores are >= that score
        assert r == int((s >= v * (1 - 1e-12)).sum())
    assert c["rank"].max() == (s > 0).sum() and c["rank"].is_monotonic_increasing
    assert c["score"].is_monotonic_decreasing
    # without the histogram: the stored entries only
    bare = rank_score_curve({"top_score": entry["top_score"]})
    assert len(bare) == 100 and set(bare["source"]) == {"top"}


def test_score_distribution_marks_the_threshold_and_names_the_top_weights():
    from superweight.edge.plot_scores import score_distribution, weight_name

    rng = np.random.default_rng(1)
    meta = {"param_names": ["model.layers.3.mlp.down_proj.weight", "lm_head.weight"], "layers": [3, -1],
            "modules": ["mlp.down_proj", "lm_head"], "param_shapes": [[100, 200], [10, 10]]}
    assert weight_name(meta, 0, 1229) == "L3 down_proj[6, 29]" and weight_name(meta, 1, 7) == "lm_head[0, 7]"
    summary = {}
    for m in ("magnitude", "act_mag"):
        for seed in (1, 0):
            s, summary[f"{m}.seed{seed}"] = _scores_entry(rng)
    fig = score_distribution(summary, meta, k=10)
    assert [a.text for a in fig.layout.annotations][:2] == ["magnitude (seed 0)", "act_mag (seed 0)"]
    thr = [t for t in fig.data if t.name == "Top-K threshold"]
    e = summary["magnitude.seed0"]
    assert list(thr[0].x) == [10] and thr[0].y[0] == pytest.approx(float(e["top_score"][9]))
    named = [t for t in fig.data if t.name == "top weights"][0]
    assert list(named.text) == ["1", "2", "3"]
    assert named.hovertext[0] == weight_name(meta, int(e["top_pid"][0]), int(e["top_flat"][0]))
    box = [a.text for a in fig.layout.annotations if a.text.startswith("1 ")][0]
    assert named.hovertext[0] in box and "50 scores = 0" in box
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def _gaps_effects():
    rows, eff = [], []
    ratios = {"m1": {1: 1.1, 10: 2.5, 100: 9.0}, "m2": {1: 2.2, 10: 3.0, 100: 9.0}, "m3": {1: 1.0, 10: 1.2, 100: 1.5}}
    lo_ratio = {"m1": {1: 1.0, 10: 1.5, 100: 3.0}, "m2": {1: 1.9, 10: 2.1, 100: 5.0}, "m3": {1: 0.9, 10: 1.0, 100: 1.1}}
    for m, by_k in ratios.items():
        for k, r in by_k.items():
            for sel in ("top_k", "random_k"):
                eff.append({"perturbation": "zero", "mode": "global", "metric": m, "selection": sel, "k": k,
                            "ppl_ratio": r if sel == "top_k" else 1.0,
                            "ppl_ratio_lo": lo_ratio[m][k] if sel == "top_k" else 1.0, "ppl_ratio_hi": r + 1})
            for control, shift in (("random_k", 0.0), ("bottom_k", 0.1)):
                g = np.log(r) - shift
                rows.append({"perturbation": "zero", "mode": "global", "metric": m, "k": k, "control": control,
                             "gap_nll": g, "gap_nll_lo": g - 0.2, "gap_nll_hi": g + 0.2})
    return pd.DataFrame(rows), pd.DataFrame(eff)


def test_metric_comparison_ranks_by_the_k_that_doubles_ppl():
    from superweight.core.comparison import comparison_text, metric_comparison

    gp, eff = _gaps_effects()
    t = metric_comparison(gp, eff)
    assert len(t) == len(gp)
    by = t.drop_duplicates("metric").set_index("metric")
    # m2 doubles at K=1 (its lower bound at K=10), m1 at K=10 (bound at 100), m3 never
    assert by.loc["m2", "k_double_ppl"] == 1 and by.loc["m2", "k_double_ppl_sure"] == 10
    assert by.loc["m1", "k_double_ppl"] == 10 and by.loc["m1", "k_double_ppl_sure"] == 100
    assert pd.isna(by.loc["m3", "k_double_ppl"])
    assert list(t.drop_duplicates("metric")["metric"]) == ["m2", "m1", "m3"] and list(by["rank"]) == [1, 2, 3]
    row = t[(t.metric == "m1") & (t.k == 10) & (t.control == "bottom_k")].iloc[0]
    assert row["gap_nll"] == pytest.approx(np.log(2.5) - 0.1) and row["gap_nll_lo"] == pytest.approx(np.log(2.5) - 0.3)
    assert row["top_ppl_ratio"] == pytest.approx(2.5) and bool(row["resolved"])
    assert not t[(t.metric == "m3") & (t.k == 1) & (t.control == "random_k")]["resolved"].iloc[0]  # CI holds 0
    text = comparison_text(t)
    assert text.index("1. m2") < text.index("2. m1") < text.index("3. m3") and "m3: PPL doubled never" in text
    fig = plots.figure_set(None, comparison=t)  # no results: no Δ figures, no comparison figure either
    assert fig == {}
    from superweight.edge.plot_comparison import comparison_figure

    f = comparison_figure(t)
    assert [a.text for a in f.layout.annotations][:2] == ["vs Random-K", "vs Bottom-K"]
    first = [tr for tr in f.data if tr.showlegend][0]
    assert first.name == "1. m2 (PPL×2 at K=1)"
    m1 = [tr for tr in f.data if tr.legendgroup == "m1" and tr.xaxis == "x"][0]
    np.testing.assert_allclose(m1.y, np.log([1.1, 2.5, 9.0]))
    np.testing.assert_allclose(m1.error_y.array, [0.2, 0.2, 0.2])


def test_no_chrome_warning_names_kaleidos_download(tmp_path, monkeypatch, capsys):
    from superweight.edge import export

    monkeypatch.setattr(export, "chrome_available", lambda: False)
    written = export.save_figures({"d": plots.delta_vs_k(synthetic_results(), "delta_ppl")}, tmp_path, ["html", "pdf"])
    err = capsys.readouterr().err
    assert [p.name for p in written] == ["d.html"]
    assert "kaleido_get_chrome" in err and "kaleido.get_chrome_sync()" in err and "apt-get install chromium" in err
    import shutil

    assert shutil.which("kaleido_get_chrome") or (Path(__file__).parent.parent / ".venv" / "bin" / "kaleido_get_chrome").exists()


# ---------------------------------------------------------------------------------------------------
# a tiny run's output: the run, `superweight figures` and the notebook draw the same set; Chromium checks it
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from superweight import commands

    import contextlib
    import io

    out = tmp_path_factory.mktemp("figs") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = commands.main(["run", f"model.name={tiny_model_dir}", "score.metrics=magnitude,act_mag", "seeds=0,1",
                          "select.topk=1,2", "select.controls=random_k,bottom_k", "select.control_draws=1",
                          "data.eval_windows=2", "data.calib_windows=1", "data.seq_len=16", "wandb.mode=disabled",
                          "plots=html,json", f"out_dir={out}"])
    assert rc == 0
    (out / "stdout.txt").write_text(printed.getvalue())
    return out


FIGURES = {"delta_ppl_vs_k", "delta_nll_vs_k", "delta_acc_vs_k", "ppl_ratio_vs_k", "metric_comparison",
           "layer_sensitivity", "module_sensitivity", "score_distribution", "stability_seeds", "stability_metrics"}


@pytest.mark.slow
def test_run_and_figures_command_draw_the_same_set(tiny_run, tmp_path):
    from superweight import commands

    drawn = {p.stem for p in (tiny_run / "plots").glob("*.html")}
    assert drawn == FIGURES
    printed = (tiny_run / "stdout.txt").read_text()  # printed at the end of the run, in rank order
    table = pd.read_csv(tiny_run / "metric_comparison.csv")
    first, second = table.drop_duplicates("metric")["metric"]
    assert printed.index("Which metric finds them") < printed.index(f"1. {first}") < printed.index(f"2. {second}")
    assert commands.main(["figures", str(tiny_run), "--out", str(tmp_path / "f"), "--formats", "html"]) == 0
    assert {p.stem for p in (tmp_path / "f").glob("*.html")} == drawn
    run_table = pd.read_csv(tiny_run / "metric_comparison.csv")
    pooled = pd.read_csv(tmp_path / "f" / "metric_comparison.csv")
    assert list(pooled["variant"].unique()) == ["all"]
    pd.testing.assert_frame_equal(pooled.drop(columns="variant")[["metric", "k", "control", "rank", "k_double_ppl"]],
                                  run_table[["metric", "k", "control", "rank", "k_double_ppl"]])
    gaps = pd.read_csv(tiny_run / "gaps.csv")  # every gap of the run, with the same interval
    merged = gaps.merge(run_table, on=["perturbation", "mode", "metric", "k", "control"], suffixes=("", "_c"))
    assert len(merged) == len(gaps) == len(run_table)
    np.testing.assert_allclose(merged["gap_nll_lo_c"], merged["gap_nll_lo"])


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_a_run(tiny_run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SUPERWEIGHT_FIGURES_SOURCE", str(tiny_run))
    monkeypatch.setenv("SUPERWEIGHT_FIGURES_OUT", str(tmp_path / "nbfigs"))
    monkeypatch.setenv("SUPERWEIGHT_FIGURES_FORMATS", "html")
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")
    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "figures.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(shown) == len(FIGURES)
    assert {p.stem for p in (tmp_path / "nbfigs").glob("*.html")} == FIGURES


CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="sw-result">pending</pre><script>
const FILES = %s, W = 1400;
function load(name) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("GET", name);
    xhr.onload = () => {
      const f = document.createElement("iframe");
      f.style.width = W + "px"; f.style.height = "1000px"; f.style.border = "0";
      f.onload = () => resolve([name, f]);
      f.srcdoc = xhr.responseText;
      document.body.appendChild(f);
    };
    xhr.onerror = () => resolve([name, null]);
    xhr.send();
  });
}
function check(name, f) {
  if (!f) return {name, error: "not loaded"};
  const doc = f.contentDocument, win = f.contentWindow, gd = doc.querySelector(".plotly-graph-div");
  if (!gd || !gd._fullData) return {name, error: "no plot"};
  const r = gd.getBoundingClientRect();
  const out = {name, page: win.innerWidth, scroll: doc.documentElement.scrollWidth, right: r.right,
               width: r.width, height: r.height, unlabelled: []};
  const lg = doc.querySelector(".legend");
  if (lg) { const l = lg.getBoundingClientRect(); out.legend = [l.left - r.left, l.top - r.top, l.right - r.left, l.bottom - r.top]; }
  // a trace's own name (gd.data), not plotly's "trace N" default; a legend entry needs the legend shown
  const legend = gd._fullLayout.showlegend;
  const entry = (t, i) => legend && gd._fullData[i].showlegend && !!t.name;
  const shown = new Set(gd.data.filter(entry).map(t => t.legendgroup || t.name));
  gd.data.forEach((t, i) => {
    const heat = gd._fullData[i].type === "heatmap" && t.name && (gd._fullData[i].showscale || t.coloraxis);
    const texted = (t.mode || "").includes("text") && t.text;
    const inLegend = entry(t, i) || (t.legendgroup && shown.has(t.legendgroup));
    if (!(heat || texted || inLegend)) out.unlabelled.push(i + ":" + gd._fullData[i].type);
  });
  return out;
}
Promise.all(FILES.map(load)).then(async (loaded) => {
  await new Promise(r => setTimeout(r, 1000));
  document.getElementById("sw-result").textContent = JSON.stringify(loaded.map(([n, f]) => check(n, f)));
});
</script></body></html>"""


def _chromium():
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
def test_every_html_figure_fits_a_1400px_page_and_labels_its_traces(tiny_run, tmp_path):
    """Each HTML figure of a run opened in headless Chromium (one launch: a page loads every figure into a
    1,400 px frame): nothing wider than the page, the legend inside the figure, every trace in the legend or
    labelled. Two bad figures (the old 3,900 px layer bars, an unnamed trace) must be caught."""
    import shutil
    import subprocess

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium installed (CI installs Debian's chromium)")
    d = tmp_path / "plots"
    shutil.copytree(tiny_run / "plots", d)
    import plotly.graph_objects as go

    plots.save_figures({"bad_wide": go.Figure(go.Bar(x=[1, 2], y=[1, 2], name="bars")).update_layout(width=3900),
                        "bad_unlabelled": go.Figure([go.Scatter(x=[1], y=[1], name="a"), go.Scatter(x=[1], y=[2])])
                        .update_layout(width=400)}, d, ["html"])
    names = sorted(p.name for p in d.glob("*.html"))
    (d / "check.html").write_text(CHECK_PAGE % json.dumps(names))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
                          "--window-size=1400,1000", "--virtual-time-budget=30000", "--dump-dom",
                          (d / "check.html").as_uri()], capture_output=True, text=True, timeout=120)
    import html
    import re

    m = re.search(r'<pre id="sw-result">(.*?)</pre>', out.stdout, re.S)
    assert m, out.stderr[-2000:]
    got = {r["name"].removesuffix(".html"): r for r in json.loads(html.unescape(m.group(1)))}
    assert set(got) == FIGURES | {"bad_wide", "bad_unlabelled"}
    for name in FIGURES:
        r = got[name]
        assert "error" not in r, r
        assert r["scroll"] <= r["page"] == 1400 and r["right"] <= 1400, r
        assert r["width"] <= 7 * 96 + 1, r  # at most a double column
        assert not r["unlabelled"], r
        if "legend" in r:
            x0, y0, x1, y1 = r["legend"]
            assert x0 >= 0 and y0 >= 0 and x1 <= r["width"] + 1 and y1 <= r["height"] + 1, r
    assert got["bad_wide"]["scroll"] > 1400
    assert got["bad_unlabelled"]["unlabelled"] == ["1:scatter"]
