"""Shared fixtures: tiny configs that run in a second or two on a CPU, synthetic run dirs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from regime_jax import records
from regime_jax.bitmask import Packed
from regime_jax.configs.base import base_config
from regime_jax.configs.overrides import apply_overrides


def tiny_config(**overrides):
    """MLP 40-16-16-10 on MNIST-1D: 12 steps, every step recorded and snapshotted."""
    c = base_config()
    c.model.hidden = (16, 12)
    c.batch_size, c.num_steps, c.probe.size = 32, 12, 24
    c.record.every_steps, c.record.snapshot_every_steps = 1, 1
    c.log_every_steps, c.eval_every_steps, c.eval_batch_size = 5, 6, 256
    apply_overrides(c, overrides, "tiny_config")
    return c


# Small configs of every built-in family and an input shape, shared by the capture and
# decoupling tests.
BUILTIN = {
    "mlp": ({"name": "mlp", "hidden": (16, 12)}, (7, 10)),
    "cnn": ({"name": "cnn", "dims": 2, "channels": (4, 6), "dense": (8,)}, (7, 8, 8, 1)),
    "cnn_norm": (
        {"name": "cnn", "dims": 1, "channels": (4,), "dense": (8,), "norm": "layer"},
        (7, 12),
    ),
    "transformer": (
        {
            "name": "transformer",
            "num_layers": 2,
            "num_heads": 2,
            "dim": 8,
            "mlp_dim": 16,
            "embed": "scalar",
        },
        (7, 10),
    ),
}


@pytest.fixture
def keep_signal_handlers():
    """main.run installs its start-up handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def wait_for_signal_handlers(proc, timeout_s: float = 60) -> None:
    """Waits until subprocess ``proc`` has installed its SIGTERM handler (or has exited).

    regime_jax's commands install their SIGINT and SIGTERM handlers together, first thing;
    Python's own SIGINT handler is there from the start, so SIGTERM is the one that tells.
    Linux only: reads SigCgt in /proc/<pid>/status.
    """
    deadline = time.time() + timeout_s
    while proc.poll() is None and time.time() < deadline:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        line = next(ln for ln in status.splitlines() if ln.startswith("SigCgt"))
        if int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.005)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (the files say null for non-finite numbers)")


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (invalid JSON)."""
    return json.loads(text, parse_constant=_no_constant)


def write_synthetic_run(
    d: Path,
    tau_flip: float = 20.0,
    ratio: float = 3.0,
    n: int = 600,
    seed: int = 0,
    flip=None,
    last_step: int | None = None,
    timescales: dict | None = None,
) -> Path:
    """A run dir with exponential flip (tau) and step-size (ratio * tau) series and 3 snapshots.

    Layers ``fc1`` (flips with tau) and ``fc2`` (flips with 2 tau) against parts ``fc1``, ``fc2``
    (steps with ratio * tau), plus part ``head``. Train loss 0.1 + 2 exp(-t/50); eval/acc every
    25 steps, peaking at step n/2.
    """
    d.mkdir(parents=True, exist_ok=True)
    cfg = base_config()
    cfg.num_steps, cfg.seed = n, seed
    cfg = cfg.to_dict()
    if timescales is not None:
        cfg["timescales"] = timescales
    records.write_config(d, cfg)
    rng = np.random.default_rng(seed)
    rows = [{"step": 0, "eval/acc": 0.1}]
    for t in range(1, (last_step or n) + 1):
        noise = lambda: 1 + 1e-3 * rng.standard_normal()
        h = math.exp(-(t - 1) / tau_flip) * noise() if flip is None else flip(t)
        s = math.exp(-(t - 1) / (ratio * tau_flip)) * noise()
        row = {"step": t, "train/loss": 0.1 + 2 * math.exp(-t / 50), "flip/all": h}
        row |= {
            "flip/fc1": h,
            "flip/fc2": math.exp(-(t - 1) / (2 * tau_flip)) if flip is None else h,
        }
        for kind, scale in (("abs", 1.0), ("rel", 0.01)):
            row |= {f"step/{kind}/{p}": scale * s for p in ("all", "fc1", "fc2", "head")}
        if t % 25 == 0:
            row["eval/acc"] = 0.9 - ((t - n / 2) / n) ** 2
        rows.append(row)
    with open(d / records.METRICS, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for step in (0, 10, 20):
        bits = {k: rng.random((16, u)) < 0.5 for k, u in (("fc1", 12), ("fc2", 10))}
        records.write_masks(d, step, {k: Packed.from_bool(b) for k, b in bits.items()})
    return d


HAS_PROC = Path("/proc/self/status").exists()


@pytest.fixture
def tiny():
    return tiny_config


# --- the installed package, not the clone -------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the clone gets no build/ folder)."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "regime_jax", src / "regime_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # Build isolation, as `pip install -e .` (the README's install) does: setuptools>=68 and
    # wheel come from pip's index or cache, not necessarily from this environment.
    dist = tmp_path / "dist"
    subprocess.run([*PIP, "wheel", "--no-deps", "-w", dist, src], check=True)
    (wheel,) = dist.glob("regime_jax-*.whl")
    return wheel


@pytest.fixture(scope="session")
def installed_site(tmp_path_factory) -> Path:
    """regime_jax installed from its wheel (not editable) into a folder of its own, its
    dependencies from this environment: put it first on PYTHONPATH (:func:`installed_env`)."""
    tmp = tmp_path_factory.mktemp("installed")
    wheel = build_wheel(tmp)
    site = tmp / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True
    )
    return site


def installed_env(site: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process that imports regime_jax from ``site``, not the clone."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return env


# A child's first statement with installed_env: fails unless regime_jax comes from the install.
FROM_THE_INSTALL = (
    "import pathlib, regime_jax; "
    f"assert not pathlib.Path(regime_jax.__file__).resolve().is_relative_to({str(ROOT)!r}), "
    "'regime_jax imported from the clone: ' + regime_jax.__file__"
)
