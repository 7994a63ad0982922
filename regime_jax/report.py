"""Run summaries and the sweep report: does the flip rate decay before the weight step size?

:func:`summarize_run` measures one run: decay times of ``flip/all``, ``step/abs/all``,
``step/rel/all`` under every rule of :mod:`regime_jax.timescales` (the run's
``config.timescales`` rule is the main one), lag ratios ``T_step / T_flip`` overall and per layer
(layer ``fc1`` vs parameter part ``fc1``, ``block0/ffn`` vs ``block0``), MVA and the 1.1x-loss
step. Failed measurements stay in the output as statuses with messages. :func:`build_report`
walks ``<sweep>/<setting>/<optimizer>/seed_<k>/`` and writes ``summary.json``, ``report.md`` and
``figures/*.png``. Never imports training code; matplotlib is imported only to plot, on a bare
``matplotlib.figure.Figure`` (Agg canvas, no pyplot, no display).

Example (needs a run directory, so not a doctest)::

    print(build_report("runs/reproduce")["table"])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regime_jax import records, timescales
from regime_jax.timescales import RULES, DecayConfig, decay_times_all_rules

PAPER_RATIO = 3.85
SUMMARY = records.SUMMARY
KINDS = ("abs", "rel")
SERIES = ("flip/all", "step/abs/all", "step/rel/all")


def decay_config_of(config: dict[str, Any]) -> tuple[DecayConfig, str]:
    """The run's ``timescales`` fields as a DecayConfig (defaults, with a note, if absent/bad)."""
    fields = config.get("timescales")
    if not fields:
        return DecayConfig(), "config.json has no timescales; default DecayConfig used"
    known = {f.name for f in dataclasses.fields(DecayConfig)}
    try:
        return DecayConfig(**{k: v for k, v in fields.items() if k in known}), ""
    except (TypeError, ValueError) as err:
        return DecayConfig(), f"invalid timescales ({err}); default DecayConfig used"


def _aligned(run: records.Run, *keys: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The steps at which every key was logged, and each key's values there."""
    tables = [dict(zip(*run.series(k), strict=True)) for k in keys]
    steps = sorted(set.intersection(*(set(t) for t in tables)))
    return np.asarray(steps, float), [np.asarray([t[s] for s in steps], float) for t in tables]


def _guard(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except ValueError as err:  # malformed series (e.g. repeated steps): keep it as a status
        return {"status": "error", "message": str(err)}


def _lag(steps, step_size, flips, cfg: DecayConfig, rule: str | None = None) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, rule=rule or cfg.rule)
    return timescales.lag_ratio(steps, step_size, flips, cfg).to_dict()


def _decays(run: records.Run, cfg: DecayConfig, notes: list[str]) -> dict[str, Any]:
    """Decay time of each overall series under every rule."""
    all_rules = lambda s, v: {r: d.to_dict() for r, d in decay_times_all_rules(s, v, cfg).items()}
    notes += [f"{key} is not in metrics.jsonl" for key in SERIES if key not in run.keys()]
    return {key: _guard(all_rules, *run.series(key)) for key in SERIES}


def _layer_lags(run: records.Run, cfg: DecayConfig, notes: list[str]) -> dict[str, Any]:
    """Per recorded layer: main-rule lag of the same-named parameter part's step vs its flips."""
    keys, out = set(run.keys()), {}
    for flip_key in sorted(k for k in keys if k.startswith("flip/") and k != "flip/all"):
        layer = flip_key.removeprefix("flip/")
        part = layer.split("/")[0]
        if f"step/abs/{part}" not in keys:
            notes.append(f"layer {layer}: no parameter part {part!r} with a step size; skipped")
            continue
        entry = {"part": part}
        for kind in KINDS:
            steps, (s, h) = _aligned(run, f"step/{kind}/{part}", flip_key)
            entry[kind] = _guard(_lag, steps, s, h, cfg)
        out[layer] = entry
    return out


def reference_points(run: records.Run, cfg: DecayConfig) -> dict[str, Any]:
    """MVA (step, value of max ``eval/acc``); first step with smoothed loss <= 1.1x final."""
    out = {"mva_step": None, "mva_acc": None, "loss_1p1_step": None}
    steps, acc = run.series("eval/acc")
    if np.isfinite(acc).any():
        i = int(np.nanargmax(np.where(np.isfinite(acc), acc, np.nan)))
        out["mva_step"], out["mva_acc"] = int(steps[i]), float(acc[i])
    steps, loss = run.series("train/loss")
    if loss.size and np.all(np.isfinite(loss)):
        y = timescales.smooth(loss, cfg.window)
        if y[-1] > 0:
            out["loss_1p1_step"] = int(steps[int(np.argmax(y <= 1.1 * y[-1]))])
    return out


def _complete(run: records.Run) -> bool:
    """Every row the run's config writes over steps 0..num_steps is in ``metrics.jsonl``."""
    try:
        return records.is_complete(run.config, run.rows)
    except (KeyError, TypeError):  # a config.json from before these fields: last step only
        last = run.rows[-1]["step"] if run.rows else None
        return last is not None and last == run.config.get("num_steps")


def summarize_run(workdir: str | Path) -> dict[str, Any]:
    """Decay times, lag ratios (overall, per layer, every rule) and reference points of a run.

    Args:
      workdir: a run directory (``config.json`` + ``metrics.jsonl``, masks optional).

    Returns:
      JSON-serializable dict: ``decay[series][rule]``, ``lag[abs|rel][rule]`` (LagResult
      dicts, ``ratio`` None unless status "ok"), ``layers``, ``reference``, ``main_rule``,
      ``final``, ``complete``, ``notes``.
    """
    run = records.load_run(workdir)
    cfg, note = decay_config_of(run.config)
    notes = [note] if note else []
    lag = {}
    for kind in KINDS:
        steps, (s, h) = _aligned(run, f"step/{kind}/all", "flip/all")
        lag[kind] = {rule: _guard(_lag, steps, s, h, cfg, rule) for rule in RULES}
    last_step = run.rows[-1]["step"] if run.rows else None
    final = {k: run.series(k)[1][-1:].tolist() for k in ("train/loss", "eval/acc")}
    out = {
        "workdir": str(run.workdir),
        "seed": run.config.get("seed"),
        "num_steps": run.config.get("num_steps"),
        "last_step": last_step,
        "complete": _complete(run),
        "final": {k: v[0] if v else None for k, v in final.items()},
        "main_rule": cfg.rule,
        "decay_config": cfg.to_dict(),
        "decay": _decays(run, cfg, notes),
        "lag": lag,
        "layers": _layer_lags(run, cfg, notes),
        "reference": reference_points(run, cfg),
        "notes": notes,
    }
    return records.jsonable(out)


def write_run_summary(workdir: str | Path) -> Path:
    """Writes :func:`summarize_run` to ``workdir/summary.json`` and returns its path."""
    text = records.to_json(summarize_run(workdir), indent=1) + "\n"
    return records.write_atomic(Path(workdir) / SUMMARY, text)


def main_ratio(summary: dict[str, Any], kind: str = "abs", rule: str | None = None):
    """The run's lag ratio (None unless status ok); main rule unless ``rule`` is given."""
    return summary["lag"][kind][rule or summary["main_rule"]].get("ratio")


# ------------------------------------------------------------------------------ the sweep


def find_runs(sweep_workdir: str | Path) -> list[tuple[str, str, int, Path]]:
    """``(setting, optimizer, seed, path)`` of every ``<setting>/<optimizer>/seed_<k>`` run."""
    out = []
    for cfg in Path(sweep_workdir).glob("*/*/seed_*/" + records.CONFIG):
        d = cfg.parent
        if d.name.removeprefix("seed_").isdigit():
            out.append((d.parent.parent.name, d.parent.name, int(d.name[5:]), d))
    return sorted(out)


def load_or_summarize(rundir: Path) -> tuple[dict[str, Any] | None, str]:
    """A run's summary (written now if missing and the run is complete), or None and why."""
    if (rundir / SUMMARY).exists():
        return json.loads((rundir / SUMMARY).read_text()), ""
    if not (rundir / records.METRICS).exists():
        return None, "not started (no metrics.jsonl)"
    run = records.load_run(rundir)
    last = run.rows[-1]["step"] if run.rows else None
    if not _complete(run):
        return None, f"incomplete: last logged step {last} of {run.config.get('num_steps')}"
    write_run_summary(rundir)
    return json.loads((rundir / SUMMARY).read_text()), ""


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """seed_stats of the lag ratios of one (setting, optimizer) group, per kind and rule."""
    main = summaries[0]["main_rule"]
    out = {"main_rule": main, "seeds": [s["seed"] for s in summaries], "lag": {}, "layers": {}}
    for kind in KINDS:
        out["lag"][kind] = {
            rule: timescales.seed_stats([main_ratio(s, kind, rule) for s in summaries]).to_dict()
            | {"per_seed": [main_ratio(s, kind, rule) for s in summaries]}
            for rule in RULES
        }
    layers = sorted({layer for s in summaries for layer in s["layers"]})
    for layer in layers:
        vals = [s["layers"].get(layer, {}).get("abs", {}).get("ratio") for s in summaries]
        out["layers"][layer] = timescales.seed_stats(vals).to_dict() | {"per_seed": vals}
    return records.jsonable(out)


def verdict(stats: dict[str, Any]) -> str:
    """One line comparing the lag-ratio stats (mean, 95% CI) with the paper's 3.85x."""
    mean, lo, hi = stats["mean"], stats["ci_low"], stats["ci_high"]
    if mean is None:
        return "no verdict: no run gave a valid lag ratio"
    if lo is None or hi is None:
        return _verdict(mean, mean) + " (one seed, no CI)"
    return _verdict(lo, hi)


def _verdict(lo: float, hi: float) -> str:
    if lo <= PAPER_RATIO <= hi:
        return f"agrees: CI contains {PAPER_RATIO}"
    if lo > PAPER_RATIO:
        return f"lag > 1 and above paper: CI lies above {PAPER_RATIO}"
    if lo > 1:
        return "lag > 1 but below paper"
    if hi < 1:
        return "disagrees: patterns settle later than weights"
    return "inconclusive: CI contains 1"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _fmt_ci(stats: dict[str, Any]) -> str:
    """``mean [ci_low, ci_high]`` (the CI only where there is one)."""
    lo, hi = stats["ci_low"], stats["ci_high"]
    return _fmt(stats["mean"]) + ("" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]")


def table_row(setting: str, optimizer: str, agg: dict[str, Any], runs: int) -> str:
    """One markdown row; ``runs`` counts the group's summarized runs (seeds = valid / runs)."""
    a, r = (agg["lag"][k][agg["main_rule"]] for k in KINDS)
    rules = " / ".join(_fmt(agg["lag"]["abs"][rule]["mean"]) for rule in RULES)
    cells = [setting, optimizer, f"{a['n']}/{runs}", _fmt_ci(a), _fmt(a["median"]), rules]
    return "| " + " | ".join([*cells, _fmt_ci(r), f"{PAPER_RATIO}x"]) + " |"


TABLE_HEAD = (
    "| setting | optimizer | seeds | lag ratio (abs step) mean [95% CI] | median | "
    "per-rule means (settle / cumsum / threshold) | lag ratio (rel step) mean [95% CI] | paper |\n"
    "|---|---|---|---|---|---|---|---|"
)


def _run_notes(name: str, summary: dict[str, Any]) -> list[str]:
    out = [f"{name}: {n}" for n in summary.get("notes", [])]
    for kind in KINDS:
        lag = summary["lag"][kind][summary["main_rule"]]
        if lag.get("status") != "ok":
            out.append(f"{name}: {kind} lag: {lag.get('message') or lag.get('status')}")
    return out


def _markdown(table: str, aggs: dict, notes: list[str], figures: list[Path]) -> str:
    main = ", ".join(sorted({a["main_rule"] for a in aggs.values()}))
    lines = ["# Lag ratio T_step / T_flip (regime change hypothesis, arXiv 2602.08333)", ""]
    lines += [f"Main decay rule: {main}; paper: {PAPER_RATIO}x.", "", table, "", "## Verdicts", ""]
    for (s, o), agg in sorted(aggs.items()):
        lines.append(f"- {s} / {o}: {verdict(agg['lag']['abs'][agg['main_rule']])}")
    lines += ["", "## Per-layer lag ratios (abs step, main rule)", ""]
    for (s, o), agg in sorted(aggs.items()):
        cells = [f"{k} {_fmt_ci(v)}" for k, v in agg["layers"].items()]
        lines.append(f"- {s} / {o}: " + ("; ".join(cells) or "none"))
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes or ["none"]), "", "## Figures", ""]
    return "\n".join(lines + [f"![{f.stem}](figures/{f.name})" for f in figures]) + "\n"


def build_report(sweep_workdir: str | Path) -> dict[str, Any]:
    """Summaries, seed statistics, ``summary.json``, ``report.md`` and figures of a sweep.

    Args:
      sweep_workdir: holds runs at ``<setting>/<optimizer>/seed_<k>/``.

    Returns:
      dict with ``runs`` (per-run summaries), ``groups`` (aggregates keyed
      ``"<setting>/<optimizer>"``), ``notes``, ``table`` (markdown), ``report`` (path) and
      ``figures`` (paths).
    """
    root = Path(sweep_workdir)
    groups, runs, notes = defaultdict(list), {}, []
    for setting, opt, seed, rundir in find_runs(root):
        name = f"{setting}/{opt}/seed_{seed}"
        summary, why = load_or_summarize(rundir)
        if summary is None:
            notes.append(f"{name}: {why}")
            continue
        runs[name] = summary
        notes += _run_notes(name, summary)
        groups[setting, opt].append((summary, rundir))
    aggs = {key: aggregate([s for s, _ in members]) for key, members in sorted(groups.items())}
    rows = [table_row(s, o, agg, len(groups[s, o])) for (s, o), agg in aggs.items()]
    table = "\n".join([TABLE_HEAD, *rows])
    figures = write_figures(root / "figures", groups)
    (root / "report.md").write_text(_markdown(table, aggs, notes, figures))
    out = {"runs": runs, "groups": {f"{s}/{o}": a for (s, o), a in aggs.items()}, "notes": notes}
    records.write_atomic(root / SUMMARY, records.to_json(out, indent=1) + "\n")
    paths = {"report": str(root / "report.md"), "figures": [str(f) for f in figures]}
    return out | {"table": table} | paths


# ------------------------------------------------------------------------------ figures


def normalized_curves(runs: Sequence[records.Run], key: str, window: int):
    """Smoothed, min-max normalized ``key`` per run on the first run's steps: (steps, [R, T])."""
    steps = runs[0].series(key)[0].astype(float)
    curves = []
    for run in runs:
        s, v = run.series(key)
        if v.size < 2 or not np.all(np.isfinite(v)):
            continue
        y = timescales.smooth(v, window)
        span = float(y.max() - y.min())
        curves.append(np.interp(steps, s, (y - y.min()) / span if span > 0 else 0 * y))
    return steps, np.asarray(curves).reshape(len(curves), steps.size)


def flip_raster(run: records.Run, layer: str | None = None, max_units: int = 128):
    """Per-unit flips between consecutive mask snapshots of one layer.

    Returns:
      ``(layer, steps [S-1], frac [min(U, max_units), S-1])``: the fraction of probe examples
      (and positions) whose bit differs from the previous snapshot, or None with < 2 snapshots.
    """
    if len(run.mask_steps) < 2:
        return None
    layer = layer or sorted(run.masks(run.mask_steps[0]))[0]
    bits = lambda step: np.asarray(run.masks(step)[layer].unpack())[..., :max_units]
    prev, cols = bits(run.mask_steps[0]), []
    for step in run.mask_steps[1:]:
        cur = bits(step)
        cols.append((prev != cur).reshape(-1, cur.shape[-1]).mean(axis=0))
        prev = cur
    return layer, np.asarray(run.mask_steps[1:]), np.stack(cols, axis=1)


def _mean_time(summaries, key: str) -> float | None:
    times = [s["decay"][key].get(s["main_rule"], {}).get("time") for s in summaries]
    times = [t for t in times if t is not None]
    return float(np.mean(times)) if times else None


def _curves_panel(ax, runs, summaries, window: int) -> None:
    for key, color in (("flip/all", "tab:red"), ("step/abs/all", "tab:blue")):
        steps, curves = normalized_curves(runs, key, window)
        if curves.shape[0]:
            ax.plot(steps, curves.mean(0), color=color, label=f"{key} (norm.)")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
        t = _mean_time(summaries, key)
        if t is not None:
            ax.axvline(t, color=color, ls="--", lw=1, label=f"T {key} = {t:.0f}")
    mva = [s["reference"]["mva_step"] for s in summaries if s["reference"]["mva_step"]]
    if mva:
        ax.axvline(np.mean(mva), color="k", ls=":", lw=1, label=f"MVA {np.mean(mva):.0f}")
    ax.set(xlabel="step", ylabel="normalized (smoothed)")
    ax.legend(fontsize=7)


def _layers_panel(ax, runs, window: int) -> None:
    for key in [k for k in runs[0].keys("flip/") if k != "flip/all"]:
        steps, ys = runs[0].series(key)[0], []
        for run in runs:
            s, v = run.series(key)
            if v.size > 1 and np.all(np.isfinite(v)):
                ys.append(np.interp(steps, s, timescales.smooth(v, window)))
        if ys:
            ax.plot(steps, np.maximum(np.mean(ys, axis=0), 1e-7), lw=1, label=key)
    ax.set(xlabel="step", ylabel="flip rate (smoothed, seed mean)", yscale="log")
    ax.legend(fontsize=7)


def _setting_figure(setting: str, members: dict[str, list], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(members), 7.5), layout="constrained")
    axes = fig.subplots(2, len(members), squeeze=False)
    for col, (opt, items) in enumerate(sorted(members.items())):
        summaries = [s for s, _ in items]
        runs = [records.load_run(d) for _, d in items]
        window = summaries[0]["decay_config"]["window"]
        _curves_panel(axes[0, col], runs, summaries, window)
        axes[0, col].set_title(f"{setting} / {opt}: {len(runs)} seeds, band = min-max")
        _layers_panel(axes[1, col], runs, window)
    fig.savefig(path, dpi=110)
    return path


def _raster_figure(rundir: Path, path: Path) -> Path | None:
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    raster = flip_raster(records.load_run(rundir))
    if raster is None:
        return None
    layer, steps, frac = raster
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    half = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) / 2
    extent = (steps[0] - half, steps[-1] + half, frac.shape[0] - 0.5, -0.5)
    im = ax.imshow(frac, aspect="auto", extent=extent, cmap="magma", norm=PowerNorm(0.5))
    fig.colorbar(im, ax=ax, label="fraction of probe sites flipped since the previous snapshot")
    name = "/".join(rundir.parts[-3:])
    ax.set(xlabel="snapshot step", ylabel=f"unit of {layer}", title=f"{name}: {layer}")
    fig.savefig(path, dpi=110)
    return path


def write_figures(fig_dir: Path, groups: dict[tuple[str, str], list]) -> list[Path]:
    """One curves figure and one flip raster (first run) per setting; returns the PNG paths."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    by_setting: dict[str, dict[str, list]] = defaultdict(dict)
    for (setting, opt), items in groups.items():
        by_setting[setting][opt] = items
    paths = []
    for setting, members in sorted(by_setting.items()):
        paths.append(_setting_figure(setting, members, fig_dir / f"{setting}.png"))
        first = members[sorted(members)[0]][0][1]
        paths.append(_raster_figure(first, fig_dir / f"{setting}_raster.png"))
    return [p for p in paths if p is not None]


def write_run_figures(workdir: str | Path) -> list[Path]:
    """One run's figures (time scales, layer flips, raster; stability if probed) as PNGs."""
    from regime_jax import plots

    run = records.load_run(workdir)
    makers = {
        "timescales": plots.timescales_figure,
        "layer_flips": plots.layer_flips_figure,
        "raster": plots.mask_raster_figure,
    }
    if run.keys("probe/"):
        makers |= {
            "stability_kept": plots.stability_kept_figure,
            "stability_radius": plots.stability_radius_figure,
        }
    (run.workdir / "figures").mkdir(exist_ok=True)
    paths = [run.workdir / "figures" / f"{name}.png" for name in makers]
    for path, make in zip(paths, makers.values(), strict=True):
        make(run).savefig(path, dpi=110)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="sweep directory (runs/reproduce): report.md, figures")
    where.add_argument("--run", help="one run's workdir: its figures under <run>/figures")
    args = parser.parse_args(argv)
    try:
        if args.run:
            _require(Path(args.run), records.CONFIG, records.METRICS)
            for path in write_run_figures(args.run):
                print(path)
            return
        _require(Path(args.workdir))
        if not find_runs(args.workdir):
            raise ValueError(f"{args.workdir} holds no runs (<setting>/<optimizer>/seed_<k>/)")
        report = build_report(args.workdir)
    except (OSError, ValueError, KeyError, IndexError) as err:
        parser.exit(2, f"regime_jax.report: error: {_one_line(err)}\n")
    print(report["table"])
    print(f"report: {report['report']}")


def _require(directory: Path, *names: str) -> None:
    """Raises FileNotFoundError naming the first missing one of ``directory`` and its files."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not a run's workdir")


def _one_line(err: BaseException) -> str:
    text = (str(err).splitlines() or [""])[0]
    plain = isinstance(err, FileNotFoundError) or type(err) is ValueError
    return text if plain else f"{type(err).__name__}: {text}"


if __name__ == "__main__":
    main()
