#!/usr/bin/env bash
# Stage 1 (feature alignment): train the projector only; the vision tower and the LLM stay frozen.
# LLaVA-1.5's scripts/v1_5/pretrain.sh under ZeRO-3, with the multi-layer (DSL) projector by default.
#
#   bash scripts/zero3/pretrain.sh                      # LLaVA-1.5 data under ./playground/data, all local GPUs
#   DRY_RUN=1 bash scripts/zero3/pretrain.sh            # print the command instead of running it
#   HOSTFILE=hostfile bash scripts/zero3/pretrain.sh    # several nodes; the global batch stays 256
#   bash scripts/zero3/pretrain.sh --max_steps 10       # extra flags go last and win
#
# Every variable, with its default, is listed in scripts/zero3/README.md. Writes
# $PRETRAIN_OUTPUT_DIR/mm_projector.bin, which finetune.sh and finetune_lora.sh load.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PRETRAIN_DATA_PATH=${PRETRAIN_DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
PRETRAIN_IMAGE_FOLDER=${PRETRAIN_IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
PRETRAIN_LEARNING_RATE=${PRETRAIN_LEARNING_RATE:-1e-3}
PRETRAIN_SAVE_STEPS=${PRETRAIN_SAVE_STEPS:-24000}
# LLaVA-1.5 pretrains on square-resized images (train.py's default) and pads only in stage 2
PRETRAIN_IMAGE_ASPECT_RATIO=${PRETRAIN_IMAGE_ASPECT_RATIO:-square}

# global batch 256 = LLaVA's 32 per device x 8 GPUs
zero3_setup PRETRAIN_GLOBAL_BATCH_SIZE 256 32
zero3_require_llava_dir PRETRAIN_OUTPUT_DIR

flags=()
zero3_common_flags flags
flags+=(--version plain
    --data_path "$PRETRAIN_DATA_PATH"
    --image_folder "$PRETRAIN_IMAGE_FOLDER"
    --tune_mm_mlp_adapter True
    --image_aspect_ratio "$PRETRAIN_IMAGE_ASPECT_RATIO"
    --output_dir "$PRETRAIN_OUTPUT_DIR"
    --learning_rate "$PRETRAIN_LEARNING_RATE"
    --save_steps "$PRETRAIN_SAVE_STEPS")
zero3_launch "${flags[@]}" "$@"
