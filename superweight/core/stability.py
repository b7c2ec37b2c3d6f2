"""Rank stability: Jaccard overlap of Top-K sets across calibration seeds (one metric) and across metrics
(one seed), from a run's selections or recomputed from rankings.csv, and its summary table.
"""

from __future__ import annotations

import pandas as pd

STABILITY_COLUMNS = ["kind", "mode", "k", "a", "b", "metric_a", "metric_b", "seed_a", "seed_b", "jaccard"]
STABILITY_SUMMARY_COLUMNS = ["kind", "mode", "k", "metric", "metric_a", "metric_b", "n_pairs",
                             "mean_jaccard", "min_jaccard", "max_jaccard"]


def stability_pairs(sets: dict[tuple[str, int, str], dict[int, set]], metrics: list[str], seeds: list[int],
                    modes: list[str], ks: list[int], jaccard) -> list[dict]:
    """Jaccard rows: across seeds (same metric) and across metrics (same seed), for every mode and K.
    `sets[(metric, seed, mode)][k]` is a Top-K selection; `jaccard(a, b)` compares two. A pair is left out
    when either Top-K is cut short by its metric's support (comparing fewer than K weights)."""
    pairs = [("seed", m, a, m, b) for m in metrics for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    pairs += [("metric", ma, s, mb, s) for s in seeds for i, ma in enumerate(metrics) for mb in metrics[i + 1:]]
    rows = []
    for mode in modes:
        for k in sorted(ks):
            for kind, ma, sa, mb, sb in pairs:
                A, B = sets[(ma, sa, mode)].get(k), sets[(mb, sb, mode)].get(k)
                if A is None or B is None:
                    continue
                rows.append({"kind": kind, "mode": mode, "k": k, "a": f"{ma}/seed{sa}", "b": f"{mb}/seed{sb}",
                             "metric_a": ma, "metric_b": mb, "seed_a": sa, "seed_b": sb, "jaccard": jaccard(A, B)})
    return rows


def stability_summary(sdf: pd.DataFrame) -> pd.DataFrame:
    """stability.csv summarized: for every (kind, mode, K, metric pair) the mean, min and max Jaccard over
    its pairs. kind=seed: one metric (metric_a = metric_b), over all seed pairs (a, b), a < b: how
    reproducible that metric's Top-K is across calibration data. kind=metric: two metrics, over seeds."""
    if sdf.empty:
        return pd.DataFrame(columns=STABILITY_SUMMARY_COLUMNS)
    g = sdf.groupby(["kind", "mode", "k", "metric_a", "metric_b"], sort=False)["jaccard"]
    out = g.agg(n_pairs="size", mean_jaccard="mean", min_jaccard="min", max_jaccard="max").reset_index()
    out["metric"] = [a if kind == "seed" else f"{a} vs {b}"
                     for kind, a, b in zip(out["kind"], out["metric_a"], out["metric_b"])]
    return out[STABILITY_SUMMARY_COLUMNS].sort_values(["kind", "mode", "metric", "k"], kind="stable").reset_index(drop=True)


def jaccard_from_rankings(rankings: pd.DataFrame, k: int, mode: str = "global") -> pd.DataFrame:
    """Rows like stability.csv recomputed from the Top-K rows of rankings.csv: J = |A∩B| / |A∪B| with A, B
    the (param, flat_index) of rank < k. Only sets with at least k stored rows take part."""
    r = rankings[(rankings["mode"] == mode) & (rankings["rank"] < k)]
    if "selection" in r.columns:
        r = r[r["selection"] == "top_k"]
    if "candidates" in r.columns and len(r):  # one candidate set (the first), as stability.csv
        r = r[r["candidates"] == r["candidates"].iloc[0]]
    sets = {}
    for (metric, seed), g in r.groupby(["metric", "seed"], sort=False):
        if len(g) >= k:
            sets[(metric, int(seed))] = set(zip(g["param"], g["flat_index"]))
    keys = list(sets)
    rows = []
    for i, (ma, sa) in enumerate(keys):
        for mb, sb in keys[i + 1:]:
            if ma == mb and sa != sb:
                kind = "seed"
            elif ma != mb and sa == sb:
                kind = "metric"
            else:
                continue
            A, B = sets[(ma, sa)], sets[(mb, sb)]
            rows.append({"kind": kind, "mode": mode, "k": k, "a": f"{ma}/seed{sa}", "b": f"{mb}/seed{sb}",
                         "metric_a": ma, "metric_b": mb, "seed_a": sa, "seed_b": sb,
                         "jaccard": len(A & B) / len(A | B)})
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)
