"""`superweight figures` pools runs by evaluation-window identity, names the runs it cannot pool, counts a
seed once, and gets the same gaps as the run that holds every seed (fake out_dirs, no model)."""

import json

import numpy as np
import pandas as pd

from superweight.core.gaps import gaps
from superweight.core.results import results_frame
from superweight.edge.figures import load_runs, pooled_tables

W = 6


def rows_for(seeds, rng, shift=0.6):
    n = np.full(W, 100.0)
    base = np.full(W, 320.0)
    out = []
    for s in seeds:
        for sel, draws, mu in (("top_k", 1, shift), ("random_k", 2, 0.0)):
            for d in range(draws):
                x = mu + rng.normal(0, 0.2) + rng.normal(0, 0.1, W)
                out.append(dict(metric="m", seed=s, mode="global", selection=sel, draw=d, k=10, perturbation="zero",
                                support=None, window_nll=list(base + x * n), window_tokens=list(n),
                                delta_nll=float(x.mean()), ppl=30 * np.exp(x.mean()), delta_ppl=0.0, ppl_ratio=1.0))
    return out, {"window_nll": list(base), "window_tokens": list(n), "ppl": 30.0, "nll": 3.2}


def write_run(d, rows, baseline, seeds, fingerprint="fp1", index=(0, 3, 6, 9, 12, 15), per_window=True):
    d.mkdir(parents=True)
    results_frame(rows).to_csv(d / "results.csv", index=False)
    data = {"fingerprint": fingerprint, "eval_window_index": list(index)} if fingerprint else {}
    (d / "manifest.json").write_text(json.dumps({"config": {"seeds": seeds}, "data": data}))
    if per_window:
        (d / "perturbation_results.json").write_text(json.dumps({"baseline": baseline, "rows": rows}))
    return d


def test_split_runs_give_the_gaps_of_the_run_that_holds_every_seed(tmp_path):
    rows, base = rows_for([0, 1, 2], np.random.default_rng(0))
    one = gaps(rows, base)
    dirs = [write_run(tmp_path / f"s{s}", [r for r in rows if r["seed"] == s], base, [s]) for s in (0, 1, 2)]
    t = pooled_tables(load_runs(dirs))["all"]
    assert t["notes"] == {}
    pd.testing.assert_frame_equal(gaps(t["rows"], t["baseline"]), one)
    assert one["n_seeds"].iloc[0] == 3 and one["conditional_on"].iloc[0] == ""


def test_a_seed_in_two_runs_is_counted_once_and_named(tmp_path):
    rows, base = rows_for([0, 1, 2], np.random.default_rng(1))
    a = write_run(tmp_path / "a", [r for r in rows if r["seed"] in (0, 1)], base, [0, 1])
    b = write_run(tmp_path / "b", [r for r in rows if r["seed"] in (1, 2)], base, [1, 2])
    t = pooled_tables(load_runs([a, b]))["all"]
    pd.testing.assert_frame_equal(gaps(t["rows"], t["baseline"]), gaps(rows, base))
    assert "m seed 1" in t["notes"][str(b)] and str(a) not in t["notes"]
    assert len(t["results"]) == len(rows)  # results.csv rows of seed 1 once


def test_runs_with_other_windows_or_no_identity_are_named_not_pooled(tmp_path):
    rows, base = rows_for([0, 1, 2], np.random.default_rng(2))
    other, _ = rows_for([3], np.random.default_rng(3))
    dirs = [write_run(tmp_path / f"s{s}", [r for r in rows if r["seed"] == s], base, [s]) for s in (0, 1)]
    dirs.append(write_run(tmp_path / "s2", [r for r in rows if r["seed"] == 2], base, [2], index=(1, 4, 7, 10, 13, 16)))
    dirs.append(write_run(tmp_path / "s3", other, base, [3], fingerprint="fp2"))
    dirs.append(write_run(tmp_path / "s4", other, base, [4], fingerprint=None))
    dirs.append(write_run(tmp_path / "s5", other, base, [5], per_window=False))
    t = pooled_tables(load_runs(dirs))["all"]
    notes = t["notes"]
    assert "evaluation window indices differs" in notes[str(tmp_path / "s2")]
    assert "data fingerprint differs" in notes[str(tmp_path / "s3")]
    assert "no data fingerprint" in notes[str(tmp_path / "s4")]
    assert "no per-window data" in notes[str(tmp_path / "s5")]
    assert sorted({r["seed"] for r in t["rows"]}) == [0, 1]
    # the same baseline NLLs were no reason to pool (the old rule pooled s2, s3 and s4)
    assert gaps(t["rows"], t["baseline"])["n_seeds"].iloc[0] == 2


def test_one_run_of_one_seed_is_conditional(tmp_path):
    rows, base = rows_for([0], np.random.default_rng(4))
    single = write_run(tmp_path / "only", [r for r in rows if r["seed"] == 0], base, [0])
    t = pooled_tables(load_runs([single]))["all"]
    assert gaps(t["rows"], t["baseline"])["conditional_on"].iloc[0] == "calibration seed"


def test_runs_with_other_baselines_pool_their_own_deltas(tmp_path):
    """Seed 2 ran on another device: its baseline and every row's window NLL sit higher by a per-window
    offset. Pooled, each run's rows are ΔNLL against its own baseline: the effects and gaps equal those of
    the run that holds every seed on one baseline, and the run is named."""
    from superweight.core.gaps import effects

    rows, base = rows_for([0, 1, 2], np.random.default_rng(5))
    offset = np.linspace(5.0, 40.0, W)  # nats per window
    base2 = dict(base, window_nll=list(np.asarray(base["window_nll"]) + offset))
    rows2 = [dict(r, window_nll=list(np.asarray(r["window_nll"]) + offset)) for r in rows if r["seed"] == 2]
    dirs = [write_run(tmp_path / f"s{s}", [r for r in rows if r["seed"] == s], base, [s]) for s in (0, 1)]
    dirs.append(write_run(tmp_path / "s2", rows2, base2, [2]))
    t = pooled_tables(load_runs(dirs))["all"]
    pd.testing.assert_frame_equal(effects(t["rows"], t["baseline"]), effects(rows, base))
    pd.testing.assert_frame_equal(gaps(t["rows"], t["baseline"]), gaps(rows, base))
    assert "baseline NLL differs" in t["notes"][str(tmp_path / "s2")] and str(tmp_path / "s0") not in t["notes"]
