"""Benchmark runners end to end on CPU: a tiny joint DSL checkpoint, tiny data sets in each benchmark's
real file format (rendered text images), resuming, sharding, bad input, compare, and the run entry point."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from support import ROOT, subprocess_env

from llava_dsl.evaluate.benchmarks import SHORT_ANSWER, load_chartqa
from llava_dsl.evaluate.runner import run_cli, summary_line, write_questions

MAX_NEW_TOKENS = "3"
N = 6  # questions per benchmark


def _render(root, n, seed):
    from llava_dsl.assets.tiny_models import render_text_images

    return render_text_images(str(root / "_render"), n, seed=seed)


def _save(root, record, folder, name):
    """Copy a rendered PNG to folder/name, in the format the name's extension says."""
    from PIL import Image

    os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
    Image.open(os.path.join(root, "_render", "images", record["image"])).convert("RGB").save(os.path.join(folder, name))


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def build_tiny_benchmarks(root):
    """playground/data/eval/<bench>/ for the five benchmarks, in their real formats, N questions each."""
    records = _render(root, N, seed=3)
    base = root / "eval"
    # TextVQA: the annotation file from textvqa.org, LLaVA's question jsonl, train_images/<image_id>.jpg.
    tv = base / "textvqa"
    os.makedirs(tv / "train_images")
    data, lines = [], []
    for i, r in enumerate(records):
        image_id = f"{i:016x}"
        _save(root, r, tv / "train_images", f"{image_id}.jpg")
        # two questions on the first image: LLaVA's file then repeats its question_id (= image_id)
        for question in (["what is written here?", "what word is shown?"] if i == 0 else ["what is written here?"]):
            answers = [r["text"]] * 3 + [f"the {r['text']}."] * 2 + ["none"] * 5
            data.append({"question": question, "image_id": image_id, "image_classes": [], "flickr_original_url": "",
                         "flickr_300k_url": "", "image_width": 32, "image_height": 32, "answers": answers,
                         "question_tokens": question.split(), "question_id": 34602 + len(data), "set_name": "val"})
            lines.append({"question_id": image_id, "image": f"{image_id}.jpg",
                          "text": f"{question.capitalize()}\nReference OCR token: {r['text'].upper()}, {r['text']}"
                                  f"\nAnswer the question using a single word or phrase."})
    _write_json(tv / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                                "dataset_version": 0.5, "data": data})
    with open(tv / "llava_textvqa_val_v051_ocr.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    # DocVQA: val_v1.0_withQT.json with image paths relative to its folder.
    dv = base / "docvqa"
    os.makedirs(dv)
    entries = []
    for i, r in enumerate(records):
        _save(root, r, dv, f"documents/doc{i}_1.png")
        entries.append({"questionId": 50000 + i, "question": "What is written in the document?",
                        "question_types": ["free_text"], "image": f"documents/doc{i}_1.png", "docId": i,
                        "ucsf_document_id": f"doc{i}", "ucsf_document_page_no": "1",
                        "answers": [r["text"], r["text"].upper()], "data_split": "val"})
    _write_json(dv / "val_v1.0_withQT.json", {"dataset_name": "docvqa", "dataset_split": "val",
                                              "dataset_version": "1.0", "data": entries})
    # InfographicVQA: image_local_name under infographicsvqa_images/.
    iv = base / "infovqa"
    os.makedirs(iv / "infographicsvqa_images")
    entries = []
    for i, r in enumerate(records):
        _save(root, r, iv / "infographicsvqa_images", f"{30000 + i}.jpeg")
        entries.append({"questionId": 98000 + i, "question": "Which word is in the infographic?",
                        "image_local_name": f"{30000 + i}.jpeg", "image_url": "", "ocr_output_file": f"{30000 + i}.json",
                        "answers": [r["text"]], "data_split": "val", "answer_type": ["single span"]})
    _write_json(iv / "infographicsVQA_val_v1.0_withQT.json", {"dataset_name": "infographicVQA",
                                                              "dataset_version": "1.0", "dataset_split": "val",
                                                              "data": entries})
    # ChartQA: test_human.json / test_augmented.json (imgname, query, label) and png/.
    cv = base / "chartqa"
    os.makedirs(cv / "png")
    for part, chosen in (("human", records[:3]), ("augmented", records[3:])):
        rows = []
        for i, r in enumerate(chosen):
            _save(root, r, cv / "png", f"{part}{i}.png")
            rows.append({"imgname": f"{part}{i}.png", "query": "What value is shown?", "label": r["text"]})
        _write_json(cv / f"test_{part}.json", rows)
    # OCRBench: OCRBench.json (ids repeat across source datasets) and OCRBench_Images/.
    ov = base / "ocrbench"
    os.makedirs(ov / "OCRBench_Images")
    rows = []
    kinds = [("IIIT5K", "Regular Text Recognition"), ("HME100k", "Handwritten Mathematical Expression Recognition"),
             ("docVQA", "Doc-oriented VQA")]
    for i, r in enumerate(records):
        dataset, category = kinds[i % len(kinds)]
        _save(root, r, ov / "OCRBench_Images", f"{dataset}/imgs/{i}.jpg")
        rows.append({"dataset_name": dataset, "id": i // len(kinds), "image_path": f"{dataset}/imgs/{i}.jpg",
                     "question": "what is written in the image?", "answers": [r["text"]] if i % 2 else r["text"],
                     "type": category})
    _write_json(ov / "OCRBench.json", rows)
    return base


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return build_tiny_benchmarks(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def checkpoint(runs):
    """The joint (stage-2, tower unfrozen) detached_mlp_multilayer checkpoint."""
    return runs["ft"]


def _evaluate(bench, data_dir, out, checkpoint, *extra):
    return run_cli([bench, "--model-path", checkpoint, "--data-dir", str(data_dir), "--output-dir", str(out),
                          "--device", "cpu", "--max_new_tokens", MAX_NEW_TOKENS, *extra])


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


# --------------------------------------------------------------------------------------------------
# Every runner end to end
# --------------------------------------------------------------------------------------------------
CASES = [("textvqa", ["--protocol", "llava-ocr"], N + 1), ("textvqa", ["--protocol", "plain"], N + 1),
         ("docvqa", [], N), ("infovqa", [], N), ("chartqa", [], N), ("ocrbench", [], N)]


@pytest.mark.parametrize("bench, extra, n", CASES, ids=[c[0] + "-" + "".join(c[1][1:]) for c in CASES])
def test_runner_end_to_end(bench, extra, n, bench_root, checkpoint, tmp_path):
    result = _evaluate(bench, bench_root / bench, tmp_path, checkpoint, *extra)
    # the answers file is LLaVA's format, one line per question
    answers = [json.loads(line) for line in _lines(tmp_path / "answers.jsonl")]
    questions = [json.loads(line) for line in _lines(tmp_path / "questions.jsonl")]
    assert len(answers) == len(questions) == n
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in answers)
    # results.json: what was run, on what, and the score recomputed from the per-question file
    saved = json.load(open(tmp_path / "results.json"))
    assert saved == json.loads(json.dumps(result))
    assert (saved["benchmark"], saved["n"], saved["answered"], saved["unanswered"]) == (bench, n, n, 0)
    assert saved["checkpoint"] == os.path.abspath(checkpoint) and len(saved["config_digest"]) == 16
    assert saved["generation"]["max_new_tokens"] == int(MAX_NEW_TOKENS)
    per = [json.loads(line)["score"] for line in _lines(tmp_path / "scored.jsonl")]
    scale = 1.0 if bench == "ocrbench" else 100.0 / n
    assert saved["score"] == pytest.approx(sum(per) * scale)


def test_textvqa_llava_protocol_agrees_with_llava_eval_textvqa(bench_root, tmp_path, capsys):
    """Score-only on a crafted answers file: our number equals LLaVA's own eval_textvqa on the same file."""
    from llava.eval import eval_textvqa
    from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator

    data = bench_root / "textvqa"
    questions = [json.loads(line) for line in _lines(data / "llava_textvqa_val_v051_ocr.jsonl")]
    annotation = json.load(open(data / "TextVQA_0.5.1_val.json"))["data"]
    variants = ["{}", "The {}.", "{}s", "none", "zero", "{} !"]
    with open(tmp_path / "answers.jsonl", "w") as f:
        for i, q in enumerate(questions):
            prediction = variants[i % len(variants)].format(annotation[i]["answers"][0])
            f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": prediction,
                                "answer_id": str(i), "model_id": "m", "metadata": {}}) + "\n")
    result = run_cli(["textvqa", "--stage", "score", "--data-dir", str(data), "--output-dir", str(tmp_path)])
    expected = TextVQAAccuracyEvaluator().eval_pred_list(
        [{"pred_answer": json.loads(line)["text"], "gt_answers": a["answers"]}
         for line, a in zip(_lines(tmp_path / "answers.jsonl"), annotation)])
    assert result["score"] == 100.0 * expected
    assert 0 < result["score"] < 100
    capsys.readouterr()
    eval_textvqa.eval_single(str(data / "TextVQA_0.5.1_val.json"), str(tmp_path / "answers.jsonl"))
    printed = capsys.readouterr().out
    assert f"Accuracy: {result['score']:.2f}%" in printed and f"Samples: {len(questions)}" in printed


# --------------------------------------------------------------------------------------------------
# Resuming, sharding
# --------------------------------------------------------------------------------------------------
def test_resume_after_interruption_gives_the_same_file(bench_root, checkpoint, tmp_path, monkeypatch):
    import llava_dsl.evaluate.generate as answer

    full = tmp_path / "full"
    _evaluate("docvqa", bench_root / "docvqa", full, checkpoint)
    reference = (full / "answers.jsonl").read_bytes()

    # A run killed after two answers: generation raises on the third question.
    load_model = answer.load_model

    def interrupted_load(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        model, calls = loaded[1], []
        original = model.generate

        def generate(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(*a, **k)

        model.generate = generate
        return loaded

    part = tmp_path / "part"
    monkeypatch.setattr(answer, "load_model", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        _evaluate("docvqa", bench_root / "docvqa", part, checkpoint)
    assert len(_lines(part / "answers.jsonl")) == 2
    # ... and a torn half line, as a kill in the middle of a write leaves
    with open(part / "answers.jsonl", "ab") as f:
        f.write(reference.splitlines(keepends=True)[2][:25])
    monkeypatch.setattr(answer, "load_model", load_model)
    result = _evaluate("docvqa", bench_root / "docvqa", part, checkpoint)
    assert (part / "answers.jsonl").read_bytes() == reference
    assert result["answered"] == N
    # a complete file is not touched again: no model is loaded
    monkeypatch.setattr(answer, "load_model", lambda *a, **k: pytest.fail("model loaded for a complete file"))
    _evaluate("docvqa", bench_root / "docvqa", part, checkpoint)
    assert (part / "answers.jsonl").read_bytes() == reference
    # answers made with other settings are not mixed into the same file
    with pytest.raises(SystemExit, match=r"generated with other settings \(max_new_tokens: 3 -> 5\)"):
        run_cli(["docvqa", "--model-path", checkpoint, "--data-dir", str(bench_root / "docvqa"),
                       "--output-dir", str(part), "--device", "cpu", "--max_new_tokens", "5"])


def test_sharded_generation_merges_to_the_single_process_file(bench_root, checkpoint, tmp_path):
    single = tmp_path / "single"
    _evaluate("textvqa", bench_root / "textvqa", single, checkpoint)
    sharded = tmp_path / "sharded"
    for k in (1, 0):  # shards may finish in any order
        assert _evaluate("textvqa", bench_root / "textvqa", sharded, checkpoint, "--stage", "generate",
                         "--num-chunks", "2", "--chunk-idx", str(k)) is None
    sizes = [len(_lines(sharded / f"answers.2_{k}.jsonl")) for k in (0, 1)]
    assert sizes == [4, 3]  # LLaVA's split: chunks of ceil(7 / 2)
    result = _evaluate("textvqa", bench_root / "textvqa", sharded, checkpoint, "--stage", "score", "--num-chunks", "2")
    assert (sharded / "answers.jsonl").read_bytes() == (single / "answers.jsonl").read_bytes()
    assert result["score"] == json.load(open(single / "results.json"))["score"]


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file and the line / record
# --------------------------------------------------------------------------------------------------
def _copy(bench_root, bench, tmp_path):
    target = tmp_path / bench
    shutil.copytree(bench_root / bench, target)
    return target


def _fails(match, *argv):
    with pytest.raises(SystemExit, match=match):
        run_cli(list(argv))


def test_bad_annotation_and_question_files(bench_root, tmp_path):
    docvqa = _copy(bench_root, "docvqa", tmp_path)
    annotation = json.load(open(docvqa / "val_v1.0_withQT.json"))
    del annotation["data"][2]["answers"]
    _write_json(docvqa / "val_v1.0_withQT.json", annotation)
    _fails(r"val_v1.0_withQT.json record 2: no 'answers'", "docvqa", "--data-dir", str(docvqa), "--stage", "score")
    _write_json(docvqa / "val_v1.0_withQT.json", annotation["data"])  # a bare list: wrong layout
    _fails(r"expected an object with a 'data' list", "docvqa", "--data-dir", str(docvqa), "--stage", "score")

    textvqa = _copy(bench_root, "textvqa", tmp_path)
    lines = _lines(textvqa / "llava_textvqa_val_v051_ocr.jsonl")
    lines[3] = lines[3][:-5]  # truncated JSON
    (textvqa / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(lines) + "\n")
    _fails(r"llava_textvqa_val_v051_ocr.jsonl line 4: not valid JSON", "textvqa", "--data-dir", str(textvqa),
           "--stage", "score")
    lines[3] = json.dumps({"question_id": "ffff", "image": "x.jpg", "text": "what?\nAnswer briefly."})
    (textvqa / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(lines) + "\n")
    _fails(r"line 4: no annotation in .* for image_id 'ffff' and question 'what\?'", "textvqa", "--data-dir",
           str(textvqa), "--stage", "score")

    chartqa = _copy(bench_root, "chartqa", tmp_path)
    rows = json.load(open(chartqa / "test_human.json"))
    rows[1]["label"] = None
    _write_json(chartqa / "test_human.json", rows)
    _fails(r"test_human.json record 1: field 'label' should be str or int or float, found NoneType", "chartqa",
           "--data-dir", str(chartqa), "--stage", "score")

    ocrbench = _copy(bench_root, "ocrbench", tmp_path)
    rows = json.load(open(ocrbench / "OCRBench.json"))
    rows[4]["type"] = "Poetry"
    _write_json(ocrbench / "OCRBench.json", rows)
    _fails(r"OCRBench.json record 4: unknown type 'Poetry'", "ocrbench", "--data-dir", str(ocrbench), "--stage",
           "score")


def test_missing_images_are_reported_before_loading_a_model(bench_root, tmp_path):
    infovqa = _copy(bench_root, "infovqa", tmp_path)
    os.remove(infovqa / "infographicsvqa_images" / "30004.jpeg")
    _fails(r"1 of 6 images .* are missing .*\n  line 5 \(question_id 98004\): .*30004.jpeg", "infovqa",
           "--model-path", str(tmp_path / "llava-none"), "--data-dir", str(infovqa), "--output-dir",
           str(tmp_path / "out"), "--device", "cpu")


def test_mismatched_and_missing_answers(bench_root, tmp_path):
    out = tmp_path / "out"
    data = bench_root / "chartqa"
    write_questions(load_chartqa(str(data)).questions, str(out / "questions.jsonl"))
    good = [{"question_id": f"human_{i}", "prompt": "What value is shown?" + SHORT_ANSWER, "text": "x"}
            for i in range(3)]
    wrong = good + [{"question_id": "human_7", "prompt": good[0]["prompt"], "text": "x"}]
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in wrong))
    _fails(r"answers.jsonl line 4: question_id 'human_7' .* is not a question of", "chartqa", "--data-dir",
           str(data), "--output-dir", str(out), "--stage", "score")
    twice = good + [good[1]]
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in twice))
    _fails(r"answers.jsonl line 4: question_id 'human_1' .* answered more often", "chartqa", "--data-dir",
           str(data), "--output-dir", str(out), "--stage", "score")
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in good))
    _fails(r"3 of 6 questions .* have no answer .* --allow-partial", "chartqa", "--data-dir", str(data),
           "--output-dir", str(out), "--stage", "score")
    result = run_cli(["chartqa", "--data-dir", str(data), "--output-dir", str(out), "--stage", "score",
                            "--allow-partial"])
    assert (result["n"], result["answered"], result["unanswered"]) == (6, 3, 3)
    assert set(result["details"]) == {"human", "augmented"} and result["details"]["augmented"] == 0.0


# --------------------------------------------------------------------------------------------------
# compare, the shell runners, and running LLaVA's own tools through the plugin
# --------------------------------------------------------------------------------------------------
def test_compare_table(tmp_path):
    def result(name, digest, bench, score, **extra):
        folder = tmp_path / name / bench
        os.makedirs(folder)
        _write_json(folder / "results.json", {"benchmark": bench, "protocol": "p", "split": "val", "score": score,
                                              "unit": "%", "n": 10, "unanswered": extra.pop("unanswered", 0),
                                              "checkpoint_name": name, "config_digest": digest, "details": extra})
    result("llava-a", "d1", "textvqa", 58.2)
    result("llava-a", "d1", "chartqa", 18.0, human=10.0, augmented=26.0)
    result("llava-b", "d2", "textvqa", 61.0, unanswered=2)
    table = run_cli(["compare", str(tmp_path), "--details", "--output", str(tmp_path / "t.md")])
    rows = (tmp_path / "t.md").read_text().splitlines()
    assert table is None and len(rows) == 4
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:2] == ["checkpoint", "config"] and "chartqa (p, val) human" in header
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows[2:]}
    assert cells["llava-a"][header.index("textvqa (p, val) [%]")] == "58.20"
    assert cells["llava-b"][header.index("textvqa (p, val) [%]")] == "61.00 (2 unanswered)"
    assert cells["llava-b"][header.index("chartqa (p, val) [%]")] == "-"


def test_shell_runner_end_to_end(bench_root, checkpoint, tmp_path):
    """eval_scripts/ocrbench.sh: one shard per listed device, merge, score, results.json."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "PYTHON": sys.executable}  # the interpreter running the tests, not PATH's
    out = tmp_path / "out"
    result = subprocess.run(["bash", os.path.join(ROOT, "eval_scripts", "ocrbench.sh"), checkpoint, "--data-dir",
                             str(bench_root / "ocrbench"), "--output-dir", str(out), "--device", "cpu",
                             "--max_new_tokens", MAX_NEW_TOKENS],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=subprocess_env(env))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert os.path.isfile(out / "answers.2_0.jsonl") and os.path.isfile(out / "answers.2_1.jsonl")
    saved = json.load(open(out / "results.json"))
    assert (saved["benchmark"], saved["answered"], saved["unanswered"]) == ("ocrbench", N, 0)
    assert result.stdout.strip().splitlines()[-1] == summary_line(saved)


def test_general_runner_pope_with_llava_scoring(checkpoint, tmp_path):
    """general.sh pope: LLaVA's POPE flow (its question/label files, its eval_pope) with our CPU answer tool."""
    from PIL import Image

    pope = tmp_path / "playground" / "data" / "eval" / "pope"
    os.makedirs(pope / "val2014")
    os.makedirs(pope / "coco")
    records = _render(tmp_path, 4, seed=5)
    with open(pope / "llava_pope_test.jsonl", "w") as questions, open(pope / "coco" / "coco_pope_adversarial.json", "w") as labels:
        for i, r in enumerate(records):
            name = f"COCO_val2014_{i:012d}.jpg"
            Image.open(tmp_path / "_render" / "images" / r["image"]).convert("RGB").save(pope / "val2014" / name)
            line = {"question_id": i, "image": name, "text": "Is there a word in the image?", "category": "adversarial"}
            questions.write(json.dumps(line) + "\n")
            labels.write(json.dumps({**line, "label": "yes" if i % 2 else "no"}) + "\n")
    env = subprocess_env({"ANSWER_MODULE": "llava_dsl.evaluate.generate", "DEVICE": "cpu", "PYTHON": sys.executable})
    name = os.path.basename(checkpoint)
    result = subprocess.run(["bash", os.path.join(ROOT, "eval_scripts", "general.sh"), "pope", checkpoint],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    answers = [json.loads(line) for line in _lines(pope / "answers" / f"{name}.jsonl")]
    assert [a["question_id"] for a in answers] == list(range(4))
    # LLaVA's rule: "no" if the first sentence has the word No/no/not, else "yes"
    said_yes = [not {"No", "no", "not"} & set(a["text"].split(".")[0].replace(",", "").split(" ")) for a in answers]
    tp = sum(y and i % 2 == 1 for i, y in enumerate(said_yes))
    fp = sum(y and i % 2 == 0 for i, y in enumerate(said_yes))
    assert "Category: adversarial, # samples: 4" in result.stdout
    assert f"{tp}\t{fp}\t{2 - fp}\t{2 - tp}" in result.stdout


def test_run_entry_point_lets_llava_tools_load_dsl_checkpoints(checkpoint, tiny_assets):
    """llava.serve.cli (LLaVA's own tool, CPU through its --device flag) on a detached_mlp_multilayer checkpoint."""
    image = os.path.join(tiny_assets["image_folder"], sorted(os.listdir(tiny_assets["image_folder"]))[0])
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    assert config["mm_projector_type"] == "detached_mlp_multilayer"
    result = subprocess.run(
        [sys.executable, "-m", "llava_dsl.run", "llava.serve.cli", "--model-path", checkpoint, "--image-file", image,
         "--device", "cpu", "--conv-mode", "llava_v1", "--max-new-tokens", "3"],
        input="What is written in the image?\n", capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
             "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    # the model answered the question, then the tool read end of input and left
    assert "USER: ASSISTANT:" in result.stdout and result.stdout.rstrip().endswith("exit...")


def test_run_entry_point_rejects_unknown_modules():
    from llava_dsl import run

    with pytest.raises(SystemExit, match="no module named 'llava.eval.nope'"):
        run.main(["llava.eval.nope"])
