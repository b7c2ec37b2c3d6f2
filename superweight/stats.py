"""Statistics primitives (numpy and the standard library only: a base-layer module with no package imports).

`t_quantile(p, df)`: the Student-t quantile for real (non-integer) degrees of freedom, from the regularized
incomplete beta function: P(T ≤ t) = 1 − ½ I_{df/(df+t²)}(df/2, ½) for t ≥ 0, inverted by bisection.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (Numerical Recipes 6.4: the continued fraction, modified Lentz,
    on the side where it converges fast; I_x(a, b) = 1 − I_{1−x}(b, a) on the other)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny = 1e-300
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with (real) df > 0."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with (real) df > 0, to ~1e-12 (bisection on `t_cdf`); NaN for df ≤ 0,
    NaN df or p outside (0, 1)."""
    if not (math.isfinite(df) and df > 0 and 0 < p < 1):
        return float("nan")
    q = abs(p - 0.5) + 0.5
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:  # bracket (df = 1 at p = 0.9999 needs ~3,200)
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-13 * hi:
            break
    return math.copysign((lo + hi) / 2, p - 0.5)


# ---------------------------------------------------------------------------------------------------
# the Top-K minus control gap and its interval
# ---------------------------------------------------------------------------------------------------
CONDITIONAL = {0: "", 1: "calibration seed", 2: "calibration seed and control draw"}


def conditional_on(n_seeds: int, n_draws: int) -> str:
    """What a gap interval is conditional on: "" (nothing: seeds, draws and windows all vary) with ≥ 2 seeds;
    "calibration seed" with one seed and ≥ 2 draws (the Top-K set is fixed, so the seed-to-seed variance of
    the gap is not in the interval); "calibration seed and control draw" with one of each (windows only)."""
    if n_seeds >= 2:
        return CONDITIONAL[0]
    return CONDITIONAL[1] if n_draws >= 2 else CONDITIONAL[2]


def gap_components(top: np.ndarray, controls: np.ndarray, tokens: np.ndarray):
    """Batched core of `gap_interval`: top [..., S, W], controls [..., S, D, W] (NaN where a seed has fewer
    draws), tokens [W] -> (gap [...], V_unit [...], V_win [...], U units, W windows).

    u_s = Σ_w n_w (top_sw − c̄_sw) / N is the gap of seed s (c̄_sw: the mean over its draws), gap = mean_s u_s.
    With S ≥ 2 seeds the units are seeds; with one seed they are its D draws (u_d = Σ_w n_w (top_w − c_dw) / N,
    conditional on the seed); with one of each there is one unit and V_unit = 0.
      V_unit = var(u) / U                          (between-unit spread: seed noise, and draw noise within it)
      V_win  = W/(W−1) Σ_w (n_w/N)² (x̄_w − gap)²    (x̄_w: window w's gap averaged over the units)
    The windows are shared by every unit, so V_unit misses the window component; V_win adds it. Each term also
    holds the unit × window residual once, so V_unit + V_win overstates Var(gap) by residual / (U·W)."""
    top = np.asarray(top, float)
    ctl = np.asarray(controls, float)
    n = np.asarray(tokens, float)
    N, W = n.sum(), n.size
    if top.shape[-2] >= 2:
        x = top - np.nanmean(ctl, axis=-2)  # [..., S, W]
    else:
        x = top[..., 0, None, :] - ctl[..., 0, :, :]  # one seed: its draws are the units [..., D, W]
    U = x.shape[-2]
    u = (x * n).sum(-1) / N  # [..., U]
    gap = u.mean(-1)
    xw = x.mean(-2)  # [..., W]
    v_win = W / (W - 1) * (((n / N) ** 2) * (xw - gap[..., None]) ** 2).sum(-1)
    v_unit = u.var(-1, ddof=1) / U if U >= 2 else np.zeros_like(gap)
    return gap, v_unit, v_win, U, W


def gap_intervals(top, controls, tokens, level: float = 0.95):
    """`gap_interval` for a batch: top [..., S, W], controls [..., S, D, W] -> (gap, lo, hi), each [...].

    half-width = (V_unit · t_{U−1} + V_win · t_{W−1}) / √(V_unit + V_win), t_m the (1 + level)/2 quantile of
    Student's t with m df (Cochran-Cox: each variance component carries the quantile of its own degrees of
    freedom; with one unit, t_{W−1} √V_win, the paired t-interval over windows). Welch-Satterthwaite df were
    tried and rejected: with 2-3 seeds an underestimated seed component inflates the df and the interval
    undercovers (0.91 at 2 seeds × 2 draws × 8 windows in the simulation of tests/test_stats.py)."""
    gap, vu, vw, U, W = gap_components(top, controls, tokens)
    p = (1 + level) / 2
    tu = t_quantile(p, U - 1) if U >= 2 else 0.0
    tw = t_quantile(p, W - 1)
    V = vu + vw
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(V > 0, (vu * tu + vw * tw) / np.sqrt(V), 0.0)
    return gap, gap - half, gap + half


def gap_interval(top, controls, tokens, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The level (default 95%) interval of the gap ΔNLL(Top-K) − ΔNLL(control), the research answer.

    top[s][w]: the per-window ΔNLL of the Top-K selection of calibration seed s; controls[s][d][w]: the same
    for draw d of the control (seeds may have different numbers of draws); tokens[w]: the scored tokens of
    window w. The gap is the mean over seeds of the token-weighted mean over windows of (top − mean over
    draws of the control); its interval combines two variance components (`gap_components`): the between-seed spread of the
    per-seed gaps, which carries the draw noise, and a window component from the per-window differences, each
    with the t quantile of its own degrees of freedom (`gap_intervals`). With one seed the interval is conditional on it (and on
    the draw with one draw): see `conditional_on`, which callers report next to it. Non-finite input or
    fewer than 2 windows: (nan, nan).

    The interval is closed-form: it depends on this gap's data alone (no resampling, no random stream shared
    with other gaps), so `seed` does not change it; it is part of the published signature (issue 18)."""
    W = len(tokens)
    S = len(top)
    if S == 0 or W < 2 or len(controls) != S or any(len(c) == 0 for c in controls):
        return float("nan"), float("nan")
    D = max(len(c) for c in controls)
    C = np.full((S, D, W), np.nan)
    try:
        T = np.asarray(top, float).reshape(S, W)
        for s, cs in enumerate(controls):
            C[s, : len(cs)] = np.asarray(cs, float).reshape(len(cs), W)
    except ValueError:
        return float("nan"), float("nan")
    n = np.asarray(tokens, float)
    if not (np.all(np.isfinite(T)) and np.all(np.isfinite(n)) and n.sum() > 0
            and all(np.all(np.isfinite(C[s, : len(cs)])) for s, cs in enumerate(controls))):
        return float("nan"), float("nan")
    _, lo, hi = gap_intervals(T, C, n, level)
    return float(lo), float(hi)
