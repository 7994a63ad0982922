"""The decoupling experiment as a sweep: variants, freeze steps from the reference, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_synthetic_run

from regime_jax import sweep
from regime_jax.analysis import decoupling, summary
from regime_jax.configs import decoupled
from regime_jax.configs.base import ConfigError
from regime_jax.run import loop


def _quick(**extra):
    c = decoupled.get_config("quick")
    c.seeds = [0]
    for k, v in extra.items():
        c[k] = v
    return c


def test_variants_expand_in_order_and_validate():
    specs = sweep.expand_grid(_quick())
    assert [s.setting for s in specs] == [
        "mlp_mnist1d@never",
        "mlp_mnist1d@auto",
        "mlp_mnist1d@0T",
        "mlp_mnist1d@0.25T",
        "mlp_mnist1d@0.5T",
        "mlp_mnist1d@1T",
        "mlp_mnist1d@2T",
    ]
    never, auto, *fixed = specs
    assert never.config.decouple.freeze_step == -1 and not never.config.decouple.auto
    assert auto.config.decouple.auto and auto.config.record.every_steps == 1
    assert all(s.reference == never.path and s.config.record.every_steps == 5 for s in fixed)
    assert [s.multiple for s in fixed] == [0.0, 0.25, 0.5, 1.0, 2.0]
    full = sweep.expand_grid(decoupled.get_config())
    assert len(full) == 4 * 2 * 5 * 7
    assert {decoupling.split(s.setting)[0] for s in full} == {
        "mlp_mnist1d",
        "mlp_digits",
        "cnn_digits",
        "transformer_mnist1d",
    }


def test_bad_freeze_block_is_refused_before_any_run():
    c = _quick()
    c.freeze.multiples = [0.5, -1.0]
    with pytest.raises(ConfigError, match=r"freeze\.multiples"):
        sweep.expand_grid(c)
    c = _quick()
    c.freeze.overrides = {"record": {"every_steps": 7}}  # snapshots (5) not a multiple of it
    with pytest.raises(ConfigError, match=r"freeze\.overrides"):
        sweep.expand_grid(c)


def _fake_train(times: dict[str, float | None], calls: list):
    """Writes a synthetic run whose summary has the given T(flip) per rule (the reference)."""

    def train(cfg, wd):
        calls.append((Path(wd), cfg.decouple.freeze_step, cfg.decouple.auto))
        write_synthetic_run(Path(wd), n=cfg.num_steps, seed=cfg.seed)
        summary.write_run_summary(wd)
        s = json.loads((Path(wd) / summary.SUMMARY).read_text())
        for rule, t in times.items():
            s["lag"]["abs"][rule]["t_flip"]["time"] = t
        (Path(wd) / summary.SUMMARY).write_text(json.dumps(s))

    return train


def test_freeze_steps_are_multiples_of_the_reference_t_flip(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "train_and_evaluate", _fake_train({"settle": 70.0}, calls))
    out = sweep.run_sweep(_quick(), tmp_path, log=lambda _: None)
    assert out["failed"] == {}
    assert [(f, a) for _, f, a in calls] == [
        (-1, False),
        (-1, True),
        (0, False),
        (18, False),  # round(0.25 * 70) = round(17.5): banker's rounding to even
        (35, False),
        (70, False),
        (140, False),
    ]


def test_a_reference_without_t_flip_falls_back_then_fails_naming_why(tmp_path, monkeypatch):
    calls, log = [], []
    times = {"settle": None, "cumsum": 40.0, "threshold": None, "fraction": None}
    monkeypatch.setattr(loop, "train_and_evaluate", _fake_train(times, calls))
    sweep.run_sweep(_quick(), tmp_path / "a", log=log.append)
    assert [f for _, f, _ in calls[2:]] == [0, 10, 20, 40, 80]
    assert any("T(flip) from the cumsum rule (settle: none)" in line for line in log)

    calls.clear()
    times = {"settle": None, "cumsum": None, "threshold": None, "fraction": None}
    monkeypatch.setattr(loop, "train_and_evaluate", _fake_train(times, calls))
    out = sweep.run_sweep(_quick(), tmp_path / "b", log=lambda _: None)
    assert len(calls) == 2 and len(out["failed"]) == 5  # never and auto ran; no freeze step
    assert all("has no T(flip) under any rule" in why for why in out["failed"].values())


def test_decoupled_quick_sweep_end_to_end(tmp_path):
    """:quick with one seed: every variant trains; report.md has the table and the figure."""
    out = sweep.run_sweep(_quick(), tmp_path, log=lambda _: None)
    assert out["failed"] == {}
    result = out["report"]["decoupling"]["groups"]["mlp_mnist1d/adam"]
    assert list(result) == ["0T", "0.25T", "0.5T", "1T", "2T", "auto", "never"]
    ref = summary.load_or_summarize(tmp_path / "mlp_mnist1d@never/adam/seed_0")[0]
    t_flip = ref.t_flip(decoupling.FREEZE_RULE).time  # what the sweep froze at
    assert result["0T"]["freeze_step"] == 0
    assert result["1T"]["freeze_step"] == round(t_flip)
    assert result["never"]["freeze_step"] is None
    assert 0 < result["0T"]["disagreement"] < 1
    assert result["0T"]["acc_gap"]["mean"] != 0  # a frozen run trains differently
    for variant in ("0T", "0.5T", "1T"):  # one seed: the gap is the difference itself
        gap = result[variant]["acc"]["mean"] - result["never"]["acc"]["mean"]
        assert result[variant]["acc_gap"]["mean"] == pytest.approx(gap, abs=1e-9)
    text = (tmp_path / "report.md").read_text()
    assert "## Decoupling" in text and "| mlp_mnist1d | adam | 0.5T |" in text
    assert (tmp_path / "figures" / "decoupling.png").stat().st_size > 1000
    online = out["report"]["online"]
    assert list(online) == ["mlp_mnist1d/adam"]  # the never runs only
    offline = ref.t_flip(decoupling.OFFLINE_RULE).time  # the main rule only
    assert online["mlp_mnist1d/adam"]["offline"]["values"] == ([] if offline is None else [offline])
    assert online["mlp_mnist1d/adam"]["online_missing"] == (ref.online_trigger is None)
    assert "## The online settle detector against the offline rule" in text
    timing = json.loads((tmp_path / "mlp_mnist1d@0.5T/adam/seed_0/timing.json").read_text())
    assert timing["phases"]["ordinary"]["steps"] > 0 and timing["phases"]["gated"]["steps"] > 0
