"""The stage-2 data mix: exact question-kind counts, answers that match the image, held-out OCR evaluation."""
import json
import os
from collections import Counter

import pytest

from llava_dsl.assets.data_mix import (CONFUSABLE, MixConfig, build, colour_name, kind_counts, position_name)
from llava_dsl.assets.ocr_data import is_heldout_text
from llava_dsl.evaluate.benchmarks import load_textvqa


@pytest.mark.parametrize("total, fraction, expected", [
    (2000, 0.1, {"read": 200, "background": 360, "text_colour": 360, "position": 360, "count": 360, "shape": 360}),
    (103, 0.25, {"read": 26, "background": 16, "text_colour": 16, "position": 15, "count": 15, "shape": 15}),
    (10, 1.0, {"read": 10, "background": 0, "text_colour": 0, "position": 0, "count": 0, "shape": 0}),
])
def test_kind_counts_are_exact(total, fraction, expected):
    assert kind_counts(total, fraction) == expected and sum(expected.values()) == total


def test_kind_counts_refuse_bad_values():
    with pytest.raises(ValueError, match="read_fraction=1.5"):
        kind_counts(10, 1.5)
    with pytest.raises(ValueError, match="other_kinds=\\['colour'\\]"):
        kind_counts(10, 0.5, ("colour",))


def test_colour_and_position_names():
    assert [colour_name(c) for c in ((250, 10, 10), (10, 200, 10), (20, 20, 230), (250, 250, 250), (5, 5, 5),
                                     (128, 128, 128), (250, 230, 20))] == \
        ["red", "green", "blue", "white", "black", "gray", "yellow"]
    assert position_name((2, 2, 12, 10), 64) == "top left"
    assert position_name((26, 28, 38, 36), 64) == "middle"
    assert position_name((50, 50, 62, 62), 64) == "bottom right"


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mix"))
    cfg = MixConfig(seed=1, num_finetune=120, num_eval=30, read_fraction=0.15, confusable=True)
    return build(out, cfg), cfg


def test_the_mix_has_exactly_the_asked_fractions_and_readable_records(mix):
    paths, cfg = mix
    records = json.load(open(paths["finetune"]))
    assert Counter(r["question_kind"] for r in records) == kind_counts(120, 0.15)
    assert sum(r["question_kind"] == "read" for r in records) == 18  # round(0.15 * 120)
    assert json.load(open(paths["marker"]))["counts"] == kind_counts(120, 0.15)
    letters = 0
    for r in records:
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>\n") and os.path.isfile(os.path.join(paths["image_folder"], r["image"]))
        text = r["rprobe_text"]
        assert not is_heldout_text(text) and 2 <= len(text) <= 5
        letters += any(c.isalpha() for c in text)
        answer = gpt["value"]
        kind = r["question_kind"]
        if kind == "read":
            assert answer == text
        elif kind == "count":
            assert answer == str(len(text))
        elif kind == "position":
            assert answer == position_name(r["rprobe_crop"], cfg.image_size)
        elif kind == "shape":
            assert answer in ("circle", "square", "triangle")
        else:  # a colour word (colour_name is checked on known colours above)
            assert answer in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "gray", "black")
    assert letters > 20  # confusable letters are really in the strings
    assert set("".join(r["rprobe_text"] for r in records)) <= set("0123456789" + CONFUSABLE)


def test_the_ocr_evaluation_is_held_out_and_readable_by_the_runner(mix):
    paths, _ = mix
    bench = load_textvqa(paths["textvqa_dir"], protocol="plain")
    assert len(bench.questions) == 30
    texts = [truth[0] for truth in bench.ground_truth]
    assert all(is_heldout_text(t) for t in texts)
    training = {r["rprobe_text"] for r in json.load(open(paths["finetune"]))}
    assert not training & set(texts)
    assert bench.score(texts)[0] == 100.0
