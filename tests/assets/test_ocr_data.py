"""The built-in synthetic OCR data set (llava_dsl.assets.ocr_data): deterministic, LLaVA's json formats, and eval files
that the benchmark runners read as TextVQA and OCRBench."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
from support import ROOT
from PIL import Image

from llava_dsl.assets.ocr_data import (
    NUMBER_QUESTIONS,
    SHORT_ANSWER,
    TEXT_QUESTIONS,
    OcrDataConfig,
    Rendered,
    build,
    caption,
    render,
)
from llava_dsl.evaluate.benchmarks import load_ocrbench, load_textvqa

SMALL = OcrDataConfig(seed=3, image_size=48, num_pretrain=12, num_finetune=12, num_heldout=4, num_textvqa=9,
                      num_ocrbench=9)


def _digest(folder):
    """Name and content of every file under folder, except the manifest."""
    h = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ocr")
    return str(out), build(str(out), SMALL)


def test_same_seed_same_files_other_seed_other_files(data, tmp_path):
    out, _ = data
    again = build(str(tmp_path / "again"), SMALL)
    assert _digest(os.path.dirname(again["pretrain"])) == _digest(out)
    other = build(str(tmp_path / "other"), OcrDataConfig(**{**SMALL.__dict__, "seed": 4}))
    assert _digest(os.path.dirname(other["pretrain"])) != _digest(out)


def test_rebuilt_only_when_parameters_change(data, tmp_path):
    paths = build(str(tmp_path / "d"), SMALL)
    stamp = os.path.getmtime(paths["pretrain"])
    assert build(str(tmp_path / "d"), SMALL) == paths
    assert os.path.getmtime(paths["pretrain"]) == stamp
    build(str(tmp_path / "d"), OcrDataConfig(**{**SMALL.__dict__, "num_pretrain": 5}))
    assert len(json.load(open(paths["pretrain"]))) == 5


def test_llava_training_json(data):
    _, paths = data
    pretrain, finetune = json.load(open(paths["pretrain"])), json.load(open(paths["finetune"]))
    assert len(pretrain) == SMALL.num_pretrain and len(finetune) == SMALL.num_finetune
    for entry in pretrain:
        human, gpt = entry["conversations"]
        assert human == {"from": "human", "value": "<image>"}
        assert gpt["value"] == caption(Rendered(entry["rprobe_text"], _kind(gpt["value"]), (0, 0, 0, 0), {}))
    for entry in finetune:
        human, gpt = entry["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        question = human["value"][len("<image>\n"):].replace(SHORT_ANSWER, "")
        assert question in TEXT_QUESTIONS + NUMBER_QUESTIONS
        assert gpt["value"] == entry["rprobe_text"]
        if question in NUMBER_QUESTIONS:
            assert gpt["value"].isdigit()
    for entry in pretrain + finetune:
        with Image.open(os.path.join(paths["image_folder"], entry["image"])) as image:
            assert image.size == (SMALL.image_size, SMALL.image_size) and image.mode == "RGB"
        x0, y0, x1, y1 = entry["rprobe_crop"]
        assert 0 <= x0 < x1 <= SMALL.image_size and 0 <= y0 < y1 <= SMALL.image_size


def _kind(caption):
    return {"the word": "word", "the number": "number", "the text": "phrase"}[" ".join(caption.split()[:2])]


def test_text_is_drawn_inside_its_box():
    """The box covers the ink: outside it the image is background only (solid background, no stroke)."""
    import random

    for seed in range(40):
        rng = random.Random(seed)
        image, rendered = render("cake 42", "phrase", 64, rng)
        if rendered.style["background"] != "solid":
            continue
        x0, y0, x1, y1 = rendered.box
        background = tuple(rendered.style["bg"])
        pixels = image.load()
        outside = [pixels[x, y] for x in range(64) for y in range(64) if not (x0 - 1 <= x <= x1 and y0 - 1 <= y <= y1)]
        assert set(outside) == {background}
        inside = [pixels[x, y] for x in range(x0, x1) for y in range(y0, y1)]
        assert any(p != background for p in inside)


def test_eval_files_load_as_textvqa_and_ocrbench(data):
    _, paths = data
    for protocol in ("plain", "llava-ocr"):
        bench = load_textvqa(paths["textvqa_dir"], protocol=protocol)
        assert len(bench.questions) == SMALL.num_textvqa
        for question in bench.questions:
            assert os.path.isfile(os.path.join(bench.image_folder, question["image"]))
        truth = [answers[0] for answers in bench.ground_truth]
        assert bench.score(truth)[0] == pytest.approx(100.0)
        assert bench.score(["-"] * len(truth))[0] == 0.0
    bench = load_ocrbench(paths["ocrbench_dir"])
    assert len(bench.questions) == SMALL.num_ocrbench
    for question in bench.questions:
        assert os.path.isfile(os.path.join(bench.image_folder, question["image"]))
    score, details, _ = bench.score([answers[0] for answers, _ in bench.ground_truth])
    assert score == SMALL.num_ocrbench and set(details["categories"]) >= {"Regular Text Recognition"}


def test_command_line_and_playground_wrapper(tmp_path):
    sizes = ["--num-pretrain", "2", "--num-finetune", "2", "--num-heldout", "1", "--num-textvqa", "1",
             "--num-ocrbench", "1"]
    for command in ([sys.executable, "-m", "llava_dsl.assets.ocr_data"],
                    [sys.executable, os.path.join(ROOT, "playground", "data", "make_ocr_demo.py")]):
        out = tmp_path / os.path.basename(command[-1])
        result = subprocess.run(command + ["--out", str(out)] + sizes, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pretrain"] == str(out / "pretrain.json")
        assert json.load(open(out / "OCR_DATA.json"))["counts"] == {"pretrain": 2, "finetune": 2, "heldout": 1,
                                                                    "textvqa": 1, "ocrbench": 1}
    result = subprocess.run([sys.executable, "-m", "llava_dsl.assets.ocr_data", "--out", str(tmp_path / "x"),
                             "--num-pretrain", "0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "--num-pretrain=0: expected at least 1" in result.stderr
