#!/usr/bin/env bash
# R-Probe comparison: the same probe (seed, data, step budget) trained on each checkpoint; held-out MSE every
# EVAL_EVERY steps, steps until it drops below a threshold, a reconstruction grid and the MSE-vs-step curves.
#
#   EVAL_DATA_PATH=heldout.json bash eval_scripts/rprobe.sh CKPT_BASELINE CKPT_DETACHED [...]
#   EVAL_DATA_PATH=heldout.json THRESHOLD=0.75 bash eval_scripts/rprobe.sh A B -- --rprobe_bidirectional True
#   NUM_GPUS=8 EVAL_DATA_PATH=... bash eval_scripts/rprobe.sh A B    # ZeRO-3 under the deepspeed launcher
#
# Flags after "--" go to `python -m llava_dsl.rprobe compare` and win. Output: OUTPUT_DIR/report.json,
# reconstructions.png, mse_curve.png and one probe per checkpoint. How to read them: docs/rprobe.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { printf 'error: %s\n' "$*" >&2; exit 2; }

checkpoints=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    checkpoints+=("$1")
    shift
done
[ "${1:-}" != "--" ] || shift
((${#checkpoints[@]} > 0)) || die "no checkpoints: bash eval_scripts/rprobe.sh CKPT [CKPT ...] [-- extra flags]"

DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
EVAL_DATA_PATH=${EVAL_DATA_PATH:-}
[ -n "$EVAL_DATA_PATH" ] || die "EVAL_DATA_PATH is not set: a LLaVA json of held-out images (none of them in DATA_PATH)"
EVAL_IMAGE_FOLDER=${EVAL_IMAGE_FOLDER:-$IMAGE_FOLDER}
MODEL_BASE=${MODEL_BASE:-}                 # for stage-1 checkpoints that hold only mm_projector.bin
OUTPUT_DIR=${OUTPUT_DIR:-./eval_results/rprobe}
STEPS=${STEPS:-2000}
EVAL_EVERY=${EVAL_EVERY:-100}
BATCH_SIZE=${BATCH_SIZE:-16}
LEARNING_RATE=${LEARNING_RATE:-1e-4}
SEED=${SEED:-0}
THRESHOLD=${THRESHOLD:-}                   # default: THRESHOLD_FRACTION x the trivial predictor's held-out MSE
THRESHOLD_FRACTION=${THRESHOLD_FRACTION:-0.5}
NUM_GPUS=${NUM_GPUS:-1}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-$ROOT/scripts/zero3/zero3.json}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    BF16=${BF16:-True}
else
    BF16=${BF16:-False}
fi

flags=(--checkpoints "${checkpoints[@]}"
    --data-path "$DATA_PATH"
    --image-folder "$IMAGE_FOLDER"
    --eval-data-path "$EVAL_DATA_PATH"
    --eval-image-folder "$EVAL_IMAGE_FOLDER"
    --output-dir "$OUTPUT_DIR"
    --steps "$STEPS"
    --eval-every "$EVAL_EVERY"
    --batch-size "$BATCH_SIZE"
    --learning-rate "$LEARNING_RATE"
    --seed "$SEED"
    --bf16 "$BF16"
    --threshold-fraction "$THRESHOLD_FRACTION")
[ -z "$THRESHOLD" ] || flags+=(--threshold "$THRESHOLD")
[ -z "$MODEL_BASE" ] || flags+=(--model-base "$MODEL_BASE")

if [ "$NUM_GPUS" = 1 ]; then
    cmd=("$PYTHON" -m llava_dsl.rprobe compare)
else
    cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module llava_dsl.rprobe compare
        --deepspeed "$DEEPSPEED_CONFIG")
fi
cmd+=("${flags[@]}" "$@")

if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
