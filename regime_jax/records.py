"""What a run leaves in its workdir, and :func:`load_run` to read it back.

``workdir/``
  * ``config.json``: the resolved config.
  * ``metrics.jsonl``: one JSON object per logged step: ``"step"`` plus ``/``-namespaced keys
    (``train/loss``, ``flip/fc1``, ``step/abs/all``, ``eval/acc``, ...). Appended and flushed
    at every host fetch, so a run that dies keeps every row written before. A non-finite
    value is ``null`` there, as in every JSON file regime_jax writes (:func:`to_json`).
  * ``masks/step_NNNNNNN.npz``: packed patterns of the probe set at a snapshot step; per
    layer ``bits/<layer>`` (uint8, little bit order, packed along units) and
    ``units/<layer>`` (the unit count that unpacks them exactly).

Example (needs a run directory, so not a doctest)::

    run = load_run("runs/mlp_mnist1d")
    steps, flips = run.series("flip/all")
    fc1 = run.masks(run.mask_steps[-1])["fc1"].unpack()
    if run.partial:  # None for a finished run, else "partial at step N of M (why)"
        print(run.partial)
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from regime_jax.schedule import Schedule

if TYPE_CHECKING:  # reading a run's records needs neither JAX nor flax
    from regime_jax.bitmask import Packed


METRICS = "metrics.jsonl"
CONFIG = "config.json"
MASKS_DIR = "masks"
SUMMARY = "summary.json"
LOCK = ".lock"  # regime_jax.run.rundir.LOCK: held (flock) by the process writing the run
TB_DIR = "tb"  # TensorBoard event files (regime_jax.run.live), a view of metrics.jsonl
TIMING = "timing.json"  # each training phase's wall-clock (regime_jax.run.live.PhaseClock)


class UnwritableWorkdir(PermissionError):
    """The workdir cannot be created or written when a program starts (a user error, exit 2;
    permission lost later, mid-run, is an environment fault: :mod:`regime_jax.faults`)."""


class RecordError(ValueError):
    """The files in a workdir do not form a complete record up to the step being resumed."""


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``.

    A kill at any instant leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ the one JSON policy


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy / jax scalars and arrays become Python numbers and
    lists, tuples lists, mapping keys strings, and every non-finite float (NaN, +-inf) None.

    JSON has no NaN or inf, so every file regime_jax writes says ``null`` for them, and the
    readers (:func:`read_rows`, :func:`load_run`) turn ``null`` back into NaN in metric rows.

    >>> jsonable({"a": np.float32(0.5), "b": (float("nan"), np.inf), 3: np.arange(2)})
    {'a': 0.5, 'b': [None, None], '3': [0, 1]}
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic) or hasattr(obj, "__array__"):
        value = np.asarray(obj)
        return jsonable(value.item() if value.ndim == 0 else value.tolist())
    return obj  # anything else: json's ``default`` (if given) or a TypeError


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of :func:`jsonable` ``(obj)`` (``allow_nan=False``); ``kwargs`` go to
    :func:`json.dumps` (``indent``, ``sort_keys``, ``default``). Every JSON writer uses it.

    >>> to_json({"loss": float("nan"), "step": np.int64(3)})
    '{"loss": null, "step": 3}'
    """
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of the file at ``path`` (UTF-8): the one reader of the JSON files a run
    or a sweep writes (``config.json``, ``summary.json``, ``timing.json``, ``sweep.json``).

    Raises OSError when the file does not read, ValueError (``json.JSONDecodeError``) when
    its text is not JSON.
    """
    return json.loads(Path(path).read_text(encoding="utf-8"))


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` row as written, with non-finite values as floats again.

    ``null`` (written for NaN / inf) becomes NaN; the strings ``"nan"``, ``"inf"``, ``"-inf"``
    that versions before the one-JSON-policy wrote are read as those floats.

    >>> parse_row({"step": 3, "train/loss": None, "flip/all": "-inf"})
    {'step': 3, 'train/loss': nan, 'flip/all': -inf}
    """
    if not isinstance(row, dict):
        return row  # not a row at all: the caller's checks name it
    for key, value in row.items():
        if value is None:
            row[key] = math.nan
        elif isinstance(value, str) and value.lower() in _NONFINITE:
            row[key] = _NONFINITE[value.lower()]
    return row


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and flushes after every :meth:`write`.

    Each write first checks that the file is still the run's: appending to a file someone
    deleted (the workdir removed mid-run) succeeds and loses every row, so it raises
    ``FileNotFoundError`` instead (an environment fault, :mod:`regime_jax.faults`).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / METRICS
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        if os.fstat(self._file.fileno()).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "deleted during the run", str(self.path))
        for row in rows:
            self._file.write(to_json(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def ensure_writable(workdir: str | os.PathLike) -> Path:
    """Creates ``workdir`` and checks that a file can be written there."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UnwritableWorkdir(f"workdir={str(workdir)!r} cannot be written: {err}") from err
    return workdir


def has_run(workdir: str | os.PathLike) -> bool:
    return (Path(workdir) / METRICS).exists()


def reset(workdir: str | os.PathLike) -> None:
    """Removes a previous run's metrics, mask snapshots, TensorBoard events and summary."""
    workdir = Path(workdir)
    for name in (METRICS, SUMMARY):
        (workdir / name).unlink(missing_ok=True)
    shutil.rmtree(workdir / MASKS_DIR, ignore_errors=True)
    shutil.rmtree(workdir / TB_DIR, ignore_errors=True)


def truncate_after(workdir: str | os.PathLike, step: int) -> None:
    """Drops metric rows and mask snapshots after ``step`` (the resume point)."""
    workdir = Path(workdir)
    path = workdir / METRICS
    if path.exists():
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line from a killed writer: drop it and what follows
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    for snap in (workdir / MASKS_DIR).glob("step_*.npz"):
        stem = snap.name.removeprefix("step_").split(".")[0]
        if not stem.isdigit() or int(stem) > step or ".tmp" in snap.name:
            snap.unlink()
    (workdir / SUMMARY).unlink(missing_ok=True)


def config_diff(
    stored: Mapping[str, Any],
    requested: Mapping[str, Any],
    ignore: Iterable[str] = (),
    added: Mapping[str, Any] | None = None,
) -> list[str]:
    """Dotted names of the fields whose values differ (nested dicts are compared per field).

    ``added``: fields that a later version added, ``{dotted name: the value that does what
    a run without the field did}``. A config without such a field (written before it existed)
    equals one that has it at that value, and no other (either side may be the older).

    >>> config_diff({"model": {"name": "mlp"}}, {"model": {"name": "mlp", "dtype": "f32"}},
    ...             added={"model.dtype": "f32"})
    []
    >>> config_diff({"model": {"name": "mlp"}}, {"model": {"name": "mlp", "dtype": "bf16"}},
    ...             added={"model.dtype": "f32"})
    ['model.dtype']
    """
    ignore, added = set(ignore), dict(added or {})
    out = []
    for key in sorted(set(stored) | set(requested)):
        if key in ignore:
            continue
        a, b = stored.get(key), requested.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            nested = {i.split(".", 1)[1] for i in ignore if i.startswith(f"{key}.")}
            inner = {k.split(".", 1)[1]: v for k, v in added.items() if k.startswith(f"{key}.")}
            out += [f"{key}.{k}" for k in config_diff(a, b, nested, inner)]
        elif key in added and (key in stored) != (key in requested):
            present = b if key in requested else a
            if jsonable(present) != jsonable(added[key]):
                out.append(key)  # one side predates the field, the other asks for new behaviour
        elif jsonable(a) != jsonable(b):
            out.append(key)
    return out


def mask_path(workdir: str | os.PathLike, step: int) -> Path:
    return Path(workdir) / MASKS_DIR / f"step_{step:07d}.npz"


def write_masks(workdir: str | os.PathLike, step: int, masks: Mapping[str, Packed]) -> Path:
    """Writes one snapshot atomically (temp file + rename)."""
    path = mask_path(workdir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"bits/{k}": np.asarray(p.bits) for k, p in masks.items()}
    arrays.update({f"units/{k}": np.int64(p.units) for k, p in masks.items()})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_masks(path: str | os.PathLike) -> dict[str, Packed]:
    from regime_jax.bitmask import Packed  # JAX only once masks are read, not rows

    with np.load(path) as f:
        layers = [k.removeprefix("bits/") for k in f.files if k.startswith("bits/")]
        return {k: Packed(f[f"bits/{k}"], int(f[f"units/{k}"])) for k in layers}


def write_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
    write_atomic(Path(workdir) / CONFIG, to_json(config, indent=2, sort_keys=True) + "\n")


def read_rows(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """``metrics.jsonl``'s rows; a torn last line (a killed writer) is dropped.

    Raises :class:`RecordError` for a bad line that is not the last one, or steps that do not
    increase (two writers, or an edited file).
    """
    path = Path(workdir) / METRICS
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = parse_row(json.loads(line))
            step = row["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines) - 1:
                break  # torn by a kill mid-write; the rows before it are whole
            raise RecordError(
                f"{path}: line {i + 1} is not a metrics row (file corrupted)"
            ) from None
        if rows and step <= rows[-1]["step"]:
            raise RecordError(
                f"{path}: step {step} follows step {rows[-1]['step']} (line {i + 1}); the file "
                f"was written by two processes or edited"
            )
        rows.append(row)
    return rows


def check_record(workdir: str | os.PathLike, config: Mapping[str, Any], step: int) -> None:
    """Raises :class:`RecordError` unless every row and snapshot up to ``step`` is present.

    Called before resuming from a checkpoint at ``step``: a resumed run must never continue a
    partial record (missing ``metrics.jsonl``, one that ends early, lost mask snapshots).
    """
    workdir = Path(workdir)
    fresh = "pass --config.overwrite=True to delete the run and start afresh"
    schedule = Schedule.from_config(config)
    want_rows, want_snaps = schedule.expected_rows(step), schedule.expected_snapshots(step)
    if not (workdir / METRICS).exists():
        raise RecordError(
            f"{workdir / METRICS} is missing, but the checkpoint being resumed is at step "
            f"{step}; refusing to resume into a partial record: {fresh}"
        )
    try:
        have = {r["step"] for r in read_rows(workdir)}
    except RecordError as err:
        raise RecordError(f"{err}; refusing to resume: {fresh}") from None
    missing = [s for s in want_rows if s not in have]
    if missing:
        last = max((s for s in have if s <= step), default=None)
        raise RecordError(
            f"{workdir / METRICS} lacks {len(missing)} row(s) up to step {step} (first missing: "
            f"step {missing[0]}; its last row is step {last}), but the checkpoint being "
            f"resumed is at step {step}; refusing to resume into a partial record: {fresh}"
        )
    lost = [s for s in want_snaps if not mask_path(workdir, s).exists()]
    if lost:
        raise RecordError(
            f"{mask_path(workdir, lost[0])} is missing ({len(lost)} mask snapshot(s) up to step "
            f"{step} in all), but the checkpoint being resumed is at step {step}; refusing to "
            f"resume into a partial record: {fresh}"
        )


def complete(config: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> bool:
    """Whether every row a whole run of ``config`` writes is present
    (:meth:`~regime_jax.schedule.Schedule.is_complete`), or for a ``config.json`` from before
    its cadence fields, whether the last row is at ``num_steps`` (what ``summary.json``'s
    ``complete`` says)."""
    try:
        have = {r["step"] for r in rows}
        return Schedule.from_config(config).is_complete(have)
    except (KeyError, TypeError):
        last = rows[-1]["step"] if rows else None
        return last is not None and last == config.get("num_steps")


def lock_holder(workdir: str | os.PathLike) -> str | None:
    """Who holds ``workdir/.lock`` now (``"process <pid>"``), or None: nobody does.

    Read-only: on Linux from ``/proc/locks`` (the lock is never taken, so a run starting at
    this instant is not refused); elsewhere, the PID the holder wrote into the file, if that
    process is alive (a holder that exits normally empties the file).
    """
    path = Path(workdir) / LOCK
    try:
        st = path.stat()
        pid_text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read().splitlines()
    except OSError:
        table = None
    if table is not None:
        here = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        for line in table:
            parts = line.split()
            if len(parts) < 6 or parts[1] != "FLOCK":  # "->" marks a blocked waiter
                continue
            try:
                major, minor, inode = parts[5].split(":")
                where = (int(major, 16), int(minor, 16), int(inode))
            except ValueError:
                continue
            # The device numbers can differ on overlay file systems; the inode and the PID
            # the holder wrote into the file then identify it.
            if where == here or (where[2] == st.st_ino and parts[4] == pid_text):
                return f"process {parts[4]}"
        return None
    if not pid_text.isdigit():
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return None
    except OSError:  # alive, owned by another user
        pass
    return f"process {pid_text}"


_STOPPED_BY = ("train/loss", "step/")  # a non-finite one ends the run (loop.NonFinite)


def partial_mark(
    workdir: str | os.PathLike, config: Mapping[str, Any], rows: list[Mapping[str, Any]]
) -> str | None:
    """None for a finished run (:func:`complete`), else ``"partial at step N of M (why)"``.

    ``why``: the run is live (another process holds ``workdir/.lock``), it was stopped by a
    non-finite loss or step size (its last row holds one), or it is unfinished (killed or
    interrupted; rerunning its command resumes it).
    """
    if complete(config, rows):
        return None
    last = rows[-1]["step"] if rows else "none"
    head = f"partial at step {last} of {config.get('num_steps')}"
    holder = lock_holder(workdir)
    if holder is not None:
        return f"{head} (live: {holder} holds {Path(workdir) / LOCK} and is still writing)"
    tail = rows[-1] if rows else {}
    bad = [
        k
        for k, v in tail.items()
        if k.startswith(_STOPPED_BY) and isinstance(v, float) and not math.isfinite(v)
    ]
    if bad:
        return f"{head} (stopped by a non-finite {bad[0]} at step {last})"
    return f"{head} (unfinished: killed or interrupted; rerun its command to resume)"


def metrics_digest(workdir: str | os.PathLike) -> str:
    """SHA-256 of ``metrics.jsonl``'s bytes: ``summary.json`` records the one it was computed
    from, so a summary of rows that have since changed (a cut file) is recognized as stale."""
    digest = hashlib.sha256()
    with open(Path(workdir) / METRICS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Run:
    """A run read back from its workdir.

    ``partial``: None for a finished run; for an unfinished, live or non-finite-stopped one
    ``"partial at step N of M (why)"`` (:func:`partial_mark`), which every output made from
    it (summaries, figure titles, reports) repeats.
    """

    workdir: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    mask_steps: list[int]
    partial: str | None = None

    @property
    def last_step(self) -> int | None:
        return self.rows[-1]["step"] if self.rows else None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of every row that has ``key``, as float64 arrays."""
        pairs = [(r["step"], float(r[key])) for r in self.rows if key in r]
        steps, values = zip(*pairs, strict=True) if pairs else ((), ())
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted metric keys starting with ``prefix``."""
        return sorted({k for r in self.rows for k in r if k.startswith(prefix) and k != "step"})

    def masks(self, step: int) -> dict[str, Packed]:
        """The snapshot at ``step`` as ``{layer: Packed}`` (numpy bits); RecordError in one
        line if it does not read (:func:`broken_snapshot`)."""
        path = mask_path(self.workdir, step)
        try:
            masks = read_masks(path)
            if not masks:
                raise ValueError("no layers")
            return masks
        except Exception as err:  # BadZipFile, EOFError, a CRC error, a missing member
            raise broken_snapshot(path, err) from None


# Names before regime_jax 0.3 (the stability test was called a "probe", like the probe set).
OLD_KEY_PREFIXES = {"probe/": "stability/"}
OLD_CONFIG_FIELDS = {("stability", "probe_size"): ("stability", "num_examples")}


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row with the stability test's pre-0.3 keys (``probe/...``) renamed (``stability/...``).

    >>> upgrade_row({"step": 0, "probe/kept@1e-06": 1.0})
    {'step': 0, 'stability/kept@1e-06': 1.0}
    """
    out = {}
    for key, value in row.items():
        for old, new in OLD_KEY_PREFIXES.items():
            key = new + key.removeprefix(old) if key.startswith(old) else key
        out[key] = value
    return out


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with pre-0.3 field names renamed (``stability.probe_size``)."""
    for (block, old), (_, new) in OLD_CONFIG_FIELDS.items():
        if isinstance(config.get(block), dict) and old in config[block]:
            config[block][new] = config[block].pop(old)
    return config


def broken_snapshot(path: Path, err: BaseException) -> RecordError:
    why = (str(err).splitlines() or [""])[0][:120]
    return RecordError(
        f"{path} does not read ({type(err).__name__}: {why}): a broken mask snapshot; run the "
        f"run's training command again on its workdir (it sets the snapshot aside and writes "
        f"it again from a checkpoint)"
    )


def _check_snapshot(path: Path) -> None:
    """Raises RecordError unless ``path`` opens as an ``.npz`` with bits and units per layer
    (its directory only; :meth:`Run.masks` checks each array's CRC as it reads it)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
        layers = {
            n.removeprefix("bits/").removesuffix(".npy") for n in names if n.startswith("bits/")
        }
        if not layers or any(f"units/{k}.npy" not in names for k in layers):
            raise ValueError("no layers" if not layers else "a layer without its unit count")
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise broken_snapshot(path, err) from None


def load_run(workdir: str | os.PathLike) -> Run:
    """Reads ``config.json``, ``metrics.jsonl`` and the list of mask snapshots.

    A run that is not finished (killed mid-way, still being written by another process, or
    stopped by a non-finite loss) is read and marked, not refused: ``run.partial`` says
    ``"partial at step N of M (why)"`` and every output made from the run repeats it. Marking
    rather than refusing lets a user look at a live run's progress or at what a killed run
    reached, which a refusal would forbid, while nothing made from it can pass for a
    finished run's result. A torn last line (a writer killed, or still writing, mid-line) is
    dropped; a corrupt earlier line or steps out of order raise :class:`RecordError`, as does
    a mask snapshot that does not open (truncated, not an ``.npz``, a layer missing), naming
    the file and the way out; :meth:`Run.masks` checks each array as it reads it.

    Runs written before 0.3 are read with their stability keys renamed (:func:`upgrade_row`,
    :func:`upgrade_config`); they are read, not resumed.
    """
    workdir = Path(workdir)
    config = upgrade_config(read_json(workdir / CONFIG))
    rows = [upgrade_row(row) for row in read_rows(workdir)]
    snapshots = sorted((workdir / MASKS_DIR).glob("step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9].npz"))
    for path in snapshots:
        _check_snapshot(path)
    steps = [int(p.stem.removeprefix("step_")) for p in snapshots]
    return Run(workdir, config, rows, steps, partial_mark(workdir, config, rows))
