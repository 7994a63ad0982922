#!/usr/bin/env bash
# Accelerator figures in one go (not a test): on a GPU host, in under 8 minutes, prints
#   1-3  bench_overhead.py  (what monitoring costs a step) for the MLP, the CNN and the ViT
#   4    bench_memory.py    (peak device memory of the large models), if this checkout has it
#   5    bench_throughput.py (steps/s for steps_per_call K = 1, 8, 32)
#   6-7  one short ResNet-18 and one ReLU-GPT training run (the resnet18_cifar10:quick and
#        gpt_shakespeare:quick configs, if this checkout has them): steps/s and peak memory
# Every stage runs under `timeout`; a stage that fails or runs out of time prints so and the
# next one starts. Everything goes to stdout and to the log file.
#
# COMMAND (from the repository root):
#   bash experiments/accelerator_check.sh                     # the accelerator figures
#   bash experiments/accelerator_check.sh --cpu-smoke         # everything shrunk: does it run?
#   bash experiments/accelerator_check.sh --dry-run           # the stages and their commands
#   ACCEL_CHECK_LOG=/tmp/accel.log bash experiments/accelerator_check.sh   # log elsewhere
# ACCEL_CHECK_SMOKE=1 is --cpu-smoke. PYTHON (default: .venv/bin/python if present, else
# python) runs the scripts, with the repository root on PYTHONPATH.
#
# EXPECTED on one GPU: about 5-7 minutes end to end (the stages' time limits add up to
# 7 min 10 s). Not yet measured on an accelerator; tests/test_accelerator_check.py runs the
# --cpu-smoke mode (every stage's header) and the --dry-run mode.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE="${ACCEL_CHECK_SMOKE:-0}"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "accelerator_check.sh: unknown argument '$arg' (allowed: --cpu-smoke, --dry-run)" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="${ACCEL_CHECK_LOG:-accelerator_check_$(date +%Y%m%d_%H%M%S).log}"
exec > >(tee -a "$LOG") 2>&1

if [[ "$SMOKE" == 1 ]]; then
  export JAX_PLATFORMS=cpu ACCEL_CHECK_SMOKE=1
  MODE="cpu-smoke (everything shrunk; the figures mean nothing)"
  LIMIT=(300 300 300 300 300 300 300)  # a shared CPU: this mode checks that stages run
  OVERHEAD_SMALL=(--chunks 2 --chunk-steps 2 --batch 8 --probe 16)
  MLP_ARGS=(--hidden 32,32 "${OVERHEAD_SMALL[@]}")
  THROUGHPUT_ARGS=(--jobs main --ks 1,8,32 --rounds 1 --steps 32)
  MEMORY_ARGS=(--models mlp --probe 16 --batch 8)
  RUN_OVERRIDES=(--config.num_steps=20 --config.batch_size=8 --config.probe.size=8
    --config.log_every_steps=10)
else
  MODE="accelerator"
  LIMIT=(45 50 70 75 80 55 55)  # seconds; 430 in all
  OVERHEAD_SMALL=(--chunks 30)
  MLP_ARGS=("${OVERHEAD_SMALL[@]}")
  THROUGHPUT_ARGS=(--jobs main,transformer --ks 1,8,32 --rounds 6)
  MEMORY_ARGS=(--models gpt resnet --probe 512 1024)
  RUN_OVERRIDES=()
fi

STAGES=7
STAGE=0
FAILED=()
T0=$SECONDS

# stage <title> <seconds> <command...>: header, the command under timeout, a footer line
stage() {
  local title="$1" limit="$2"
  shift 2
  STAGE=$((STAGE + 1))
  echo
  echo "=== [$STAGE/$STAGES] $title (time limit ${limit}s) ==="
  echo "\$ $*"
  if [[ "$DRY" == 1 ]]; then
    return 0
  fi
  local tic=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  local took=$((SECONDS - tic))
  if [[ $rc == 0 ]]; then
    echo "--- [$STAGE/$STAGES] done in ${took}s"
  elif [[ $rc == 124 || $rc == 137 ]]; then
    echo "--- [$STAGE/$STAGES] TIMED OUT after ${took}s (limit ${limit}s)"
    FAILED+=("$STAGE:timeout")
  else
    echo "--- [$STAGE/$STAGES] FAILED with exit code $rc after ${took}s"
    FAILED+=("$STAGE:rc=$rc")
  fi
}

# skip <title> <why>: the header of a stage this checkout cannot run, and why
skip() {
  STAGE=$((STAGE + 1))
  echo
  echo "=== [$STAGE/$STAGES] $1 ==="
  echo "--- [$STAGE/$STAGES] SKIPPED: $2"
}

# A short training run of a packaged config: its steps/s (timing.json) and the device's peak
# memory (memory_stats, where the backend reports it); skipped if the config is not here (in
# --cpu-smoke mode, mlp_mnist1d:quick runs instead, so the stage's code still runs).
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
TRAIN_PROBE="$TMP/train_probe.py"
cat > "$TRAIN_PROBE" <<'EOF'
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from regime_jax import configs
from regime_jax.configs.base import ConfigError
from regime_jax.configs.overrides import override

name, overrides = sys.argv[1], sys.argv[2:]
try:
    config = configs.load(name)
except ConfigError as err:
    print(f"SKIPPED: {name} is not in this checkout ({err})")
    if os.environ.get("ACCEL_CHECK_SMOKE") != "1":
        sys.exit(0)
    name = "mlp_mnist1d:quick"
    print(f"cpu-smoke: running {name} instead")
    config = configs.load(name)
for item in overrides:
    field, value = item.removeprefix("--config.").split("=", 1)
    override(config, field, value)

import jax

from regime_jax.run import loop

device = jax.devices()[0]
print(f"{name}: {config.model.name}, {config.num_steps} steps, batch {config.batch_size}, "
      f"steps_per_call {config.get('steps_per_call', 1)}; {device.platform} {device.device_kind}")
with tempfile.TemporaryDirectory() as workdir:
    tic = time.perf_counter()
    loop.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - tic
    timing = json.loads((Path(workdir) / "timing.json").read_text())
per_step = timing["seconds_per_step"]["ordinary"]
stats = device.memory_stats() or {}
peak = stats.get("peak_bytes_in_use")
print(f"RESULT {name}: "
      + (f"{1 / per_step:.1f} steps/s (after compilation)" if per_step else "no timed steps")
      + f", {wall:.1f} s end to end, peak device memory "
      + (f"{peak / 2**20:.1f} MiB" if peak is not None else f"n/a ({device.platform} reports none)"))
EOF

echo "accelerator_check: mode $MODE; log $LOG; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [[ "$DRY" == 0 ]]; then
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" \
    || echo "jax does not start: every stage below will fail"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

stage "bench_overhead: MLP" "${LIMIT[0]}" "$PYTHON" experiments/bench_overhead.py "${MLP_ARGS[@]}"
stage "bench_overhead: CNN (cnn_cifar10)" "${LIMIT[1]}" \
  "$PYTHON" experiments/bench_overhead.py --model cnn_cifar10 "${OVERHEAD_SMALL[@]}"
stage "bench_overhead: ViT (vit_cifar10)" "${LIMIT[2]}" \
  "$PYTHON" experiments/bench_overhead.py --model vit_cifar10 "${OVERHEAD_SMALL[@]}"
if [[ -f experiments/bench_memory.py ]]; then
  stage "bench_memory: large models" "${LIMIT[3]}" \
    "$PYTHON" experiments/bench_memory.py "${MEMORY_ARGS[@]}"
else
  skip "bench_memory: large models" "experiments/bench_memory.py is not in this checkout"
fi
stage "bench_throughput: K = 1, 8, 32" "${LIMIT[4]}" \
  "$PYTHON" experiments/bench_throughput.py "${THROUGHPUT_ARGS[@]}"
stage "training run: ResNet-18 (resnet18_cifar10:quick)" "${LIMIT[5]}" \
  "$PYTHON" "$TRAIN_PROBE" resnet18_cifar10:quick "${RUN_OVERRIDES[@]}"
stage "training run: ReLU-GPT (gpt_shakespeare:quick)" "${LIMIT[6]}" \
  "$PYTHON" "$TRAIN_PROBE" gpt_shakespeare:quick "${RUN_OVERRIDES[@]}"

echo
if [[ "$DRY" == 1 ]]; then
  echo "accelerator_check: dry run, nothing was run"
  exit 0
fi
echo "accelerator_check: $STAGES stages in $((SECONDS - T0))s; problems: ${FAILED[*]:-none}; log $LOG"
[[ ${#FAILED[@]} == 0 ]]
