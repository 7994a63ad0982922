"""Writes the records of every ``:quick`` config, the ``:quick`` variants of the sweeps
(``configs.SWEEPS``: ``reproduce``, ``decoupled``, ``lag_map``) and the full main job under
OUT, and compares two such trees.

Behaviour-preserving changes prove it with this script (README, "Development"):

    python experiments/golden_records.py write /tmp/before      # on the old commit
    python experiments/golden_records.py write /tmp/after       # on the new one
    python experiments/golden_records.py compare /tmp/before /tmp/after [--ignore-prefix K/]

``compare`` checks every ``metrics.jsonl`` row by row (keys starting with an ``--ignore-prefix``
left out, for a change that only adds keys), every JSON file (``summary.json``) with the run
root and wall-clock fields left out, and every other file of the runs (mask snapshots) byte
for byte; it prints one line per difference (for ``metrics.jsonl``: how many values differ, and
by how many float32 ulps at most) and exits 1 if there is any. tfds configs run under
``tfds.testing.mock_data``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

SKIP_FILES = {"timing.json", "checkpoints", "events", "lock"}
# wall-clock figures: they differ between any two runs, whatever the change
TIMING_KEYS = ("_ms", "over_ordinary", "seconds", "steps_per_s", "wall")


_CHECKOUT = re.compile(r"^/\S*?/((?:site-packages|regime_jax)/\S*:\d+)$")


def _normal_json(path: pathlib.Path, root: pathlib.Path):
    """A JSON file with its run root replaced and wall-clock fields left out."""

    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items() if not any(t in str(k) for t in TIMING_KEYS)}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, str):
            # a site's source file names the checkout it ran from: keep the part from the package on
            return _CHECKOUT.sub(r"<CHECKOUT>/\1", obj)
        return obj

    return walk(json.loads(path.read_text().replace(str(root), "<ROOT>")))


def write(out: pathlib.Path, only: list[str] | None) -> None:
    import tensorflow_datasets as tfds

    from regime_jax import configs, data, sweep
    from regime_jax.run import loop

    only = [n.removesuffix(":quick") for n in only] if only else only  # each runs :quick
    unknown = sorted(set(only or ()) - set(configs.names()) - {"main"})
    if unknown:  # a name that matches nothing would measure nothing
        raise SystemExit(f"--only: unknown {unknown}; allowed: {[*configs.names(), 'main']}")
    names = [n for n in configs.names() if not only or n in only]
    for name in names:
        if name in configs.SWEEPS:
            sweep.run_sweep(configs.load(f"{name}:quick"), out / f"sweep_{name}")
            continue
        config = configs.load(f"{name}:quick")
        workdir = out / name
        if config.dataset.name in data.TFDS:
            with tfds.testing.mock_data(num_examples=96):
                loop.train_and_evaluate(config, workdir)
        else:
            loop.train_and_evaluate(config, workdir)
    if not only or "main" in only:
        loop.train_and_evaluate(configs.load("mlp_mnist1d"), out / "main_mlp_mnist1d")


def _rows(path: pathlib.Path, ignore: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(ignore)} for r in rows]


def _ulps(x: float, y: float) -> int:
    import numpy as np

    a, b = np.float32(x).view(np.int32), np.float32(y).view(np.int32)
    return abs(int(a) - int(b))


def _row_diff(ra: list[dict], rb: list[dict]) -> str:
    if len(ra) != len(rb) or any(x.keys() != y.keys() for x, y in zip(ra, rb, strict=False)):
        return f"rows or keys differ ({len(ra)} vs {len(rb)} rows)"
    n, keys, worst = 0, set(), 0
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            if x[k] != y[k]:
                n += 1
                keys.add(k.split("/")[0])
                if isinstance(x[k], float) and isinstance(y[k], float):
                    worst = max(worst, _ulps(x[k], y[k]))
                else:
                    worst = -1
    far = "not numbers" if worst < 0 else f"at most {worst} float32 ulp"
    return f"{n} values differ ({', '.join(sorted(keys))}), {far}"


def compare(a: pathlib.Path, b: pathlib.Path, ignore: tuple[str, ...]) -> int:
    problems = []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}

    def skipped(rel: pathlib.Path) -> bool:
        return any(part in SKIP_FILES or part.startswith("events") for part in rel.parts)

    files_a = {f for f in files_a if not skipped(f)}
    files_b = {f for f in files_b if not skipped(f)}
    for rel in sorted(files_a ^ files_b):
        problems.append(f"only in {'before' if rel in files_a else 'after'}: {rel}")
    compared = 0
    for rel in sorted(files_a & files_b):
        compared += 1
        if rel.name == "metrics.jsonl":
            ra, rb = _rows(a / rel, ignore), _rows(b / rel, ignore)
            if ra != rb:
                problems.append(f"{rel}: {_row_diff(ra, rb)}")
        elif rel.name in ("config.json", "sweep.json", "manifest.json"):
            continue  # carry versions / paths
        elif rel.suffix == ".json":
            if _normal_json(a / rel, a) != _normal_json(b / rel, b):
                problems.append(f"{rel}: differs (run root and wall-clock fields left out)")
        elif rel.name == "report.md":
            continue  # holds wall-clock columns; its numbers come from summary.json
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            problems.append(f"{rel}: bytes differ")
    for p in problems:
        print(p)
    print(f"compared {compared} files: {len(problems)} differences")
    if not compared:
        print("nothing was compared: a comparison of nothing is not a pass")
        return 1
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="run every :quick config and the main job under OUT")
    w.add_argument("out", type=pathlib.Path)
    w.add_argument("--only", nargs="*", help="config names (and 'main') to run; default all")
    c = sub.add_parser("compare", help="compare two trees written by 'write'")
    c.add_argument("before", type=pathlib.Path)
    c.add_argument("after", type=pathlib.Path)
    c.add_argument("--ignore-prefix", action="append", default=[], help="metric keys to leave out")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        write(args.out, args.only)
        return 0
    return compare(args.before, args.after, tuple(args.ignore_prefix))


if __name__ == "__main__":
    sys.exit(main())
