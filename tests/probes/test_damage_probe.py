"""The damage probe: linear probes on frozen features of each tapped block, a checkpoint's tower against the
pretrained one, through `python -m llava_dsl.probes damage` on a LLaVA-1.5 checkpoint folder."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from support import run_module
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_dsl.export_hf import LLAVA_PREFIX_TOWER
from llava_dsl.probes.damage import DamageSettings, damage_probe
from llava_dsl.probes.towers import ProbeError, load_tower

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = DamageSettings(num_train=240, num_test=120)


def llava_checkpoint(folder, tower_path, tower_state, **config):
    """A LLaVA-1.5 stage-2 folder as LLaVA saves it with --unfreeze_mm_vision_tower True: the plugin's config
    keys and the trained tower under model.vision_tower.vision_tower.* (plus an LM tensor, as in the real file)."""
    os.makedirs(folder, exist_ok=True)
    base = {"model_type": "llava_llama", "mm_vision_tower": tower_path, "mm_projector_type": "detached_mlp_multilayer",
            "mm_vision_select_layer": -2, "mm_vision_skip_layers": [1], "mm_vision_detach_depth": 1,
            "unfreeze_mm_vision_tower": True}
    json.dump({**base, **config}, open(os.path.join(folder, "config.json"), "w"))
    weights = {LLAVA_PREFIX_TOWER + k: v.contiguous() for k, v in tower_state.items()}
    weights["model.embed_tokens.weight"] = torch.zeros(4, 4)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=64, patch_size=8))
    pretrained = str(root / "clip-pretrained")
    clip.save_pretrained(pretrained)
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    scrambled = dict(state)
    g = torch.Generator().manual_seed(1)
    for key in [k for k in state if k.startswith("vision_model.encoder.layers.0.")]:  # block 1 re-initialised
        scrambled[key] = torch.randn(state[key].shape, generator=g)
    return {"pretrained": pretrained,
            "same": llava_checkpoint(str(root / "llava-same"), pretrained, state),
            "scrambled": llava_checkpoint(str(root / "llava-scrambled"), pretrained, scrambled),
            "frozen": llava_checkpoint(str(root / "llava-frozen"), pretrained, {}, unfreeze_mm_vision_tower=False,
                                       mm_projector_type="mlp_multilayer", mm_vision_detach_depth=None)}


def test_the_probe_tells_a_scrambled_shallow_block_from_the_pretrained_tower(towers, tmp_path):
    out = str(tmp_path / "damage.json")
    run_module("llava_dsl.probes", ["damage", towers["scrambled"], towers["same"], "--layers", "0,1,2",
                                    "--num-train", SETTINGS.num_train, "--num-test", SETTINGS.num_test,
                                    "--output", out], env={"OMP_NUM_THREADS": "1"})
    report = json.load(open(out))
    assert report["reference"]["source"] == towers["pretrained"]  # the checkpoint's mm_vision_tower by default
    scrambled, same = report["checkpoints"][towers["scrambled"]], report["checkpoints"][towers["same"]]
    assert (scrambled["main"], scrambled["taps"], scrambled["detached"]) == (2, [1], [1])
    # the embeddings are untouched: the same renders give the same numbers, exactly
    assert scrambled["vs_reference"]["0"] == {"glyph_accuracy": 0.0, "pixel_r2": 0.0}
    # block 1 re-initialised: the patch's own pixels are much less linearly decodable from it and above it
    for layer in ("1", "2"):
        assert scrambled["vs_reference"][layer]["pixel_r2"] < -0.05, scrambled["layers"]
    # the same weights loaded from the checkpoint: every number equal to the pretrained tower's (deterministic)
    assert all(v == {"glyph_accuracy": 0.0, "pixel_r2": 0.0} for v in same["vs_reference"].values())
    assert report["reference"]["layers"]["1"]["pixel_r2"] > 0.5
    for values in report["reference"]["layers"].values():
        assert values["glyph_patches"] > 100 and values["patches"] == SETTINGS.num_test * 64


def test_a_frozen_tower_checkpoint_is_the_pretrained_tower(towers):
    tower = load_tower(towers["frozen"])
    assert not tower.trained and "frozen" in tower.note and tower.detached == ()
    report = damage_probe([towers["frozen"]], settings=DamageSettings(num_train=60, num_test=30), log=lambda m: None)
    entry = report["checkpoints"][towers["frozen"]]
    assert report["layers"] == [1, 2]
    assert all(v == {"glyph_accuracy": 0.0, "pixel_r2": 0.0} for v in entry["vs_reference"].values())


def test_bad_inputs_are_named(towers, tmp_path):
    with pytest.raises(ProbeError, match=r"layers \[7\]: out of range .* 3 blocks"):
        damage_probe([towers["same"]], layers=[7], settings=DamageSettings(num_train=8, num_test=8), log=lambda m: None)
    empty = tmp_path / "llava-empty"
    empty.mkdir()
    with pytest.raises(ProbeError, match="no config.json"):
        load_tower(str(empty))
    broken = llava_checkpoint(str(tmp_path / "llava-broken"), towers["pretrained"], {})
    with pytest.raises(ProbeError, match="unfreeze_mm_vision_tower=True but the weights hold no"):
        load_tower(broken)
