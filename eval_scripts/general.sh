#!/usr/bin/env bash
# LLaVA-1.5's own general-benchmark evaluations (its scripts/v1_5/eval/{pope,mme,gqa}.sh), step for step,
# on checkpoints that need the plugin: LLaVA's model_vqa_loader runs through `python -m llava_dsl.run`, the
# scoring steps are LLaVA's (and the benchmarks') own.
#
# Usage: eval_scripts/general.sh {pope|mme|gqa} CHECKPOINT
# Run from the folder that holds playground/ (LLaVA's layout: playground/data/eval/{pope,MME,gqa}, from
# LLaVA's eval.zip plus each benchmark's images; see LLaVA's docs/Evaluation.md).
# Environment:
#   ANSWER_MODULE  default "llava_dsl.run llava.eval.model_vqa_loader": LLaVA's loader (CUDA and fp16 only,
#                  needs LLaVA's `shortuuid` dependency). "llava_dsl.evaluate.generate" takes the same flags and writes the
#                  same answer lines, and also runs without CUDA: set DEVICE=cpu (and DTYPE) with it.
#   LLAVA_REPO     a checkout of haotian-liu/LLaVA: gqa needs its scripts/convert_gqa_for_eval.py
#   CUDA_VISIBLE_DEVICES  gqa: one shard per listed GPU, as LLaVA's gqa.sh
#   PYTHON         default python
set -euo pipefail
BENCH=${1:?usage: eval_scripts/general.sh pope|mme|gqa CHECKPOINT}
CKPT=${2:?usage: eval_scripts/general.sh pope|mme|gqa CHECKPOINT}
PYTHON=${PYTHON:-python}
read -ra ANSWER <<< "${ANSWER_MODULE:-llava_dsl.run llava.eval.model_vqa_loader}"
NAME=$(basename "$CKPT")
EVAL=./playground/data/eval
EXTRA=()  # only llava_dsl.evaluate.generate knows --device / --dtype
[ -n "${DEVICE:-}" ] && EXTRA+=(--device "$DEVICE")
[ -n "${DTYPE:-}" ] && EXTRA+=(--dtype "$DTYPE")

answer() {
    "$PYTHON" -m "${ANSWER[@]}" --model-path "$CKPT" --temperature 0 --conv-mode vicuna_v1 "${EXTRA[@]}" "$@"
}

case "$BENCH" in
pope)
    answer --question-file $EVAL/pope/llava_pope_test.jsonl --image-folder $EVAL/pope/val2014 \
        --answers-file $EVAL/pope/answers/$NAME.jsonl
    "$PYTHON" -m llava.eval.eval_pope --annotation-dir $EVAL/pope/coco \
        --question-file $EVAL/pope/llava_pope_test.jsonl --result-file $EVAL/pope/answers/$NAME.jsonl
    ;;
mme)
    answer --question-file $EVAL/MME/llava_mme.jsonl --image-folder $EVAL/MME/MME_Benchmark_release_version \
        --answers-file $EVAL/MME/answers/$NAME.jsonl
    cd $EVAL/MME
    "$PYTHON" convert_answer_to_mme.py --experiment "$NAME"
    cd eval_tool
    "$PYTHON" calculation.py --results_dir "answers/$NAME"
    ;;
gqa)
    : "${LLAVA_REPO:?gqa: set LLAVA_REPO to a checkout of haotian-liu/LLaVA (for scripts/convert_gqa_for_eval.py)}"
    SPLIT=llava_gqa_testdev_balanced
    GQADIR=$EVAL/gqa/data
    IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
    CHUNKS=${#GPULIST[@]}
    PIDS=()
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]} answer --question-file $EVAL/gqa/$SPLIT.jsonl \
            --image-folder $GQADIR/images --answers-file $EVAL/gqa/answers/$SPLIT/$NAME/${CHUNKS}_${IDX}.jsonl \
            --num-chunks "$CHUNKS" --chunk-idx "$IDX" &
        PIDS+=($!)
    done
    for PID in "${PIDS[@]}"; do wait "$PID"; done  # set -e stops on a failed shard
    OUTPUT=$EVAL/gqa/answers/$SPLIT/$NAME/merge.jsonl
    : > "$OUTPUT"
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        cat $EVAL/gqa/answers/$SPLIT/$NAME/${CHUNKS}_${IDX}.jsonl >> "$OUTPUT"
    done
    "$PYTHON" "$LLAVA_REPO/scripts/convert_gqa_for_eval.py" --src "$OUTPUT" --dst $GQADIR/testdev_balanced_predictions.json
    cd $GQADIR
    "$PYTHON" eval/eval.py --tier testdev_balanced
    ;;
*)
    echo "general.sh: unknown benchmark '$BENCH' (expected pope, mme or gqa)" >&2
    exit 2
    ;;
esac
