"""Pure analysis of a run and of a sweep: numbers and plain data, never a figure.

:func:`summarize_run` measures one run: decay times of ``flip/all``, ``step/abs/all``,
``step/rel/all`` under every rule of :mod:`regime_jax.analysis.timescales` (the run's
``config.timescales`` rule is the main one), lag ratios ``T_step / T_flip`` overall and per layer
(layer ``fc1`` vs parameter part ``fc1``, ``block0/ffn`` vs ``block0``), MVA and the 1.1x-loss
step, and the abs lag ratio as curves over each rule's parameter
(:mod:`regime_jax.analysis.curves`).
Failed measurements stay in the output as statuses with messages.
:func:`summarize_sweep` walks ``<sweep>/<setting>/<optimizer>/seed_<k>/``
(:mod:`regime_jax.analysis.layout`) and aggregates the lag ratios over seeds
(:func:`aggregate`, :func:`verdict`, :func:`table_rows`).
:func:`normalized_curves` and :func:`flip_raster` are the arrays the figures of
:mod:`regime_jax.report.plots` draw. Imports neither matplotlib nor training code.

:class:`RunSummary` is the one way to read a run's ``summary.json`` (every reader of
:mod:`regime_jax.analysis`, :mod:`regime_jax.report` and :mod:`regime_jax.sweep` goes through
it): T(flip) and T(step) by a named rule (:meth:`RunSummary.t_flip`), lags and lag ratios,
final metrics, the freeze step, the online detector's trigger and the partial mark; it writes
the file back byte for byte.

Example (needs a run directory, so not a doctest)::

    s = RunSummary.load("runs/mlp_mnist1d")
    print(s.lag_ratio(), s.t_flip().time, s.t_flip("cumsum").time, s.final_acc)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from regime_jax import records
from regime_jax.analysis import curves, fmt, layout, online, timescales
from regime_jax.analysis.curves import PAPER_RATIO
from regime_jax.analysis.layout import find_runs
from regime_jax.analysis.seeds import seed_stats
from regime_jax.analysis.timescales import RULES, DecayConfig, decay_times_all_rules

SUMMARY = records.SUMMARY
KINDS = ("abs", "rel")
# What the project headlines (docs/results/reproduction.md, "Which number to read"): the
# fraction rule at f = 1/e (a time constant: no final level, no dependence on the run's end
# once crossed) and the geometric mean of per-seed ratios (ratios are heavy-tailed; a ratio
# and its inverse are equally far from 1), median beside it, the arithmetic mean labelled.
HEADLINE_RULE = "fraction"
HEADLINE_STAT = "geo_mean"
# seed statistics by name -> (centre, CI low, CI high) keys of SeedStats.to_dict()
STATS = {
    "geo_mean": ("geo_mean", "geo_ci_low", "geo_ci_high"),
    "median": ("median", "median_ci_low", "median_ci_high"),
    "mean": ("mean", "ci_low", "ci_high"),
}
SERIES = ("flip/all", "step/abs/all", "step/rel/all")
SummaryLike = Mapping[str, Any] | str | os.PathLike  # a sweep summary, its file or its folder


# ------------------------------------------------------------------ reading a run's summary

MAIN = "main"  # the run's own decay rule (its config's ``timescales.rule``: ``main_rule``)
# The main rule, else the first rule in name order that gives a time: a named fallback for a
# caller that needs some T(flip) (the decoupling sweep's freeze steps).
MAIN_ELSE_FIRST = "main_else_first"


class Decay(NamedTuple):
    """A decay time as ``summary.json`` holds it (a ``DecayResult``): ``time`` is None unless
    ``status`` is ``"ok"``; ``rule`` the rule it was measured under; ``run_fraction`` the time
    as a fraction of the run (None without a time, or in a summary written before it).
    Absent from the file: every field None."""

    time: float | None
    status: str | None
    rule: str | None
    message: str | None = None
    run_fraction: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> Decay:
        d = data if isinstance(data, Mapping) else {}
        return cls(
            d.get("time"), d.get("status"), d.get("rule"), d.get("message"), d.get("run_fraction")
        )


class Lag(NamedTuple):
    """A lag ratio ``T_step / T_flip`` as ``summary.json`` holds it (a ``LagResult``):
    ``ratio`` is None unless ``status`` is ``"ok"`` (both times exist); ``budget_bound``: True
    where T(step) lies in the run's last ``1 - budget_fraction`` (None: no ratio, or a summary
    written before the flag)."""

    ratio: float | None
    status: str | None
    message: str | None
    t_step: Decay
    t_flip: Decay
    budget_bound: bool | None = None

    @classmethod
    def from_json(cls, data: Any) -> Lag:
        d = data if isinstance(data, Mapping) else {}
        t_step, t_flip = (Decay.from_json(d.get(k)) for k in ("t_step", "t_flip"))
        status, message = d.get("status"), d.get("message")
        return cls(d.get("ratio"), status, message, t_step, t_flip, d.get("budget_bound"))


def _block(mapping: Any, *keys: str) -> Any:
    """``mapping[k0][k1]...``, None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """A run's ``summary.json`` (:func:`summarize_run`), read through named accessors.

    The fields are the file's top-level entries, in its order (``lag`` is the field
    ``lags``, beside the method :meth:`lag`); the measurement blocks
    (``decay``, ``lag``, ``layers``, ...) stay the JSON they are and are read through the
    methods: :meth:`t_flip` / :meth:`t_step` (by a named rule: a rule of
    :data:`regime_jax.analysis.timescales.RULES`, :data:`MAIN` or :data:`MAIN_ELSE_FIRST`),
    :meth:`lag`, :meth:`lag_ratio`, :meth:`decay_time`, :meth:`layer_lag`, and the properties
    :attr:`final_acc`, :attr:`final_loss`, :attr:`freeze_step`, :attr:`online_trigger`, ...
    A field the file lacks (a summary from an older version) is None; :meth:`to_dict` gives
    back exactly the entries and the order it was made from, so :meth:`write` of a loaded
    summary rewrites the file byte for byte.

    >>> s = RunSummary.from_json({"main_rule": "settle", "lag": {"abs": {"settle": {
    ...     "ratio": 2.0, "status": "ok", "t_flip": {"time": 10.0, "status": "ok"}}}}})
    >>> s.lag_ratio(), s.t_flip().time, s.t_flip("cumsum").time, s.seed
    (2.0, 10.0, None, None)
    >>> list(s.to_dict())
    ['main_rule', 'lag']
    """

    workdir: str | None = None
    seed: int | None = None
    num_steps: int | None = None
    last_step: int | None = None
    complete: bool | None = None
    partial: str | None = None  # None, or "partial at step N of M (why)"
    metrics_sha256: str | None = None
    final: Mapping[str, float | None] | None = None
    main_rule: str | None = None
    decay_config: Mapping[str, Any] | None = None
    decay: Mapping[str, Any] | None = None  # {series: {rule: Decay JSON}}
    lags: Mapping[str, Any] | None = None  # entry "lag": {"abs" | "rel": {rule: Lag JSON}}
    lag_ratio_curves: Mapping[str, Any] | None = None  # regime_jax.analysis.curves.run_curves
    layers: Mapping[str, Any] | None = None  # {layer: {"part", "abs", "rel"}}
    reference: Mapping[str, Any] | None = None  # mva_step, mva_acc, loss_1p1_step
    decouple: Mapping[str, Any] | None = None  # freeze_step, final_disagreement
    notes: tuple[str, ...] | None = None
    online: Mapping[str, Any] | None = None  # the online detector's Decay JSON + its config
    # the file's entries in its order (None: every field's, in the order above), and the
    # entries no field holds
    entries: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    # -------------------------------------------------------------- JSON in and out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        """The summary of a ``summary.json`` object (a copy: later changes to ``data`` do
        not reach it)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a run summary is a JSON object, got {type(data).__name__}")
        data = copy.deepcopy(dict(data))
        fields = {_FIELD_OF[k]: v for k, v in data.items() if k in _FIELD_OF}
        if isinstance(fields.get("notes"), list):
            fields["notes"] = tuple(fields["notes"])
        extra = {k: v for k, v in data.items() if k not in _FIELD_OF}
        return cls(**fields, entries=tuple(data), extra=extra)

    @classmethod
    def of(cls, summary: RunSummary | Mapping[str, Any]) -> RunSummary:
        """``summary`` itself, or :meth:`from_json` of a ``summary.json`` object."""
        return summary if isinstance(summary, RunSummary) else cls.from_json(summary)

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> RunSummary:
        """Reads ``workdir/summary.json`` (OSError, ValueError when it does not read)."""
        return cls.from_json(records.read_json(Path(workdir) / SUMMARY))

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` object: the entries it was made from, in their order."""
        out = {}
        for key in _FIELD_OF if self.entries is None else self.entries:
            value = self.extra[key] if key in self.extra else getattr(self, _FIELD_OF[key])
            out[key] = list(value) if key == "notes" and isinstance(value, tuple) else value
        return copy.deepcopy(out)

    def to_json(self) -> str:
        """The text of ``summary.json`` (:func:`regime_jax.records.to_json`, indent 1)."""
        return records.to_json(self.to_dict(), indent=1) + "\n"

    def write(self, workdir: str | os.PathLike) -> Path:
        """Writes :meth:`to_json` to ``workdir/summary.json`` atomically; returns its path."""
        return records.write_atomic(Path(workdir) / SUMMARY, self.to_json())

    # ------------------------------------------------------- decay times and lag ratios

    def rule(self, rule: str | None = MAIN) -> str | None:
        """The decay rule a named rule stands for: :data:`MAIN` (or None) is the run's
        ``main_rule``; a rule of ``RULES`` is itself."""
        return self.main_rule if rule in (None, MAIN) else rule

    def lag(self, kind: str = "abs", rule: str | None = MAIN) -> Lag:
        """The lag ratio of the ``kind`` (``"abs"`` | ``"rel"``) step size against
        ``flip/all`` under ``rule`` (:meth:`rule`)."""
        return Lag.from_json(_block(self.lags, kind, self.rule(rule)))

    def lag_ratio(self, kind: str = "abs", rule: str | None = MAIN) -> float | None:
        """``T_step / T_flip`` (None unless its status is ok): :meth:`lag`'s ratio."""
        return self.lag(kind, rule).ratio

    def t_flip(self, rule: str | None = MAIN, kind: str = "abs") -> Decay:
        """T(flip): the decay time of ``flip/all`` on the steps where the ``kind`` step size
        was recorded too (the lag ratio's denominator), under the named ``rule``:

        * :data:`MAIN` (default): the run's main rule; ``time`` None if it gives none;
        * a rule of ``RULES`` (``"settle"``, ``"cumsum"``, ``"threshold"``, ``"fraction"``);
        * :data:`MAIN_ELSE_FIRST`: the main rule, else the first other rule in name order
          that gives a time; if none does, the main rule's (``time`` None, its status and
          message say why). The returned ``rule`` names the rule the time is under.
        """
        return self._decay("t_flip", rule, kind)

    def t_step(self, rule: str | None = MAIN, kind: str = "abs") -> Decay:
        """T(step) of the ``kind`` step size, under a named rule as in :meth:`t_flip`."""
        return self._decay("t_step", rule, kind)

    def _decay(self, which: str, rule: str | None, kind: str) -> Decay:
        if rule != MAIN_ELSE_FIRST:
            return getattr(self.lag(kind, rule), which)
        lags = _block(self.lags, kind) or {}
        for name in (self.main_rule, *sorted(lags)):
            found = getattr(self.lag(kind, name), which)
            if found.time is not None:
                return found._replace(rule=name)
        return getattr(self.lag(kind, MAIN), which)

    def decay_time(self, series: str = "flip/all", rule: str | None = MAIN) -> Decay:
        """The decay time of a whole recorded series (``flip/all``, ``step/abs/all``,
        ``step/rel/all``: the ``decay`` block) under ``rule`` (:meth:`rule`)."""
        return Decay.from_json(_block(self.decay, series, self.rule(rule)))

    def layer_lag(self, layer: str, kind: str = "abs") -> Lag:
        """The main-rule lag of ``layer``'s parameter part against its flips."""
        return Lag.from_json(_block(self.layers, layer, kind))

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The layers with a per-layer lag, in the file's order."""
        return tuple(self.layers or ())

    # ------------------------------------------------------ final metrics and the rest

    @property
    def final_acc(self) -> float | None:
        """The last ``eval/acc`` (validation accuracy)."""
        return _block(self.final, "eval/acc")

    @property
    def final_loss(self) -> float | None:
        """The last ``eval/loss`` (validation loss)."""
        return _block(self.final, "eval/loss")

    @property
    def final_train_loss(self) -> float | None:
        """The last ``train/loss``."""
        return _block(self.final, "train/loss")

    @property
    def window(self) -> int | None:
        """The smoothing window of the decay rules (``decay_config.window``)."""
        return _block(self.decay_config, "window")

    @property
    def mva_step(self) -> int | None:
        """The step of the maximum validation accuracy (None without one)."""
        return _block(self.reference, "mva_step")

    @property
    def freeze_step(self) -> int | None:
        """The step at which the patterns were frozen (None: the run never froze)."""
        return _block(self.decouple, "freeze_step")

    @property
    def final_disagreement(self) -> float | None:
        """The last ``decouple/disagree/all`` of a frozen run (None: it never froze)."""
        return _block(self.decouple, "final_disagreement")

    @property
    def online_trigger(self) -> float | None:
        """The step at which the online settle detector triggered on ``flip/all`` (None: it
        never did, or the summary predates it)."""
        return _block(self.online, "time")


# summary.json's entries, in the order summarize_run writes them -> RunSummary's fields
_FIELD_OF = {
    "lag" if f.name == "lags" else f.name: f.name
    for f in dataclasses.fields(RunSummary)
    if f.name not in ("entries", "extra")
}


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
        "decouple": (decoupled := _decoupled(run)),
        "notes": notes,
    }
    out["online"] = _online(run, h, steps, decoupled["freeze_step"])
    return records.jsonable(out)


def _online(run: records.Run, flips: np.ndarray, steps: np.ndarray, frozen: int | None):
    """The causal detector's T(flip) (:func:`regime_jax.analysis.online.online_settle_time`)
    over the recorded ``flip/all``, with the run's ``decouple.online`` settings (else the defaults);
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
    """Writes :func:`summarize_run` to ``workdir/summary.json`` (:meth:`RunSummary.write`)
    and returns its path."""
    return RunSummary.from_json(summarize_run(workdir)).write(workdir)


def main_ratio(
    summary: RunSummary | Mapping[str, Any], kind: str = "abs", rule: str | None = None
) -> float | None:
    """The run's lag ratio (None unless status ok); main rule unless ``rule`` is given
    (:meth:`RunSummary.lag_ratio`; ``summary`` a RunSummary or a ``summary.json`` object)."""
    return RunSummary.of(summary).lag_ratio(kind, rule)


# ------------------------------------------------------------------------------ the sweep


def load_or_summarize(rundir: Path) -> tuple[RunSummary | None, str]:
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
            data = records.read_json(path)
        except ValueError:  # edited or damaged (it is written atomically): recompute
            data = None
        if isinstance(data, dict):
            summary = RunSummary.from_json(data)
        else:
            summary, stale = RunSummary.from_json({}), f"its {SUMMARY} is unreadable"
        digest = summary.metrics_sha256
        fresh = None if digest is None else digest == records.metrics_digest(rundir)
        if fresh and summary.complete is True:
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
    return RunSummary.load(rundir), f"{stale}; recomputed" if stale else ""


def _describes(summary: RunSummary, run: records.Run) -> bool:
    """A summary without ``metrics_sha256`` still matches the run: same last step, complete."""
    return run.partial is None and summary.complete is True and summary.last_step == run.last_step


def _lag_stats(lags: Sequence[Lag]) -> dict[str, Any]:
    """seed_stats of the ratios (mean, median, geometric mean, each with its CI), the
    per-seed ratios and budget-bound flags, and how many valid ratios are budget-bound."""
    ratios = [lag.ratio for lag in lags]
    bound = [lag.budget_bound if lag.ratio is not None else None for lag in lags]
    stats = seed_stats(ratios).to_dict()
    return stats | {
        "per_seed": ratios,
        "per_seed_budget_bound": bound,
        "budget_bound": sum(b is True for b in bound),
    }


def aggregate(summaries: Sequence[RunSummary | Mapping[str, Any]]) -> dict[str, Any]:
    """seed_stats of the lag ratios of one (setting, optimizer) group, per kind and rule (with
    per-seed ratios and budget-bound counts: :func:`_lag_stats`), and of its lag-ratio curves
    (``curves``: :func:`regime_jax.analysis.curves.aggregate_curves`); ``headline`` names the
    rule and statistic the report leads with (:data:`HEADLINE_RULE`, :data:`HEADLINE_STAT`)."""
    summaries = [RunSummary.of(s) for s in summaries]
    main = summaries[0].main_rule
    out = {"main_rule": main, "seeds": [s.seed for s in summaries], "lag": {}, "layers": {}}
    out["headline"] = {"rule": HEADLINE_RULE, "statistic": HEADLINE_STAT}
    for kind in KINDS:
        out["lag"][kind] = {
            rule: _lag_stats([s.lag(kind, rule) for s in summaries]) for rule in RULES
        }
    layers = sorted({layer for s in summaries for layer in s.layer_names})
    for layer in layers:
        vals = [s.layer_lag(layer, "abs").ratio for s in summaries]
        out["layers"][layer] = seed_stats(vals).to_dict() | {"per_seed": vals}
    out["curves"] = curves.aggregate_curves([s.lag_ratio_curves for s in summaries])
    return records.jsonable(out)


def group_lag(agg: Mapping[str, Any], kind: str = "abs", rule: str | None = None):
    """A group's (:func:`aggregate`) seed statistics of the ``kind`` lag ratio under ``rule``
    (default: the group's main rule), with ``per_seed``; ``{}`` for a rule the group's
    summaries predate."""
    return agg["lag"][kind].get(rule or agg["main_rule"], {})


def stat_view(stats: Mapping[str, Any], statistic: str = HEADLINE_STAT) -> dict[str, Any]:
    """``{"mean", "ci_low", "ci_high"}`` of one statistic (``"geo_mean"``, ``"median"``,
    ``"mean"``: :data:`STATS`) of seed statistics, in the shape
    :func:`regime_jax.analysis.fmt.ci` and :func:`verdict` read; None where absent."""
    keys = STATS[statistic]
    return dict(zip(("mean", "ci_low", "ci_high"), (stats.get(k) for k in keys), strict=True))


def _run_notes(name: str, summary: RunSummary) -> list[str]:
    out = [f"{name}: {n}" for n in summary.notes or ()]
    for kind in KINDS:
        for rule in dict.fromkeys([summary.main_rule, HEADLINE_RULE]):
            lag = summary.lag(kind, rule)
            if lag.status is None:
                continue  # a summary written before the rule existed
            if lag.status != "ok":
                out.append(f"{name}: {kind} lag ({rule}): {lag.message or lag.status}")
            elif lag.budget_bound:
                out.append(f"{name}: {kind} lag ({rule}): {lag.message}")
    return out


@dataclasses.dataclass
class Sweep:
    """A sweep's summarized runs, grouped by ``(setting, optimizer)``.

    ``runs``: ``{"<setting>/<optimizer>/seed_<k>": RunSummary}`` (:func:`layout.name
    <regime_jax.analysis.layout.name>`); ``members``: ``{(setting, optimizer): [(RunSummary,
    run directory)]}`` in seed order; ``groups``: :func:`aggregate` of each member list;
    ``notes``: runs left out (not started, partial), stale summaries recomputed, and runs whose
    main-rule lag is not ok, with why.
    """

    runs: dict[str, RunSummary]
    members: dict[tuple[str, str], list[tuple[RunSummary, Path]]]
    groups: dict[tuple[str, str], dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The sweep's ``summary.json`` content: ``runs``, ``groups`` keyed ``"s/o"``, ``notes``."""
        runs = {name: s.to_dict() for name, s in self.runs.items()}
        groups = {f"{s}/{o}": agg for (s, o), agg in self.groups.items()}
        return records.jsonable({"runs": runs, "groups": groups, "notes": self.notes})


def summarize_sweep(sweep_workdir: str | Path) -> Sweep:
    """Every run's summary (written for complete runs that lack one) and the seed statistics.

    Args:
      sweep_workdir: holds runs at ``<setting>/<optimizer>/seed_<k>/``.
    """
    members, runs, notes = defaultdict(list), {}, []
    for setting, opt, seed, rundir in find_runs(sweep_workdir):
        name = layout.name(setting, opt, seed)
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
    """One line comparing the lag-ratio stats with the paper's 3.85x: the geometric mean and
    its 95% CI where ``stats`` has them (seed statistics), else ``mean``, ``ci_low``,
    ``ci_high`` (e.g. :func:`stat_view` of another statistic)."""
    if stats.get("geo_mean") is not None:
        stats = stat_view(stats, "geo_mean")
    mean, lo, hi = stats.get("mean"), stats.get("ci_low"), stats.get("ci_high")
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
    return records.read_json(path / SUMMARY if path.is_dir() else path)


def table_rows(summary: SummaryLike, rule: str | None = None) -> list[dict[str, Any]]:
    """The sweep's lag ratio (abs step) per (setting, optimizer) under ``rule`` (default: the
    main rule; :data:`HEADLINE_RULE` for the headline), beside 3.85x.

    ``summary``: a sweep's ``summary.json`` (path, its folder, or loaded), or what
    :func:`regime_jax.report.build_report` returns. One dict per group: ``setting, optimizer,
    rule, seeds`` (valid lag ratios), ``lag mean`` (arithmetic; None if none), ``CI`` (its 95%
    bootstrap CI, text), ``median``, ``geo mean`` and ``geo CI`` (geometric mean and its CI),
    ``budget-bound`` (valid ratios whose T(step) lies in the run's last 10%), ``paper`` (3.85),
    ``verdict`` (on the geometric mean's CI).
    """
    rows = []
    for name, agg in sorted(load_sweep_summary(summary)["groups"].items()):
        setting, optimizer = name.split("/", 1)
        stats = group_lag(agg, "abs", rule)
        ci = fmt.interval(stats.get("ci_low"), stats.get("ci_high"))
        geo_ci = fmt.interval(stats.get("geo_ci_low"), stats.get("geo_ci_high"))
        row = {"setting": setting, "optimizer": optimizer, "rule": rule or agg["main_rule"]}
        row |= {"seeds": stats.get("n", 0), "lag mean": stats.get("mean"), "CI": ci}
        row |= {"median": stats.get("median"), "geo mean": stats.get("geo_mean")}
        row |= {"geo CI": geo_ci, "budget-bound": stats.get("budget_bound")}
        rows.append(row | {"paper": PAPER_RATIO, "verdict": verdict(stats)})
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


def mean_decay_time(summaries: Sequence[RunSummary | Mapping[str, Any]], key: str) -> float | None:
    """Mean over runs of ``key``'s main-rule decay time (runs without one left out)."""
    times = [RunSummary.of(s).decay_time(key).time for s in summaries]
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
