"""PEFT with the tower in ``modules_to_save`` (what ``--lora_r`` does): the freeze of what no loss reaches and
``remove_detached_skip_links`` act on the copy that trains, whether the detach is applied before or after
``get_peft_model``; and a launched 2-rank DDP LoRA run with ``ddp_find_unused_parameters=False``."""
import json
import re
import sys

import pytest
import torch
from hf_helpers import run
from support import free_port
from test_core import backward, build
from test_train import data, sft_args  # noqa: F401  (data: the entry point's tiny model and records)

from llava_dsl.hf import apply_detached_skip_links, lora_target_modules, remove_detached_skip_links

COPY = ".vision_tower.modules_to_save.default."
ORIGINAL = ".vision_tower.original_module."


def _wrapped(order, family="llava"):
    """(PEFT model, inputs) for a 4-block tower read at [3, 2, 1]: block 4 and post_layernorm get no gradient."""
    from peft import LoraConfig, get_peft_model

    model, inputs, _ = build(family, vision_feature_layer=[3, 2, 1])
    model.requires_grad_(True)
    if order == "dsl_then_peft":
        apply_detached_skip_links(model, detach_layers=[1])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_target_modules(model),
                        modules_to_save=["multi_modal_projector", "vision_tower"])
    peft_model = get_peft_model(model, config)
    if order == "peft_then_dsl":
        apply_detached_skip_links(peft_model, detach_layers=[1])
    peft_model.train()
    return peft_model, inputs


def _copy_grads(peft_model, inputs):
    peft_model.zero_grad(set_to_none=True)
    peft_model(**inputs).loss.backward()
    return {n.split(COPY, 1)[1]: p.grad.clone() for n, p in peft_model.named_parameters()
            if COPY in n and p.grad is not None}


def _plain_grads(detach):
    model, inputs, prefix = build("llava", vision_feature_layer=[3, 2, 1])
    model.train()
    grads = backward(model, inputs, prefix, reference=detach)  # the consumption-side reference
    return {n.split("vision_tower.", 1)[1]: g for n, g in grads.items()}


@pytest.mark.parametrize("order", ["dsl_then_peft", "peft_then_dsl"])
def test_freeze_and_remove_act_on_the_trained_copy(order):
    peft_model, inputs = _wrapped(order)
    params = dict(peft_model.named_parameters())
    top = [n for n in params if COPY in n and ("encoder.layers.3." in n or "post_layernorm" in n)]
    assert top and not [n for n in top if params[n].requires_grad], \
        f"never-used tower parameters trainable in the copy: {[n for n in top if params[n].requires_grad]}"
    assert not [n for n in params if ORIGINAL in n and params[n].requires_grad]
    # what trains gets a gradient (DDP with find_unused_parameters=False needs exactly that)
    grads = _copy_grads(peft_model, inputs)
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is None] == []
    # the copy's tower gradient is the detached one (LoRA's B starts at zero: same forward as the plain model)
    want = _plain_grads(detach=[1])
    torch.testing.assert_close(grads, {k: want[k] for k in grads}, rtol=0, atol=0)
    naive = _plain_grads(detach=None)
    shallow = [k for k in grads if "encoder.layers.0." in k]
    assert shallow and any(not torch.equal(grads[k], naive[k]) for k in shallow)

    remove_detached_skip_links(peft_model)
    assert all(params[n].requires_grad for n in top)  # unfrozen where it was frozen: in the copy
    assert not [n for n in params if ORIGINAL in n and params[n].requires_grad]  # PEFT's original stays frozen
    after = _copy_grads(peft_model, inputs)
    torch.testing.assert_close({k: after[k] for k in naive if k in after},
                               {k: naive[k] for k in naive if k in after}, rtol=0, atol=0)


def test_reapply_after_wrapping_keeps_one_hook():
    peft_model, inputs = _wrapped("dsl_then_peft")
    apply_detached_skip_links(peft_model, detach_layers=[2, 1])
    hooks = [m for m in peft_model.modules() if len(m._forward_pre_hooks)]
    assert len(hooks) == 1 and ".multi_modal_projector.modules_to_save.default" in \
        next(n for n, m in peft_model.named_modules() if m is hooks[0])
    grads = _copy_grads(peft_model, inputs)
    want = _plain_grads(detach=[2, 1])
    torch.testing.assert_close(grads, {k: want[k] for k in grads}, rtol=0, atol=0)


@pytest.mark.launch
def test_ddp_two_ranks_lora_with_the_tower_in_modules_to_save(data, tmp_path):  # noqa: F811
    """--lora_r: the tower trains as PEFT's copy; its block 4 and post_layernorm get no gradient (main layer 3), so
    DDP with find_unused_parameters=False fails unless they are frozen in that copy."""
    out = tmp_path / "ddp_lora"
    _, log = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  free_port(), "-m", "llava_dsl.hf.sft"] + sft_args(
        data, out, model="model_low", steps=2, lora_r=4, ddp_find_unused_parameters="False", ddp_backend="gloo"),
        timeout=400)
    assert re.search(r"froze 2 .*modules_to_save\.default\.(vision_model\.)?encoder\.layers\.3", log), log[-3000:]
    with open(out / "adapter_config.json") as f:
        assert sorted(json.load(f)["modules_to_save"]) == ["multi_modal_projector", "vision_tower"]
