"""The whole experiment from the command line, and on the real shipped model."""

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
from safetensors import safe_open

from superweight.arguments import parse_config
from superweight.commands import main
from superweight.commands.run import make_experiment, run_experiment
from superweight.config import ModelConfig
from superweight.inputs.models import load_model
from superweight.core.params import fingerprint
from superweight.core.results import make_row, results_frame


# results.csv's schema, written out here (not read from the code) so that a change to it is a deliberate one
SCHEMA = ["metric", "seed", "mode", "selection", "draw", "k", "n_selected", "support", "n_tied", "perturbation",
          "ppl", "nll", "acc", "delta_ppl", "delta_nll", "delta_nll_lo", "delta_nll_hi", "delta_acc", "ppl_ratio",
          "changed", "delta_w_l2", "delta_w_linf", "mean_abs_w", "match_ks", "match_err_median", "match_err_max",
          "nonfinite_weights", "nonfinite", "tokens"]
GAP_SCHEMA = ["perturbation", "mode", "metric", "k", "control", "gap_nll", "gap_nll_lo", "gap_nll_hi",
              "conditional_on", "top_delta_nll", "control_delta_nll", "n_seeds", "n_draws", "n_windows",
              "match_err_median", "match_err_max", "seed_gaps"]


def test_python_m_superweight_runs_end_to_end(tiny_model_dir, tmp_path):
    """The one real `python -m superweight` of the default run (a cold interpreter, as a user or wandb agent
    starts it): a small run exits 0, prints its table, writes its rows, and nothing lands on stderr but
    warnings (no traceback). Every other CLI test calls `superweight.commands.main` in-process."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, "-m", "superweight", "run", f"model={tiny_model_dir}", "metric=magnitude",
                        "topk=1,2", "controls=random_k", "seeds=0", "data.eval_windows=2", "data.calib_windows=1",
                        "data.seq_len=16", "wandb.mode=disabled", "plots=none", f"out_dir={out}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "magnitude" in p.stdout
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 * (1 + 2)  # 2 Ks x (top_k + 2 random_k draws)
    assert (out / "manifest.json").is_file()


def test_cli_run_writes_every_output(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", f"model={tiny_model_dir}", "metric=magnitude,grad_x_weight,grad_squared", "topk=1,10,100",
               "mode=global,per_layer", "perturb=zero,sign_flip", "controls=random_k,bottom_k", "seeds=0,1",
               "data.eval_windows=4", "data.calib_windows=2", "data.seq_len=32", "wandb.mode=disabled",
               "plots=html", f"out_dir={out}"])  # static PNG/SVG export (Chrome): tests/test_plots.py
    assert rc == 0, capsys.readouterr().err[-2000:]
    for f in ("manifest.json", "results.csv", "perturbation_results.json", "rankings.csv", "stability.csv",
              "stability_summary.csv", "gaps.csv", "effects.csv", "selections.safetensors",
              "sensitivity_scores.safetensors"):
        assert (out / f).is_file(), f
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[: len(SCHEMA)]) == SCHEMA  # the fixed schema, whatever the controls
    assert df["match_ks"].isna().all()  # no matched_k in this run
    # one row per metric x seed x K x mode x selection (random_k: select.control_draws = 2 draws) x perturbation
    assert len(df) == 3 * 2 * 3 * 2 * (1 + 2 + 1) * 2
    assert set(df["selection"]) == {"top_k", "random_k", "bottom_k"}
    assert sorted(set(df.loc[df["selection"] == "random_k", "draw"])) == [0, 1]
    assert set(df.loc[df["selection"] != "random_k", "draw"]) == {0}
    assert (df["n_selected"][df["mode"] == "global"] == df["k"][df["mode"] == "global"]).all()
    # every selection is drawn from the weights zero / sign_flip can change: each selected weight changes
    assert (df["changed"] == df["n_selected"]).all()
    assert (df["delta_w_linf"] > 0).all() and (df["mean_abs_w"] > 0).all()
    assert (df["delta_nll_lo"] <= df["delta_nll"] + 1e-12).all() and (df["delta_nll"] <= df["delta_nll_hi"] + 1e-12).all()
    top_rows = df[(df["selection"] == "top_k") & (df["mode"] == "global")]
    assert (top_rows["support"] >= top_rows["n_selected"]).all() and (top_rows["n_tied"] >= 1).all()
    gp = pd.read_csv(out / "gaps.csv")
    assert list(gp.columns) == GAP_SCHEMA
    # one gap per perturbation x mode x metric x K x control
    assert len(gp) == 2 * 2 * 3 * 3 * 2 and set(gp["control"]) == {"random_k", "bottom_k"}
    assert (gp.loc[gp["control"] == "random_k", "n_draws"] == 2).all() and (gp["n_seeds"] == 2).all()
    assert gp["conditional_on"].isna().all()  # 2 seeds: unconditional (empty in the CSV)
    assert (gp["gap_nll_lo"] <= gp["gap_nll_hi"]).all()
    man = json.loads((out / "manifest.json").read_text())
    for key in ("config", "seeds", "git", "versions", "hardware", "model", "data", "times"):
        assert key in man
    assert man["seeds"] == [0, 1] and len(man["model"]["fingerprint"]) == 32
    model, _, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    assert man["model"]["fingerprint"] == fingerprint(model)  # every byte of the weights
    assert man["versions"]["torch"] and man["data"]["fingerprint"]
    pr = json.loads((out / "perturbation_results.json").read_text())
    assert pr["baseline"]["ppl"] > 1 and len(pr["rows"]) == len(df)
    rk = pd.read_csv(out / "rankings.csv")
    assert {"metric", "seed", "rank", "param", "layer", "row", "col", "flat_index", "score", "value"} <= set(rk.columns)
    assert {"selection", "draw"} <= set(rk.columns) and set(rk["selection"]) == {"top_k", "random_k", "bottom_k"}
    top = rk[(rk.metric == "magnitude") & (rk.seed == 0) & (rk["mode"] == "global") & (rk.selection == "top_k")]
    assert len(top) > 0
    assert (top["score"].diff().dropna() <= 0).all() and (top["score"] == top["value"].abs()).all()
    with safe_open(str(out / "selections.safetensors"), "pt") as f:  # the exact weights of every selection
        names = json.loads(f.metadata()["param_names"])
        pid = f.get_tensor("magnitude.seed0.global.top_k.draw0.pid").tolist()
        flat = f.get_tensor("magnitude.seed0.global.top_k.draw0.flat").tolist()
        assert [(names[p], i) for p, i in zip(pid, flat)] == list(zip(top["param"], top["flat_index"]))
        assert len(f.get_tensor("grad_squared.seed1.per_layer.random_k.draw1.flat")) == 14 * 100
    with safe_open(str(out / "sensitivity_scores.safetensors"), "pt") as f:
        assert "grad_x_weight.seed1.top_score" in f.keys()
        assert len(json.loads(f.metadata()["param_names"])) == 14


def test_results_csv_has_the_fixed_schema():
    """results.csv always has every schema column, in order, whatever controls ran (runs pool into one table)."""
    keys = dict(metric="magnitude", seed=0, mode="global", selection="random_k", draw=0, k=1, perturbation="zero",
                n_selected=1, support=None, n_tied=None)
    base = {"nll": 2.0, "ppl": math.exp(2.0), "acc": 0.5, "tokens": 10, "nonfinite": False}
    res = {"nll": 2.5, "ppl": math.exp(2.5), "acc": 0.4, "tokens": 10, "nonfinite": False}
    row = make_row(keys, res, base, {"changed": 1, "nonfinite": 0, "delta_w_l2": 1.0, "delta_w_linf": 1.0,
                                     "mean_abs_w": 1.0})
    df = results_frame([row])
    assert list(df.columns[: len(SCHEMA)]) == SCHEMA
    assert df.loc[0, "delta_nll"] == pytest.approx(0.5)


@pytest.mark.slow
def test_real_model_top_k_hurts_far_more_than_controls(tmp_path):
    """On SmolLM2-135M, zeroing the grad_x_weight Top-10 raises PPL by far more than Random-10 or Bottom-10."""
    cfg = parse_config(["metric=grad_x_weight", "topk=1,10", "seeds=0", "data.eval_windows=4",
                        "data.calib_windows=2", "wandb.mode=disabled", f"out_dir={tmp_path / 'real'}",
                        "model.device=cpu"])
    df = run_experiment(make_experiment(cfg, progress=False)).table
    assert set(df["selection"]) == {"top_k", "random_k", "bottom_k", "matched_k"}  # the default controls
    d = df.groupby(["selection", "k"])["delta_ppl"].mean()  # over the control draws
    assert d[("top_k", 10)] > 10 * max(abs(d[("random_k", 10)]), abs(d[("bottom_k", 10)]), 0.1)
    assert d[("top_k", 10)] > 10.0


@pytest.fixture(scope="module")
def half_zero_model_dir(tmp_path_factory, small_tokenizer):
    """A tiny Llama whose block weights are half exact zeros (as a pruned or GGUF checkpoint can be)."""
    import torch
    from conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=len(small_tokenizer), hidden=32, layers=2, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".layers." in n and p.ndim == 2:
                p[torch.rand(p.shape, generator=g) < 0.5] = 0.0
    d = tmp_path_factory.mktemp("half-zero")
    model.save_pretrained(d)
    small_tokenizer.save_pretrained(d)
    return d


def test_recorded_selections_are_the_perturbed_ones(half_zero_model_dir, tmp_path):
    """zero and bit_flip draw from different candidate sets (w != 0 vs all weights): the selection recorded for a
    row (Result.rankings, rankings.csv, selections.safetensors) must be the one that row perturbed."""
    cfg = parse_config([f"model={half_zero_model_dir}", "metric=magnitude", "topk=200", "seeds=0",
                        "controls=random_k", "perturb=zero,bit_flip", "data.eval_windows=2", "data.calib_windows=2",
                        "data.seq_len=32", "wandb.mode=disabled", "plots=none", f"out_dir={tmp_path / 'run'}"])
    exp = make_experiment(cfg, progress=False)
    result = run_experiment(exp)
    df = result.table
    zero_rows = df[(df.perturbation == "zero") & (df.selection == "random_k")]
    assert (zero_rows["changed"] == zero_rows["n_selected"]).all()  # drawn from w != 0
    flip_rows = df[(df.perturbation == "bit_flip") & (df.selection == "random_k")]
    assert len(zero_rows) == len(flip_rows) == 2
    # every recorded random_k selection that a zero row used holds only nonzero weights; bit_flip's (drawn from
    # every weight, half of them zeros) is recorded under its own key
    def zeros(r):
        return sum(float(exp.values(r.names[p]).reshape(-1)[f]) == 0 for p, f in zip(r.pid.tolist(), r.flat.tolist()))

    for draw in (0, 1):
        assert zeros(result.rankings[("magnitude", 0, "global", "random_k", draw, "zero")]) == 0
        assert zeros(result.rankings[("magnitude", 0, "global", "random_k", draw, "bit_flip")]) > 50
    rk = pd.read_csv(tmp_path / "run" / "rankings.csv")
    rnd = rk[(rk.selection == "random_k") & (rk.draw == 0)]
    assert set(rnd["candidates"]) == {"zero", "bit_flip"}
    assert (rnd.loc[rnd.candidates == "zero", "value"] != 0).all()
    assert (rnd.loc[rnd.candidates == "bit_flip", "value"] == 0).sum() > 50
