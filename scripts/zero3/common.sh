# shellcheck shell=bash
# Shared by pretrain.sh, finetune.sh and finetune_lora.sh (sourced, not run).
#
# Every setting is an environment variable with LLaVA-1.5's published value as its default; see README.md
# beside this file for the full table. The stage scripts set their own defaults, then call
#   zero3_setup GLOBAL_BATCH_VAR DEFAULT_GLOBAL_BATCH DEFAULT_PER_DEVICE_BATCH
#   zero3_launch <train flags...>
# zero3_setup resolves the device, the number of ranks (local GPUs or a hostfile) and the per-device batch and
# gradient accumulation that keep the global batch fixed; zero3_launch prints (DRY_RUN=1) or runs the command.

ZERO3_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

zero3_die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

zero3_warn() {
    printf 'warning: %s\n' "$*" >&2
}

# zero3_bool NAME: normalise the True/False variable NAME in place (HF's parser wants True/False).
zero3_bool() {
    local name=$1
    case "${!name}" in
        True | true | 1 | yes) printf -v "$name" True ;;
        False | false | 0 | no) printf -v "$name" False ;;
        *) zero3_die "$name=${!name}: expected True or False" ;;
    esac
}

# zero3_positive_int NAME: dies unless NAME holds a positive integer.
zero3_positive_int() {
    local name=$1
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || zero3_die "$name=${!name}: expected a positive integer"
}

zero3_gcd() {
    local a=$1 b=$2 t
    while ((b)); do t=$((a % b)); a=$b; b=$t; done
    printf '%s' "$a"
}

# CUDA devices this process can see (honours CUDA_VISIBLE_DEVICES), via the training interpreter's torch.
zero3_probe_cuda() {
    local count
    count=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' \
        2>/dev/null) || zero3_die "DEVICE=$DEVICE: PYTHON=$PYTHON cannot import torch to count the GPUs; set DEVICE=cuda" \
        "or DEVICE=cpu (and NUM_GPUS) explicitly"
    printf '%s' "$count"
}

# DEVICE (auto|cuda|cpu) and the defaults that depend on it.
zero3_resolve_device() {
    DEVICE=${DEVICE:-auto}
    ZERO3_LOCAL_GPUS=""
    case "$DEVICE" in
        auto)
            ZERO3_LOCAL_GPUS=$(zero3_probe_cuda)
            if ((ZERO3_LOCAL_GPUS > 0)); then DEVICE=cuda; else DEVICE=cpu; fi
            ;;
        cuda | cpu) ;;
        *) zero3_die "DEVICE=$DEVICE: expected auto, cuda or cpu" ;;
    esac
    if [ "$DEVICE" = cuda ]; then
        TF32=${TF32:-True}
        ATTN_IMPLEMENTATION=${ATTN_IMPLEMENTATION:-flash_attention_2}  # what LLaVA's train_mem.py uses
        DATALOADER_NUM_WORKERS=${DATALOADER_NUM_WORKERS:-4}
    else
        # tf32 is a CUDA-only switch (HF refuses it on CPU); DeepSpeed picks its CPU accelerator and gloo itself.
        TF32=${TF32:-False}
        ATTN_IMPLEMENTATION=${ATTN_IMPLEMENTATION:-sdpa}
        DATALOADER_NUM_WORKERS=${DATALOADER_NUM_WORKERS:-0}
        # several ranks share the cores: one thread each is several times faster than oversubscribing
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
}

# Ranks: from HOSTFILE (multi-node; deepspeed's own default /job/hostfile too) or from the local devices.
# Mirrors deepspeed's launcher: NUM_NODES keeps the first nodes, NUM_GPUS sets the GPUs used on each node.
zero3_resolve_world() {
    local line host slots known n i per_node
    local -a hosts=() node_slots=()
    HOSTFILE=${HOSTFILE:-}
    NUM_NODES=${NUM_NODES:-}
    NUM_GPUS=${NUM_GPUS:-}
    if [ -z "$HOSTFILE" ] && [ "$LAUNCHER" = deepspeed ] && [ -f /job/hostfile ]; then
        HOSTFILE=/job/hostfile  # the deepspeed launcher reads it when no --hostfile is given
    fi
    [ -z "$NUM_GPUS" ] || zero3_positive_int NUM_GPUS
    [ -z "$NUM_NODES" ] || zero3_positive_int NUM_NODES
    if [ -n "$HOSTFILE" ]; then
        [ "$LAUNCHER" = deepspeed ] || zero3_die "HOSTFILE=$HOSTFILE given with LAUNCHER=$LAUNCHER; only the deepspeed launcher starts several nodes"
        [ -f "$HOSTFILE" ] || zero3_die "HOSTFILE=$HOSTFILE: no such file (expected lines like 'node1 slots=8')"
        while IFS= read -r line || [ -n "$line" ]; do
            line=${line#"${line%%[![:space:]]*}"}
            [[ -z "$line" || "$line" == \#* ]] && continue
            [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] ||
                zero3_die "HOSTFILE=$HOSTFILE: bad line '$line' (expected 'HOSTNAME slots=N')"
            host=${BASH_REMATCH[1]}
            slots=${BASH_REMATCH[2]}
            for known in "${hosts[@]}"; do
                [ "$known" != "$host" ] || zero3_die "HOSTFILE=$HOSTFILE: host '$host' is listed twice"
            done
            hosts+=("$host")
            node_slots+=("$slots")
        done <"$HOSTFILE"
        ((${#hosts[@]} > 0)) || zero3_die "HOSTFILE=$HOSTFILE: no 'HOSTNAME slots=N' line"
        n=${#hosts[@]}
        if [ -n "$NUM_NODES" ]; then
            ((NUM_NODES <= n)) || zero3_die "NUM_NODES=$NUM_NODES but HOSTFILE=$HOSTFILE lists only $n nodes"
            n=$NUM_NODES
        fi
        WORLD_SIZE=0
        for ((i = 0; i < n; i++)); do
            per_node=${NUM_GPUS:-${node_slots[i]}}
            WORLD_SIZE=$((WORLD_SIZE + per_node))
        done
        ZERO3_NODES=$n
    else
        if [ -n "$NUM_NODES" ] && ((NUM_NODES > 1)); then
            zero3_die "NUM_NODES=$NUM_NODES needs HOSTFILE (lines like 'node1 slots=8')"
        fi
        if [ "$LAUNCHER" = python ]; then
            [ -z "$NUM_GPUS" ] || [ "$NUM_GPUS" = 1 ] || zero3_die "NUM_GPUS=$NUM_GPUS with LAUNCHER=python, which runs one process"
            NUM_GPUS=1
        elif [ -z "$NUM_GPUS" ]; then
            if [ "$DEVICE" = cuda ]; then
                ZERO3_LOCAL_GPUS=${ZERO3_LOCAL_GPUS:-$(zero3_probe_cuda)}
                ((ZERO3_LOCAL_GPUS > 0)) || zero3_die "DEVICE=cuda but torch sees no GPU; set NUM_GPUS, or DEVICE=cpu"
                NUM_GPUS=$ZERO3_LOCAL_GPUS
                ZERO3_ALL_VISIBLE=1  # let the launcher take every visible GPU itself
            else
                NUM_GPUS=1
            fi
        fi
        WORLD_SIZE=$NUM_GPUS
        ZERO3_NODES=1
    fi
    ((WORLD_SIZE > 0)) || zero3_die "no ranks to run on (HOSTFILE=${HOSTFILE:-unset}, NUM_GPUS=${NUM_GPUS:-unset})"
}

# Per-device batch and accumulation such that per_device x accumulation x ranks == global batch.
# Given one of PER_DEVICE_TRAIN_BATCH_SIZE / GRADIENT_ACCUMULATION_STEPS, the other is derived; given neither,
# the per-device batch is LLaVA's (default_per_device), lowered when more ranks than LLaVA's 8 GPUs share it.
zero3_resolve_batch() {
    local global_name=$1 default_per_device=$2 per_rank
    local global=${!global_name}
    zero3_positive_int "$global_name"
    PER_DEVICE_TRAIN_BATCH_SIZE=${PER_DEVICE_TRAIN_BATCH_SIZE:-}
    GRADIENT_ACCUMULATION_STEPS=${GRADIENT_ACCUMULATION_STEPS:-}
    ((global % WORLD_SIZE == 0)) || zero3_die "$global_name=$global is not divisible by the $WORLD_SIZE ranks" \
        "($(zero3_world_text)); choose a GPU/node count that divides it, or change $global_name"
    per_rank=$((global / WORLD_SIZE))
    if [ -n "$PER_DEVICE_TRAIN_BATCH_SIZE" ]; then
        zero3_positive_int PER_DEVICE_TRAIN_BATCH_SIZE
    fi
    if [ -n "$GRADIENT_ACCUMULATION_STEPS" ]; then
        zero3_positive_int GRADIENT_ACCUMULATION_STEPS
    fi
    if [ -z "$PER_DEVICE_TRAIN_BATCH_SIZE" ] && [ -z "$GRADIENT_ACCUMULATION_STEPS" ]; then
        PER_DEVICE_TRAIN_BATCH_SIZE=$(zero3_gcd "$default_per_device" "$per_rank")
    elif [ -z "$PER_DEVICE_TRAIN_BATCH_SIZE" ]; then
        ((per_rank % GRADIENT_ACCUMULATION_STEPS == 0)) || zero3_die "GRADIENT_ACCUMULATION_STEPS=$GRADIENT_ACCUMULATION_STEPS" \
            "does not divide the $per_rank samples each rank contributes ($global_name=$global over $WORLD_SIZE ranks)"
        PER_DEVICE_TRAIN_BATCH_SIZE=$((per_rank / GRADIENT_ACCUMULATION_STEPS))
    fi
    if [ -z "$GRADIENT_ACCUMULATION_STEPS" ]; then
        ((per_rank % PER_DEVICE_TRAIN_BATCH_SIZE == 0)) || zero3_die "PER_DEVICE_TRAIN_BATCH_SIZE=$PER_DEVICE_TRAIN_BATCH_SIZE" \
            "does not divide the $per_rank samples each rank contributes ($global_name=$global over $WORLD_SIZE ranks)"
        GRADIENT_ACCUMULATION_STEPS=$((per_rank / PER_DEVICE_TRAIN_BATCH_SIZE))
    fi
    ((PER_DEVICE_TRAIN_BATCH_SIZE * GRADIENT_ACCUMULATION_STEPS == per_rank)) || zero3_die \
        "PER_DEVICE_TRAIN_BATCH_SIZE=$PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS=$GRADIENT_ACCUMULATION_STEPS" \
        "x $WORLD_SIZE ranks != $global_name=$global; set only one of the two and the other is derived"
}

zero3_world_text() {
    if [ -n "$HOSTFILE" ]; then
        printf '%s nodes from HOSTFILE=%s%s' "$ZERO3_NODES" "$HOSTFILE" "${NUM_GPUS:+, NUM_GPUS=$NUM_GPUS each}"
    else
        printf 'NUM_GPUS=%s on DEVICE=%s' "$NUM_GPUS" "$DEVICE"
    fi
}

# zero3_require_llava_dir NAME [lora]: LLaVA's loader treats a checkpoint as multimodal only when its folder
# name contains "llava" (and merges LoRA only when it also contains "lora").
zero3_require_llava_dir() {
    local name=$1 base
    base=$(basename "${!name}")
    [[ "${base,,}" == *llava* ]] || zero3_die "$name=${!name}: the folder name must contain 'llava'" \
        "(llava.model.builder.load_pretrained_model reads it as a plain LLM otherwise)"
    if [ "${2:-}" = lora ]; then
        [[ "${base,,}" == *lora* ]] || zero3_die "$name=${!name}: the folder name must contain 'lora'" \
            "(llava.model.builder.load_pretrained_model merges LoRA weights only then)"
    fi
}

# Settings shared by every stage; the stage scripts set their own defaults before sourcing this file.
zero3_setup() {
    local global_name=$1 default_global=$2 default_per_device=$3
    PYTHON=${PYTHON:-python}
    DEEPSPEED_LAUNCHER=${DEEPSPEED_LAUNCHER:-deepspeed}
    LAUNCHER=${LAUNCHER:-deepspeed}
    case "$LAUNCHER" in
        deepspeed | python) ;;
        *) zero3_die "LAUNCHER=$LAUNCHER: expected deepspeed (ZeRO-3) or python (one process, no DeepSpeed)" ;;
    esac
    DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-$ZERO3_DIR/zero3.json}
    TRAIN_MODULE=${TRAIN_MODULE:-llava_dsl.train}
    MASTER_PORT=${MASTER_PORT:-29500}
    MASTER_ADDR=${MASTER_ADDR:-}
    DRY_RUN=${DRY_RUN:-0}

    MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-lmsys/vicuna-7b-v1.5}
    VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
    PROJECTOR_TYPE=${PROJECTOR_TYPE:-detached_mlp_multilayer}
    MM_VISION_SELECT_LAYER=${MM_VISION_SELECT_LAYER:--2}
    SKIP_LAYERS=${SKIP_LAYERS:-}
    SKIP_STRIDE=${SKIP_STRIDE:-}
    DETACH_DEPTH=${DETACH_DEPTH:-}
    RUN_NAME=${RUN_NAME:-llava-$(basename "$MODEL_NAME_OR_PATH")-$PROJECTOR_TYPE}
    CHECKPOINT_ROOT=${CHECKPOINT_ROOT:-./checkpoints}
    PRETRAIN_OUTPUT_DIR=${PRETRAIN_OUTPUT_DIR:-$CHECKPOINT_ROOT/$RUN_NAME-pretrain}

    BF16=${BF16:-True}
    GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}
    MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
    NUM_TRAIN_EPOCHS=${NUM_TRAIN_EPOCHS:-1}
    MAX_STEPS=${MAX_STEPS:--1}
    WEIGHT_DECAY=${WEIGHT_DECAY:-0.}
    # LLaVA-1.5's DeepSpeed configs have no gradient_clipping, so its published runs were never clipped (the Trainer
    # leaves clipping to DeepSpeed). Ours say "auto" and pass this on; 0 keeps the published recipe, with or without
    # DeepSpeed alike.
    MAX_GRAD_NORM=${MAX_GRAD_NORM:-0}
    WARMUP_RATIO=${WARMUP_RATIO:-0.03}
    LR_SCHEDULER_TYPE=${LR_SCHEDULER_TYPE:-cosine}
    SAVE_STRATEGY=${SAVE_STRATEGY:-steps}
    SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-1}
    LOGGING_STEPS=${LOGGING_STEPS:-1}
    REPORT_TO=${REPORT_TO:-none}
    SEED=${SEED:-42}

    zero3_resolve_device
    zero3_bool BF16
    zero3_bool TF32
    zero3_bool GRADIENT_CHECKPOINTING
    if [ "$DEVICE" = cpu ] && [ "$TF32" = True ]; then
        zero3_die "TF32=True with DEVICE=cpu: tf32 is a CUDA setting"
    fi
    if [ -n "$SKIP_LAYERS" ] && [ -n "$SKIP_STRIDE" ]; then
        zero3_die "SKIP_LAYERS=$SKIP_LAYERS and SKIP_STRIDE=$SKIP_STRIDE: give one of them (explicit layers or a stride)"
    fi
    if [ "$LAUNCHER" = deepspeed ] && [ ! -f "$DEEPSPEED_CONFIG" ]; then
        zero3_die "DEEPSPEED_CONFIG=$DEEPSPEED_CONFIG: no such file"
    fi

    printf -v "$global_name" '%s' "${!global_name:-$default_global}"
    zero3_resolve_world
    zero3_resolve_batch "$global_name" "$default_per_device"
    ZERO3_GLOBAL_NAME=$global_name
}

# Flags common to every stage, appended to the array named by $1.
zero3_common_flags() {
    local -n out=$1
    out+=(
        --model_name_or_path "$MODEL_NAME_OR_PATH"
        --vision_tower "$VISION_TOWER"
        --mm_projector_type "$PROJECTOR_TYPE"
        --mm_vision_select_layer "$MM_VISION_SELECT_LAYER"
    )
    [ -z "$SKIP_LAYERS" ] || out+=(--mm_vision_skip_layers "$SKIP_LAYERS")
    [ -z "$SKIP_STRIDE" ] || out+=(--mm_vision_skip_stride "$SKIP_STRIDE")
    [ -z "$DETACH_DEPTH" ] || out+=(--mm_vision_detach_depth "$DETACH_DEPTH")
    out+=(
        --mm_use_im_start_end False
        --mm_use_im_patch_token False
        --bf16 "$BF16"
        --tf32 "$TF32"
        --num_train_epochs "$NUM_TRAIN_EPOCHS"
        --max_steps "$MAX_STEPS"
        --per_device_train_batch_size "$PER_DEVICE_TRAIN_BATCH_SIZE"
        --per_device_eval_batch_size 4
        --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS"
        --evaluation_strategy no
        --save_strategy "$SAVE_STRATEGY"
        --save_total_limit "$SAVE_TOTAL_LIMIT"
        --weight_decay "$WEIGHT_DECAY"
        --max_grad_norm "$MAX_GRAD_NORM"
        --warmup_ratio "$WARMUP_RATIO"
        --lr_scheduler_type "$LR_SCHEDULER_TYPE"
        --logging_steps "$LOGGING_STEPS"
        --model_max_length "$MODEL_MAX_LENGTH"
        --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
        --dataloader_num_workers "$DATALOADER_NUM_WORKERS"
        --lazy_preprocess True
        --report_to "$REPORT_TO"
        --seed "$SEED"
        --attn_implementation "$ATTN_IMPLEMENTATION"
    )
}

# Stage-2 flags shared by finetune.sh and finetune_lora.sh, appended to the array named by $1.
zero3_stage2_flags() {
    local -n out2=$1
    PRETRAIN_MM_MLP_ADAPTER=${PRETRAIN_MM_MLP_ADAPTER:-$PRETRAIN_OUTPUT_DIR/mm_projector.bin}
    UNFREEZE_VISION_TOWER=${UNFREEZE_VISION_TOWER:-True}
    VISION_TOWER_LR=${VISION_TOWER_LR:-2e-6}
    IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-pad}
    GROUP_BY_MODALITY_LENGTH=${GROUP_BY_MODALITY_LENGTH:-True}
    zero3_bool UNFREEZE_VISION_TOWER
    zero3_bool GROUP_BY_MODALITY_LENGTH
    if [ ! -f "$PRETRAIN_MM_MLP_ADAPTER" ]; then
        local problem="PRETRAIN_MM_MLP_ADAPTER=$PRETRAIN_MM_MLP_ADAPTER: no such file; run pretrain.sh first with the same"
        problem+=" MODEL_NAME_OR_PATH, PROJECTOR_TYPE and RUN_NAME (it writes PRETRAIN_OUTPUT_DIR/mm_projector.bin), or set"
        problem+=" PRETRAIN_MM_MLP_ADAPTER to a stage-1 mm_projector.bin"
        if [ "$DRY_RUN" = 1 ]; then zero3_warn "$problem"; else zero3_die "$problem"; fi
    fi
    out2+=(--pretrain_mm_mlp_adapter "$PRETRAIN_MM_MLP_ADAPTER"
        --image_aspect_ratio "$IMAGE_ASPECT_RATIO"
        --group_by_modality_length "$GROUP_BY_MODALITY_LENGTH")
    if [ "$UNFREEZE_VISION_TOWER" = True ]; then
        # joint training: the tower gets its own (smaller) learning rate; DSL's stop-gradient acts only here
        out2+=(--unfreeze_mm_vision_tower True --mm_vision_tower_lr "$VISION_TOWER_LR")
    fi
}

# zero3_launch FLAGS...: the launcher (deepspeed ZeRO-3, or one python process) then llava_dsl.train FLAGS.
zero3_launch() {
    local -a cmd=() env_prefix=()
    local ids
    if [ "$DEVICE" = cpu ]; then
        env_prefix=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
    fi
    if [ "$LAUNCHER" = deepspeed ]; then
        cmd=("$DEEPSPEED_LAUNCHER")
        if [ -n "$HOSTFILE" ]; then
            cmd+=(--hostfile "$HOSTFILE")
            [ -z "$NUM_NODES" ] || cmd+=(--num_nodes "$NUM_NODES")
            [ -z "$NUM_GPUS" ] || cmd+=(--num_gpus "$NUM_GPUS")
        elif [ -n "${ZERO3_ALL_VISIBLE:-}" ]; then
            :  # every visible GPU: the launcher honours CUDA_VISIBLE_DEVICES only without --num_gpus
        elif [ "$DEVICE" = cuda ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
            # --num_gpus would make the launcher drop CUDA_VISIBLE_DEVICES and take GPUs 0..N-1 instead
            ids=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | cut -d, -f"1-$NUM_GPUS")
            [ "$(printf '%s' "$ids" | tr ',' '\n' | grep -c .)" = "$NUM_GPUS" ] ||
                zero3_die "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists fewer GPUs"
            cmd+=(--include "localhost:$ids")
        else
            cmd+=(--num_gpus "$NUM_GPUS")
        fi
        [ -z "$MASTER_ADDR" ] || cmd+=(--master_addr "$MASTER_ADDR")
        cmd+=(--master_port "$MASTER_PORT" --module "$TRAIN_MODULE" --deepspeed "$DEEPSPEED_CONFIG")
    else
        cmd=("$PYTHON" -m "$TRAIN_MODULE")
    fi
    cmd+=("$@")

    local summary
    summary="global batch ${!ZERO3_GLOBAL_NAME} = $PER_DEVICE_TRAIN_BATCH_SIZE per device x $GRADIENT_ACCUMULATION_STEPS"
    summary+=" accumulation x $WORLD_SIZE ranks ($(zero3_world_text), LAUNCHER=$LAUNCHER)"
    if [ "$DRY_RUN" = 1 ]; then
        printf '# %s\n' "$summary"
        zero3_print_command "${env_prefix[@]}" "${cmd[@]}"
        return 0
    fi
    printf '[scripts/zero3] %s\n' "$summary" >&2
    exec "${cmd[@]}"
}

# One flag per line, shell-quoted: the printed command can be pasted back into a shell.
zero3_print_command() {
    local arg first=1
    for arg in "$@"; do
        if [ $first = 1 ]; then
            printf '%q' "$arg"
            first=0
        elif [[ "$arg" == --* ]]; then
            printf ' \\\n    %q' "$arg"
        else
            printf ' %q' "$arg"
        fi
    done
    printf '\n'
}
