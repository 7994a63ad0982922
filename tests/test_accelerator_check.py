"""``experiments/accelerator_check.sh``: each stage starts, prints its header, is time-boxed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "experiments" / "accelerator_check.sh"
TITLES = [
    "bench_overhead: MLP",
    "bench_overhead: CNN (cnn_cifar10)",
    "bench_overhead: ViT (vit_cifar10)",
    "bench_memory: large models",
    "bench_throughput: K = 1, 8, 32",
    "training run: ResNet-18 (resnet18_cifar10:quick)",
    "training run: ReLU-GPT (gpt_shakespeare:quick)",
]


def _check(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = os.environ | {"ACCEL_CHECK_LOG": str(tmp_path / "check.log"), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,  # the script finds the repository from its own path
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _headers(out: str) -> list[str]:
    return re.findall(r"^=== \[(\d)/7\] (.*?)(?: \(time limit \d+s\))? ===$", out, re.M)


def test_dry_run_lists_every_stage_with_a_time_limit_and_a_command_that_exists(tmp_path):
    done = _check(tmp_path, "--dry-run", timeout=60)
    assert done.returncode == 0, done.stderr
    assert _headers(done.stdout) == [(str(i), t) for i, t in enumerate(TITLES, start=1)]
    limits = [int(s) for s in re.findall(r"\(time limit (\d+)s\)", done.stdout)]
    bench_memory = (ROOT / "experiments" / "bench_memory.py").exists()
    assert len(limits) == 6 + bench_memory and sum(limits) < 8 * 60  # under 8 minutes
    for script in re.findall(r"^\$ \S+ (\S+\.py)", done.stdout, re.M):
        assert (ROOT / script).exists() or script.endswith("train_probe.py"), script
    assert (tmp_path / "check.log").read_text() == done.stdout  # stdout and the log alike


def test_unknown_argument_is_one_line_and_exit_2(tmp_path):
    done = _check(tmp_path, "--gpu", timeout=30)
    assert done.returncode == 2 and "unknown argument '--gpu'" in done.stderr


@pytest.mark.heavy
def test_cpu_smoke_runs_every_stage(tmp_path):
    done = _check(tmp_path, "--cpu-smoke", timeout=2400)
    out = done.stdout
    assert _headers(out) == [(str(i), t) for i, t in enumerate(TITLES, start=1)], out
    assert done.returncode == 0, out[-3000:]
    assert "problems: none" in out
    for i in (1, 2, 3, 5, 6, 7):
        assert f"--- [{i}/7] done in" in out
    assert "ratio" in out and "steps/s" in out  # bench_overhead, bench_throughput figures
    assert len(re.findall(r"^RESULT .*steps/s.*peak device memory", out, re.M)) == 2
