"""What a run is: the fingerprint its directory, checkpoints and snapshots carry.

A fingerprint is ``{"config": ..., "data": ..., "version": ...}``: the resolved config without
the fields that do not change results (``loop.RESUME_IGNORES``), a content hash of the
dataset's arrays, and the package version (recorded, not compared). It is written

* to ``workdir/fingerprint.json`` when the run is created (and when it is extended), a file no
  command rewrites on resume, so a hand-edited ``config.json`` no longer matches it;
* into each checkpoint's orbax metadata (``custom_metadata["regime_jax"]``), with the SHA-256 of
  every mask snapshot up to that step, committed atomically with the checkpoint.

A resume, an extension and a sweep's "already finished" compare fingerprints and refuse a
mismatch naming the fields (:func:`mismatch`); a resume checks every snapshot it relies on
against the hashes of the checkpoint it resumes from (:func:`bad_snapshots`). Runs written
before fingerprints existed (no ``fingerprint.json``) are checked by ``config.json`` as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from regime_jax import records
from regime_jax.configs.base import ADDED_FIELDS

FILE = "fingerprint.json"
KEY = "regime_jax"  # the checkpoint metadata entry
BROKEN_MASKS = "broken_masks"
OUT = "Use another workdir or --config.overwrite=True (deletes the run)."


def make(config: Mapping[str, Any], data_id: str | None, ignores: Iterable[str]) -> dict:
    """The fingerprint of a run of ``config`` on data whose content hash is ``data_id``."""
    from regime_jax import __version__

    fields = records.jsonable(dict(config))
    return {
        "config": _without(fields, set(ignores)),
        "data": data_id,
        "version": __version__,
    }


def _without(fields: Mapping[str, Any], ignores: set[str]) -> dict:
    """``fields`` less the ``ignores``, top-level names or dotted (``record.probe_chunk``)."""
    out = {}
    for key, value in fields.items():
        if key in ignores:
            continue
        nested = {i.split(".", 1)[1] for i in ignores if i.startswith(f"{key}.")}
        out[key] = _without(value, nested) if nested and isinstance(value, Mapping) else value
    return out


def diff(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted names of the fields (and ``data``) in which two fingerprints differ."""
    old, new = recorded.get("config", {}), current.get("config", {})
    out = records.config_diff(old, new, added=ADDED_FIELDS)
    if recorded.get("data") and current.get("data") and recorded["data"] != current["data"]:
        out.append("data")
    return out


def describe(fields: list[str], recorded: Mapping, current: Mapping) -> str:
    """``['f', ...] (f: X there, Y here; ...)`` for the differing fields (a few shown)."""

    def value(fp: Mapping, field: str) -> Any:
        if field == "data":
            return fp.get("data")
        node: Any = fp.get("config", {})
        for part in field.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    shown = [f"{f}: {value(recorded, f)!r} there, {value(current, f)!r} here" for f in fields[:4]]
    return f"{fields} ({'; '.join(shown)}{'; ...' if len(fields) > 4 else ''})"


def path(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / FILE


def read(workdir: str | os.PathLike) -> dict | None:
    """The run's recorded fingerprint; None if it has none (a run from before fingerprints).

    Raises records.RecordError if the file exists but does not read.
    """
    p = path(workdir)
    if not p.exists():
        return None
    try:
        fp = json.loads(p.read_text())
        if not isinstance(fp, dict) or not isinstance(fp.get("config"), dict):
            raise ValueError("not a fingerprint")
        return fp
    except (OSError, ValueError) as err:
        raise records.RecordError(
            f"{p} is unreadable ({type(err).__name__}); refusing to trust the run in "
            f"{Path(workdir)}. {OUT}"
        ) from None


def write(workdir: str | os.PathLike, fp: Mapping[str, Any]) -> None:
    records.write_atomic(path(workdir), records.to_json(fp, indent=1, sort_keys=True) + "\n")


def file_hash(p: str | os.PathLike) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def snapshot_hashes(workdir: str | os.PathLike, upto: int, cache: dict[int, str]) -> dict:
    """``{step: sha256}`` of every mask snapshot at or before ``upto`` (``cache`` reused)."""
    out = {}
    for snap in sorted((Path(workdir) / records.MASKS_DIR).glob("step_*.npz")):
        stem = snap.name.removeprefix("step_").removesuffix(".npz")
        if not stem.isdigit() or int(stem) > upto:
            continue
        step = int(stem)
        if step not in cache:
            cache[step] = file_hash(snap)
        out[str(step)] = cache[step]
    return out


def bad_snapshots(
    workdir: str | os.PathLike, steps: Iterable[int], hashes: Mapping[str, str] | None
) -> list[tuple[int, str]]:
    """``(step, why)`` of each existing snapshot in ``steps`` that does not read or whose
    content differs from ``hashes`` (recorded by the checkpoint; None: read only)."""
    out = []
    for s in steps:
        p = records.mask_path(workdir, s)
        if not p.exists():
            continue  # a missing one is records.check_record's to report
        if hashes is not None and str(s) in hashes:
            if file_hash(p) != hashes[str(s)]:
                out.append((s, "its content differs from the hash its checkpoint recorded"))
            continue
        try:
            masks = records.read_masks(p)
            if not masks:
                raise ValueError("no layers")
        except Exception as err:  # BadZipFile, EOFError, ValueError, KeyError, OSError
            out.append((s, f"it does not read ({type(err).__name__})"))
    return out


def set_aside_snapshot(workdir: str | os.PathLike, step: int) -> Path:
    """Moves ``masks/step_N.npz`` to ``broken_masks/step_N[.k].npz`` and returns the target."""
    src = records.mask_path(workdir, step)
    folder = Path(workdir) / BROKEN_MASKS
    folder.mkdir(exist_ok=True)
    target, k = folder / src.name, 0
    while target.exists():
        k += 1
        target = folder / f"{src.stem}.{k}.npz"
    os.replace(src, target)
    return target
