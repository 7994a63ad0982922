"""The benchmark scripts still run (smallest sizes; their figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_overhead_runs_and_prints_the_ratio_and_the_mask_memory():
    command = [
        sys.executable, "experiments/bench_overhead.py", "--hidden", "16,16", "--probe", "16",
        "--batch", "8", "--chunks", "1", "--chunk-steps", "1",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "built-in: ratio monitored / +probe" in out.stdout
    assert "user loop: ratio user+mon / user+probe" in out.stdout
    assert "masks: " in out.stdout and "over 2 layers" in out.stdout
