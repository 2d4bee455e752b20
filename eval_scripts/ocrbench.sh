#!/usr/bin/env bash
# OCRBench (1,000 questions, 10 categories): a hit when a ground-truth answer occurs in the prediction
# (lower-cased; HME100k: spaces removed, case kept); reported as points out of 1000 with per-category totals.
# Usage: eval_scripts/ocrbench.sh CHECKPOINT [llava_dsl.evaluate flags]
# Run from the folder that holds playground/ (as LLaVA's scripts), or pass --data-dir.
# Data:  playground/data/eval/ocrbench/{OCRBench.json, OCRBench_Images/}
set -euo pipefail
source "$(dirname "$0")/common.sh"
CKPT=${1:?usage: eval_scripts/ocrbench.sh CHECKPOINT [flags]}
shift
run_sharded ocrbench "$CKPT" "$@"
