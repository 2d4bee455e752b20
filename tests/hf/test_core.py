"""llava_dsl.hf on tiny stock models (Llava, LLaVA-NeXT, VipLlava, Qwen3-VL): forward values unchanged, the exact
gradient decomposition on the shallow tower blocks, config persistence and re-apply, the guard, PEFT in both orders,
the unused-module freeze, errors."""
import logging

import pytest
import torch
from hf_helpers import assert_same, grads

from llava_dsl.hf import (
    DSLError,
    DSLNotAppliedError,
    apply_detached_skip_links,
    dsl_llava_config,
    is_applied,
    lora_target_modules,
    remove_detached_skip_links,
    tower_param_groups,
    tower_parameter_names,
)
from llava_dsl.hf.tiny import llava_inputs, qwen3_vl_inputs, tiny_llava, tiny_qwen3_vl, tiny_vipllava

FAMILIES = ["llava", "llava_next", "vipllava", "qwen3_vl"]


def build(family, **kwargs):
    if family == "qwen3_vl":
        model = tiny_qwen3_vl(**kwargs)
        return model, qwen3_vl_inputs(model), "model.visual.blocks."
    if family == "vipllava":  # feature layers [1, 4, 3]: the main layer (the deepest, 4) is not listed first
        model = tiny_vipllava(**kwargs)
        return model, llava_inputs(model), "model.vision_tower."
    model = tiny_llava(family=family, **kwargs)
    return model, llava_inputs(model), "model.vision_tower."


def backward(model, inputs, prefix, reference=None):
    """Tower gradients of the LM loss; ``reference`` = hidden-state indices whose *consumed* copy is detached at the
    tower's output (an independent way to stop exactly the skip path)."""
    model.zero_grad(set_to_none=True)
    handle = None
    if reference is not None:
        handle = _output_detach_hook(model, set(reference))
    try:
        model(**inputs).loss.backward()
    finally:
        if handle is not None:
            handle.remove()
    return grads(model, prefix)


def _output_detach_hook(model, layers):
    if hasattr(model.model, "visual"):  # Qwen3-VL: layer N = the main merger's input, DeepStack taps = index + 1
        visual = model.model.visual
        taps = [i + 1 for i in visual.deepstack_visual_indexes]
        n = len(visual.blocks)

        def hook(module, args, out):
            if isinstance(out, tuple):
                main, deep = out
                main = main.detach() if n in layers else main
                return main, [d.detach() if taps[j] in layers else d for j, d in enumerate(deep)]
            if n in layers:
                out.pooler_output = out.pooler_output.detach()
            out.deepstack_features = [d.detach() if taps[j] in layers else d
                                      for j, d in enumerate(out.deepstack_features)]
            return out
        return visual.register_forward_hook(hook)

    def hook(module, args, out):
        n = len(out.hidden_states) - 1
        out.hidden_states = tuple(h.detach() if (i in layers or i - n - 1 in layers) else h
                                  for i, h in enumerate(out.hidden_states))
        return out
    return model.model.vision_tower.register_forward_hook(hook)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_bit_identical_and_exact_gradient_decomposition(family):
    model, inputs, prefix = build(family)
    with torch.no_grad():
        plain = model(**inputs).logits
    naive = backward(model, inputs, prefix)
    apply_detached_skip_links(model)  # default depth: the taps in the first half of the 4-block tower
    detached_layers = model.config.dsl_detach_layers
    assert detached_layers == ([2, 1] if family == "qwen3_vl" else [1])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    dsl = backward(model, inputs, prefix)
    remove_detached_skip_links(model)
    assert not is_applied(model) and model.config.dsl_detach_layers is None
    main = backward(model, inputs, prefix, reference=detached_layers)
    main_layer = 4
    taps = [3, 2, 1] if family == "qwen3_vl" else [3, 1]
    skip = backward(model, inputs, prefix, reference=[main_layer] + [t for t in taps if t not in detached_layers])
    # detached = the main-path part exactly (and whatever the non-detached taps carry)
    assert_same(dsl, main, f"{family}: detached gradient vs the consumption-side reference")
    # naive = main + skip on the shallowest block, and the skip part is not zero (the test would notice a no-op)
    shallow = [k for k in naive if ".0." in k and ("layers.0." in k or "blocks.0." in k)]
    assert shallow
    for k in shallow:
        torch.testing.assert_close(naive[k], main[k] + skip[k], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(naive[k], dsl[k], rtol=1e-4, atol=0), k
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_simplest_call_and_gradient_checkpointing(family):
    model, inputs, prefix = build(family, vision_feature_layer=[-1, 3, 1])
    apply_detached_skip_links(model, detach_layers=[3, 1])
    assert model.config.dsl_detach_layers == [3, 1]
    ref = backward(model, inputs, prefix)
    model.gradient_checkpointing_enable()
    model.train()
    model.config.use_cache = False
    assert_same(backward(model, inputs, prefix), ref, "gradient checkpointing")


def test_save_load_reapply_and_the_guard(tmp_path, caplog):
    model, inputs, prefix = build("llava")
    apply_detached_skip_links(model, detach_layers=[3, 1])
    expected = backward(model, inputs, prefix)
    model.save_pretrained(tmp_path / "m")
    cls = type(model)
    reloaded = cls.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert reloaded.config.dsl_detach_layers == [3, 1] and not is_applied(reloaded)
    reloaded.train()
    with pytest.raises(DSLNotAppliedError, match=r"dsl_detach_layers=\[3, 1\].*apply_detached_skip_links"):
        reloaded(**inputs)
    with torch.no_grad():  # inference without the hook is fine: forward values are the same
        reloaded(**inputs)
    reloaded.eval()
    apply_detached_skip_links(reloaded)  # no argument: re-applied from the config
    assert is_applied(reloaded)
    reloaded.train()
    assert_same(backward(reloaded, inputs, prefix), expected, "reloaded and re-applied")
    remove_detached_skip_links(reloaded)
    backward(reloaded, inputs, prefix)  # naive on purpose: no guard error


def test_unused_tower_modules_are_frozen_and_named_once(caplog):
    model, inputs, prefix = build("llava", vision_feature_layer=[-2, 2, 1])
    model.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="llava_dsl.hf"):
        apply_detached_skip_links(model, detach_layers=[1])
    lines = [r.getMessage() for r in caplog.records if "froze" in r.getMessage()]
    assert len(lines) == 1 and "encoder.layers.3" in lines[0] and "post_layernorm" in lines[0], lines
    model.train()
    model(**inputs).loss.backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == [], f"trainable parameters without gradient (DDP would fail): {without}"
    remove_detached_skip_links(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("order", ["dsl_then_peft", "peft_then_dsl"])
def test_peft_both_orders_no_lora_in_the_tower(order):
    from peft import LoraConfig, get_peft_model

    model, inputs, prefix = build("llava")
    apply_detached_skip_links(model, detach_layers=[3, 1])
    model.vision_tower.requires_grad_(True) if hasattr(model, "vision_tower") else None
    reference = None

    def peft(m):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(m), lora_dropout=0.0,
                            modules_to_save=None)
        out = get_peft_model(m, config)
        for n, p in out.named_parameters():
            if ".vision_tower." in n and "lora_" not in n:
                p.requires_grad_(True)  # the tower trains in full, beside LoRA in the LM
        return out

    base, _, _ = build("llava")
    if order == "dsl_then_peft":
        apply_detached_skip_links(base, detach_layers=[3, 1])
        peft_model = peft(base)
    else:
        peft_model = peft(base)
        apply_detached_skip_links(peft_model, detach_layers=[3, 1])
    lora_names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora_names and not [n for n in lora_names if "vision_tower" in n or "multi_modal_projector" in n]
    assert all(".language_model." in n for n in lora_names)
    with torch.no_grad():
        reference = model(**inputs).logits
        assert torch.equal(peft_model(**inputs).logits, reference)  # LoRA B starts at zero
    peft_model.zero_grad()
    peft_model(**inputs).loss.backward()
    got = {n.split("vision_tower.", 1)[1]: p.grad for n, p in peft_model.named_parameters()
           if "vision_tower." in n and p.grad is not None}
    want = {n.split("vision_tower.", 1)[1]: g for n, g in backward(model, inputs, prefix).items()}
    assert_same(got, want, f"PEFT {order}: tower gradient = the detached model's")


def test_tower_lr_groups_and_lora_targets():
    model, _, _ = build("llava")
    model.requires_grad_(True)
    names = set(tower_parameter_names(model))
    assert names and all(n.startswith("model.vision_tower.") for n in names)
    groups = tower_param_groups(model, 1e-5)
    tower = [g for g in groups if g.get("lr") == 1e-5]
    assert len(tower) == 1 and len(tower[0]["params"]) == len(names)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    q, _, _ = build("qwen3_vl")
    assert not [n for n in lora_target_modules(q) if ".visual." in n]
    assert not [n for n in tower_parameter_names(q) if "merger" in n]


def test_errors_name_value_and_expectation():
    model, _, _ = build("llava")
    with pytest.raises(DSLError, match=r"detach_layers=\[2\].*not a tapped layer.*\[3, 1\]"):
        apply_detached_skip_links(model, detach_layers=[2])
    with pytest.raises(DSLError, match=r"main layer"):
        apply_detached_skip_links(model, detach_layers=[4])
    with pytest.raises(DSLError, match=r"4 x 32 = 128 channels.*takes 96"):
        apply_detached_skip_links(model, skip_stride=1)  # [4, 3, 2, 1]: the projector is 3 layers wide
    apply_detached_skip_links(model, skip_layers=[3, 1], detach_depth=1)  # same layers: fits
    assert model.config.dsl_detach_layers == [1]
    with pytest.raises(DSLError, match=r"supported model classes: LlavaForConditionalGeneration"):
        apply_detached_skip_links(torch.nn.Linear(2, 2))
    single, _, _ = build("llava", vision_feature_layer=[-2, 1])
    single.config.vision_feature_layer = -2
    with pytest.raises(DSLError, match=r"single feature layer"):
        apply_detached_skip_links(single)
    q, _, _ = build("qwen3_vl")
    with pytest.raises(DSLError, match=r"DeepStack taps are fixed"):
        apply_detached_skip_links(q, skip_stride=2)
    apply_detached_skip_links(q, detach_layers=[1])
    assert q.config.dsl_detach_layers == [1]


def test_stride_rules_set_vision_feature_layer_on_a_fresh_config():
    from transformers import LlavaForConditionalGeneration

    ref, _, _ = build("llava")
    config = dsl_llava_config(ref.config.vision_config, ref.config.text_config, main_layer=-2, skip_stride=1,
                              image_token_index=ref.config.image_token_index)
    assert config.vision_feature_layer == [3, 2, 1] and config.dsl_detach_layers == [2, 1]
    model = LlavaForConditionalGeneration(config)
    apply_detached_skip_links(model)
    assert model.config.dsl_detach_layers == [2, 1]
