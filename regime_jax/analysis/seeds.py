"""Statistics of a per-seed quantity (a lag ratio, a decay time): mean, median, geometric
mean, each with a percentile-bootstrap CI.

Host-side numpy, deterministic (seeded bootstrap). Missing values (a run whose series did not
decay) are dropped and counted, never silently averaged in.

Lag ratios are ratios of durations: heavy-tailed across seeds (0.9-10.7 for CNN / Adam), and a
ratio and its inverse are equally far from 1. Their natural centre is the geometric mean
``exp(mean(log r))`` (the arithmetic mean of ``log r``, back-transformed), beside the median;
the arithmetic mean is kept, labelled, and is dominated by the largest seed. The three CIs
come from the same bootstrap resamples (``num_bootstrap`` draws of ``n`` values with
replacement): the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled statistic. The
geometric mean exists only when every kept value is > 0 (else NaN: a decay time or a ratio is
positive; a signed quantity such as an accuracy gap has none).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from regime_jax.analysis.timescales import _DictMixin

__all__ = ["SeedStats", "seed_stats"]


@dataclasses.dataclass(frozen=True)
class SeedStats(_DictMixin):
    """Summary of a per-seed quantity: ``mean`` (arithmetic) with its CI ``ci_low`` ..
    ``ci_high``, ``median`` with ``median_ci_low`` .. ``median_ci_high``, ``geo_mean`` with
    ``geo_ci_low`` .. ``geo_ci_high`` (NaN where a value is <= 0)."""

    values: tuple[float, ...]
    n: int
    n_dropped: int
    mean: float
    median: float
    ci_low: float
    ci_high: float
    method: str
    geo_mean: float = math.nan
    geo_ci_low: float = math.nan
    geo_ci_high: float = math.nan
    median_ci_low: float = math.nan
    median_ci_high: float = math.nan


def seed_stats(
    values: Iterable[float | None],
    confidence: float = 0.95,
    num_bootstrap: int = 2000,
    seed: int = 0,
) -> SeedStats:
    """Mean, median and geometric mean over seeds, each with a percentile-bootstrap CI.

    None and non-finite entries are dropped and counted in ``n_dropped``. The
    bootstrap uses ``np.random.default_rng(seed)`` so results are deterministic.
    n == 1 gives (nan, nan) CIs with method "none"; n == 0 gives all-nan stats.

    >>> s = seed_stats([1.0, 2.0, None, 4.0])
    >>> (s.n, s.n_dropped, round(s.mean, 3), s.median, round(s.geo_mean, 6))
    (3, 1, 2.333, 2.0, 2.0)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap!r}")
    items = list(values)
    kept = [float(v) for v in items if v is not None and math.isfinite(float(v))]
    n, dropped, nan = len(kept), len(items) - len(kept), float("nan")
    if n == 0:
        return SeedStats((), 0, dropped, nan, nan, nan, nan, "none")
    arr = np.asarray(kept)
    mean, median = float(np.mean(arr)), float(np.median(arr))
    positive = bool(np.all(arr > 0))
    geo = float(np.exp(np.mean(np.log(arr)))) if positive else nan
    if n == 1:  # the value itself (exp(log(x)) may round)
        geo = kept[0] if positive else nan
        return SeedStats(tuple(kept), 1, dropped, mean, median, nan, nan, "none", geo)
    idx = np.random.default_rng(seed).integers(0, n, size=(num_bootstrap, n))
    alpha = (1.0 - confidence) / 2.0
    q = lambda boot: tuple(float(v) for v in np.quantile(boot, [alpha, 1.0 - alpha]))
    lo, hi = q(arr[idx].mean(axis=1))
    m_lo, m_hi = q(np.median(arr[idx], axis=1))
    g_lo, g_hi = q(np.exp(np.log(arr)[idx].mean(axis=1))) if positive else (nan, nan)
    return SeedStats(
        tuple(kept), n, dropped, mean, median, lo, hi, "bootstrap", geo, g_lo, g_hi, m_lo, m_hi
    )
