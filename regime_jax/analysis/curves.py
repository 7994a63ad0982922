"""The lag ratio as curves over each decay rule's parameter: per run, over seeds, vs 3.85x.

Pure numpy (no matplotlib, no training code). :func:`run_curves` is a run's
:func:`regime_jax.analysis.timescales.lag_ratio_curves` as plain data (``summary.json``'s
``lag_ratio_curves``); :func:`aggregate_curves` gives, per parameter value, the geometric mean,
the median and the (arithmetic) mean of the lag ratio over the runs (seeds), with 95% bootstrap
CIs (:func:`regime_jax.analysis.seeds.seed_stats`); :func:`paper_ranges` says where along each
parameter the geometric mean's CI contains the paper's 3.85x.

A ratio exists at a parameter value only where both series decayed under that rule and value
(:func:`regime_jax.analysis.timescales.lag_ratio`); elsewhere it is None and the seed counts
``n`` say how many seeds remain. The ``threshold_fraction`` curve is the fraction family's
curve (the ``fraction`` rule is the same formula; ``1/e`` lies between its grid values 0.35 and
0.4).

>>> t = np.arange(3000)
>>> c = run_curves(t, np.exp(-t / 300), np.exp(-t / 100), grids={"delta": (0.05, 0.1)})
>>> [round(r, 1) for r in c["delta"]["ratios"]]
[3.0, 3.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from regime_jax import records
from regime_jax.analysis import fmt, timescales
from regime_jax.analysis.seeds import seed_stats
from regime_jax.analysis.timescales import CURVE_GRIDS, DecayConfig

PAPER_RATIO = 3.85
PARAMS: tuple[str, ...] = tuple(CURVE_GRIDS)
KEY = "lag_ratio_curves"  # the run summary's key
_STATS = (
    "geo_mean",
    "geo_ci_low",
    "geo_ci_high",
    "median",
    "mean",
    "ci_low",
    "ci_high",
    "n",
)


def run_curves(
    steps: Any,
    step_size: Any,
    flip_rate: Any,
    config: DecayConfig | None = None,
    grids: Mapping[str, Iterable[float]] | None = None,
) -> dict[str, dict[str, list]]:
    """``{parameter: {"rule", "values", "ratios"}}``; a ratio is None where none exists (NaN).

    ``rule`` is the decay rule the curve is measured under (``window``: ``config.rule``);
    ``config`` defaults to ``DecayConfig()``.
    """
    config, out = config or DecayConfig(), {}
    for param, (values, ratios) in timescales.lag_ratio_curves(
        steps, step_size, flip_rate, config, grids
    ).items():
        rule = CURVE_GRIDS[param][0] or config.rule
        out[param] = {"rule": rule, "values": values, "ratios": ratios}
    return records.jsonable(out)


def aggregate_curves(
    run_curves: Sequence[Mapping[str, Any] | None],
) -> dict[str, dict[str, Any]]:
    """Per parameter, over the runs' ``lag_ratio_curves`` (:func:`run_curves`; a summary's
    :attr:`~regime_jax.analysis.summary.RunSummary.lag_ratio_curves`): ``rule``, ``values``
    and, per value, ``geo_mean``, ``geo_ci_low``, ``geo_ci_high``, ``median``, ``mean``
    (arithmetic), ``ci_low``, ``ci_high`` (its CI; None where undefined) and ``n`` (valid
    seeds).

    Runs without curves (None: a summary written before them; a failed measurement) are left
    out; a parameter's curves must share one grid (the first run's).
    """
    out: dict[str, dict[str, Any]] = {}
    for param in PARAMS:
        curves = [(c or {}).get(param) for c in run_curves]
        curves = [c for c in curves if isinstance(c, Mapping) and "values" in c]
        if not curves:
            continue
        values = list(curves[0]["values"])
        curves = [c for c in curves if list(c["values"]) == values]
        entry: dict[str, Any] = {"rule": curves[0].get("rule"), "values": values}
        entry |= {k: [] for k in _STATS}
        for i in range(len(values)):
            st = seed_stats([c["ratios"][i] for c in curves]).to_dict()
            for k in _STATS:
                entry[k].append(st[k])
        out[param] = entry
    return records.jsonable(out)


def _ci_keys(curve: Mapping[str, Any]) -> tuple[str, str, str]:
    """The geometric mean's keys, or the mean's for a curve aggregated before them."""
    return ("geo_mean", "geo_ci_low", "geo_ci_high") if "geo_mean" in curve else _MEAN_KEYS


_MEAN_KEYS = ("mean", "ci_low", "ci_high")


def paper_ranges(curves: Mapping[str, Any], paper: float = PAPER_RATIO) -> dict[str, str]:
    """Per parameter, the values (contiguous stretches of the grid, ``a–b``) where the
    geometric-mean lag ratio's 95% CI (``geo_ci_low`` .. ``geo_ci_high``; ``ci_low`` ..
    ``ci_high`` of the mean in curves aggregated before it) contains ``paper``, else
    ``"nowhere"``; ``"no data"`` without a curve.

    >>> c = {"delta": {"values": [0.1, 0.2, 0.3, 0.4], "geo_mean": [3.5, 3.5, None, 2],
    ...      "geo_ci_low": [3, 3, None, 1], "geo_ci_high": [4, 4, None, 5]}}
    >>> paper_ranges(c)["delta"], paper_ranges(c)["window"]
    ('0.1–0.2, 0.4', 'no data')
    """
    out = {}
    for param in PARAMS:
        curve = curves.get(param)
        if not curve:
            out[param] = "no data"
            continue
        _, low, high = _ci_keys(curve)
        hit = [
            lo is not None and hi is not None and lo <= paper <= hi
            for lo, hi in zip(curve[low], curve[high], strict=True)
        ]
        stretches, start = [], None
        for i, h in enumerate([*hit, False]):
            if h and start is None:
                start = i
            elif not h and start is not None:
                a, b = curve["values"][start], curve["values"][i - 1]
                a, b = fmt.num(a, "g"), fmt.num(b, "g")
                stretches.append(a if start == i - 1 else f"{a}–{b}")
                start = None
        out[param] = ", ".join(stretches) or "nowhere"
    return out


def grid_span(param: str) -> str:
    """``lo–hi`` of the parameter's default grid, e.g. ``0.05–0.5``."""
    values = CURVE_GRIDS[param][1]
    return f"{fmt.num(min(values), 'g')}–{fmt.num(max(values), 'g')}"


def as_arrays(curve: Mapping[str, Any], statistic: str = "geo_mean") -> tuple[np.ndarray, ...]:
    """``(values, centre, low, high)`` of an aggregated curve as float arrays (None: NaN):
    the geometric mean and its CI (``statistic="mean"``: the arithmetic mean and its CI; a
    curve aggregated before the geometric mean existed gives the mean)."""
    f = lambda xs: np.asarray([math.nan if x is None else x for x in xs], dtype=float)
    keys = _MEAN_KEYS if statistic == "mean" else _ci_keys(curve)
    return tuple(f(curve[k]) for k in ("values", *keys))
