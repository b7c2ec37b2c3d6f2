"""Results as plain tables (pandas/numpy, no torch, no plotting, no W&B): the row schema, confidence
intervals, the Top-K minus control gaps (the research answer), stability pairs and aggregates.

Plots only draw these tables and tracking only logs them.

Uncertainty. Every row is evaluated on the same windows as the baseline, so its ΔNLL is paired per window:
d_i = (NLL sum of window i, perturbed − baseline) / tokens_i, and the row reports ΔNLL = Σ D_i / Σ n_i with a
95% paired t-interval over windows (`delta_nll_lo`, `delta_nll_hi`). The Top-K vs control gap per metric,
K, mode and perturbation, gap = ΔNLL(top_k) − ΔNLL(control), gets a 95% percentile interval from a
hierarchical bootstrap (2,000 resamples) that resamples seeds, then each seed's control draws, then the
evaluation windows (jointly for all rows, since they share windows): every source of noise a rerun would see.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

RESULT_COLUMNS = [
    "metric", "seed", "mode", "selection", "draw", "k", "n_selected", "support", "n_tied", "perturbation",
    "ppl", "nll", "acc", "delta_ppl", "delta_nll", "delta_nll_lo", "delta_nll_hi", "delta_acc", "ppl_ratio",
    "changed", "delta_w_l2", "delta_w_linf", "mean_abs_w", "match_ks", "match_err_median", "match_err_max", "nonfinite_weights", "nonfinite", "tokens",
]
PER_WINDOW = ("window_nll", "window_tokens")  # kept in perturbation_results.json / .progress.jsonl, not in CSV
STABILITY_COLUMNS = ["kind", "mode", "k", "a", "b", "metric_a", "metric_b", "seed_a", "seed_b", "jaccard"]
STABILITY_SUMMARY_COLUMNS = ["kind", "mode", "k", "metric", "metric_a", "metric_b", "n_pairs",
                             "mean_jaccard", "min_jaccard", "max_jaccard"]
GAP_COLUMNS = ["perturbation", "mode", "metric", "k", "control", "gap_nll", "gap_nll_lo", "gap_nll_hi",
               "top_delta_nll", "control_delta_nll", "n_seeds", "n_draws", "n_windows"]
BOOTSTRAP = 2000


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4, a finite series)."""
    th = math.atan(t / math.sqrt(df))
    c2, s = math.cos(th) ** 2, math.sin(th)
    if df % 2:  # odd: (2/pi) (th + sin th cos th (1 + 2/3 cos^2 + 2·4/(3·5) cos^4 + ...))
        total, term = 0.0, 1.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (th + s * math.cos(th) * total) if df > 1 else 2 / math.pi * th
    total, term = 0.0, 1.0  # even: sin th (1 + 1/2 cos^2 + 1·3/(2·4) cos^4 + ...)
    for j in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * total


@functools.lru_cache(maxsize=None)
def _t975(df: int) -> float:
    """Two-sided 95% Student-t quantile t(0.975, df), exact to ~1e-9 (bisection on the closed-form CDF);
    beyond df = 20,000 the Cornish-Fisher term z + (z^3 + z) / (4 df)."""
    if df <= 0:
        return float("nan")
    if df > 20_000:
        z = 1.959963984540054
        return z + (z ** 3 + z) / (4 * df)
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def past_support(row: dict) -> bool:
    """A Top-K row past its metric's support: Top-K stopped at `support` < K weights (never padded), so it
    is no Top-K at that K and is left out of the gaps and the effects (the row itself stays in results.csv)."""
    if row.get("selection") != "top_k":
        return False
    try:
        sup = float(row.get("support"))
    except (TypeError, ValueError):
        return False
    return math.isfinite(sup) and int(row["k"]) > sup


def per_window_delta(row: dict, baseline: dict) -> np.ndarray | None:
    """d_i = (NLL sum of window i, row − baseline) / tokens_i, or None without per-window data."""
    a, b, n = row.get("window_nll"), baseline.get("window_nll"), baseline.get("window_tokens")
    if not a or not b or not n or len(a) != len(b):
        return None
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(a, float) - np.asarray(b, float)) / np.where(n > 0, n, np.nan)


def paired_ci(row: dict, baseline: dict) -> tuple[float, float]:
    """95% paired t-interval of ΔNLL over the evaluation windows (token-weighted mean, windows of equal length
    in practice): mean(d) ± t · sd(d) / sqrt(n)."""
    d = per_window_delta(row, baseline)
    if d is None or d.size < 2 or not np.all(np.isfinite(d)):
        return float("nan"), float("nan")
    n = np.asarray(baseline["window_tokens"], float)
    mean = float(np.sum(d * n) / np.sum(n))
    half = _t975(d.size - 1) * float(np.std(d, ddof=1)) / math.sqrt(d.size)
    return mean - half, mean + half


def make_row(keys: dict, res: dict, baseline: dict, pinfo: dict, extra: dict | None = None) -> dict:
    """One result row: its keys (metric, seed, mode, selection, draw, k, perturbation, ...), the evaluation
    `res`, deltas vs `baseline` with the paired CI, and the perturbation size `pinfo`."""
    row = {**keys, **res}
    row["delta_ppl"] = res["ppl"] - baseline["ppl"]
    row["delta_nll"] = res["nll"] - baseline["nll"]
    row["delta_acc"] = res["acc"] - baseline["acc"]
    row["ppl_ratio"] = res["ppl"] / baseline["ppl"] if baseline["ppl"] else float("nan")
    row["delta_nll_lo"], row["delta_nll_hi"] = paired_ci(res, baseline)
    row["changed"] = pinfo.get("changed", 0)
    row["nonfinite_weights"] = pinfo.get("nonfinite", 0)
    for k in ("delta_w_l2", "delta_w_linf", "mean_abs_w"):
        row[k] = pinfo.get(k, float("nan"))
    for k in list(res):
        if "/" in k and k in baseline:
            row[f"delta_{k}"] = res[k] - baseline[k]
    row.update(extra or {})
    return row


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """rows -> the results.csv table: schema columns first, task columns after, per-window lists dropped."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in PER_WINDOW} for r in rows])
    if df.empty:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    # the fixed schema whatever the controls (NaN where a row has no value, e.g. match_ks without matched_k)
    return df.reindex(columns=RESULT_COLUMNS + [c for c in df.columns if c not in RESULT_COLUMNS])


# ---------------------------------------------------------------------------------------------------
# gaps: Top-K minus control, with a hierarchical bootstrap CI
# ---------------------------------------------------------------------------------------------------
def gaps(rows: list[dict], baseline: dict, n_boot: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """gap = ΔNLL(top_k) − ΔNLL(control) per (perturbation, mode, metric, K, control), with a 95% CI from a
    hierarchical bootstrap over seeds, control draws and evaluation windows (module docstring).

    Rows from several runs can be pooled (a sweep that puts each seed in its own run) as long as they share
    the evaluation windows (the same data config). Rows without per-window data give the point estimate only.
    A K past a metric's support has no Top-K at that K (`past_support`): no gap."""
    if not rows:
        return pd.DataFrame(columns=GAP_COLUMNS)
    base_n = np.asarray(baseline.get("window_tokens") or [], float)
    out = []
    by: dict[tuple, dict] = {}
    for r in rows:
        if past_support(r):
            continue
        key = (r["perturbation"], r["mode"], r["metric"], int(r["k"]))
        d = per_window_delta(r, baseline)
        by.setdefault(key, {}).setdefault(r["selection"], {}).setdefault(int(r["seed"]), []).append(
            (d, float(r["delta_nll"])))
    rng = np.random.default_rng(seed)
    for key, sels in by.items():
        if "top_k" not in sels:
            continue
        for control, per_seed in sels.items():
            if control == "top_k":
                continue
            seeds = sorted(set(per_seed) & set(sels["top_k"]))
            if not seeds:
                continue
            top = np.mean([sels["top_k"][s][0][1] for s in seeds])
            ctl = np.mean([np.mean([x[1] for x in per_seed[s]]) for s in seeds])
            lo = hi = float("nan")
            n_draws = max(len(per_seed[s]) for s in seeds)
            have_windows = all(x[0] is not None for s in seeds for x in per_seed[s] + sels["top_k"][s][:1])
            n_win = base_n.size
            if have_windows and n_win >= 2 and n_boot > 0:
                lo, hi = _bootstrap_gap([sels["top_k"][s][0][0] for s in seeds],
                                        [[x[0] for x in per_seed[s]] for s in seeds], base_n, n_boot, rng)
            out.append({"perturbation": key[0], "mode": key[1], "metric": key[2], "k": key[3], "control": control,
                        "gap_nll": float(top - ctl), "gap_nll_lo": lo, "gap_nll_hi": hi,
                        "top_delta_nll": float(top), "control_delta_nll": float(ctl), "n_seeds": len(seeds),
                        "n_draws": n_draws, "n_windows": int(n_win)})
    return pd.DataFrame(out, columns=GAP_COLUMNS)


def _bootstrap_gap(top: list[np.ndarray] | None, ctl: list[list[np.ndarray]], n: np.ndarray, n_boot: int,
                   rng: np.random.Generator) -> tuple[float, float]:
    """Percentile 95% interval of the mean over seeds s of the token-weighted mean over windows of
    (top_s − mean over draws d of ctl_s,d), resampling seeds, then draws within each resampled seed
    (independently for every pick), then windows (the same windows for every seed: they are shared).
    top=None: the interval of the mean of ctl alone (one selection's ΔNLL). Vectorized over resamples."""
    S, W = len(ctl), n.size
    if (top is not None and not all(np.all(np.isfinite(t)) for t in top)) or \
            not all(np.all(np.isfinite(c)) for cs in ctl for c in cs):
        return float("nan"), float("nan")
    T = np.stack(top).astype(float) if top is not None else np.zeros((S, W))
    nd = np.asarray([len(cs) for cs in ctl])
    D = int(nd.max())
    C = np.zeros((S, D, W))
    for s, cs in enumerate(ctl):
        C[s, : len(cs)] = np.stack(cs)
    stats = np.empty(n_boot)
    chunk = max(1, 4_000_000 // (S * D * W))
    for start in range(0, n_boot, chunk):
        B = min(chunk, n_boot - start)
        ss = rng.integers(0, S, (B, S))  # seeds
        ww = rng.integers(0, W, (B, W))  # windows
        k = nd[ss]  # draws of each picked seed
        dd = np.minimum((rng.random((B, S, D)) * k[..., None]).astype(np.int64), k[..., None] - 1)
        valid = np.arange(D)[None, None, :] < k[..., None]
        c = (C[ss[..., None], dd] * valid[..., None]).sum(2) / k[..., None]  # [B, S, W]
        diff = np.take_along_axis(T[ss] - c, np.broadcast_to(ww[:, None, :], (B, S, W)), axis=2)
        wn = n[ww]  # [B, W]
        stats[start : start + B] = ((diff * wn[:, None, :]).sum(2) / wn.sum(1)[:, None]).mean(1)
    if top is None:
        stats = -stats
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


EFFECT_COLUMNS = ["perturbation", "mode", "metric", "selection", "k", "delta_nll", "delta_nll_lo", "delta_nll_hi",
                  "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "delta_ppl", "delta_ppl_lo", "delta_ppl_hi",
                  "n_seeds", "n_draws", "n_windows"]


def effects(rows: list[dict], baseline: dict, n_boot: int = 1000, seed: int = 1) -> pd.DataFrame:
    """Mean ΔNLL per (perturbation, mode, metric, selection, K) over seeds and draws, with a 95% CI from the
    same hierarchical bootstrap as `gaps` (seeds, draws, windows); the PPL ratio and ΔPPL with the CI carried
    through their monotone maps (ratio = exp(ΔNLL), ΔPPL = PPL_base · (exp(ΔNLL) − 1)). These are the error
    bars of the Δ-vs-K figures."""
    if not rows:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    base_n = np.asarray(baseline.get("window_tokens") or [], float)
    base_ppl = float(baseline["ppl"])
    by: dict[tuple, dict] = {}
    for r in rows:
        if past_support(r):
            continue
        key = (r["perturbation"], r["mode"], r["metric"], r["selection"], int(r["k"]))
        by.setdefault(key, {}).setdefault(int(r["seed"]), []).append((per_window_delta(r, baseline), float(r["delta_nll"])))
    rng = np.random.default_rng(seed)
    out = []
    for key, per_seed in by.items():
        seeds = sorted(per_seed)
        mean = float(np.mean([np.mean([x[1] for x in per_seed[s]]) for s in seeds]))
        lo = hi = float("nan")
        if base_n.size >= 2 and all(x[0] is not None for s in seeds for x in per_seed[s]) and n_boot > 0:
            lo, hi = _bootstrap_gap(None, [[x[0] for x in per_seed[s]] for s in seeds], base_n, n_boot, rng)
        ex = lambda v: math.exp(v) if v < 700 else float("inf")  # noqa: E731
        out.append({"perturbation": key[0], "mode": key[1], "metric": key[2], "selection": key[3], "k": key[4],
                    "delta_nll": mean, "delta_nll_lo": lo, "delta_nll_hi": hi,
                    "ppl_ratio": ex(mean) if math.isfinite(mean) else mean,
                    "ppl_ratio_lo": ex(lo) if math.isfinite(lo) else lo, "ppl_ratio_hi": ex(hi) if math.isfinite(hi) else hi,
                    "delta_ppl": base_ppl * (ex(mean) - 1) if math.isfinite(mean) else mean,
                    "delta_ppl_lo": base_ppl * (ex(lo) - 1) if math.isfinite(lo) else lo,
                    "delta_ppl_hi": base_ppl * (ex(hi) - 1) if math.isfinite(hi) else hi,
                    "n_seeds": len(seeds), "n_draws": max(len(v) for v in per_seed.values()), "n_windows": int(base_n.size)})
    return pd.DataFrame(out, columns=EFFECT_COLUMNS)


# ---------------------------------------------------------------------------------------------------
# aggregates and stability
# ---------------------------------------------------------------------------------------------------
def aggregate_over_seeds(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean, sample std (ddof=1, 0 for one value) and count over seeds (and control draws) of `value` for each
    (perturbation, mode, metric, selection, k); non-finite values are dropped and counted. Top-K rows past
    their metric's support (`past_support`) are left out: the plots drawn from this show no padding."""
    keys = ["perturbation", "mode", "metric", "selection", "k"]
    if "support" in df.columns and "selection" in df.columns:
        sup = pd.to_numeric(df["support"], errors="coerce")
        df = df[~((df["selection"] == "top_k") & sup.notna() & (pd.to_numeric(df["k"]) > sup))]
    d = df[keys + ["seed", value]].copy()
    d[value] = pd.to_numeric(d[value], errors="coerce")
    finite = np.isfinite(d[value].to_numpy(dtype=float))
    d["_nonfinite"] = ~finite
    d.loc[~finite, value] = np.nan
    g = d.groupby(keys, sort=True)
    out = g[value].agg(["mean", "count"]).reset_index()
    out["std"] = g[value].std(ddof=1).fillna(0.0).to_numpy()
    out["nonfinite"] = g["_nonfinite"].sum().to_numpy()
    return out


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


# ---------------------------------------------------------------------------------------------------
# the headline: what a run's summary and stdout say
# ---------------------------------------------------------------------------------------------------
def finite_or_none(x) -> float | None:
    """float(x) when finite, else None (W&B summaries and JSON hold no NaN/inf)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def summary_metrics(results: pd.DataFrame, baseline: dict, gap: pd.DataFrame | None = None) -> dict:
    """The run summary (sortable in the W&B runs table): `baseline/<x>`; means over seeds and draws
    `delta_nll/<pert>/<mode>/<metric>/<selection>/k<K>` (same for delta_ppl, delta_acc); the gaps
    `gap_nll/<pert>/<mode>/<metric>/<control>/k<K>` with `_lo`/`_hi`; `max_delta_ppl/<metric>`;
    `headline/max_delta_ppl_<selection>`; `headline/k_to_double_ppl/<metric>` (smallest K whose Top-K mean
    PPL ratio is ≥ 2, first perturbation and mode); `headline/max_gap_nll_random_k` (the largest
    Top-K − Random-K gap whose CI excludes 0)."""
    out: dict = {}
    for k, v in baseline.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"baseline/{k}"] = finite_or_none(v)
    if results is None or results.empty:
        return out
    keys = ["perturbation", "mode", "metric", "selection", "k"]
    vals = [c for c in ("delta_ppl", "delta_nll", "delta_acc", "ppl_ratio") if c in results.columns]
    r = results[keys + vals].copy()
    for c in vals:
        r[c] = pd.to_numeric(r[c], errors="coerce")
    means = r.groupby(keys, sort=False)[vals].mean()
    for (pert, mode, metric, sel, k), row in means.iterrows():
        for c in ("delta_ppl", "delta_nll", "delta_acc"):
            if c in row:
                out[f"{c}/{pert}/{mode}/{metric}/{sel}/k{k}"] = finite_or_none(row[c])
    m = means.reset_index()
    for metric, g in m[m["selection"] == "top_k"].groupby("metric", sort=False):
        out[f"max_delta_ppl/{metric}"] = finite_or_none(g["delta_ppl"].max())
    for sel, g in m.groupby("selection", sort=False):
        out[f"headline/max_delta_ppl_{sel}"] = finite_or_none(g["delta_ppl"].max())
    if "ppl_ratio" in m.columns:
        first = m[(m["perturbation"] == m["perturbation"].iloc[0]) & (m["mode"] == m["mode"].iloc[0])
                  & (m["selection"] == "top_k")]
        for metric, g in first.groupby("metric", sort=False):
            hit = g[g["ppl_ratio"] >= 2.0]["k"]
            if len(hit):
                out[f"headline/k_to_double_ppl/{metric}"] = int(hit.min())
    if gap is not None and not gap.empty:
        for row in gap.itertuples(index=False):
            base = f"gap_nll/{row.perturbation}/{row.mode}/{row.metric}/{row.control}/k{row.k}"
            out[base] = finite_or_none(row.gap_nll)
            out[base + "_lo"] = finite_or_none(row.gap_nll_lo)
            out[base + "_hi"] = finite_or_none(row.gap_nll_hi)
        sig = gap[(gap["control"] == "random_k") & (gap["gap_nll_lo"] > 0)]
        if not sig.empty:
            out["headline/max_gap_nll_random_k"] = finite_or_none(sig["gap_nll"].max())
    return out


def summary_table(df: pd.DataFrame, gap: pd.DataFrame | None = None) -> str:
    """stdout: mean ΔNLL per metric and K, Top-K next to the controls, and the gaps with their CIs (first
    mode and perturbation)."""
    if df.empty:
        return ""
    d = df[(df["mode"] == df["mode"].iloc[0]) & (df["perturbation"] == df["perturbation"].iloc[0])]
    piv = d.groupby(["metric", "k", "selection"])["ppl"].mean().unstack("selection")
    text = (f"mean PPL over seeds and draws ({d['mode'].iloc[0]}, {d['perturbation'].iloc[0]}):\n"
            + piv.to_string(float_format=lambda x: f"{x:.3f}"))
    if gap is not None and not gap.empty:
        g = gap[(gap["mode"] == d["mode"].iloc[0]) & (gap["perturbation"] == d["perturbation"].iloc[0])]
        lines = [f"{r.metric:>16} K={r.k:<6} {r.control:<10} {r.gap_nll:+10.4f}  [{r.gap_nll_lo:+.4f}, {r.gap_nll_hi:+.4f}]"
                 for r in g.itertuples(index=False)]
        text += ("\n\nΔNLL gap, Top-K minus control (nats/token), 95% CI over seeds, draws and windows:\n"
                 + "\n".join(lines))
    return text
