"""Data parallelism on 8 simulated CPU devices: same records as 1 device, arrays really sharded.

The 8-device process is a subprocess (the device count is fixed when JAX starts):
``tests/_parallel_run.py`` trains the tiny config with ``parallel.devices`` = 1 and 8 there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from regime_jax import loop, records
from regime_jax.config import ConfigError

HERE = Path(__file__).parent
FLOAT_RTOL = 1e-4


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("parallel")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_parallel_run.py"), str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_records_of_one(eight):
    workdir, out = eight
    assert out["devices"] == 8
    one = [json.loads(x) for x in (workdir / "d1" / records.METRICS).read_text().splitlines()]
    many = [json.loads(x) for x in (workdir / "d8" / records.METRICS).read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in many]
    for a, b in zip(one, many, strict=True):
        assert set(a) == set(b)
        for key in a:
            if key == "step" or key.split("/")[0] in ("flip", "dead", "always_on"):
                assert a[key] == b[key], (a["step"], key)  # counts reduce exactly
            elif isinstance(a[key], float):
                np.testing.assert_allclose(b[key], a[key], rtol=FLOAT_RTOL, err_msg=key)
    snaps = sorted(p.name for p in (workdir / "d1" / records.MASKS_DIR).glob("*.npz"))
    assert snaps == sorted(p.name for p in (workdir / "d8" / records.MASKS_DIR).glob("*.npz"))
    for name in snaps:
        m1 = records.read_masks(workdir / "d1" / records.MASKS_DIR / name)
        m8 = records.read_masks(workdir / "d8" / records.MASKS_DIR / name)
        for layer in m1:
            np.testing.assert_array_equal(m1[layer].bits, m8[layer].bits)


def test_arrays_are_sharded_and_each_variant_traces_once(eight):
    _, out = eight
    assert out["probe_on_data"] and out["probe_shards"] == 8
    assert out["batch_on_data"]
    assert out["params_replicated"] and out["params_devices"] == 8
    assert out["flip_is_scalar"]
    assert out["traces_8"] == {"True": 1, "False": 1} == out["traces_1"]


def test_sizes_and_device_count_are_validated(eight):
    _, out = eight
    assert "batch_size=32 is not divisible by parallel.devices=3" in out["error_3"]
    assert "parallel.devices=16 but this process has 8 local device(s)" in out["error_16"]


def test_more_devices_than_present_stops_before_any_write(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.devices=2 but this process has 1"):
        loop.train_and_evaluate(tiny_config(**{"parallel.devices": 2}), tmp_path / "w")
    assert not (tmp_path / "w").exists()
