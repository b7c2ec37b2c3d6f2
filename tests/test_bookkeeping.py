"""Per-saved-entry work is O(1): the Result's saved weight values are read through one values() call per
tensor (with 8-bit weights each call dequantizes the whole tensor), not one per row; rankings.csv rows look
them up."""

from __future__ import annotations

import torch

from superweight.config import RunConfig
from superweight.core.ranking import Ranking
from superweight.edge.ranking_rows import ranking_rows
from superweight.run.experiment import Experiment
from superweight.run.result import saved_weight_values


def test_ranking_rows_read_each_tensor_once_and_the_right_values():
    g = torch.Generator().manual_seed(0)
    weights = {"model.layers.0.mlp.down_proj.weight": torch.randn(6, 5, generator=g),
               "model.layers.1.self_attn.q_proj.weight": torch.randn(4, 7, generator=g)}
    names = list(weights)
    pid = torch.tensor([1, 0, 1, 0, 0, 1])
    flat = torch.tensor([3, 29, 27, 0, 7, 3])
    r = Ranking(names, [tuple(w.shape) for w in weights.values()], pid, flat, torch.arange(6.0), torch.arange(6))
    calls = []

    def values(name):
        calls.append(name)
        return weights[name]

    saved = saved_weight_values({("m", 0, "global", "top_k", 0, "zero"): r}, RunConfig().select.save_top, values)
    assert sorted(calls) == sorted(names)  # one call per tensor for 6 saved entries
    rows = ranking_rows(r, saved, limit=5)
    assert [row["value"] for row in rows] == [float(weights[names[p]].reshape(-1)[f]) for p, f in
                                              zip(pid[:5].tolist(), flat[:5].tolist())]
    assert [row["flat_index"] for row in rows] == flat[:5].tolist() and [row["row"] for row in rows] == [0, 5, 3, 0, 1]


def test_a_uniform_draw_is_made_once_per_run_with_each_metrics_own_scores():
    """random_k depends on no score: the loop keeps each (seed, draw)'s global draw for the other metrics,
    which get the same weights with their own scores, exactly what a fresh draw gives them."""
    from superweight.core.matching import Shared
    from superweight.core.selections import rank_grid

    g = torch.Generator().manual_seed(1)
    shapes = {"model.layers.0.mlp.down_proj.weight": (6, 5), "model.layers.1.self_attn.q_proj.weight": (4, 7)}
    a = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    b = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    exp = Experiment(RunConfig(), progress=False)
    exp.cfg.select.topk = [1, 5, 10]
    drawn: dict = {}
    ra = exp.ranking(a, 2, "global", "zero", "random_k", 1, None, None, Shared(), drawn)
    rb = exp.ranking(b, 2, "global", "zero", "random_k", 1, None, None, Shared(), drawn)
    fresh = rank_grid(b, [1, 5, 10], "global", "random_k", 2, 1)
    assert list(drawn) == [(2, "random_k", 1)]
    assert torch.equal(rb.pid, fresh.pid) and torch.equal(rb.flat, fresh.flat) and torch.equal(rb.score, fresh.score)
    assert torch.equal(ra.pid, rb.pid) and not torch.equal(ra.score, rb.score)
    rb.stats["x"] = 1
    assert "x" not in ra.stats and "x" not in drawn[(2, "random_k", 1)].stats


def test_a_set_that_reads_no_calibration_data_is_made_and_summarized_once(tiny_model_dir, tmp_path, monkeypatch):
    """magnitude's scores do not depend on the seed (no calibration windows): with three seeds the loop makes
    the set once and summarizes it once (its scan too), and every seed's summary is that one; each seed still
    gets its own rankings (the tie-break and the controls are seeded)."""
    import random

    from dataclasses import replace

    import superweight.run.experiment as E
    from superweight.arguments import parse_config
    from superweight.commands.run import make_experiment

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(50)) + "\n")
    made, summarized = [], []
    real_scores, real_summary = E.compute_scores, E.score_summary
    monkeypatch.setattr(E, "compute_scores", lambda m, ctx: made.append(m) or real_scores(m, ctx))
    monkeypatch.setattr(E, "score_summary", lambda s, n: summarized.append(id(s)) or real_summary(s, n))
    cfg = parse_config([f"model={tiny_model_dir}", "metric=magnitude", "seeds=0,1,2", "topk=2", "controls=random_k",
                        f"corpus={corpus}", "data.seq_len=16", "data.eval_windows=1", "data.calib_windows=1",
                        "wandb.mode=disabled", "plots=none", f"out_dir={tmp_path / 'out'}",
                        f"cache_dir={tmp_path / 'cache'}"])
    exp = make_experiment(cfg, progress=False)
    result = exp.run()
    assert made == ["magnitude"] and len(summarized) == 1
    s0, s1, s2 = (result.score_summaries[f"magnitude.seed{s}"] for s in (0, 1, 2))
    assert s0 is s1 is s2
    tops = [result.rankings[("magnitude", s, "global", "top_k", 0, "zero")] for s in (0, 1, 2)]
    assert all(len(t) == 2 for t in tops) and exp.held is None
    keys = result.extra["score_keys"]  # what lineage declares as the run's inputs: a cache file each
    assert len(set(keys.values())) == 3
    assert all((tmp_path / "cache" / "scores" / f"{k}.safetensors").is_file() for k in keys.values())
    # score.cache=full: the set is made and stored once, never loaded back for the later seeds
    from superweight.run.cache import ScoreCache

    loads = []
    real_load = ScoreCache._load
    monkeypatch.setattr(ScoreCache, "_load", lambda self, k, *a: loads.append(k) or real_load(self, k, *a))
    made.clear()
    full = make_experiment(replace(cfg, out_dir=str(tmp_path / "full"), score=replace(cfg.score, cache="full")),
                           progress=False).run()
    assert made == ["magnitude"] and len(loads) == 1  # seed 0's miss only
    assert len(set(full.extra["score_keys"].values())) == 1  # one full set, recorded for every seed
