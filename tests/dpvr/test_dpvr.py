"""DPVR-LF on a tiny 8-layer LLaVA (CPU): routing, side branch, KV cache, training freeze, attention analysis."""
import copy
import json
import os

import pytest
import torch
from support import run_module

from llava_dsl.dpvr.attention_share import query_positions, text_to_image_share
from llava_dsl.dpvr.cost import LLAVA_15_7B, prefill_flops, side_branch_parameters
from llava_dsl.dpvr.decoder import RoutedCache
from llava_dsl.dpvr.llava_patches import (
    CONFIG_KEYS,
    configure_routing,
    parameter_counts,
    prepare_routed_training,
    routed_parameter_names,
)
from llava_dsl.dpvr.spec import RoutingError, resolve_routing, suggest_route_layer

LAYERS = 8
ROUTE = 3  # joint 0-2, text-only 3-6, fusion 7


class Flags:
    """Model-argument stand-in carrying only the DPVR flags."""

    def __init__(self, **values):
        self.mm_routing = "dpvr_lf"
        self.dpvr_route_layer = None
        self.dpvr_attention_report = None
        self.dpvr_attention_threshold = None
        self.dpvr_side_init_layer = None
        self.dpvr_side_attention = "vision"
        self.dpvr_tune_fusion_layer = False
        self.__dict__.update(values)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llava(tiny_assets, tmp_path_factory):
    """A stock LLaVA over an 8-layer tiny LLaMA (random projector), in memory and saved as a checkpoint."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    import llava_dsl
    from llava_dsl.assets.tiny_models import build_language_model
    from llava_dsl.plugin import ModelArguments

    llava_dsl.register()
    root = tmp_path_factory.mktemp("dpvr")
    llm = build_language_model(str(root / "llm8"), tiny_assets["llm"], num_layers=LAYERS)
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM.from_pretrained(llm)
    model.get_model().initialize_vision_modules(ModelArguments(
        model_name_or_path=llm, vision_tower=tiny_assets["vision_tower"], mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu"))
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["llm"], use_fast=False)
    checkpoint = str(root / "llava-tiny8")
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return {"model": model, "tokenizer": tokenizer, "checkpoint": checkpoint, "root": root}


def image_path(tiny_assets, index):
    names = sorted(n for n in os.listdir(tiny_assets["image_folder"]) if n.endswith(".png"))
    return os.path.join(tiny_assets["image_folder"], names[index])


def prompt(llava, path, question="What is written in the image?"):
    """LLaVA-1.5's eval prompt (vicuna_v1) with one image: (input_ids, pixels)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), llava["tokenizer"], IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    model = llava["model"]
    image = Image.open(path).convert("RGB")
    return ids, process_images([image], model.get_vision_tower().image_processor, model.config)


def routed(llava, route=ROUTE, **flags):
    """A deep copy of the stock model, routed at ``route``."""
    from llava_dsl.dpvr.llava_patches import configure_routing

    model = copy.deepcopy(llava["model"])
    configure_routing(model.get_model(), Flags(dpvr_route_layer=str(route), **flags))
    return model


def image_mask_of(model, ids, pixels):
    from llava_dsl.dpvr.llava_patches import prepare_inputs_with_image_mask

    return prepare_inputs_with_image_mask(model, ids, None, None, None, None, pixels)


def test_routing_flags_fail_with_the_value_and_the_range(llava, tmp_path):

    with pytest.raises(RoutingError, match=r"--dpvr_route_layer=8: expected 0 <= R <= 7"):
        resolve_routing(LAYERS, 8)
    with pytest.raises(RoutingError, match=r"--dpvr_side_attention='text'"):
        resolve_routing(LAYERS, 3, side_attention="text")
    meta = copy.deepcopy(llava["model"]).get_model()
    with pytest.raises(RoutingError, match="needs --dpvr_route_layer"):
        configure_routing(meta, Flags())
    with pytest.raises(RoutingError, match="auto needs --dpvr_attention_report"):
        configure_routing(meta, Flags(dpvr_route_layer="auto"))
    with pytest.raises(RoutingError, match="given without --mm_routing dpvr_lf"):
        configure_routing(meta, Flags(mm_routing=None, dpvr_route_layer="3"))
    report = tmp_path / "attention_share.json"
    report.write_text(json.dumps({"shares": [0.5, 0.1], "threshold": 0.2}))
    with pytest.raises(RoutingError, match="has 2 per-layer shares; the language model being trained has 8"):
        configure_routing(meta, Flags(dpvr_route_layer="auto", dpvr_attention_report=str(report)))
    assert getattr(meta, "dpvr_side_branch", None) is None and getattr(meta.config, "mm_routing", None) is None


def test_nothing_routed_is_the_stock_model_exactly(llava, tiny_assets):
    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    stock = llava["model"]
    model = routed(llava, route=LAYERS - 1)
    assert model.config.mm_routing == "dpvr_lf" and getattr(model.get_model(), "dpvr_side_branch", None) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, images=pixels).logits, stock(input_ids=ids, images=pixels).logits)
        ours = model(input_ids=ids, images=pixels, output_attentions=True)  # the eager path
        theirs = stock(input_ids=ids, images=pixels, output_attentions=True)
    assert torch.equal(ours.logits, theirs.logits)
    assert all(torch.equal(a, b) for a, b in zip(ours.attentions, theirs.attentions))


def test_text_only_layers_never_attend_to_or_from_image_positions(llava, tiny_assets):
    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    model = routed(llava)
    image = image_mask_of(model, ids, pixels)[-1][0]
    after_image = torch.arange(image.numel()) > int(image.nonzero()[0])
    text_after = after_image & ~image
    with torch.no_grad():
        out = model(input_ids=ids, images=pixels, output_attentions=True)
    for layer, weights in enumerate(out.attentions):
        weights = weights[0]
        image_mass = weights[:, text_after][:, :, image].sum(-1)
        if layer in range(ROUTE, LAYERS - 1):
            assert torch.count_nonzero(weights[:, image]) == 0, f"layer {layer}: image queries attend"
            assert torch.count_nonzero(weights[:, :, image]) == 0, f"layer {layer}: text attends to image keys"
            text_rows = weights[:, ~image][:, :, ~image].sum(-1)
            assert torch.allclose(text_rows, torch.ones_like(text_rows), atol=1e-5)  # all mass stays on text
        else:  # joint and fusion layers do see the image (so the check above is not vacuous)
            assert bool((image_mass > 0.01).all()), f"layer {layer}: {image_mass.min()}"


def test_routed_forward_equals_stock_layers_with_blocked_attention(llava, tiny_assets):
    """Reference built from transformers' own layer forwards and 4D masks over the full-length sequence:
    text and image blocked from each other in layers [R, L-1), the side branch on image keys only."""
    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    model = routed(llava)
    meta = model.get_model()
    _, _, _, _, embeds, _, image = image_mask_of(model, ids, pixels)
    n = embeds.shape[1]
    positions = torch.arange(n)[None]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None]
    own = torch.eye(n, dtype=torch.bool)[None]  # rows outside a stream keep one key, to stay finite

    def bias(allowed):
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    def block(keep):
        return bias(causal & keep[:, :, None] & keep[:, None, :] | own)

    with torch.no_grad():
        h = embeds
        for layer in meta.layers[:ROUTE]:
            h = layer(h, attention_mask=bias(causal), position_ids=positions)[0]
        vision = meta.dpvr_side_branch.layer(h, attention_mask=block(image), position_ids=positions)[0]
        text = h
        for layer in meta.layers[ROUTE:LAYERS - 1]:
            text = layer(text, attention_mask=block(~image), position_ids=positions)[0]
        fused = torch.where(image[..., None], vision, text)
        fused = meta.layers[LAYERS - 1](fused, attention_mask=bias(causal), position_ids=positions)[0]
        expected = model.lm_head(meta.norm(fused))
        out = model(input_ids=ids, images=pixels, output_hidden_states=True)
    assert torch.allclose(out.logits, expected, atol=1e-5), (out.logits - expected).abs().max()
    assert torch.allclose(out.hidden_states[LAYERS - 1][image], vision[image], atol=1e-5)
    assert not torch.allclose(out.logits, llava["model"](input_ids=ids, images=pixels).logits, atol=1e-3)


def test_vision_states_reaching_the_fusion_layer_are_the_side_branch_output(llava, tiny_assets):
    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    model = routed(llava)
    side = model.get_model().dpvr_side_branch
    captured = {}
    side.register_forward_hook(lambda module, args, output: captured.update(out=output, inp=args[0]))
    image = image_mask_of(model, ids, pixels)[-1]
    with torch.no_grad():
        out = model(input_ids=ids, images=pixels, output_hidden_states=True)
    assert torch.equal(out.hidden_states[LAYERS - 1][image], captured["out"][0])
    assert torch.equal(out.hidden_states[ROUTE][image], captured["inp"][0])  # the branch takes the layer-R input
    assert not torch.equal(captured["out"], captured["inp"])


def test_side_branch_starts_as_the_documented_layer_and_reloads(llava, tiny_assets):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    for flags, source in (({}, ROUTE), ({"dpvr_side_init_layer": 5}, 5)):
        model = routed(llava, **flags)
        side = model.get_model().dpvr_side_branch.layer.state_dict()
        layer = model.get_model().layers[source].state_dict()
        assert side.keys() == layer.keys() and all(torch.equal(side[k], layer[k]) for k in side)
        other = model.get_model().layers[source + 1].state_dict()
        assert not torch.equal(side["mlp.up_proj.weight"], other["mlp.up_proj.weight"])
    config = {k: getattr(model.config, k) for k in CONFIG_KEYS}
    assert config == {"mm_routing": "dpvr_lf", "dpvr_route_layer": ROUTE, "dpvr_side_init_layer": 5,
                      "dpvr_side_attention": "vision", "dpvr_tune_fusion_layer": False, "dpvr_route_source": "flag"}
    with torch.no_grad():  # a trained branch differs from its source; the checkpoint must carry it
        model.get_model().dpvr_side_branch.layer.mlp.down_proj.weight.mul_(0.5)
    path = str(llava["root"] / "llava-routed")
    model.save_pretrained(path)
    reloaded = LlavaLlamaForCausalLM.from_pretrained(path).eval()
    reloaded.get_model().get_vision_tower().load_model()
    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, images=pixels).logits, model(input_ids=ids, images=pixels).logits)
    assert torch.equal(reloaded.get_model().dpvr_side_branch.layer.mlp.down_proj.weight,
                       model.get_model().dpvr_side_branch.layer.mlp.down_proj.weight)


def test_a_training_step_changes_only_the_routed_parameters(llava, tiny_assets, capsys):
    from llava.constants import IGNORE_INDEX

    model = routed(llava)
    model.train()
    prepare_routed_training(model, Flags())
    trainable, total = parameter_counts(model)
    side = sum(p.numel() for p in model.get_model().dpvr_side_branch.parameters())
    assert trainable == side
    assert f"{trainable:,} of {total:,} parameters" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\ntrainable fraction (tiny LLaVA, 8 LLM layers): {trainable:,} / {total:,} = {trainable / total:.2%}")
    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    labels = ids.clone()
    labels[ids < 0] = IGNORE_INDEX
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, images=pixels, labels=labels).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    routed_names = set(routed_parameter_names(model))
    assert routed_names and all(name.startswith("model.dpvr_side_branch.") for name in routed_names)
    assert changed == routed_names, sorted(changed ^ routed_names)[:5]


def test_greedy_generation_with_the_routed_cache_equals_full_recomputation(llava, tiny_assets):
    ids, pixels = prompt(llava, image_path(tiny_assets, 1))
    model = routed(llava)
    steps = 8
    with torch.no_grad():
        generated = model.generate(ids, images=pixels, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                                   return_dict_in_generate=True, output_scores=True)
        cache = generated.past_key_values
        tokens = generated.sequences[0, -steps:].tolist()
        sequence, reference = ids, []
        for _ in range(steps):  # no cache: the whole prompt + image, every step
            next_token = model(input_ids=sequence, images=pixels, use_cache=False).logits[:, -1].argmax(-1)
            reference.append(int(next_token))
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
    assert tokens == reference
    assert len(set(reference)) > 1  # not a degenerate repeat of one token
    prompt_len = image_mask_of(model, ids, pixels)[4].shape[1]
    n_image = int(image_mask_of(model, ids, pixels)[-1].sum())
    assert isinstance(cache, RoutedCache)
    full, text = prompt_len + steps - 1, prompt_len - n_image + steps - 1
    assert cache.layer_lengths() == [full] * ROUTE + [text] * (LAYERS - 1 - ROUTE) + [full]


def test_batch_rows_with_different_image_counts_and_left_padding_match_single_rows():
    """Rows with 8 and 4 image tokens, the second left-padded: each row of the batched routed forward, and its cached
    decode steps, equal that row alone (the streams are padded per row and the padding is masked)."""
    from transformers import LlamaConfig, LlamaModel

    from llava_dsl.dpvr.decoder import VisionSideBranch, routed_forward

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(config).eval()
    side = VisionSideBranch(config, ROUTE)
    side.copy_from(model.layers[ROUTE])
    spec = resolve_routing(LAYERS, ROUTE)
    rows = [(torch.randn(1, 20, 32), slice(5, 13)), (torch.randn(1, 18, 32), slice(3, 7))]
    pad = 20 - 18
    embeds = torch.cat([rows[0][0], torch.cat([torch.zeros(1, pad, 32), rows[1][0]], 1)])
    image = torch.zeros(2, 20, dtype=torch.bool)
    image[0, rows[0][1]] = True
    image[1, pad + rows[1][1].start:pad + rows[1][1].stop] = True
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :pad] = 0
    steps = torch.randn(3, 2, 1, 32)  # 3 decode steps of the 2 rows
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = routed_forward(model, side, spec, embeds, image_mask=image, attention_mask=mask,
                                 position_ids=positions, use_cache=True)
        cache, batched_steps = batched.past_key_values, []
        for step in steps:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = routed_forward(model, side, spec, step, attention_mask=mask, position_ids=positions[:, -1:] + 1,
                                 past_key_values=cache, use_cache=True)
            positions, cache = torch.cat([positions, positions[:, -1:] + 1], 1), out.past_key_values
            batched_steps.append(out.last_hidden_state)
        for b, (row, span) in enumerate(rows):
            row_image = torch.zeros(1, row.shape[1], dtype=torch.bool)
            row_image[0, span] = True
            alone = routed_forward(model, side, spec, row, image_mask=row_image, use_cache=True)
            offset = pad if b else 0
            assert torch.allclose(batched.last_hidden_state[b, offset:], alone.last_hidden_state[0], atol=1e-5)
            row_cache = alone.past_key_values
            for step, expected in zip(steps, batched_steps):
                out = routed_forward(model, side, spec, step[b:b + 1], past_key_values=row_cache, use_cache=True)
                row_cache = out.past_key_values
                assert torch.allclose(expected[b], out.last_hidden_state[0], atol=1e-5)
    assert cache.layer_lengths()[ROUTE] == 20 - 4 + 3  # text slots of the row with fewer images, padded alike


def test_attention_share_matches_a_hand_computation():
    # tokens: t0 i1 i2 t3 t4 ; one layer, two heads; queries after the image: t3, t4
    image = torch.tensor([[False, True, True, False, False]])
    weights = torch.zeros(1, 2, 5, 5)
    weights[0, 0, 3, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # head 0, t3: image mass 0.5
    weights[0, 1, 3, :4] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # head 1, t3: 0.2
    weights[0, 0, 4, :5] = torch.tensor([0.0, 0.5, 0.25, 0.25, 0.0])  # head 0, t4: 0.75
    weights[0, 1, 4, :5] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])  # head 1, t4: 0.4
    share = text_to_image_share([weights, weights.flip(1)], image, query_positions(image))
    hand = ((0.5 + 0.2) / 2 + (0.75 + 0.4) / 2) / 2  # heads, then queries
    assert share.shape == (1, 2) and torch.allclose(share, torch.full((1, 2), hand))
    all_text = text_to_image_share([weights], image, query_positions(image, queries="all_text"))
    assert torch.allclose(all_text, torch.tensor([[2 * hand / 3]]))  # t0 adds a query with no image mass
    assert suggest_route_layer([0.7, 0.2, 0.04, 0.03, 0.06, 0.02, 0.01, 0.3], 0.05) == 5
    assert suggest_route_layer([0.7, 0.2, 0.1, 0.3], 0.05) == 3  # never below: nothing routed


def test_analysis_tool_on_a_tiny_model_matches_uniform_attention(llava, tiny_assets, tmp_path):
    """Zero query projections make every layer's attention uniform over the visible keys, so the share of a
    query at position q is (image tokens before q) / (q + 1), the same in every layer."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from llava_dsl.dpvr.attention_share import main

    model = LlavaLlamaForCausalLM.from_pretrained(llava["checkpoint"])
    for layer in model.get_model().layers:
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    checkpoint = str(tmp_path / "llava-uniform")
    model.save_pretrained(checkpoint)
    llava["tokenizer"].save_pretrained(checkpoint)
    report = main(["attention", "--model-path", checkpoint, "--image-folder", tiny_assets["image_folder"],
                           "--data-path", tiny_assets["finetune"], "--num-samples", "2", "--threshold", "0.5",
                           "--out", str(tmp_path / "report"), "--device", "cpu", "--dtype", "float32"])
    assert len(report["shares"]) == LAYERS and all(0.0 <= s <= 1.0 for s in report["shares"])
    hand = []
    with open(tiny_assets["finetune"]) as f:
        records = json.load(f)
    questions = {os.path.join(tiny_assets["image_folder"], r["image"]): r["conversations"][0]["value"]
                 for r in records}
    for path in report["images"]:
        ids, pixels = prompt(llava, path, questions[path].replace("<image>", "").strip())
        image = image_mask_of(llava["model"], ids, pixels)[-1][0].float()
        seen = image.cumsum(0)  # image keys visible to each query
        queries = (seen > 0) & (image == 0)
        hand.append(float((seen / torch.arange(1, image.numel() + 1))[queries].mean()))
    expected = sum(hand) / len(hand)
    assert all(abs(s - expected) < 1e-5 for s in report["shares"]), (report["shares"], expected)
    for ext in ("json", "md", "png"):
        assert os.path.getsize(tmp_path / "report" / f"attention_share.{ext}") > 0
    # --dpvr_route_layer auto reads the suggestion back
    meta = copy.deepcopy(llava["model"]).get_model()
    report_path = str(tmp_path / "report" / "attention_share.json")
    configure_routing(meta, Flags(dpvr_route_layer="auto", dpvr_attention_threshold=expected + 0.01,
                                                   dpvr_attention_report=report_path))
    assert meta.config.dpvr_route_layer == 0 and meta.config.dpvr_route_source.startswith("auto: ")


def test_dpvr_stage_through_llava_train(llava, tiny_assets):
    from safetensors.torch import load_file

    out = str(llava["root"] / "llava-dpvr")
    flags = ["--model_name_or_path", llava["checkpoint"], "--version", "v1", "--data_path", tiny_assets["finetune"],
             "--image_folder", tiny_assets["image_folder"], "--vision_tower", tiny_assets["vision_tower"],
             "--mm_vision_select_layer", "-2", "--mm_projector_type", "mlp2x_gelu", "--mm_use_im_start_end", "False",
             "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--mm_routing", "dpvr_lf",
             "--dpvr_route_layer", str(ROUTE), "--max_steps", "2", "--per_device_train_batch_size", "4",
             "--save_strategy", "no", "--report_to", "none", "--model_max_length", "128", "--bf16", "False",
             "--tf32", "False", "--logging_steps", "1", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
             "--learning_rate", "1e-3", "--output_dir", out]
    result = run_module("llava_dsl.train", flags, env={"OMP_NUM_THREADS": "1"})
    assert "DPVR-LF trains the side branch" in result.stdout + result.stderr
    saved, start = load_file(os.path.join(out, "model.safetensors")), load_file(
        os.path.join(llava["checkpoint"], "model.safetensors"))
    side = {k for k in saved if k.startswith("model.dpvr_side_branch.")}
    assert side and set(saved) - side == set(start)
    # LLaVA's train() casts a frozen tower to fp16 when bf16 is off; everything else keeps its dtype
    assert all(torch.equal(saved[k], start[k].to(saved[k].dtype)) for k in start), "a frozen weight changed"
    source = f"model.layers.{ROUTE}."
    trained = [k for k in side if not torch.equal(saved[k], start[source + k.split("layer.", 1)[1]])]
    assert trained, "the side branch did not train"
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    routing = (config["mm_routing"], config["dpvr_route_layer"], config["dpvr_side_init_layer"])
    assert routing == ("dpvr_lf", ROUTE, ROUTE)


def test_cost_accounting_matches_a_flop_counter_and_bounds_the_7b_ratio(llava, tiny_assets):
    from torch.utils.flop_counter import FlopCounterMode

    from llava_dsl.dpvr.cost import LlamaShape
    from llava_dsl.dpvr.decoder import routed_forward

    ids, pixels = prompt(llava, image_path(tiny_assets, 0))
    for route, side_attention in ((ROUTE, "vision"), (ROUTE, "prefix"), (LAYERS - 1, "vision")):
        model = routed(llava, route=route, dpvr_side_attention=side_attention)
        meta = model.get_model()
        meta.config._attn_implementation = "eager"  # matmul attention: the counter sees every multiply
        _, _, _, _, embeds, _, image = image_mask_of(model, ids, pixels)
        first, count = int(image[0].nonzero()[0]), int(image.sum())
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            hidden = routed_forward(meta, getattr(meta, "dpvr_side_branch", None), resolve_routing(
                LAYERS, route, side_attention=side_attention), embeds, image_mask=image).last_hidden_state
            model.lm_head(hidden)
        analytic = prefill_flops(LlamaShape.from_config(model.config), first, count, embeds.shape[1] - first - count,
                                 route_layer=route, side_attention=side_attention, causal=False)
        assert counter.get_total_flops() == analytic["total"], (route, side_attention)
    # LLaVA-1.5-7B: one decoder layer (+ two norms) is the side branch, ~3 % of the model
    assert side_branch_parameters(LLAVA_15_7B) == 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
    stock = prefill_flops(LLAVA_15_7B, 35, 576, 20)
    assert stock["total"] == prefill_flops(LLAVA_15_7B, 35, 576, 20, route_layer=31)["total"]
    ratio = prefill_flops(LLAVA_15_7B, 35, 576, 20, route_layer=18)["total"] / stock["total"]
    # image tokens pass 18 + 1 + 1 of 32 layers, text tokens all 32, the LM head is shared: between 20/32 and 1
    assert 20 / 32 < ratio < 1
