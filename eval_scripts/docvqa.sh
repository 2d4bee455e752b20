#!/usr/bin/env bash
# DocVQA val, ANLS with threshold 0.5 (reported x100).
# Usage: eval_scripts/docvqa.sh CHECKPOINT [llava_dsl.evaluate flags]
# Run from the folder that holds playground/ (as LLaVA's scripts), or pass --data-dir.
# Data:  playground/data/eval/docvqa/{val_v1.0_withQT.json (or val_v1.0.json), documents/}
set -euo pipefail
source "$(dirname "$0")/common.sh"
CKPT=${1:?usage: eval_scripts/docvqa.sh CHECKPOINT [flags]}
shift
run_sharded docvqa "$CKPT" "$@"
