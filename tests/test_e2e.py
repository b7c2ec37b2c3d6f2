"""The whole experiment from the command line, and on the real shipped model."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from safetensors import safe_open

from superweight.config import parse_config
from superweight.experiment import RESULT_COLUMNS, Experiment


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "superweight", "run", *args], capture_output=True, text=True, env=env)


def test_cli_run_writes_every_output(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run_cli(f"model={tiny_model_dir}", "metric=magnitude,grad_x_weight,grad_squared", "topk=1,10,100",
                "mode=global,per_layer", "perturb=zero,sign_flip", "controls=random_k,bottom_k", "seeds=0,1",
                "data.eval_windows=4", "data.calib_windows=2", "data.seq_len=32", "wandb.mode=disabled",
                f"out_dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    for f in ("manifest.json", "results.csv", "perturbation_results.json", "rankings.csv", "stability.csv",
              "sensitivity_scores.safetensors"):
        assert (out / f).is_file(), f
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    # one row per metric x seed x K x mode x selection x perturbation
    assert len(df) == 3 * 2 * 3 * 2 * 3 * 2
    assert set(df["selection"]) == {"top_k", "random_k", "bottom_k"}
    assert (df["n_selected"][df["mode"] == "global"] == df["k"][df["mode"] == "global"]).all()
    man = json.loads((out / "manifest.json").read_text())
    for key in ("config", "seeds", "git", "versions", "hardware", "model", "data", "times"):
        assert key in man
    assert man["seeds"] == [0, 1] and len(man["model"]["fingerprint"]) == 16
    assert man["versions"]["torch"] and man["data"]["fingerprint"]
    pr = json.loads((out / "perturbation_results.json").read_text())
    assert pr["baseline"]["ppl"] > 1 and len(pr["rows"]) == len(df)
    rk = pd.read_csv(out / "rankings.csv")
    assert {"metric", "seed", "rank", "param", "layer", "row", "col", "flat_index", "score", "value"} <= set(rk.columns)
    top = rk[(rk.metric == "magnitude") & (rk.seed == 0) & (rk["mode"] == "global")]
    assert (top["score"].diff().dropna() <= 0).all() and (top["score"] == top["value"].abs()).all()
    with safe_open(str(out / "sensitivity_scores.safetensors"), "pt") as f:
        assert "grad_x_weight.seed1.top_score" in f.keys()
        assert len(json.loads(f.metadata()["param_names"])) == 14


@pytest.mark.slow
def test_real_model_top_k_hurts_far_more_than_controls(tmp_path):
    """On SmolLM2-135M, zeroing the grad_x_weight Top-10 raises PPL by far more than Random-10 or Bottom-10."""
    cfg = parse_config(["metric=grad_x_weight", "topk=1,10", "seeds=0", "data.eval_windows=4",
                        "data.calib_windows=2", "wandb.mode=disabled", f"out_dir={tmp_path / 'real'}",
                        "model.device=cpu"])
    df = Experiment(cfg, progress=False).run()
    d = df.set_index(["selection", "k"])["delta_ppl"]
    assert d[("top_k", 10)] > 10 * max(abs(d[("random_k", 10)]), abs(d[("bottom_k", 10)]), 0.1)
    assert d[("top_k", 10)] > 10.0
