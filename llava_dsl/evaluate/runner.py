"""OCR-centric benchmark runners: read a benchmark's own files, generate answers, score, report.

    python -m llava_dsl.evaluate textvqa  --model-path CKPT [--protocol llava-ocr|plain]
    python -m llava_dsl.evaluate docvqa   --model-path CKPT
    python -m llava_dsl.evaluate infovqa  --model-path CKPT
    python -m llava_dsl.evaluate chartqa  --model-path CKPT [--split test|human|augmented]
    python -m llava_dsl.evaluate ocrbench --model-path CKPT
    python -m llava_dsl.evaluate compare RESULTS.json|DIR [...] [--output table.md] [--details]

Common flags: --data-dir (default playground/data/eval/<bench>), --output-dir (default
<data-dir>/answers/<checkpoint name>/<protocol>-<split>), --stage all|generate|score, --num-chunks/--chunk-idx
(generate one shard per GPU, then --stage score merges them), --device, --dtype, --conv-mode,
--max_new_tokens, --allow-partial (score with unanswered questions counted as wrong).

The output folder gets questions.jsonl (the prompts, in LLaVA's question format), answers.jsonl (LLaVA's
answer format; resumable), generation.json (the generation settings; a rerun with other settings is refused),
scored.jsonl (prediction and score per question) and results.json; a one-line summary is printed. Scoring rules live in ``llava_dsl.scorers``; the README in eval_scripts/ documents the
data layout.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from llava_dsl.checkpointing.atomic import atomic_write_text
from llava_dsl.evaluate.benchmarks import LOADERS, Benchmark, _load_json
from llava_dsl.evaluate.generate import (EvalInputError, add_generation_flags, match_answers, merge_answers,
                                         read_answers, read_questions)


def model_name_of(model_path: str) -> str:
    """LLaVA's get_model_name_from_path (no torch import)."""
    parts = model_path.strip("/").split("/")
    return parts[-2] + "_" + parts[-1] if parts[-1].startswith("checkpoint-") else parts[-1]


def config_digest(model_path: str) -> str:
    """sha256 (first 16 hex) of the checkpoint's config.json, canonicalised: identifies the architecture."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise EvalInputError(f"--model-path {model_path}: no config.json (not a saved checkpoint?)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def write_questions(questions: Sequence[dict], path: str) -> None:
    atomic_write_text(path, "".join(json.dumps({"question_id": q["question_id"], "image": q["image"], "text": q["text"]})
                                + "\n" for q in questions))


def generation_settings(args, max_new_tokens: int) -> dict:
    model_path = os.path.expanduser(args.model_path) if args.model_path else None
    return {"checkpoint": os.path.abspath(model_path) if model_path else None,
            "config_digest": config_digest(model_path) if model_path else None,
            "model_base": args.model_base, "conv_mode": args.conv_mode, "temperature": args.temperature,
            "top_p": args.top_p, "num_beams": args.num_beams, "max_new_tokens": max_new_tokens, "dtype": args.dtype}


def record_generation(path: str, settings: dict) -> None:
    """Write the generation settings beside the answers; refuse to add answers made with other settings."""
    if os.path.isfile(path):
        recorded = _load_json(path, "generation record")
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if changed:
            described = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise EvalInputError(f"{os.path.dirname(path)} holds answers generated with other settings ({described}); "
                                 f"use another --output-dir, or delete that folder to start over")
        return
    atomic_write_text(path, json.dumps(settings, indent=1))


def shard_file(output_dir: str, num_chunks: int, chunk_idx: int) -> str:
    if num_chunks == 1:
        return os.path.join(output_dir, "answers.jsonl")
    return os.path.join(output_dir, f"answers.{num_chunks}_{chunk_idx}.jsonl")


def score_answers(bench: Benchmark, question_file: str, answers_file: str, allow_partial: bool) -> dict:
    questions = read_questions(question_file)
    matched = match_answers(questions, read_answers(answers_file), question_file, answers_file)
    unanswered = [q for q, a in zip(questions, matched) if a is None]
    if unanswered and not allow_partial:
        shown = ", ".join(repr(q["question_id"]) for q in unanswered[:5])
        raise EvalInputError(f"{len(unanswered)} of {len(questions)} questions of {question_file} have no answer in "
                             f"{answers_file} (first: {shown}); finish generation (it resumes where it stopped) or "
                             f"pass --allow-partial to score them as wrong")
    predictions = [None if a is None else a["text"] for a in matched]
    score, details, per = bench.score(predictions)
    scored_file = os.path.join(os.path.dirname(answers_file), "scored.jsonl")
    with open(scored_file, "w", encoding="utf-8") as f:
        for q, p, s, gt in zip(questions, predictions, per, bench.ground_truth):
            f.write(json.dumps({"question_id": q["question_id"], "prediction": p, "ground_truth": gt, "score": s}) + "\n")
    return {"score": score, "details": details, "n": len(questions), "answered": len(questions) - len(unanswered),
            "unanswered": len(unanswered), "scored_file": os.path.abspath(scored_file)}


def format_score(score: float, unit: str) -> str:
    return str(int(score)) if unit.startswith("points") else f"{score:.2f}"


def summary_line(result: dict) -> str:
    checkpoint = result.get("checkpoint_name") or "?"
    digest = result.get("config_digest") or "-"
    details = "".join(f" {k}={v:.2f}" for k, v in result["details"].items() if isinstance(v, float))
    return (f"{result['benchmark']} ({result['protocol']}, {result['split']}): {format_score(result['score'], result['unit'])} {result['unit']}"
            f"{details} | n={result['n']} answered={result['answered']} unanswered={result['unanswered']} | "
            f"{checkpoint} (config {digest})")


def run_benchmark(args) -> Optional[dict]:
    data_dir = args.data_dir or os.path.join("playground", "data", "eval", args.benchmark)
    bench = LOADERS[args.benchmark](data_dir, protocol=args.protocol or "llava-ocr", split=args.split or "test",
                                    annotation_file=args.annotation_file, question_file=args.question_file,
                                    image_folder=args.image_folder)
    if args.split is not None and args.benchmark != "chartqa":
        raise EvalInputError(f"--split {args.split!r}: only chartqa has splits to choose ({args.benchmark} runs "
                             f"its {bench.split} split)")
    if args.benchmark != "textvqa" and args.protocol not in (None, bench.protocol):
        raise EvalInputError(f"--protocol {args.protocol!r}: {args.benchmark} has only the {bench.protocol!r} protocol")
    if args.model_path is None and args.stage != "score":
        raise EvalInputError("--model-path is required to generate answers")
    name = model_name_of(os.path.expanduser(args.model_path)) if args.model_path else None
    output_dir = args.output_dir or os.path.join(data_dir, "answers", name or "unknown", f"{bench.protocol}-{bench.split}")
    question_file = os.path.join(output_dir, "questions.jsonl")
    write_questions(bench.questions, question_file)
    max_new_tokens = args.max_new_tokens or bench.max_new_tokens

    if args.stage == "all" and args.num_chunks > 1:
        raise EvalInputError("--stage all runs in one process; with --num-chunks > 1 run --stage generate once per "
                             "--chunk-idx (one per GPU), then --stage score")
    generation_file = os.path.join(output_dir, "generation.json")
    if args.stage in ("all", "generate"):
        from llava_dsl.evaluate.generate import check_images, default_device, generate_answers

        check_images(read_questions(question_file), bench.image_folder, question_file)
        record_generation(generation_file, generation_settings(args, max_new_tokens))
        gen_args = argparse.Namespace(
            model_path=args.model_path, model_base=args.model_base, question_file=question_file,
            image_folder=bench.image_folder, answers_file=shard_file(output_dir, args.num_chunks, args.chunk_idx),
            conv_mode=args.conv_mode, num_chunks=args.num_chunks, chunk_idx=args.chunk_idx,
            temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams, max_new_tokens=max_new_tokens,
            device=default_device(args.device), dtype=args.dtype)
        generate_answers(gen_args)
    if args.stage == "generate":
        return None

    answers_file = os.path.join(output_dir, "answers.jsonl")
    if args.num_chunks > 1:
        shards = [shard_file(output_dir, args.num_chunks, k) for k in range(args.num_chunks)]
        absent = [s for s in shards if not os.path.isfile(s)]
        if absent and not args.allow_partial:
            raise EvalInputError(f"{len(absent)} of {args.num_chunks} shard answers files are missing: {absent}; "
                                 f"run --stage generate for those --chunk-idx values (or pass --allow-partial)")
        counts = merge_answers(question_file, [s for s in shards if os.path.isfile(s)], answers_file)
        print(f"llava_dsl.evaluate: merged {args.num_chunks - len(absent)} shards: {counts['answered']}/"
              f"{counts['questions']} answered -> {answers_file}")
    elif not os.path.isfile(answers_file):
        raise EvalInputError(f"answers file {answers_file}: no such file; run --stage generate first")
    scored = score_answers(bench, question_file, answers_file, args.allow_partial)
    generation = generation_settings(args, max_new_tokens)
    result = {
        "benchmark": bench.name, "protocol": bench.protocol, "split": bench.split, "metric": bench.metric,
        "unit": bench.unit, **scored,
        "checkpoint": generation["checkpoint"], "checkpoint_name": name, "config_digest": generation["config_digest"],
        # the settings the answers were generated with (absent for answers made elsewhere)
        "generation": _load_json(generation_file, "generation record") if os.path.isfile(generation_file) else None,
        "question_file": os.path.abspath(question_file), "answers_file": os.path.abspath(answers_file),
        "image_folder": os.path.abspath(bench.image_folder), **bench.sources,
    }
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(summary_line(result), flush=True)
    return result

RESULT_KEYS = ("benchmark", "protocol", "split", "score", "unit", "n", "unanswered")


def load_results(paths: Sequence[str]) -> List[dict]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "results.json"), recursive=True))
            if not found:
                raise EvalInputError(f"{path}: no results.json under this folder")
            files.extend(found)
        else:
            files.append(path)
    results = []
    for path in files:
        result = _load_json(path, "results file")
        missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
        if missing:
            raise EvalInputError(f"results file {path}: missing {missing}; not written by llava_dsl.evaluate?")
        results.append({**result, "_file": path})
    return results


def compare_table(results: Sequence[dict], details: bool = False) -> str:
    """Markdown: one row per checkpoint (name + config digest), one column per benchmark/protocol/split."""
    columns: List[Tuple[str, str]] = []  # (column id, header)
    rows: Dict[Tuple[str, str], Dict[str, str]] = {}
    for r in results:
        base = f"{r['benchmark']} ({r['protocol']}, {r['split']})"
        cells = {base: format_score(r["score"], r["unit"]) + (f" ({r['unanswered']} unanswered)" if r["unanswered"] else "")}
        headers = {base: f"{base} [{r['unit']}]"}
        if details:
            for key, value in r.get("details", {}).items():
                if isinstance(value, (int, float)):
                    cells[f"{base} {key}"] = f"{value:.2f}" if isinstance(value, float) else str(value)
                    headers[f"{base} {key}"] = f"{base} {key}"
        for column in cells:
            if column not in [c for c, _ in columns]:
                columns.append((column, headers[column]))
        row = (r.get("checkpoint_name") or os.path.dirname(r["_file"]), r.get("config_digest") or "-")
        for column, value in cells.items():
            if column in rows.setdefault(row, {}):
                raise EvalInputError(f"two results for {row[0]} (config {row[1]}) on {column}: "
                                     f"{r['_file']} and an earlier file")
            rows[row][column] = value
    lines = ["| checkpoint | config | " + " | ".join(h for _, h in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for (name, digest), cells in rows.items():
        lines.append(f"| {name} | {digest} | " + " | ".join(cells.get(c, "-") for c, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=sorted(LOADERS))
    add_generation_flags(parser, max_new_tokens=0, model_path_required=False)  # 0: the benchmark's default
    parser.add_argument("--protocol", default=None, help="textvqa: llava-ocr (default) or plain")
    parser.add_argument("--split", default=None, help="chartqa: test (default, both splits), human or augmented")
    parser.add_argument("--data-dir", default=None, help="default playground/data/eval/<benchmark>")
    parser.add_argument("--annotation-file", default=None, help="override the benchmark's annotation file")
    parser.add_argument("--question-file", default=None, help="textvqa llava-ocr: LLaVA's question jsonl")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--stage", choices=("all", "generate", "score"), default="all")
    parser.add_argument("--allow-partial", action="store_true",
                        help="score although some questions are unanswered (they count as wrong and are reported)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point (returns None: console-script wrappers exit with the return value)."""
    run_cli(argv)


def run_cli(argv: Optional[List[str]] = None) -> Optional[dict]:
    """The command line; returns the results of a benchmark run (None for generate-only runs and compare)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "compare":
            parser = argparse.ArgumentParser(prog="python -m llava_dsl.evaluate compare",
                                             description="Markdown table of results.json files, one row per checkpoint.")
            parser.add_argument("results", nargs="+", help="results.json files or folders searched for them")
            parser.add_argument("--output", default=None, help="also write the table to this file")
            parser.add_argument("--details", action="store_true", help="add sub-score columns (splits, categories)")
            args = parser.parse_args(argv[1:])
            table = compare_table(load_results(args.results), details=args.details)
            if args.output:
                with open(args.output, "w", encoding="utf-8") as f:
                    f.write(table)
            print(table, end="")
            return None
        return run_benchmark(build_parser().parse_args(argv))
    except EvalInputError as error:
        raise SystemExit(f"llava_dsl.evaluate: {error}") from None
