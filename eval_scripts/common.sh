# Shared by the benchmark scripts in this folder (source it; do not run it).
#
# run_sharded BENCHMARK CHECKPOINT [llava_dsl.evaluate flags...]
#   One answer-generation process per GPU listed in CUDA_VISIBLE_DEVICES (LLaVA's gqa.sh pattern; one
#   process when it is unset), each on its --chunk-idx; then one scoring process merges the shards and
#   writes results.json. Generation resumes: rerunning after a crash answers only what is missing.
# Environment: PYTHON (default: python), CUDA_VISIBLE_DEVICES.

PYTHON=${PYTHON:-python}

run_sharded() {
    local bench=$1 ckpt=$2
    shift 2
    local gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
    local -a gpus pids
    IFS=',' read -ra gpus <<< "$gpu_list"
    local chunks=${#gpus[@]} idx status=0
    for idx in $(seq 0 $((chunks - 1))); do
        CUDA_VISIBLE_DEVICES=${gpus[$idx]} "$PYTHON" -m llava_dsl.evaluate "$bench" --model-path "$ckpt" \
            --stage generate --num-chunks "$chunks" --chunk-idx "$idx" "$@" &
        pids+=($!)
    done
    # A bare `wait` returns 0 even when a shard failed: wait for each one.
    for idx in "${!pids[@]}"; do
        wait "${pids[$idx]}" || { echo "$bench: shard $idx of $chunks failed" >&2; status=1; }
    done
    [ "$status" -eq 0 ] || return "$status"
    "$PYTHON" -m llava_dsl.evaluate "$bench" --model-path "$ckpt" --stage score --num-chunks "$chunks" "$@"
}
