#!/usr/bin/env bash
# Stage 2 (visual instruction tuning), joint: LLM, projector and the vision tower all train; the tower has its
# own learning rate (VISION_TOWER_LR) and the DSL projector detaches its shallow skips.
# LLaVA-1.5's scripts/v1_5/finetune.sh under ZeRO-3, starting from pretrain.sh's mm_projector.bin.
#
#   bash scripts/zero3/finetune.sh
#   PROJECTOR_TYPE=mlp_multilayer bash scripts/zero3/finetune.sh    # the naive multi-layer baseline
#   PROJECTOR_TYPE=mlp2x_gelu UNFREEZE_VISION_TOWER=False bash scripts/zero3/finetune.sh   # stock LLaVA-1.5
#   DRY_RUN=1 bash scripts/zero3/finetune.sh
#
# Every variable, with its default, is listed in scripts/zero3/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FINETUNE_DATA_PATH=${FINETUNE_DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
FINETUNE_IMAGE_FOLDER=${FINETUNE_IMAGE_FOLDER:-./playground/data}
FINETUNE_LEARNING_RATE=${FINETUNE_LEARNING_RATE:-2e-5}
FINETUNE_SAVE_STEPS=${FINETUNE_SAVE_STEPS:-50000}

# global batch 128 = LLaVA's 16 per device x 8 GPUs
zero3_setup FINETUNE_GLOBAL_BATCH_SIZE 128 16
FINETUNE_OUTPUT_DIR=${FINETUNE_OUTPUT_DIR:-$CHECKPOINT_ROOT/$RUN_NAME}
zero3_require_llava_dir FINETUNE_OUTPUT_DIR

flags=()
zero3_common_flags flags
flags+=(--version v1
    --data_path "$FINETUNE_DATA_PATH"
    --image_folder "$FINETUNE_IMAGE_FOLDER"
    --output_dir "$FINETUNE_OUTPUT_DIR"
    --learning_rate "$FINETUNE_LEARNING_RATE"
    --save_steps "$FINETUNE_SAVE_STEPS")
zero3_stage2_flags flags
zero3_launch "${flags[@]}" "$@"
