"""Export to Hugging Face ``LlavaForConditionalGeneration``: stock transformers reproduces the LLaVA model.

Tiny checkpoints come from the real entry point (``python -m llava_dsl.train``), exports from
``python -m llava_dsl.export_hf``. The LLaVA side runs here (transformers 4.37.2, plugin registered); the Hugging
Face side runs in a subprocess with the separate ``.venv-hf`` (``make venv-hf``; ``make test`` builds it), through
``scripts/hf_env/hf_llava_check.py``, where neither ``llava`` nor ``llava_dsl`` can be imported.
"""
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from support import ROOT, llava_flags, run_module
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from llava_dsl import export_hf

HF_VENV = os.path.join(ROOT, ".venv-hf")
HF_PYTHON = os.environ.get("LLAVA_DSL_HF_PYTHON", os.path.join(HF_VENV, "bin", "python"))
HF_STAMP = os.path.join(HF_VENV, ".llava-dsl-hf-installed")
HF_SCRIPT = os.path.join(ROOT, "scripts", "hf_env", "hf_llava_check.py")
LOGIT_TOL = 1e-4
NEW_TOKENS = 4
STEPS = 2
TOWER_LR = 1e-3  # large enough that the trained tower differs from the original even after fp16 rounding
TOWER = "model.vision_tower.vision_tower."
# (first user turn, shown with the image; then alternating assistant / user turns)
SINGLE_TURN = ["What is written here?"]
MULTI_TURN = ["What is written here?", "cat", "Is it a number?"]


def read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def pinned_transformers() -> str:
    with open(os.path.join(ROOT, "scripts", "hf_env", "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("transformers=="):
                return line.split("==", 1)[1].strip()
    raise AssertionError("scripts/hf_env/constraints.txt pins no transformers version")


def hf_python() -> str:
    if "LLAVA_DSL_HF_PYTHON" not in os.environ and not os.path.isfile(HF_STAMP):
        pytest.fail(f"the Hugging Face environment {HF_VENV} is missing or half-built (no {HF_STAMP}); build it with "
                    f"`make venv-hf` (`make test` builds it first), or point LLAVA_DSL_HF_PYTHON at a python with "
                    f"the packages of scripts/hf_env/requirements.txt")
    return HF_PYTHON


# --------------------------------------------------------------------------------------------------
# Checkpoints: two trained, two derived from the stock one (same trained weights, another LLaVA option).
# --------------------------------------------------------------------------------------------------
def derive_checkpoint(source, target, config_changes, projector=None):
    shutil.copytree(source, target)
    config = {**read_json(target, "config.json"), **config_changes}
    with open(os.path.join(target, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if projector is not None:
        weights_path = os.path.join(target, "model.safetensors")
        weights = {k: v for k, v in load_file(weights_path).items() if not k.startswith("model.mm_projector.")}
        weights.update({"model.mm_projector." + k: v.detach().clone() for k, v in projector.state_dict().items()})
        save_file(weights, weights_path, metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def checkpoints(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_hf")
    paths = {name: str(out / f"llava-{name}") for name in ("pre", "dsl", "stock", "linear", "cls_patch")}
    steps = {"max_steps": STEPS}
    with ThreadPoolExecutor(2) as pool:  # stage 1 and the stock stage 2 do not depend on each other
        jobs = [pool.submit(run_module, "llava_dsl.train", llava_flags(tiny_assets, "pretrain", paths["pre"], **steps)),
                pool.submit(run_module, "llava_dsl.train", llava_flags(tiny_assets, "finetune", paths["stock"],
                                                                       projector="mlp2x_gelu", **steps))]
        for job in jobs:
            job.result()
    run_module("llava_dsl.train", llava_flags(
        tiny_assets, "finetune", paths["dsl"], pretrain_mm_mlp_adapter=os.path.join(paths["pre"], "mm_projector.bin"),
        unfreeze_mm_vision_tower=True, mm_vision_tower_lr=TOWER_LR, **steps))
    stock = read_json(paths["stock"], "config.json")
    torch.manual_seed(0)
    linear = torch.nn.Linear(stock["mm_hidden_size"], stock["hidden_size"])  # what LLaVA builds for 'linear'
    derive_checkpoint(paths["stock"], paths["linear"], {"mm_projector_type": "linear"}, linear)
    derive_checkpoint(paths["stock"], paths["cls_patch"], {"mm_vision_select_feature": "cls_patch"})
    return {**paths, "out": str(out)}


@pytest.fixture(scope="module")
def images(tiny_assets, tmp_path_factory):
    square = os.path.join(tiny_assets["image_folder"], min(os.listdir(tiny_assets["image_folder"])))
    # Not square, so LLaVA's expand2square ('pad') and the exported processor's do_pad both have work to do.
    wide = str(tmp_path_factory.mktemp("images") / "wide.png")
    picture = Image.new("RGB", (48, 28), (200, 40, 90))
    ImageDraw.Draw(picture).text((4, 6), "42", fill=(250, 250, 250))
    picture.save(wide)
    return {"square": square, "wide": wide}


CASES = {  # checkpoint -> (image, conversation)
    "dsl": ("square", SINGLE_TURN),
    "stock": ("wide", MULTI_TURN),
    "linear": ("square", SINGLE_TURN),
    "cls_patch": ("wide", SINGLE_TURN),
}


SHARD_BYTES = 200_000  # the tiny model is ~0.4 MB: forces several shards


@pytest.fixture(scope="module")
def exports(checkpoints):
    out = {name: os.path.join(checkpoints["out"], f"hf-{name}") for name in list(CASES) + ["stock_sharded"]}
    run_module("llava_dsl.export_hf", ["--model-path", checkpoints["dsl"], "--output-dir", out["dsl"]])
    for name in CASES:
        if name != "dsl":
            export_hf.main(["--model-path", checkpoints[name], "--output-dir", out[name]])
    export_hf.main(["--model-path", checkpoints["stock"], "--output-dir", out["stock_sharded"],
                    "--max-shard-size", f"{SHARD_BYTES}B"])
    return out


# --------------------------------------------------------------------------------------------------
# The LLaVA side: LLaVA's own loader, prompt, tokenizer_image_token, process_images, forward, generate.
# --------------------------------------------------------------------------------------------------
def restore_exact_weights(model, checkpoint):
    """LLaVA's loader hard-codes float16 (llava/model/builder.py); rounding would swamp a 1e-4 comparison.

    Put back the stored fp32 values, taken from the files LLaVA's loader reads (the checkpoint; for a frozen tower
    config.mm_vision_tower, which clip_encoder.py re-reads), after checking each rounds to what it loaded.
    """
    loaded = model.state_dict()
    config = read_json(checkpoint, "config.json")
    exact = load_file(os.path.join(checkpoint, "model.safetensors"))
    if not config.get("unfreeze_mm_vision_tower"):
        from transformers import CLIPVisionModel

        exact = {k: v for k, v in exact.items() if not k.startswith(TOWER)}
        original = CLIPVisionModel.from_pretrained(config["mm_vision_tower"]).state_dict()
        exact.update({TOWER + k: v for k, v in original.items()})
    assert set(exact) == set(loaded)
    mismatched = [k for k, v in loaded.items() if not torch.equal(exact[k].to(v.dtype), v)]
    assert not mismatched, f"LLaVA loaded other values than the stored ones for {mismatched[:5]}"
    model.float()
    model.load_state_dict({k: v.float() for k, v in exact.items()})
    model.eval()


def llava_conversation(turns):
    from llava.conversation import conv_templates

    conversation = conv_templates["vicuna_v1"].copy()
    for i, text in enumerate(turns):
        conversation.append_message(conversation.roles[i % 2], ("<image>\n" + text) if i == 0 else text)
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()


def hf_messages(turns):
    messages = []
    for i, text in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]
        messages.append({"role": ("user", "assistant")[i % 2], "content": content})
    return messages


def llava_side(checkpoint, image_path, turns):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    import llava_dsl

    llava_dsl.register()
    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, os.path.basename(checkpoint),
                                                           device_map="cpu", device="cpu")
    restore_exact_weights(model, checkpoint)
    prompt = llava_conversation(turns)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    image = Image.open(image_path).convert("RGB")
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        logits = model(input_ids=input_ids, images=pixels, image_sizes=[image.size]).logits
        generated = model.generate(input_ids, images=pixels, image_sizes=[image.size], do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return {"prompt": prompt, "input_ids": input_ids[0].tolist(), "pixel_values": pixels, "logits": logits,
            "generated": generated[0].tolist(), "bos": tokenizer.bos_token_id, "vocab": len(tokenizer)}


def expand_image(input_ids, image_token_index, image_seq_length):
    """LLaVA splices the image at the -200 sentinel; HF expects image_seq_length <image> tokens there."""
    from llava.constants import IMAGE_TOKEN_INDEX

    expanded = []
    for token in input_ids:
        expanded += [image_token_index] * image_seq_length if token == IMAGE_TOKEN_INDEX else [token]
    return expanded


@pytest.fixture(scope="module")
def compared(checkpoints, exports, images, tmp_path_factory):
    python = hf_python()
    llava, request = {}, []
    for name, (image, turns) in CASES.items():
        llava[name] = llava_side(checkpoints[name], images[image], turns)
        config = read_json(exports[name], "config.json")
        hf_ids = expand_image(llava[name]["input_ids"], config["image_token_index"], config["image_seq_length"])
        llava[name]["hf_input_ids"] = hf_ids
        request.append({"model_dir": exports[name], "input_ids": torch.tensor([hf_ids]),
                        "pixel_values": llava[name]["pixel_values"], "max_new_tokens": NEW_TOKENS,
                        "min_new_tokens": NEW_TOKENS, "messages": hf_messages(turns), "images": [images[image]]})
    request.append({**request[list(CASES).index("stock")], "model_dir": exports["stock_sharded"]})
    work = tmp_path_factory.mktemp("hf_side")
    request_path, result_path = str(work / "request.pt"), str(work / "result.pt")
    torch.save(request, request_path)
    # No PYTHONPATH: the export must load without this repository; offline: nothing may come from the hub.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([python, HF_SCRIPT, request_path, result_path], capture_output=True, text=True,
                            env=env, cwd=str(work), timeout=600, check=False)
    assert result.returncode == 0, f"{python} {HF_SCRIPT} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    hf = dict(zip(list(CASES) + ["stock_sharded"], torch.load(result_path, weights_only=False), strict=True))
    return {"llava": llava, "hf": hf}


# --------------------------------------------------------------------------------------------------
# Equality of the models.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_stock_transformers_reproduces_llava_logits_and_greedy_tokens(compared, name):
    llava, hf = compared["llava"][name], compared["hf"][name]
    vocab = llava["vocab"]
    assert hf["logits"].shape[:2] == llava["logits"].shape[:2], "the expanded <image> must line up with LLaVA's splice"
    assert hf["logits"].shape[-1] == vocab + 1  # + <image>; the checkpoint already pads with <unk>
    text = torch.tensor(llava["hf_input_ids"]) != hf["config"]["image_token_index"]
    diff = (hf["logits"][0, :, :vocab] - llava["logits"][0]).abs()
    print(f"{name}: max |logit diff| text positions {diff[text].max().item():.3g}, all {diff.max().item():.3g}")
    assert text.sum() > 0 and (~text).sum() > 0
    assert diff[text].max().item() < LOGIT_TOL
    assert diff.max().item() < LOGIT_TOL
    # The added token's lm_head row is the mean row, so its logit never beats the best real token.
    assert (hf["logits"][0, :, vocab] <= hf["logits"][0, :, :vocab].max(dim=-1).values).all()
    assert llava["generated"][0] == llava["bos"]  # LLaVA's generate from inputs_embeds starts with BOS
    assert len(hf["generated"]) == NEW_TOKENS
    assert hf["generated"] == llava["generated"][1:]


def test_export_loads_in_stock_transformers_without_the_plugin_or_warnings(compared):
    for name, hf in compared["hf"].items():
        assert hf["plugin_importable"] == {"llava": False, "llava_dsl": False}, name
        assert hf["versions"]["transformers"] == pinned_transformers(), name
        assert hf["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                      "error_msgs": []}, name
        assert hf["model_warnings"] == [], name
        assert hf["lm_head_tied"] is False, name


def test_sharded_export_loads_to_the_same_model(compared, exports):
    folder = exports["stock_sharded"]
    index = read_json(folder, "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not os.path.exists(os.path.join(folder, "model.safetensors"))
    assert all(os.path.getsize(os.path.join(folder, shard)) < 2 * SHARD_BYTES for shard in shards)
    sharded, single = compared["hf"]["stock_sharded"], compared["hf"]["stock"]
    assert sharded["loading_info"]["missing_keys"] == [] and sharded["loading_info"]["unexpected_keys"] == []
    assert torch.equal(sharded["logits"], single["logits"])
    assert sharded["generated"] == single["generated"]


# --------------------------------------------------------------------------------------------------
# What the export says about the checkpoint.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_config_fields_round_trip_through_transformers(compared, checkpoints, exports, tiny_assets, name):
    source = read_json(checkpoints[name], "config.json")
    tower = read_json(tiny_assets["vision_tower"], "config.json")
    blocks, patches = tower["num_hidden_layers"], (tower["image_size"] // tower["patch_size"]) ** 2
    main = blocks + 1 + source["mm_vision_select_layer"]  # LLaVA's -2 -> hidden_states[blocks - 1]
    full = source.get("mm_vision_select_feature") == "cls_patch"
    taps = source.get("mm_vision_skip_layers")
    expected = {
        "vision_feature_layer": [main] + taps if taps else main,
        "vision_feature_select_strategy": "full" if full else "default",
        "image_token_index": compared["llava"][name]["vocab"],
        "image_seq_length": patches + (1 if full else 0),
        "projector_hidden_act": "linear" if source["mm_projector_type"] == "linear" else "gelu",
        "multimodal_projector_bias": True,
    }
    hf = compared["hf"][name]
    written = read_json(exports[name], "config.json")
    assert hf["config"] == expected
    assert {k: written[k] for k in expected} == expected
    assert hf["vision_hidden_size"] == tower["hidden_size"]
    assert hf["text_vocab_size"] == compared["llava"][name]["vocab"] + 1
    if name == "dsl":
        assert expected["vision_feature_layer"] == [7, 6, 4, 2]  # main, then the taps deep -> shallow


@pytest.mark.parametrize("name", CASES)
def test_processor_and_chat_template_reproduce_llava_inputs(compared, exports, name):
    llava, hf = compared["llava"][name], compared["hf"][name]
    assert os.path.isfile(os.path.join(exports[name], "tokenizer.json"))  # what servers read; loaded here too
    assert hf["processor_classes"] == ["LlamaTokenizerFast", "LlavaImageProcessor"]
    # The template renders "<image> ": LLaVA tokenizes the text after the image as a fresh sequence, which starts
    # with SentencePiece's dummy-prefix piece.
    assert hf["prompt"] == llava["prompt"].replace("<image>", "<image> ")
    assert hf["processor_input_ids"] == llava["hf_input_ids"]
    assert hf["processor_pixel_values"].shape == llava["pixel_values"].shape
    assert torch.allclose(hf["processor_pixel_values"], llava["pixel_values"], rtol=0, atol=1e-6)


def test_export_takes_the_trained_tower_only_when_it_was_trained(checkpoints, exports, tiny_assets):
    from transformers import CLIPVisionModel

    original = CLIPVisionModel.from_pretrained(tiny_assets["vision_tower"]).state_dict()
    trained = {k[len(TOWER):]: v for k, v in load_file(os.path.join(checkpoints["dsl"], "model.safetensors")).items()
               if k.startswith(TOWER)}
    for name, expected in (("dsl", trained), ("stock", original)):
        exported = {k[len("vision_tower."):]: v for k, v in load_file(os.path.join(exports[name], "model.safetensors"))
                    .items() if k.startswith("vision_tower.")}
        assert set(exported) == set(original), name
        assert all(torch.equal(exported[k], expected[k].float()) for k in original), name
    # Discriminating: the joint stage moved the tower by more than fp16 rounding.
    assert any(not torch.equal(trained[k].half(), original[k].half()) for k in original)


# --------------------------------------------------------------------------------------------------
# Refusals.
# --------------------------------------------------------------------------------------------------
REFUSED = {
    "mlp3x_gelu_multilayer": ({"mm_projector_type": "detached_mlp3x_gelu_multilayer",
                               "mm_vision_skip_layers": [6, 4, 2]}, "exactly two Linear"),
    "mlp3x_gelu": ({"mm_projector_type": "mlp3x_gelu"}, "exactly two"),
    "identity": ({"mm_projector_type": "identity"}, "no weights"),
    "im_start_end": ({"mm_use_im_start_end": True}, "<im_start>/<im_end>"),
    "anyres": ({"image_aspect_ratio": "anyres"}, "LLaVA-NeXT"),
    "dpvr_lf": ({"mm_routing": "dpvr_lf", "dpvr_route_layer": 2, "dpvr_side_init_layer": 2,
                 "dpvr_side_attention": "vision"}, "mm_routing='dpvr_lf'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_checkpoints_are_refused_before_anything_is_written(case, tiny_assets, tmp_path):
    changes, reason = REFUSED[case]
    config = {"model_type": "llava_llama", "mm_vision_tower": tiny_assets["vision_tower"],
              "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "hidden_size": 64, "mm_hidden_size": 32, **changes}
    checkpoint = tmp_path / "llava-refused"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config))
    output = tmp_path / "hf"
    with pytest.raises(SystemExit) as refused:
        export_hf.main(["--model-path", str(checkpoint), "--output-dir", str(output)])
    message = str(refused.value)
    assert reason in message and str(checkpoint) in message
    assert not output.exists()


def test_stage1_output_is_refused_with_the_reason(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match="stage-1"):
        export_hf.main(["--model-path", checkpoints["pre"], "--output-dir", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_no_plugin_key_reaches_the_text_config():
    from llava_dsl.config_schema import PLUGIN_CONFIG_KEYS

    config = {"hidden_size": 64, "num_hidden_layers": 2, **{key.name: 1 for key in PLUGIN_CONFIG_KEYS}}
    text = export_hf.text_config_from(config, vocab_size=100)
    assert not set(text) & {key.name for key in PLUGIN_CONFIG_KEYS}
    assert text["hidden_size"] == 64 and text["num_hidden_layers"] == 2


# --------------------------------------------------------------------------------------------------
# The detach choice travels: export -> llava_dsl.hf continues with the same taps detached.
# --------------------------------------------------------------------------------------------------
HF_GRADIENT_SCRIPT = os.path.join(ROOT, "tests", "export", "hf_dsl_gradient.py")
LLAVA_TOWER_PARAMS = "model.vision_tower.vision_tower."


@pytest.fixture(scope="module")
def detach_exports(checkpoints, exports):
    """The DSL checkpoint (default detach depth: taps [4, 2] of [6, 4, 2]), the same weights persisted with depth 1
    (tap 2 only: not the default, so an export that dropped the choice would be caught), and as naive fusion."""
    out = checkpoints["out"]
    derived = {"dsl_depth1": {"mm_vision_detach_depth": 1},
               "naive": {"mm_projector_type": "mlp_multilayer", "mm_vision_detach_depth": 0}}
    paths, folders = {"dsl": checkpoints["dsl"]}, {"dsl": exports["dsl"]}
    for name, changes in derived.items():
        paths[name] = derive_checkpoint(checkpoints["dsl"], os.path.join(out, f"llava-{name}"), changes)
        folders[name] = os.path.join(out, f"hf-{name}")
        export_hf.main(["--model-path", paths[name], "--output-dir", folders[name]])
    return paths, folders


def llava_for_gradients(checkpoint, image_path, turns):
    """LLaVA's own loader (the plugin's tower and detached projector from the checkpoint's config), float32 weights
    as stored, every parameter trainable; LLaVA's prompt ids and pixels. Returns (model, tokenizer, input_ids,
    pixels, image size)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    import llava_dsl

    llava_dsl.register()
    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, os.path.basename(checkpoint),
                                                           device_map="cpu", device="cpu")
    restore_exact_weights(model, checkpoint)
    model.requires_grad_(True)
    input_ids = tokenizer_image_token(llava_conversation(turns), tokenizer, IMAGE_TOKEN_INDEX,
                                      return_tensors="pt").unsqueeze(0)
    image = Image.open(image_path).convert("RGB")
    pixels = process_images([image], processor, model.config)
    return model, tokenizer, input_ids, pixels, image.size


def next_token_loss(logits, targets, vocab):
    """Cross-entropy over the checkpoint's vocabulary, the formula tests/export/hf_dsl_gradient.py uses."""
    return torch.nn.functional.cross_entropy(logits[0, :-1, :vocab].float(), targets, ignore_index=-100)


@pytest.fixture(scope="module")
def detach_gradients(detach_exports, images, tmp_path_factory):
    paths, folders = detach_exports
    llava, request = {}, []
    for name in ("dsl", "dsl_depth1"):
        model, tokenizer, input_ids, pixels, size = llava_for_gradients(paths[name], images["square"], SINGLE_TURN)
        config = read_json(folders[name], "config.json")
        hf_ids = torch.tensor(expand_image(input_ids[0].tolist(), config["image_token_index"],
                                           config["image_seq_length"]))
        targets = hf_ids[1:].clone()
        targets[targets == config["image_token_index"]] = -100
        logits = model(input_ids=input_ids, images=pixels, image_sizes=[size]).logits
        assert logits.shape[1] == len(hf_ids)
        next_token_loss(logits, targets, len(tokenizer)).backward()
        llava[name] = {n[len(LLAVA_TOWER_PARAMS):]: p.grad.detach().clone() for n, p in model.named_parameters()
                       if n.startswith(LLAVA_TOWER_PARAMS) and p.grad is not None}
        request.append({"model_dir": folders[name], "input_ids": hf_ids.unsqueeze(0), "pixel_values": pixels,
                        "targets": targets, "vocab": len(tokenizer)})
    work = tmp_path_factory.mktemp("hf_detach")
    request_path, result_path = str(work / "request.pt"), str(work / "result.pt")
    torch.save(request, request_path)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([hf_python(), HF_GRADIENT_SCRIPT, request_path, result_path], capture_output=True,
                            text=True, env=env, cwd=str(work), timeout=600, check=False)
    assert result.returncode == 0, f"{HF_GRADIENT_SCRIPT} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return llava, dict(zip(("dsl", "dsl_depth1"), torch.load(result_path, weights_only=False), strict=True))


def test_export_writes_the_detached_taps_and_a_naive_export_none(detach_exports, exports):
    _, folders = detach_exports
    assert read_json(folders["dsl"], "config.json")["dsl_detach_layers"] == [4, 2]  # the default: first half
    assert read_json(folders["dsl_depth1"], "config.json")["dsl_detach_layers"] == [2]
    for name in ("naive", "stock"):
        assert "dsl_detach_layers" not in read_json(folders.get(name) or exports[name], "config.json"), name


@pytest.mark.parametrize("name, detached", [("dsl", [4, 2]), ("dsl_depth1", [2])])
def test_llava_dsl_hf_continues_an_export_with_the_llava_paths_gradient(detach_gradients, name, detached):
    """The export, loaded by stock transformers and re-applied with llava_dsl.hf from its config alone, gives the
    vision tower the gradient the LLaVA path gives it on the same image and tokens; naive fusion does not."""
    llava, hf = detach_gradients[0][name], detach_gradients[1][name]
    assert hf["loaded"] == detached and hf["applied"] == detached
    assert llava.keys() == hf["dsl"].keys() and any(".layers.0." in k for k in llava)
    scale = max(g.abs().max().item() for g in llava.values())
    worst = max((hf["dsl"][k] - llava[k]).abs().max().item() for k in llava)
    # the shallowest detached tap's blocks: the skip part of their gradient is what detaching removes
    shallow = [k for k in llava if any(f".layers.{i}." in k for i in range(min(detached)))]
    naive_off = max((hf["naive"][k] - llava[k]).abs().max().item() for k in shallow)
    print(f"{name}: max |tower grad| {scale:.3g}, max |HF dsl - LLaVA| {worst:.3g}, "
          f"max |HF naive - LLaVA| on blocks 1..{min(detached)} {naive_off:.3g}")
    assert worst <= 1e-4 * scale, (worst, scale)
    assert naive_off > 100 * worst and naive_off > 1e-3 * scale, (naive_off, worst)


def test_an_rprobe_aux_head_is_dropped_by_name_and_the_rest_exported_unchanged(checkpoints, exports, tmp_path,
                                                                                 capsys):
    """An --rprobe_aux_weight run saves its probe as rprobe_head.* (llava_dsl.rprobe.aux_loss): training-only."""
    from transformers import LlamaConfig

    from llava_dsl.rprobe.model import RProbe

    source = read_json(checkpoints["dsl"], "config.json")
    llm = LlamaConfig(**{k: source[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads", "num_hidden_layers", "rms_norm_eps")})
    head = {"rprobe_head." + k: v for k, v in RProbe(llm, 1, pixels_per_token=48).state_dict().items()}
    checkpoint = derive_checkpoint(checkpoints["dsl"], str(tmp_path / "llava-aux"), {})
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    save_file({**weights, **head}, os.path.join(checkpoint, "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    export_hf.main(["--model-path", checkpoint, "--output-dir", str(tmp_path / "hf-aux")])
    err = capsys.readouterr().err
    assert f"dropped {len(head)} rprobe_head.* tensors: the R-Probe auxiliary-loss head" in err, err
    exported = load_file(str(tmp_path / "hf-aux" / "model.safetensors"))
    plain = load_file(os.path.join(exports["dsl"], "model.safetensors"))
    assert exported.keys() == plain.keys()
    assert all(torch.equal(exported[k], plain[k]) for k in plain)
