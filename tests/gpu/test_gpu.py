"""GPU-only paths: bf16 ZeRO-3 joint finetuning with flash-attention / SDPA, and 4-bit QLoRA beside a trainable
tower. Skipped without CUDA (CI has none); on a GPU machine run `pytest -m gpu -s tests/gpu/test_gpu.py`."""
import importlib.util
import json
import os

import pytest
import torch
from support import DEEPSPEED, ROOT, llava_flags, run_module
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)")]


def report(name, out):
    """Print step time and peak memory (logged by the plugin's trainer on CUDA) for the closing numbers."""
    history = json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
    runtime = next(e for e in history if "train_runtime" in e)
    peak = max(e.get("gpu_peak_memory_gib", 0) for e in history)
    steps = json.load(open(os.path.join(out, "trainer_state.json")))["global_step"]
    print(f"\nGPU-CHECK {name}: {steps} steps in {runtime['train_runtime']:.2f}s "
          f"({runtime['train_runtime'] / steps:.3f} s/step incl. start), peak {peak:.2f} GiB")


@pytest.mark.parametrize("attention", ["flash_attention_2", "sdpa"])
def test_bf16_zero3_joint_finetune(attention, runs, tiny_assets):
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn --no-build-isolation)")
    out = str(runs["out"] / f"llava-gpu-{attention}")
    flags = llava_flags(tiny_assets, "finetune", out, pretrain_mm_mlp_adapter=os.path.join(runs["pre"], "mm_projector.bin"),
                        unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-4, bf16=True, tf32=True,
                        gradient_checkpointing=True, max_steps=8, per_device_train_batch_size=2,
                        deepspeed=os.path.join(ROOT, "scripts/zero3/zero3.json"), attn_implementation=attention)
    run_module("llava_dsl.train", flags, launcher=[DEEPSPEED, "--num_gpus", "1", "--master_port", "29671", "--module"])
    saved = load_file(os.path.join(out, "model.safetensors"))
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert saved[key].dtype == torch.bfloat16 and saved["model.mm_projector.0.weight"].shape == (64, 128)
    before = load_file(os.path.join(tiny_assets["vision_tower"], "model.safetensors"))
    assert not torch.equal(saved[key].float(), before["vision_model.encoder.layers.0.mlp.fc1.weight"].bfloat16().float())
    report(f"zero3-bf16-{attention}", out)


def test_qlora_4bit_beside_a_trainable_tower(runs, tiny_assets):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    out = str(runs["out"] / "llava-qlora")
    # from a LLaVA checkpoint whose tower is built inside from_pretrained: the case where bitsandbytes would
    # otherwise quantize the tower
    run_module("llava_dsl.train", llava_flags(
        tiny_assets, "finetune", out, model_name_or_path=runs["ft"], bits=4, lora_enable=True, lora_r=4,
        lora_alpha=8, bf16=True, unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-4, mm_projector_lr=1e-4,
        max_steps=8, per_device_train_batch_size=2, attn_implementation="sdpa"))
    trained = torch.load(os.path.join(out, "non_lora_trainables.bin"))
    base = load_file(os.path.join(runs["ft"], "model.safetensors"))
    tower = {k.replace("base_model.model.", "", 1): v for k, v in trained.items() if "vision_tower" in k}
    assert len(tower) == sum("vision_tower" in k for k in base)  # every tower weight, full shape, not quantized
    assert all(v.shape == base[k].shape and v.is_floating_point() for k, v in tower.items())
    assert any(not torch.equal(v.float(), base[k].bfloat16().float()) for k, v in tower.items())
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all("vision_tower" not in k and "mm_projector" not in k for k in adapter)
    report("qlora-4bit-joint-tower", out)
