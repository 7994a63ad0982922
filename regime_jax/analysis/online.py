"""A causal settle detector: :class:`OnlineSettle`, fed one point at a time during training.

The online counterpart of the offline decay rules of :mod:`regime_jax.analysis.timescales`: it reads
no value after the step at which it triggers, so it can drive a decision while training runs
(freezing the activation patterns once the flip rate settles, issue 15), and
:func:`online_settle_time` runs it over a recorded series. Pure Python / numpy, no files.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from regime_jax.analysis.timescales import (
    DecayResult,
    _check_int,
    _check_open,
    _DictMixin,
    _validate,
)

__all__ = ["OnlineConfig", "OnlineSettle", "online_settle_time"]


@dataclasses.dataclass(frozen=True)
class OnlineConfig(_DictMixin):
    """Parameters of the causal settle detector :class:`OnlineSettle`.

    Attributes:
      window: trailing moving-average width (points), >= 1.
      fraction: settled once the trailing average is at most ``fraction`` x its running peak,
        in (0, 1).
      patience: ... for this many consecutive points, >= 1.
    """

    window: int = 25
    fraction: float = 0.1
    patience: int = 10

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1, owner="OnlineConfig")
        _check_open("fraction", self.fraction, 0.0, 1.0, owner="OnlineConfig")
        _check_int("patience", self.patience, 1, owner="OnlineConfig")


class OnlineSettle:
    """Causal settle detector for a decaying series (e.g. the flip rate), fed one point at a time.

    Rule: ``a_t`` = mean of the last ``window`` values (defined once ``window`` values have
    arrived: a trailing, "valid" window, never an extrapolation); ``P_t = max_{u<=t} a_u``
    (the running peak: a series that first rises is measured from its top). The detector
    triggers at the first step ``t`` at which ``a_u <= fraction * P_u`` has held for the last
    ``patience`` consecutive points. It reads no value after ``t``, so truncating the series
    after the trigger cannot move it, and it can drive a decision during training (freezing
    the patterns once they settle). On ``x_t = exp(-t / tau)`` it triggers at the first step
    ``>= (window - 1) + tau * ln(1 / fraction) + (patience - 1)``: the decay to ``fraction``
    of the start, ``tau * ln(1 / fraction)``, plus the points it must wait for (tested).

    >>> detector = OnlineSettle(OnlineConfig(window=5, fraction=0.1, patience=3))
    >>> [t for t in range(200) if detector.update(t, float(np.exp(-t / 20)))][:1]
    [53]
    """

    def __init__(self, config: OnlineConfig = OnlineConfig()):
        self.config = config
        self._recent: list[float] = []
        self._peak = -math.inf
        self._run = 0
        self.trigger: float | None = None

    def update(self, step: float, value: float) -> bool:
        """Feeds one point; True exactly once, at the step where the series has settled."""
        if self.trigger is not None:
            return False
        if not math.isfinite(value):
            raise ValueError(f"value {value!r} at step {step} is not finite")
        cfg = self.config
        self._recent = [*self._recent[-(cfg.window - 1) :], value] if cfg.window > 1 else [value]
        if len(self._recent) < cfg.window:
            return False
        avg = sum(self._recent) / cfg.window
        self._peak = max(self._peak, avg)
        self._run = self._run + 1 if self._peak > 0 and avg <= cfg.fraction * self._peak else 0
        if self._run >= cfg.patience:
            self.trigger = float(step)
            return True
        return False


def online_settle_time(
    steps: Any, values: Any, config: OnlineConfig = OnlineConfig()
) -> DecayResult:
    """:class:`OnlineSettle` run over a recorded series: the step at which it would trigger.

    >>> t = np.arange(3000)
    >>> online_settle_time(t, np.exp(-t / 100.0)).time
    264.0
    """
    s, v = _validate(steps, values)
    if not np.all(np.isfinite(v)):
        bad = int(np.sum(~np.isfinite(v)))
        return DecayResult(None, "nonfinite", "online", f"{bad} of {v.size} values are NaN or inf")
    detector = OnlineSettle(config)
    for step, value in zip(s, v, strict=True):
        if detector.update(float(step), float(value)):
            return DecayResult(detector.trigger, "ok", "online")
    msg = f"the trailing average never stayed <= {config.fraction} x its peak for {config.patience}"
    return DecayResult(None, "never_settles", "online", msg + " points")
