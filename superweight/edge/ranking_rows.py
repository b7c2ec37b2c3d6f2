"""The rows of rankings.csv: one selected weight per row, with readable coordinates and its weight value."""

from __future__ import annotations

from collections.abc import Mapping

from ..core.params import index_names, layer_of, module_type
from ..core.ranking import Ranking


def ranking_rows(r: Ranking, values: Mapping[str, Mapping[int, float]], limit: int) -> list[dict]:
    """Rows for rankings.csv: rank, param, layer, module, expert, row, col, flat_index, score, value (the
    weight's real value, `values[param][flat_index]`: the Result's saved values, read once per tensor)."""
    rows = []
    n = min(limit, len(r))
    pids, flats = r.pid[:n].tolist(), r.flat[:n].tolist()
    for j in range(n):
        pid, f = pids[j], flats[j]
        name, shape = r.names[pid], r.shapes[pid]
        coords = index_names(shape, f)
        rows.append({
            "rank": int(r.group_rank[j]) if r.mode == "global" else j,
            "param": name, "layer": layer_of(name), "module": module_type(name),
            "expert": coords.get("expert", -1), "row": coords["row"], "col": coords["col"], "flat_index": f,
            "score": float(r.score[j]), "value": values[name][f],
        })
    return rows
