"""Decay times of recorded training series and the flip/step lag ratio.

Host-side (pure numpy) analysis of per-step series such as the activation-pattern
flip rate ``h_t`` and the weight step size ``s_t = ||theta_t - theta_{t-1}||``.
The claim under test (arXiv 2602.08333) is that ``h`` settles about 3x earlier
than ``s``; the lag ratio is ``T_s / T_h``. Statistics over seeds are in
:mod:`regime_jax.analysis.seeds`, the causal (online) settle detector in
:mod:`regime_jax.analysis.online`;
both are still importable from here.

Smoothing (:func:`smooth`): a centered moving average of odd width
``w = 2*h + 1`` with ``h = (min(window, n) - 1) // 2`` (even windows lose one
point to stay centered). In the interior ``y_i = mean(x_{i-h} .. x_{i+h})``.
Within ``h`` points of either end the straight line least-squares fitted to the
first (last) ``w`` points is evaluated at ``i`` (Savitzky-Golay order 1, which
equals the moving average in the interior), so the ends are not biased by
linear trends and are still averaged over ``w`` points. The edge line is an
extrapolation: where the series bends inside the first window (a plateau, then a
drop) it can put ``y[0]`` above every observed value, so no *level* is read off
an edge: the threshold rule's start level is a plain window mean (below).

Decay rules (``y`` = smoothed series, ``n`` points, index ``i`` -> ``steps[i]``):

* ``settle``: ``m = ceil(final_fraction * n)``; final level ``L = mean(y[n-m:])``;
  range ``R = max(y) - min(y)``. ``T = steps[k]`` with ``k`` the smallest index
  such that ``|y_j - L| <= delta * R`` for every ``j >= k``. Reported as
  ``never_settles`` if ``k >= n - m`` (it only enters the band inside the segment
  that defines ``L``) or if the level still drifts:
  ``|L - L_prev| > delta * R / 2`` with ``L_prev = mean(y[n-2m:n-m])`` (a linear
  ramp would otherwise "settle" at 85% of its length).
* ``cumsum``: ``c_k = sum_{j<=k} max(y_j, 0)``; ``T = steps[k]`` for the first ``k``
  with ``c_k >= cumsum_fraction * c_{n-1}``. ``c_{n-1} <= 0`` gives ``flat``.
  It depends on the series length and on any floor: a noisy tail around zero
  still adds positive mass after clipping and pushes ``T`` later.
* ``threshold``: start level ``I = mean(x[0:w])``, the mean of the first full
  window of raw values (:func:`start_level`; ``= y[h]``, the first smoothed value
  that is a plain average): never an extrapolation, never above ``max(x[0:w])``.
  With ``k`` the first index ``> h`` where ``y_k <= threshold_fraction * I``
  (``y_h = I`` itself is above it), ``T = steps[k - h]``: ``I`` is the level at
  the window's center, point ``h``, so the decay is counted from there, as
  ``k - h`` points after the first step (for evenly spaced steps ``T - steps[0]
  = steps[k] - steps[h]``). The final level is NOT used. Never reached, or
  ``I <= 0``, gives ``never_settles``.

Analytic answers for ``x_t = exp(-t / tau)``, ``t = 0, 1, ..`` on a long series
(the smoothed interior is ``S * x_t`` with ``S`` a constant, which cancels):
``settle`` ``tau * ln(1 / delta)``; ``cumsum`` ``tau * ln(1 / (1 - cumsum_fraction))``;
``threshold`` ``ceil(tau * ln(1 / threshold_fraction))``, whatever the window (while
the crossing lies in the interior). With the defaults all three are ``tau * ln(10)``
(tested, with the tolerances stated there). Every rule is invariant under
``x -> c * x`` for ``c > 0``; adding a constant changes ``cumsum`` and ``threshold``
(they measure decay towards zero) but not ``settle``.

Config ranges: ``window >= 1``, ``min_points >= 2``, ``delta``, ``cumsum_fraction``,
``threshold_fraction`` in (0, 1), ``final_fraction`` in (0, 0.5] (the drift check
needs ``2m <= n``).

Statuses, checked in this order: ``nonfinite`` (any NaN/inf value), ``too_short``
(``n < min_points``), ``flat`` (``R <= 1e-12 * max|y|``, scale-free), then the rule's
own ``never_settles`` / ``ok``.

Lag ratio: times are converted to elapsed durations ``T - steps[0]`` and
``ratio = (T_s - steps[0]) / (T_h - steps[0])``; a zero flip duration gives
status ``undefined`` (no inf).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

RULES: tuple[str, ...] = ("settle", "cumsum", "threshold")
STATUSES: tuple[str, ...] = ("ok", "never_settles", "flat", "too_short", "nonfinite")
_FLAT_RTOL = 1e-12


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, int)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    return obj


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (None stays None; NaN stays float NaN)."""
        return _to_jsonable(self)


def _check_int(name: str, value: Any, low: int, owner: str = "DecayConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


def _check_open(
    name: str, value: Any, low: float, high: float, closed_high: bool = False, owner: str = ""
) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    ok = ok and low < value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(
            f"{owner or 'DecayConfig'}.{name} must be a number in ({low}, {high}{bracket}, "
            f"got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class DecayConfig(_DictMixin):
    """Parameters of the decay-time rules (see module docstring for formulas)."""

    rule: str = "settle"
    window: int = 25
    delta: float = 0.1
    final_fraction: float = 0.1
    cumsum_fraction: float = 0.9
    threshold_fraction: float = 0.1
    min_points: int = 20

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"DecayConfig.rule must be one of {sorted(RULES)}, got {self.rule!r}")
        _check_int("window", self.window, 1)
        _check_int("min_points", self.min_points, 2)
        _check_open("delta", self.delta, 0.0, 1.0)
        _check_open("final_fraction", self.final_fraction, 0.0, 0.5, closed_high=True)
        _check_open("cumsum_fraction", self.cumsum_fraction, 0.0, 1.0)
        _check_open("threshold_fraction", self.threshold_fraction, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class DecayResult(_DictMixin):
    """Decay time (a value from ``steps``, not an index; None unless status is "ok")."""

    time: float | None
    status: str
    rule: str
    message: str = ""


@dataclasses.dataclass(frozen=True)
class LagResult(_DictMixin):
    """Lag ratio ``(T_s - steps[0]) / (T_h - steps[0])`` with both decay results."""

    ratio: float | None
    t_step: DecayResult
    t_flip: DecayResult
    status: str
    message: str = ""


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average with linear-fit edges; same length as the input.

    Args:
      values: 1-D array.
      window: smoothing width in steps (reduced to an odd number <= len(values)).

    Returns:
      Float array of the same length.

    >>> np.round(smooth(np.arange(5.0), 3), 12).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    n = x.size
    h = (min(int(window), n) - 1) // 2
    if h <= 0:
        return x.copy()
    w = 2 * h + 1
    c = np.concatenate([[0.0], np.cumsum(x)])
    y = np.empty(n)
    y[h : n - h] = (c[w:] - c[:-w]) / w
    u = np.arange(w) - h  # centered abscissa of the edge fit
    for seg, out, pos in ((x[:w], slice(0, h), u[:h]), (x[n - w :], slice(n - h, n), u[w - h :])):
        slope = float(np.dot(u, seg)) / float(np.dot(u, u))
        y[out] = np.mean(seg) + slope * pos
    return y


def _validate(steps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.ndim != 1 or v.ndim != 1:
        raise ValueError(f"steps and values must be 1-D, got shapes {s.shape} and {v.shape}")
    if s.size != v.size:
        raise ValueError(f"steps has length {s.size} but values has length {v.size}")
    if not np.all(np.isfinite(s)) or np.any(np.diff(s) <= 0):
        raise ValueError("steps must be finite and strictly increasing")
    return s, v


def _settle(steps: np.ndarray, y: np.ndarray, cfg: DecayConfig, rng: float) -> DecayResult:
    n = y.size
    m = max(1, math.ceil(cfg.final_fraction * n))
    level = float(np.mean(y[n - m :]))
    prev = float(np.mean(y[n - 2 * m : n - m]))
    outside = np.nonzero(np.abs(y - level) > cfg.delta * rng)[0]
    k = int(outside[-1]) + 1 if outside.size else 0
    if k >= n - m:
        msg = f"enters the +/-{cfg.delta}*range band only in the final {m} points"
        return DecayResult(None, "never_settles", "settle", msg)
    if abs(level - prev) > cfg.delta * rng / 2:
        msg = f"final level still drifting: |L - L_prev| = {abs(level - prev):.3g} > delta*R/2"
        return DecayResult(None, "never_settles", "settle", msg)
    return DecayResult(float(steps[k]), "ok", "settle")


def _cumsum(steps: np.ndarray, y: np.ndarray, cfg: DecayConfig) -> DecayResult:
    c = np.cumsum(np.clip(y, 0.0, None))
    if c[-1] <= 0:
        return DecayResult(None, "flat", "cumsum", "clipped series sums to 0")
    k = int(np.argmax(c >= cfg.cumsum_fraction * c[-1]))
    return DecayResult(float(steps[k]), "ok", "cumsum")


def start_level(values: Any, window: int) -> float:
    """The threshold rule's start level: the mean of the first full smoothing window.

    ``mean(values[0:w])`` with ``w`` the odd width :func:`smooth` uses for ``window``
    (the smoothed value at the window's center, ``h = (w - 1) // 2``). A mean of observed
    values, never an extrapolation: it lies within ``[min, max]`` of that window.

    >>> start_level([4.0, 2.0, 0.0, 0.0, 0.0], 3)
    2.0
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D series, got shape {x.shape}")
    h = (min(int(window), x.size) - 1) // 2
    return float(np.mean(x[: 2 * h + 1]))


def _threshold(steps: np.ndarray, y: np.ndarray, cfg: DecayConfig, x: np.ndarray) -> DecayResult:
    initial = start_level(x, cfg.window)
    if initial <= 0:
        msg = f"start level {initial:.3g} <= 0; threshold rule needs a positive start"
        return DecayResult(None, "never_settles", "threshold", msg)
    h = (min(cfg.window, y.size) - 1) // 2
    below = y[h + 1 :] <= cfg.threshold_fraction * initial
    if not below.any():
        msg = f"never falls below {cfg.threshold_fraction} x start level {initial:.3g}"
        return DecayResult(None, "never_settles", "threshold", msg)
    k = h + 1 + int(np.argmax(below))  # the crossing; the start level sits at point h
    return DecayResult(float(steps[k - h]), "ok", "threshold")


def decay_time(steps: Any, values: Any, config: DecayConfig = DecayConfig()) -> DecayResult:
    """Decay time of one series under ``config.rule``.

    Args:
      steps: 1-D strictly increasing step values.
      values: 1-D series of the same length.
      config: rule and parameters.

    Returns:
      DecayResult; ``time`` is a value from ``steps`` when status is "ok", else None.
      Levels are never read off the extrapolated edges of :func:`smooth`: the threshold
      rule's start level is :func:`start_level`, the mean of the first window, and its
      decay is counted from that window's center (module docstring).

    >>> t = np.arange(3000)
    >>> round(decay_time(t, np.exp(-t / 100.0)).time / 100, 1)
    2.3
    """
    s, v = _validate(steps, values)
    rule, n = config.rule, v.size
    if not np.all(np.isfinite(v)):
        bad = int(np.sum(~np.isfinite(v)))
        return DecayResult(None, "nonfinite", rule, f"{bad} of {n} values are NaN or inf")
    if n < config.min_points:
        msg = f"series of {n} points is shorter than min_points={config.min_points}; too short"
        return DecayResult(None, "too_short", rule, msg + " to judge")
    y = smooth(v, config.window)
    rng = float(np.max(y) - np.min(y))
    if rng <= _FLAT_RTOL * float(np.max(np.abs(y))):
        return DecayResult(None, "flat", rule, "smoothed series is constant (range ~ 0)")
    if rule == "settle":
        return _settle(s, y, config, rng)
    if rule == "cumsum":
        return _cumsum(s, y, config)
    return _threshold(s, y, config, v)


def decay_times_all_rules(
    steps: Any, values: Any, config: DecayConfig = DecayConfig()
) -> dict[str, DecayResult]:
    """Decay time under every rule (other parameters taken from ``config``)."""
    return {r: decay_time(steps, values, dataclasses.replace(config, rule=r)) for r in RULES}


def analyze_series(
    steps: Any, series: Mapping[str, Any], config: DecayConfig = DecayConfig()
) -> dict[str, DecayResult]:
    """Decay time of each named series, e.g. ``{"flip_rate": h, "step_size": s}``."""
    return {name: decay_time(steps, vals, config) for name, vals in series.items()}


def lag_ratio(
    steps: Any, step_size: Any, flip_rate: Any, config: DecayConfig = DecayConfig()
) -> LagResult:
    """Lag ratio of elapsed decay durations, ``(T_s - steps[0]) / (T_h - steps[0])``.

    Args:
      steps: 1-D strictly increasing step values.
      step_size: weight step-size series ``s_t``.
      flip_rate: activation-pattern flip-rate series ``h_t``.
      config: decay rule and parameters (same for both series).

    Returns:
      LagResult; ``ratio`` is None unless status is "ok". A failed series gives
      status like "flip_rate: never_settles"; a zero flip duration gives "undefined".

    >>> t = np.arange(3000)
    >>> round(lag_ratio(t, np.exp(-t / 300.0), np.exp(-t / 100.0)).ratio, 1)
    3.0
    """
    t_s = decay_time(steps, step_size, config)
    t_h = decay_time(steps, flip_rate, config)
    named = (("step_size", t_s), ("flip_rate", t_h))
    bad = [(name, r) for name, r in named if r.status != "ok"]
    if bad:
        status = "; ".join(f"{name}: {r.status}" for name, r in bad)
        message = "; ".join(f"{name}: {r.message}" for name, r in bad)
        return LagResult(None, t_s, t_h, status, message)
    first = float(np.asarray(steps, dtype=float)[0])
    d_s, d_h = t_s.time - first, t_h.time - first
    if d_h <= 0:
        msg = f"flip decay time is 0 (settles at the first step {first:g}); ratio undefined"
        return LagResult(None, t_s, t_h, "undefined", msg)
    return LagResult(d_s / d_h, t_s, t_h, "ok")


# parameter grids of lag_ratio_curves: {parameter: (rule it belongs to, default values)}
CURVE_GRIDS: dict[str, tuple[str | None, tuple[float, ...]]] = {
    "threshold_fraction": ("threshold", tuple(np.round(np.linspace(0.05, 0.5, 10), 3))),
    "delta": ("settle", tuple(np.round(np.linspace(0.02, 0.2, 10), 3))),
    "cumsum_fraction": ("cumsum", tuple(np.round(np.linspace(0.5, 0.95, 10), 3))),
    "window": (None, (10, 14, 19, 26, 36, 50, 70, 100, 141, 200)),  # None: config.rule
}


def lag_ratio_curves(
    steps: Any,
    step_size: Any,
    flip_rate: Any,
    config: DecayConfig = DecayConfig(),
    grids: Mapping[str, Iterable[float]] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The lag ratio as a function of each rule's parameter, the others taken from ``config``.

    Args:
      steps, step_size, flip_rate: as for :func:`lag_ratio`.
      config: the base rule and parameters.
      grids: ``{parameter: values}`` overriding :data:`CURVE_GRIDS` (threshold_fraction
        0.05-0.5 under the threshold rule, delta 0.02-0.2 under settle, cumsum_fraction
        0.5-0.95 under cumsum, window 10-200 under ``config.rule``); only these parameters.

    Returns:
      ``{parameter: (values, ratios)}``, float arrays of equal length; a ratio is NaN where
      :func:`lag_ratio` has no ratio (a series that does not settle at that value, ...).

    >>> t = np.arange(3000)
    >>> values, ratios = lag_ratio_curves(t, np.exp(-t / 300), np.exp(-t / 100))["delta"]
    >>> np.round(ratios[[0, -1]], 1).tolist()
    [3.0, 3.0]
    """
    chosen = {p: values for p, (_, values) in CURVE_GRIDS.items()} if grids is None else grids
    out = {}
    for param, values in chosen.items():
        if param not in CURVE_GRIDS:
            raise ValueError(f"no lag-ratio curve for {param!r}; allowed: {sorted(CURVE_GRIDS)}")
        rule = CURVE_GRIDS[param][0] or config.rule
        grid = np.asarray(list(values), dtype=int if param == "window" else float)
        ratios = np.full(grid.size, np.nan)
        for i, value in enumerate(grid.tolist()):
            cfg = dataclasses.replace(config, rule=rule, **{param: value})
            ratio = lag_ratio(steps, step_size, flip_rate, cfg).ratio
            ratios[i] = np.nan if ratio is None else ratio
        out[param] = (grid.astype(float), ratios)
    return out


# moved to their own modules; still importable from here
_MOVED = {
    "OnlineConfig": "online",
    "OnlineSettle": "online",
    "online_settle_time": "online",
    "SeedStats": "seeds",
    "seed_stats": "seeds",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"regime_jax.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'regime_jax.analysis.timescales' has no attribute {name!r}")
