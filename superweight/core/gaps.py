"""The research answer: Top-K minus control ΔNLL gaps per (perturbation, mode, metric, K, control), and the
per-selection effects (the error bars of the Δ-vs-K figures), each with a 95% interval over seeds, control
draws and evaluation windows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .results import past_support, per_window_delta

GAP_COLUMNS = ["perturbation", "mode", "metric", "k", "control", "gap_nll", "gap_nll_lo", "gap_nll_hi",
               "top_delta_nll", "control_delta_nll", "n_seeds", "n_draws", "n_windows"]
BOOTSTRAP = 2000


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
