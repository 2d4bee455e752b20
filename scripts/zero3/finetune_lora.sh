#!/usr/bin/env bash
# Stage 2 with LoRA on the LLM (LLaVA-1.5's scripts/v1_5/finetune_lora.sh, under ZeRO-3): LoRA adapters on the
# LLM's linear layers, the projector at MM_PROJECTOR_LR, and the vision tower still trained jointly at
# VISION_TOWER_LR. Starts from pretrain.sh's mm_projector.bin.
#
#   bash scripts/zero3/finetune_lora.sh
#   DRY_RUN=1 bash scripts/zero3/finetune_lora.sh
#
# Writes the LoRA adapter and non_lora_trainables.bin (projector + vision tower) to $LORA_OUTPUT_DIR; load it with
# load_pretrained_model(LORA_OUTPUT_DIR, MODEL_NAME_OR_PATH, <name with "llava" and "lora">).
# Every variable, with its default, is listed in scripts/zero3/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FINETUNE_DATA_PATH=${FINETUNE_DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
FINETUNE_IMAGE_FOLDER=${FINETUNE_IMAGE_FOLDER:-./playground/data}
LORA_LEARNING_RATE=${LORA_LEARNING_RATE:-2e-4}
LORA_R=${LORA_R:-128}
LORA_ALPHA=${LORA_ALPHA:-256}
MM_PROJECTOR_LR=${MM_PROJECTOR_LR:-2e-5}
FINETUNE_SAVE_STEPS=${FINETUNE_SAVE_STEPS:-50000}

# global batch 128 = LLaVA's 16 per device x 8 GPUs
zero3_setup FINETUNE_GLOBAL_BATCH_SIZE 128 16
LORA_OUTPUT_DIR=${LORA_OUTPUT_DIR:-$CHECKPOINT_ROOT/$RUN_NAME-lora}
zero3_require_llava_dir LORA_OUTPUT_DIR lora

flags=()
zero3_common_flags flags
flags+=(--lora_enable True
    --lora_r "$LORA_R"
    --lora_alpha "$LORA_ALPHA"
    --mm_projector_lr "$MM_PROJECTOR_LR"
    --version v1
    --data_path "$FINETUNE_DATA_PATH"
    --image_folder "$FINETUNE_IMAGE_FOLDER"
    --output_dir "$LORA_OUTPUT_DIR"
    --learning_rate "$LORA_LEARNING_RATE"
    --save_steps "$FINETUNE_SAVE_STEPS")
zero3_stage2_flags flags
zero3_launch "${flags[@]}" "$@"
