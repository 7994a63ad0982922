"""Pure analysis of a run and of a sweep: numbers and plain data, never a figure.

:func:`summarize_run` measures one run: decay times of ``flip/all``, ``step/abs/all``,
``step/rel/all`` under every rule of :mod:`regime_jax.analysis.timescales` (the run's
``config.timescales`` rule is the main one), lag ratios ``T_step / T_flip`` overall and per layer
(layer ``fc1`` vs parameter part ``fc1``, ``block0/ffn`` vs ``block0``), MVA and the 1.1x-loss
step, and the abs lag ratio as curves over each rule's parameter
(:mod:`regime_jax.analysis.curves`).
Failed measurements stay in the output as statuses with messages.
:func:`summarize_sweep` walks ``<sweep>/<setting>/<optimizer>/seed_<k>/`` and aggregates the lag
ratios over seeds (:func:`aggregate`, :func:`verdict`, :func:`table_rows`).
:func:`normalized_curves` and :func:`flip_raster` are the arrays the figures of
:mod:`regime_jax.report.plots` draw. Imports neither matplotlib nor training code.

Example (needs a run directory, so not a doctest)::

    s = summarize_run("runs/mlp_mnist1d")
    print(main_ratio(s), s["reference"])
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regime_jax import records
from regime_jax.analysis import curves, online, timescales
from regime_jax.analysis.curves import PAPER_RATIO
from regime_jax.analysis.timescales import RULES, DecayConfig, decay_times_all_rules

SUMMARY = records.SUMMARY
KINDS = ("abs", "rel")
SERIES = ("flip/all", "step/abs/all", "step/rel/all")
SummaryLike = Mapping[str, Any] | str | os.PathLike  # a sweep summary, its file or its folder


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
    return records.complete(run.config, run.rows)


def summarize_run(workdir: str | Path) -> dict[str, Any]:
    """Decay times, lag ratios (overall, per layer, every rule) and reference points of a run.

    Args:
      workdir: a run directory (``config.json`` + ``metrics.jsonl``, masks optional).

    Returns:
      JSON-serializable dict (non-finite numbers as None): ``decay[series][rule]``,
      ``lag[abs|rel][rule]`` (LagResult dicts, ``ratio`` None unless status "ok"),
      ``lag_ratio_curves`` (abs step; :func:`regime_jax.analysis.curves.run_curves`), ``layers``,
      ``reference``, ``main_rule``, ``final``, ``complete``, ``partial`` (None, or
      ``"partial at step N of M (why)"`` for a run that is not finished:
      :attr:`regime_jax.records.Run.partial`), ``metrics_sha256`` (of the ``metrics.jsonl``
      it was computed from: :func:`load_or_summarize` recomputes a summary whose rows have
      changed since), ``notes``.
    """
    digest = records.metrics_digest(workdir)
    run = records.load_run(workdir)
    cfg, note = decay_config_of(run.config)
    notes = [note] if note else []
    lag = {}
    for kind in KINDS:
        steps, (s, h) = _aligned(run, f"step/{kind}/all", "flip/all")
        lag[kind] = {rule: _guard(_lag, steps, s, h, cfg, rule) for rule in RULES}
    steps, (s, h) = _aligned(run, "step/abs/all", "flip/all")
    last_step = run.rows[-1]["step"] if run.rows else None
    final = {k: run.series(k)[1][-1:].tolist() for k in ("train/loss", "eval/acc", "eval/loss")}
    out = {
        "workdir": str(run.workdir),
        "seed": run.config.get("seed"),
        "num_steps": run.config.get("num_steps"),
        "last_step": last_step,
        "complete": _complete(run),
        "partial": run.partial,
        "metrics_sha256": digest,
        "final": {k: v[0] if v else None for k, v in final.items()},
        "main_rule": cfg.rule,
        "decay_config": cfg.to_dict(),
        "decay": _decays(run, cfg, notes),
        "lag": lag,
        curves.KEY: _guard(curves.run_curves, steps, s, h, cfg),
        "layers": _layer_lags(run, cfg, notes),
        "reference": reference_points(run, cfg),
        "decouple": _decoupled(run),
        "notes": notes,
    }
    out["online"] = _online(run, h, steps, out["decouple"]["freeze_step"])
    return records.jsonable(out)


def _online(run: records.Run, flips: np.ndarray, steps: np.ndarray, frozen: int | None):
    """The causal detector's T(flip) (:func:`regime_jax.analysis.online.online_settle_time`) over
    the
    recorded ``flip/all``, with the run's ``decouple.online`` settings (else the defaults);
    only the rows up to the freeze step ``frozen`` (after it the series is the value
    stream's)."""
    settings = run.config.get("decouple", {}).get("online") or {}
    keep = steps <= frozen if frozen is not None else np.ones(steps.shape, bool)
    cfg = online.OnlineConfig(**settings)
    result = _guard(online.online_settle_time, steps[keep], flips[keep], cfg)
    return (result if isinstance(result, dict) else result.to_dict()) | {"config": cfg.to_dict()}


def _decoupled(run: records.Run) -> dict[str, Any]:
    """The freeze step (None: the run never froze) and the final disagreement."""
    frozen = [r["decouple/freeze_step"] for r in run.rows if "decouple/freeze_step" in r]
    disagree = [r["decouple/disagree/all"] for r in run.rows if "decouple/disagree/all" in r]
    return {
        "freeze_step": int(frozen[0]) if frozen else None,
        "final_disagreement": disagree[-1] if disagree else None,
    }


def write_run_summary(workdir: str | Path) -> Path:
    """Writes :func:`summarize_run` to ``workdir/summary.json`` and returns its path."""
    text = records.to_json(summarize_run(workdir), indent=1) + "\n"
    return records.write_atomic(Path(workdir) / SUMMARY, text)


def main_ratio(summary: Mapping[str, Any], kind: str = "abs", rule: str | None = None):
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
    """A run's summary and a note (``""``: nothing to say), or None and why it is left out.

    A ``summary.json`` is used only while it still describes ``metrics.jsonl``: the file's
    SHA-256 must be the one the summary was computed from (a summary written before the
    digest existed: its last step and completeness must still hold). A stale one (e.g.
    ``metrics.jsonl`` cut after the summary was written) or an unreadable one is never
    trusted: it is recomputed if the rows are still complete (the note says so), else the run
    is left out as partial.
    A missing summary of a complete run is written now; a partial run (unfinished, live, or
    stopped by a non-finite loss: :attr:`regime_jax.records.Run.partial`) is left out.
    """
    path, stale = rundir / SUMMARY, ""
    if not (rundir / records.METRICS).exists():
        if path.exists():
            return None, f"{SUMMARY} without metrics.jsonl (deleted after the run?); left out"
        return None, "not started (no metrics.jsonl)"
    if path.exists():
        try:
            summary = json.loads(path.read_text())
        except ValueError:  # edited or damaged (it is written atomically): recompute
            summary = None
        if not isinstance(summary, dict):
            summary, stale = {}, f"its {SUMMARY} is unreadable"
        digest = summary.get("metrics_sha256")
        fresh = None if digest is None else digest == records.metrics_digest(rundir)
        if fresh and summary.get("complete") is True:
            return summary, ""
        run = records.load_run(rundir)
        if fresh is None and not stale and _describes(summary, run):
            return summary, ""
        if not fresh and not stale:
            stale = f"its {SUMMARY} is stale (metrics.jsonl changed after it was written)"
    else:
        run = records.load_run(rundir)
    if run.partial:
        return None, "; ".join(filter(None, [run.partial, stale, "left out"]))
    write_run_summary(rundir)
    return json.loads(path.read_text()), f"{stale}; recomputed" if stale else ""


def _describes(summary: Mapping[str, Any], run: records.Run) -> bool:
    """A summary without ``metrics_sha256`` still matches the run: same last step, complete."""
    return (
        run.partial is None
        and summary.get("complete") is True
        and summary.get("last_step") == run.last_step
    )


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """seed_stats of the lag ratios of one (setting, optimizer) group, per kind and rule, and
    of its lag-ratio curves (``curves``: :func:`regime_jax.analysis.curves.aggregate_curves`)."""
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
    out["curves"] = curves.aggregate_curves(summaries)
    return records.jsonable(out)


def _run_notes(name: str, summary: Mapping[str, Any]) -> list[str]:
    out = [f"{name}: {n}" for n in summary.get("notes", [])]
    for kind in KINDS:
        lag = summary["lag"][kind][summary["main_rule"]]
        if lag.get("status") != "ok":
            out.append(f"{name}: {kind} lag: {lag.get('message') or lag.get('status')}")
    return out


@dataclasses.dataclass
class Sweep:
    """A sweep's summarized runs, grouped by ``(setting, optimizer)``.

    ``runs``: ``{"<setting>/<optimizer>/seed_<k>": run summary}``; ``members``:
    ``{(setting, optimizer): [(run summary, run directory)]}`` in seed order; ``groups``:
    :func:`aggregate` of each member list; ``notes``: runs left out (not started, partial),
    stale summaries recomputed, and runs whose main-rule lag is not ok, with why.
    """

    runs: dict[str, dict[str, Any]]
    members: dict[tuple[str, str], list[tuple[dict[str, Any], Path]]]
    groups: dict[tuple[str, str], dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The sweep's ``summary.json`` content: ``runs``, ``groups`` keyed ``"s/o"``, ``notes``."""
        groups = {f"{s}/{o}": agg for (s, o), agg in self.groups.items()}
        return records.jsonable({"runs": self.runs, "groups": groups, "notes": self.notes})


def summarize_sweep(sweep_workdir: str | Path) -> Sweep:
    """Every run's summary (written for complete runs that lack one) and the seed statistics.

    Args:
      sweep_workdir: holds runs at ``<setting>/<optimizer>/seed_<k>/``.
    """
    members, runs, notes = defaultdict(list), {}, []
    for setting, opt, seed, rundir in find_runs(sweep_workdir):
        name = f"{setting}/{opt}/seed_{seed}"
        summary, why = load_or_summarize(rundir)
        notes += [f"{name}: {why}"] if why else []
        if summary is None:
            continue
        runs[name] = summary
        notes += _run_notes(name, summary)
        members[setting, opt].append((summary, rundir))
    members = dict(sorted(members.items()))
    groups = {key: aggregate([s for s, _ in items]) for key, items in members.items()}
    return Sweep(runs, members, groups, notes)


def verdict(stats: Mapping[str, Any]) -> str:
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


def load_sweep_summary(summary: SummaryLike) -> Mapping[str, Any]:
    """A sweep's summary: given loaded (a mapping), or read from its file or its folder."""
    if isinstance(summary, Mapping):
        return summary
    path = Path(summary)
    return json.loads((path / SUMMARY if path.is_dir() else path).read_text())


def table_rows(summary: SummaryLike) -> list[dict[str, Any]]:
    """The sweep's lag ratio (abs step, main rule) per (setting, optimizer), beside 3.85x.

    ``summary``: a sweep's ``summary.json`` (path, its folder, or loaded), or what
    :func:`regime_jax.report.build_report` returns. One dict per group: ``setting, optimizer,
    seeds`` (valid lag ratios), ``lag mean`` (None if none), ``CI`` (95% bootstrap, text),
    ``paper`` (3.85), ``verdict``.
    """
    rows = []
    for name, agg in sorted(load_sweep_summary(summary)["groups"].items()):
        setting, optimizer = name.split("/", 1)
        stats = agg["lag"]["abs"][agg["main_rule"]]
        lo, hi = stats["ci_low"], stats["ci_high"]
        ci = "–" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"
        row = {"setting": setting, "optimizer": optimizer, "seeds": stats["n"]}
        row |= {"lag mean": stats["mean"], "CI": ci, "paper": PAPER_RATIO}
        rows.append(row | {"verdict": verdict(stats)})
    return rows


def table_frame(summary: SummaryLike):
    """:func:`table_rows` as a pandas DataFrame if pandas is importable, else the list."""
    try:
        import pandas as pd
    except ImportError:
        return table_rows(summary)
    return pd.DataFrame(table_rows(summary))


# ---------------------------------------------------------------- what the figures draw


def normalized_curves(runs: Sequence[records.Run], key: str, window: int):
    """Smoothed, min-max normalized ``key`` per run on the first run's steps: (steps, [R, T])."""
    steps = runs[0].series(key)[0].astype(float)
    rows = []
    for run in runs:
        s, v = run.series(key)
        if v.size < 2 or not np.all(np.isfinite(v)):
            continue
        y = timescales.smooth(v, window)
        span = float(y.max() - y.min())
        rows.append(np.interp(steps, s, (y - y.min()) / span if span > 0 else 0 * y))
    return steps, np.asarray(rows).reshape(len(rows), steps.size)


def smoothed_seed_mean(runs: Sequence[records.Run], key: str, window: int):
    """``key`` smoothed per run, interpolated on the first run's steps and averaged over runs:
    ``(steps, mean)``, or ``(steps, None)`` when no run has two or more finite values of it."""
    steps, ys = runs[0].series(key)[0], []
    for run in runs:
        s, v = run.series(key)
        if v.size > 1 and np.all(np.isfinite(v)):
            ys.append(np.interp(steps, s, timescales.smooth(v, window)))
    return steps, (np.mean(ys, axis=0) if ys else None)


def mean_decay_time(summaries: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Mean over runs of ``key``'s main-rule decay time (runs without one left out)."""
    times = [s["decay"][key].get(s["main_rule"], {}).get("time") for s in summaries]
    times = [t for t in times if t is not None]
    return float(np.mean(times)) if times else None


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
