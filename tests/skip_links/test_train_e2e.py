"""The plugin through LLaVA's own train(): stage 1, joint stage 2 with Detached Skip-Links, reload, errors.

Every run is the real CLI (`python -m llava_dsl.train`) on tiny random assets built from configs.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from support import DEEPSPEED, ROOT, STEPS, TOWER_LR, llava_flags, run_module
from safetensors.torch import load_file


def tower_state(path):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(path).state_dict()


def test_stage1_writes_full_adapter_and_persists_the_layer_spec(runs):
    adapter = torch.load(os.path.join(runs["pre"], "mm_projector.bin"))
    # 8-block tower, main -2 -> block 7, default stride 8 // 4 = 2 -> taps 6, 4, 2: 4 layers x 32 channels
    assert {k: tuple(v.shape) for k, v in adapter.items()} == {
        "model.mm_projector.0.weight": (64, 4 * 32), "model.mm_projector.0.bias": (64,),
        "model.mm_projector.2.weight": (64, 64), "model.mm_projector.2.bias": (64,)}
    config = json.load(open(os.path.join(runs["pre"], "config.json")))
    assert config["mm_projector_type"] == "detached_mlp_multilayer"
    assert config["mm_vision_skip_layers"] == [6, 4, 2]
    assert config["mm_vision_detach_depth"] == 2
    assert config["unfreeze_mm_vision_tower"] is False


def test_joint_stage_trains_the_tower_at_its_own_learning_rate(runs, tiny_assets):
    saved = load_file(os.path.join(runs["ft"], "model.safetensors"))
    config = json.load(open(os.path.join(runs["ft"], "config.json")))
    assert config["unfreeze_mm_vision_tower"] is True and config["mm_vision_tower_lr"] == TOWER_LR
    original = tower_state(tiny_assets["vision_tower"])
    prefix = "model.vision_tower.vision_tower."
    tower_delta = max((saved[prefix + k].float() - v.float()).abs().max().item() for k, v in original.items())
    # Adam moves a weight by about lr per step; the LLM (lr 1e-3) moves ~1000x more than the tower
    assert 0 < tower_delta < 3 * STEPS * TOWER_LR
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_assets["llm"]).state_dict()
    llm_delta = max((saved[k].float() - v.float()).abs().max().item() for k, v in llm.items() if k in saved)
    assert llm_delta > 1e-4 > 3 * STEPS * TOWER_LR


def reference_forward(checkpoint, tiny_assets, pixels, input_ids):
    """Image features and logits computed by hand from the raw checkpoint file (no llava code)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    raw = {k: v.half().float() for k, v in load_file(os.path.join(checkpoint, "model.safetensors")).items()}
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tiny_assets["vision_tower"]))
    prefix = "model.vision_tower.vision_tower."
    tower.load_state_dict({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)})
    states = tower(pixels, output_hidden_states=True).hidden_states
    fused = torch.cat([states[i] for i in (7, 6, 4, 2)], dim=-1)[:, 1:]   # main, then taps deep -> shallow
    hidden = F.linear(fused, raw["model.mm_projector.0.weight"], raw["model.mm_projector.0.bias"])
    features = F.linear(F.gelu(hidden), raw["model.mm_projector.2.weight"], raw["model.mm_projector.2.bias"])

    llm = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_assets["llm"]))
    llm.load_state_dict({k: v for k, v in raw.items() if "vision_tower" not in k and "mm_projector" not in k})
    position = (input_ids[0] == -200).nonzero().item()
    embed = llm.get_input_embeddings()
    embeds = torch.cat([embed(input_ids[:, :position]), features, embed(input_ids[:, position + 1:])], dim=1)
    return features, llm(inputs_embeds=embeds).logits


def test_checkpoint_reloads_through_llava_with_trained_tower_and_same_logits(runs, tiny_assets):
    import llava_dsl

    llava_dsl.register()
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    tokenizer, model, processor, _ = load_pretrained_model(runs["ft"], None, "llava-ft", device_map="cpu", device="cpu")
    saved = load_file(os.path.join(runs["ft"], "model.safetensors"))
    loaded = model.state_dict()
    assert [k for k, v in saved.items() if not torch.equal(v.half(), loaded[k])] == []
    original = tower_state(tiny_assets["vision_tower"])
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(model.get_vision_tower().vision_tower.state_dict()[key], original[key].half())

    model = model.float().eval()
    image = Image.open(os.path.join(tiny_assets["image_folder"], sorted(os.listdir(tiny_assets["image_folder"]))[0]))
    pixels = process_images([image.convert("RGB")], processor, model.config).float()
    input_ids = tokenizer_image_token("USER: <image>\nWhat is written in the image? ASSISTANT:", tokenizer,
                                      return_tensors="pt").unsqueeze(0)
    with torch.no_grad():
        features = model.encode_images(pixels)
        logits = model(input_ids=input_ids, images=pixels).logits
        ref_features, ref_logits = reference_forward(runs["ft"], tiny_assets, pixels, input_ids)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_stock_mlp2x_gelu_training_is_unchanged_by_the_plugin(tiny_assets, tmp_path):
    stock, plugin = str(tmp_path / "llava-stock"), str(tmp_path / "llava-plugin")
    flags = lambda out: llava_flags(tiny_assets, "pretrain", out, projector="mlp2x_gelu")
    # stock LLaVA, seeded the way llava_dsl.train seeds (before the projector is built)
    run_module("-c", ["import sys, transformers; transformers.set_seed(42); import llava.train.train as t; "
                      "t.train()"] + flags(stock), launcher=[__import__("sys").executable])
    run_module("llava_dsl.train", flags(plugin))
    a = torch.load(os.path.join(stock, "mm_projector.bin"))
    b = torch.load(os.path.join(plugin, "mm_projector.bin"))
    assert sorted(a) == sorted(b) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                      "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: [e["loss"] for e in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
                          if "loss" in e]
    assert losses(stock) == losses(plugin) and len(losses(stock)) == STEPS


@pytest.mark.parametrize("extra, fragments", [
    ({"mm_vision_skip_layers": "6,9"}, ["--mm_vision_skip_layers='6,9'", "9", "8 blocks"]),
    ({"mm_vision_skip_layers": "2,4", "mm_vision_skip_stride": 2}, ["--mm_vision_skip_stride=2", "both"]),
    ({"mm_vision_detach_depth": 4}, ["--mm_vision_detach_depth=4", "0..3", "8-block"]),
    ({"mm_projector_type": "mlp2x_gelu", "mm_vision_skip_stride": 2}, ["--mm_vision_skip_stride=2", "'mlp2x_gelu'"]),
    ({"mm_vision_tower_lr": 1e-5}, ["--mm_vision_tower_lr=1e-05", "--unfreeze_mm_vision_tower True"]),
    ({"unfreeze_mm_vision_tower": True}, ["--unfreeze_mm_vision_tower True", "--tune_mm_mlp_adapter True"]),
])
def test_bad_flags_fail_with_a_message_naming_flag_and_value(tiny_assets, tmp_path, extra, fragments):
    flags = llava_flags(tiny_assets, "pretrain", str(tmp_path / "llava-bad"), **extra)
    result = run_module("llava_dsl.train", flags, check=False)
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def test_mismatched_or_corrupt_adapter_is_refused_naming_file_and_shapes(tiny_assets, tmp_path):
    single = str(tmp_path / "llava-single")
    run_module("llava_dsl.train", llava_flags(tiny_assets, "pretrain", single, projector="mlp2x_gelu", max_steps=1))
    adapter = os.path.join(single, "mm_projector.bin")
    result = run_module("llava_dsl.train", llava_flags(
        tiny_assets, "finetune", str(tmp_path / "llava-ft"), pretrain_mm_mlp_adapter=adapter, max_steps=1), check=False)
    assert result.returncode != 0
    for fragment in [adapter, "(64, 32)", "(64, 128)", "detached_mlp_multilayer"]:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])

    truncated = str(tmp_path / "truncated.bin")
    with open(adapter, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[:200])
    result = run_module("llava_dsl.train", llava_flags(
        tiny_assets, "finetune", str(tmp_path / "llava-ft2"), projector="mlp2x_gelu",
        pretrain_mm_mlp_adapter=truncated, max_steps=1), check=False)
    assert result.returncode != 0 and f"--pretrain_mm_mlp_adapter={truncated}" in result.stderr


def test_zero3_loads_adapter_into_partitioned_projector_and_saves_on_cpu(runs, tiny_assets):
    """Finetuning from a LLaVA checkpoint builds the projector inside zero.Init (partitioned, shape (0,));
    upstream LLaVA then fails to load --pretrain_mm_mlp_adapter. With lr 0 the saved projector must equal it."""
    out = str(runs["out"] / "llava-zero3")
    adapter = os.path.join(runs["pre"], "mm_projector.bin")
    flags = llava_flags(tiny_assets, "finetune", out, model_name_or_path=runs["ft"], pretrain_mm_mlp_adapter=adapter,
                        unfreeze_mm_vision_tower=True, learning_rate=0, max_steps=2, per_device_train_batch_size=2,
                        deepspeed=os.path.join(ROOT, "scripts/zero3/zero3.json"))
    run_module("llava_dsl.train", flags, env={"OMP_NUM_THREADS": "1"},
               launcher=[DEEPSPEED, "--num_gpus", "2", "--master_port", "29631", "--module"])
    saved = load_file(os.path.join(out, "model.safetensors"))
    before = load_file(os.path.join(runs["ft"], "model.safetensors"))
    for key, value in torch.load(adapter).items():
        assert saved[key].shape == value.shape
        assert torch.equal(saved[key], value), key
        assert not torch.equal(before[key], value)
    tower_key = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(saved[tower_key], before[tower_key])  # gathered full shapes, trained tower carried over


def test_register_is_idempotent_and_leaves_llava_types_alone():
    import llava_dsl
    from llava_dsl.plugin import is_registered
    from llava_dsl.skip_links.llava_patches import _UPSTREAM_BUILD_VISION_PROJECTOR, build_vision_projector

    llava_dsl.register()
    llava_dsl.register()
    assert is_registered()
    from types import SimpleNamespace

    import llava.model.llava_arch as arch

    config = SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=32, hidden_size=64)
    ours, upstream = arch.build_vision_projector(config), _UPSTREAM_BUILD_VISION_PROJECTOR(config)
    assert repr(ours) == repr(upstream)
    assert arch.build_vision_projector is build_vision_projector
