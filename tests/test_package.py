"""The installed package, not the clone: a wheel carries every config, and the main job runs
from it by name in a directory outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, installed_env

from regime_jax import configs, records


def test_a_wheel_install_runs_the_main_job_by_name(installed_site, tmp_path):
    (record,) = installed_site.glob("regime_jax-*.dist-info/RECORD")
    shipped = {line.split(",")[0] for line in record.read_text().splitlines()}
    packaged = {f"regime_jax/configs/{n}.py" for n in configs.names()}
    assert packaged | {"regime_jax/configs/__init__.py"} <= shipped

    # regime_jax from the wheel's install, its dependencies from this interpreter's environment.
    site = installed_site
    env = installed_env(site)
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
