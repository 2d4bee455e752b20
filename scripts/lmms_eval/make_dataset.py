"""Turn a benchmark's own files into the local folder an lmms-eval task in scripts/lmms_eval/tasks/ reads.

    python scripts/lmms_eval/make_dataset.py textvqa  --data-dir playground/data/eval/textvqa  --out playground/data/lmms_eval/textvqa
    python scripts/lmms_eval/make_dataset.py ocrbench --data-dir playground/data/eval/ocrbench --out playground/data/lmms_eval/ocrbench
    (docvqa, infovqa, chartqa alike)

The questions, their order and the ground truth come from ``llava_dsl.evaluate``'s own loaders
(``llava_dsl.evaluate.benchmarks.LOADERS``, the files and layout of eval_scripts/README.md), so lmms-eval and
``python -m llava_dsl.evaluate`` see the same question set. The output is a ``datasets.DatasetDict`` written with
``save_to_disk`` (images embedded as bytes), with the split name and the columns of the hub data set that
lmms-eval's own task reads; the task YAMLs load it with ``dataset_kwargs: {load_from_disk: true}``. Nothing is
downloaded. Runs in .venv-lmms (``make venv-lmms``) with this checkout on PYTHONPATH.

TextVQA is written in lmms-eval's protocol (the plain question; lmms-eval adds the short-answer suffix itself),
i.e. ``llava_dsl.evaluate textvqa --protocol plain``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from llava_dsl.evaluate.benchmarks import LOADERS, SHORT_ANSWER
from llava_dsl.evaluate.generate import EvalInputError

# benchmark -> (split name lmms-eval's task reads, task name in scripts/lmms_eval/tasks)
SPLITS = {"textvqa": ("validation", "textvqa_val_local"), "ocrbench": ("test", "ocrbench_local"),
          "docvqa": ("validation", "docvqa_val_local"), "infovqa": ("validation", "infovqa_val_local"),
          "chartqa": ("test", "chartqa_local")}


def _strip_suffix(text: str) -> str:
    return text.removesuffix(SHORT_ANSWER)


def _image(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        return {"bytes": f.read(), "path": os.path.basename(name)}


def rows(benchmark: str, data_dir: str, **loader_args) -> Iterator[dict[str, object]]:
    """The lmms-eval rows of one benchmark, in the order ``llava_dsl.evaluate`` asks the questions."""
    if benchmark == "textvqa":
        loader_args["protocol"] = "plain"
    bench = LOADERS[benchmark](data_dir, **loader_args)
    if benchmark == "ocrbench":
        # The loader keeps the categories inside its scorer: read them from the same (already validated) file.
        with open(bench.sources["annotation_file"], encoding="utf-8") as f:
            entries = json.load(f)
    for i, (q, gt) in enumerate(zip(bench.questions, bench.ground_truth)):
        image = _image(bench.image_folder, q["image"])
        if benchmark == "textvqa":
            yield {"question_id": str(q["question_id"]), "image_id": str(q["question_id"]),
                   "question": _strip_suffix(q["text"]), "answers": list(gt), "ocr_tokens": [], "image": image}
        elif benchmark == "ocrbench":
            answers, dataset = gt
            yield {"question": q["text"], "answer": [answers] if isinstance(answers, str) else list(answers),
                   "dataset": dataset, "question_type": entries[i]["type"], "image": image}
        elif benchmark in ("docvqa", "infovqa"):
            yield {"questionId": str(q["question_id"]), "question": _strip_suffix(q["text"]), "answers": list(gt),
                   "image": image}
        elif benchmark == "chartqa":
            part = str(q["question_id"]).split("_", 1)[0]
            yield {"question_id": str(q["question_id"]), "type": f"{part}_test", "question": _strip_suffix(q["text"]),
                   "answer": str(gt), "image": image}
        else:
            raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(SPLITS)}")


def features(benchmark: str):
    from datasets import Features, Image, Sequence, Value

    text = Value("string")
    columns = {
        "textvqa": {"question_id": text, "image_id": text, "question": text, "answers": Sequence(text),
                    "ocr_tokens": Sequence(text)},
        "ocrbench": {"question": text, "answer": Sequence(text), "dataset": text, "question_type": text},
        "docvqa": {"questionId": text, "question": text, "answers": Sequence(text)},
        "infovqa": {"questionId": text, "question": text, "answers": Sequence(text)},
        "chartqa": {"question_id": text, "type": text, "question": text, "answer": text},
    }[benchmark]
    return Features({**columns, "image": Image()})


def make_dataset(benchmark: str, data_dir: str, out_dir: str, **loader_args) -> str:
    """Write ``out_dir`` (a DatasetDict with the task's split); returns it."""
    from datasets import Dataset, DatasetDict

    if benchmark not in SPLITS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(SPLITS)}")
    records: list[dict] = list(rows(benchmark, data_dir, **loader_args))
    columns = {name: [r[name] for r in records] for name in features(benchmark)}
    dataset = Dataset.from_dict(columns, features=features(benchmark))
    DatasetDict({SPLITS[benchmark][0]: dataset}).save_to_disk(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(SPLITS))
    parser.add_argument("--data-dir", required=True, help="the benchmark's own files (as for llava_dsl.evaluate)")
    parser.add_argument("--out", required=True, help="output folder (the task YAML's dataset_path)")
    parser.add_argument("--split", default=None, help="chartqa: test (both parts, default), human or augmented")
    args = parser.parse_args(argv)
    extra = {"split": args.split} if args.split else {}
    try:
        out = make_dataset(args.benchmark, args.data_dir, args.out, **extra)
    except (EvalInputError, OSError) as error:  # a missing or malformed benchmark file: one line, no traceback
        raise SystemExit(f"make_dataset.py {args.benchmark}: {error}") from None
    print(f"{args.benchmark}: wrote {out} (lmms-eval task {SPLITS[args.benchmark][1]}, split "
          f"{SPLITS[args.benchmark][0]})")


if __name__ == "__main__":
    main()
