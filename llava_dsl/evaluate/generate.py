"""Answer generation for LLaVA-format question files, on any device, resumable and shardable.

    python -m llava_dsl.evaluate.generate --model-path CKPT --question-file Q.jsonl --image-folder DIR \
        --answers-file A.jsonl [--device cpu|cuda|cuda:N] [--dtype auto|float16|bfloat16|float32] \
        [--conv-mode vicuna_v1] [--temperature 0] [--max_new_tokens 128] [--num-chunks N --chunk-idx K]
    python -m llava_dsl.evaluate.generate merge --question-file Q.jsonl --output A.jsonl SHARD.jsonl [SHARD.jsonl ...]

The same flags, prompt construction, preprocessing and output lines as LLaVA's
``llava.eval.model_vqa_loader`` (question lines ``{"question_id", "image", "text"}``; answer lines
``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``), so answers files work with
LLaVA's own scorers. Differences, each on purpose:
- the device and dtype are flags (LLaVA hard-codes ``cuda`` and fp16); greedy decoding is the default;
- a question already in the answers file is skipped, and every answer is flushed as it is written, so an
  interrupted run continues where it stopped and ends with the same file;
- ``answer_id`` is derived from the question and the answer (LLaVA draws a random one), so reruns are
  byte-identical;
- the plugin is registered first, so multi-layer / Detached Skip-Links checkpoints load.

A question is identified by ``(question_id, text, n)``, n counting earlier lines with the same id and text:
LLaVA's TextVQA file reuses the image id as ``question_id`` for every question on an image.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from llava_dsl.checkpointing.atomic import atomic_write_text

Key = Tuple[str, str, int]


class EvalInputError(ValueError):
    """A question, annotation or answers file that cannot be used as it is; the message names file and line."""


def read_jsonl(path: str, what: str) -> List[Tuple[int, dict]]:
    """``[(line_number, object)]`` of a JSON-lines file; blank lines are ignored, anything else must parse."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{what} {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as error:
                raise EvalInputError(f"{what} {path} line {number}: not valid JSON ({error}): {line[:120]!r}") from None
            if not isinstance(obj, dict):
                raise EvalInputError(f"{what} {path} line {number}: expected a JSON object, found {type(obj).__name__}")
            rows.append((number, obj))
    return rows


def _require(obj: dict, field: str, types, path: str, number: int, what: str):
    if field not in obj:
        raise EvalInputError(f"{what} {path} line {number}: missing field {field!r} (fields: {sorted(obj)})")
    if not isinstance(obj[field], types) or isinstance(obj[field], bool):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise EvalInputError(f"{what} {path} line {number}: field {field!r} should be {expected}, "
                             f"found {type(obj[field]).__name__} {obj[field]!r}")
    return obj[field]


def read_questions(path: str) -> List[dict]:
    """LLaVA question lines ``{"question_id": str|int, "image": str, "text": str, ...}``, each with ``_line``."""
    questions = []
    for number, obj in read_jsonl(path, "question file"):
        for field, types in (("question_id", (str, int)), ("image", str), ("text", str)):
            _require(obj, field, types, path, number, "question file")
        questions.append({**obj, "_line": number})
    if not questions:
        raise EvalInputError(f"question file {path}: no questions")
    return questions


def keys_of(records: Sequence[dict], text_field: str) -> List[Key]:
    """The identity of each record: (question_id, text, how many earlier records had both)."""
    seen: Dict[Tuple[str, str], int] = {}
    keys = []
    for record in records:
        base = (str(record["question_id"]), record[text_field])
        keys.append(base + (seen.get(base, 0),))
        seen[base] = seen.get(base, 0) + 1
    return keys


def read_answers(path: str, repair_torn_tail: bool = False) -> List[dict]:
    """Answer lines ``{"question_id", "prompt", "text", ...}``, each with ``_line``.

    ``repair_torn_tail``: a run killed while writing leaves a last line without its newline that does not
    parse; with this flag that line is cut off (and reported) instead of being an error.
    """
    if not os.path.isfile(path):
        raise EvalInputError(f"answers file {path}: no such file")
    if repair_torn_tail:
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            last_start = data.rfind(b"\n") + 1
            try:
                json.loads(data[last_start:].decode("utf-8"))
                complete = True
            except ValueError:
                complete = False
            with open(path, "r+b") as f:
                if complete:  # a whole record that only lacks its newline
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    print(f"llava_dsl.evaluate.generate: {path}: dropping an incomplete last line left by an interrupted run "
                          f"({len(data) - last_start} bytes); that question is answered again", flush=True)
                    f.truncate(last_start)
    answers = []
    for number, obj in read_jsonl(path, "answers file"):
        for field, types in (("question_id", (str, int)), ("prompt", str), ("text", str)):
            _require(obj, field, types, path, number, "answers file")
        answers.append({**obj, "_line": number})
    return answers


def match_answers(questions: Sequence[dict], answers: Sequence[dict], question_file: str,
                  answers_file: str) -> List[Optional[dict]]:
    """The answer to each question (None where there is none). An answer to no question, or more answers
    than a question is asked, is an error naming the answers file and line."""
    return assign_answers(questions, [(answers_file, answers)], question_file)


def assign_answers(questions: Sequence[dict], sources: Sequence[Tuple[str, Sequence[dict]]],
                   question_file: str) -> List[Optional[dict]]:
    """Give each answer (from one or several files) to its question. A question asked several times with
    the same id and text takes the answers in order, whichever file they come from."""
    index = {key: i for i, key in enumerate(keys_of(questions, "text"))}
    owner: List[Optional[dict]] = [None] * len(questions)
    for answers_file, answers in sources:
        for answer in answers:
            base = (str(answer["question_id"]), answer["prompt"])
            occurrence = 0
            while base + (occurrence,) in index and owner[index[base + (occurrence,)]] is not None:
                occurrence += 1
            if base + (occurrence,) in index:
                owner[index[base + (occurrence,)]] = answer
                continue
            if occurrence > 0:
                raise EvalInputError(
                    f"answers file {answers_file} line {answer['_line']}: question_id {answer['question_id']!r} "
                    f"with prompt {answer['prompt'][:80]!r} is answered more often than {question_file} asks it "
                    f"(a duplicated line, or a shard merged twice?)")
            raise EvalInputError(
                f"answers file {answers_file} line {answer['_line']}: question_id {answer['question_id']!r} with "
                f"prompt {answer['prompt'][:80]!r} is not a question of {question_file} (answers written for "
                f"another question file, protocol or chunk?)")
    return owner


def chunk_bounds(n: int, num_chunks: int, chunk_idx: int) -> Tuple[int, int]:
    """[start, end) of chunk ``chunk_idx``: LLaVA's split_list (chunks of ceil(n / num_chunks))."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise EvalInputError(f"--chunk-idx {chunk_idx} with --num-chunks {num_chunks}: expected 0 <= chunk-idx < num-chunks")
    size = math.ceil(n / num_chunks)
    return min(n, chunk_idx * size), min(n, (chunk_idx + 1) * size)


def merge_answers(question_file: str, shard_files: Sequence[str], output: str) -> Dict[str, int]:
    """Write the answers of all shards to ``output`` in question order, after checking that every answer
    belongs to a question and none is answered twice. Returns counts (questions, answered, unanswered)."""
    questions = read_questions(question_file)
    owner = assign_answers(questions, [(shard, read_answers(shard)) for shard in shard_files], question_file)
    atomic_write_text(output, "".join(json.dumps(_public(a)) + "\n" for a in owner if a is not None))
    answered = sum(a is not None for a in owner)
    return {"questions": len(questions), "answered": answered, "unanswered": len(questions) - answered}


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def missing_images(questions: Sequence[dict], image_folder: str) -> List[str]:
    """One line per question whose image file does not exist."""
    return [f"line {q['_line']} (question_id {q['question_id']!r}): {os.path.join(image_folder, q['image'])}"
            for q in questions if not os.path.isfile(os.path.join(image_folder, q["image"]))]


def check_images(questions: Sequence[dict], image_folder: str, question_file: str) -> None:
    missing = missing_images(questions, image_folder)
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvalInputError(f"{len(missing)} of {len(questions)} images of {question_file} are missing under "
                             f"--image-folder {image_folder}:\n  {shown}{more}")


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtypes = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise EvalInputError(f"--dtype {name!r}: expected auto, float16, bfloat16 or float32")
    if dtypes[name] is torch.float16 and not device.startswith("cuda"):
        raise EvalInputError(f"--dtype float16 on --device {device}: half precision generation needs a GPU; "
                             f"use --dtype float32 or bfloat16")
    return dtypes[name]


def load_model(model_path: str, model_base: Optional[str], device: str, dtype_name: str):
    """LLaVA's loader with the plugin registered, on ``device``, cast to ``dtype``.

    LLaVA's loader always materialises the weights in fp16; the cast follows.
    """
    import torch

    import llava_dsl

    llava_dsl.register()
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalInputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    dtype = resolve_dtype(dtype_name, device)
    model_path = os.path.expanduser(model_path)
    model_name = get_model_name_from_path(model_path)
    if "llava" not in model_name.lower():
        raise EvalInputError(f"--model-path {model_path}: LLaVA's loader treats a checkpoint as multimodal only when "
                             f"its folder name contains 'llava' (found {model_name!r}); rename the folder")
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, model_base, model_name, device_map=device, device=device)
    model = model.to(dtype=dtype).eval()
    return tokenizer, model, image_processor, model_name, dtype


def answer_id(model_id: str, key: Key, text: str) -> str:
    return hashlib.sha1(json.dumps([model_id, list(key), text]).encode("utf-8")).hexdigest()[:22]


def generate_answers(args, loaded=None) -> Dict[str, int]:
    """Answer the questions of chunk ``args.chunk_idx`` not yet in ``args.answers_file``; returns counts.

    ``loaded``: what ``load_model`` returned, to answer with a model already in memory (e.g. with a probe's hook)."""
    questions = read_questions(os.path.expanduser(args.question_file))
    keys = keys_of(questions, "text")
    start, end = chunk_bounds(len(questions), args.num_chunks, args.chunk_idx)
    chunk = list(range(start, end))
    answers_file = os.path.expanduser(args.answers_file)
    done = set()
    if os.path.exists(answers_file):
        existing = read_answers(answers_file, repair_torn_tail=True)
        matched = match_answers([questions[i] for i in chunk], existing, args.question_file, answers_file)
        done = {chunk[j] for j, a in enumerate(matched) if a is not None}
    todo = [i for i in chunk if i not in done]
    counts = {"questions": len(chunk), "already_answered": len(done), "answered_now": 0}
    print(f"llava_dsl.evaluate.generate: chunk {args.chunk_idx + 1}/{args.num_chunks}: {len(chunk)} questions, "
          f"{len(done)} already in {answers_file}, {len(todo)} to answer", flush=True)
    if not todo:
        return counts
    check_images([questions[i] for i in todo], args.image_folder, args.question_file)

    import torch
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    tokenizer, model, image_processor, model_name, dtype = loaded or load_model(
        args.model_path, args.model_base, args.device, args.dtype)
    conv_mode = args.conv_mode
    if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in conv_mode:
        conv_mode = conv_mode + "_mmtag"  # as model_vqa_loader does for stage-1 checkpoints
        print(f"llava_dsl.evaluate.generate: {model_name} looks like a plain (stage-1) model; using --conv-mode {conv_mode}")
    if conv_mode not in conv_templates:
        raise EvalInputError(f"--conv-mode {conv_mode!r}: not one of LLaVA's templates {sorted(conv_templates)}")

    sampling = args.temperature > 0
    generation = {"do_sample": sampling, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                  "use_cache": True}
    if sampling:
        generation.update(temperature=args.temperature, top_p=args.top_p)
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    with open(answers_file, "a", encoding="utf-8") as out:
        for n, i in enumerate(todo, start=1):
            line = questions[i]
            qs = line["text"]
            image_prefix = (DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
                            if getattr(model.config, "mm_use_im_start_end", False) else DEFAULT_IMAGE_TOKEN)
            conv = conv_templates[conv_mode].copy()
            conv.append_message(conv.roles[0], image_prefix + "\n" + qs)
            conv.append_message(conv.roles[1], None)
            image = Image.open(os.path.join(args.image_folder, line["image"])).convert("RGB")
            pixels = process_images([image], image_processor, model.config)
            input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
            with torch.inference_mode():
                output_ids = model.generate(
                    input_ids.unsqueeze(0).to(model.device),
                    images=pixels.to(device=model.device, dtype=dtype),
                    image_sizes=[image.size], **generation)
            text = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
            record = {"question_id": line["question_id"], "prompt": qs, "text": text,
                      "answer_id": answer_id(model_name, keys[i], text), "model_id": model_name, "metadata": {}}
            out.write(json.dumps(record) + "\n")
            out.flush()  # one answer lost at most when the run is killed
            counts["answered_now"] += 1
            if n % 50 == 0 or n == len(todo):
                print(f"llava_dsl.evaluate.generate: {n}/{len(todo)} answered", flush=True)
    return counts


def add_generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 128,
                         model_path_required: bool = True) -> None:
    """Flags shared with LLaVA's model_vqa_loader, plus device and dtype."""
    parser.add_argument("--model-path", required=model_path_required)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32")


def default_device(device: Optional[str]) -> str:
    if device:
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "merge":
            parser = argparse.ArgumentParser(prog="python -m llava_dsl.evaluate.generate merge",
                                             description="Merge shard answers files in question order.")
            parser.add_argument("--question-file", required=True)
            parser.add_argument("--output", required=True)
            parser.add_argument("shards", nargs="+")
            args = parser.parse_args(argv[1:])
            counts = merge_answers(args.question_file, args.shards, args.output)
            print(f"llava_dsl.evaluate.generate merge: {counts['answered']}/{counts['questions']} questions answered "
                  f"({counts['unanswered']} unanswered) -> {args.output}")
            return
        parser = argparse.ArgumentParser(prog="python -m llava_dsl.evaluate.generate", description=__doc__.split("\n\n")[0])
        add_generation_flags(parser)
        parser.add_argument("--question-file", required=True)
        parser.add_argument("--image-folder", required=True)
        parser.add_argument("--answers-file", required=True)
        args = parser.parse_args(argv)
        args.device = default_device(args.device)
        generate_answers(args)
    except EvalInputError as error:
        raise SystemExit(f"llava_dsl.evaluate.generate: {error}") from None


if __name__ == "__main__":
    main()
