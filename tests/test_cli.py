"""The command line: every field overridable, every typing mistake one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import ml_collections
import pytest

from regime_jax import configs, main, report
from regime_jax.configs.overrides import fields

EXPERIMENTS = [n for n in configs.names() if n not in configs.SWEEPS]
QUICK = "--config=mlp_mnist1d:quick"


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # main.run installs its own


def _run(capsys, *args):
    code = main.run(["regime_jax", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regime_jax: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--config.optimizr.name=adam", "did you mean optimizer?"),
        ("--config.optimizer.nmae=adam", "did you mean optimizer.name?"),
        ("--config.model.hiden=(8,8)", "did you mean model.hidden?"),
        ("--config.num_step=5", "did you mean num_steps?"),
        ("--config.record.evry_steps=2", "did you mean record.every_steps?"),
        ("--config.zzz=1", "its fields: batch_size"),
    ],
)
def test_typo_in_a_field_name_suggests_the_field(capsys, tmp_path, flag, expected):
    code, _, err = _run(capsys, QUICK, f"--workdir={tmp_path / 'w'}", flag)
    assert expected in _one_line_error(code, err)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--config.num_steps=abc", "expected an int"),
        ("--config.num_steps=1.5", "expected an int"),
        ("--config.optimizer.learning_rate=fast", "expected a float"),
        ("--config.overwrite=maybe", "expected a bool"),
        ("--config.model.hidden=a,b", "expected a tuple of int"),
        ("--config.optimizer=adam", "is a group of fields"),
        ("--config.seed", "needs a value"),
    ],
)
def test_wrong_type_is_one_line(capsys, tmp_path, flag, expected):
    code, _, err = _run(capsys, QUICK, f"--workdir={tmp_path / 'w'}", flag)
    line = _one_line_error(code, err)
    assert expected in line and flag.split("=")[0] in line


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--config.optimizer.learning_rate=inf", "optimizer.learning_rate"),
        ("--config.optimizer.learning_rate=nan", "optimizer.learning_rate"),
        ("--config.optimizer.learning_rate=-1e-3", "optimizer.learning_rate"),
        ("--config.optimizer.momentum=nan", "optimizer.momentum"),
        ("--config.seed=-1", "seed"),
        ("--config.probe.seed=-3", "probe.seed"),
        ("--config.dataset.seed=-1", "dataset.seed"),
        ("--config.stability.seed=-1", "stability.seed"),
        ("--config.dataset.num_samples=0", "dataset.num_samples"),
        ("--config.dataset.num_samples=5", "dataset.num_samples"),
        ("--config.dataset.data_dir=", "dataset.data_dir"),
        ("--config.batch_size=100000", "batch_size"),
    ],
)
def test_bad_value_is_named_before_anything_is_written(capsys, tmp_path, flag, field):
    code, _, err = _run(capsys, QUICK, f"--workdir={tmp_path / 'w'}", flag)
    assert field in _one_line_error(code, err)
    assert not (tmp_path / "w").exists()


def test_missing_config_file_unknown_name_and_unknown_variant(capsys, tmp_path):
    code, _, err = _run(capsys, "--config=nope.py", f"--workdir={tmp_path}")
    assert "'nope.py' does not exist" in _one_line_error(code, err)
    code, _, err = _run(capsys, "--config=nope:quick", f"--workdir={tmp_path}")
    line = _one_line_error(code, err)
    assert "unknown config 'nope'" in line and all(n in line for n in configs.names())
    assert not any(tmp_path.iterdir())
    code, _, err = _run(capsys, "--config=reproduce:quick", f"--workdir={tmp_path}")
    assert "is a sweep config: run it with python -m regime_jax.sweep" in _one_line_error(code, err)
    code, _, err = _run(capsys, QUICK.replace(":quick", ":quik"), f"--workdir={tmp_path}")
    assert "':quik'" in (line := _one_line_error(code, err)) and "':quick'" in line


@pytest.mark.parametrize("name", configs.names())
def test_every_experiment_refuses_an_unknown_variant(name):
    from regime_jax.configs.base import ConfigError

    with pytest.raises(ConfigError, match="unknown config variant ':nope'; allowed"):
        configs.load(f"{name}:nope")


def test_missing_flags_unknown_flags_and_extra_arguments(capsys, tmp_path):
    assert "--workdir required" in _one_line_error(*_run(capsys, QUICK)[::2])
    line = _one_line_error(*_run(capsys, QUICK, "--workdr=/x")[::2])
    assert "workdr" in line and "workdir" in line
    assert "unexpected" in _one_line_error(*_run(capsys, QUICK, f"--workdir={tmp_path}", "x")[::2])


def test_help_exits_0_and_lists_every_field_with_its_default(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for name, _ in fields(configs.load("mlp_mnist1d")):
        assert f"--config.{name}=" in out
    assert "--config.dataset.data_dir=None" in out and "--config.num_steps=3000" in out
    assert f"packaged configs: {', '.join(configs.names())}" in out
    code, out, _ = _run(capsys, f"--config={EXPERIMENTS[0]}", "-h")
    assert code == 0 and "--config.model.channels=" in out


def _other_value(name, value):
    """A valid command-line text for a value different from ``value`` (and the value)."""
    if name == "dataset.data_dir":
        return "/data/tfds", "/data/tfds"
    if isinstance(value, bool):
        return str(not value).lower(), not value
    if isinstance(value, int):
        return str(value + 1), value + 1
    if isinstance(value, float):
        return repr(value / 2), value / 2
    if isinstance(value, tuple):
        new = tuple(v + 1 for v in value)
        return ",".join(map(str, new)), new
    if isinstance(value, str):
        return value + "_x", value + "_x"
    raise AssertionError(f"{name}: no command-line form for {value!r}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_field_of_every_experiment_can_be_overridden(name):
    config = configs.load(name)
    names = dict(fields(config))
    assert "dataset.data_dir" in names and names["dataset.data_dir"] is None
    for name, value in names.items():
        text, expected = _other_value(name, value)
        overrides, rest = main.split_overrides([f"--config.{name}={text}"])
        assert not rest
        for field, raw in overrides:
            from regime_jax.configs.overrides import override

            override(config, field, raw)
        got = config
        for part in name.split("."):
            got = got[part]
        assert got == expected, name
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.to_dict()["dataset"]["data_dir"] == "/data/tfds"


def test_data_dir_none_round_trips_through_config_json():
    import json

    config = configs.load("mlp_mnist1d:quick")
    assert json.loads(json.dumps(config.to_dict()))["dataset"]["data_dir"] is None
    from regime_jax.configs.overrides import override

    override(config, "dataset.data_dir", "/d")
    override(config, "dataset.data_dir", "None")
    assert config.dataset.data_dir is None


def test_override_forms():
    overrides, rest = main.split_overrides(
        ["--config.a=1", "--config.b", "2", "--noconfig.c", "--config.d", "--config.e", "-0.5", "x"]
    )
    assert overrides == [("a", "1"), ("b", "2"), ("c", "false"), ("d", None), ("e", "-0.5")]
    assert rest == ["x"]
    overrides, _ = main.split_overrides(["--config.model.hidden=8", "--config.model.hidden=4"])
    assert overrides == [("model.hidden", "8,4")]


TYPO = "--config.optimizr.name=adam"


def test_cli_typo_end_to_end_has_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "regime_jax.main", QUICK, f"--workdir={tmp_path / 'w'}", TYPO],
        cwd=tmp_path,  # configs are resolved by name: no clone in the working directory
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "regime_jax: error: --config.optimizr.name: the config has no field 'optimizr'; "
        "did you mean optimizer?"
    ]


def test_report_errors_are_one_line_with_exit_2(tmp_path, capsys):
    for args in (["--run", str(tmp_path / "nope")], ["--workdir", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit) as exit_info:
            report.main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("regime_jax.report: error:"), err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--run", str(tmp_path / "half")])
    assert exit_info.value.code == 2 and "metrics.jsonl is missing" in capsys.readouterr().err
