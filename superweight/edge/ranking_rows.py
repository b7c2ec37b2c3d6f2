"""The rows of rankings.csv: one selected weight per row, with readable coordinates and its weight value."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.params import index_names, layer_of, module_type
from ..core.ranking import Ranking, groups


def ranking_rows(r: Ranking, values: Callable[[str], torch.Tensor], limit: int) -> list[dict]:
    """Rows for rankings.csv: rank, param, layer, module, expert, row, col, flat_index, score, value (weight)."""
    rows = []
    n = min(limit, len(r))
    pids, flats = r.pid[:n].tolist(), r.flat[:n].tolist()
    value = [0.0] * n  # gathered per parameter: one values() call per tensor, never one per row (int8 dequantizes)
    for pid, pos in groups(r.pid[:n]):
        v = values(r.names[pid]).reshape(-1)
        got = v[r.flat[:n][pos].to(v.device)].float().cpu().tolist()
        for j, x in zip(pos.tolist(), got):
            value[j] = x
    for j in range(n):
        pid, f = pids[j], flats[j]
        name, shape = r.names[pid], r.shapes[pid]
        coords = index_names(shape, f)
        rows.append({
            "rank": int(r.group_rank[j]) if r.mode == "global" else j,
            "param": name, "layer": layer_of(name), "module": module_type(name),
            "expert": coords.get("expert", -1), "row": coords["row"], "col": coords["col"], "flat_index": f,
            "score": float(r.score[j]), "value": value[j],
        })
    return rows
