"""The family adapters (llava_dsl/hf/families.py): one registry, VipLlava's layer semantics (the main layer is the
deepest listed one, the stop-gradient on the projector's input slices before its LayerNorm), and no family branch
outside the adapters."""
import logging
import os
import re

import pytest
import torch
from hf_helpers import ROOT, assert_same
from test_core import backward, build

from llava_dsl.hf import (
    ADAPTERS,
    DSLError,
    adapter_for,
    apply_detached_skip_links,
    lora_target_modules,
    remove_detached_skip_links,
    tower_parameter_names,
)
from llava_dsl.hf.diagnostics import feature_layout
from llava_dsl.hf.families import FAMILIES


def test_one_registry_entry_per_class_and_each_family_found_through_it():
    """Each family by its class name; its tower / projector split and LoRA's exclusions come from the adapter."""
    for family in FAMILIES:
        assert ADAPTERS[family.outer_name] is family and ADAPTERS[family.inner_name] is family
    for name in ["llava", "llava_next", "vipllava", "qwen3_vl"]:
        model, _, _ = build(name)
        adapter = adapter_for(model)
        assert type(adapter).outer_name == type(model).__name__
        assert adapter_for(model.model).inner is model.model  # the inner model alone is found too
        tower = "model.visual." if name == "qwen3_vl" else "model.vision_tower."
        names = tower_parameter_names(model)
        assert names and all(n.startswith(tower) and "merger" not in n for n in names)
        assert not [n for n in lora_target_modules(model) if n.startswith(tower)]
        with_projector = set(lora_target_modules(model, include_projector=True)) - set(lora_target_modules(model))
        assert with_projector and all("merger" in n or "multi_modal_projector" in n for n in with_projector)


def test_vipllava_main_is_the_deepest_listed_layer_and_never_detached():
    model, inputs, prefix = build("vipllava")  # vision_feature_layers [1, 4, 3]
    assert adapter_for(model).feature_layers() == (4, [1, 3])
    with pytest.raises(DSLError, match=r"detach_layers=\[4\]: layer 4 is the main layer.*vision_feature_layers="
                                       r"\[1, 4, 3\]"):
        apply_detached_skip_links(model, detach_layers=[4])
    with pytest.raises(DSLError, match=r"detach_layers=\[-1\]: layer 4 is the main layer"):
        apply_detached_skip_links(model, detach_layers=[-1])
    with pytest.raises(DSLError, match=r"layer 2 is not a tapped layer; expected a subset of the taps \[1, 3\]"):
        apply_detached_skip_links(model, detach_layers=[2])
    apply_detached_skip_links(model)  # default depth: the taps in the first half of the 4-block tower
    assert model.config.dsl_detach_layers == [1]
    # the hook detaches channel slice 0 (layer 1 is listed first) of the projector's input, before its LayerNorm
    hooks = list(model.model.multi_modal_projector._forward_pre_hooks.values())
    assert len(hooks) == 1
    width = model.config.vision_config.hidden_size
    x = torch.randn(2, 16, 3 * width, requires_grad=True)
    (out,) = hooks[0](model.model.multi_modal_projector, (x,))
    assert torch.equal(out, x)
    out.pow(2).sum().backward()
    assert torch.all(x.grad[..., :width] == 0) and torch.all(x.grad[..., width:] != 0)


def test_vipllava_layers_from_the_stride_rules_and_the_projector_width():
    model, inputs, prefix = build("vipllava")
    with pytest.raises(DSLError, match=r"4 x 32 = 128 channels.*takes 96.*vision_feature_layers=\[1, 4, 3\]"):
        apply_detached_skip_links(model, skip_stride=1)  # [4, 3, 2, 1]: the projector reads 3 layers
    apply_detached_skip_links(model, skip_layers=[2, 1], main_layer=-1, detach_depth=1)
    assert list(model.config.vision_feature_layers) == [4, 2, 1] and model.config.dsl_detach_layers == [1]
    dsl = backward(model, inputs, prefix)
    remove_detached_skip_links(model)
    assert_same(dsl, backward(model, inputs, prefix, reference=[1]), "VipLlava after choosing taps [2, 1]")


def test_vipllava_unused_blocks_are_frozen_and_the_split_reads_its_layout(caplog):
    model, inputs, prefix = build("vipllava", vision_feature_layers=(2, 3, 1))  # main 3: block 4 never used
    with caplog.at_level(logging.WARNING, logger="llava_dsl.hf"):
        apply_detached_skip_links(model, detach_layers=[1])
    lines = [r.getMessage() for r in caplog.records if "froze" in r.getMessage()]
    assert len(lines) == 1 and "encoder.layers.3" in lines[0] and "post_layernorm" in lines[0], lines
    model.train()
    model(**inputs).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    _, _, layout = feature_layout(model)
    assert (layout.main, layout.taps, layout.concat_order, layout.detached_layers) == (3, (2, 1), (2, 3, 1), (1,))


def test_no_family_branch_outside_the_adapters():
    """core, sft, diagnostics, rprobe ask the adapter: none of them tests which family a model is."""
    folder = os.path.join(ROOT, "llava_dsl", "hf")
    branch = re.compile(r"family\s*[!=]=|\"Next\" in|hasattr\([^)]*[\"'](visual|vision_tower)[\"']|"
                        r"isinstance\([^)]*(Llava|Qwen3VL|VipLlava)\w*(Model|Generation)")
    found = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name not in ("families.py", "tiny.py"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if branch.search(line)]
    assert found == [], found

