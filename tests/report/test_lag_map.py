"""The lag map: the ``lag_map`` sweep config, ``optimizers_only`` / ``max_seeds`` in the grid,
and the report's "Lag map" section, table and figure (on a synthetic sweep)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ml_collections
import pytest
from conftest import write_synthetic_run

from regime_jax import report, sweep
from regime_jax.analysis import lagmap, layout
from regime_jax.configs.base import ConfigError


def _grid(settings, optimizers=("a", "b", "c"), seeds=(0, 1)) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    tiny = {"num_steps": 12, "probe.size": 24, "model.hidden": (16, 12), "batch_size": 32}
    tiny |= {"log_every_steps": 6, "eval_every_steps": 6, "record.snapshot_every_steps": 6}
    c.settings = [{"experiment": "mlp_mnist1d", "overrides": tiny} | s for s in settings]
    c.optimizers = {o: {"name": "sgd", "learning_rate": 0.05} for o in optimizers}
    c.seeds = list(seeds)
    c.overrides = {}
    return c


def test_optimizers_only_and_setting_seeds_shape_the_grid():
    grid = _grid(
        [
            {"name": "base"},
            {"name": "one", "optimizers_only": ["c", "a"]},
            {"name": "few", "optimizers_only": ["b"], "max_seeds": 1},
        ]
    )
    specs = sweep.expand_grid(grid)
    assert Counter(s.setting for s in specs) == {"base": 6, "one": 4, "few": 1}
    # a setting's columns keep the sweep's column order, whatever order it lists them in
    assert [s.path for s in specs if s.setting != "base"] == [
        "one/a/seed_0",
        "one/a/seed_1",
        "one/c/seed_0",
        "one/c/seed_1",
        "few/b/seed_0",
    ]
    assert len(sweep.units(specs)) == 11
    written = json.loads(sweep._grid_text(grid, specs))
    assert len(written["runs"]) == 11 and "one/b/seed_0" not in {r["path"] for r in written["runs"]}


def test_max_seeds_takes_the_first_of_the_sweeps_seeds_whatever_they_are():
    """``--config.seeds`` still decides: a costly setting keeps the first N of them."""
    specs = sweep.expand_grid(
        _grid([{"name": "x", "max_seeds": 2}, {"name": "y", "max_seeds": 9}], ("a",), (5, 6, 7))
    )
    assert [s.path for s in specs] == [
        "x/a/seed_5",
        "x/a/seed_6",
        "y/a/seed_5",
        "y/a/seed_6",
        "y/a/seed_7",
    ]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            {"optimizers_only": ["a", "zz"]},
            "setting 'x': optimizers_only names ['zz'], not optimizer columns; allowed: "
            "['a', 'b', 'c']",
        ),
        ({"optimizers_only": []}, "setting 'x': optimizers_only=[]; allowed: a non-empty list"),
        ({"optimizers_only": "a"}, "setting 'x': optimizers_only='a'; allowed: a non-empty list"),
        ({"max_seeds": 0}, "setting 'x': max_seeds=0; allowed: an int >= 1"),
        ({"max_seeds": True}, "setting 'x': max_seeds=True; allowed: an int >= 1"),
        ({"seeds": [7]}, "setting 'x': a setting has no seeds of its own"),
        ({"axis": ["width", "depth"], "value": [1]}, "setting 'x': axis ['width', 'depth'] needs"),
    ],
)
def test_bad_setting_keys_are_refused_in_one_line(setting, expected):
    with pytest.raises(ConfigError) as err:
        sweep.expand_grid(_grid([{"name": "x"} | setting]))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_grid_size_check_counts_only_the_runs_of_each_setting(monkeypatch):
    monkeypatch.setattr(sweep, "RUNS_MAX", 5)
    few = _grid([{"name": "x", "optimizers_only": ["a"]}, {"name": "y", "optimizers_only": ["b"]}])
    assert len(sweep.expand_grid(few)) == 4  # 2 x 1 x 2 <= 5, though 2 x 3 x 2 would not be
    with pytest.raises(ConfigError, match="the grid has 6 runs"):
        sweep.expand_grid(_grid([{"name": "x"}]))


def test_lag_map_config_expands_as_its_docstring_says():
    from regime_jax.configs import lag_map

    grid = sweep.expand_grid(lag_map.get_config())
    per = Counter((s.setting, s.optimizer) for s in grid)
    assert {o for (s, o) in per if s == "base"} == {"sgd", "adam", "sgd_plain", "adamw"}
    assert all(o in ("sgd", "adam") for (s, o) in per if s != "base")
    assert per["width_2048", "sgd"] == 3 and per["base", "adamw"] == 5 and len(grid) == 146
    by = {s.path: s.config for s in grid}
    base = by["base/sgd/seed_0"]
    assert (base.num_steps, base.batch_size, base.probe.size) == (2000, 128, 256)
    assert base.model.hidden == (256, 256) and base.dataset.num_samples == 5000
    assert (base.record.every_steps, base.record.snapshot_every_steps) == (1, 100)
    assert base.checkpoint.every_steps == 0 and base.optimizer.momentum == 0.9
    assert by["base/sgd_plain/seed_0"].optimizer.momentum == 0.0
    assert by["base/adamw/seed_0"].optimizer.name == "adamw"
    assert by["data_60k/adam/seed_0"].dataset.num_samples == 75000
    assert by["depth_6/sgd/seed_0"].model.hidden == (256,) * 6
    assert by["step/sgd/seed_0"].optimizer.schedule == "step"
    assert by["long_3x/sgd/seed_0"].num_steps == 6000
    assert by["label_noise/sgd/seed_0"].dataset.label_noise == 0.2
    t = by["transformer_gelu/adam/seed_0"]
    assert (t.model.name, t.model.num_layers, t.model.dim, t.batch_size) == (
        "transformer",
        1,
        32,
        64,
    )
    assert t.record.activations == ("gelu",) and t.probe.size == 128
    config = lag_map.get_config()
    axes = {a for s in config.settings for a, _ in lagmap.placements(s)}
    assert axes == set(config.axes) and len(axes) == 8
    for s in config.settings:  # every value is on its axis's plot order
        for axis, value in lagmap.placements(s):
            assert axis == lagmap.OPTIMIZER_AXIS or value in config.axes[axis], (s["name"], axis)
    quick = sweep.expand_grid(lag_map.get_config("quick"))
    assert len(quick) == 10 and {s.config.num_steps for s in quick} == {200}
    assert {s.setting for s in quick} == {"base", "width_64"}


# --------------------------------------------------------------------------- the report


def _fake_sweep(root: Path) -> None:
    """Runs of a 3-setting lag map: base (both columns, on axes width and optimizer), wide
    (only 'sgd'; seed 1 never finished), flat (flips do not decay: no ratio)."""
    settings = [
        {"name": "base", "axis": ["width", "optimizer"], "value": [8, "columns"]},
        {"name": "wide", "axis": "width", "value": 64, "optimizers_only": ["sgd"]},
        {"name": "flat", "axis": "width", "value": 2, "optimizers_only": ["sgd"]},
    ]
    optimizers = {"sgd": {}, "adam": {}}
    ratios = {("base", "sgd"): 3.0, ("base", "adam"): 1.5, ("wide", "sgd"): 4.0}
    runs = []
    for s in settings:
        for opt in s.get("optimizers_only", list(optimizers)):
            for seed in (0, 1, 2):
                runs.append({"path": layout.name(s["name"], opt, seed), "setting": s["name"]})
                runs[-1] |= {"optimizer": opt, "seed": seed}
                if (s["name"], seed) == ("wide", 1):
                    continue  # not finished: no run directory
                d = layout.path(root, s["name"], opt, seed)
                flip = (lambda t: 0.01) if s["name"] == "flat" else None
                ratio = ratios.get((s["name"], opt), 3.0) * (1 + 0.05 * seed)
                write_synthetic_run(d, tau_flip=40.0, ratio=ratio, n=1500, seed=seed, flip=flip)
    grid = {"settings": settings, "optimizers": optimizers, "seeds": [0, 1, 2]}
    grid["axes"] = {"width": [2, 8, 64], "optimizer": ["sgd", "adam"]}
    (root / layout.GRID).write_text(json.dumps({"sweep": grid, "runs": runs}))


def test_lag_map_section_table_and_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _fake_sweep(tmp_path)
    out = report.build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Lag map") :]
    assert "![lag_map](figures/lag_map.png)" in section
    width = section[section.index("### width") : section.index("### optimizer")]
    rows = [line for line in width.splitlines() if line.startswith("| ")]
    assert rows[0] == "| value | sgd | adam |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 2", "| 8", "| 64"]  # plot order
    flat, base, wide = rows[1:]
    assert "– (0/3; flip_rate: " in flat and " x3)" in flat and flat.endswith("| not run |")
    assert base.startswith("| 8 | 3.") and "(3/3)" in base and "| 1.5" in base
    assert wide.startswith("| 64 | 4.") and "(2/3; not finished x1)" in wide
    assert wide.endswith("| not run |")
    opt_rows = [x for x in section[section.index("### optimizer") :].splitlines()[:6]]
    assert "| optimizer | all |" in opt_rows
    assert [r.split(" | ")[0] for r in opt_rows if r.startswith("| ") and "---" not in r][1:] == [
        "| sgd",
        "| adam",
    ]

    mapped = json.loads((tmp_path / "summary.json").read_text())["lag_map"]
    assert mapped == json.loads(json.dumps(out["lag_map"]))
    assert list(mapped) == ["width", "optimizer"] and mapped["width"]["values"] == [2, 8, 64]
    point = {(p["x"], p["line"]): p for p in mapped["width"]["points"]}
    assert ("64", "adam") not in point and (64, "adam") not in point  # not in the grid
    assert point[8, "sgd"]["mean"] == pytest.approx(3.15, rel=0.1)
    assert point[8, "sgd"]["ci_low"] <= point[8, "sgd"]["mean"] <= point[8, "sgd"]["ci_high"]
    assert point[64, "sgd"]["why_none"] == {lagmap.NOT_FINISHED: 1}
    assert point[64, "sgd"]["runs"] == 3 and point[64, "sgd"]["n"] == 2
    assert point[2, "sgd"]["mean"] is None and sum(point[2, "sgd"]["why_none"].values()) == 3
    png = tmp_path / "figures" / "lag_map.png"
    assert png.stat().st_size > 10_000 and str(png) in out["figures"]


def test_a_sweep_without_axes_has_no_lag_map(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for seed in (0, 1):
        write_synthetic_run(tmp_path / "s" / "sgd" / f"seed_{seed}", n=600, seed=seed)
    out = report.build_report(tmp_path)
    assert "## Lag map" not in (tmp_path / "report.md").read_text() and "lag_map" not in out
    assert not (tmp_path / "figures" / "lag_map.png").exists()


def test_lag_map_quick_runs_end_to_end(tmp_path, monkeypatch):
    from regime_jax import configs

    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = sweep.run_sweep(configs.load("lag_map:quick"), tmp_path, log=lambda _: None)
    assert not out["failed"] and len(out["ran"]) == 10
    md = (tmp_path / "report.md").read_text()
    assert "### width" in md and "### optimizer" in md and "| 64 |" in md
    assert (tmp_path / "figures" / "lag_map.png").exists()
