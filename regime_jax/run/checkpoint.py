"""Orbax save / restore of everything a resumed run needs.

A checkpoint at step ``t`` holds the whole :class:`~regime_jax.run.step.TrainState`: params,
optimizer state, the step counter and the packed probe patterns of the last record step (the
previous masks the next flip rate needs), and for a model with a train mode its
:class:`~regime_jax.run.step.ModelState` (BatchNorm statistics, the RNG key data). Nothing else is
needed for an exact resume: the data position is the step itself (batches are a pure function
of ``(seed, step)``), the probe set is fixed by ``probe.seed``, and the only randomness a step
consumes, a model's dropout, is keyed by ``fold_in(rng, step)``. Before a checkpoint is
written the host flushes every metric up to ``t``, so ``metrics.jsonl`` never lags behind
the newest checkpoint; on resume rows after ``t`` are dropped and rewritten.

Saves are synchronous (small states; a donated state cannot race a background write) and
atomic (orbax commits a step directory only when complete). A checkpoint that fails to
restore (a truncated file, a missing item folder) is skipped; once an older one restores, every
newer unreadable one is moved to ``workdir/broken_checkpoints/`` with a warning naming it, so
the run can save those steps again and finish. If none restores, nothing is moved and the
error lists each checkpoint in one line. With several processes (:mod:`regime_jax.run.hosts`)
every process saves and restores (orbax's multi-host protocol) and process 0 alone moves
folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from regime_jax.run import fingerprint as fingerprints
from regime_jax.run import hosts

CHECKPOINTS = "checkpoints"
BROKEN = "broken_checkpoints"
ITEM = "default"  # the item folder CheckpointManager writes for a single StandardSave
STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step file; holds our fingerprint


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist."""


@contextlib.contextmanager
def _quiet_storage_logs():
    """orbax logs whole file contents at ERROR for a bad file; our warning says it in a line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(err: BaseException) -> str:
    text = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:160]}"


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``workdir/checkpoints``.

    With a ``fingerprint`` (:mod:`regime_jax.run.fingerprint`) each checkpoint carries it in its
    orbax metadata, with the hashes of the mask snapshots up to its step.
    """

    def __init__(self, workdir: str | Path, keep: int, fingerprint: dict | None = None):
        self.workdir = Path(workdir).absolute()
        self.fingerprint = fingerprint
        self._hashes: dict[int, str] = {}
        self.directory = self.workdir / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        with _quiet_storage_logs():  # it reads every step's metadata, broken ones too
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        with _quiet_storage_logs():
            self._manager.reload()
            return sorted(self._manager.all_steps())

    def _step_dirs(self) -> list[int]:
        """Every numbered folder, readable or not (orbax may not list a partial one)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def set_aside(self, step: int) -> Path:
        """Moves ``checkpoints/<step>`` to ``broken_checkpoints/<step>[.k]`` and returns it."""
        target = self.workdir / BROKEN / str(step)
        k = 0
        while target.exists():
            k += 1
            target = self.workdir / BROKEN / f"{step}.{k}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(self.directory / str(step), target)
        with _quiet_storage_logs():
            self._manager.reload()
        return target

    def save(self, step: int, state: Any) -> None:
        """Every process calls it (orbax writes each one's shards); process 0 moves files."""
        if hosts.is_primary() and (self.directory / str(step)).exists():  # a leftover
            moved = self.set_aside(step)
            logging.warning(
                "checkpoint folder for step %d was in the way; moved to %s", step, moved
            )
        hosts.barrier(f"regime_jax_checkpoint_{step}")  # nobody saves before it is moved
        meta = None
        if self.fingerprint is not None:
            masks = fingerprints.snapshot_hashes(self.workdir, step, self._hashes)
            meta = {fingerprints.KEY: {**self.fingerprint, "masks": masks}}
        self._manager.save(
            step, args=ocp.args.StandardSave(state), force=True, custom_metadata=meta
        )

    def metadata(self, step: int) -> dict | None:
        """The fingerprint checkpoint ``step`` carries (None: none); ValueError if unreadable."""
        path = self.directory / str(step) / STEP_METADATA
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path.name}: {err}") from None
        custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
        return (custom or {}).get(fingerprints.KEY)

    def restore_latest(
        self,
        like: Any,
        check: Callable[[dict | None], str | None] | None = None,
        below: int | None = None,
    ) -> tuple[int, Any] | None:
        """The newest checkpoint that restores into ``like``'s structure, or None if none exist.

        Each step is restored from its own folder, so a partial newer one never hides an
        intact older one; unreadable newer ones are then set aside (see the module doc). If
        every one is unreadable, :class:`CheckpointError` lists them, one line each.
        ``check(fingerprint)`` says why a checkpoint is not this run's (None: it is): such a
        checkpoint is refused (CheckpointError), never set aside or skipped. ``below``: only
        steps under it are considered.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        failures = []
        reader = ocp.StandardCheckpointer()
        try:
            for step in reversed(self._step_dirs()):
                if below is not None and step >= below:
                    continue
                if check is not None:
                    try:
                        meta = self.metadata(step)
                    except ValueError as err:
                        failures.append((step, _one_line(err)))
                        continue
                    why = check(meta)
                    if why:
                        raise CheckpointError(
                            f"checkpoint {self.directory / str(step)} is not this run's: {why}; "
                            f"refusing to resume. {fingerprints.OUT}"
                        )
                try:
                    with _quiet_storage_logs():
                        state = reader.restore(self.directory / str(step) / ITEM, abstract)
                except Exception as err:  # orbax/tensorstore raise many types for a bad file
                    failures.append((step, _one_line(err)))
                    continue
                for bad, why in failures if hosts.is_primary() else ():
                    moved = self.set_aside(bad)
                    logging.warning(
                        "checkpoint at step %d is unreadable (%s); moved to %s; resuming from "
                        "step %d",
                        bad,
                        why,
                        moved,
                        step,
                    )
                return step, state
        finally:
            reader.close()
        if failures:
            raise CheckpointError(
                f"no checkpoint under {self.directory} could be restored:\n"
                + "".join(f"  step {step}: {why}\n" for step, why in failures)
                + "Pass --config.overwrite=True to start afresh (or move the folder away)."
            )
        return None

    def close(self) -> None:
        self._manager.close()


def remove(workdir: str | Path) -> None:
    shutil.rmtree(Path(workdir) / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(Path(workdir) / BROKEN, ignore_errors=True)
