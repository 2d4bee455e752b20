#!/usr/bin/env bash
# InfographicVQA val, ANLS with threshold 0.5 (reported x100).
# Usage: eval_scripts/infovqa.sh CHECKPOINT [llava_dsl.evaluate flags]
# Run from the folder that holds playground/ (as LLaVA's scripts), or pass --data-dir.
# Data:  playground/data/eval/infovqa/{infographicsVQA_val_v1.0_withQT.json, infographicsvqa_images/}
set -euo pipefail
source "$(dirname "$0")/common.sh"
CKPT=${1:?usage: eval_scripts/infovqa.sh CHECKPOINT [flags]}
shift
run_sharded infovqa "$CKPT" "$@"
