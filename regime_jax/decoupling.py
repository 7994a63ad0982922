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
  (``timing.json``, :class:`regime_jax.live.PhaseClock`);
* the online detector's T(flip) against the offline main rule's, on the ``never`` runs.

Pure host-side analysis (numpy); :func:`accuracy_figure` draws with :mod:`regime_jax.plots`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from regime_jax import records, seeds
from regime_jax.live import TIMING

SEP = "@"
NEVER, AUTO = "never", "auto"


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
    rate = json.loads(path.read_text()).get("seconds_per_step", {})
    return rate.get("ordinary"), rate.get("gated")


def _t_flip(summary: Mapping[str, Any]) -> float | None:
    return summary["lag"]["abs"][summary["main_rule"]]["t_flip"].get("time")


def _per_seed(members) -> dict[int, dict[str, Any]]:
    out = {}
    for summary, rundir in members:
        ordinary, gated = _seconds_per_step(Path(rundir))
        final, frozen = summary["final"], summary.get("decouple") or {}
        out[summary["seed"]] = {
            "acc": final.get("eval/acc"),
            "loss": final.get("eval/loss"),
            "freeze_step": frozen.get("freeze_step"),
            "disagreement": frozen.get("final_disagreement"),
            "num_steps": summary["num_steps"],
            "ordinary_s": ordinary,
            "gated_s": gated,
        }
    return out


def _online_time(summary: Mapping[str, Any]) -> float | None:
    return (summary.get("online") or {}).get("time")


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
      sweep: a :class:`regime_jax.summary.Sweep` whose settings carry variants.

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
        pairs = [(_t_flip(summary), _online_time(summary)) for summary, _ in members]
        out[f"{base}/{opt}"] = {
            "offline": _stats([a for a, _ in pairs]),
            "online": _stats([b for _, b in pairs]),
            "online_over_offline": _stats([b / a if a and b else None for a, b in pairs]),
            "online_missing": sum(b is None for _, b in pairs),
        }
    return records.jsonable(out)


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
        cells = [_ci(o["offline"], ".0f"), _ci(o["online"], ".0f")]
        cells += [_ci(o["online_over_offline"], ".2f"), str(o["online_missing"])]
        lines.append(f"| {setting} | {opt} | " + " | ".join(cells) + " |")
    return lines


def _ci(stats: Mapping[str, Any] | None, fmt: str = ".3f", signed: bool = False) -> str:
    if not stats or stats.get("mean") is None or not np.isfinite(stats["mean"]):
        return "–"
    f = ("+" if signed else "") + fmt
    text = format(stats["mean"], f)
    lo, hi = stats.get("ci_low"), stats.get("ci_high")
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo:{f}}, {hi:{f}}]"
    return text


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


TABLE_HEAD = (
    "| setting | optimizer | freeze | F (mean step; seeds that froze) | seeds | val acc [95% CI] | "
    "gap to full training | val loss [95% CI] | gap to full training | disagreement at end | "
    "ms/step ordinary / frozen | frozen ÷ ordinary |\n" + "|---" * 12 + "|"
)


def _freeze_cell(v: Mapping[str, Any]) -> str:
    return f"{_num(v['freeze_step'], '.0f')} ({v['frozen_seeds']}/{len(v['seeds'])})"


def markdown(result: Mapping[str, Any]) -> list[str]:
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
        TABLE_HEAD,
    ]
    for group, variants in result["groups"].items():
        setting, opt = group.split("/")
        for variant, v in variants.items():
            ms = f"{_num(v['ordinary_ms'], '.2f')} / {_num(v['gated_ms'], '.2f')}"
            cells = [
                setting,
                opt,
                variant,
                _freeze_cell(v) if variant != NEVER else "–",
                str(len(v["seeds"])),
                _ci(v["acc"]),
                _ci(v["acc_gap"], signed=True) if variant != NEVER else "0",
                _ci(v["loss"]),
                _ci(v["loss_gap"], signed=True) if variant != NEVER else "0",
                _num(v["disagreement"], ".3f"),
                ms,
                _ci(v["gated_over_ordinary"], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def accuracy_figure(result: Mapping[str, Any]):
    """Final val accuracy against the freeze step (as a fraction of the run), per setting.

    One panel per setting, one line per optimizer (mean over seeds, 95% CI bars); full
    training sits at 1.0 (never frozen); a freeze at or after the last step is drawn there too.
    """
    from regime_jax import plots

    settings = sorted({g.split("/")[0] for g in result["groups"]})
    fig = plots._figure_class()(figsize=(3.6 * max(1, len(settings)), 3.6), layout="constrained")
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
                if variant == AUTO:
                    ax.annotate(
                        "auto", (x, mean), fontsize=7, xytext=(3, -9), textcoords="offset points"
                    )
        ax.set(
            xlabel="freeze step / num_steps (1 = never)", ylabel="final val acc", xlim=(-0.05, 1.05)
        )
        ax.set_title(setting, fontsize=10)
        ax.legend(fontsize=7)
    return fig
