"""The decoupling experiment's analysis: what freezing the gates costs, per freeze step.

A sweep with a ``freeze`` block (``regime_jax/configs/decoupled.py``) runs, for every
(setting, optimizer, seed), ordinary training (variant ``never``), a freeze where the online
settle detector triggers (``auto``), and freezes at multiples of the ``never`` run's T(flip)
(``0T``, ``0.25T``, ... ; :mod:`regime_jax.sweep`). Their setting names are
``<setting>@<variant>``. :func:`decoupling` groups a summarized sweep's runs by setting,
optimizer and variant and compares every variant with full training of the same seed:

* final validation accuracy and loss, mean and 95% bootstrap CI over seeds, and the paired gap
  (variant minus ``never``, seed by seed) with its CI;
* the freeze step F (mean), the final disagreement of the value stream's patterns with the
  gates (``decouple/disagree/all``);
* the frozen phase's wall-clock seconds per step over the ordinary phase's, within each run
  (``timing.json``, :class:`regime_jax.run.live.PhaseClock`);
* the online detector's T(flip) against the offline main rule's, on the ``never`` runs.

T(flip) is read in one way, :meth:`RunSummary.t_flip
<regime_jax.analysis.summary.RunSummary.t_flip>`, under two named rules: ``FREEZE_RULE``
(the main rule, else the first other rule with a time) sets the ``xT`` variants' freeze steps
(:mod:`regime_jax.sweep`), ``OFFLINE_RULE`` (the main rule alone) is the offline side of the
online-vs-offline table. They give the same T(flip) wherever the main rule gives one.

Pure host-side analysis (numpy); its report section and figure are drawn by
:mod:`regime_jax.report`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from regime_jax import records
from regime_jax.analysis import seeds
from regime_jax.analysis.summary import MAIN, MAIN_ELSE_FIRST, RunSummary
from regime_jax.records import TIMING

SEP = "@"
NEVER, AUTO = "never", "auto"
# T(flip) of the reference (``never``) run that an ``xT`` variant's freeze step multiplies: the
# main rule, else another rule's (the sweep's progress line says which); README "Decoupling".
FREEZE_RULE = MAIN_ELSE_FIRST
# T(flip) of the offline side of the online-vs-offline table: the main rule only (a run
# without one is dropped from the statistics, never compared with another rule's time).
OFFLINE_RULE = MAIN


def split(setting: str) -> tuple[str, str | None]:
    """``"mlp_mnist1d@0.5T"`` -> ``("mlp_mnist1d", "0.5T")``; no variant -> ``(setting, None)``."""
    base, sep, variant = setting.partition(SEP)
    return base, (variant if sep else None)


def variant_name(multiple: float) -> str:
    """The variant of a freeze at ``multiple`` x T(flip): ``0.25 -> "0.25T"``."""
    return f"{multiple:g}T"


def _order(variant: str) -> tuple[float, str]:
    if variant == NEVER:
        return (float("inf"), variant)
    if variant == AUTO:
        return (1e9, variant)
    try:
        return (float(variant.removesuffix("T")), variant)
    except ValueError:
        return (1e10, variant)


def _stats(values: list[float | None]) -> dict[str, Any]:
    return seeds.seed_stats(values).to_dict()


def _seconds_per_step(rundir: Path) -> tuple[float | None, float | None]:
    """(ordinary, gated) seconds per step of a run (None where a phase was not timed)."""
    path = rundir / TIMING
    if not path.exists():
        return None, None
    rate = records.read_json(path).get("seconds_per_step", {})
    return rate.get("ordinary"), rate.get("gated")


def _per_seed(members) -> dict[int, dict[str, Any]]:
    out = {}
    for summary, rundir in members:
        summary = RunSummary.of(summary)
        ordinary, gated = _seconds_per_step(Path(rundir))
        out[summary.seed] = {
            "acc": summary.final_acc,
            "loss": summary.final_loss,
            "freeze_step": summary.freeze_step,
            "disagreement": summary.final_disagreement,
            "num_steps": summary.num_steps,
            "ordinary_s": ordinary,
            "gated_s": gated,
        }
    return out


def _gap(rows: dict[int, dict], ref: dict[int, dict], key: str) -> dict[str, Any]:
    """Paired variant - never over the seeds both have."""
    diffs = [
        rows[s][key] - ref[s][key]
        for s in sorted(rows)
        if s in ref and rows[s][key] is not None and ref[s][key] is not None
    ]
    return _stats(diffs)


def _mean(values) -> float | None:
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def decoupling(sweep: Any) -> dict[str, Any]:
    """Per ``"<setting>/<optimizer>"`` and variant: the comparisons listed in the module doc.

    Args:
      sweep: a :class:`regime_jax.analysis.summary.Sweep` whose settings carry variants.

    Returns:
      ``{"groups": {"<setting>/<optimizer>": {variant: stats}}, "online": {...}}``, empty
      groups when no setting has a variant. A group without its ``never`` runs has no gaps.
    """
    by_group: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for (setting, opt), members in sweep.members.items():
        base, variant = split(setting)
        if variant is not None:
            by_group[base, opt][variant] = _per_seed(members)
    groups = {}
    for (base, opt), variants in sorted(by_group.items()):
        ref = variants.get(NEVER, {})
        out = {}
        for variant in sorted(variants, key=_order):
            rows = variants[variant]
            ratios = [
                r["gated_s"] / r["ordinary_s"]
                for r in rows.values()
                if r["gated_s"] and r["ordinary_s"]
            ]
            out[variant] = {
                "seeds": sorted(rows),
                "acc": _stats([r["acc"] for r in rows.values()]),
                "loss": _stats([r["loss"] for r in rows.values()]),
                "acc_gap": _gap(rows, ref, "acc") if ref else None,
                "loss_gap": _gap(rows, ref, "loss") if ref else None,
                "freeze_step": _mean(r["freeze_step"] for r in rows.values()),
                "frozen_seeds": sum(r["freeze_step"] is not None for r in rows.values()),
                "num_steps": _mean(r["num_steps"] for r in rows.values()),
                "disagreement": _mean(r["disagreement"] for r in rows.values()),
                "gated_over_ordinary": _stats(ratios),
                "ordinary_ms": _mean(
                    1e3 * r["ordinary_s"] for r in rows.values() if r["ordinary_s"]
                ),
                "gated_ms": _mean(1e3 * r["gated_s"] for r in rows.values() if r["gated_s"]),
            }
        groups[f"{base}/{opt}"] = out
    return records.jsonable({"groups": groups, "online": online_vs_offline(sweep)})


def online_vs_offline(sweep: Any) -> dict[str, Any]:
    """Per ``"<setting>/<optimizer>"``: T(flip) of the offline main rule and of the online
    detector (``summary.json``'s ``online``, with the run's ``decouple.online`` settings) over
    seeds, and their ratio per seed. Ordinary runs only: a setting without a variant, or the
    ``never`` variant (after a freeze the flip series is the value stream's)."""
    out = {}
    for (setting, opt), members in sweep.members.items():
        base, variant = split(setting)
        if variant not in (None, NEVER):
            continue
        runs = [RunSummary.of(summary) for summary, _ in members]
        pairs = [(s.t_flip(OFFLINE_RULE).time, s.online_trigger) for s in runs]
        out[f"{base}/{opt}"] = {
            "offline": _stats([a for a, _ in pairs]),
            "online": _stats([b for _, b in pairs]),
            "online_over_offline": _stats([b / a if a and b else None for a, b in pairs]),
            "online_missing": sum(b is None for _, b in pairs),
        }
    return records.jsonable(out)
