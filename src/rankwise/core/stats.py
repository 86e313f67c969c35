"""Student's t, for a standard error estimated from a few degrees of freedom. No scipy.

A noise estimate from one or two degrees of freedom is itself noisy: the 97.5% point of
Student's t is 12.7 at 1 df, 4.30 at 2 and 3.18 at 3, against the normal's 1.96. A test that
multiplies such a sigma by 2 claims far more than the evidence holds.

    >>> [round(t_critical(df), 2) for df in (1, 2, 3, 10, 30)]
    [12.71, 4.3, 3.18, 2.23, 2.04]
    >>> round(t_critical(math.inf), 3)
    1.96
    >>> round(welch_df([(0.01**2, 1), (0.001**2, 255)]), 2)  # the 1-df part dominates
    1.02
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["LEVEL", "t_critical", "t_cdf", "welch_df"]

# Two-sided 95%: a difference counts as real beyond t_{0.975, df} standard errors.
LEVEL = 0.975


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (regularised incomplete beta).

    >>> round(t_cdf(12.7062, 1), 4), round(t_cdf(0.0, 3), 4)
    (0.975, 0.5)
    """
    if math.isinf(df):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x > 0 else tail


@lru_cache(maxsize=512)
def t_critical(df: float, level: float = LEVEL) -> float:
    """The ``level`` quantile of Student's t at ``df`` degrees of freedom (``df`` >= 1 may be
    fractional, as Welch-Satterthwaite gives; infinity: the normal's)."""
    if df is None or df < 1:
        raise ValueError(f"t_critical needs at least 1 degree of freedom, got {df!r}")
    lo, hi = 0.0, 1000.0  # t_{0.975} is 12.7 at 1 df: 1000 is far above any level used here
    for _ in range(100):  # bisection: the cdf is increasing; 100 halvings reach 1e-27
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def welch_df(parts: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variances ``(variance, df)``: a
    variance known from many blocks barely adds uncertainty; one from one seed pair does."""
    total = sum(v for v, _ in parts)
    denom = sum(v * v / d for v, d in parts if v > 0)
    if total <= 0 or denom <= 0:
        return math.inf
    return max(1.0, total * total / denom)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta I_x(a, b) (Lentz's continued fraction, Numerical
    Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(ln + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h
