"""Tests for llava_dsl.assets.tiny_models: the tiny local tokenizer, models and data."""

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:
    from llava_dsl.assets.tiny_models import (
        build_all,
        build_language_model,
        build_tokenizer,
        build_vision_tower,
        render_text_images,
    )
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_assets")
    return str(out), build_all(str(out), seed=0, num_samples=8)


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=False)


def test_tokenizer_ids_and_pieces(assets):
    _, paths = assets
    tok = _load_tokenizer(paths["llm"])
    assert type(tok).__name__ == "LlamaTokenizer"
    assert tok.legacy is False
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id is None
    assert len(tok) == 512

    vocab = tok.get_vocab()
    assert "USER" in vocab
    assert "<image>" not in vocab
    # "USER" stays one piece both after a space and directly after </s>,
    # which is what LLaVA's v1 target masking relies on.
    pieces = tok.tokenize("Hi USER: a</s>USER: b")
    assert pieces.count("USER") == 2
    assert tok("USER").input_ids == [1, vocab["\u2581"], vocab["USER"]]
    # Byte fallback: nothing maps to <unk> (LLaVA pads with <unk>).
    ids = tok("Zebra \u00c4\u00d6 \u20ac 12345 <image>\nok").input_ids
    assert 0 not in ids
    # split_digits
    assert tok.tokenize("2024") == ["\u2581", "2", "0", "2", "4"]


def test_llava_v1_and_plain_preprocessing(assets, monkeypatch, capsys):
    train = pytest.importorskip("llava.train.train")
    from llava import conversation as conversation_lib
    from llava.constants import IGNORE_INDEX

    _, paths = assets
    tok = _load_tokenizer(paths["llm"])
    tok.model_max_length = 128
    tok.padding_side = "right"
    tok.pad_token = tok.unk_token  # as llava.train.train does for v1/plain

    class DataArgs:
        is_multimodal = True
        mm_use_im_start_end = False

    monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates["v1"])
    finetune = json.load(open(paths["finetune"]))
    for example in finetune:
        sources = train.preprocess_multimodal(copy.deepcopy([example["conversations"]]), DataArgs)
        out = train.preprocess(sources, tok, has_image=True)
        input_ids, labels = out["input_ids"][0], out["labels"][0]
        # The mismatch check in preprocess_v1 only runs below model_max_length.
        assert len(input_ids) < 100
        supervised = [int(i) for i, l in zip(input_ids, labels) if l != IGNORE_INDEX]
        text = tok.decode(supervised)
        answer = example["conversations"][3]["value"]
        assert example["conversations"][1]["value"] in text and answer in text, text
        assert supervised.count(tok.eos_token_id) == 2
    assert "tokenization mismatch" not in capsys.readouterr().out

    monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates["plain"])
    example = json.load(open(paths["pretrain"]))[0]
    sources = train.preprocess_multimodal(copy.deepcopy([example["conversations"]]), DataArgs)
    out = train.preprocess(sources, tok, has_image=True)
    labels = out["labels"][0]
    assert out["input_ids"][0][:2].tolist() == [1, -200]
    assert example["conversations"][1]["value"] in tok.decode(labels[labels != IGNORE_INDEX])


def _state_dict_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_reload_with_shapes_and_are_deterministic(assets, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    out, paths = assets
    tokenizer_dir = os.path.join(out, "tokenizer")

    lm = LlamaForCausalLM.from_pretrained(paths["llm"])
    assert lm.config.vocab_size == 512
    assert lm.model.embed_tokens.weight.shape == (512, 64)
    assert len(lm.model.layers) == 2
    assert lm.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    assert lm.config.num_attention_heads == 4
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (1, 2, 0)

    tower = CLIPVisionModel.from_pretrained(paths["vision_tower"])
    cfg = tower.config
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers) == (32, 8, 32, 8)
    processor = CLIPImageProcessor.from_pretrained(paths["vision_tower"])
    assert processor.crop_size == {"height": 32, "width": 32}
    image = Image.open(os.path.join(paths["image_folder"], os.listdir(paths["image_folder"])[0]))
    pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 9 and hidden[-2].shape == (1, 17, 32)

    # Same seed -> identical weights; another seed -> different weights.
    lm2 = LlamaForCausalLM.from_pretrained(
        build_language_model(str(tmp_path / "lm2"), tokenizer_dir, seed=0))
    assert _state_dict_equal(lm.state_dict(), lm2.state_dict())
    tower2 = CLIPVisionModel.from_pretrained(
        build_vision_tower(str(tmp_path / "tower2"), seed=0))
    assert _state_dict_equal(tower.state_dict(), tower2.state_dict())
    tower3 = CLIPVisionModel.from_pretrained(
        build_vision_tower(str(tmp_path / "tower3"), seed=1))
    assert not _state_dict_equal(tower.state_dict(), tower3.state_dict())


def test_tokenizer_is_deterministic(assets, tmp_path):
    out, _ = assets
    again = build_tokenizer(str(tmp_path / "tok"), seed=0)
    with open(os.path.join(out, "tokenizer", "tokenizer.model"), "rb") as f1, \
            open(os.path.join(again, "tokenizer.model"), "rb") as f2:
        assert f1.read() == f2.read()


def _pixels(folder, records):
    return [np.asarray(Image.open(os.path.join(folder, "images", r["image"]))) for r in records]


def test_images_exist_and_are_deterministic(tmp_path):
    a = render_text_images(str(tmp_path / "a"), 12, seed=3)
    b = render_text_images(str(tmp_path / "b"), 12, seed=3)
    c = render_text_images(str(tmp_path / "c"), 12, seed=4)
    assert a == b
    assert len(a) == 12 and len({r["id"] for r in a}) == 12
    pa, pb, pc = _pixels(tmp_path / "a", a), _pixels(tmp_path / "b", b), _pixels(tmp_path / "c", c)
    for x, y in zip(pa, pb):
        assert x.shape == (32, 32, 3) and np.array_equal(x, y)
        assert len(np.unique(x.reshape(-1, 3), axis=0)) > 2  # text was drawn
    assert [r["text"] for r in a] != [r["text"] for r in c] or not all(
        np.array_equal(x, y) for x, y in zip(pa, pc))
    assert all(r["text"] for r in a)


def test_datasets_and_build_all_reuse(assets):
    out, paths = assets
    assert sorted(paths) == ["finetune", "image_folder", "llm", "pretrain", "vision_tower"]
    pretrain = json.load(open(paths["pretrain"]))
    finetune = json.load(open(paths["finetune"]))
    assert len(pretrain) == len(finetune) == 8
    for p, f in zip(pretrain, finetune):
        assert os.path.isfile(os.path.join(paths["image_folder"], p["image"]))
        assert p["conversations"][0] == {"from": "human", "value": "<image>"}
        text = p["conversations"][1]["value"]
        roles = [t["from"] for t in f["conversations"]]
        assert roles == ["human", "gpt", "human", "gpt"]
        assert f["conversations"][0]["value"].startswith("<image>\n")
        assert f["conversations"][1]["value"] == text
        assert f["conversations"][3]["value"] == ("Yes." if text.isdigit() else "No.")

    weights = os.path.join(paths["llm"], "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert build_all(out, seed=0, num_samples=8) == paths
    assert os.stat(weights).st_mtime_ns == mtime  # reused, not rebuilt
