"""The use probe (tap ablation) on a real tiny joint DSL checkpoint through `python -m llava_dsl.probes use`:
a tap whose projector weights are zero loses exactly nothing; a tap that carries the answer loses."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import run_module

from llava_dsl.assets.handwritten import HandwrittenConfig, build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 12


def probe(model, data_dir, tiny_assets, out):
    run_module("llava_dsl.probes", ["use", "--model-path", model, "--data-dir", data_dir, "--train-data",
                                    tiny_assets["finetune"], "--image-folder", tiny_assets["image_folder"],
                                    "--num-mean-images", "8", "--max_new_tokens", "4", "--output-dir", out],
               env={"OMP_NUM_THREADS": "1"})
    return json.load(open(os.path.join(out, "use.json")))


def test_zero_weight_tap_drops_exactly_nothing_and_a_carrying_tap_drops(runs, tiny_assets, tmp_path):
    model = str(tmp_path / "llava-use")
    shutil.copytree(runs["ft"], model)
    config = json.load(open(os.path.join(model, "config.json")))
    weights = load_file(os.path.join(model, "model.safetensors"))
    width, first = config["mm_hidden_size"], weights["model.mm_projector.0.weight"]
    order = [7, 6, 4, 2]  # main -2 of the 8-block tower, then taps 6, 4, 2 (the default stride 2), deep first
    assert first.shape[1] == width * len(order)
    columns = lambda layer: slice(order.index(layer) * width, (order.index(layer) + 1) * width)
    first[:, columns(2)] = 0.0        # tap 2 reaches nothing
    first[:, columns(6)] *= 100.0     # tap 6 dominates the visual tokens
    weights["model.mm_projector.0.weight"] = first.contiguous()
    # the 16-sample tiny run answers "." to everything; a random output head makes the answer follow the visual tokens
    weights["lm_head.weight"] = torch.randn(weights["lm_head.weight"].shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    data = build(str(tmp_path / "handwritten"), HandwrittenConfig(count=N, image_size=32))["textvqa_dir"]

    # the ground truth is what the model answers unablated, so every drop is measured against 100 % exact match
    first_run = probe(model, data, tiny_assets, str(tmp_path / "first"))
    assert first_run["concat_order"] == order and first_run["taps"] == [6, 4, 2]
    predictions = [json.loads(line)["prediction"] for line in open(first_run["conditions"]["none"]["scored_file"])]
    annotation = os.path.join(data, "TextVQA_0.5.1_val.json")
    payload = json.load(open(annotation))
    for entry, prediction in zip(payload["data"], predictions):
        entry["answers"] = [prediction] * 10
    json.dump(payload, open(annotation, "w"))

    report = probe(model, data, tiny_assets, str(tmp_path / "second"))
    conditions = report["conditions"]
    assert set(conditions) == {"none", "tap6", "tap4", "tap2", "all_taps"}
    assert conditions["none"]["exact_match"] == 1.0 and conditions["none"]["n"] == N
    assert conditions["tap2"]["drop"] == 0.0 and conditions["tap2"]["lost"] == 0  # zero weights: nothing to lose
    assert report["per_question_correct"]["tap2"] == [True] * N
    assert conditions["tap6"]["drop"] > 0 and conditions["tap6"]["lost"] >= 1
    assert conditions["all_taps"]["drop"] > 0
    assert report["mean_images"] == 8 and report["detached"] == [4, 2]  # the fixture's default detach depth
