"""The lag map: where the lag ratio T(step) / T(flip) appears, one factor at a time.

A lag-map sweep (``regime_jax/configs/lag_map.py``) changes one thing at a time around a base
setting. Each setting of its grid (``sweep.json``) carries ``axis`` and ``value``: the axis it
lies on and its value there, or, for the base setting that lies on every axis, lists of both.
The sweep's optional ``axes`` (``{axis: [values]}``) gives each axis's values in plot order
(else the order of the settings; on the optimizer axis, of the columns). On the axis
:data:`OPTIMIZER_AXIS` the points are the optimizer columns the setting runs: ``x`` is the
optimizer, on one line (``value`` unused).

Each point holds the headline statistic of its (setting, optimizer) group, as the report's
tables compute it (:func:`regime_jax.analysis.summary.aggregate`): the geometric mean of the
per-seed lag ratios (abs step) under :data:`~regime_jax.analysis.summary.HEADLINE_RULE` with
its 95% bootstrap CI, how many seeds gave a ratio, and why the others gave none (their lag
status, or "not finished" for runs of the grid without a summary). A (setting, optimizer) pair
the grid does not run (``optimizers_only``) is no point.

>>> placements({"axis": ["width", "depth"], "value": [256, 2]})
[('width', 256), ('depth', 2)]
>>> placements({"name": "x"})
[]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from regime_jax.analysis.summary import HEADLINE_RULE, RunSummary, Sweep, group_lag, stat_view

__all__ = ["ALL", "NOT_FINISHED", "OPTIMIZER_AXIS", "lag_map", "placements"]

OPTIMIZER_AXIS = "optimizer"  # its points are optimizer columns, on one line
ALL = "all"  # the line of the optimizer axis
NOT_FINISHED = "not finished"  # a run of the grid with no usable summary


def placements(setting: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(axis, value)`` of each axis ``setting`` lies on (none without an ``axis``)."""
    axis, value = setting.get("axis"), setting.get("value")
    if axis is None:
        return []
    if isinstance(axis, list | tuple):
        if not isinstance(value, list | tuple) or len(value) != len(axis):
            raise ValueError(
                f"setting {setting.get('name')!r}: axis {list(axis)} needs a value list of the "
                f"same length, got {value!r}"
            )
        return list(zip(axis, value, strict=True))
    return [(axis, value)]


def _order(values: list[Any], given: list[Any] | None) -> list[Any]:
    """``values`` without repeats, in ``given``'s order first (the rest as they came)."""
    seen = list(dict.fromkeys(values))
    if not given:
        return seen
    ranked = [v for v in given if v in seen]
    return ranked + [v for v in seen if v not in ranked]


def _point(sweep: Sweep, setting: str, opt: str, expected: int) -> dict[str, Any]:
    members = sweep.members.get((setting, opt), [])
    agg = sweep.groups.get((setting, opt))
    stats = group_lag(agg, "abs", HEADLINE_RULE) if agg else {}
    why: Counter[str] = Counter()
    for summary, _ in members:
        lag = RunSummary.of(summary).lag("abs", HEADLINE_RULE)
        if lag.ratio is None:
            why[lag.status or "no lag ratio"] += 1
    if expected > len(members):
        why[NOT_FINISHED] += expected - len(members)
    return {
        "setting": setting,
        "optimizer": opt,
        "n": int(stats.get("n", 0)),
        "runs": max(expected, len(members)),
        "why_none": dict(sorted(why.items())),
        **stat_view(stats, "geo_mean"),
    }


def lag_map(sweep: Sweep, grid: Mapping[str, Any]) -> dict[str, Any]:
    """The lag map of a summarized sweep, from its grid (``sweep.json``'s content).

    Returns:
      ``{axis: {"values": [x in plot order], "lines": [line names], "points": [point]}}``
      in the order axes first appear in the settings; a point is ``{"x", "line", "value",
      "setting", "optimizer", "n" (seeds with a ratio), "runs" (the grid's runs of the
      group), "why_none" ({reason: seeds}), "mean", "ci_low", "ci_high"}`` (the geometric
      mean and its CI; None where no seed gave a ratio). ``{}`` when no setting has an axis.
    """
    spec = grid.get("sweep") or {}
    columns = list(spec.get("optimizers") or {})
    order = spec.get("axes") or {}
    expected = Counter((r["setting"], r["optimizer"]) for r in grid.get("runs") or ())
    for setting, opt in sweep.members:
        expected.setdefault((setting, opt), 0)
    pairs = {}  # setting -> its optimizer columns, in column order
    for setting, opt in expected:
        pairs.setdefault(setting, []).append(opt)
    rank = {o: i for i, o in enumerate(columns)}
    out: dict[str, Any] = {}
    for setting in spec.get("settings") or ():
        name = setting.get("name")
        opts = sorted(pairs.get(name, []), key=lambda o: (rank.get(o, len(rank)), o))
        for axis, value in placements(setting):
            entry = out.setdefault(axis, {"values": [], "lines": [], "points": []})
            for opt in opts:
                point = _point(sweep, name, opt, expected[name, opt])
                x, line = (opt, ALL) if axis == OPTIMIZER_AXIS else (value, opt)
                entry["points"].append({"x": x, "line": line, "value": value} | point)
    for axis, entry in out.items():
        xs = [p["x"] for p in entry["points"]]
        given = order.get(axis) or (columns if axis == OPTIMIZER_AXIS else None)
        entry["values"] = _order(xs, given)
        lines = [p["line"] for p in entry["points"]]
        entry["lines"] = _order(lines, columns)
        at = {x: i for i, x in enumerate(entry["values"])}
        entry["points"].sort(key=lambda p: at[p["x"]])
    return out
