"""The command line: every field overridable, every typing mistake one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        new = tuple(v + "_x" if isinstance(v, str) else v + 1 for v in value)
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


# ------------------------------------------------------------------ --help: every field's meaning


def _help_lines(out: str, name: str) -> str:
    """The ``--config.<name>=`` line of ``--help`` and the line after it (a long default pushes
    the meaning there)."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"  --config.{name}="))
    return lines[i] + "\n" + lines[i + 1]


def test_every_base_field_has_a_one_line_meaning_from_the_comments_of_base_config():
    from regime_jax.configs.base import base_config
    from regime_jax.configs.overrides import field_help

    helps = field_help()
    for name, _ in fields(base_config()):
        text = helps.get(name)
        assert text and text.strip() and "\n" not in text, name
    assert helps["optimizer.learning_rate"] == "peak learning rate"  # read from the comment
    assert helps["decouple.online.patience"]  # nested groups too
    assert helps["probe"].startswith("The fixed probe set")  # a group's comment


def test_help_gives_each_field_its_meaning(capsys):
    from regime_jax.configs.overrides import UNDOCUMENTED, field_help, help_for

    code, out, err = _run(capsys, "--help")
    assert code == 0 and not err
    helps = field_help()
    for name, _ in fields(configs.load("mlp_mnist1d")):
        assert helps[name] in _help_lines(out, name), name
    assert "--config.<field>=<default>  meaning" in out
    for name in EXPERIMENTS:  # fields a config adds (a CNN's channels) have one too
        config = configs.load(name)
        helps = help_for(config)
        assert not [f for f, _ in fields(config) if not helps.get(f)], name
    code, out, _ = _run(capsys, "--config=cnn_digits", "--help")
    assert code == 0 and "conv widths" in _help_lines(out, "model.channels")
    assert UNDOCUMENTED not in out


def test_help_exits_0_from_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "regime_jax.main", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stderr
    assert "peak learning rate" in _help_lines(done.stdout, "optimizer.learning_rate")


def test_a_sweeps_help_gives_each_field_its_meaning():
    from regime_jax import sweep
    from regime_jax.configs.overrides import field_help

    for name in configs.SWEEPS:
        for arg in (None, "quick"):
            config = configs.load(name if arg is None else f"{name}:{arg}")
            helps = sweep.field_help(config)
            assert not [f for f, _ in fields(config) if not helps.get(f)], (name, arg)
    helps = sweep.field_help(configs.load("reproduce"))
    assert helps["optimizers.sgd.momentum"] == "sgd: " + field_help()["optimizer.momentum"]
    assert helps["overrides.probe.size"] == "every run: " + field_help()["probe.size"]


def test_reports_help_gives_each_flag_a_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m regime_jax.report")
    assert "--workdir SWEEP  a sweep's directory" in out
    assert "--run WORKDIR    one run's workdir" in out


# ------------------------------------------------------------------ the run ends with its result

TINY = (
    "--config.num_steps=12",
    "--config.model.hidden=16,12",
    "--config.probe.size=24",
    "--config.batch_size=32",
    "--config.eval_every_steps=6",
    "--config.record.snapshot_every_steps=6",
)


def _lag_line(block: str) -> str:
    return next(line for line in block.splitlines() if line.startswith("  lag ratio"))


def test_the_run_ends_with_its_headline_figures_and_the_report_command(capsys, tmp_path):
    import json
    import shlex

    from regime_jax.analysis.summary import main_ratio

    workdir = tmp_path / "run"
    code, out, err = _run(capsys, QUICK, f"--workdir={workdir}", *TINY)
    assert code == 0 and "Traceback" not in err, err
    summary = json.loads((workdir / "summary.json").read_text())
    block = main.result_block(workdir, summary)
    assert out.rstrip("\n").endswith("\n" + block)  # the last thing printed
    lines = block.splitlines()
    assert lines[0] == "done: 12 of 12 steps"
    assert f"val accuracy  {summary['final']['eval/acc']:.3f}" in block
    assert "  T(flip)  " in block and "  T(step)  " in block
    lag = summary["lag"]["abs"][summary["main_rule"]]
    ratio = main_ratio(summary)
    expected = f"{ratio:.2f} = T(step) / T(flip)" if ratio else f"({lag['status']})"
    assert expected in _lag_line(block)
    assert lines[-2].startswith(f"  records       {workdir}: metrics.jsonl, summary.json")
    assert lines[-1] == f"  figures       python -m regime_jax.report --run {workdir}"
    command = shlex.split(lines[-1].split("figures", 1)[1])
    assert command[:3] == ["python", "-m", "regime_jax.report"]
    report.main(command[3:])  # the command works: it draws the run's figures
    assert any((workdir / "figures").glob("*.png"))
    capsys.readouterr()

    code, out, _ = _run(capsys, QUICK, f"--workdir={workdir}", *TINY)  # already complete
    assert code == 0 and f"resuming {workdir} from step 12" in out
    assert out.rstrip("\n").endswith("\n" + main.result_block(workdir))


def _summary(t_flip, t_step, status="ok", ratio=None, message="", others=None):
    def decay(time, why):
        ok = time is not None
        return {"time": time, "status": "ok" if ok else why, "rule": "settle", "message": message}

    lag = {"ratio": ratio, "t_flip": decay(t_flip, "never_settles")}
    lag |= {"t_step": decay(t_step, "never_settles"), "status": status, "message": message}
    rules = {"settle": lag} | {
        rule: {"ratio": value, "status": "ok" if value else "x"}
        for rule, value in (others or {}).items()
    }
    return {
        "main_rule": "settle",
        "last_step": 3000,
        "num_steps": 3000,
        "final": {"eval/acc": 0.6789},
        "lag": {"abs": rules},
        "decouple": {"freeze_step": None},
        "partial": None,
    }


def test_the_result_gives_the_ratio_or_why_there_is_none(tmp_path):
    ok = main.result_block(tmp_path, _summary(100.0, 385.0, ratio=3.85, others={"cumsum": 2.5}))
    assert "val accuracy  0.679 (final eval/acc)" in ok
    assert "T(flip)       100 steps (flip/all decay time, settle rule)" in ok
    assert "T(step)       385 steps (step/abs/all decay time, settle rule)" in ok
    assert _lag_line(ok).endswith(
        "3.85 = T(step) / T(flip), settle rule (paper: 3.85x); other rules: cumsum 2.50"
    )

    status = "step_size: never_settles; flip_rate: never_settles"
    message = "enters the +/-0.1*range band only in the final 4 points"
    none = main.result_block(tmp_path, _summary(None, None, status, message=message))
    assert f"T(flip)       none: flip/all had not settled when the run ended ({message})" in none
    assert "T(step)       none: step/abs/all had not settled when the run ended" in none
    assert _lag_line(none).endswith(f"none under the settle rule ({status})")

    why = "flip decay time is 0 (settles at the first step 0); ratio undefined"
    undefined = main.result_block(tmp_path, _summary(0.0, 50.0, "undefined", message=why))
    assert _lag_line(undefined).endswith(f"none under the settle rule ({why})")
    assert "python -m regime_jax.report --run" in undefined


def test_a_stopped_run_says_how_far_it_got_and_prints_no_figures(capsys, tmp_path, monkeypatch):
    from regime_jax.run import loop

    def stopped(config, workdir):
        Path(workdir).mkdir()
        (Path(workdir) / "metrics.jsonl").write_text('{"step": 0}\n')
        raise loop.Interrupted(7)

    monkeypatch.setattr(loop, "train_and_evaluate", stopped)
    workdir = tmp_path / "w"
    code, out, err = _run(capsys, QUICK, f"--workdir={workdir}", *TINY)
    assert code == 130
    assert err.strip() == (
        "regime_jax: SIGINT: interrupted at step 7; metrics flushed and a checkpoint saved; run "
        "the same command again to resume"
    )
    lines = out.rstrip("\n").splitlines()[-4:]
    assert lines[0] == "partial: stopped at step 7 of 12 (SIGINT, checkpoint saved)"
    assert lines[2].startswith(f"  records       {workdir}: metrics.jsonl")
    assert f"python -m regime_jax.report --run {workdir}" in lines[3]
    assert "T(flip)" not in out and "val accuracy" not in out and "lag ratio" not in out


def test_every_decay_status_but_ok_is_said_in_words_by_the_final_block():
    from regime_jax.analysis.timescales import STATUSES

    assert set(main._WHY) == set(STATUSES) - {"ok"}
    assert all(words and "_" not in words.split("(")[0] for words in main._WHY.values())
