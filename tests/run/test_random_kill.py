"""Random ``kill -9``: a run killed again and again, then finished, has the uninterrupted bytes.

What it proves: a training run (``python -m regime_jax.main``) that receives SIGKILL at random
instants, at least 10 times, and is started again each time with the same command, then run
to completion, leaves records that are byte for byte those of one uninterrupted run in
another workdir: ``metrics.jsonl``, every file under ``masks/`` (the same set of names),
``config.json``, ``fingerprint.json``, ``sites.json``, ``sites.txt``, and ``summary.json``
(every field but ``workdir``, the run's own path). Checked with one step per call (K=1) and
with ``steps_per_call=8``.

The kills land at seeded random instants (``random.Random(SEED + K)``) of every phase:
start-up (imports, data, compilation, checkpoint restore, record truncation; the first kill
comes 10-100 ms after the first process took the fresh workdir's lock, while it sets the
workdir up), mid-training, and inside the two writes a kill must not tear: an orbax
checkpoint being written (its ``<step>.orbax-checkpoint-tmp`` folder exists) and a mask
snapshot being written (``masks/step_NNNNNNN.tmp.npz`` exists,
:func:`regime_jax.records.write_masks`). A write kill fires a random 0-10 ms (checkpoint) or
0-0.2 ms (snapshot) after the temporary appears. The phase each kill landed in is read
afterwards from what the killed process left behind (a temporary checkpoint folder or
snapshot file of its own, a metrics row it wrote), not assumed from when the signal was
sent; the test requires at least one kill inside each write (a write kill that lands just
after its write is tried again, up to EXTRA_WRITE_KILLS times). A process that exits by
itself, a file that differs (for ``metrics.jsonl`` the first differing step) and the kill
log are in the failure message.

Run it (about 2 minutes per configuration on 2 CPU cores)::

    .venv/bin/python -m pytest -m heavy tests/run/test_random_kill.py -q

Add ``-s`` to see the kill log of a passing run. Not compared: ``timing.json`` and the
TensorBoard event files under ``tb/`` hold wall-clock times; ``checkpoints/`` is resume
state, not record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from regime_jax import records

ROOT = Path(__file__).parents[2]
SEED = 20210  # the kill schedule; another value draws other instants
NUM_STEPS = 800  # above the most steps the kills let the run advance (see _plans)
ARGS = [
    "--config=mlp_mnist1d:quick",
    "--config.dataset.num_samples=2000",  # less start-up per process: 1600 train, 400 val
    "--config.eval_batch_size=400",
    f"--config.num_steps={NUM_STEPS}",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=100",
    "--config.record.snapshot_every_steps=20",
    "--config.checkpoint.every_steps=50",
    "--config.checkpoint.keep=2",
]
CHECKPOINTS = "checkpoints"
ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax writes <step> under this suffix, then renames it
SNAPSHOT_TMP = ".tmp.npz"  # records.write_masks writes step_NNNNNNN.tmp.npz, then renames it
# Records compared byte for byte; summary.json is compared field by field.
SAME_BYTES = (records.METRICS, records.CONFIG, "fingerprint.json", "sites.json", "sites.txt")
MIN_KILLS = 10
EXTRA_WRITE_KILLS = 6  # per write, should each planned kill of it land just after the write
GIVE_UP_STEPS = 50  # a write kill that saw no temporary this many steps on fires at once
ATTEMPT_TIMEOUT_S = 300

# The phases a kill can land in, read from what the killed process left behind.
STARTUP, TRAINING = "start-up", "training"
CHECKPOINT_WRITE, SNAPSHOT_WRITE = "checkpoint write", "snapshot write"
# The temporaries each write kill waits for: (folder, part of the name).
TEMPORARY = {"checkpoint": (CHECKPOINTS, ORBAX_TMP), "snapshot": (records.MASKS_DIR, SNAPSHOT_TMP)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """When to kill one process; ``kind`` names the trigger, the other fields are its draws.

    * ``fresh``: ``delay_s`` after the process takes a fresh workdir's lock (its set-up: the
      checkpoint folder, the initial state, ``fingerprint.json``, ``config.json``).
    * ``startup``: ``delay_s`` after launch, or ``extra_s`` after the process's first metrics
      row if that comes first (so a fast machine still kills it early).
    * ``training``: ``extra_s`` after the process writes a row at or past resume + ``steps``.
    * ``checkpoint`` / ``snapshot``: ``extra_s`` after the first temporary checkpoint folder
      / snapshot file the process creates once it has written a row at or past resume +
      ``steps``; at once if it reaches resume + ``steps`` + GIVE_UP_STEPS without one.
    """

    kind: str
    delay_s: float = 0.0
    steps: int = 0
    extra_s: float = 0.0

    def describe(self, resume_from: int) -> str:
        row, extra = resume_from + self.steps, self.extra_s * 1e3
        return {
            "fresh": f"{self.delay_s * 1e3:.1f} ms after the lock",
            "startup": f"at {self.delay_s:.3f} s or a row +{extra:.1f} ms",
            "training": f"row >= {row} +{extra:.1f} ms",
            "checkpoint": f"tmp folder after row {row} +{extra:.2f} ms",
            "snapshot": f"tmp file after row {row} +{extra:.3f} ms",
        }[self.kind]


@dataclasses.dataclass(frozen=True)
class Kill:
    """One killed process: its plan, when the signal went, and where it landed."""

    plan: Plan
    resume_from: int  # the newest checkpoint at launch (-1: none)
    sent_s: float  # seconds after launch
    last_row: int | None  # the newest row the process wrote (None: none)
    phase: str
    left: tuple[str, ...]  # the process's temporaries the kill left behind

    def line(self, i: int) -> str:
        left = f" (left {', '.join(self.left)})" if self.left else ""
        return (
            f"kill {i:2d}: {self.plan.kind:10s} {self.plan.describe(self.resume_from):34s} "
            f"sent at {self.sent_s:7.3f} s; resumed from {self.resume_from:4d}, its last row "
            f"{self.last_row}; landed in {self.phase}{left}"
        )


def _log(kills: list[Kill]) -> str:
    phases = Counter(k.phase for k in kills)
    return "\n".join([*(k.line(i) for i, k in enumerate(kills, 1)), f"phases: {dict(phases)}"])


def _command(workdir: Path, k: int) -> list[str]:
    per_call = [f"--config.steps_per_call={k}"] if k != 1 else []
    return [sys.executable, "-m", "regime_jax.main", *ARGS, *per_call, f"--workdir={workdir}"]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    """``command`` in its own process group, from the repo root (the regime_jax under test)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:  # not there yet, or removed meanwhile
        return []


def _temps(workdir: Path, kind: str, since_ns: int) -> list[str]:
    """The ``kind`` temporaries under ``workdir`` created at or after ``since_ns``.

    The ctime tells this process's temporaries from those a killed predecessor left (same
    names, older times; the resumed run removes or replaces them).
    """
    sub, mark = TEMPORARY[kind]
    out = []
    for name in _listdir(workdir / sub):
        if mark in name:
            try:
                if os.stat(workdir / sub / name).st_ctime_ns >= since_ns:
                    out.append(f"{sub}/{name}")
            except OSError:
                pass  # renamed or removed since the listing
    return out


def _newest_checkpoint(workdir: Path) -> int:
    return max((int(n) for n in _listdir(workdir / CHECKPOINTS) if n.isdigit()), default=-1)


class _Rows:
    """The newest metrics row written by the process launched at ``since_ns``."""

    def __init__(self, workdir: Path, since_ns: int, resume_from: int):
        self.path = workdir / records.METRICS
        self.since_ns, self.resume_from = since_ns, resume_from
        self._key, self._step = None, None

    def last(self) -> int | None:
        """Its step, once the process wrote a row past its resume point (None: not yet).

        Until a resumed process truncates ``metrics.jsonl`` the rows are its predecessor's
        (an older mtime); once truncated they end at the resume point.
        """
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        if st.st_mtime_ns < self.since_ns:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            self._key, self._step = key, self._read_last_step(st.st_size)
        return self._step if self._step is not None and self._step > self.resume_from else None

    def _read_last_step(self, size: int) -> int | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, size - 16384))
                lines = f.read().split(b"\n")[:-1]  # whole lines only: a row may be mid-write
        except OSError:
            return None
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # the first line of the window may be cut
        return None


def _fire_at(plan: Plan, workdir: Path, rows: _Rows, now: float, t0: float, since_ns: int):
    """When (monotonic seconds) to send the kill, once the plan's condition holds; else None."""
    if plan.kind == "fresh":
        return now + plan.delay_s if (workdir / records.LOCK).exists() else None
    last = rows.last()
    if plan.kind == "startup":
        if now >= t0 + plan.delay_s:
            return now
        return now + plan.extra_s if last is not None else None
    target = rows.resume_from + plan.steps
    if last is None or last < target:
        return None
    if plan.kind == "training":
        return now + plan.extra_s
    if _temps(workdir, plan.kind, since_ns):  # the write is under way
        return now + plan.extra_s
    return now if last >= target + GIVE_UP_STEPS else None


class _ExitedByItself(AssertionError):
    def __init__(self, code: int, plan: Plan, log: Path, found: list[str]):
        super().__init__(
            f"the process exited by itself with code {code} before its kill ({plan}); it found "
            f"the workdir holding {found}; the end of its output ({log}):\n{_tail(log)}"
        )


def _kill_one(command: list[str], workdir: Path, plan: Plan, log: Path) -> Kill:
    """Starts ``command``, SIGKILLs its process group when ``plan`` says, returns the Kill."""
    resume_from, found = _newest_checkpoint(workdir), sorted(_listdir(workdir))
    since_ns = time.time_ns()
    t0 = time.monotonic()
    proc = _start(command, log)
    rows = _Rows(workdir, since_ns, resume_from)
    fire_at, sent = None, float("nan")  # nan: killed by someone else
    try:
        while proc.poll() is None:
            now = time.monotonic()
            assert now - t0 < ATTEMPT_TIMEOUT_S, f"no kill after {ATTEMPT_TIMEOUT_S} s: {plan}"
            if fire_at is None:
                fire_at = _fire_at(plan, workdir, rows, now, t0, since_ns)
            if fire_at is not None and now >= fire_at:
                os.killpg(proc.pid, signal.SIGKILL)
                sent = now - t0
                break
            if fire_at is not None and fire_at - now < 0.002:
                continue  # spin to the instant
            # A snapshot write lasts about a millisecond: poll often, but sleep (on a busy
            # machine a sleeper is scheduled sooner after a wake-up than a busy loop).
            snapshots = plan.kind == "snapshot" and rows.last() is not None
            time.sleep(0.0002 if snapshots else 0.001)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise _ExitedByItself(proc.returncode, plan, log, found)
    left = (*_temps(workdir, "checkpoint", since_ns), *_temps(workdir, "snapshot", since_ns))
    last = rows.last()
    if any(ORBAX_TMP in name for name in left):
        phase = CHECKPOINT_WRITE
    elif left:
        phase = SNAPSHOT_WRITE
    else:
        phase = TRAINING if last is not None else STARTUP
    return Kill(plan, resume_from, sent, last, phase, left)


def _plans(rng: random.Random) -> list[Plan]:
    """The kill schedule: the fresh workdir's set-up first, then 9 kills in random order.

    A kill lets the run advance at most ~100 steps (two checkpoints), 600 in all, and the
    extra write kills run only while 200 steps are left: the run never ends before its last
    kill.
    """
    ms = lambda lo, hi: rng.uniform(lo, hi) / 1e3
    plans = [
        Plan("startup", delay_s=rng.uniform(0.0, 1.0), extra_s=ms(0, 50)),  # imports
        Plan("startup", delay_s=rng.uniform(1.0, 5.0), extra_s=ms(0, 50)),  # data
        Plan("startup", delay_s=rng.uniform(5.0, 12.0), extra_s=ms(0, 50)),  # compiling
        *(Plan("training", steps=rng.randint(1, 90), extra_s=ms(0, 60)) for _ in range(2)),
        *(Plan("checkpoint", steps=rng.randint(1, 60), extra_s=ms(0, 10)) for _ in range(2)),
        *(Plan("snapshot", steps=rng.randint(1, 60), extra_s=ms(0, 0.2)) for _ in range(2)),
    ]
    rng.shuffle(plans)
    return [Plan("fresh", delay_s=ms(10, 100)), *plans]


def _first_difference(a: bytes, b: bytes) -> str:
    la, lb = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(la, lb, strict=False)):
        if x != y:
            step = lambda line: json.loads(line).get("step") if line.startswith(b"{") else "?"
            return f"line {i + 1} (step {step(x)} vs {step(y)}): {x[:300]!r} vs {y[:300]!r}"
    return f"{len(la)} vs {len(lb)} lines"


def _differences(reference: Path, killed: Path) -> list[str]:
    """What differs between the two runs' records, one line per file (empty: nothing)."""
    out = []
    for name in SAME_BYTES:
        a, b = (reference / name).read_bytes(), (killed / name).read_bytes()
        if a != b:
            out.append(f"{name} differs, first at {_first_difference(a, b)}")
    masks_a = sorted(_listdir(reference / records.MASKS_DIR))
    masks_b = sorted(_listdir(killed / records.MASKS_DIR))
    if masks_a != masks_b:
        only_a, only_b = sorted(set(masks_a) - set(masks_b)), sorted(set(masks_b) - set(masks_a))
        out.append(f"masks/ names differ: only in the reference {only_a}, only killed {only_b}")
    for name in sorted(set(masks_a) & set(masks_b)):
        a = (reference / records.MASKS_DIR / name).read_bytes()
        if a != (killed / records.MASKS_DIR / name).read_bytes():
            out.append(f"masks/{name} differs")
    sa, sb = (json.loads((d / records.SUMMARY).read_text()) for d in (reference, killed))
    for s in (sa, sb):
        s.pop("workdir")  # the run's own path (summary.summarize_run); no other field is
    if sa != sb:
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        out.append(f"summary.json differs (workdir aside) in {keys}")
    return out


def _kill_repeatedly(command: list[str], workdir: Path, rng: random.Random, logs: Path):
    """The planned kills, then extra write kills while a write has none inside it."""
    kills: list[Kill] = []
    plans, extra = _plans(rng), Counter()
    while plans:
        plan = plans.pop(0)
        try:
            kills.append(_kill_one(command, workdir, plan, logs / f"kill_{len(kills) + 1}.log"))
        except AssertionError as err:
            raise AssertionError(f"{err}\nthe kills before:\n{_log(kills)}") from None
        landed = {kill.phase for kill in kills}
        room = _newest_checkpoint(workdir) <= NUM_STEPS - 200
        for kind, phase in (("checkpoint", CHECKPOINT_WRITE), ("snapshot", SNAPSHOT_WRITE)):
            if not plans and room and phase not in landed and extra[kind] < EXTRA_WRITE_KILLS:
                extra[kind] += 1
                plans.append(Plan(kind, steps=1))
    return kills


@pytest.mark.heavy
@pytest.mark.parametrize("k", [1, 8], ids=["K1", "K8"])
def test_random_kill_9_then_resume_gives_the_uninterrupted_bytes(k, tmp_path):
    """At least 10 kill -9 at random instants (start-up, training, checkpoint and snapshot
    writes), then the same command to the end: the records are the uninterrupted run's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref_proc = _start(_command(reference, k), logs / "reference.log")  # runs meanwhile
    try:
        kills = _kill_repeatedly(_command(killed, k), killed, random.Random(SEED + k), logs)
        done = subprocess.run(
            _command(killed, k), cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert ref_proc.wait(timeout=600) == 0, _tail(logs / "reference.log")
    finally:
        if ref_proc.poll() is None:
            os.killpg(ref_proc.pid, signal.SIGKILL)
            ref_proc.wait()
    print(_log(kills))  # shown with -s, and under a failure
    assert done.returncode == 0, f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n{_log(kills)}"
    assert len(kills) >= MIN_KILLS, _log(kills)
    landed = {kill.phase for kill in kills}
    missed = [p for p in (STARTUP, TRAINING, CHECKPOINT_WRITE, SNAPSHOT_WRITE) if p not in landed]
    assert not missed, f"no kill landed in {missed}\n{_log(kills)}"
    diffs = _differences(reference, killed)
    assert not diffs, "\n".join([*diffs, f"workdirs: {reference} {killed}", _log(kills)])
