"""Numbers as the report writes them: one set of formatters for ``report.md``, the tables of
:mod:`regime_jax.analysis.summary` and :mod:`regime_jax.analysis.curves`, figure labels and the
sweep's progress lines. A missing number is an en dash, ``DASH``.

>>> num(3.14159), num(None), num(2.0, ".0f"), num(0.25, "g")
('3.14', '–', '2', '0.25')
>>> ci({"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75})
'0.50 [0.25, 0.75]'
>>> ci({"mean": -0.01, "ci_low": -0.02, "ci_high": 0.0}, ".3f", signed=True)
'-0.010 [-0.020, +0.000]'
>>> ci({"mean": 3.0, "ci_low": None, "ci_high": None}), ci(None), interval(1, None)
('3.00', '–', '–')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DASH", "ci", "interval", "num"]

DASH = "–"


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def num(x: float | None, spec: str = ".2f") -> str:
    """``x`` formatted with ``spec`` (:func:`format`), or ``DASH`` for None."""
    return DASH if x is None else format(x, spec)


def interval(lo: float | None, hi: float | None, spec: str = ".2f") -> str:
    """``"[lo, hi]"``, or ``DASH`` unless both ends are finite numbers."""
    return f"[{lo:{spec}}, {hi:{spec}}]" if _finite(lo) and _finite(hi) else DASH


def ci(stats: Mapping[str, Any] | None, spec: str = ".2f", signed: bool = False) -> str:
    """``"mean [ci_low, ci_high]"`` of seed statistics
    (:meth:`regime_jax.analysis.seeds.SeedStats.to_dict`), the interval only where both ends
    are finite; ``DASH`` without a finite mean. ``signed``: a sign on every number (gaps)."""
    if not stats or not _finite(stats.get("mean")):
        return DASH
    spec = ("+" if signed else "") + spec
    text = format(stats["mean"], spec)
    lo, hi = stats.get("ci_low"), stats.get("ci_high")
    return text + (f" {interval(lo, hi, spec)}" if _finite(lo) and _finite(hi) else "")
