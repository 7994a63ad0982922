"""The lag ratio as curves over each decay rule's parameter: per run, over seeds, vs 3.85x.

Pure numpy (no matplotlib, no training code). :func:`run_curves` is a run's
:func:`regime_jax.analysis.timescales.lag_ratio_curves` as plain data (``summary.json``'s
``lag_ratio_curves``); :func:`aggregate_curves` gives, per parameter value, the mean lag ratio
over the runs (seeds) with its 95% bootstrap CI (:func:`regime_jax.analysis.seeds.seed_stats`);
:func:`paper_ranges` says where along each parameter that CI contains the paper's 3.85x.

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
_STATS = ("mean", "ci_low", "ci_high", "n")


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
    and, per value, ``mean``, ``ci_low``, ``ci_high`` (None where undefined) and ``n`` (valid
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


def paper_ranges(curves: Mapping[str, Any], paper: float = PAPER_RATIO) -> dict[str, str]:
    """Per parameter, the values (contiguous stretches of the grid, ``a–b``) where the mean lag
    ratio's 95% CI contains ``paper``, else ``"nowhere"``; ``"no data"`` without a curve.

    >>> c = {"delta": {"values": [0.1, 0.2, 0.3, 0.4], "ci_low": [3, 3, None, 1],
    ...      "ci_high": [4, 4, None, 5]}}
    >>> paper_ranges(c)["delta"], paper_ranges(c)["window"]
    ('0.1–0.2, 0.4', 'no data')
    """
    out = {}
    for param in PARAMS:
        curve = curves.get(param)
        if not curve:
            out[param] = "no data"
            continue
        hit = [
            lo is not None and hi is not None and lo <= paper <= hi
            for lo, hi in zip(curve["ci_low"], curve["ci_high"], strict=True)
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


def as_arrays(curve: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """``(values, mean, ci_low, ci_high)`` of an aggregated curve as float arrays (None: NaN)."""
    f = lambda xs: np.asarray([math.nan if x is None else x for x in xs], dtype=float)
    return tuple(f(curve[k]) for k in ("values", "mean", "ci_low", "ci_high"))
