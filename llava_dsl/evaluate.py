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
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import scorers
from .answer import EvalInputError, add_generation_flags, merge_answers, match_answers, read_answers, read_questions

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
Predictions = List[Optional[str]]
ScoreFn = Callable[[Predictions], Tuple[float, dict, List[float]]]


@dataclass
class Benchmark:
    name: str
    protocol: str
    split: str
    metric: str
    unit: str
    questions: List[dict]  # LLaVA question lines: question_id, image, text
    image_folder: str
    sources: Dict[str, str]
    max_new_tokens: int
    score: ScoreFn = field(repr=False)
    ground_truth: List[object] = field(repr=False, default_factory=list)


# --------------------------------------------------------------------------------------------------
# Reading the benchmarks' own files
# --------------------------------------------------------------------------------------------------
def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise EvalInputError(f"{what} {path}: no such file (see eval_scripts/README.md for where to get it)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise EvalInputError(f"{what} {path}: not valid JSON ({error})") from None


def _entries(data, path: str, what: str, container: str) -> list:
    """The list of records: the file itself (container 'list') or its 'data' field (container 'data')."""
    if container == "data":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            found = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
            raise EvalInputError(f"{what} {path}: expected an object with a 'data' list, found {found}")
        data = data["data"]
    elif not isinstance(data, list):
        raise EvalInputError(f"{what} {path}: expected a JSON list of records, found {type(data).__name__}")
    if not data:
        raise EvalInputError(f"{what} {path}: no records")
    return data


def _field(entry, name: str, types, path: str, index: int, what: str):
    where = f"{what} {path} record {index}"
    if not isinstance(entry, dict):
        raise EvalInputError(f"{where}: expected a JSON object, found {type(entry).__name__}")
    if name not in entry:
        raise EvalInputError(f"{where}: missing field {name!r} (fields: {sorted(entry)})")
    value = entry[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise EvalInputError(f"{where}: field {name!r} should be {expected}, found {type(value).__name__} {value!r}")
    return value


def _answer_list(entry, name: str, path: str, index: int, what: str, count: Optional[int] = None) -> List[str]:
    answers = _field(entry, name, list, path, index, what)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise EvalInputError(f"{what} {path} record {index}: {name!r} should be a non-empty list of strings, "
                             f"found {answers!r}")
    if count is not None and len(answers) != count:
        raise EvalInputError(f"{what} {path} record {index}: expected {count} answers, found {len(answers)}")
    return answers


def llava_textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, as ``llava.eval.eval_textvqa.prompt_processor`` reads it."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError("'OCR tokens:' prompt without 'Question: ... Short answer:'")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"a prompt of {len(lines)} lines that is none of LLaVA's three TextVQA prompt styles")
    return question.lower()


def _textvqa_score(ground_truth: List[List[str]]) -> ScoreFn:
    def score(predictions: Predictions):
        per = [0.0 if p is None else scorers.vqa_soft_accuracy(p, gt) for p, gt in zip(predictions, ground_truth)]
        return 100.0 * (sum(per) / len(per)), {}, per
    return score


def load_textvqa(data_dir: str, protocol: str = "llava-ocr", annotation_file: Optional[str] = None,
                 question_file: Optional[str] = None, image_folder: Optional[str] = None, **_) -> Benchmark:
    annotation_file = annotation_file or os.path.join(data_dir, "TextVQA_0.5.1_val.json")
    image_folder = image_folder or os.path.join(data_dir, "train_images")
    what = "TextVQA annotation file"
    entries = _entries(_load_json(annotation_file, what), annotation_file, what, "data")
    for i, entry in enumerate(entries):
        _field(entry, "image_id", str, annotation_file, i, what)
        _field(entry, "question", str, annotation_file, i, what)
        _answer_list(entry, "answers", annotation_file, i, what, count=10)
    sources = {"annotation_file": os.path.abspath(annotation_file)}
    if protocol == "llava-ocr":
        question_file = question_file or os.path.join(data_dir, "llava_textvqa_val_v051_ocr.jsonl")
        questions = read_questions(question_file)
        # LLaVA's eval_textvqa keys the annotations by (image_id, lower-cased question); the last one wins.
        by_key = {(e["image_id"], e["question"].lower()): e for e in entries}
        ground_truth = []
        for q in questions:
            try:
                key = (q["question_id"], llava_textvqa_question(q["text"]))
            except ValueError as error:
                raise EvalInputError(f"question file {question_file} line {q['_line']}: {error}: {q['text'][:120]!r}") from None
            if key not in by_key:
                raise EvalInputError(f"question file {question_file} line {q['_line']}: no annotation in "
                                     f"{annotation_file} for image_id {key[0]!r} and question {key[1]!r}")
            ground_truth.append(by_key[key]["answers"])
        questions = [{"question_id": q["question_id"], "image": q["image"], "text": q["text"]} for q in questions]
        sources["question_file"] = os.path.abspath(question_file)
    elif protocol == "plain":
        # lmms-eval's default TextVQA prompt: no OCR tokens. question_id = image_id, as in LLaVA's file, so
        # LLaVA's eval_textvqa can also score these answers.
        questions = [{"question_id": e["image_id"], "image": f"{e['image_id']}.jpg",
                      "text": e["question"].capitalize() + SHORT_ANSWER} for e in entries]
        ground_truth = [e["answers"] for e in entries]
    else:
        raise EvalInputError(f"--protocol {protocol!r} for textvqa: expected llava-ocr or plain")
    return Benchmark("textvqa", protocol, "val", "VQA accuracy (EvalAI normalisation)", "%", questions,
                     image_folder, sources, 128, _textvqa_score(ground_truth), ground_truth)


def _anls_score(ground_truth: List[List[str]]) -> ScoreFn:
    def score(predictions: Predictions):
        per = [0.0 if p is None else scorers.anls(p, gt) for p, gt in zip(predictions, ground_truth)]
        return 100.0 * (sum(per) / len(per)), {}, per
    return score


def _load_docvqa_like(name: str, data_dir: str, annotation_file: str, image_folder: str, image_field: str,
                      max_new_tokens: int) -> Benchmark:
    what = f"{name} annotation file"
    entries = _entries(_load_json(annotation_file, what), annotation_file, what, "data")
    questions, ground_truth, seen = [], [], {}
    for i, entry in enumerate(entries):
        qid = _field(entry, "questionId", (int, str), annotation_file, i, what)
        question = _field(entry, "question", str, annotation_file, i, what)
        image = _field(entry, image_field, str, annotation_file, i, what)
        if "answers" not in entry:
            raise EvalInputError(f"{what} {annotation_file} record {i}: no 'answers' (the test split has none; it is "
                                 f"scored by the RRC server; use the val split)")
        answers = _answer_list(entry, "answers", annotation_file, i, what)
        if qid in seen:
            raise EvalInputError(f"{what} {annotation_file} records {seen[qid]} and {i}: duplicate questionId {qid!r}")
        seen[qid] = i
        questions.append({"question_id": qid, "image": image, "text": question + SHORT_ANSWER})
        ground_truth.append(answers)
    split = entries[0].get("data_split", "val") if isinstance(entries[0], dict) else "val"
    return Benchmark(name, "short-answer", str(split), "ANLS (threshold 0.5)", "ANLS x100", questions, image_folder,
                     {"annotation_file": os.path.abspath(annotation_file)}, max_new_tokens,
                     _anls_score(ground_truth), ground_truth)


def load_docvqa(data_dir: str, annotation_file: Optional[str] = None, image_folder: Optional[str] = None,
                **_) -> Benchmark:
    if annotation_file is None:
        candidates = [os.path.join(data_dir, n) for n in ("val_v1.0_withQT.json", "val_v1.0.json")]
        annotation_file = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    # Image paths in the file are relative to its folder ("documents/xxx.png").
    image_folder = image_folder or os.path.dirname(os.path.abspath(annotation_file))
    return _load_docvqa_like("docvqa", data_dir, annotation_file, image_folder, "image", 32)


def load_infovqa(data_dir: str, annotation_file: Optional[str] = None, image_folder: Optional[str] = None,
                 **_) -> Benchmark:
    annotation_file = annotation_file or os.path.join(data_dir, "infographicsVQA_val_v1.0_withQT.json")
    image_folder = image_folder or os.path.join(data_dir, "infographicsvqa_images")
    return _load_docvqa_like("infovqa", data_dir, annotation_file, image_folder, "image_local_name", 32)


CHARTQA_SPLITS = {"human": "test_human.json", "augmented": "test_augmented.json"}


def load_chartqa(data_dir: str, split: str = "test", image_folder: Optional[str] = None, **_) -> Benchmark:
    if split not in ("test", *CHARTQA_SPLITS):
        raise EvalInputError(f"--split {split!r} for chartqa: expected test (both), human or augmented")
    image_folder = image_folder or os.path.join(data_dir, "png")
    parts = list(CHARTQA_SPLITS) if split == "test" else [split]
    questions, ground_truth, part_of, sources = [], [], [], {}
    for part in parts:
        path = os.path.join(data_dir, CHARTQA_SPLITS[part])
        what = f"ChartQA {part} file"
        entries = _entries(_load_json(path, what), path, what, "list")
        for i, entry in enumerate(entries):
            image = _field(entry, "imgname", str, path, i, what)
            query = _field(entry, "query", str, path, i, what)
            label = _field(entry, "label", (str, int, float), path, i, what)
            # ChartQA has no question ids: the split and the position in its file are the id.
            questions.append({"question_id": f"{part}_{i}", "image": image, "text": query + SHORT_ANSWER})
            ground_truth.append(str(label))
            part_of.append(part)
        sources[f"{part}_file"] = os.path.abspath(path)

    def score(predictions: Predictions):
        per = [0.0 if p is None else float(scorers.relaxed_correctness(p, gt))
               for p, gt in zip(predictions, ground_truth)]
        details = {}
        for part in parts:
            values = [s for s, q in zip(per, part_of) if q == part]
            details[part] = 100.0 * (sum(values) / len(values))
        return 100.0 * (sum(per) / len(per)), details, per

    return Benchmark("chartqa", "short-answer", split, "relaxed accuracy (5% numeric tolerance)", "%", questions,
                     image_folder, sources, 16, score, ground_truth)


def load_ocrbench(data_dir: str, annotation_file: Optional[str] = None, image_folder: Optional[str] = None,
                  **_) -> Benchmark:
    annotation_file = annotation_file or os.path.join(data_dir, "OCRBench.json")
    image_folder = image_folder or os.path.join(data_dir, "OCRBench_Images")
    what = "OCRBench file"
    entries = _entries(_load_json(annotation_file, what), annotation_file, what, "list")
    questions, ground_truth, categories = [], [], []
    for i, entry in enumerate(entries):
        dataset = _field(entry, "dataset_name", str, annotation_file, i, what)
        image = _field(entry, "image_path", str, annotation_file, i, what)
        question = _field(entry, "question", str, annotation_file, i, what)
        category = _field(entry, "type", str, annotation_file, i, what)
        answers = _field(entry, "answers", (str, list), annotation_file, i, what)
        if isinstance(answers, list) and not (answers and all(isinstance(a, str) for a in answers)):
            raise EvalInputError(f"{what} {annotation_file} record {i}: 'answers' should be a string or a non-empty "
                                 f"list of strings, found {answers!r}")
        if category not in scorers.OCRBENCH_CATEGORIES:
            raise EvalInputError(f"{what} {annotation_file} record {i}: unknown type {category!r}; expected one of "
                                 f"{list(scorers.OCRBENCH_CATEGORIES)}")
        # OCRBench's own "id" repeats across its source datasets: the position in the file is the id.
        questions.append({"question_id": i, "image": image, "text": question})
        ground_truth.append((answers, dataset))
        categories.append(category)

    def score(predictions: Predictions):
        per = [0.0 if p is None else float(scorers.ocrbench_hit(p, answers, dataset))
               for p, (answers, dataset) in zip(predictions, ground_truth)]
        totals = scorers.ocrbench_totals(categories, per)
        return float(totals["final_score"]), totals, per

    unit = "points / 1000" if len(questions) == 1000 else f"points / {len(questions)}"
    return Benchmark("ocrbench", "question-only", "test", "OCRBench substring match", unit, questions, image_folder,
                     {"annotation_file": os.path.abspath(annotation_file)}, 128, score, ground_truth)


LOADERS = {"textvqa": load_textvqa, "docvqa": load_docvqa, "infovqa": load_infovqa, "chartqa": load_chartqa,
           "ocrbench": load_ocrbench}


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
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


def _write_atomic(path: str, text: str) -> None:
    """Shard processes write the same files at the same time: each through its own temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_questions(questions: Sequence[dict], path: str) -> None:
    _write_atomic(path, "".join(json.dumps({"question_id": q["question_id"], "image": q["image"], "text": q["text"]})
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
    _write_atomic(path, json.dumps(settings, indent=1))


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
        from .answer import check_images, default_device, generate_answers

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


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
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


if __name__ == "__main__":
    main()
