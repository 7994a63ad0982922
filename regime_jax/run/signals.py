"""SIGINT and SIGTERM: stop cleanly, never mid-update, with the shell's exit codes.

Cloud TPU / GPU VMs announce preemption with SIGTERM, a terminal sends SIGINT. Inside the
training loop both set a flag (:class:`StopFlag`) that the loop reads after each step: it
finishes the step, flushes metrics, saves a checkpoint at that step and stops. Outside the loop
(start-up, data loading, compilation, the final summary) :func:`exit_on_signals` makes either
signal print one line and exit at once. Exit codes: 128 + the signal's number, i.e. 130 for
SIGINT and 143 for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_completed: list[str] = []  # set by a program once its work is done (:func:`completed`)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name


def completed(what: str) -> None:
    """Declares the program's work done (``what``: e.g. "the run is complete"): a signal from
    now on exits 0 saying so, instead of 130 / 143 (the CLI calls it, never the library)."""
    _completed[:] = [what]


def _exit_now(signum, frame):
    if _completed:
        os.write(2, f"regime_jax: {name(signum)} after {_completed[0]}; exit 0\n".encode())
        os._exit(0)
    # Outside the loop there is nothing half-done: records and configs are written atomically
    # or flushed before a checkpoint, and the kernel drops the workdir lock. Exiting here, not
    # raising, matters: libraries catch an exception raised mid-import or mid-compile and turn
    # it into tracebacks of their own.
    line = (
        f"regime_jax: stopped by {name(signum)} outside the training steps (start-up, "
        f"compilation or the final summary); nothing is lost: run the same command again\n"
    )
    os.write(2, line.encode())
    os._exit(exit_code(signum))


def exit_on_signals() -> None:
    """Makes SIGINT and SIGTERM print one line and exit 130 / 143 (main thread; the CLI only)."""
    _completed.clear()  # a program starts: nothing of it is complete yet
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _exit_now)


class StopFlag:
    """While entered, SIGINT / SIGTERM only set :attr:`signum`; the loop checks it per step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def set(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum is None:  # the first signal decides the exit code
            self.signum = signum

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
