"""Tests for regime_jax.report (run summaries, sweep report) and regime_jax.sweep (grid, resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from regime_jax import records, report, sweep, train
from regime_jax.bitmask import Packed
from regime_jax.config import ConfigError, base_config

ROOT = Path(__file__).resolve().parent.parent
MLP_MNIST1D = "mlp_mnist1d"
LN10 = math.log(10.0)


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


# ------------------------------------------------------------------------- summarize_run


def test_summarize_run_recovers_lag_ratio_three(tmp_path):
    s = report.summarize_run(write_synthetic_run(tmp_path, tau_flip=20.0, ratio=3.0, n=600))
    assert s["main_rule"] == "settle" and s["complete"] and s["notes"] == []
    for kind in ("abs", "rel"):
        for rule in ("settle", "cumsum", "threshold"):
            lag = s["lag"][kind][rule]
            assert lag["status"] == "ok", lag
            assert lag["ratio"] == pytest.approx(3.0, rel=0.06), (kind, rule)
    t_flip = s["decay"]["flip/all"]["settle"]["time"]
    assert t_flip - 1 == pytest.approx(20.0 * LN10, abs=3)
    assert s["layers"]["fc1"]["abs"]["ratio"] == pytest.approx(3.0, rel=0.06)
    assert s["layers"]["fc2"]["abs"]["ratio"] == pytest.approx(1.5, rel=0.06)
    assert s["layers"]["fc2"]["part"] == "fc2"
    assert s["reference"]["mva_step"] == 300
    # 0.1 + 2 exp(-t/50) <= 1.1 * (0.1 + 2 exp(-12)) first at t = 50 ln(2 / 0.01001) = 264.9
    assert abs(s["reference"]["loss_1p1_step"] - 265) <= 2
    json.dumps(s, allow_nan=False)  # strict JSON


def test_summary_uses_config_timescales_and_falls_back_with_note(tmp_path):
    fields = dict(base_config().timescales.to_dict(), rule="cumsum", window=11)
    s = report.summarize_run(write_synthetic_run(tmp_path / "a", timescales=fields))
    assert s["main_rule"] == "cumsum" and s["decay_config"]["window"] == 11
    assert report.main_ratio(s) == s["lag"]["abs"]["cumsum"]["ratio"]
    s = report.summarize_run(write_synthetic_run(tmp_path / "b", timescales={}))
    assert s["main_rule"] == "settle" and "default DecayConfig" in s["notes"][0]


def test_flat_short_and_nonfinite_series_give_statuses_not_crashes(tmp_path):
    flat = report.summarize_run(write_synthetic_run(tmp_path / "flat", flip=lambda t: 0.01))
    assert flat["decay"]["flip/all"]["settle"]["status"] == "flat"
    lag = flat["lag"]["abs"]["settle"]
    assert lag["status"] == "flip_rate: flat" and lag["ratio"] is None and lag["message"]
    assert flat["lag"]["abs"]["cumsum"]["status"] == "flip_rate: flat"

    short = report.summarize_run(write_synthetic_run(tmp_path / "short", n=10))
    for key in report.SERIES:
        assert short["decay"][key]["settle"]["status"] == "too_short"
    assert (
        short["lag"]["rel"]["threshold"]["status"] == "step_size: too_short; flip_rate: too_short"
    )

    d = write_synthetic_run(tmp_path / "nan")
    lines = (d / records.METRICS).read_text().splitlines()
    row = json.loads(lines[5]) | {"step/abs/all": "nan"}  # how MetricsWriter stores NaN
    (d / records.METRICS).write_text("\n".join([*lines[:5], json.dumps(row), *lines[6:]]))
    bad = report.summarize_run(d)
    assert bad["decay"]["step/abs/all"]["settle"]["status"] == "nonfinite"
    assert bad["lag"]["abs"]["settle"]["status"] == "step_size: nonfinite"
    assert bad["lag"]["rel"]["settle"]["status"] == "ok"
    json.dumps(bad, allow_nan=False)


def test_layer_to_part_mapping_and_skip_note(tmp_path):
    d = write_synthetic_run(tmp_path)
    lines = (d / records.METRICS).read_text().splitlines()
    extra = []
    for line in lines:
        row = json.loads(line)
        if "flip/all" in row:
            row |= {"flip/block0/ffn/fc1": row["flip/all"], "flip/conv9": row["flip/all"]}
            row |= {"step/abs/block0": row["step/abs/all"], "step/rel/block0": row["step/rel/all"]}
        extra.append(json.dumps(row))
    (d / records.METRICS).write_text("\n".join(extra) + "\n")
    s = report.summarize_run(d)
    assert s["layers"]["block0/ffn/fc1"]["part"] == "block0"
    assert s["layers"]["block0/ffn/fc1"]["abs"]["ratio"] == pytest.approx(3.0, rel=0.06)
    assert "conv9" not in s["layers"]
    assert any("conv9" in n and "skipped" in n for n in s["notes"])


def test_write_run_summary_and_flip_raster(tmp_path):
    d = write_synthetic_run(tmp_path)
    path = report.write_run_summary(d)
    assert path == d / "summary.json" and json.loads(path.read_text())["complete"]
    run = records.load_run(d)
    layer, steps, frac = report.flip_raster(run, max_units=8)
    assert layer == "fc1" and steps.tolist() == [10, 20] and frac.shape == (8, 2)
    a, b = (np.asarray(run.masks(s)["fc1"].unpack())[:, :8] for s in (0, 10))
    np.testing.assert_allclose(frac[:, 0], (a != b).mean(axis=0))


def test_verdicts():
    stats = lambda mean, lo, hi: {"mean": mean, "ci_low": lo, "ci_high": hi}
    assert report.verdict(stats(3.5, 3.0, 4.0)).startswith("agrees")
    assert report.verdict(stats(2.0, 1.5, 2.5)) == "lag > 1 but below paper"
    assert report.verdict(stats(0.5, 0.4, 0.6)).startswith("disagrees")
    assert report.verdict(stats(1.1, 0.9, 1.3)).startswith("inconclusive")
    assert report.verdict(stats(6.0, 5.0, 7.0)).startswith("lag > 1 and above paper")
    assert "one seed" in report.verdict(stats(0.5, None, None))
    assert report.verdict(stats(None, None, None)).startswith("no verdict")


def test_import_report_is_light():
    code = (
        "import sys, regime_jax.report; "
        "heavy = ('matplotlib', 'regime_jax.train', 'regime_jax.sweep'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ------------------------------------------------------------------------- build_report


def test_build_report_on_synthetic_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("DISPLAY", raising=False)
    ratios = {
        ("alpha", "sgd"): [3.5, 3.85, 4.2],
        ("alpha", "adam"): [0.5, 0.55, 0.6],
        ("beta", "sgd"): [2.0, 2.2, 2.4],
        ("beta", "adam"): [3.0, 3.0, None],  # seed 2: flat flips
    }
    for (setting, opt), values in ratios.items():
        for seed, r in enumerate(values):
            flip = (lambda t: 0.01) if r is None else None
            d = tmp_path / setting / opt / f"seed_{seed}"
            write_synthetic_run(d, tau_flip=40.0, ratio=r or 3.0, n=1500, seed=seed, flip=flip)
    write_synthetic_run(tmp_path / "beta" / "adam" / "seed_3", n=200, last_step=100)  # died

    out = report.build_report(tmp_path)

    md = (tmp_path / "report.md").read_text()
    for setting, opt in ratios:
        assert f"| {setting} | {opt} |" in md
    assert md.count("| 3.85x |") == 4 and "| paper |" in md
    assert "- alpha / sgd: agrees: CI contains 3.85" in md
    assert "- alpha / adam: disagrees: patterns settle later than weights" in md
    assert "- beta / sgd: lag > 1 but below paper" in md
    assert "beta/adam/seed_2: abs lag: flip_rate:" in md
    assert "beta/adam/seed_3: incomplete: last logged step 100 of 200" in md
    assert "| beta | adam | 2/3 |" in md

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["groups"]) == ["alpha/adam", "alpha/sgd", "beta/adam", "beta/sgd"]
    settle = summary["groups"]["alpha/sgd"]["lag"]["abs"]["settle"]
    assert settle["n"] == 3 and settle["mean"] == pytest.approx(3.85, rel=0.05)
    assert settle["per_seed"][0] == pytest.approx(3.5, rel=0.06)
    assert summary["groups"]["beta/adam"]["lag"]["abs"]["settle"]["per_seed"][2] is None
    assert len(summary["runs"]) == 12 and out["table"].count("\n") == 5
    assert (tmp_path / "alpha" / "sgd" / "seed_0" / "summary.json").exists()

    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs == ["alpha.png", "alpha_raster.png", "beta.png", "beta_raster.png"]
    assert all((tmp_path / "figures" / p).stat().st_size > 5_000 for p in pngs)
    assert sorted(Path(p).name for p in out["figures"]) == pngs


def test_report_cli_prints_table_and_path(tmp_path, capsys):
    for seed in (0, 1):
        write_synthetic_run(tmp_path / "only" / "sgd" / f"seed_{seed}", seed=seed)
    report.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| only | sgd | 2/2 |" in out and f"report: {tmp_path / 'report.md'}" in out


# ------------------------------------------------------------------------------- sweep


def _sweep_config(settings, optimizers=None, seeds=(0,), overrides=None):
    c = ml_collections.ConfigDict()
    c.settings = settings
    c.optimizers = optimizers or {"sgd": {"name": "sgd", "learning_rate": 0.05}}
    c.seeds = list(seeds)
    c.overrides = overrides or {}
    return c


def test_grid_composition_order():
    setting = {
        "name": "quick",
        "experiment": MLP_MNIST1D,
        "arg": "quick",
        "overrides": {"num_steps": 20, "optimizer.learning_rate": 0.2, "seed": 8},
        "optimizers": {"sgd": {"momentum": 0.5}},
    }
    c = _sweep_config(
        [setting],
        optimizers={"adam": {"name": "adam", "learning_rate": 0.1}, "sgd": {"name": "sgd"}},
        seeds=[3, 4],
        overrides={"num_steps": 30, "eval_every_steps": 10, "optimizer": {"learning_rate": 0.3}},
    )
    specs = sweep.expand_grid(c)
    paths = ["quick/adam/seed_3", "quick/adam/seed_4", "quick/sgd/seed_3", "quick/sgd/seed_4"]
    assert [s.path for s in specs] == paths
    adam, sgd = specs[0].config, specs[3].config
    assert adam.probe.size == 64  # experiment's :quick value survives
    assert adam.eval_every_steps == 10  # sweep overrides > experiment
    assert adam.num_steps == 20  # setting > sweep
    assert (
        adam.optimizer.name == "adam" and adam.optimizer.learning_rate == 0.1
    )  # optimizer > setting
    assert sgd.optimizer.learning_rate == 0.2 and sgd.optimizer.momentum == 0.5  # per-setting opt
    assert [s.config.seed for s in specs] == [3, 4, 3, 4]  # seed > everything
    assert len({(s.config.probe.seed, s.config.dataset.seed) for s in specs}) == 1
    assert all(s.config.overwrite for s in specs)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"model.hiden": (4,)}, "model.hiden"),
        ({"num_steps": "many"}, "num_steps"),
    ],
)
def test_invalid_field_in_one_setting_raises_before_any_run(tmp_path, monkeypatch, override, field):
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("a run started"))
    good = {"name": "good", "experiment": MLP_MNIST1D, "arg": "quick", "overrides": {}}
    bad = {"name": "bad", "experiment": MLP_MNIST1D, "arg": "quick", "overrides": override}
    with pytest.raises(ConfigError, match=rf"setting 'bad'.*{field}"):
        sweep.run_sweep(_sweep_config([good, bad]), tmp_path / "sw", log=lambda _: None)
    assert not (tmp_path / "sw").exists()


def _tiny_setting() -> dict:
    tiny = {"model.hidden": [16, 12], "batch_size": 32, "num_steps": 12, "probe.size": 24}
    tiny |= {"record": {"every_steps": 1, "snapshot_every_steps": 1}, "eval_batch_size": 256}
    tiny |= {"log_every_steps": 5, "eval_every_steps": 6}
    if "checkpoint" in base_config():
        tiny["checkpoint.every_steps"] = 0
    return {"name": "tiny", "experiment": MLP_MNIST1D, "arg": "quick", "overrides": tiny}


def test_sweep_runs_resumes_and_reruns_deleted_summary(tmp_path, monkeypatch):
    calls = []
    real = train.train_and_evaluate
    monkeypatch.setattr(
        train, "train_and_evaluate", lambda cfg, wd: calls.append(Path(wd)) or real(cfg, wd)
    )
    c, wd, log = _sweep_config([_tiny_setting()], seeds=[0, 1]), tmp_path / "sw", []
    first = sweep.run_sweep(c, wd, log=log.append)
    assert [p.name for p in calls] == ["seed_0", "seed_1"] and first["failed"] == {}
    assert (wd / "report.md").exists() and (wd / "summary.json").exists()
    grid = json.loads((wd / "sweep.json").read_text())
    assert [r["path"] for r in grid["runs"]] == ["tiny/sgd/seed_0", "tiny/sgd/seed_1"]
    assert grid["runs"][1]["config"]["seed"] == 1 and grid["runs"][1]["config"]["num_steps"] == 12
    assert any(line.startswith("[2/2]") and "eval/acc" in line for line in log)

    second = sweep.run_sweep(c, wd, log=log.append)
    assert len(calls) == 2 and second["skipped"] == ["tiny/sgd/seed_0", "tiny/sgd/seed_1"]

    (wd / "tiny" / "sgd" / "seed_1" / "summary.json").unlink()
    third = sweep.run_sweep(c, wd, log=log.append)
    assert calls[2:] == [wd / "tiny" / "sgd" / "seed_1"] and third["ran"] == ["tiny/sgd/seed_1"]
    steps = [r["step"] for r in records.load_run(wd / "tiny" / "sgd" / "seed_1").rows]
    assert steps == list(range(13))  # restarted afresh, not appended
    assert (wd / "tiny" / "sgd" / "seed_1" / "summary.json").exists()


def test_failed_run_is_reported_and_sweep_goes_on(tmp_path, monkeypatch):
    def fake_train(cfg, wd):
        if cfg.seed == 0:
            raise FloatingPointError("non-finite loss")
        write_synthetic_run(Path(wd), n=cfg.num_steps, seed=cfg.seed)
        report.write_run_summary(wd)  # as train.train_and_evaluate does at the end

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    out = sweep.run_sweep(
        _sweep_config([_tiny_setting()], seeds=[0, 1]), tmp_path, log=lambda _: None
    )
    assert list(out["failed"]) == ["tiny/sgd/seed_0"] and out["ran"] == ["tiny/sgd/seed_1"]
    assert "non-finite loss" in out["failed"]["tiny/sgd/seed_0"]
    assert "| tiny | sgd | 0/1 |" in (tmp_path / "report.md").read_text()


def test_reproduce_config_variants_expand_and_validate():
    from regime_jax.configs import reproduce as module

    quick = sweep.expand_grid(module.get_config("quick"))
    assert len(quick) == 8 and {s.setting for s in quick} == {"mlp_mnist1d", "mlp_digits"}
    grid = sweep.expand_grid(module.get_config())
    assert len(grid) == 10 * len(module.get_config().settings) >= 20
    assert all(s.config.record.every_steps == 1 for s in grid)
    assert {"mlp_mnist1d", "mlp_digits"} <= {s.setting for s in grid}
    assert {s.setting for s in sweep.expand_grid(module.get_config("full"))} >= {"mlp_mnist"}
    with pytest.raises(ValueError, match="unknown config variant"):
        module.get_config("nope")
