"""Tests for regime_jax.report (sweep report, its CLI) and regime_jax.sweep (grid, resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from conftest import write_synthetic_run

from regime_jax import records, report, sweep
from regime_jax.analysis import summary, timescales
from regime_jax.configs.base import ConfigError, base_config
from regime_jax.run import loop

ROOT = Path(__file__).resolve().parents[2]
MLP_MNIST1D = "mlp_mnist1d"
LN10 = math.log(10.0)


def test_import_report_and_summary_is_light():
    code = (
        "import sys, regime_jax.report, regime_jax.analysis.summary; "
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
    # the headline (fraction rule) table and the main (settle) rule's, one row per group each
    assert md.count("| 3.85x |") == 8 and "| paper |" in md
    assert "Headline: the `fraction` rule at f = 1/e" in md
    assert md.index("Rule `fraction` (headline):") < md.index("Rule `settle` (the runs' main")
    assert "- alpha / sgd: agrees: CI contains 3.85; settle: agrees: CI contains 3.85" in md
    assert "- alpha / adam: disagrees: patterns settle later than weights" in md
    assert "- beta / sgd: lag > 1 but below paper" in md
    assert "beta/adam/seed_2: abs lag (settle): flip_rate: smoothed series is constant" in md
    assert "beta/adam/seed_2: abs lag (fraction): flip_rate: smoothed series is" in md
    # every rule's geometric mean, and each run's decay times as fractions of the run
    assert "## Every rule" in md and "| setting | optimizer | settle | cumsum | threshold |" in md
    assert "## Decay times per run" in md
    assert "| beta/adam/seed_2 | settle | – (flat) |" in md
    assert "beta/adam/seed_3: partial at step 100 of 200 (unfinished" in md
    assert "**Partial: 1 of 13 runs are not in this report" in md
    assert md.count("| beta | adam | 2/3 |") == 2

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == {k: out[k] for k in ("runs", "groups", "notes", "online", "partial")}
    assert sorted(written["groups"]) == ["alpha/adam", "alpha/sgd", "beta/adam", "beta/sgd"]
    settle = written["groups"]["alpha/sgd"]["lag"]["abs"]["settle"]
    assert settle["n"] == 3 and settle["mean"] == pytest.approx(3.85, rel=0.05)
    assert settle["geo_mean"] == pytest.approx(3.84, rel=0.05) and settle["budget_bound"] == 0
    fraction = written["groups"]["alpha/sgd"]["lag"]["abs"]["fraction"]
    assert fraction["n"] == 3 and fraction["geo_ci_low"] <= 3.85 <= fraction["geo_ci_high"]
    assert written["groups"]["alpha/sgd"]["headline"] == {
        "rule": "fraction",
        "statistic": "geo_mean",
    }
    assert settle["per_seed"][0] == pytest.approx(3.5, rel=0.06)
    assert written["groups"]["beta/adam"]["lag"]["abs"]["settle"]["per_seed"][2] is None
    assert (
        len(written["runs"]) == 12 and out["table"].count("\n") == 16
    )  # 2 x (caption, blank, 2 + 4) + blank
    assert (tmp_path / "alpha" / "sgd" / "seed_0" / "summary.json").exists()

    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs == [
        "alpha.png",
        "alpha_raster.png",
        "beta.png",
        "beta_raster.png",
        "lag_curves.png",
    ]
    assert all((tmp_path / "figures" / p).stat().st_size > 5_000 for p in pngs)
    assert sorted(Path(p).name for p in out["figures"]) == pngs

    # lag-ratio curves: per-group aggregates in summary.json, the table and figure in report.md
    curves = written["groups"]["alpha/sgd"]["curves"]
    assert sorted(curves) == sorted(timescales.CURVE_GRIDS)
    assert curves["delta"]["n"] == [3] * 10 and curves["delta"]["rule"] == "settle"
    assert (
        "## Lag ratio over each rule's parameter" in md
        and "![lag_curves](figures/lag_curves.png)" in md
    )
    head = "| setting | optimizer | threshold_fraction (0.05–0.5) | delta (0.02–0.2) |"
    assert head in md
    last = {}  # each group's last row: its row in the curves table
    for line in md.splitlines():
        if line.startswith("| alpha | "):
            last[line.split(" | ")[1]] = line
    assert last["adam"].count("nowhere") == 4  # ratios ~0.55: 3.85 is never in the CI
    assert "nowhere" not in last["sgd"]  # ratios 3.5-4.2 around 3.85


def test_report_cli_prints_table_and_path(tmp_path, capsys):
    for seed in (0, 1):
        write_synthetic_run(tmp_path / "only" / "sgd" / f"seed_{seed}", seed=seed)
    report.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| only | sgd | 2/2 |" in out and f"report: {tmp_path / 'report.md'}" in out
    assert "Rule `fraction` (headline):" in out


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
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *a: pytest.fail("a run started"))
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
    real = loop.train_and_evaluate
    monkeypatch.setattr(
        loop, "train_and_evaluate", lambda cfg, wd: calls.append(Path(wd)) or real(cfg, wd)
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
        summary.write_run_summary(wd)  # as loop.train_and_evaluate does at the end

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
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
    assert {s.optimizer for s in quick} == {"sgd", "adam"}
    default = module.get_config()
    grid = sweep.expand_grid(default)
    assert len(grid) == 5 * len(default.optimizers) * len(default.settings) >= 20
    by_path = {s.path: s.config for s in grid}
    for opt in ("sgd", "adam"):  # cosine variants: same peak rate, decayed to 0
        const, cos = by_path[f"mlp_digits/{opt}/seed_0"], by_path[f"mlp_digits/{opt}_cosine/seed_0"]
        assert (const.optimizer.schedule, cos.optimizer.schedule) == ("constant", "cosine")
        assert cos.optimizer.learning_rate == const.optimizer.learning_rate
        assert cos.optimizer.name == const.optimizer.name == opt
    for name in ("mlp_mnist1d", "mlp_digits", "cnn_digits"):  # 3x longer MLP and CNN runs
        base, long = by_path[f"{name}/sgd/seed_0"], by_path[f"{name}_long/sgd_cosine/seed_0"]
        assert long.num_steps == 3 * base.num_steps and long.model == base.model
    assert not any(s.setting.startswith("transformer") and "_long" in s.setting for s in grid)
    assert all(s.config.record.every_steps == 1 for s in grid)
    assert {"mlp_mnist1d", "mlp_digits"} <= {s.setting for s in grid}
    assert {s.setting for s in sweep.expand_grid(module.get_config("full"))} >= {"mlp_mnist"}
    with pytest.raises(ValueError, match="unknown config variant"):
        module.get_config("nope")
