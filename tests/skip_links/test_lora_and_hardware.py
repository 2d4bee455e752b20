"""LoRA stays in the LLM beside a trainable tower; GPU-only requests fail at start-up on a CPU machine."""
import json
import os

import pytest
import torch
from support import llava_flags, run_module
from safetensors.torch import load_file

LORA_TOWER_LR, LORA_STEPS = 1e-6, 2


@pytest.fixture(scope="module")
def lora_run(runs, tiny_assets):
    """LoRA finetuning that continues from a LLaVA checkpoint with a trained tower: the case where upstream's
    leaf-name targets (q_proj, fc1, ...) also wrap the CLIP tower, because the tower exists before LoRA."""
    out = str(runs["out"] / "llava-lora")
    result = run_module("llava_dsl.train", llava_flags(
        tiny_assets, "finetune", out, model_name_or_path=runs["ft"], lora_enable=True, lora_r=4, lora_alpha=8,
        unfreeze_mm_vision_tower=True, mm_vision_tower_lr=LORA_TOWER_LR, mm_projector_lr=1e-4,
        max_steps=LORA_STEPS, attn_implementation="eager"))
    return {"out": out, "base": runs["ft"], "stdout": result.stdout}


def test_attention_implementation_reaches_the_model(lora_run):
    assert "attention eager" in lora_run["stdout"]


def test_lora_wraps_only_language_model_layers(lora_run):
    config = json.load(open(os.path.join(lora_run["out"], "adapter_config.json")))
    targets = config["target_modules"]
    assert targets and all(t.startswith("model.layers.") for t in targets), targets
    # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert len(targets) == 2 * 7
    adapter = load_file(os.path.join(lora_run["out"], "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and "vision_tower" not in k and "mm_projector" not in k for k in adapter)


def test_tower_and_projector_train_beside_lora_at_their_own_rates(lora_run):
    trained = torch.load(os.path.join(lora_run["out"], "non_lora_trainables.bin"))
    base = load_file(os.path.join(lora_run["base"], "model.safetensors"))
    strip = lambda k: k.replace("base_model.model.", "", 1)
    tower = {strip(k): v for k, v in trained.items() if "vision_tower" in k}
    projector = {strip(k): v for k, v in trained.items() if "mm_projector" in k}
    assert len(tower) == sum("vision_tower" in k for k in base) and len(projector) == 4
    tower_delta = max((v.float() - base[k].float()).abs().max().item() for k, v in tower.items())
    projector_delta = max((v.float() - base[k].float()).abs().max().item() for k, v in projector.items())
    bound = 3 * LORA_STEPS * LORA_TOWER_LR  # Adam moves a weight by about lr per step
    assert 0 < tower_delta < bound < projector_delta


def test_lora_checkpoint_reloads_unmerged_and_merged(lora_run, tmp_path):
    import llava_dsl

    llava_dsl.register()
    from llava.model.builder import load_pretrained_model

    tokenizer, model, _, _ = load_pretrained_model(lora_run["out"], lora_run["base"], "llava-lora",
                                                   device_map="cpu", device="cpu")
    loaded = model.state_dict()
    trained = torch.load(os.path.join(lora_run["out"], "non_lora_trainables.bin"))
    for key, value in trained.items():
        assert torch.equal(loaded[key.replace("base_model.model.", "", 1)], value.half()), key
    # merged LoRA: W = W_base + B @ A * alpha / r
    base = load_file(os.path.join(lora_run["base"], "model.safetensors"))
    adapter = load_file(os.path.join(lora_run["out"], "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    assert b.abs().max() > 0
    expected = base[f"{name}.weight"].half().float() + (b.float() @ a.float()) * (8 / 4)
    torch.testing.assert_close(loaded[f"{name}.weight"].float(), expected, rtol=0, atol=2e-3)

    merged = str(tmp_path / "llava-merged")
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    _, again, _, _ = load_pretrained_model(merged, None, "llava-merged", device_map="cpu", device="cpu")
    assert all(torch.equal(v, loaded[k]) for k, v in again.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only start-up errors")
@pytest.mark.parametrize("flags, expected", [
    (["--attn_implementation", "flash_attention_2"], "--attn_implementation sdpa"),
    (["--fp16", "True"], "--bf16 True"),
    (["--fp16"], "--bf16 True"),
    (["--bits", "4"], "--lora_enable True"),
    (["--bits=8"], "--bits 8 (QLoRA through bitsandbytes) needs a CUDA GPU"),
    (["--tf32", "True"], "--tf32 False"),
])
def test_gpu_only_requests_fail_at_startup_with_one_line(flags, expected, tiny_assets, tmp_path):
    args = [a for a in llava_flags(tiny_assets, "finetune", str(tmp_path / "llava-x"), tf32=None)] + flags
    result = run_module("llava_dsl.train", args, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava_dsl.train: ") and expected in lines[0], result.stderr
