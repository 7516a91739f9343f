"""The statistics of a sweep with repeated seeds: Student-t intervals and the critical batch size fit.

Pure functions on floats (no numpy, no scipy), so the verdict does not depend on optional packages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "t_quantile", "mean_interval", "CriticalBatch", "fit_critical_batch"]

CONFIDENCE = 0.95


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer `df` (Abramowitz & Stegun 26.7.3-4: a finite series)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi)·(theta + sin·cos·(1 + 2/3 cos^2 + 2·4/(3·5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin·(1 + 1/2 cos^2 + 1·3/(2·4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """t such that P(|T| <= t) = confidence for `df` degrees of freedom (bisection on the exact CDF)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_two_sided_mass(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """mean ± half_width: the 95 % t-interval of the mean of n values (half_width None when n < 2)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The sample mean and its Student-t interval: mean ± t_{n-1}·s/√n (s: sample standard deviation)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, 1)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(n - 1, confidence) * s / math.sqrt(n), n)


@dataclass(frozen=True)
class CriticalBatch:
    """S(B) = S_min·(1 + B_crit / B) fitted to steps-to-target (McCandlish et al. 2018, eq. 2.11)."""

    min_steps: float
    """S_min: steps to the target with an infinitely large batch."""
    critical_batch_size: float
    """B_crit: the batch at which S is twice S_min, the turning point between perfect and no scaling."""
    points: int


def fit_critical_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> CriticalBatch | None:
    """Linear least squares of S = a + c·(1/B), so S_min = a and B_crit = c / a; each point weighted by 1/S²,
    since the spread of a step count grows with the count (relative errors). None with fewer than 3 batch
    sizes or a fit that is not physical (S_min or B_crit not positive)."""
    if len(batch_sizes) != len(steps):
        raise ValueError(f"{len(batch_sizes)} batch sizes but {len(steps)} step counts")
    if len(set(batch_sizes)) < 3 or any(s <= 0 for s in steps):
        return None
    xs, ws = [1.0 / b for b in batch_sizes], [1.0 / s**2 for s in steps]
    total = math.fsum(ws)
    mx = math.fsum(w * x for w, x in zip(ws, xs, strict=True)) / total
    my = math.fsum(w * y for w, y in zip(ws, steps, strict=True)) / total
    sxx = math.fsum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    sxy = math.fsum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, steps, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    if intercept <= 0 or slope <= 0:
        return None
    return CriticalBatch(intercept, slope / intercept, len(xs))
