"""When a run freezes its gates: the host-side policy of decoupled training (issue 15).

The jit-able gated net and its disagreement live in :mod:`regime_jax.gating`; the steps at
which a run may freeze are its :class:`~regime_jax.schedule.Schedule`'s; this is the run's
decision of *whether* (a fixed step, or the online settle detector at check steps), built once
per run by the loop.
"""

from __future__ import annotations

from typing import Any

from regime_jax.analysis import online
from regime_jax.schedule import Schedule


class FreezePolicy:
    """When a run freezes its gates (config ``decouple.*``); host-side, pure Python.

    * ``freeze_step = F`` (``0 <= F < num_steps``): after step F's update (F = 0: before the
      first step). ``F >= num_steps`` never freezes: the run is an ordinary one.
    * ``auto``: the online settle detector (:class:`regime_jax.analysis.online.OnlineSettle`,
      causal)
      is fed ``flip/all`` of every recorded row in step order; the run freezes at the first
      *check step* (a multiple of ``check_every_steps`` below ``num_steps``) at which the
      detector has triggered. The decision reads only rows up to the check step, so it does
      not depend on the log cadence, ``steps_per_call`` or where a run was interrupted: a
      resumed run feeds the detector the rows it already wrote.

    A chunk of steps never straddles the freeze: the schedule's chunk ends include the steps
    at which the run may freeze.

    >>> schedule = Schedule(num_steps=100, freeze_every=10)
    >>> p = FreezePolicy(schedule, online.OnlineConfig(window=2, fraction=0.5, patience=2))
    >>> p.feed([{"step": s, "flip/all": 1.0 if s < 20 else 0.1} for s in range(1, 25)])
    >>> p.trigger, [s for s in range(100) if p.due(s)][:1]
    (22.0, [30])
    """

    def __init__(self, schedule: Schedule, online_config: online.OnlineConfig | None = None):
        self.schedule = schedule
        self.detector = online.OnlineSettle(online_config) if self.auto else None
        self._fed = -1  # the last step fed

    @classmethod
    def from_config(cls, config: Any, schedule: Schedule | None = None) -> FreezePolicy:
        """The policy of ``config.decouple`` (``schedule``: the run's, else built here)."""
        schedule = schedule or Schedule.from_config(config)
        return cls(schedule, online.OnlineConfig(**config.decouple.online))

    @property
    def auto(self) -> bool:
        """The online detector decides (at the schedule's check steps)."""
        return self.schedule.freeze_every > 0

    @property
    def trigger(self) -> float | None:
        """The step at which the online detector triggered (None: not yet, or not auto)."""
        return None if self.detector is None else self.detector.trigger

    def is_check(self, step: int) -> bool:
        """An auto run's decision step: rows up to it must be fed before :meth:`due`."""
        return self.schedule.checks_freeze(step)

    def feed(self, rows: Any) -> None:
        """Rows in step order (already fed ones are skipped); only ``flip/all`` is read."""
        for row in rows if self.detector is not None else ():
            if row["step"] > self._fed and "flip/all" in row:
                self.detector.update(row["step"], float(row["flip/all"]))
                self._fed = row["step"]

    def due(self, step: int) -> bool:
        """Whether to freeze after ``step`` (the caller knows whether it froze already)."""
        fixed = self.schedule.freeze_step
        if fixed is not None:
            return step == fixed
        return self.is_check(step) and self.trigger is not None and self.trigger <= step
