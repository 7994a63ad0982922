"""Statistics of a per-seed quantity (a lag ratio, a decay time): mean, median, bootstrap CI.

Host-side numpy, deterministic (seeded bootstrap). Missing values (a run whose series did not
settle) are dropped and counted, never silently averaged in.
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
    """Summary of a per-seed quantity with a bootstrap CI of the mean."""

    values: tuple[float, ...]
    n: int
    n_dropped: int
    mean: float
    median: float
    ci_low: float
    ci_high: float
    method: str


def seed_stats(
    values: Iterable[float | None],
    confidence: float = 0.95,
    num_bootstrap: int = 2000,
    seed: int = 0,
) -> SeedStats:
    """Mean, median and percentile-bootstrap CI of the mean over seeds.

    None and non-finite entries are dropped and counted in ``n_dropped``. The
    bootstrap uses ``np.random.default_rng(seed)`` so results are deterministic.
    n == 1 gives a (nan, nan) CI with method "none"; n == 0 gives all-nan stats.

    >>> s = seed_stats([1.0, 2.0, None, 3.0])
    >>> (s.n, s.n_dropped, s.mean, s.median)
    (3, 1, 2.0, 2.0)
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
    if n == 1:
        return SeedStats(tuple(kept), 1, dropped, mean, median, nan, nan, "none")
    idx = np.random.default_rng(seed).integers(0, n, size=(num_bootstrap, n))
    boot = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return SeedStats(tuple(kept), n, dropped, mean, median, float(lo), float(hi), "bootstrap")
