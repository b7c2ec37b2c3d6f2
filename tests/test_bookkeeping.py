"""Per-saved-entry work is O(1): the Result's saved weight values are read through one values() call per
tensor (with 8-bit weights each call dequantizes the whole tensor), not one per row; rankings.csv rows look
them up."""

from __future__ import annotations

import torch

from superweight.config import RunConfig
from superweight.core.ranking import Ranking
from superweight.edge.ranking_rows import ranking_rows
from superweight.run.experiment import Experiment


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

    exp = Experiment(RunConfig(), progress=False)
    exp.values = values  # the loaded model's real values, observed
    saved = exp.saved_weight_values({("m", 0, "global", "top_k", 0, "zero"): r})
    assert sorted(calls) == sorted(names)  # one call per tensor for 6 saved entries
    rows = ranking_rows(r, saved, limit=5)
    assert [row["value"] for row in rows] == [float(weights[names[p]].reshape(-1)[f]) for p, f in
                                              zip(pid[:5].tolist(), flat[:5].tolist())]
    assert [row["flat_index"] for row in rows] == flat[:5].tolist() and [row["row"] for row in rows] == [0, 5, 3, 0, 1]
