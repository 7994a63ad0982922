"""Every cadence of a run in one place: what happens after step ``t``, and which steps run together.

A run of ``num_steps`` steps, after step ``t``'s update:

* **records** (``record.every_steps``): the probe set's patterns, flip rates and step sizes; a row.
* **snapshots** (``record.snapshot_every_steps``, at record steps): a mask file.
* **evals** (``eval_every_steps``): ``eval/*`` on the validation split; a row.
* **tests stability** (``stability.num_points`` log-spaced steps, :func:`log_spaced_steps`);
  a row.
* **checkpoints** (``checkpoint.every_steps``; 0: at the last step only).
* **logs** (``log_every_steps``): the rows held on device are fetched and written.
* **checks freeze** (``decouple.auto``: multiples of ``decouple.check_every_steps`` below the
  last step) or **may freeze** (that, or ``decouple.freeze_step``).

Each periodic cadence is :func:`itstime`: the multiples of its period, and the last step. Step
0 (the initial state) always has a row and a snapshot. The host needs the state at the exact
step of an eval, a stability test, a checkpoint, a possible freeze and the last step, so a
chunk of ``steps_per_call`` steps ends at each of those (:meth:`Schedule.chunk_ends`); record
and snapshot steps do not cut chunks (a chunk carries per-step :meth:`Schedule.flags`).

Pure Python (numpy only): the loop, the resume check and the completeness test
(:mod:`regime_jax.records`) all ask the same :class:`Schedule`.

>>> s = Schedule(num_steps=12, record_every=3, snapshot_every=6, eval_every=4)
>>> [t for t in range(13) if s.records(t)], s.expected_rows(), s.expected_snapshots()
([0, 3, 6, 9, 12], [0, 3, 4, 6, 8, 9, 12], [0, 6, 12])
>>> s.chunk_ends(0), list(Schedule(num_steps=12, eval_every=4, steps_per_call=4).chunks(8))
([4, 8, 12], [Chunk(first=9, length=4)])
>>> split(100, 32), split(7, 8)
([32, 32, 32, 4], [4, 2, 1])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def itstime(step: int, every: int, last: int) -> bool:
    """True on multiples of ``every`` and at the final step (every cadence's predicate).

    >>> [s for s in range(11) if itstime(s, 4, 10)], [s for s in range(11) if itstime(s, 0, 10)]
    ([0, 4, 8, 10], [10])
    """
    return step == last or (every > 0 and step % every == 0)


def log_spaced_steps(num_steps: int, num_points: int) -> frozenset[int]:
    """Step 0, ``num_steps`` and ``num_points`` log-spaced steps between (none if 0 points).

    >>> sorted(log_spaced_steps(12, 3)), log_spaced_steps(12, 0)
    ([0, 1, 3, 12], frozenset())
    """
    if num_points <= 0:
        return frozenset()
    inner = np.geomspace(1, num_steps, num_points).round().astype(int)
    return frozenset({0, num_steps, *inner.tolist()})


# ------------------------------------------------------------------------------ chunks


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Steps ``first .. first + length - 1`` in one host call."""

    first: int
    length: int

    @property
    def last(self) -> int:
        return self.first + self.length - 1

    @property
    def steps(self) -> range:
        return range(self.first, self.first + self.length)


def split(span: int, k: int) -> list[int]:
    """Chunk lengths covering ``span`` steps: ``k`` each, then the remainder's powers of two.

    So chunk lengths come from ``{k} | {1, 2, 4, ... < k}``: at most ``1 + ceil(log2 k)``
    distinct lengths, each compiled once.
    """
    rest = span % k
    return [k] * (span // k) + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def plan(start: int, ends: list[int], k: int) -> Iterator[Chunk]:
    """The chunks from ``start + 1`` to the last of ``ends`` (sorted steps > ``start``).

    Prefix-stable: the chunks after any chunk end are the chunks a run resumed there plans.

    >>> [c.length for c in plan(0, [5, 12], 4)]
    [4, 1, 4, 2, 1]
    """
    first = start + 1
    for end in ends:
        for length in split(end - first + 1, k):
            yield Chunk(first, length)
            first += length


def lengths(start: int, ends: list[int], k: int) -> set[int]:
    """The distinct chunk lengths :func:`plan` uses."""
    spans = np.diff([start, *ends])
    return {t for span in spans.tolist() for t in split(span, k)}


# ------------------------------------------------------------------------------ the schedule


def _field(config: Any, dotted: str, default: Any) -> Any:
    """``config[a][b]`` for ``"a.b"``, or ``default`` where a stored config lacks it."""
    node = config
    for key in dotted.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a run does after each step, from its config's cadences (see the module doc).

    Attributes:
      num_steps: the last step.
      record_every, snapshot_every, eval_every, log_every, checkpoint_every: the periods of
        :func:`itstime` (0: at the last step only); snapshots are taken at record steps.
      stability_points: how many log-spaced stability-test steps (0: none).
      freeze_step: the fixed freeze step F (``0 <= F < num_steps``), or None.
      freeze_every: an auto-freezing run's check period (0: not auto).
      steps_per_call: the chunk length ``K`` between two chunk ends.

    >>> s = Schedule(num_steps=30, eval_every=10, checkpoint_every=12, stability_points=3)
    >>> sorted(s.stability_steps), s.chunk_ends(0), s.chunk_ends(12)
    ([0, 1, 5, 30], [1, 5, 10, 12, 20, 24, 30], [20, 24, 30])
    >>> Schedule(num_steps=10, freeze_every=3).chunk_ends(0)
    [3, 6, 9, 10]
    """

    num_steps: int
    record_every: int = 1
    snapshot_every: int = 0
    eval_every: int = 0
    log_every: int = 0
    checkpoint_every: int = 0
    stability_points: int = 0
    freeze_step: int | None = None
    freeze_every: int = 0
    steps_per_call: int = 1

    @classmethod
    def from_config(cls, config: Any) -> Schedule:
        """The schedule of a config (a ConfigDict, or a run's stored ``config.json``).

        The fields a run's rows depend on (``num_steps``, ``record.*``, ``eval_every_steps``)
        are required (KeyError); the others take their quiet value where a ``config.json``
        from an older version lacks them (``stability.num_points`` 0, no freezing,
        ``log_every_steps`` and ``checkpoint.every_steps`` 0, ``steps_per_call`` 1).
        """
        n = int(config["num_steps"])
        rec = config["record"]
        fixed = _field(config, "decouple.freeze_step", -1)
        auto = _field(config, "decouple.auto", False) is True
        return cls(
            num_steps=n,
            record_every=rec["every_steps"],
            snapshot_every=rec["snapshot_every_steps"],
            eval_every=config["eval_every_steps"],
            log_every=_field(config, "log_every_steps", 0),
            checkpoint_every=_field(config, "checkpoint.every_steps", 0),
            stability_points=int(config.get("stability", {}).get("num_points", 0)),
            freeze_step=fixed if isinstance(fixed, int) and 0 <= fixed < n else None,
            freeze_every=_field(config, "decouple.check_every_steps", 0) if auto else 0,
            steps_per_call=_field(config, "steps_per_call", 1),
        )

    # -------------------------------------------------------------- what happens at step t

    def records(self, t: int) -> bool:
        """Step ``t`` records its patterns (a row)."""
        return itstime(t, self.record_every, self.num_steps)

    def snapshots(self, t: int) -> bool:
        """Step ``t`` writes a mask snapshot (a record step on the snapshot cadence)."""
        return self.records(t) and itstime(t, self.snapshot_every, self.num_steps)

    def evals(self, t: int) -> bool:
        """Step ``t`` is evaluated on the validation split (a row)."""
        return itstime(t, self.eval_every, self.num_steps)

    @functools.cached_property
    def stability_steps(self) -> frozenset[int]:
        """The steps of the stability test (:func:`log_spaced_steps`)."""
        return log_spaced_steps(self.num_steps, self.stability_points)

    def tests_stability(self, t: int) -> bool:
        """Step ``t`` runs the stability test (a row)."""
        return t in self.stability_steps

    def checkpoints(self, t: int) -> bool:
        """A checkpoint is saved after step ``t`` (always after the last step)."""
        return itstime(t, self.checkpoint_every, self.num_steps)

    def logs(self, t: int) -> bool:
        """Step ``t`` is on the log cadence (the held rows are fetched and written)."""
        return itstime(t, self.log_every, self.num_steps)

    def logs_within(self, chunk: Chunk) -> bool:
        """A step of ``chunk`` is on the log cadence (the host flushes after it)."""
        return any(self.logs(t) for t in chunk.steps)

    @property
    def freezes(self) -> bool:
        """The run may freeze its gates (a fixed step, or auto)."""
        return self.freeze_step is not None or self.freeze_every > 0

    def checks_freeze(self, t: int) -> bool:
        """An auto run's decision step: rows up to ``t`` decide whether it freezes after ``t``."""
        return self.freeze_every > 0 and t < self.num_steps and t % self.freeze_every == 0

    def may_freeze(self, t: int) -> bool:
        """The run could freeze after ``t`` (the fixed F, or a check step)."""
        return t == self.freeze_step or self.checks_freeze(t)

    # -------------------------------------------------------------- chunks

    def chunk_ends(self, start: int) -> list[int]:
        """Steps after ``start`` where a chunk must end: eval, stability test, checkpoint,
        possible freeze and the last step."""
        n = self.num_steps
        ends = {n, *(s for s in self.stability_steps if s > start)}
        for every in (self.eval_every, self.checkpoint_every):
            if every > 0:
                ends.update(range((start // every + 1) * every, n + 1, every))
        if self.freeze_step is not None:
            ends.update({self.freeze_step} if self.freeze_step > start else ())
        elif self.freeze_every > 0:
            every = self.freeze_every
            ends.update(range((start // every + 1) * every, n, every))
        return sorted(ends)

    def chunks(self, start: int) -> Iterator[Chunk]:
        """The chunks of the steps after ``start`` (:func:`plan` to :meth:`chunk_ends`)."""
        return plan(start, self.chunk_ends(start), self.steps_per_call)

    def chunk_lengths(self, start: int) -> set[int]:
        """The distinct lengths of :meth:`chunks` (each compiled once, before the first step)."""
        return lengths(start, self.chunk_ends(start), self.steps_per_call)

    def flags(self, chunk: Chunk) -> tuple[list[bool], list[bool]]:
        """Per step of ``chunk``: whether it records, whether it snapshots.

        >>> Schedule(num_steps=8, record_every=2, snapshot_every=4).flags(Chunk(3, 4))
        ([False, True, False, True], [False, True, False, False])
        """
        return [self.records(t) for t in chunk.steps], [self.snapshots(t) for t in chunk.steps]

    def most_snapshots(self, length: int) -> int:
        """An upper bound (>= 1) on the snapshots of a chunk of ``length`` steps."""
        if self.snapshot_every <= 0:
            return 1
        return max(1, min(length, -(-length // self.snapshot_every) + 1))

    # -------------------------------------------------------------- what a run must have

    def expected_rows(self, upto: int | None = None) -> list[int]:
        """The steps in ``0..upto`` (default: the whole run) that have a row: step 0, record
        steps, eval steps, stability-test steps and the last step."""
        top, multiples = self._multiples(upto)
        stab = (s for s in self.stability_steps if 1 <= s <= top)
        rows = {0, *multiples(self.record_every), *multiples(self.eval_every), *stab}
        return sorted(rows | self._last(top))

    def expected_snapshots(self, upto: int | None = None) -> list[int]:
        """The steps in ``0..upto`` (default: the whole run) that have a mask snapshot."""
        every, snap = self.record_every, self.snapshot_every
        both = every * snap // math.gcd(every, snap) if every > 0 and snap > 0 else 0
        top, multiples = self._multiples(upto)
        return sorted({0, *multiples(both)} | self._last(top))

    def is_complete(self, steps: Iterable[int]) -> bool:
        """Every row of the whole run is among ``steps`` (the steps of a run's rows)."""
        have = set(steps)
        return all(s in have for s in self.expected_rows())

    def _multiples(self, upto: int | None):
        # The steps of :func:`itstime` listed from the cadences, not by walking every step:
        # the cost follows the rows, not num_steps.
        n = self.num_steps
        top = min(n, n if upto is None else upto)
        return top, lambda e: range(e, top + 1, e) if e > 0 else range(0)

    def _last(self, top: int) -> set[int]:
        return {self.num_steps} if 1 <= self.num_steps <= top else set()
