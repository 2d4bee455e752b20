"""Shared pieces of tests/integrations: a tiny stock Llava and image data on disk, a framework run in a subprocess,
and the in-process reference its first-step tower gradient is compared with (see grad_capture.py)."""
import json
import os

import numpy as np
import torch
from PIL import Image
from support import ROOT, TESTS, run_in_process_group

HERE = os.path.dirname(os.path.abspath(__file__))
SHALLOW = "encoder.layers.0.mlp.fc1.weight"  # block 1 (hidden state 1): reached by the main path and by tap 1
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "DSL_DETACH_LAYERS": None,
           "DSL_DETACH_DEPTH": None, "DSL_OFF": None}


def tiny_model(out_dir):
    """``python -m llava_dsl.hf.tiny``'s Llava: 4 CLIP blocks, vision_feature_layer [4, 3, 1], 32 px images."""
    from llava_dsl.hf.tiny import save_tiny_llava

    return save_tiny_llava(str(out_dir))


def images(out_dir, count=4, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(str(out_dir), f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def run(command, env=None, timeout=300, expect_ok=True):
    # this folder on the path too: the recorder plugins (capture_*.py) are imported by module name
    env = {**OFFLINE, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, HERE]), **(env or {})}
    returncode, output = run_in_process_group(command, env=env, timeout=timeout)
    if expect_ok and returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed ({returncode}):\n{output[-6000:]}")
    return returncode, output


def reference_tower_grads(model_dir, record, detach_layers):
    """The vision-tower gradients of ``model_dir``'s model for the recorded pixel values and d loss / d(projector
    output), with ``llava_dsl.hf`` applied (``detach_layers``) or naive (None)."""
    from transformers import LlavaForConditionalGeneration

    from llava_dsl.hf import apply_detached_skip_links, remove_detached_skip_links, vision_tower

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    if detach_layers is None:
        remove_detached_skip_links(model)
    else:
        apply_detached_skip_links(model, detach_layers=detach_layers)
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: captured.setdefault("out", out))
    pixels = record["pixel_values"].float()
    model(input_ids=torch.full((pixels.shape[0], 16), model.config.image_token_index), pixel_values=pixels)
    torch.autograd.backward(captured["out"], record["projector_grad"])
    return {name: p.grad for name, p in vision_tower(model).named_parameters() if p.grad is not None}


def assert_first_step(record_path, model_dir, detach_layers):
    """The framework's first-step tower gradient equals llava_dsl.hf's with ``detach_layers`` (None: naive fusion),
    and the shallow block's differs from the other arm's (so the comparison can tell them apart)."""
    record = torch.load(record_path)
    assert record["max_grad_norm"] == 0 and record["gradient_accumulation_steps"] == 1, record
    got = record["tower_grads"]
    want = reference_tower_grads(model_dir, record, detach_layers)
    other = reference_tower_grads(model_dir, record, [1] if detach_layers is None else None)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    gap = (want[SHALLOW] - other[SHALLOW]).abs().max().item()
    assert gap > 0.05 * want[SHALLOW].abs().max().item(), f"{SHALLOW}: detached and naive differ by only {gap}"
    return got


def saved_config(folder):
    with open(os.path.join(str(folder), "config.json")) as f:
        return json.load(f)
