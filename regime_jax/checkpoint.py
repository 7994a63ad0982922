"""Orbax save / restore of everything a resumed run needs.

A checkpoint at step ``t`` holds the whole :class:`~regime_jax.train.TrainState`: params,
optimizer state, the step counter and the packed probe patterns of the last record step (the
previous masks the next flip rate needs). Nothing else is needed for an exact resume: the
data position is the step itself (batches are a pure function of ``(seed, step)``), the
probe set is fixed by ``probe.seed``, and no step consumes randomness. Before a checkpoint is
written the host flushes every metric up to ``t``, so ``metrics.jsonl`` never lags behind
the newest checkpoint; on resume rows after ``t`` are dropped and rewritten.

Saves are synchronous (small states; a donated state cannot race a background write) and
atomic (orbax commits a step directory only when complete). A checkpoint that fails to
restore is skipped with a warning and the previous one is tried.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist."""


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, keep: int):
        self.directory = Path(workdir).absolute() / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, like: Any) -> tuple[int, Any] | None:
        """The newest checkpoint that restores into ``like``'s structure, or None if none exist.

        A broken one (truncated file, partial write) is reported and skipped; if every one is
        broken, :class:`CheckpointError` lists them.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        failures = []
        for step in reversed(self.steps()):
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as err:  # orbax/tensorstore raise many types for a bad file
                failures.append(f"step {step}: {type(err).__name__}: {str(err)[:200]}")
                logging.warning(
                    "checkpoint at step %d is unreadable (%s); trying an older one",
                    step,
                    type(err).__name__,
                )
                continue
            return step, state
        if failures:
            raise CheckpointError(
                f"no checkpoint under {self.directory} could be restored:\n  "
                + "\n  ".join(failures)
                + "\nDelete the directory or pass --config.overwrite=True to start afresh."
            )
        return None

    def close(self) -> None:
        self._manager.close()


def remove(workdir: str | Path) -> None:
    shutil.rmtree(Path(workdir) / CHECKPOINTS, ignore_errors=True)
