#!/usr/bin/env bash
# ChartQA test (human-written and augmented questions), relaxed accuracy: numbers within 5% of the target
# (a trailing % divides by 100), anything else exact up to case. Overall, human and augmented are reported.
# Usage: eval_scripts/chartqa.sh CHECKPOINT [llava_dsl.evaluate flags, e.g. --split human]
# Run from the folder that holds playground/ (as LLaVA's scripts), or pass --data-dir.
# Data:  playground/data/eval/chartqa/{test_human.json, test_augmented.json, png/}
set -euo pipefail
source "$(dirname "$0")/common.sh"
CKPT=${1:?usage: eval_scripts/chartqa.sh CHECKPOINT [flags]}
shift
run_sharded chartqa "$CKPT" "$@"
