"""Statistics primitives (numpy and the standard library only: a base-layer module with no package imports).

`t_quantile(p, df)`: the Student-t quantile for real (non-integer) degrees of freedom, from the regularized
incomplete beta function: P(T ≤ t) = 1 − ½ I_{df/(df+t²)}(df/2, ½) for t ≥ 0, inverted by bisection.
"""

from __future__ import annotations

import math

import numpy as np


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iters: int = 300) -> np.ndarray:
    """The continued fraction of the incomplete beta function (modified Lentz, vectorized)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
    return h


def betainc(a, b, x) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) (Numerical Recipes 6.4: the continued fraction on the side
    where it converges, the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) on the other)."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, x)))
    lg = np.vectorize(math.lgamma, otypes=[float])
    with np.errstate(divide="ignore", invalid="ignore"):
        lbt = lg(a + b) - lg(a) - lg(b) + a * np.log(x) + b * np.log1p(-x)
        bt = np.where((x > 0) & (x < 1), np.exp(lbt), 0.0)
        direct = (x < (a + 1) / (a + b + 2))
        out = np.where(direct, bt * _betacf(a, b, np.where(direct, x, 0.5)) / a,
                       1.0 - bt * _betacf(b, a, np.where(direct, 0.5, 1 - x)) / b)
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, out))


def t_cdf(t, df) -> np.ndarray:
    """P(T ≤ t) for Student's t with (real) df > 0."""
    t, df = np.broadcast_arrays(np.asarray(t, float), np.asarray(df, float))
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return np.where(t >= 0, 1 - tail, tail)


def t_quantile(p, df) -> np.ndarray | float:
    """The p-quantile of Student's t with (real) df > 0, to ~1e-10 (bisection on `t_cdf`); NaN for df ≤ 0
    or NaN. A scalar in, a float out."""
    scalar = np.ndim(p) == 0 and np.ndim(df) == 0
    p, df = np.broadcast_arrays(np.asarray(p, float), np.asarray(df, float))
    ok = np.isfinite(df) & (df > 0) & (p > 0) & (p < 1)
    q = np.where(ok, np.abs(p - 0.5) + 0.5, 0.75)
    d = np.where(ok, df, 1.0)
    lo, hi = np.zeros_like(q), np.full_like(q, 1.0)
    while True:  # bracket: double hi until the CDF passes q (df = 1 at p = 0.9999 needs ~3,200)
        short = t_cdf(hi, d) < q
        if not short.any():
            break
        hi = np.where(short, hi * 2, hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = t_cdf(mid, d) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    out = np.where(ok, np.sign(p - 0.5) * (lo + hi) / 2, np.nan)
    return float(out) if scalar else out
