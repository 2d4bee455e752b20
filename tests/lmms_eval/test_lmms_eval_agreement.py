"""lmms-eval's real CLI scores a tiny Detached Skip-Links Llava checkpoint on the local task files of
scripts/lmms_eval/tasks, and its numbers equal ``llava_dsl.evaluate``'s scorers on the same answers.

The checkpoint is a stock ``LlavaForConditionalGeneration`` with multi-layer features and
``apply_detached_skip_links`` (saved with ``dsl_detach_layers`` in its config), loaded by lmms-eval's ``llava_hf``
model in a process that never imports ``llava_dsl``. The data: rendered images in the benchmarks' own file
formats (``llava_dsl.assets.ocr_data`` for TextVQA and OCRBench; DocVQA's, InfographicVQA's and ChartQA's files on
the same images), turned into lmms-eval's local folders by scripts/lmms_eval/make_dataset.py.

A random model never reads, so ground truth written before generation would score 0 everywhere and any two
metrics would agree. The test therefore answers every question once in-process first, with lmms-eval's own
prompt construction, and writes ground truth built from those answers: per question a different number of
matching answers, in spellings only the benchmark's normalisation equates (case, articles, number words,
punctuation, near misses for ANLS, HME100k's case-sensitive rule). lmms-eval's logged answers must then equal
the in-process ones (same image, same prompt), and every per-sample score and aggregate lmms-eval reports must
equal the project's scorer on those logged answers.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TASKS_DIR = os.path.join(ROOT, "scripts", "lmms_eval", "tasks")
sys.path.insert(0, os.path.join(ROOT, "scripts", "lmms_eval"))

import make_dataset

MAX_NEW_TOKENS = 6
N = 10  # questions per benchmark
SHORT = "\nAnswer the question using a single word or phrase."
# benchmark -> (task, how lmms-eval's task turns a row into the text after "<image>\n")
TASKS = {"textvqa": "textvqa_val_local", "ocrbench": "ocrbench_local", "docvqa": "docvqa_val_local",
         "infovqa": "infovqa_val_local", "chartqa": "chartqa_local"}
TAG = "ocr_local"  # the tag all five task files carry


def _doc_to_text(bench: str, row: dict) -> str:
    from lmms_eval.tasks.chartqa.utils import chartqa_doc_to_text
    from lmms_eval.tasks.docvqa.utils import docvqa_doc_to_text
    from lmms_eval.tasks.infovqa.utils import infovqa_doc_to_text
    from lmms_eval.tasks.ocrbench.utils import ocrbench_doc_to_text
    from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text

    if bench == "textvqa":
        return textvqa_doc_to_text(row, {"pre_prompt": "", "post_prompt": SHORT, "ocr": False})
    if bench == "ocrbench":
        return ocrbench_doc_to_text(row, {"pre_prompt": "", "post_prompt": ""})
    if bench == "docvqa":
        return docvqa_doc_to_text(row, {"pre_prompt": "", "post_prompt": SHORT})
    if bench == "infovqa":
        return infovqa_doc_to_text(row, {"pre_prompt": "", "post_prompt": SHORT})
    return chartqa_doc_to_text(row, {"pre_prompt": "", "post_prompt": "\nAnswer the question with a single word."})


def _save_checkpoint(out_dir: str) -> None:
    from llava_dsl.hf import apply_detached_skip_links
    from llava_dsl.hf.tiny import tiny_llava, tiny_processor

    model = tiny_llava(vision_feature_layer=(4, 3, 1), seed=0)
    apply_detached_skip_links(model, detach_layers=[1])
    model.save_pretrained(out_dir)
    tiny_processor(model).save_pretrained(out_dir)


class Answerer:
    """Greedy answers the way lmms-eval 0.7.3's ``llava_hf`` builds them: the chat variant
    (lmms_eval/models/chat/llava_hf.py, what ``--model llava_hf`` resolves to) puts the task's default user turn
    (image, then ``doc_to_text``) through the processor's own chat template."""

    def __init__(self, checkpoint: str):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def prompt(self, image, context: str) -> str:
        from lmms_eval.protocol import ChatMessages

        turn = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": context}]}]
        messages = ChatMessages(messages=turn).model_dump()["messages"]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, image, context: str) -> str:
        image = image.convert("RGB")
        inputs = self.processor(images=[image], text=self.prompt(image, context), return_tensors="pt")
        eos = self.tokenizer.eos_token_id
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                      pad_token_id=eos, eos_token_id=eos)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)[0]


def _answer_all(answerer: Answerer, bench: str, data_dir: str):
    import io

    from PIL import Image

    answers = []
    for row in make_dataset.rows(bench, data_dir):
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        answers.append(answerer(image, _doc_to_text(bench, row)))
    return answers


# Ground truth built from the model's own answers --------------------------------------------------------------

def _words(pred: str):
    return pred.split() or ["zzz"]


def _textvqa_answers(i: int, pred: str):
    """10 human answers, ``k`` of them the prediction in a spelling EvalAI's normalisation maps onto it."""
    k = (0, 1, 2, 3, 4, 10, 3, 5, 1, 9)[i % 10]
    variants = [pred.upper(), f"The {pred}.", pred + "!", f"a {pred}", pred.replace("three", "3"), pred]
    return [variants[j % len(variants)] for j in range(k)] + [f"zz{i}{j}" for j in range(10 - k)]


def _write_textvqa_gt(data_dir: str, preds):
    path = os.path.join(data_dir, "TextVQA_0.5.1_val.json")
    with open(path) as f:
        annotations = json.load(f)
    for i, (entry, pred) in enumerate(zip(annotations["data"], preds)):
        entry["answers"] = _textvqa_answers(i, pred)
    with open(path, "w") as f:
        json.dump(annotations, f)


def _write_ocrbench_gt(data_dir: str, preds):
    path = os.path.join(data_dir, "OCRBench.json")
    with open(path) as f:
        rows = json.load(f)
    for i, (row, pred) in enumerate(zip(rows, preds)):
        words = _words(pred)
        kind = i % 5
        if kind == 0:    # hit, other case
            row["answers"] = [words[0].upper()]
        elif kind == 1:  # miss
            row["answers"] = [f"zz{i}"]
        elif kind == 2:  # list: one hit among misses, as a plain string answer on odd rows
            row["answers"] = [f"zz{i}", " ".join(words[-2:])] if i % 2 == 0 else " ".join(words[-2:])
        elif kind == 3:  # HME100k: spaces dropped, case kept -> the upper-cased text misses, the spaced-out hits
            row.update(dataset_name="HME100k", type="Handwritten Mathematical Expression Recognition")
            row["answers"] = [pred.upper()] if i % 2 == 0 else [" ".join(pred.replace(" ", ""))]
        else:            # newline inside the answer (made a space by the rule)
            row["answers"] = ["\n".join(words[:2])]
    with open(path, "w") as f:
        json.dump(rows, f)


def _docvqa_answers(i: int, pred: str):
    kind = i % 5
    if kind == 0:
        return [pred.upper()]                             # 1.0
    if kind == 1:
        return [pred[:-1] + "#", "zz"]                    # one edit: 1 - 1/len
    if kind == 2:
        return [pred + " zz zz"]                          # similarity may fall under 0.5 -> 0
    if kind == 3:
        return [f"  {pred[: max(1, len(pred) // 2)]}  "]  # half the text
    return [f"zz{i}"]


# the benchmark's own layout: annotation file, image folder, the image field
DOC_LAYOUT = {"docvqa": ("val_v1.0_withQT.json", "documents", "image"),
              "infovqa": ("infographicsVQA_val_v1.0_withQT.json", "infographicsvqa_images", "image_local_name")}


def _write_docvqa(bench: str, data_dir: str, image_dir: str, preds=None):
    """DocVQA / InfographicVQA val in their own layout, on the rendered TextVQA images."""
    annotation, folder, field = DOC_LAYOUT[bench]
    os.makedirs(os.path.join(data_dir, folder), exist_ok=True)
    data = []
    for i, name in enumerate(sorted(os.listdir(image_dir))[:N]):
        shutil.copy(os.path.join(image_dir, name), os.path.join(data_dir, folder, name))
        answers = _docvqa_answers(i, preds[i]) if preds else ["zz"]
        questions = (("what is written here?", "what number is this?") if bench == "docvqa" else
                     ("read the text in this image.", "what is the number there?"))
        data.append({"questionId": 1000 + i, "question": questions[i % 2],
                     field: f"documents/{name}" if bench == "docvqa" else name, "answers": answers,
                     "data_split": "val"})
    with open(os.path.join(data_dir, annotation), "w") as f:
        json.dump({"dataset_name": bench, "dataset_split": "val", "data": data}, f)


def _write_chartqa(data_dir: str, image_dir: str, preds=None):
    """ChartQA test's own layout: test_human.json, test_augmented.json, png/."""
    os.makedirs(os.path.join(data_dir, "png"), exist_ok=True)
    names = sorted(os.listdir(image_dir))[:N]
    for name in names:
        shutil.copy(os.path.join(image_dir, name), os.path.join(data_dir, "png", name))
    half = N // 2
    for part, chunk, offset in (("human", names[:half], 0), ("augmented", names[half:], half)):
        rows = []
        for j, name in enumerate(chunk):
            i = offset + j
            label = "zz"
            if preds:  # hit in another case on every third question, else a miss
                label = preds[i].upper() if i % 3 == 0 else f"zz{i}"
            rows.append({"imgname": name, "query": "what is the value of the red bar?", "label": label})
        with open(os.path.join(data_dir, f"test_{part}.json"), "w") as f:
            json.dump(rows, f)


# lmms-eval's outputs ----------------------------------------------------------------------------------------------

def _logged(out_dir: str, task: str):
    paths = glob.glob(os.path.join(out_dir, "*", f"*_samples_{task}.jsonl"))
    assert len(paths) == 1, f"{task}: expected one samples file under {out_dir}, found {paths}"
    with open(paths[0]) as f:
        samples = sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(N)), f"{task}: logged doc ids {[s['doc_id'] for s in samples]}"
    responses = []
    for s in samples:
        resp = s["filtered_resps"]
        responses.append(resp[0] if isinstance(resp, list) else resp)
    return samples, responses


def _results(out_dir: str):
    paths = glob.glob(os.path.join(out_dir, "*", "*_results.json"))
    assert len(paths) == 1, f"expected one results file under {out_dir}, found {paths}"
    with open(paths[0]) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from llava_dsl.assets.ocr_data import OcrDataConfig, write_ocrbench, write_textvqa

    work = tmp_path_factory.mktemp("lmms")
    checkpoint = str(work / "tiny-llava-dsl-hf")
    _save_checkpoint(checkpoint)

    raw = work / "eval"
    dirs = {bench: str(raw / bench) for bench in TASKS}
    cfg = OcrDataConfig(seed=3, image_size=32, num_textvqa=N, num_ocrbench=N)
    write_textvqa(dirs["textvqa"], cfg)
    write_ocrbench(dirs["ocrbench"], cfg)
    images = os.path.join(dirs["textvqa"], "train_images")
    _write_docvqa("docvqa", dirs["docvqa"], images)
    _write_docvqa("infovqa", dirs["infovqa"], images)
    _write_chartqa(dirs["chartqa"], images)

    # Pass 1: the model's answers, in-process; then ground truth built from them.
    answerer = Answerer(checkpoint)
    direct = {bench: _answer_all(answerer, bench, dirs[bench]) for bench in TASKS}
    _write_textvqa_gt(dirs["textvqa"], direct["textvqa"])
    _write_ocrbench_gt(dirs["ocrbench"], direct["ocrbench"])
    _write_docvqa("docvqa", dirs["docvqa"], images, direct["docvqa"])
    _write_docvqa("infovqa", dirs["infovqa"], images, direct["infovqa"])
    _write_chartqa(dirs["chartqa"], images, direct["chartqa"])

    # The local folders the task YAMLs read (dataset_path is relative to the folder lmms-eval runs in).
    for bench in TASKS:
        make_dataset.make_dataset(bench, dirs[bench], str(work / "playground" / "data" / "lmms_eval" / bench))

    # lmms-eval's real CLI, in a process without llava_dsl on its path, offline.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(work / "hf_home"), TOKENIZERS_PARALLELISM="false")
    out_dir = str(work / "lmms_out")
    command = [sys.executable, "-m", "lmms_eval", "--model", "llava_hf",
               "--model_args", f"pretrained={checkpoint},device=cpu,device_map=cpu,dtype=float32",
               "--tasks", TAG, "--include_path", TASKS_DIR, "--batch_size", "1",
               "--gen_kwargs", f"max_new_tokens={MAX_NEW_TOKENS}", "--log_samples", "--output_path", out_dir,
               "--verbosity", "DEBUG"]
    start = time.time()
    proc = subprocess.run(command, cwd=str(work), env=env, capture_output=True, text=True, timeout=900, check=False)
    log = proc.stdout + proc.stderr
    with open(work / "lmms_eval.log", "w") as f:
        f.write(log)
    assert proc.returncode == 0, f"lmms-eval exited {proc.returncode}:\n{log[-6000:]}"
    # lmms-eval 0.7.3 exits 0 when the evaluation itself failed: read its log
    assert "Error during evaluation" not in log, f"lmms-eval failed:\n{log[-6000:]}"
    print(f"lmms-eval CLI: {time.time() - start:.1f} s, log {work / 'lmms_eval.log'}")
    return {"dirs": dirs, "direct": direct, "out": out_dir, "log": log, "answerer": answerer,
            "checkpoint": checkpoint}


def test_checkpoint_is_a_dsl_export_loaded_without_the_plugin(lmms_run):
    with open(os.path.join(lmms_run["checkpoint"], "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_layer"] == [4, 3, 1] and config.get("dsl_detach_layers") == [1], config
    assert "Using single device: cpu" in lmms_run["log"]
    assert "Error" not in "".join(line for line in lmms_run["log"].splitlines() if "in generating" in line), \
        "llava_hf turned a generation error into an empty answer"


def test_lmms_eval_answers_are_the_models_answers_to_image_and_question(lmms_run):
    """lmms-eval generated from the image and the question: its logged answers equal the in-process ones, the
    prompt it logged carries the image token and the question, and answers differ between images."""
    import io

    from PIL import Image

    log = lmms_run["log"]
    for bench, task in TASKS.items():
        samples, responses = _logged(lmms_run["out"], task)
        assert responses == lmms_run["direct"][bench], f"{task}: lmms-eval's answers differ from the model's"
        assert sum(1 for r in responses if r.strip()) == N, f"{task}: empty answers {responses}"
        assert len(set(responses)) >= 3, f"{task}: the answers do not depend on the image: {responses}"
        rows = list(make_dataset.rows(bench, lmms_run["dirs"][bench]))
        for s, row in zip(samples, rows):
            assert s["input"] == _doc_to_text(bench, row)
        # llava_hf logs the chat-formatted prompt of doc 0 at DEBUG level
        image = Image.open(io.BytesIO(rows[0]["image"]["bytes"])).convert("RGB")
        expected = lmms_run["answerer"].prompt(image, _doc_to_text(bench, rows[0]))
        assert expected.index("<image>") < expected.index(_doc_to_text(bench, rows[0])), expected
        assert expected in log, f"{task}: the prompt of doc 0 is not in lmms-eval's log:\n{expected!r}"


def _agree(lmms_value: float, dsl_value: float, what: str):
    assert math.isclose(lmms_value, dsl_value, rel_tol=1e-12, abs_tol=1e-12), \
        f"{what}: lmms-eval {lmms_value!r} != llava_dsl.evaluate {dsl_value!r}"


def test_scores_agree_with_llava_dsl_evaluate(lmms_run):
    from llava_dsl.evaluate.benchmarks import LOADERS

    results = _results(lmms_run["out"])["results"]
    report = {}
    for bench, task in TASKS.items():
        samples, responses = _logged(lmms_run["out"], task)
        loader_args = {"protocol": "plain"} if bench == "textvqa" else {}
        score, details, per = LOADERS[bench](lmms_run["dirs"][bench], **loader_args).score(responses)
        got = results[task]
        if bench == "textvqa":
            lmms_per = [s["exact_match"] for s in samples]
            _agree(got["exact_match,none"] * 100.0, score, task)
        elif bench == "ocrbench":
            lmms_per = [float(s["ocrbench_accuracy"]["score"]) for s in samples]
            assert got["ocrbench_accuracy,none"] == details["final_score"] / 1000, (got, details)
        elif bench in ("docvqa", "infovqa"):
            lmms_per = [s["anls"] if not isinstance(s["anls"], dict) else s["anls"]["anls"] for s in samples]
            _agree(got["anls,none"] * 100.0, score, task)
        else:
            lmms_per = [s["relaxed_overall"] for s in samples]
            _agree(got["relaxed_overall,none"] * 100.0, score, task)
            _agree(got["relaxed_human_split,none"] * 100.0, details["human"], task + " human")
            _agree(got["relaxed_augmented_split,none"] * 100.0, details["augmented"], task + " augmented")
        assert lmms_per == per, f"{task}: per-question scores differ\nlmms-eval {lmms_per}\nllava_dsl {per}"
        # ground truth built to give a spread: the agreement is not 0 == 0
        assert 0 < score and len(set(per)) >= 2, f"{task}: degenerate scores {per}"
        report[task] = score
    textvqa_per = LOADERS["textvqa"](lmms_run["dirs"]["textvqa"], protocol="plain").score(
        _logged(lmms_run["out"], "textvqa_val_local")[1])[2]
    assert len(set(textvqa_per)) >= 4 and any(0 < p < 1 for p in textvqa_per), textvqa_per
    print("lmms-eval == llava_dsl.evaluate:", report)


def test_diverging_scores_would_fail(lmms_run):
    """The comparison has teeth: one answer changed changes the project's score away from lmms-eval's."""
    from llava_dsl.evaluate.benchmarks import LOADERS

    results = _results(lmms_run["out"])["results"]
    _, responses = _logged(lmms_run["out"], "textvqa_val_local")
    bench = LOADERS["textvqa"](lmms_run["dirs"]["textvqa"], protocol="plain")
    per = bench.score(responses)[2]
    i = max(range(N), key=lambda j: per[j])
    changed = list(responses)
    changed[i] = "zzzz"
    with pytest.raises(AssertionError):
        _agree(results["textvqa_val_local"]["exact_match,none"] * 100.0, bench.score(changed)[0], "textvqa")
