"""One writer per workdir, and whether an earlier run there may be continued.

:func:`lock` takes ``workdir/.lock`` with ``fcntl.flock`` before anything is written and
writes the holder's PID into it. The kernel drops the lock when the process dies, however it
dies (``kill -9`` included), so a stale lock never blocks a resume; a second process on a
live workdir gets :class:`WorkdirBusy` naming the holder and touches nothing.
:func:`open_run` decides between a fresh start and a resume: the stored config must match in
every field that changes results. Raising ``num_steps`` continues a run only where nothing
already recorded depends on ``num_steps`` (see :func:`cannot_extend`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from regime_jax import records
from regime_jax.configs.base import ADDED_FIELDS, ConfigError
from regime_jax.run import checkpoint, fingerprint

LOCK = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


def _holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its PID right after locking
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return f"process {text}"
        time.sleep(0.01)
    return "another process"


_HELD: dict[str, int] = {}  # lock files this process holds, with their nesting depth


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds ``workdir/.lock`` (creating ``workdir``) for the duration of the block.

    Never waits: a lock held by another process raises :class:`WorkdirBusy` at once. Within
    one process the lock nests (a sweep holds a run's lock while it decides whether to train
    it, then trains it under the same lock).
    """
    workdir = Path(workdir)
    key = os.path.realpath(workdir / LOCK)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise records.UnwritableWorkdir(
            f"workdir={str(workdir)!r} cannot be written: {err}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(
                f"workdir={str(workdir)!r} is in use by {_holder(fd)} (lock file "
                f"{workdir / LOCK}); wait for it to finish, stop it, or use another workdir"
            ) from None
        except OSError as err:  # a file system without flock: run, but say so
            logging.warning("cannot lock %s (%s); nothing stops a second writer", workdir, err)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _stored_config(workdir: Path) -> dict[str, Any]:
    path = workdir / records.CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise records.RecordError(
            f"{path} is missing or unreadable ({type(err).__name__}), but {workdir} holds a run; "
            f"refusing to resume: pass --config.overwrite=True to delete the run and start afresh"
        ) from None


def cannot_extend(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> str | None:
    """Why a run of ``stored`` cannot continue to ``requested["num_steps"]`` (None: it can).

    A longer run is the same run continued only if nothing recorded so far depends on
    ``num_steps``: a constant (or warmup + constant) learning rate, no stability-probe steps
    (log-spaced over ``num_steps``), and a last step that is a record step of the longer run
    (its masks are the ones the next flip rate compares against).
    """
    old, new = stored["num_steps"], requested["num_steps"]
    if new < old:
        return f"it is below the run's num_steps={old}"
    if requested["optimizer"]["schedule"] != "constant":
        return f"optimizer.schedule={requested['optimizer']['schedule']!r} decays over num_steps"
    if requested.get("stability", {}).get("num_points", 0):
        return "stability.num_points > 0 places the probe steps by num_steps"
    every = requested["record"]["every_steps"]
    if old % every:
        return f"the run's last step {old} is not a multiple of record.every_steps={every}"
    return None


def holds_run(workdir: Path) -> bool:
    """Whether ``workdir`` holds a run's records or checkpoints.

    An empty ``checkpoints/`` is no run: a fresh start killed after creating it and before
    writing ``config.json`` leaves just that (and the lock), and the same command must then
    start afresh, not refuse to resume a run that never wrote anything.
    """
    ckpt = workdir / checkpoint.CHECKPOINTS
    return records.has_run(workdir) or (
        ckpt.exists() and (not ckpt.is_dir() or any(ckpt.iterdir()))
    )


def open_run(
    config: Mapping[str, Any],
    workdir: str | os.PathLike,
    ignores: Iterable[str],
    current: Mapping[str, Any] | None = None,
) -> bool:
    """Prepares a locked ``workdir``; True if an earlier run there should be resumed.

    ``current`` is this run's fingerprint (:mod:`regime_jax.run.fingerprint`): a run that has
    ``fingerprint.json`` is compared against it (config fields and data), and its
    ``config.json`` against it too (a hand edit is refused); a run from before fingerprints
    is compared by ``config.json``. Raises ConfigError if the run differs in a field that
    changes results (or in ``num_steps`` where the run cannot be extended), RecordError if
    the stored config or fingerprint is unreadable. Writes nothing except with
    ``overwrite``, which deletes the earlier run.
    """
    workdir = records.ensure_writable(workdir)
    existing = holds_run(workdir)
    if existing and config["overwrite"]:
        records.reset(workdir)
        checkpoint.remove(workdir)
        shutil.rmtree(workdir / fingerprint.BROKEN_MASKS, ignore_errors=True)
        return False
    if not existing:
        return False
    stored = _stored_config(workdir)
    recorded = fingerprint.read(workdir)
    if recorded is not None:
        edited = [
            f for f in records.config_diff(recorded["config"], stored, ignores) if f != "num_steps"
        ]
        if edited:
            mine = fingerprint.make(stored, None, ignores)
            raise ConfigError(
                f"{workdir / records.CONFIG} was edited: it differs from the fingerprint "
                f"recorded when the run was created ({fingerprint.FILE}) in "
                f"{fingerprint.describe(edited, recorded, mine)}; refusing to resume. "
                f"{fingerprint.OUT}"
            )
    if recorded is not None and current is not None:
        diff = [f for f in fingerprint.diff(recorded, current) if f != "num_steps"]
        if stored.get("num_steps") != config["num_steps"]:
            diff = sorted([*diff, "num_steps"])
        shown = lambda: fingerprint.describe(diff, recorded, current)
    else:
        diff = records.config_diff(stored, config, ignores, ADDED_FIELDS)
        shown = lambda: str(diff)
    if diff == ["num_steps"]:
        why = cannot_extend(stored, config)
        if why:
            raise ConfigError(
                f"num_steps={config['num_steps']} differs from the run in {str(workdir)!r} "
                f"(num_steps={stored['num_steps']}) and the run cannot be extended: {why}. "
                f"Use another workdir or --config.overwrite=True."
            )
        print(f"extending {workdir} from num_steps={stored['num_steps']}", flush=True)
    elif diff:
        raise ConfigError(
            f"workdir={str(workdir)!r} holds a run whose config differs in {shown()}; "
            f"refusing to resume. Use another workdir or --config.overwrite=True."
        )
    return True


def checkpoint_mismatch(
    meta: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    config: Mapping[str, Any],
    strict: bool,
) -> str | None:
    """Why a checkpoint whose metadata fingerprint is ``meta`` is not this run's (None: it is).

    A checkpoint may differ only in ``num_steps``, where the run may be extended from it.
    ``strict`` (the run has ``fingerprint.json``): one without a fingerprint is refused.
    """
    if meta is None:
        return (
            "it carries no fingerprint (another program or a run of another workdir)"
            if strict
            else None
        )
    diff = fingerprint.diff(meta, current)
    if "num_steps" in diff:
        why = cannot_extend(meta["config"], config) if diff == ["num_steps"] else "it differs"
        if why is None:
            diff = []
    if not diff:
        return None
    return f"it was written by a run that differs in {fingerprint.describe(diff, meta, current)}"
