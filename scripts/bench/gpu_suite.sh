#!/usr/bin/env bash
# The GPU suite in one command: LLaVA-1.5-7B-shaped joint stage 2 under ZeRO-3 (mlp2x_gelu vs Detached Skip-Links),
# pytest -m gpu, R-Probe cost and DPVR-LF cost on one GPU in under ~9 minutes; one JSON and one Markdown file under
# $OUT (default ./gpu_suite_out). Each part runs in its own process group with its own time budget; a part that
# fails or runs out of time is named in the results, never fatal. Details: scripts/bench/gpu_suite.py.
#
#   bash scripts/bench/gpu_env.sh fetch            # once, where the package index is reachable (wheels to carry)
#   bash scripts/bench/gpu_suite.sh                # GPU machine: environment (gpu_env.sh install), then the parts
#   bash scripts/bench/gpu_suite.sh --dry-run      # CPU, tiny shapes, .venv: the same code paths
#
# Extra arguments go to gpu_suite.py (--parts, --budget, --joint-depths, --peak-tflops, --work).
# SUITE_PYTHON=/path/to/python skips the environment step and runs with that interpreter.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-./gpu_suite_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT

dry=0
for arg in "$@"; do
    case "$arg" in --dry-run | --tiny) dry=1 ;; esac
done

env_args=()
if [ -n "${SUITE_PYTHON:-}" ]; then
    py=$SUITE_PYTHON
elif [ "$dry" = 1 ]; then
    py=$ROOT/.venv/bin/python
    [ -x "$py" ] || py=python3
else
    began=$SECONDS
    status=ready
    bash "$ROOT/scripts/bench/gpu_env.sh" install >"$OUT/env.log" 2>&1 || status="failed (exit $?): see env.log"
    py=${GPU_VENV:-/tmp/llava-dsl-gpu-venv}/bin/python
    # no venv at all: the parts fail one by one and are named; the report still gets written
    [ -x "$py" ] || py=${BASE_PYTHON:-python3}
    env_args=(--env-seconds "$((SECONDS - began))" --env-status "$status")
    tail -n 15 "$OUT/env.log"
fi

PATH="$(dirname "$py"):$PATH"
export PATH
exec "$py" "$ROOT/scripts/bench/gpu_suite.py" --out "$OUT" "${env_args[@]}" "$@"
