#!/usr/bin/env bash
# R-Probe stage under ZeRO-3: freeze a trained LLaVA checkpoint and train only the probe (a copy of the LLM's
# first ceil(L/4) decoder layers + an MLP head) to reconstruct every visual token's pixels. See docs/rprobe.md.
#
#   MODEL_PATH=./checkpoints/llava-vicuna-7b-v1.5-detached_mlp_multilayer bash scripts/zero3/rprobe.sh
#   DRY_RUN=1 MODEL_PATH=... bash scripts/zero3/rprobe.sh        # print the command instead of running it
#   NUM_GPUS=2 MODEL_PATH=... bash scripts/zero3/rprobe.sh --steps 500   # extra flags go last and win
#   LAUNCHER=python MODEL_PATH=... bash scripts/zero3/rprobe.sh  # one process, plain torch loop, no DeepSpeed
#
# Writes OUTPUT_DIR/rprobe.bin (probe weights + the geometry they fit), report.json (held-out MSE/PSNR per
# evaluation, steps to threshold, trivial-predictor baseline), reconstructions.png and mse_curve.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() { printf 'error: %s\n' "$*" >&2; exit 2; }

MODEL_PATH=${MODEL_PATH:-}
[ -n "$MODEL_PATH" ] || die "MODEL_PATH is not set: a trained LLaVA checkpoint folder (full weights, or a stage-1 folder with MODEL_BASE)"
MODEL_BASE=${MODEL_BASE:-}                 # only for stage-1 folders that hold just mm_projector.bin
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
EVAL_DATA_PATH=${EVAL_DATA_PATH:-}         # held-out json; without it the last EVAL_HOLDOUT images of DATA_PATH
EVAL_IMAGE_FOLDER=${EVAL_IMAGE_FOLDER:-$IMAGE_FOLDER}
EVAL_HOLDOUT=${EVAL_HOLDOUT:-512}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/rprobe-$(basename "$MODEL_PATH")}
STEPS=${STEPS:-3000}
BATCH_SIZE=${BATCH_SIZE:-16}               # per process; the global batch is BATCH_SIZE x ranks
LEARNING_RATE=${LEARNING_RATE:-1e-4}
WARMUP_STEPS=${WARMUP_STEPS:-100}
EVAL_EVERY=${EVAL_EVERY:-100}
EVAL_MAX_IMAGES=${EVAL_MAX_IMAGES:-512}
SEED=${SEED:-0}
BIDIRECTIONAL=${BIDIRECTIONAL:-False}      # True: full attention instead of the LLM's causal mask
CONDITIONAL=${CONDITIONAL:-False}          # True: [context ; text ; target crop] -> reconstruct the crop
LAUNCHER=${LAUNCHER:-deepspeed}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-$ROOT/scripts/zero3/zero3.json}
MASTER_PORT=${MASTER_PORT:-29500}
NUM_GPUS=${NUM_GPUS:-}                     # default: every visible GPU (2 CPU ranks without a GPU)
HOSTFILE=${HOSTFILE:-}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    BF16=${BF16:-True}
    NUM_WORKERS=${NUM_WORKERS:-4}
else
    BF16=${BF16:-False}
    NUM_WORKERS=${NUM_WORKERS:-0}
    NUM_GPUS=${NUM_GPUS:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # CPU ranks share the cores
fi

flags=(--model-path "$MODEL_PATH"
    --data-path "$DATA_PATH"
    --image-folder "$IMAGE_FOLDER"
    --output-dir "$OUTPUT_DIR"
    --steps "$STEPS"
    --batch-size "$BATCH_SIZE"
    --learning-rate "$LEARNING_RATE"
    --warmup-steps "$WARMUP_STEPS"
    --eval-every "$EVAL_EVERY"
    --eval-max-images "$EVAL_MAX_IMAGES"
    --seed "$SEED"
    --bf16 "$BF16"
    --num-workers "$NUM_WORKERS"
    --rprobe_bidirectional "$BIDIRECTIONAL"
    --rprobe_conditional "$CONDITIONAL")
[ -z "$MODEL_BASE" ] || flags+=(--model-base "$MODEL_BASE")
if [ -n "$EVAL_DATA_PATH" ]; then
    flags+=(--eval-data-path "$EVAL_DATA_PATH" --eval-image-folder "$EVAL_IMAGE_FOLDER")
else
    flags+=(--eval-holdout "$EVAL_HOLDOUT")
fi

case "$LAUNCHER" in
    deepspeed)
        cmd=(deepspeed)
        [ -z "$HOSTFILE" ] || cmd+=(--hostfile "$HOSTFILE")
        [ -z "$NUM_GPUS" ] || cmd+=(--num_gpus "$NUM_GPUS")
        cmd+=(--master_port "$MASTER_PORT" --module llava_dsl.rprobe train --deepspeed "$DEEPSPEED_CONFIG")
        ;;
    python) cmd=("$PYTHON" -m llava_dsl.rprobe train) ;;
    *) die "LAUNCHER=$LAUNCHER: expected deepspeed (ZeRO-3) or python (one process)" ;;
esac
cmd+=("${flags[@]}" "$@")

if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
