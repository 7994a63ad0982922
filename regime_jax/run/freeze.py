"""When a run freezes its gates: the host-side policy of decoupled training (issue 15).

The jit-able gated net and its disagreement live in :mod:`regime_jax.gating`; this is the
run's decision of *when* (a fixed step, or the online settle detector at check steps), built
once per run by the loop.
"""

from __future__ import annotations

from typing import Any

from regime_jax.analysis import online


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

    A chunk of steps never straddles the freeze: :meth:`ends` are chunk boundaries.

    >>> p = FreezePolicy(freeze_step=-1, auto=True, check_every_steps=10, num_steps=100,
    ...                  online_config=online.OnlineConfig(window=2, fraction=0.5, patience=2))
    >>> p.feed([{"step": s, "flip/all": 1.0 if s < 20 else 0.1} for s in range(1, 25)])
    >>> p.trigger, [s for s in range(100) if p.due(s)][:1]
    (22.0, [30])
    """

    def __init__(
        self,
        *,
        freeze_step: int,
        auto: bool,
        check_every_steps: int,
        num_steps: int,
        online_config: online.OnlineConfig,
    ):
        self.fixed = freeze_step if 0 <= freeze_step < num_steps else None
        self.auto, self.every, self.num_steps = auto, check_every_steps, num_steps
        self.detector = online.OnlineSettle(online_config) if auto else None
        self._fed = -1  # the last step fed

    @classmethod
    def from_config(cls, config: Any) -> FreezePolicy:
        d = config.decouple
        return cls(
            freeze_step=d.freeze_step,
            auto=d.auto,
            check_every_steps=d.check_every_steps,
            num_steps=config.num_steps,
            online_config=online.OnlineConfig(**d.online),
        )

    @property
    def enabled(self) -> bool:
        """Whether the run may freeze (its state then carries room for the gates)."""
        return self.auto or self.fixed is not None

    @property
    def trigger(self) -> float | None:
        """The step at which the online detector triggered (None: not yet, or not auto)."""
        return None if self.detector is None else self.detector.trigger

    def is_check(self, step: int) -> bool:
        """An auto run's decision step: rows up to it must be fed before :meth:`due`."""
        return self.auto and step < self.num_steps and step % self.every == 0

    def ends(self, start: int) -> set[int]:
        """Steps after ``start`` at which a chunk must end so that the freeze can happen."""
        if self.fixed is not None:
            return {self.fixed} if self.fixed > start else set()
        if self.auto:
            return set(range((start // self.every + 1) * self.every, self.num_steps, self.every))
        return set()

    def feed(self, rows: Any) -> None:
        """Rows in step order (already fed ones are skipped); only ``flip/all`` is read."""
        for row in rows if self.detector is not None else ():
            if row["step"] > self._fed and "flip/all" in row:
                self.detector.update(row["step"], float(row["flip/all"]))
                self._fed = row["step"]

    def may_freeze(self, step: int) -> bool:
        """Whether the run could freeze after ``step`` (the fixed F, or a check step)."""
        return step == self.fixed or self.is_check(step)

    def due(self, step: int) -> bool:
        """Whether to freeze after ``step`` (the caller knows whether it froze already)."""
        if self.fixed is not None:
            return step == self.fixed
        return self.is_check(step) and self.trigger is not None and self.trigger <= step
