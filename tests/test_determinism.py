"""Same config and seeds, same bytes; and the model is bit-identical after a whole experiment.

* Two CPU runs of one config (different out_dirs, the second with the score cache off and the global RNGs
  reseeded in between) write byte-identical results.csv, rankings.csv, stability.csv (and the rest of the
  tables). The run uses every seeded draw there is: calibration windows, Rademacher probes
  (hutchinson_diag), random_k, gauss_noise and random-bit bit_flip. (Across processes: test_resume.py
  compares a subprocess-resumed run with an in-process one, byte for byte.)
* After a run the model's SHA-256 over every parameter and buffer equals the hash right after
  loading, for every perturbation in float32, float16 and bfloat16, including exponent bit flips that make
  the logits NaN/Inf, and when evaluation raises in the middle of a perturbation.
"""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import torch
from safetensors import safe_open

import superweight.run.experiment as experiment
from superweight.arguments import parse_config
from superweight.commands.run import make_experiment, run_experiment
from superweight.config import ModelConfig
from superweight.run.experiment import Experiment
from superweight.inputs.models import load_model
from superweight.core.params import param_hash
from superweight.core.perturbation import PERTURBATIONS

TABLES = ["results.csv", "rankings.csv", "stability.csv", "stability_summary.csv", "gaps.csv", "effects.csv",
          "perturbation_results.json"]
TENSORS = ["selections.safetensors", "sensitivity_scores.safetensors"]  # same tensors and metadata (the header's
# JSON key order is not fixed by safetensors)


def read_tensors(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue").split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(25)) + "." for _ in range(60)) + "\n")
    return p


def base_args(model_dir, corpus, out, cache) -> list[str]:
    return [f"model={model_dir}", f"corpus={corpus}", "data.seq_len=16", "data.eval_windows=2",
            "data.calib_windows=2", "wandb.mode=disabled", "plots=none", f"out_dir={out}", f"cache_dir={cache}"]


def test_same_config_same_bytes(tiny_model_dir, corpus, tmp_path):
    extra = ["metric=magnitude,hutchinson_diag", "score.probes=2", "seeds=0,1", "topk=5", "controls=random_k",
             "perturb=gauss_noise,bit_flip", "perturb.scale=0.5"]
    a = make_experiment(parse_config(base_args(tiny_model_dir, corpus, tmp_path / "a", tmp_path / "cache") + extra),
                        progress=False)
    run_experiment(a)
    torch.manual_seed(12345)  # nothing may depend on the global RNGs
    random.seed(12345)
    b = make_experiment(parse_config(base_args(tiny_model_dir, corpus, tmp_path / "b", tmp_path / "cache") + extra
                                     + ["score.cache=false"]), progress=False)
    run_experiment(b)
    # compact sets hold each seed's own rankings (seeded ties and draws): magnitude's seeds do not share one
    assert (a.loaded.cache.hits, a.loaded.cache.misses) == (0, 4)
    assert (b.loaded.cache.hits, b.loaded.cache.misses) == (0, 4)
    for name in TABLES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in TENSORS:
        (ma, ta), (mb, tb) = read_tensors(tmp_path / "a" / name), read_tensors(tmp_path / "b" / name)
        assert ma == mb and ta.keys() == tb.keys() and len(ta) > 0, name
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (name, k)
    df = pd.read_csv(tmp_path / "a" / "results.csv")
    assert len(df) == 2 * 2 * (1 + 2) * 1 * 2  # metrics x seeds x (top_k + 2 random_k draws) x K x perturbations
    # the seeded draws are really there: seeds differ where they should, and not where they should not
    r = df[(df.metric == "magnitude") & (df.selection == "random_k") & (df.k == 5) & (df.perturbation == "gauss_noise")]
    assert len(r) == 4 and r["ppl"].nunique() == 4  # random_k + noise differ between seeds and between draws
    stab = pd.read_csv(tmp_path / "a" / "stability.csv")
    mag = stab[(stab.kind == "seed") & (stab.metric_a == "magnitude")]
    assert (mag.jaccard == 1.0).all()  # magnitude does not use calibration data: identical across seeds


@pytest.fixture
def hashes(monkeypatch):
    """Record the model hash right after Experiment.load loaded it."""
    seen = {}
    orig = Experiment.load

    def load(self):
        loaded = orig(self)
        seen["after_load"] = param_hash(loaded.model)
        return loaded

    monkeypatch.setattr(Experiment, "load", load)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_model_bit_identical_after_every_perturbation(dtype, tiny_model_dir, corpus, tmp_path, hashes):
    perts = sorted(PERTURBATIONS)
    assert {"zero", "sign_flip", "gauss_noise", "bit_flip"} <= set(perts)
    exp = make_experiment(parse_config(base_args(tiny_model_dir, corpus, tmp_path / "out", tmp_path / "cache") + [
        f"dtype={dtype}", "metric=magnitude", "seeds=0", "topk=1,1000", "controls=random_k",
        f"perturb={','.join(perts)}", "perturb.bits=exponent_msb", "perturb.scale=3.0"]), progress=False)
    df = run_experiment(exp).table
    assert param_hash(exp.model) == hashes["after_load"]
    # ... and equal to a fresh load from disk: nothing drifted during setup either
    fresh, _, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype=dtype, device="cpu"))
    assert param_hash(fresh) == hashes["after_load"]
    # the exponent-MSB flip of the Top-1000 magnitudes (w -> w * 2^128 in fp32/bf16, 2^16 in fp16) drives the
    # logits to Inf/NaN: recorded as such, no crash
    flips = df[(df.perturbation == "bit_flip") & (df.selection == "top_k") & (df.k == 1000)].iloc[0]
    assert bool(flips["nonfinite"]) and not math.isfinite(flips["ppl"]), flips.to_dict()
    assert set(df["perturbation"]) == set(perts) and (df["changed"][df.perturbation != "gauss_noise"] > 0).all()


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("pert", ["zero", "bit_flip"])
def test_model_bit_identical_when_evaluation_raises(pert, tiny_model_dir, corpus, tmp_path, hashes, monkeypatch):
    """Evaluation dies while the weights are perturbed (the 3rd evaluation: baseline, row 1, then this)."""
    calls = []
    orig = experiment.evaluate_lm

    def flaky(model, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("evaluation failed mid-perturbation")
        return orig(model, *a, **kw)

    monkeypatch.setattr(experiment, "evaluate_lm", flaky)
    exp = make_experiment(parse_config(base_args(tiny_model_dir, corpus, tmp_path / "out", tmp_path / "cache") + [
        "metric=magnitude", "seeds=0", "topk=1,50", "controls=random_k", f"perturb={pert}",
        "perturb.bits=exponent_msb"]), progress=False)
    with pytest.raises(Boom):
        run_experiment(exp)
    assert len(calls) == 3
    assert param_hash(exp.model) == hashes["after_load"]
    # nothing but the progress log was written, and the rerun picks the finished row up
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".progress.jsonl"]
    monkeypatch.setattr(experiment, "evaluate_lm", orig)
    exp2 = make_experiment(exp.cfg, progress=False)
    run_experiment(exp2)
    assert param_hash(exp2.model) == hashes["after_load"]
    assert len(exp2.log) >= 2 and exp2.log.get(("baseline",)) is not None
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == (1 + 2) * 2  # (top_k + 2 random_k draws) x K
