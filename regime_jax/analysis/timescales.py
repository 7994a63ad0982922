"""Decay times of recorded training series and the flip/step lag ratio.

Host-side (pure numpy) analysis of per-step series such as the activation-pattern
flip rate ``h_t`` and the weight step size ``s_t = ||theta_t - theta_{t-1}||``.
The claim under test (arXiv 2602.08333) is that ``h`` settles about 3x earlier
than ``s``; the lag ratio is ``T_s / T_h``. Statistics over seeds are in
:mod:`regime_jax.analysis.seeds`, the causal (online) settle detector in
:mod:`regime_jax.analysis.online`;
both are still importable from here.

A decay time is a measurement of a decay: every rule first asks whether the series
decayed at all (the decay test below) and returns a time only if it did. A series
that stays flat, rises, barely drops or drops by less than its own noise gets a
status and no time, never a number.

Smoothing (:func:`smooth`): a centered moving average of odd width
``w = 2*h + 1`` with ``h = (min(window, n) - 1) // 2`` (even windows lose one
point to stay centered). In the interior ``y_i = mean(x_{i-h} .. x_{i+h})``.
Within ``h`` points of either end the straight line least-squares fitted to the
first (last) ``w`` points is evaluated at ``i`` (Savitzky-Golay order 1, which
equals the moving average in the interior), so the ends are not biased by
linear trends and are still averaged over ``w`` points. The edge line is an
extrapolation: where the series bends inside the first window (a plateau, then a
drop) it can put ``y[0]`` above every observed value, so no *level* is read off
an edge: start and final levels are plain means of raw values (below).

Levels and noise (:func:`decay_evidence`; ``x`` = raw series, ``n`` points):

* start level ``I = mean(x[0:w])`` (:func:`start_level`, the first full window;
  ``= y[h]``), never an extrapolation;
* ``m = ceil(final_fraction * n)``; final level ``L = mean(x[n-m:])``, the level
  before it ``L_prev = mean(x[n-2m:n-m])``;
* noise ``sigma``: the standard deviation (``n_f - 2`` degrees of freedom) of the
  last ``n_f = max(m, w)`` raw values about their least-squares line (a trend in
  the tail is not noise);
* drop ``D = I - L``, relative drop ``D / I``, and signal-to-noise ratio
  ``snr = D / (sigma * sqrt(1/w + 1/m))``: the drop over the standard error of
  the difference of a ``w``-point and an ``m``-point mean of white noise
  (``inf`` when ``sigma = 0`` and ``D > 0``);
* final drift ``L_prev - L`` (positive: the series still falls at the end).

Decay test: the series *decayed* iff ``I > 0``, ``D / I >= min_drop`` and
``snr >= min_snr`` (defaults 0.5 and 5: it ended at most half its start level, by
at least five standard errors). It *still decays* iff, in addition,
``L_prev - L > max_final_drift * D`` (default 0.02: the last ``m`` points fell by
more than 2% of the whole drop; an exponential still decays by this test when the run is
shorter than about ``3 tau``, a power law ``(1 + t / t0)^-1`` while ``t0`` is over about a
third of the run).

Decay rules (``y`` = smoothed series, index ``i`` -> ``steps[i]``):

* ``settle``: range ``R = max(y) - min(y)``; ``L_y = mean(y[n-m:])``.
  ``T = steps[k]`` with ``k`` the smallest index such that ``|y_j - L_y| <= delta * R``
  for every ``j >= k``. Reported as ``never_settles`` if ``k >= n - m`` (it only
  enters the band inside the segment that defines ``L_y``) or if the level moves:
  ``|L_y - L_prev,y| > delta * R / 2`` with ``L_prev,y = mean(y[n-2m:n-m])``.
* ``cumsum``: ``c_k = sum_{j<=k} max(y_j, 0)``; ``T = steps[k]`` for the first ``k``
  with ``c_k >= cumsum_fraction * c_{n-1}``. It depends on the series length and
  on any floor: a noisy tail above zero adds mass and pushes ``T`` later.
* ``fraction`` (the "fraction f of the start level" family, ``f = fraction``,
  default ``1/e``: then ``T`` is the time constant of an exponential): with ``k``
  the first index ``> h`` where ``y_k <= f * I`` (to a relative 1e-9, so that rounding
  does not break scale invariance; ``y_h = I`` itself is above it),
  ``T = steps[k - h]``: ``I`` is the level at the window's center, point ``h``, so
  the decay is counted from there, as ``k - h`` points after the first step (for
  evenly spaced steps ``T - steps[0] = steps[k] - steps[h]``). The final level
  is not used beyond the decay test, so ``T`` does not move with the run's end once
  the series has crossed ``f * I``. Not reached: ``still_decaying`` if the series still decays,
  else ``never_settles`` (it levels off above ``f * I``).
* ``threshold``: the same family at ``f = threshold_fraction`` (default 0.1), the
  rule's name and default before ``fraction`` existed; kept so that earlier
  summaries and curves read the same.

Statuses, checked in this order; only ``ok`` has a time:

1. ``nonfinite``: any NaN/inf value;
2. ``too_short``: ``n < min_points``;
3. ``flat``: ``R <= 1e-12 * max|y|`` (numerically constant, scale-free);
4. ``no_decay``: the decay test fails (message: relative drop and snr);
5. ``still_decaying``: the series still decays at its end; for ``settle`` and
   ``cumsum`` always (their times move with the run's end), for ``fraction`` /
   ``threshold`` only when ``f * I`` is not reached;
6. ``never_settles``: the rule's own failure above;
7. ``ok``.

Analytic answers for ``x_t = exp(-t / tau)``, ``t = 0, 1, ..`` on a long series
(the smoothed interior is ``S * x_t`` with ``S`` a constant, which cancels):
``settle`` ``tau * ln(1 / delta)``; ``cumsum`` ``tau * ln(1 / (1 - cumsum_fraction))``;
``fraction`` / ``threshold`` ``ceil(tau * ln(1 / f))``, whatever the window (while
the crossing lies in the interior): ``tau`` itself for ``fraction`` at ``1/e``. With
the defaults ``settle``, ``cumsum`` and ``threshold`` are all ``tau * ln(10)``
(tested, with the tolerances stated there). Every rule and the decay test are
invariant under ``x -> c * x`` for ``c > 0``; adding a constant changes the decay
test, ``cumsum`` and the fraction family (they measure decay towards zero).

Each time is also given as a fraction of the run, ``run_fraction = (T - steps[0]) /
(steps[-1] - steps[0])``; a lag ratio whose step-size time has ``run_fraction >
budget_fraction`` (default 0.9: the last 10% of the run) is marked ``budget_bound``:
the weights' decay time is then set by the run's length as much as by training.

Config ranges: ``window >= 1``, ``min_points >= 2``, ``delta``, ``cumsum_fraction``,
``threshold_fraction``, ``fraction``, ``max_final_drift`` in (0, 1), ``min_drop``
in [0, 1), ``min_snr >= 0``, ``final_fraction`` in (0, 0.5] (the drift checks
need ``2m <= n``), ``budget_fraction`` in (0, 1].

Lag ratio: times are converted to elapsed durations ``T - steps[0]`` and
``ratio = (T_s - steps[0]) / (T_h - steps[0])``; it exists only when both times
exist (else the status names each failed series and its status); a zero flip
duration gives status ``undefined`` (no inf).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

RULES: tuple[str, ...] = ("settle", "cumsum", "threshold", "fraction")
# in the order they are checked (module docstring), ``ok`` last
STATUSES: tuple[str, ...] = (
    "nonfinite",
    "too_short",
    "flat",
    "no_decay",
    "still_decaying",
    "never_settles",
    "ok",
)
_FLAT_RTOL = 1e-12
INV_E = math.exp(-1.0)  # the fraction rule's default: T is the time constant


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
    name: str,
    value: Any,
    low: float,
    high: float,
    closed_high: bool = False,
    owner: str = "",
    closed_low: bool = False,
) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) if ok else ok
    ok = ok and (low <= value if closed_low else low < value)
    ok = ok and (value <= high if closed_high else value < high)
    if not ok:
        left, right = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ValueError(
            f"{owner or 'DecayConfig'}.{name} must be a number in {left}{low}, {high}{right}, "
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
    fraction: float = INV_E
    min_drop: float = 0.5
    min_snr: float = 5.0
    max_final_drift: float = 0.02
    budget_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"DecayConfig.rule must be one of {sorted(RULES)}, got {self.rule!r}")
        _check_int("window", self.window, 1)
        _check_int("min_points", self.min_points, 2)
        _check_open("delta", self.delta, 0.0, 1.0)
        _check_open("final_fraction", self.final_fraction, 0.0, 0.5, closed_high=True)
        _check_open("cumsum_fraction", self.cumsum_fraction, 0.0, 1.0)
        _check_open("threshold_fraction", self.threshold_fraction, 0.0, 1.0)
        _check_open("fraction", self.fraction, 0.0, 1.0)
        _check_open("min_drop", self.min_drop, 0.0, 1.0, closed_low=True)
        _check_open("min_snr", self.min_snr, 0.0, math.inf, closed_low=True)
        _check_open("max_final_drift", self.max_final_drift, 0.0, 1.0)
        _check_open("budget_fraction", self.budget_fraction, 0.0, 1.0, closed_high=True)


@dataclasses.dataclass(frozen=True)
class DecayResult(_DictMixin):
    """Decay time (a value from ``steps``, not an index; None unless status is "ok").

    ``run_fraction``: ``(time - steps[0]) / (steps[-1] - steps[0])`` (None without a time);
    ``relative_drop`` and ``snr``: the decay test's ``D / I`` and signal-to-noise ratio
    (:func:`decay_evidence`; None where the test was not reached).
    """

    time: float | None
    status: str
    rule: str
    message: str = ""
    run_fraction: float | None = None
    relative_drop: float | None = None
    snr: float | None = None


@dataclasses.dataclass(frozen=True)
class LagResult(_DictMixin):
    """Lag ratio ``(T_s - steps[0]) / (T_h - steps[0])`` with both decay results.

    ``budget_bound``: the step-size time lies in the last ``1 - budget_fraction`` of the run
    (``t_step.run_fraction > budget_fraction``); None without a ratio.
    """

    ratio: float | None
    t_step: DecayResult
    t_flip: DecayResult
    status: str
    message: str = ""
    budget_bound: bool | None = None


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


@dataclasses.dataclass(frozen=True)
class DecayEvidence(_DictMixin):
    """The decay test's quantities (module docstring, "Levels and noise")."""

    start: float  # I
    final: float  # L
    previous: float  # L_prev
    noise: float  # sigma
    relative_drop: float  # D / I (nan when I <= 0)
    snr: float  # D / standard error (inf when sigma = 0 and D > 0)
    decayed: bool
    still_decaying: bool


def _final_points(n: int, cfg: DecayConfig) -> int:
    return max(1, math.ceil(cfg.final_fraction * n))


def decay_evidence(values: Any, config: DecayConfig = DecayConfig()) -> DecayEvidence:
    """Start and final levels, noise, drop and signal-to-noise ratio of a raw series.

    Args:
      values: 1-D finite series (raw, not smoothed), at least 2 points.
      config: ``window``, ``final_fraction``, ``min_drop``, ``min_snr``, ``max_final_drift``.

    Returns:
      DecayEvidence; ``decayed`` iff ``I > 0``, ``D / I >= min_drop`` and ``snr >= min_snr``;
      ``still_decaying`` iff ``decayed`` and ``L_prev - L > max_final_drift * D``.

    >>> e = decay_evidence(np.exp(-np.arange(1000) / 50))
    >>> e.decayed, e.still_decaying, round(e.relative_drop, 2)
    (True, False, 1.0)
    >>> decay_evidence(np.full(1000, 3.0)).decayed
    False
    """
    x = np.asarray(values, dtype=float)
    n = x.size
    if x.ndim != 1 or n < 2:
        raise ValueError(f"values must be a 1-D series of >= 2 points, got shape {x.shape}")
    h = (min(int(config.window), n) - 1) // 2
    w, m = 2 * h + 1, _final_points(n, config)
    start, final = float(np.mean(x[:w])), float(np.mean(x[n - m :]))
    previous = float(np.mean(x[max(0, n - 2 * m) : n - m])) if n > m else final
    tail = x[n - min(n, max(m, w)) :]
    u = np.arange(tail.size) - (tail.size - 1) / 2.0
    resid = tail - tail.mean() - u * (float(np.dot(u, tail)) / max(float(np.dot(u, u)), 1.0))
    noise = float(np.sqrt(np.sum(resid**2) / max(tail.size - 2, 1)))
    drop = start - final
    rel = drop / start if start > 0 else math.nan
    se = noise * math.sqrt(1.0 / w + 1.0 / m)
    snr = drop / se if se > 0 else (math.inf if drop > 0 else 0.0)
    decayed = start > 0 and rel >= config.min_drop and snr >= config.min_snr
    still = decayed and previous - final > config.max_final_drift * drop
    return DecayEvidence(start, final, previous, noise, rel, snr, decayed, still)


def _no_decay_message(e: DecayEvidence, cfg: DecayConfig) -> str:
    if not e.start > 0:
        return f"start level {e.start:.3g} <= 0: no decay towards zero to measure"
    return (
        f"no decay: level {e.start:.3g} -> {e.final:.3g}, relative drop {e.relative_drop:.3g} "
        f"(min_drop {cfg.min_drop:g}), signal/noise {e.snr:.3g} (min_snr {cfg.min_snr:g})"
    )


def _still_message(e: DecayEvidence, cfg: DecayConfig) -> str:
    drift = (e.previous - e.final) / (e.start - e.final)
    return (
        f"still decaying at the end: the last {cfg.final_fraction:g} of the run fell by "
        f"{drift:.3g} of the whole drop (max_final_drift {cfg.max_final_drift:g}); "
        "its time would move with the run's length"
    )


def _settle(steps: np.ndarray, y: np.ndarray, cfg: DecayConfig, rng: float) -> DecayResult:
    n = y.size
    m = _final_points(n, cfg)
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
    """The fraction rules' start level: the mean of the first full smoothing window.

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


def _fraction(
    steps: np.ndarray, y: np.ndarray, cfg: DecayConfig, e: DecayEvidence, rule: str
) -> DecayResult:
    f = cfg.fraction if rule == "fraction" else cfg.threshold_fraction
    h = (min(cfg.window, y.size) - 1) // 2
    # 1e-9: a crossing exactly at f * I (an exponential with tau * ln(1/f) an integer) is
    # decided the same way at every scale of the series despite rounding
    below = y[h + 1 :] <= f * e.start * (1.0 + 1e-9)
    if not below.any():
        if e.still_decaying:
            msg = f"not yet below {f:.3g} x start level {e.start:.3g}; "
            return DecayResult(None, "still_decaying", rule, msg + _still_message(e, cfg))
        msg = f"never falls below {f:.3g} x start level {e.start:.3g} (levels off above it)"
        return DecayResult(None, "never_settles", rule, msg)
    k = h + 1 + int(np.argmax(below))  # the crossing; the start level sits at point h
    return DecayResult(float(steps[k - h]), "ok", rule)


def decay_time(steps: Any, values: Any, config: DecayConfig = DecayConfig()) -> DecayResult:
    """Decay time of one series under ``config.rule``, if the series decayed.

    Args:
      steps: 1-D strictly increasing step values.
      values: 1-D series of the same length.
      config: rule and parameters.

    Returns:
      DecayResult; ``time`` is a value from ``steps`` when status is "ok", else None.
      The statuses are checked in the order of the module docstring: a series that did not
      decay by the decay test (:func:`decay_evidence`) is ``no_decay`` under every rule.
      Levels are never read off the extrapolated edges of :func:`smooth`.

    >>> t = np.arange(3000)
    >>> round(decay_time(t, np.exp(-t / 100.0)).time / 100, 1)
    2.3
    >>> decay_time(t, np.exp(-t / 100.0), DecayConfig(rule="fraction")).time
    100.0
    >>> decay_time(t, np.full(3000, 1.2e-8)).status
    'flat'
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
    e = decay_evidence(v, config)
    evidence = {"relative_drop": e.relative_drop, "snr": e.snr}
    evidence = {k: (val if math.isfinite(val) else None) for k, val in evidence.items()}
    if not e.decayed:
        return DecayResult(None, "no_decay", rule, _no_decay_message(e, config), **evidence)
    if e.still_decaying and rule in ("settle", "cumsum"):
        return DecayResult(None, "still_decaying", rule, _still_message(e, config), **evidence)
    if rule == "settle":
        out = _settle(s, y, config, rng)
    elif rule == "cumsum":
        out = _cumsum(s, y, config)
    else:
        out = _fraction(s, y, config, e, rule)
    span = float(s[-1] - s[0])
    frac = None if out.time is None else (out.time - float(s[0])) / span
    return dataclasses.replace(out, run_fraction=frac, **evidence)


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
      LagResult; ``ratio`` is None unless status is "ok", which needs both times. A failed
      series gives status like "flip_rate: no_decay"; a zero flip duration gives
      "undefined"; ``budget_bound`` marks a ratio whose step-size time lies after
      ``budget_fraction`` of the run.

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
    bound = t_s.run_fraction is not None and t_s.run_fraction > config.budget_fraction
    msg = (
        f"budget-bound: T(step) at {t_s.run_fraction:.2f} of the run "
        f"(> budget_fraction {config.budget_fraction:g})"
        if bound
        else ""
    )
    return LagResult(d_s / d_h, t_s, t_h, "ok", msg, bound)


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
        return getattr(importlib.import_module(f"regime_jax.analysis.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'regime_jax.analysis.timescales' has no attribute {name!r}")
