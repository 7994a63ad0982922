"""Faults of the machine mid-run (full disk, vanished workdir, lost permission, I/O errors), a
signal after the run completed, and broken snapshots met by ``load_run`` / ``report``.

Each fault is one stderr line with its own exit code (``regime_jax.faults``), and the run,
once the fault is repaired, resumes to the same bytes as a run that never met it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from regime_jax import faults, main, records, report
from regime_jax.run import checkpoint

ROOT = Path(__file__).parents[2]
BASE = ["--config", "mlp_mnist1d:quick"]
QUICK = [*BASE, "--config.checkpoint.every_steps=10"]
LONG = [*BASE, "--config.num_steps=4000", "--config.checkpoint.every_steps=200"]
ORBAX_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.fc2.kernel/0.0" in OCDBT database at local file '
    '"/w/checkpoints/40.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/'
    '40.orbax-checkpoint-tmp/ocdbt.process_0/d/0f24": Failed to write 130847 bytes to file 22: '
    "No space left on device [os_error_code='28']"
)


def _run(workdir, *extra) -> int:
    return main.run(["regime_jax", *QUICK, f"--workdir={workdir}", *extra])


def _files(workdir: Path) -> dict[str, bytes]:
    """The records a resumed run must reproduce byte for byte."""
    names = [records.METRICS, *(f"masks/{p.name}" for p in (workdir / "masks").glob("*.npz"))]
    return {n: (workdir / n).read_bytes() for n in sorted(names)}


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref") / "run"
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert _run(workdir) == 0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    return workdir


# ----------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    "err, code",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl"), faults.DISK_FULL),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), faults.DISK_FULL),
        (FileNotFoundError(errno.ENOENT, "No such file", "/w/x"), faults.VANISHED),
        (PermissionError(errno.EACCES, "Permission denied", "/w/x"), faults.PERMISSION),
        (OSError(errno.EROFS, "Read-only file system"), faults.PERMISSION),
        (OSError(errno.EIO, "Input/output error"), faults.IO),
        (ValueError(ORBAX_FULL), faults.DISK_FULL),
        (
            ValueError("PERMISSION_DENIED: Error opening file: [os_error_code='13']"),
            faults.PERMISSION,
        ),
        (ValueError("UNKNOWN: Error writing: [os_error_code=5]"), faults.IO),
        (ValueError("learning_rate must be > 0"), None),
        (RuntimeError("no ReLU found"), None),
    ],
)
def test_classify_reads_os_errors_and_library_wrappers(err, code):
    fault = faults.classify(err)
    assert (fault.code if fault else None) == code


def test_classify_follows_the_cause_and_context_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/w/masks/step_1.npz")
        except OSError as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as outer:
        fault = faults.classify(outer)
    assert fault.code == faults.DISK_FULL and fault.filename == "/w/masks/step_1.npz"
    assert faults.classify(ValueError(ORBAX_FULL)).filename.endswith("/d/0f24")


# ------------------------------------------------------------------ a fault in a live run

SITES = {  # where the fault strikes: (object, attribute), and after how many calls
    "snapshot": (records, "write_masks", 2),
    "metrics": (records.MetricsWriter, "write", 2),
    "checkpoint": (checkpoint.Checkpointer, "save", 1),
}


@pytest.mark.parametrize(
    "site, err, code",
    [
        ("snapshot", OSError(errno.ENOSPC, "No space left on device"), 3),
        ("metrics", PermissionError(errno.EACCES, "Permission denied"), 5),
        ("metrics", OSError(errno.EROFS, "Read-only file system"), 5),
        ("checkpoint", ValueError(ORBAX_FULL), 3),
        ("snapshot", OSError(errno.EIO, "Input/output error"), 6),
    ],
)
def test_a_fault_mid_run_is_one_line_with_its_code_and_the_repaired_run_resumes_to_the_same_bytes(
    site, err, code, reference, tmp_path, monkeypatch, capsys, keep_signal_handlers
):
    owner, name, after = SITES[site]
    real, calls = getattr(owner, name), []

    def faulty(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise err
        return real(*args, **kwargs)

    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, faulty)
        assert _run(workdir) == code
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1, err_lines
    line = err_lines[0]
    assert line.startswith(f"regime_jax: {faults.EXIT_CODES[code]} ("), line
    assert str(workdir) in line and "run the same command again" in line, line
    assert not (workdir / "summary.json").exists()  # nothing says "finished"

    assert _run(workdir) == 0  # the fault repaired: the same command resumes
    assert _files(workdir) == _files(reference)
    got, want = _summary(workdir), _summary(reference)
    assert got == want | {"workdir": str(workdir)}  # the run root is not a result


def test_debug_env_adds_the_traceback(tmp_path, monkeypatch, capsys, keep_signal_handlers):
    monkeypatch.setenv(faults.DEBUG_ENV, "1")
    real = records.write_masks

    def full(*args):
        if (Path(args[0]) / "masks").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(records, "write_masks", full)
    assert _run(tmp_path / "run") == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "OSError: [Errno 28]" in err
    assert err.strip().splitlines()[-1].startswith("regime_jax: disk full")


def test_a_sweep_stops_at_a_fault_instead_of_failing_every_later_run(tmp_path, monkeypatch):
    from regime_jax import sweep
    from regime_jax.configs import load

    grid = load("reproduce:quick")
    grid.seeds = [0, 1]
    monkeypatch.setattr(
        records, "write_masks", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    lines = []
    with pytest.raises(OSError) as info:
        sweep.run_sweep(grid, tmp_path / "sweep", log=lines.append)
    assert faults.classify(info.value).code == faults.DISK_FULL
    assert info.value.sweep_run.endswith("seed_0")
    assert len(lines) == 0 or "FAILED" not in " ".join(lines)  # stopped, not marked failed


# ------------------------------------------------------------------ real processes


def _start(workdir, args=QUICK, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "regime_jax.main", *args, f"--workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for(predicate, proc, timeout_s=120) -> None:
    deadline = time.time() + timeout_s
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


def test_the_workdir_removed_mid_run_is_exit_4_in_one_line(tmp_path):
    workdir = tmp_path / "w" / "run"
    proc = _start(workdir, LONG)
    rows = lambda: (
        (workdir / records.METRICS).exists()
        and (len((workdir / records.METRICS).read_text().splitlines()) > 20)
    )
    _wait_for(rows, proc)
    assert proc.poll() is None, "the run ended before its workdir could be removed"
    # As `rm -rf` does, seen from the run: the path is gone at once (a rename is atomic; an
    # rmtree of a tree the run still writes into can race it), then the files go too.
    gone = tmp_path / "removed"
    (tmp_path / "w").rename(gone)
    shutil.rmtree(gone, ignore_errors=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == faults.VANISHED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regime_jax: workdir or a file in it vanished")
    assert "no longer exists" in lines[0], lines[0]


def test_a_signal_after_the_run_completed_exits_0_saying_so(tmp_path):
    # The handler in the state a finished program leaves it: exit 0 and say why.
    code = (
        "import os, signal, time; from regime_jax import signals; signals.exit_on_signals(); "
        "signals.completed('the run completed'); os.kill(os.getpid(), signal.SIGINT); "
        "time.sleep(5); raise SystemExit(9)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stderr.strip() == "regime_jax: SIGINT after the run completed; exit 0"
    # The main job: a SIGINT as soon as summary.json exists never kills it or exits non-zero.
    for sig in (signal.SIGINT, signal.SIGTERM):
        workdir = tmp_path / sig.name
        proc = _start(workdir)
        summary = workdir / "summary.json"
        _wait_for(summary.exists, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (sig, proc.returncode, err)
        assert err == "" or err.strip().endswith("; exit 0"), err


# ------------------------------------------------------------------ broken snapshots


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:300])


def _not_a_zip(p: Path) -> None:
    p.write_bytes(b"\0" * 1000)


def _drop_a_layer_count(p: Path) -> None:
    with zipfile.ZipFile(p) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(p, "w") as z:
        for n, data in members.items():
            if not n.startswith("units/fc1"):
                z.writestr(n, data)


def _flip_array_bytes(p: Path) -> None:
    """The zip directory intact, one array's bytes changed: only its CRC can tell."""
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("bits/fc1.npy")
    data = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[start] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _not_a_zip, _drop_a_layer_count, _flip_array_bytes])
def test_a_broken_snapshot_is_refused_by_the_readers_and_rewritten_by_a_rerun(
    damage, reference, tmp_path, capsys, keep_signal_handlers
):
    workdir = tmp_path / "run"
    assert _run(workdir) == 0
    capsys.readouterr()
    snap = records.mask_path(workdir, 20)
    damage(snap)

    with pytest.raises(records.RecordError, match=r"step_0000020\.npz does not read") as info:
        run = records.load_run(workdir)
        for s in run.mask_steps:
            run.masks(s)
    assert "\n" not in str(info.value) and "training command again" in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--run", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "step_0000020.npz" in err[0], err

    assert _run(workdir) == 0  # sets the snapshot aside and writes it again
    assert "mask snapshot of step 20 is broken" in capsys.readouterr().out
    assert _files(workdir) == _files(reference)
    assert list((workdir / "broken_masks").glob("step_0000020*.npz"))


# ------------------------------------------------------------------ the real thing (heavy)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = "mkdir -p /tmp/rj_probe_mnt && mount -t tmpfs -o size=1m tmpfs /tmp/rj_probe_mnt"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True)
    return done.returncode == 0


@pytest.mark.heavy
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs")
def test_a_really_full_disk_is_one_line_exit_3_and_the_moved_run_resumes(reference, tmp_path):
    """The run in a 400 KiB tmpfs (its own mount namespace): orbax, numpy and the metrics
    writer meet a real ENOSPC; the workdir is then copied out and resumed."""
    mnt, moved = tmp_path / "mnt", tmp_path / "moved"
    mnt.mkdir()
    args = " ".join([*QUICK, f"--workdir={mnt}/run"])
    script = (
        f"mount -t tmpfs -o size=400k tmpfs {mnt} && {sys.executable} -m regime_jax.main {args}; "
        f"rc=$?; cp -a {mnt}/run {moved}; exit $rc"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == faults.DISK_FULL, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("regime_jax: disk full (No space"), lines
    done = subprocess.run(
        [sys.executable, "-m", "regime_jax.main", *QUICK, f"--workdir={moved}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(moved) == _files(reference)


@pytest.mark.heavy
@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_write_permission_lost_mid_run_is_one_line_exit_5_and_resumes(reference, tmp_path):
    """``chmod -R a-w`` on the live workdir (as an unprivileged user: root ignores modes)."""
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file modes would not bind")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        tmp_path = Path(tempfile.mkdtemp(prefix="rj_perm_"))  # pytest's is private to root
        tmp_path.chmod(0o777)
    workdir = tmp_path / "run"
    command = [*as_user, sys.executable, "-m", "regime_jax.main", *LONG, f"--workdir={workdir}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for(lambda: (workdir / "checkpoints" / "200").is_dir(), proc)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    for d, _, files in os.walk(workdir):
        os.chmod(d, 0o555)
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
    _, err = proc.communicate(timeout=300)
    for d, _, files in os.walk(workdir):
        os.chmod(d, 0o777)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666)
    assert proc.returncode == faults.PERMISSION, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regime_jax: write permission lost"), lines
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if as_user:
        shutil.rmtree(tmp_path)
