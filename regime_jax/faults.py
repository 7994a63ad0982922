"""Faults of the machine, not of the command: a full disk, a vanished workdir, lost permission.

Each is reported by the programs (``main``, ``sweep``, ``report``) in one line that names the
fault, the file, and what was kept, and ends the program with its own exit code:

====  ==================================================================================
code  fault
====  ==================================================================================
3     disk full or quota exceeded (``ENOSPC``, ``EDQUOT``, orbax's ``RESOURCE_EXHAUSTED``)
4     the workdir, or a file in it, vanished (``ENOENT``, ``ESTALE``, ``ENOTDIR``)
5     write permission lost (``EACCES``, ``EPERM``, ``EROFS``)
6     any other I/O error (``EIO``, ...)
====  ==================================================================================

A fault can arrive as an ``OSError`` or wrapped by a library: orbax (through tensorstore)
raises ``ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")`` from a writer thread.
:func:`classify` reads both, along the exception's cause and context chain.

Records are written so that a kill at any instant is resumable (README, "Resuming and
failures"); a fault is such a kill, so once it is repaired the same command resumes. Set
``REGIME_JAX_DEBUG=1`` to see the traceback and the libraries' own logs as well.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path

DEBUG_ENV = "REGIME_JAX_DEBUG"

DISK_FULL, VANISHED, PERMISSION, IO = 3, 4, 5, 6
EXIT_CODES = {
    DISK_FULL: "disk full",
    VANISHED: "workdir or a file in it vanished",
    PERMISSION: "write permission lost",
    IO: "I/O error",
}
_BY_ERRNO = {
    errno.ENOSPC: DISK_FULL,
    errno.EDQUOT: DISK_FULL,
    errno.EFBIG: DISK_FULL,
    errno.ENOENT: VANISHED,
    errno.ESTALE: VANISHED,
    errno.ENOTDIR: VANISHED,
    errno.EACCES: PERMISSION,
    errno.EPERM: PERMISSION,
    errno.EROFS: PERMISSION,
}
# tensorstore's wording inside the exceptions orbax raises
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_TEXT = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)
_FILE = re.compile(r'(?:Failed writing|local file|to file|file): "([^"]+)"')


def debug() -> bool:
    """True when ``REGIME_JAX_DEBUG`` is set to anything but ``""`` / ``0``: show tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Fault:
    """An environment fault: its exit code, the OS's words for it, and the file if known."""

    code: int
    reason: str
    filename: str | None = None

    @property
    def kind(self) -> str:
        return EXIT_CODES[self.code]


def _chain(err: BaseException):
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def classify(err: BaseException) -> Fault | None:
    """The environment fault behind ``err`` (itself, its cause or context), or None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno is not None:
            code, filename = e.errno, e.filename
        else:  # a library's wrapper: tensorstore's error code, else the OS's words
            text = str(e)
            m = _OS_CODE.search(text)
            code = int(m.group(1)) if m else next((c for w, c in _TEXT if w in text), None)
            f = _FILE.search(text)
            filename = f.group(1) if f else None
        if code is None or code in (errno.EINTR, errno.EAGAIN):
            continue
        kind = _BY_ERRNO.get(code, IO)
        reason = os.strerror(code)
        return Fault(kind, reason, str(filename) if filename is not None else None)
    return None


def kept(workdir: str | os.PathLike | None) -> str:
    """What a run's workdir still holds, in words: its newest checkpoint, or that it is gone."""
    if workdir is None:
        return "nothing was written yet"
    workdir = Path(workdir)
    if not workdir.is_dir():
        return f"nothing is kept: {workdir} no longer exists"
    ckpts = workdir / "checkpoints"
    names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
    steps = sorted(int(n) for n in names if n.isdigit())
    if steps:
        return f"{workdir} keeps its records and checkpoint up to step {steps[-1]}"
    return f"{workdir} has no checkpoint yet (the run starts again from step 0)"


_REMEDY = {
    DISK_FULL: "free space (or move the workdir to a larger disk) and run the same command again",
    VANISHED: "restore the workdir or run the same command again to start afresh",
    PERMISSION: "restore write access to the workdir (or move it) and run the same command again",
    IO: "check the storage and run the same command again",
}


def describe(fault: Fault, workdir: str | os.PathLike | None, what_kept: str | None = None) -> str:
    """The one line a program prints: the fault, the file, what was kept (``what_kept``, else
    :func:`kept` of the run's ``workdir``), the way on."""
    where = f" at {fault.filename}" if fault.filename else ""
    what_kept = what_kept or kept(workdir)
    return (
        f"{fault.kind} ({fault.reason}){where}; {what_kept}; {_REMEDY[fault.code]}"
        f" (set {DEBUG_ENV}=1 for the traceback)"
    )
