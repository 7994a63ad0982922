"""What a run leaves in its workdir, and :func:`load_run` to read it back.

``workdir/``
  * ``config.json``: the resolved config.
  * ``metrics.jsonl``: one JSON object per logged step: ``"step"`` plus ``/``-namespaced keys
    (``train/loss``, ``flip/fc1``, ``step/abs/all``, ``eval/acc``, ...). Appended and flushed
    at every host fetch, so a run that dies keeps every row written before.
  * ``masks/step_NNNNNNN.npz``: packed patterns of the probe set at a snapshot step; per
    layer ``bits/<layer>`` (uint8, little bit order, packed along units) and
    ``units/<layer>`` (the unit count that unpacks them exactly).

>>> run = load_run("runs/mlp_mnist1d")            # doctest: +SKIP
>>> steps, flips = run.series("flip/all")         # doctest: +SKIP
>>> fc1 = run.masks(run.mask_steps[-1])["fc1"].unpack()   # bool [P, U]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from regime_jax.bitmask import Packed

METRICS = "metrics.jsonl"
CONFIG = "config.json"
MASKS_DIR = "masks"
SUMMARY = "summary.json"


def _jsonable(value: Any) -> Any:
    value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and flushes after every :meth:`write`."""

    def __init__(self, workdir: str | os.PathLike):
        self._file = open(Path(workdir) / METRICS, "a", encoding="utf-8")

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
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
        raise PermissionError(f"workdir={str(workdir)!r} cannot be written: {err}") from err
    return workdir


def has_run(workdir: str | os.PathLike) -> bool:
    return (Path(workdir) / METRICS).exists()


def reset(workdir: str | os.PathLike) -> None:
    """Removes a previous run's metrics, mask snapshots and summary."""
    workdir = Path(workdir)
    for name in (METRICS, SUMMARY):
        (workdir / name).unlink(missing_ok=True)
    shutil.rmtree(workdir / MASKS_DIR, ignore_errors=True)


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
    stored: Mapping[str, Any], requested: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """Dotted names of the fields whose values differ (nested dicts are compared per field)."""
    ignore = set(ignore)
    out = []
    for key in sorted(set(stored) | set(requested)):
        if key in ignore:
            continue
        a, b = stored.get(key), requested.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            nested = {i.split(".", 1)[1] for i in ignore if i.startswith(f"{key}.")}
            out += [f"{key}.{k}" for k in config_diff(a, b, nested)]
        elif json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
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
    with np.load(path) as f:
        layers = [k.removeprefix("bits/") for k in f.files if k.startswith("bits/")]
        return {k: Packed(f[f"bits/{k}"], int(f[f"units/{k}"])) for k in layers}


def write_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
    (Path(workdir) / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass
class Run:
    """A run read back from its workdir."""

    workdir: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    mask_steps: list[int]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of every row that has ``key``, as float64 arrays."""
        pairs = [(r["step"], float(r[key])) for r in self.rows if key in r]
        steps, values = zip(*pairs, strict=True) if pairs else ((), ())
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted metric keys starting with ``prefix``."""
        return sorted({k for r in self.rows for k in r if k.startswith(prefix) and k != "step"})

    def masks(self, step: int) -> dict[str, Packed]:
        """The snapshot at ``step`` as ``{layer: Packed}`` (numpy bits)."""
        return read_masks(mask_path(self.workdir, step))


def load_run(workdir: str | os.PathLike) -> Run:
    """Reads ``config.json``, ``metrics.jsonl`` and the list of mask snapshots."""
    workdir = Path(workdir)
    config = json.loads((workdir / CONFIG).read_text())
    with open(workdir / METRICS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = sorted(
        int(p.stem.removeprefix("step_"))
        for p in (workdir / MASKS_DIR).glob("step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9].npz")
    )
    return Run(workdir, config, rows, steps)
