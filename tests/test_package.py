"""The installed package, not the clone: a wheel carries every config, and the main job runs
from it by name in a directory outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from regime_jax import configs, records

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def _wheel(tmp_path: Path) -> Path:
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


def test_a_wheel_install_runs_the_main_job_by_name(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        shipped = set(z.namelist())
    packaged = {f"regime_jax/configs/{n}.py" for n in configs.names()}
    assert packaged | {"regime_jax/configs/__init__.py"} <= shipped

    # regime_jax from the wheel's install, its dependencies from this interpreter's environment.
    site = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    elsewhere = tmp_path / "elsewhere"  # no clone, no experiments/ folder here
    elsewhere.mkdir()

    def python(*args, **kwargs):
        return subprocess.run(
            [sys.executable, *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            **kwargs,
        )

    where = python("-c", "import regime_jax.configs as c; print(c.__file__, *c.names())")
    origin, *names = where.stdout.split()
    assert Path(origin).is_relative_to(site) and not Path(origin).is_relative_to(ROOT), origin
    assert names == configs.names()

    workdir = tmp_path / "run"
    done = python("-m", "regime_jax.main", "--config", "mlp_mnist1d:quick", f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr
    run = records.load_run(workdir)
    assert run.rows[-1]["step"] == configs.load("mlp_mnist1d:quick").num_steps
    assert "flip/all" in run.keys()
