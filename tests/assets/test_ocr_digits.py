"""The demo's digit-string data (llava_dsl.assets.ocr_data, content="digits"): the held-out splits contain only
strings and font sizes the training splits never show, and the renderer reports where each character is."""
import json
import os
import random

from PIL import Image

from llava_dsl.assets.ocr_data import (
    HELDOUT_FONT_SIZES,
    TRAIN_FONT_SIZES,
    OcrDataConfig,
    build,
    digit_style,
    is_heldout_text,
    render,
    sample_digits,
)

DIGITS = OcrDataConfig(seed=1, num_pretrain=40, num_finetune=40, num_heldout=12, num_textvqa=12, num_ocrbench=12,
                       content="digits", min_digits=2, max_digits=5)


def _answers(paths):
    train = [r["conversations"][-1]["value"] for key in ("pretrain", "finetune") for r in json.load(open(paths[key]))]
    train = [t.split(" ", 2)[-1] for t in train]  # captions are "the number 42"
    heldout = [r["conversations"][-1]["value"] for r in json.load(open(paths["heldout"]))]
    textvqa = [e["answers"][0] for e in json.load(open(os.path.join(paths["textvqa_dir"], "TextVQA_0.5.1_val.json")))["data"]]
    ocrbench = [e["answers"][0] for e in json.load(open(os.path.join(paths["ocrbench_dir"], "OCRBench.json")))]
    return train, heldout + textvqa + ocrbench


def test_held_out_strings_never_appear_in_training(tmp_path):
    train, heldout = _answers(build(str(tmp_path), DIGITS))
    assert all(t.isdigit() and 2 <= len(t) <= 5 for t in train + heldout)
    assert not any(is_heldout_text(t) for t in train)
    assert all(is_heldout_text(t) for t in heldout)
    assert not set(train) & set(heldout)


def test_training_and_held_out_font_sizes_are_disjoint():
    assert not set(TRAIN_FONT_SIZES) & set(HELDOUT_FONT_SIZES)
    rng = random.Random(0)
    for heldout in (False, True):
        sizes = {render(sample_digits(rng, 2, 5, heldout), "number", 64, rng, digit_style(heldout))[1]
                 .style["font_size"] for _ in range(200)}
        assert sizes <= set(HELDOUT_FONT_SIZES if heldout else TRAIN_FONT_SIZES), sizes


def test_character_centres_lie_inside_the_text_box_in_reading_order():
    rng = random.Random(2)
    for _ in range(50):
        text = sample_digits(rng, 2, 5)
        image, rendered = render(text, "number", 64, rng, digit_style(False))
        x0, y0, x1, y1 = rendered.box
        xs = [x for x, _ in rendered.centres]
        assert len(rendered.centres) == len(text) and xs == sorted(xs)
        assert all(x0 - 1 <= x <= x1 + 1 and y0 <= y <= y1 for x, y in rendered.centres)


def test_same_seed_same_images(tmp_path):
    a, b = build(str(tmp_path / "a"), DIGITS), build(str(tmp_path / "b"), DIGITS)
    first = sorted(os.listdir(a["image_folder"]))[0]
    with Image.open(os.path.join(a["image_folder"], first)) as x, Image.open(os.path.join(b["image_folder"], first)) as y:
        assert x.tobytes() == y.tobytes()
