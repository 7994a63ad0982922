"""The sweep report (``report.md``, ``summary.json``, ``figures/``) and its command line.

:func:`build_report` summarizes a sweep (:func:`regime_jax.analysis.summary.summarize_sweep`),
writes
the markdown table of lag ratios beside the paper's 3.85x with a verdict per group, the
sweep's ``summary.json`` and the figures of :func:`regime_jax.report.plots.sweep_figures`.
``python -m regime_jax.report --workdir <sweep>`` rebuilds a sweep's report;
``--run <workdir>`` writes one run's figures under ``<workdir>/figures``. Errors are one line
with exit code 2. Never imports training code; matplotlib only once a figure is drawn.

Partial runs are marked, not refused. ``--run`` on a run that is not finished (killed
mid-way, live: another process holds its ``.lock``, or stopped by a non-finite loss) exits 0
with every figure titled ``partial at step N of M (why)`` and that line printed first: a user
may well want to look at a live run's progress or at what a killed run reached, and the mark
keeps it from passing for a finished result. A sweep report (``--workdir``) leaves such runs
out of its statistics, names each in its notes (``partial at step N of M ...; left out``) and
says at the top of ``report.md`` (and in what it prints) how many runs it lacks; a run's
``summary.json`` is only used while ``metrics.jsonl`` is the file it was computed from
(:func:`regime_jax.analysis.summary.load_or_summarize`).

Example (needs a run directory, so not a doctest)::

    print(build_report("runs/reproduce")["table"])
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regime_jax import faults, records
from regime_jax.analysis import curves, decoupling, lagmap, layout
from regime_jax.analysis.fmt import ci, num
from regime_jax.analysis.layout import find_runs
from regime_jax.analysis.summary import (
    HEADLINE_RULE,
    KINDS,
    PAPER_RATIO,
    RunSummary,
    Sweep,
    group_lag,
    stat_view,
    summarize_run,
    summarize_sweep,
    verdict,
)
from regime_jax.analysis.timescales import RULES
from regime_jax.report import plots

__all__ = [
    "build_report",
    "main",
    "markdown_table",
    "plots",
    "write_figures",
    "write_run_figures",
]

DPI = 110
DESCRIPTION = "A sweep's report.md, summary.json and figures, or one run's figures."
TABLE_HEAD = (
    "| setting | optimizer | seeds | geometric mean [95% CI] | median [95% CI] | "
    "arithmetic mean [95% CI] | budget-bound | rel step: geometric mean [95% CI] | paper |\n"
    "|---|---|---|---|---|---|---|---|---|"
)
HEADLINE = (
    f"Headline: the `{HEADLINE_RULE}` rule at f = 1/e (each series' time constant: the first "
    "step below 1/e of its start level), abs step; per group the geometric mean of the "
    "per-seed lag ratios T_step / T_flip with its 95% bootstrap CI, the median beside it, and "
    "the arithmetic mean (labelled: one heavy seed dominates it). A ratio exists only where "
    "both series decayed (`timescales.min_drop`, `min_snr`); seeds = valid ratios / runs; "
    "budget-bound: valid ratios whose T(step) lies in the run's last 10% (set by the run's "
    "length as much as by training)."
)


def _stat(stats: dict[str, Any], statistic: str) -> str:
    return ci(stat_view(stats, statistic))


def table_row(
    setting: str, optimizer: str, agg: dict[str, Any], runs: int, rule: str | None = None
) -> str:
    """One markdown row under ``rule`` (default: the group's main rule); ``runs`` counts the
    group's summarized runs (seeds = valid / runs)."""
    a, r = (group_lag(agg, k, rule) for k in KINDS)
    cells = [setting, optimizer, f"{a.get('n', 0)}/{runs}"]
    cells += [_stat(a, "geo_mean"), _stat(a, "median"), _stat(a, "mean")]
    cells += [f"{a.get('budget_bound', 0)}/{a.get('n', 0)}", _stat(r, "geo_mean")]
    return "| " + " | ".join([*cells, f"{PAPER_RATIO}x"]) + " |"


def rules_table(sweep: Sweep) -> str:
    """Per group, every rule's geometric-mean lag ratio (abs step) [95% CI], (valid seeds /
    runs; budget-bound)."""
    lines = ["| setting | optimizer | " + " | ".join(RULES) + " |", "|---" * (2 + len(RULES)) + "|"]
    for (s, o), agg in sweep.groups.items():
        runs, cells = len(sweep.members[s, o]), []
        for rule in RULES:
            st = group_lag(agg, "abs", rule)
            cells.append(
                f"{_stat(st, 'geo_mean')} ({st.get('n', 0)}/{runs}; "
                f"{st.get('budget_bound', 0)} b.b.)"
            )
        lines.append(f"| {s} | {o} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time_cell(lag: Any, which: str) -> str:
    decay = getattr(lag, which)
    if decay.time is None:
        return f"– ({decay.status})" if decay.status else "–"
    frac = "" if decay.run_fraction is None else f" ({decay.run_fraction:.2f})"
    return f"{decay.time:g}{frac}"


def runs_table(sweep: Sweep) -> str:
    """One row per run and rule (main and headline): T(flip), T(step) (each with its fraction
    of the run), the lag ratio and, where there is none, the status; budget-bound marked."""
    lines = [
        "| run | rule | T(flip) (fraction of run) | T(step) (fraction of run) | lag ratio |",
        "|---|---|---|---|---|",
    ]
    for name, summary in sweep.runs.items():
        summary = RunSummary.of(summary)
        for rule in dict.fromkeys([summary.main_rule, HEADLINE_RULE]):
            lag = summary.lag("abs", rule)
            if lag.status is None:
                continue
            if lag.ratio is None:
                ratio = f"– ({lag.status})"
            else:
                ratio = num(lag.ratio) + (" **budget-bound**" if lag.budget_bound else "")
            cells = [name, rule, _time_cell(lag, "t_flip"), _time_cell(lag, "t_step"), ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves_table(aggs: dict) -> str:
    """Per (setting, optimizer) and rule parameter: where along the parameter's grid the
    geometric-mean lag ratio's 95% CI contains 3.85
    (:func:`regime_jax.analysis.curves.paper_ranges`), or "nowhere"."""
    heads = [f"{p} ({curves.grid_span(p)})" for p in curves.PARAMS]
    lines = ["| setting | optimizer | " + " | ".join(heads) + " |", "|---" * (2 + len(heads)) + "|"]
    for (s, o), agg in sorted(aggs.items()):
        ranges = curves.paper_ranges(agg.get("curves") or {})
        lines.append(f"| {s} | {o} | " + " | ".join(ranges[p] for p in curves.PARAMS) + " |")
    return "\n".join(lines)


def _curves_section(aggs: dict, figures: list[Path]) -> list[str]:
    lines = ["", "## Lag ratio over each rule's parameter", ""]
    lines += [
        f"Where the geometric-mean lag ratio's 95% CI (over seeds) contains {PAPER_RATIO}:",
        "threshold_fraction under the threshold rule (the fraction family: 1/e lies between",
        "0.35 and 0.4), delta under settle, cumsum_fraction under cumsum, window under the main",
        "rule (others at their configured values); abs step. A value counts only the seeds",
        "where both series decayed under it.",
        "",
        curves_table(aggs),
    ]
    lines += [f"\n![{f.stem}](figures/{f.name})" for f in figures if f.stem == "lag_curves"]
    return lines


def _markdown(
    table: str,
    aggs: dict,
    notes: list[str],
    figures: list[Path],
    decoupled: list[str] = (),
    online: list[str] = (),
    partial: str | None = None,
    rules_table_text: str = "",
    runs_text: str = "",
    lag_map: list[str] = (),
) -> str:
    lines = ["# Lag ratio T_step / T_flip (regime change hypothesis, arXiv 2602.08333)", ""]
    if decoupled:
        lines = ["# The decoupling experiment (regime change hypothesis, arXiv 2602.08333)", ""]
    lines += [f"**{partial}**", ""] if partial else []
    if decoupled:
        lines += [*decoupled, "", "![decoupling](figures/decoupling.png)", ""]
        lines += ["## Lag ratio T_step / T_flip of every variant", ""]
    lines += [f"{HEADLINE} Paper: {PAPER_RATIO}x.", "", table, "", "## Verdicts", ""]
    lines += [f"On the geometric mean's 95% CI, `{HEADLINE_RULE}` rule (headline), then main rule:"]
    lines += [""]
    for (s, o), agg in sorted(aggs.items()):
        head = verdict(group_lag(agg, "abs", HEADLINE_RULE))
        main = f"; {agg['main_rule']}: {verdict(group_lag(agg))}"
        lines.append(f"- {s} / {o}: {head}" + (main if agg["main_rule"] != HEADLINE_RULE else ""))
    lines += ["", "## Every rule", "", rules_table_text] if rules_table_text else []
    lines += ["", "## Decay times per run", "", runs_text] if runs_text else []
    lines += ["", "## Per-layer lag ratios (abs step, main rule, mean [95% CI])", ""]
    for (s, o), agg in sorted(aggs.items()):
        cells = [f"{k} {ci(v)}" for k, v in agg["layers"].items()]
        lines.append(f"- {s} / {o}: " + ("; ".join(cells) or "none"))
    lines += ["", *lag_map] if lag_map else []
    lines += ["", *online] if online else []
    lines += _curves_section(aggs, figures)
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes or ["none"]), "", "## Figures", ""]
    shown = ("lag_curves", "decoupling", "lag_map")
    rest = [f"![{f.stem}](figures/{f.name})" for f in figures if f.stem not in shown]
    return "\n".join(lines + rest) + "\n"


def markdown_table(sweep: Sweep, rule: str | None = None) -> str:
    """The head and one :func:`table_row` per (setting, optimizer) group of ``sweep`` under
    ``rule`` (default: the groups' main rule)."""
    rows = [
        table_row(s, o, agg, len(sweep.members[s, o]), rule) for (s, o), agg in sweep.groups.items()
    ]
    return "\n".join([TABLE_HEAD, *rows])


def report_tables(sweep: Sweep) -> str:
    """The headline table (:data:`HEADLINE_RULE`) and, where the main rule differs, the main
    rule's, each under a caption line."""
    parts = [f"Rule `{HEADLINE_RULE}` (headline):", "", markdown_table(sweep, HEADLINE_RULE)]
    mains = sorted({agg["main_rule"] for agg in sweep.groups.values()} - {HEADLINE_RULE})
    for main in mains:
        parts += ["", f"Rule `{main}` (the runs' main rule, `timescales.rule`):", ""]
        parts += [markdown_table(sweep, main)]
    return "\n".join(parts)


def write_figures(fig_dir: Path, sweep: Sweep) -> list[Path]:
    """Saves :func:`regime_jax.report.plots.sweep_figures` as ``fig_dir/<name>.png``; their
    paths."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in plots.sweep_figures(sweep):
        paths.append(fig_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=DPI)
    return paths


def partial_sweep(root: Path, sweep: Sweep, grid: Mapping[str, Any] | None = None) -> str | None:
    """``"Partial: k of n runs are not in this report ..."``, or None when every run is in.

    ``n``: the grid of ``sweep.json`` where it can be read (runs not started count too), else
    the run directories found; a run is in the report once it has a usable summary. ``grid``:
    ``sweep.json``'s content, if the caller has read it (:func:`_grid`).
    """
    found = {layout.name(s, o, k) for s, o, k, _ in find_runs(root)}
    try:
        planned = {r["path"] for r in (_grid(root) if grid is None else grid)["runs"]}
    except (KeyError, TypeError):
        planned = set()
    every = found | planned
    missing = every - set(sweep.runs)
    if not missing:
        return None
    return (
        f"Partial: {len(missing)} of {len(every)} runs are not in this report (unfinished, live, "
        f"stopped by a non-finite loss, or not started; see Notes)"
    )


def build_report(sweep_workdir: str | Path) -> dict[str, Any]:
    """Summaries, seed statistics, ``summary.json``, ``report.md`` and figures of a sweep.

    Args:
      sweep_workdir: holds runs at ``<setting>/<optimizer>/seed_<k>/``.

    Returns:
      dict with ``runs`` (per-run summaries), ``groups`` (aggregates keyed
      ``"<setting>/<optimizer>"``), ``notes``, ``table`` (markdown), ``report`` (path),
      ``figures`` (paths) and ``partial`` (:func:`partial_sweep`: None when every run is in;
      ``summary.json`` holds it too).
    """
    root = Path(sweep_workdir)
    sweep, grid = summarize_sweep(root), _grid(root)
    partial = partial_sweep(root, sweep, grid)
    table = report_tables(sweep)
    figures = write_figures(root / "figures", sweep)
    decoupled = decoupling.decoupling(sweep)
    if decoupled["groups"]:
        fig = plots.decoupled_accuracy_figure(decoupled)
        figures.append(root / "figures" / "decoupling.png")
        fig.savefig(figures[-1], dpi=DPI)
    section = decoupling_markdown(decoupled)
    online = online_markdown(decoupled["online"])
    mapped = lagmap.lag_map(sweep, grid)
    if mapped:
        fig = plots.lag_map_figure(mapped)
        figures.append(root / "figures" / "lag_map.png")
        fig.savefig(figures[-1], dpi=DPI)
    text = _markdown(
        table,
        sweep.groups,
        sweep.notes,
        figures,
        section,
        online,
        partial,
        rules_table(sweep),
        runs_table(sweep),
        lag_map_markdown(mapped) if mapped else [],
    )
    (root / "report.md").write_text(text)
    out = sweep.to_dict() | {"online": decoupled["online"], "partial": partial}
    out |= {"decoupling": decoupled} if decoupled["groups"] else {}
    out |= {"lag_map": mapped} if mapped else {}
    records.write_atomic(root / records.SUMMARY, records.to_json(out, indent=1) + "\n")
    paths = {"report": str(root / "report.md"), "figures": [str(f) for f in figures]}
    return out | {"table": table} | paths


def write_run_figures(
    workdir: str | Path | records.Run, summary: RunSummary | None = None
) -> list[Path]:
    """One run's figures (:func:`regime_jax.report.plots.run_figures`) as
    ``<workdir>/figures/*.png``;
    a partial run's are titled ``partial at step N of M (why)`` (:attr:`records.Run.partial`).
    ``summary``: the run's (computed if None)."""
    run = workdir if isinstance(workdir, records.Run) else records.load_run(workdir)
    (run.workdir / "figures").mkdir(exist_ok=True)
    paths = []
    for name, fig in plots.run_figures(run, summary):
        paths.append(run.workdir / "figures" / f"{name}.png")
        fig.savefig(paths[-1], dpi=DPI)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m regime_jax.report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python -m regime_jax.report --run runs/mlp_mnist1d     one run's figures\n"
            "  python -m regime_jax.report --workdir runs/reproduce   a sweep's report\n\n"
            "A run or sweep not finished is reported too, marked partial. Errors are one line\n"
            "with exit code 2."
        ),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--workdir",
        metavar="SWEEP",
        help="a sweep's directory (python -m regime_jax.sweep): writes its report.md, "
        "summary.json and figures/ there, and prints the table of lag ratios",
    )
    where.add_argument(
        "--run",
        metavar="WORKDIR",
        help="one run's workdir (python -m regime_jax.main): writes its figures under "
        "WORKDIR/figures/ and prints their paths",
    )
    args = parser.parse_args(argv)
    try:
        if args.run:
            _require(Path(args.run), records.CONFIG, records.METRICS)
            run = records.load_run(args.run)
            if run.partial:
                print(f"{args.run}: {run.partial}; every figure is marked so", flush=True)
            summary = RunSummary.from_json(summarize_run(run.workdir))
            for line in run_lag_lines(summary):
                print(line)
            for path in write_run_figures(run, summary):
                print(path)
            return
        _require(Path(args.workdir))
        if not find_runs(args.workdir):
            raise ValueError(f"{args.workdir} holds no runs ({layout.PATTERN}/)")
        report = build_report(args.workdir)
    except (OSError, ValueError, KeyError, IndexError) as err:
        fault = faults.classify(err) if not isinstance(err, FileNotFoundError) else None
        if fault is not None:  # a full disk or lost permission while writing the figures
            parser.exit(fault.code, f"regime_jax.report: {faults.describe(fault, None, _KEPT)}\n")
        parser.exit(2, f"regime_jax.report: error: {_one_line(err)}\n")
    if report["partial"]:
        print(report["partial"])
    print(report["table"])
    print(f"report: {report['report']}")


_KEPT = "the runs' records are untouched (a report only writes figures and report.md)"


def run_lag_lines(summary: RunSummary) -> list[str]:
    """``--run``'s lines: per rule (main, headline), T(flip) and T(step) with their fractions
    of the run and the abs lag ratio, flagged budget-bound (T(step) in the run's last 10%),
    or the status that says why there is none."""
    out = []
    for rule in dict.fromkeys([summary.main_rule, HEADLINE_RULE]):
        lag = summary.lag("abs", rule)
        if lag.status is None:
            continue
        times = f"T(flip) {_time_cell(lag, 't_flip')}, T(step) {_time_cell(lag, 't_step')}"
        if lag.ratio is None:
            out.append(f"lag ratio [{rule}]: none ({lag.status}); {times}")
            continue
        flag = f" BUDGET-BOUND: {lag.message}" if lag.budget_bound else ""
        out.append(f"lag ratio [{rule}]: {num(lag.ratio)}; {times} (fraction of run){flag}")
    return out


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


# ------------------------------------------------------------ the lag map section


def _grid(root: Path) -> dict[str, Any]:
    """The sweep's ``sweep.json`` (``{}`` where it is missing or does not read)."""
    try:
        grid = records.read_json(root / layout.GRID)
    except (OSError, ValueError):
        return {}
    return grid if isinstance(grid, dict) else {}


def _why(point: Mapping[str, Any]) -> str:
    """``reason x k`` per reason a seed has no ratio (a reason may hold ``;``), ``/`` between."""
    return " / ".join(f"{reason} x{k}" for reason, k in point["why_none"].items())


def lag_map_cell(point: Mapping[str, Any] | None) -> str:
    """``geo mean [95% CI] (seeds with a ratio / runs; why the others have none)``, or
    ``not run`` for a pair the grid leaves out."""
    if point is None:
        return "not run"
    why = _why(point)
    return f"{ci(point)} ({point['n']}/{point['runs']}" + (f"; {why})" if why else ")")


def lag_map_markdown(mapped: Mapping[str, Any]) -> list[str]:
    """report.md's "Lag map" section: per axis, values x lines (optimizers) of
    :func:`regime_jax.analysis.lagmap.lag_map`, and the figure."""
    lines = ["## Lag map", ""]
    lines += [
        f"One factor at a time around the base setting: per axis value and optimizer, the "
        f"geometric mean of the per-seed lag ratios (`{HEADLINE_RULE}` rule, abs step) with its "
        f"95% bootstrap CI, (seeds with a ratio / runs; why the others have none). Paper: "
        f"{PAPER_RATIO}x. On the `{lagmap.OPTIMIZER_AXIS}` axis each optimizer column of the "
        f"base setting is a value.",
        "",
        "![lag_map](figures/lag_map.png)",
    ]
    for axis, entry in mapped.items():
        cells = {(p["x"], p["line"]): p for p in entry["points"]}
        head = "value" if axis != lagmap.OPTIMIZER_AXIS else "optimizer"
        lines += ["", f"### {axis}", ""]
        lines += ["| " + " | ".join([head, *entry["lines"]]) + " |"]
        lines += ["|---" * (1 + len(entry["lines"])) + "|"]
        for x in entry["values"]:
            row = [lag_map_cell(cells.get((x, line))) for line in entry["lines"]]
            lines.append("| " + " | ".join([str(x), *row]) + " |")
    return lines


# ------------------------------------------------------------ the decoupling section


def online_markdown(online: Mapping[str, Any]) -> list[str]:
    """The online-vs-offline table (report.md, every sweep)."""
    if not online:
        return []
    lines = ["## The online settle detector against the offline rule", ""]
    lines += [
        "T(flip) of `flip/all`: the offline main rule (the whole series) and the causal detector",
        "`online.OnlineSettle` (trailing window, fraction of its running peak, patience), mean",
        "[95% CI] over seeds; `never`: runs where it did not trigger.",
        "",
        "| setting | optimizer | T(flip) offline | T(flip) online | online ÷ offline | never |",
        "|---|---|---|---|---|---|",
    ]
    for group, o in online.items():
        setting, opt = group.split("/")
        cells = [ci(o["offline"], ".0f"), ci(o["online"], ".0f")]
        cells += [ci(o["online_over_offline"], ".2f"), str(o["online_missing"])]
        lines.append(f"| {setting} | {opt} | " + " | ".join(cells) + " |")
    return lines


DECOUPLING_HEAD = (
    "| setting | optimizer | freeze | F (mean step; seeds that froze) | seeds | val acc [95% CI] | "
    "gap to full training | val loss [95% CI] | gap to full training | disagreement at end | "
    "ms/step ordinary / frozen | frozen ÷ ordinary |\n" + "|---" * 12 + "|"
)


def _freeze_cell(v: Mapping[str, Any]) -> str:
    return f"{num(v['freeze_step'], '.0f')} ({v['frozen_seeds']}/{len(v['seeds'])})"


def decoupling_markdown(result: Mapping[str, Any]) -> list[str]:
    """report.md's decoupling section (empty when the sweep has no variants)."""
    if not result["groups"]:
        return []
    lines = ["## Decoupling: freeze the patterns, keep training the values", ""]
    lines += [
        "Per seed, the variant against full training (`never`) of the same seed: val acc / loss",
        "at the last step, mean over seeds with a 95% bootstrap CI, and the paired gap (variant",
        "minus full training). F: the freeze step (`xT`: x times the full run's T(flip) under",
        "the main rule; `auto`: the online detector's check step), averaged over the seeds that",
        "froze; a run whose F is at or past its last step trains as full training and still",
        "counts in the accuracy columns. Disagreement: the fraction",
        "of probe bits where the value stream's pattern differs from the frozen gates. Timing:",
        "wall-clock per step of the frozen phase over the ordinary phase, within each run.",
        "",
        DECOUPLING_HEAD,
    ]
    for group, variants in result["groups"].items():
        setting, opt = group.split("/")
        for variant, v in variants.items():
            ms = f"{num(v['ordinary_ms'], '.2f')} / {num(v['gated_ms'], '.2f')}"
            cells = [
                setting,
                opt,
                variant,
                _freeze_cell(v) if variant != decoupling.NEVER else "–",
                str(len(v["seeds"])),
                ci(v["acc"], ".3f"),
                ci(v["acc_gap"], ".3f", signed=True) if variant != decoupling.NEVER else "0",
                ci(v["loss"], ".3f"),
                ci(v["loss_gap"], ".3f", signed=True) if variant != decoupling.NEVER else "0",
                num(v["disagreement"], ".3f"),
                ms,
                ci(v["gated_over_ordinary"], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
