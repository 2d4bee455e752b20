#!/usr/bin/env bash
# DPVR-LF stage (docs/dpvr.md): start from a trained LLaVA-1.5 checkpoint, route the vision tokens out of the LLM at
# DPVR_ROUTE_LAYER into a one-layer side branch (a copy of that layer), run the deeper layers on text only, re-fuse
# at the last layer, and train only the side branch. LLaVA-1.5's instruction data and batch, under ZeRO-3.
#
#   MODEL_NAME_OR_PATH=./checkpoints/llava-v1.5-7b bash scripts/zero3/finetune_dpvr.sh
#   DPVR_ROUTE_LAYER=auto DPVR_ATTENTION_REPORT=./analysis/llava-v1.5-7b/attention_share.json \
#       MODEL_NAME_OR_PATH=./checkpoints/llava-v1.5-7b bash scripts/zero3/finetune_dpvr.sh
#   DRY_RUN=1 MODEL_NAME_OR_PATH=... bash scripts/zero3/finetune_dpvr.sh     # print the command
#
# The checkpoint's own vision settings (mm_vision_tower, mm_projector_type, mm_vision_select_layer,
# mm_vision_skip_layers, mm_vision_detach_depth) are read from its config.json and are the defaults of VISION_TOWER,
# PROJECTOR_TYPE, MM_VISION_SELECT_LAYER, SKIP_LAYERS and DETACH_DEPTH: the projector must fit its saved weights.
# DPVR variables and defaults:
#   DPVR_ROUTE_LAYER=18          routing layer R (integer) or auto (needs DPVR_ATTENTION_REPORT)
#   DPVR_ATTENTION_REPORT=       attention_share.json of `python -m llava_dsl.analyze attention`
#   DPVR_ATTENTION_THRESHOLD=    with auto: re-suggest R at this threshold (default: the report's)
#   DPVR_SIDE_INIT_LAYER=        layer the side branch is copied from (default: R)
#   DPVR_SIDE_ATTENTION=vision   vision | prefix (side branch also sees the text before the image)
#   DPVR_TUNE_FUSION_LAYER=False also train the last LLM layer
#   DPVR_DATA_PATH=./playground/data/llava_v1_5_mix665k.json  DPVR_IMAGE_FOLDER=./playground/data
#   DPVR_LEARNING_RATE=2e-5      DPVR_GLOBAL_BATCH_SIZE=128     DPVR_SAVE_STEPS=50000
#   DPVR_OUTPUT_DIR=$CHECKPOINT_ROOT/<checkpoint name>-dpvr-r<R>  (must contain "llava")
# Every other variable is common.sh's (scripts/zero3/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-./checkpoints/llava-v1.5-7b}
DRY_RUN=${DRY_RUN:-0}
if [ -f "$MODEL_NAME_OR_PATH/config.json" ]; then
    # one value of the checkpoint's config.json ('' when absent; lists joined by commas)
    dpvr_config_value() {
        "${PYTHON:-python}" -c 'import json, sys
value = json.load(open(sys.argv[1])).get(sys.argv[2])
print("" if value is None else ",".join(map(str, value)) if isinstance(value, list) else value)' \
            "$MODEL_NAME_OR_PATH/config.json" "$1"
    }
    [ -n "$(dpvr_config_value mm_vision_tower)" ] || zero3_die "MODEL_NAME_OR_PATH=$MODEL_NAME_OR_PATH: its config.json" \
        "has no mm_vision_tower; the DPVR stage starts from a trained LLaVA checkpoint (stage 2 output)"
    VISION_TOWER=${VISION_TOWER:-$(dpvr_config_value mm_vision_tower)}
    PROJECTOR_TYPE=${PROJECTOR_TYPE:-$(dpvr_config_value mm_projector_type)}
    MM_VISION_SELECT_LAYER=${MM_VISION_SELECT_LAYER:-$(dpvr_config_value mm_vision_select_layer)}
    SKIP_LAYERS=${SKIP_LAYERS:-$(dpvr_config_value mm_vision_skip_layers)}
    DETACH_DEPTH=${DETACH_DEPTH:-$(dpvr_config_value mm_vision_detach_depth)}
elif [ "$DRY_RUN" = 1 ]; then
    zero3_warn "MODEL_NAME_OR_PATH=$MODEL_NAME_OR_PATH: no config.json; printing with common.sh's vision defaults"
else
    zero3_die "MODEL_NAME_OR_PATH=$MODEL_NAME_OR_PATH: no config.json; the DPVR stage starts from a trained LLaVA" \
        "checkpoint folder (the output of finetune.sh)"
fi

DPVR_ROUTE_LAYER=${DPVR_ROUTE_LAYER:-18}
DPVR_ATTENTION_REPORT=${DPVR_ATTENTION_REPORT:-}
DPVR_ATTENTION_THRESHOLD=${DPVR_ATTENTION_THRESHOLD:-}
DPVR_SIDE_INIT_LAYER=${DPVR_SIDE_INIT_LAYER:-}
DPVR_SIDE_ATTENTION=${DPVR_SIDE_ATTENTION:-vision}
DPVR_TUNE_FUSION_LAYER=${DPVR_TUNE_FUSION_LAYER:-False}
DPVR_DATA_PATH=${DPVR_DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
DPVR_IMAGE_FOLDER=${DPVR_IMAGE_FOLDER:-./playground/data}
DPVR_LEARNING_RATE=${DPVR_LEARNING_RATE:-2e-5}
DPVR_SAVE_STEPS=${DPVR_SAVE_STEPS:-50000}
zero3_bool DPVR_TUNE_FUSION_LAYER
case "$DPVR_ROUTE_LAYER" in
    auto) [ -n "$DPVR_ATTENTION_REPORT" ] || zero3_die "DPVR_ROUTE_LAYER=auto needs DPVR_ATTENTION_REPORT" \
        "(the attention_share.json of python -m llava_dsl.analyze attention)" ;;
    '' | *[!0-9]*) zero3_die "DPVR_ROUTE_LAYER=$DPVR_ROUTE_LAYER: expected a layer index or auto" ;;
esac
case "$DPVR_SIDE_ATTENTION" in
    vision | prefix) ;;
    *) zero3_die "DPVR_SIDE_ATTENTION=$DPVR_SIDE_ATTENTION: expected vision or prefix" ;;
esac

dpvr_base=$(basename "$MODEL_NAME_OR_PATH")
[[ "${dpvr_base,,}" == *llava* ]] || dpvr_base="llava-$dpvr_base"
RUN_NAME=${RUN_NAME:-$dpvr_base-dpvr-r$DPVR_ROUTE_LAYER}

# global batch 128 = LLaVA-1.5's stage-2 batch (16 per device x 8 GPUs)
zero3_setup DPVR_GLOBAL_BATCH_SIZE 128 16
DPVR_OUTPUT_DIR=${DPVR_OUTPUT_DIR:-$CHECKPOINT_ROOT/$RUN_NAME}
zero3_require_llava_dir DPVR_OUTPUT_DIR

flags=()
zero3_common_flags flags
flags+=(--version v1
    --data_path "$DPVR_DATA_PATH"
    --image_folder "$DPVR_IMAGE_FOLDER"
    --image_aspect_ratio pad
    --group_by_modality_length True
    --output_dir "$DPVR_OUTPUT_DIR"
    --learning_rate "$DPVR_LEARNING_RATE"
    --save_steps "$DPVR_SAVE_STEPS"
    --mm_routing dpvr_lf
    --dpvr_route_layer "$DPVR_ROUTE_LAYER"
    --dpvr_side_attention "$DPVR_SIDE_ATTENTION"
    --dpvr_tune_fusion_layer "$DPVR_TUNE_FUSION_LAYER")
[ -z "$DPVR_ATTENTION_REPORT" ] || flags+=(--dpvr_attention_report "$DPVR_ATTENTION_REPORT")
[ -z "$DPVR_ATTENTION_THRESHOLD" ] || flags+=(--dpvr_attention_threshold "$DPVR_ATTENTION_THRESHOLD")
[ -z "$DPVR_SIDE_INIT_LAYER" ] || flags+=(--dpvr_side_init_layer "$DPVR_SIDE_INIT_LAYER")
zero3_launch "${flags[@]}" "$@"
