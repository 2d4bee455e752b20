"""The damage and use probes on stock Hugging Face Llava folders (python -m llava_dsl.probes, through llava_dsl.hf's
public API): a scrambled shallow block is told from the original tower; a tap with zero projector weights loses
exactly nothing when ablated, a tap that carries the answer loses."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llava_dsl.assets.data_mix import MixConfig, build
from llava_dsl.hf.tiny import tiny_llava, tiny_processor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probes(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "llava_dsl.probes", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def save(model, folder):
    model.save_pretrained(folder)
    tiny_processor(model).save_pretrained(folder)
    return folder


def projector(model):
    return getattr(model, "model", model).multi_modal_projector


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-probes")
    original = save(tiny_llava(vision_feature_layer=(3, 2, 1)), str(root / "llava-original"))
    scrambled_model = tiny_llava(vision_feature_layer=(3, 2, 1))
    clip = scrambled_model.model.vision_tower if hasattr(scrambled_model, "model") else scrambled_model.vision_tower
    blocks = getattr(clip, "vision_model", clip).encoder.layers
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in blocks[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    scrambled = save(scrambled_model, str(root / "llava-scrambled"))
    data = build(str(root / "mix"), MixConfig(num_finetune=16, num_eval=10, image_size=32, read_fraction=0.5))
    return {"root": root, "original": original, "scrambled": scrambled, "data": data}


def test_damage_probe_on_hugging_face_folders(folders, tmp_path):
    out = str(tmp_path / "damage.json")
    probes("damage", folders["scrambled"], "--reference", folders["original"], "--layers", "0,1,2",
           "--num-train", 200, "--num-test", 100, "--output", out)
    report = json.load(open(out))
    entry = report["checkpoints"][folders["scrambled"]]
    assert (entry["kind"], entry["main"], entry["taps"]) == ("hf", 3, [2, 1])
    assert entry["vs_reference"]["0"] == {"glyph_accuracy": 0.0, "pixel_r2": 0.0}
    assert entry["vs_reference"]["1"]["pixel_r2"] < -0.05 and entry["vs_reference"]["2"]["pixel_r2"] < -0.05


def test_use_probe_on_a_hugging_face_folder(folders, tmp_path):
    model = tiny_llava(vision_feature_layer=(3, 2, 1))
    width = model.config.vision_config.hidden_size
    with torch.no_grad():
        weight = projector(model).linear_1.weight  # input slices: layer 3, then taps 2, 1
        weight[:, 2 * width:3 * width] = 0.0       # tap 1 reaches nothing
        weight[:, 1 * width:2 * width] *= 100.0    # tap 2 dominates the visual tokens
    path = save(model, str(tmp_path / "llava-use"))
    data = folders["data"]
    flags = ["--model-path", path, "--data-dir", data["textvqa_dir"], "--train-data", data["finetune"],
             "--image-folder", data["image_folder"], "--num-mean-images", 6, "--max_new_tokens", 3]
    first = tmp_path / "first"
    probes("use", *flags, "--output-dir", first)
    predictions = [json.loads(line)["prediction"] for line in open(first / "none" / "scored.jsonl")]
    # the ground truth becomes what the model answers unablated: every drop is measured from 100 % exact match
    annotation = os.path.join(data["textvqa_dir"], "TextVQA_0.5.1_val.json")
    payload = json.load(open(annotation))
    for entry, prediction in zip(payload["data"], predictions):
        entry["answers"] = [prediction] * 10
    json.dump(payload, open(annotation, "w"))
    second = tmp_path / "second"
    probes("use", *flags, "--output-dir", second)
    report = json.load(open(second / "use.json"))
    assert report["kind"] == "hf" and report["concat_order"] == [3, 2, 1] and report["taps"] == [2, 1]
    conditions = report["conditions"]
    assert conditions["none"]["exact_match"] == 1.0 and conditions["none"]["n"] == 10
    assert conditions["tap1"]["drop"] == 0.0 and report["per_question_correct"]["tap1"] == [True] * 10
    assert conditions["tap2"]["drop"] > 0 and conditions["all_taps"]["drop"] > 0
