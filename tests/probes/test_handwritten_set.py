"""The handwritten held-out set: real 8x8 scans composed into digit strings, in the TextVQA layout the runner reads."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_dsl.assets.handwritten import HandwrittenConfig, build, digit_scans
from llava_dsl.evaluate.benchmarks import load_textvqa


@pytest.fixture(scope="module")
def handwritten(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("handwritten"))
    return build(out, HandwrittenConfig(count=60, seed=3)), out


def test_images_decode_to_their_labels(handwritten):
    """Each glyph box, read back from the JPEG and matched to the nearest of the 1,797 scans, gives the label's
    digit: the image shows the string the annotation says, left to right."""
    paths, out = handwritten
    scans, labels = digit_scans()
    bank = scans.reshape(len(scans), -1) / 16.0
    manifest = json.load(open(os.path.join(out, "HANDWRITTEN.json")))
    assert manifest["params"]["count"] == 60 and len(manifest["images"]) == 60
    digits_right = strings_right = total = 0
    for record in manifest["images"]:
        image = Image.open(os.path.join(paths["image_folder"], f"{record['image_id']}.jpg"))
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 2 <= len(record["text"]) <= 5 and len(record["boxes"]) == len(record["text"])
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        read = ""
        for box in record["boxes"]:
            crop = grey[box[1]:box[3], box[0]:box[2]]
            ink = (crop.max() - crop) / max(1.0, crop.max() - crop.min())  # dark ink on a light ground
            small = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize((8, 8), Image.Resampling.BOX),
                               dtype=np.float32).reshape(-1) / 255.0
            read += str(labels[int(((bank - small) ** 2).sum(1).argmin())])
        digits_right += sum(a == b for a, b in zip(read, record["text"]))
        strings_right += read == record["text"]
        total += len(record["text"])
        assert [labels[i] for i in record["scans"]] == [int(c) for c in record["text"]]
    assert digits_right / total >= 0.95, (digits_right, total)
    assert strings_right >= 50, strings_right


def test_the_evaluation_runner_reads_it_with_the_labels_as_answers(handwritten):
    paths, out = handwritten
    manifest = {r["image_id"]: r["text"] for r in json.load(open(os.path.join(out, "HANDWRITTEN.json")))["images"]}
    for protocol in ("plain", "llava-ocr"):
        bench = load_textvqa(paths["textvqa_dir"], protocol=protocol)
        assert len(bench.questions) == 60
        for question, truth in zip(bench.questions, bench.ground_truth):
            assert truth == [manifest[question["question_id"]]] * 10
            assert os.path.isfile(os.path.join(bench.image_folder, question["image"]))
        score, _, per = bench.score([manifest[q["question_id"]] for q in bench.questions])
        assert score == 100.0 and per == [1.0] * 60
    # the same seed gives the same files; another seed other strings
    again = build(out + "-again", HandwrittenConfig(count=60, seed=3))
    first = open(os.path.join(out, "TextVQA_0.5.1_val.json")).read()
    assert open(os.path.join(again["textvqa_dir"], "TextVQA_0.5.1_val.json")).read() == first
    other = build(out + "-other", HandwrittenConfig(count=60, seed=4))
    assert open(os.path.join(other["textvqa_dir"], "TextVQA_0.5.1_val.json")).read() != first
