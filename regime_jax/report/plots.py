"""Every figure: one run's, a stability test's and a sweep's, as matplotlib Figures; the numbers are
:mod:`regime_jax.analysis.summary`'s.

Each figure function takes a :class:`regime_jax.records.Run` (or its workdir), a summary or
stability test outputs, and returns a bare matplotlib ``Figure`` (Agg; no pyplot, nothing
accumulates in pyplot's figure list). A notebook shows it as PNG when it is a cell's value
(``_repr_png_``, no ``%matplotlib`` needed); a script calls ``fig.savefig("x.png")``.
:func:`run_figures` and :func:`sweep_figures` yield the figures :mod:`regime_jax.report`
saves. matplotlib is imported when a figure is made, not with this module.

Example (needs a run directory, so not a doctest)::

    run = records.load_run("runs/mlp_mnist1d")
    timescales_figure(run).savefig("timescales.png")
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from regime_jax import records
from regime_jax.analysis import curves, decoupling, layout, timescales
from regime_jax.analysis import summary as analysis
from regime_jax.analysis.fmt import num
from regime_jax.analysis.summary import RunSummary, SummaryLike, table_frame, table_rows

# table_rows / table_frame are data (regime_jax.analysis.summary), re-exported for older callers.
__all__ = [
    "kept_vs_eps_figure",
    "lag_curves_figure",
    "lag_map_figure",
    "lag_summary_figure",
    "layer_flips_figure",
    "mask_raster_figure",
    "run_figures",
    "setting_figure",
    "stability_kept_figure",
    "stability_radius_figure",
    "sweep_figures",
    "table_frame",
    "table_rows",
    "timescales_figure",
]

# (key, color, line style) of the three overall series of timescales_figure.
_SERIES = (
    ("flip/all", "tab:red", "-"),
    ("step/abs/all", "tab:blue", "-"),
    ("step/rel/all", "tab:purple", "--"),
)
_CI = ("ci_low", "ci_high")
RunLike = records.Run | str | os.PathLike  # a loaded run or its workdir
# (key, label, style) of stability_radius_figure: outer quantiles thin, the median thick.
_BLUE = "tab:blue"
_RADIUS_LINES = (
    ("stability/radius_q10", "radius q10", dict(color=_BLUE, lw=1, ls=":")),
    ("stability/radius_q25", "radius q25", dict(color=_BLUE, lw=1, ls="--")),
    ("stability/radius_q50", "radius q50", dict(color=_BLUE, lw=2.2)),
    ("stability/radius_q75", "radius q75", dict(color=_BLUE, lw=1, ls="--")),
    ("stability/radius_q90", "radius q90", dict(color=_BLUE, lw=1, ls=":")),
    ("stability/first_order_q50", "first-order q50", dict(color="tab:orange", ls="-.")),
)


@functools.cache
def _figure_class() -> type:
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A bare (Agg) figure that IPython shows as PNG without pyplot or a backend."""

        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

    return NotebookFigure


def _axes(figsize: tuple[float, float] = (7.5, 4.2)):
    fig = _figure_class()(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def _as_run(run: RunLike) -> records.Run:
    return run if isinstance(run, records.Run) else records.load_run(run)


def _empty(fig, ax, message: str):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _marked(fig, run: records.Run):
    """``fig``, titled with the run's ``"partial at step N of M (why)"`` if it is not finished
    (:attr:`regime_jax.records.Run.partial`): no figure of a partial run passes for a final one."""
    if run.partial:
        fig.suptitle(run.partial, color="tab:red", fontsize=9, wrap=True)
    return fig


def _lag_cell(lag: analysis.Lag, kind: str) -> str:
    if lag.ratio is None:
        return f"{kind}: {lag.status}"
    return f"{num(lag.ratio)} ({kind}{', budget-bound' if lag.budget_bound else ''})"


def _lag_title(summary: RunSummary) -> str:
    """The lag ratios under the main rule and the headline rule; a ratio whose T(step) lies in
    the run's last 10% is marked budget-bound, a missing one names its status."""
    lines = []
    for rule in dict.fromkeys([summary.main_rule, analysis.HEADLINE_RULE]):
        if summary.lag("abs", rule).status is None:
            continue  # a summary written before the rule existed
        parts = [_lag_cell(summary.lag(kind, rule), kind) for kind in analysis.KINDS]
        lines.append(f"lag ratio T_step / T_flip [{rule}]: " + ", ".join(parts))
    return "\n".join(lines)


def timescales_figure(run: RunLike, summary: RunSummary | Mapping[str, Any] | None = None):
    """``flip/all``, ``step/abs/all``, ``step/rel/all`` (smoothed, min-max) and decay times.

    One axes: the three curves, a vertical line at each decay time under the main rule (where
    there is one) and at the max-validation-accuracy step, the lag ratios in the title.
    ``summary``: the run's :class:`~regime_jax.analysis.summary.RunSummary` or
    ``summary.json`` object (:func:`regime_jax.analysis.summary.summarize_run`; computed if None).
    """
    run = _as_run(run)
    if summary:
        summary = RunSummary.of(summary)
    else:
        summary = RunSummary.from_json(analysis.summarize_run(run.workdir))
    window = summary.window
    fig, ax = _axes()
    for key, color, ls in _SERIES:
        steps, curves = analysis.normalized_curves([run], key, window)
        if curves.shape[0]:
            ax.plot(steps, curves[0], color=color, ls=ls, label=key)
        decay = summary.decay_time(key)
        if decay.time is not None:
            frac = "" if decay.run_fraction is None else f" ({decay.run_fraction:.2f} of run)"
            label = f"T {key} = {num(decay.time, 'g')}{frac}"
            ax.axvline(decay.time, color=color, ls=":", lw=1.5, label=label)
    mva = summary.mva_step
    if mva is not None:
        ax.axvline(mva, color="k", ls="-.", lw=1, label=f"max val. acc. (step {mva})")
    ax.set(xlabel="step", ylabel=f"smoothed (window {window}), min-max normalized")
    ax.set_title(_lag_title(summary), fontsize=10)
    ax.legend(fontsize=7)
    return _marked(fig, run)


def mask_raster_figure(
    run: RunLike, layer: str | None = None, max_units: int = 128, name: str | None = None
):
    """Per-unit flips between consecutive mask snapshots
    (:func:`regime_jax.analysis.summary.flip_raster`).

    Each cell spans the snapshot interval it was measured over; colour is the fraction of
    probe sites (examples x positions) of that unit whose bit changed. First layer by default;
    ``name`` (e.g. the run's ``setting/optimizer/seed_k``) prefixes the title. The one raster
    renderer: the sweep report's rasters are drawn by it too.
    """
    from matplotlib.colors import PowerNorm

    run = _as_run(run)
    fig, ax = _axes((8, 4.5))
    raster = analysis.flip_raster(run, layer, max_units)
    if raster is None:
        message = "needs >= 2 mask snapshots (record.snapshot_every_steps)"
        return _marked(_empty(fig, ax, message), run)
    layer, _, frac = raster
    x_edges, y_edges = np.asarray(run.mask_steps), np.arange(frac.shape[0] + 1) - 0.5
    mesh = ax.pcolormesh(
        x_edges, y_edges, frac, cmap="magma", norm=PowerNorm(0.5, 0, frac.max() or 1)
    )
    fig.colorbar(mesh, ax=ax, label="fraction of probe sites flipped")
    ax.invert_yaxis()
    ax.set(xlabel="step (snapshot intervals)", ylabel=f"unit of {layer} (first {frac.shape[0]})")
    title = f"{layer}: per-unit pattern flips between snapshots"
    ax.set_title(f"{name}: {title}" if name else title, fontsize=10)
    return _marked(fig, run)


def layer_flips_figure(run: RunLike):
    """Smoothed flip rate of every recorded layer and ``flip/all`` (log y; zeros not drawn)."""
    run = _as_run(run)
    window, (fig, ax) = analysis.decay_config_of(run.config)[0].window, _axes()
    for key in run.keys("flip/"):
        steps, v = run.series(key)
        y = timescales.smooth(v, window) if v.size else v
        style = dict(color="k", lw=2) if key == "flip/all" else dict(lw=1.2)
        ax.plot(steps, np.where(y > 0, y, np.nan), label=key, **style)
    ax.set(xlabel="step", ylabel=f"flip rate (smoothed, window {window})", yscale="log")
    ax.set_title("pattern flip rate per layer", fontsize=10)
    ax.legend(fontsize=7)
    return _marked(fig, run)


def _kept_curve(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(radii, kept)`` from a row's ``stability/kept@<radius>`` keys, sorted by radius."""
    pairs = sorted(
        (float(k.split("@")[1]), float(v))
        for k, v in row.items()
        if k.startswith("stability/kept@")
    )
    return np.asarray([r for r, _ in pairs]), np.asarray([v for _, v in pairs])


def stability_kept_figure(run: RunLike):
    """Fraction of (direction, example) pairs whose pattern survives ``theta + eps u``, vs eps.

    One curve per probed step (``stability.num_points > 0``): step 0 black, the last step red,
    the ones between coloured by step (colour bar, symmetric-log scale).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import SymLogNorm

    run = _as_run(run)
    fig, ax = _axes()
    rows = [r for r in run.rows if any(k.startswith("stability/kept@") for k in r)]
    if not rows:
        message = "no stability/kept@<r> metrics: set stability.num_points > 0"
        return _marked(_empty(fig, ax, message), run)
    norm = SymLogNorm(1, vmin=0, vmax=max(rows[-1]["step"], 1))
    cmap = colormaps["viridis"]
    for i, row in enumerate(rows):
        last, step = i == len(rows) - 1, row["step"]
        style = dict(color=cmap(norm(step)), lw=1, alpha=0.8)
        if i == 0 or last:
            label = f"{'final' if last else 'init'} (step {step})"
            style = dict(color="tab:red" if last else "k", lw=2.2, label=label, zorder=3)
        ax.plot(*_kept_curve(row), marker="o", ms=3, **style)
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="probed step")
    title = "local stability of activation patterns along training"
    return _marked(_kept_axes(fig, ax, title), run)


def _kept_axes(fig, ax, title: str):
    ax.set(xscale="log", xlabel="perturbation radius eps = ||delta||_2", ylim=(-0.02, 1.02))
    ax.set(ylabel="kept fraction (whole pattern unchanged)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def stability_radius_figure(run: RunLike):
    """Radius quantiles ``stability/radius_q10..q90`` and ``stability/first_order_q50`` vs step.

    Log y, symmetric-log x (so step 0 shows); ``inf`` (unbroken within the tested radii) and
    non-positive values cannot sit on a log axis and are dropped. A dotted line marks the
    largest tested radius.
    """
    run = _as_run(run)
    fig, ax = _axes()
    for key, label, style in _RADIUS_LINES:
        steps, v = run.series(key)
        ok = np.isfinite(v) & (v > 0)
        ax.plot(steps[ok], v[ok], marker="o", ms=3, label=label, **style)
    max_radius = run.config.get("stability", {}).get("max_radius")
    if max_radius:
        ax.axhline(max_radius, color="gray", ls=":", lw=1, label="largest tested radius")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set(yscale="log", xlabel="step", ylabel="stability radius (||delta||_2)")
    ax.set_title("per-example stability radius: quantiles over the probe set", fontsize=10)
    ax.legend(fontsize=7)
    return _marked(fig, run)


def kept_vs_eps_figure(results: Mapping[str, Mapping[str, Any]]):
    """Kept fraction vs radius of direct :func:`regime_jax.stability.perturb` outputs.

    ``results``: ``{label: perturb output}`` (its ``"radii"`` and ``"kept/all"``), e.g.
    ``{"init": out0, "trained": out1}``; one curve each.
    """
    fig, ax = _axes()
    for label, out in results.items():
        ax.plot(np.asarray(out["radii"]), np.asarray(out["kept/all"]), marker="o", label=label)
    return _kept_axes(fig, ax, "finite-difference stability test")


def lag_summary_figure(summary: SummaryLike):
    """Lag ratio (abs step) per (setting, optimizer) and decay rule, beside the paper's 3.85x.

    Seeds as dots (hollow: budget-bound, T(step) in the run's last 10%), the geometric mean
    with its 95% CI as marker and bars (the arithmetic mean where a sweep summary predates the
    geometric one); log scale. Takes what :func:`table_rows` does.
    """
    groups = sorted(analysis.load_sweep_summary(summary)["groups"].items())
    fig, ax = _axes((max(6.5, 1.9 * len(groups) + 2.5), 4.2))
    rules = timescales.RULES
    for j, rule in enumerate(rules):
        for i, (_, agg) in enumerate(groups):
            x, stats = i + 0.16 * (j - (len(rules) - 1) / 2), analysis.group_lag(agg, "abs", rule)
            per_seed = stats.get("per_seed") or []
            bound = stats.get("per_seed_budget_bound") or [None] * len(per_seed)
            for hollow in (False, True):
                ys = [v for v, b in zip(per_seed, bound, strict=True) if v and bool(b) is hollow]
                face = "none" if hollow else f"C{j}"
                label = rule if not (i or hollow) else None
                ax.plot([x] * len(ys), ys, "o", ms=3, color=f"C{j}", mfc=face, label=label)
            view = analysis.stat_view(stats, "geo_mean" if "geo_mean" in stats else "mean")
            centre = view["mean"]
            if centre is not None:
                lo, hi = (view[k] if view[k] is not None else centre for k in _CI)
                yerr = [[centre - lo], [hi - centre]]
                ax.errorbar(x, centre, yerr, fmt="D", color=f"C{j}", ms=7, capsize=4)
    paper = analysis.PAPER_RATIO
    ax.axhline(paper, color="tab:red", ls="--", label=f"paper {paper}x")
    ax.axhline(1.0, color="k", ls=":", lw=1, label="no lag (1x)")
    ax.set_xticks(range(len(groups)), [name.replace("/", "\n") for name, _ in groups])
    ax.set(ylabel="lag ratio T_step / T_flip (abs step)", xlim=(-0.6, len(groups) - 0.4))
    ax.set_yscale("log")
    main = ", ".join(sorted({agg["main_rule"] for _, agg in groups}))
    ax.set_title(
        f"per rule: seeds (dots; hollow = budget-bound), geometric mean and 95% CI; "
        f"main rule {main}, headline {analysis.HEADLINE_RULE}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return fig


def lag_curves_figure(summary: SummaryLike):
    """The lag ratio (abs step) over each rule's parameter, one panel per parameter: per
    (setting, optimizer) the seeds' geometric mean with its 95% CI band (only seeds with a
    ratio at that value: both series decayed), lines at the paper's 3.85x and 1x.

    Takes what :func:`table_rows` does (groups' ``curves``, :mod:`regime_jax.analysis.curves`).
    """
    groups = sorted(analysis.load_sweep_summary(summary)["groups"].items())
    fig = _figure_class()(figsize=(13, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, param in zip(axes, curves.PARAMS, strict=True):
        rules, drawn = set(), False
        for i, (name, agg) in enumerate(groups):
            curve = agg.get("curves", {}).get(param)
            if not curve:
                continue
            rules.add(curve["rule"])
            x, mean, lo, hi = curves.as_arrays(curve)
            style = dict(color=f"C{i % 10}", ls=("-", "--", ":", "-.")[i // 10 % 4])
            ax.plot(x, mean, marker="o", ms=3, label=name, **style)
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15)
            drawn |= bool(np.isfinite(mean).any())
        ax.axhline(analysis.PAPER_RATIO, color="tab:red", lw=2, ls="--", label="paper 3.85x")
        ax.axhline(1.0, color="k", ls=":", lw=1, label="no lag (1x)")
        ax.set(xlabel=param, ylabel="lag ratio T_step / T_flip (abs step)")
        if not drawn:  # nothing on a log axis; say so
            ax.text(0.5, 0.5, "no lag ratio at any value", ha="center", transform=ax.transAxes)
        ax.set_xscale("log" if param == "window" and drawn else "linear")
        ax.set_title(f"{param} (rule: {', '.join(sorted(rules)) or '-'})", fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "lag ratio vs decay-rule parameter: geometric mean over seeds, band = 95% CI", fontsize=11
    )
    return fig


def lag_map_figure(mapped: Mapping[str, Any]):
    """The lag map (:func:`regime_jax.analysis.lagmap.lag_map`): one panel per axis, its values
    categorical in plot order, the geometric-mean lag ratio (log scale) with its 95% CI bars,
    one line per optimizer (one line on the optimizer axis), lines at the paper's 3.85x and 1x.
    A point without a ratio is left out; a panel without any says so."""
    from matplotlib.ticker import FuncFormatter

    axes_names = list(mapped)
    cols = min(3, max(1, len(axes_names)))
    rows = -(-max(1, len(axes_names)) // cols)
    fig = _figure_class()(figsize=(4.4 * cols, 3.5 * rows), layout="constrained")
    panels = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    lines_all = list(dict.fromkeys(line for e in mapped.values() for line in e["lines"]))
    color = {line: f"C{i % 10}" for i, line in enumerate(lines_all)}
    for ax, axis in zip(panels, axes_names, strict=False):
        entry, drawn = mapped[axis], False
        at = {x: i for i, x in enumerate(entry["values"])}
        width = len(entry["lines"])
        for j, line in enumerate(entry["lines"]):
            pts = [p for p in entry["points"] if p["line"] == line and p["mean"] is not None]
            pts = [p for p in pts if np.isfinite(p["mean"])]
            if not pts:
                continue
            xs = [at[p["x"]] + 0.08 * (j - (width - 1) / 2) for p in pts]
            ys = [p["mean"] for p in pts]
            lo = [p["mean"] - _finite_or(p["ci_low"], p["mean"]) for p in pts]
            hi = [_finite_or(p["ci_high"], p["mean"]) - p["mean"] for p in pts]
            ax.errorbar(xs, ys, [lo, hi], fmt="o-", ms=4, capsize=3, color=color[line], label=line)
            drawn = True
        ax.axhline(analysis.PAPER_RATIO, color="tab:red", ls="--", lw=1.2, label="paper 3.85x")
        ax.axhline(1.0, color="k", ls=":", lw=1, label="no lag (1x)")
        with_ratio = {p["x"] for p in entry["points"] if _finite_or(p["mean"], None) is not None}
        for x in entry["values"]:  # a value where no seed of any optimizer gave a ratio
            if x not in with_ratio:
                where = ax.get_xaxis_transform()
                ax.text(at[x], 0.04, "no ratio", ha="center", fontsize=7, transform=where)
        ax.set_xticks(range(len(entry["values"])), [str(v) for v in entry["values"]], fontsize=8)
        ax.set_xlim(-0.5, len(entry["values"]) - 0.5)
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        if not drawn:
            ax.text(0.5, 0.5, "no lag ratio", ha="center", transform=ax.transAxes)
        ax.set(ylabel="lag ratio T_step / T_flip")
        ax.set_title(axis, fontsize=10)
        ax.legend(fontsize=6)
    for ax in panels[len(axes_names) :]:
        ax.set_axis_off()
    fig.suptitle(
        f"lag map: geometric mean over seeds ({analysis.HEADLINE_RULE} rule, abs step), "
        f"95% CI bars",
        fontsize=11,
    )
    return fig


def _finite_or(x: float | None, default: float | None) -> float | None:
    return x if x is not None and np.isfinite(x) else default


# ------------------------------------------------------------------------ the sweep report


def _curves_panel(ax, runs, summaries, window: int) -> None:
    for key, color in (("flip/all", "tab:red"), ("step/abs/all", "tab:blue")):
        steps, curves = analysis.normalized_curves(runs, key, window)
        if curves.shape[0]:
            ax.plot(steps, curves.mean(0), color=color, label=f"{key} (norm.)")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
        t = analysis.mean_decay_time(summaries, key)
        if t is not None:
            ax.axvline(t, color=color, ls="--", lw=1, label=f"T {key} = {num(t, '.0f')}")
    mva = [s.mva_step for s in summaries if s.mva_step]
    if mva:
        ax.axvline(np.mean(mva), color="k", ls=":", lw=1, label=f"MVA {num(np.mean(mva), '.0f')}")
    ax.set(xlabel="step", ylabel="normalized (smoothed)")
    ax.legend(fontsize=7)


def _layers_panel(ax, runs, window: int) -> None:
    for key in [k for k in runs[0].keys("flip/") if k != "flip/all"]:
        steps, mean = analysis.smoothed_seed_mean(runs, key, window)
        if mean is not None:
            ax.plot(steps, np.maximum(mean, 1e-7), lw=1, label=key)
    ax.set(xlabel="step", ylabel="flip rate (smoothed, seed mean)", yscale="log")
    ax.legend(fontsize=7)


def setting_figure(setting: str, members: Mapping[str, Sequence[tuple[RunSummary | Mapping, Any]]]):
    """One setting of a sweep, one column per optimizer: the seeds' normalized ``flip/all`` and
    ``step/abs/all`` (mean, min-max band) with their mean decay times and MVA (top), and each
    layer's smoothed flip rate, seed mean (bottom).

    ``members``: ``{optimizer: [(RunSummary or summary.json object, run directory or Run)]}``,
    as in :attr:`regime_jax.analysis.summary.Sweep.members`.
    """
    fig = _figure_class()(figsize=(5.5 * len(members), 7.5), layout="constrained")
    axes = fig.subplots(2, len(members), squeeze=False)
    for col, (opt, items) in enumerate(sorted(members.items())):
        summaries = [RunSummary.of(s) for s, _ in items]
        runs = [_as_run(d) for _, d in items]
        window = summaries[0].window
        _curves_panel(axes[0, col], runs, summaries, window)
        axes[0, col].set_title(f"{setting} / {opt}: {len(runs)} seeds, band = min-max")
        _layers_panel(axes[1, col], runs, window)
    return fig


def sweep_figures(sweep: analysis.Sweep) -> Iterator[tuple[str, Any]]:
    """``(name, Figure)`` of the sweep report, per setting in name order: ``<setting>`` (its
    :func:`setting_figure`) and ``<setting>_raster`` (:func:`mask_raster_figure` of the first
    optimizer's first seed; left out when that run has fewer than two mask snapshots), then
    ``lag_curves`` (:func:`lag_curves_figure`) where a group has curves."""
    by_setting: dict[str, dict[str, list]] = {}
    for (setting, opt), items in sweep.members.items():
        by_setting.setdefault(setting, {})[opt] = items
    for setting, members in sorted(by_setting.items()):
        yield setting, setting_figure(setting, members)
        first = records.load_run(members[sorted(members)[0]][0][1])
        if len(first.mask_steps) >= 2:
            name = layout.name(*layout.parse(first.workdir))
            yield f"{setting}_raster", mask_raster_figure(first, name=name)
    if any(agg.get("curves") for agg in sweep.groups.values()):
        yield "lag_curves", lag_curves_figure(sweep.to_dict())


def run_figures(
    run: RunLike, summary: RunSummary | Mapping[str, Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(name, Figure)`` of one run: ``timescales``, ``layer_flips``, ``raster``, and with
    ``stability/*`` metrics (``stability.num_points > 0``) ``stability_kept`` and
    ``stability_radius``. A run that is not finished (unfinished, live, stopped by a
    non-finite loss) is drawn as far as it got, every figure titled with its
    ``"partial at step N of M (why)"`` (:attr:`regime_jax.records.Run.partial`). ``summary``:
    the run's summary for ``timescales`` (computed if None)."""
    run = _as_run(run)
    makers = {
        "timescales": functools.partial(timescales_figure, summary=summary),
        "layer_flips": layer_flips_figure,
        "raster": mask_raster_figure,
    }
    if run.keys("stability/"):
        makers |= {
            "stability_kept": stability_kept_figure,
            "stability_radius": stability_radius_figure,
        }
    for name, make in makers.items():
        yield name, make(run)


def decoupled_accuracy_figure(result: Mapping[str, Any]):
    """Final val accuracy against the freeze step (as a fraction of the run), per setting.

    One panel per setting, one line per optimizer (mean over seeds, 95% CI bars); full
    training sits at 1.0 (never frozen); a freeze at or after the last step is drawn there too.
    """
    settings = sorted({g.split("/")[0] for g in result["groups"]})
    fig = _figure_class()(figsize=(3.6 * max(1, len(settings)), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(settings))))
    for ax, setting in zip(axes, settings, strict=False):
        for group, variants in result["groups"].items():
            if group.split("/")[0] != setting:
                continue
            pts = []
            for variant, v in variants.items():
                mean = v["acc"]["mean"]
                if mean is None or not np.isfinite(mean) or v["num_steps"] is None:
                    continue
                f = v["num_steps"] if v["freeze_step"] is None else v["freeze_step"]
                x = min(1.0, f / v["num_steps"])
                lo, hi = v["acc"]["ci_low"], v["acc"]["ci_high"]
                err = [[mean - lo], [hi - mean]] if lo is not None and np.isfinite(lo) else None
                pts.append((x, mean, err, variant))
            pts.sort()
            line = ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=group.split("/")[1]
            )
            for x, mean, err, variant in pts:
                if err is not None:
                    ax.errorbar([x], [mean], yerr=err, color=line[0].get_color(), capsize=2)
                if variant == decoupling.AUTO:
                    ax.annotate(
                        "auto", (x, mean), fontsize=7, xytext=(3, -9), textcoords="offset points"
                    )
        ax.set(
            xlabel="freeze step / num_steps (1 = never)", ylabel="final val acc", xlim=(-0.05, 1.05)
        )
        ax.set_title(setting, fontsize=10)
        ax.legend(fontsize=7)
    return fig
