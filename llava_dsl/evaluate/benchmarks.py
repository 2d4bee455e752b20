"""The benchmarks' own files: a loader per benchmark (name -> loader in ``LOADERS``) that reads questions and
ground truth and returns a ``Benchmark`` with its scorer."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from llava_dsl.evaluate.generate import EvalInputError, read_questions
from llava_dsl.evaluate.scorers import (OCRBENCH_CATEGORIES, anls, ocrbench_hit, ocrbench_totals, relaxed_correctness,
                                        vqa_soft_accuracy)

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


def _mean_score(metric, ground_truth: List[List[str]]) -> ScoreFn:
    """x100 the mean over questions of ``metric(prediction, answers)``; an unanswered question scores 0."""
    def score(predictions: Predictions):
        per = [0.0 if p is None else metric(p, gt) for p, gt in zip(predictions, ground_truth)]
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
                     image_folder, sources, 128, _mean_score(vqa_soft_accuracy, ground_truth), ground_truth)


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
                     _mean_score(anls, ground_truth), ground_truth)


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
        per = [0.0 if p is None else float(relaxed_correctness(p, gt))
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
        if category not in OCRBENCH_CATEGORIES:
            raise EvalInputError(f"{what} {annotation_file} record {i}: unknown type {category!r}; expected one of "
                                 f"{list(OCRBENCH_CATEGORIES)}")
        # OCRBench's own "id" repeats across its source datasets: the position in the file is the id.
        questions.append({"question_id": i, "image": image, "text": question})
        ground_truth.append((answers, dataset))
        categories.append(category)

    def score(predictions: Predictions):
        per = [0.0 if p is None else float(ocrbench_hit(p, answers, dataset))
               for p, (answers, dataset) in zip(predictions, ground_truth)]
        totals = ocrbench_totals(categories, per)
        return float(totals["final_score"]), totals, per

    unit = "points / 1000" if len(questions) == 1000 else f"points / {len(questions)}"
    return Benchmark("ocrbench", "question-only", "test", "OCRBench substring match", unit, questions, image_folder,
                     {"annotation_file": os.path.abspath(annotation_file)}, 128, score, ground_truth)

LOADERS = {"textvqa": load_textvqa, "docvqa": load_docvqa, "infovqa": load_infovqa, "chartqa": load_chartqa,
           "ocrbench": load_ocrbench}
