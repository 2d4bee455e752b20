#!/usr/bin/env bash
# TextVQA val (5,000 questions), VQA soft accuracy with the EvalAI answer normalisation, two protocols:
#   llava-ocr  LLaVA-1.5's: prompts from llava_textvqa_val_v051_ocr.jsonl, with a "Reference OCR token:" line
#              (the numbers in the LLaVA-1.5 paper);
#   plain      lmms-eval's default: the question only, no OCR tokens (lower scores: see lmms-eval issues #6 and #51).
# Usage: eval_scripts/textvqa.sh CHECKPOINT [llava_dsl.evaluate flags, e.g. --data-dir DIR --dtype bfloat16]
# Run from the folder that holds playground/ (as LLaVA's scripts), or pass --data-dir.
# Data:  playground/data/eval/textvqa/{TextVQA_0.5.1_val.json, llava_textvqa_val_v051_ocr.jsonl, train_images/}
set -euo pipefail
source "$(dirname "$0")/common.sh"
CKPT=${1:?usage: eval_scripts/textvqa.sh CHECKPOINT [flags]}
shift
run_sharded textvqa "$CKPT" --protocol llava-ocr "$@"
run_sharded textvqa "$CKPT" --protocol plain "$@"
