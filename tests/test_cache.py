"""The score cache (run/cache.py).

* compact (the default): a second run of one config is served from the compact sets and writes the same
  bytes as the run that computed the scores; a run whose K grid, mode or controls differ recomputes (never a
  short ranking); the compact set holds no per-weight score tensor; a full set serves any run.
* score.cache values: true/false spellings, full, and one clear error for anything else.
"""

from __future__ import annotations

import random

import pytest
import pandas as pd
import torch
from safetensors import safe_open

from superweight.arguments import parse_config
from superweight.commands.run import make_experiment, run_experiment
from superweight.config import ConfigError
from superweight.run.cache import cache_mode
from superweight.run.disk import estimate_disk

TABLES = ["results.csv", "rankings.csv", "stability.csv", "gaps.csv", "effects.csv"]
WORDS = "time year people way day man thing woman life child world school state family student group".split()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(2)
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(25)) + "." for _ in range(60)) + "\n")
    return p


def run(model_dir, corpus, out, cache, *extra):
    argv = [f"model={model_dir}", f"corpus={corpus}", "data.seq_len=16", "data.eval_windows=2", "data.calib_windows=2",
            "wandb.mode=disabled", "plots=none", f"out_dir={out}", f"cache_dir={cache}", "metric=magnitude,grad_x_weight",
            "seeds=0", "topk=2,5", "controls=random_k,bottom_k,matched_k", "select.control_draws=2", *extra]
    exp = make_experiment(parse_config(argv), progress=False)
    run_experiment(exp)
    return exp


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_compact_cache_serves_the_same_bytes_and_recomputes_what_it_does_not_hold(tiny_model_dir, corpus, tmp_path):
    cache = tmp_path / "cache"
    a = run(tiny_model_dir, corpus, tmp_path / "a", cache)
    b = run(tiny_model_dir, corpus, tmp_path / "b", cache)
    assert (a.loaded.cache.hits, a.loaded.cache.misses) == (0, 2) and (b.loaded.cache.hits, b.loaded.cache.misses) == (2, 0)
    for name in TABLES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ["selections.safetensors", "sensitivity_scores.safetensors"]:
        ta, tb = tensors(tmp_path / "a" / name), tensors(tmp_path / "b" / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    summary = tensors(tmp_path / "a" / "sensitivity_scores.safetensors")
    assert summary["magnitude.seed0.hist_count"].dtype == torch.int64
    assert summary["magnitude.seed0.hist_log10_edges"].numel() == summary["magnitude.seed0.hist_count"].numel() + 1
    # the compact sets hold rankings and the summary, no per-weight score tensor
    files = sorted((cache / "scores").glob("*.safetensors"))
    assert len(files) == 2
    for path in files:
        assert not set(tensors(path)) & set(a.params)
        assert all(k.startswith(("summary.", "r")) for k in tensors(path))
    # superweight plan's disk figures against what the run wrote
    disk = estimate_disk(a.cfg, [tuple(p.shape) for p in a.params.values()])
    cache_bytes = sum(p.stat().st_size for p in files)
    out_bytes = sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file())
    print(f"disk: cache est {disk.cache} measured {cache_bytes}; out_dir est {disk.out_dir} measured {out_bytes}")
    assert disk.score_sets == 2 and abs(disk.cache - cache_bytes) <= 0.25 * cache_bytes
    assert 0.5 * out_bytes <= disk.out_dir <= 2 * out_bytes
    # a larger K, another mode or another control: recomputed, and the larger K is really selected
    c = run(tiny_model_dir, corpus, tmp_path / "c", cache, "topk=2,5,40", "metric=magnitude")
    assert (c.loaded.cache.hits, c.loaded.cache.misses) == (0, 1)
    rk = pd.read_csv(tmp_path / "c" / "rankings.csv")
    assert len(rk[(rk.metric == "magnitude") & (rk.seed == 0) & (rk.selection == "top_k")]) == 40
    d = run(tiny_model_dir, corpus, tmp_path / "d", cache, "select.modes=per_layer", "metric=magnitude", "topk=2")
    assert (d.loaded.cache.hits, d.loaded.cache.misses) == (0, 1)
    # a full set serves any K grid; the rows equal the ones computed from scratch
    run(tiny_model_dir, corpus, tmp_path / "e", tmp_path / "full", "score.cache=full", "topk=3", "metric=magnitude",
        "controls=random_k", "select.control_draws=1")
    f = run(tiny_model_dir, corpus, tmp_path / "f", tmp_path / "full", "topk=2,5,40", "metric=magnitude")
    assert (f.loaded.cache.hits, f.loaded.cache.misses) == (1, 0)
    assert (tmp_path / "f" / "results.csv").read_text().splitlines()[1:] == \
        (tmp_path / "c" / "results.csv").read_text().splitlines()[1:]


def test_cache_mode_values():
    assert [cache_mode(v) for v in (True, "true", "on", "compact", "full", False, "false", "off")] == \
        ["compact"] * 4 + ["full"] + ["false"] * 3
    with pytest.raises(ConfigError, match=r"'maybe'.*compact.*full.*false"):
        cache_mode("maybe")
