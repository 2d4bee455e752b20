"""The gradient diagnostics on a stock Llava: the split's main part equals the gradient with every skip input
detached (computed independently, at the consumed copies), the parts add up to the naive gradient, measuring
leaves .grad alone, and a Trainer run writes dsl_grad_stats.json in the LLaVA path's format, which the plot draws."""
import json
import math

import pytest
import torch
from hf_helpers import grads
from test_core import backward
from transformers import Trainer, TrainingArguments

from llava_dsl.diagnostics.__main__ import main as diagnostics_main
from llava_dsl.diagnostics.splitter import GradientSplitter, split_into_main_and_skip
from llava_dsl.diagnostics.stats import STATS_FILE
from llava_dsl.hf import DSLError, apply_detached_skip_links
from llava_dsl.hf.diagnostics import attach_grad_stats, feature_layout
from llava_dsl.hf.tiny import llava_inputs, tiny_llava, tiny_qwen3_vl

PREFIX = "model.vision_tower."


def _split(model, inputs):
    clip, projector, layout = feature_layout(model)
    splitter = GradientSplitter(clip, clip=clip, spec=layout, features_at=projector)
    model.zero_grad(set_to_none=True)
    with splitter.observing():
        model(**inputs).loss.backward()
    return splitter, layout, splitter.take(), grads(model, PREFIX)


def _flat(g, group, splitter):
    """The reference gradients of one block group, flattened in the splitter's parameter order."""
    names = {id(p): n for n, p in splitter.clip.named_parameters()}
    return torch.cat([g[PREFIX + names[id(p)]].reshape(-1) for p in group.params])


@pytest.mark.parametrize("detached", [None, [1]])
def test_split_main_part_equals_the_gradient_with_the_skip_inputs_detached(detached):
    model = tiny_llava(vision_feature_layer=(4, 3, 1))  # main 4, taps 3 and 1 of a 4-block tower
    model.train()
    inputs = llava_inputs(model)
    g_main = backward(model, inputs, PREFIX, reference=[3, 1])  # independent: consumed copies of the taps detached
    g_naive = backward(model, inputs, PREFIX)
    if detached:
        apply_detached_skip_links(model, detach_layers=detached)
    g_applied = backward(model, inputs, PREFIX)
    splitter, layout, parts, grad_after = _split(model, inputs)
    assert layout.concat_order == (4, 3, 1) and layout.detached_layers == tuple(detached or ())
    assert [g.name for g in splitter.groups] == ["embeddings", "block_1", "blocks_2-3", "block_4"]
    for k in g_applied:  # measuring leaves the step's gradient as it is
        torch.testing.assert_close(grad_after[k], g_applied[k], rtol=0, atol=0, msg=k)
    checked = 0
    for group in splitter.groups:
        main, skip, applied = split_into_main_and_skip(parts, layout, group.name)
        ref_main, ref_naive = _flat(g_main, group, splitter), _flat(g_naive, group, splitter)
        torch.testing.assert_close(main, ref_main, rtol=1e-5, atol=1e-7, msg=group.name)
        torch.testing.assert_close(main + skip, ref_naive, rtol=1e-5, atol=1e-7, msg=group.name)
        torch.testing.assert_close(applied, _flat(g_applied, group, splitter), rtol=1e-5, atol=1e-7, msg=group.name)
        if group.last <= 1:  # reached by tap 1: the skip part is real and not along the main part
            assert skip.norm() > 1e-3 * main.norm() > 0, group.name
            checked += 1
    assert checked == 2  # embeddings and block_1
    if detached:  # what training applies to block 1 is the main part plus tap 3's, never tap 1's
        assert not torch.allclose(_flat(g_applied, splitter.groups[1], splitter),
                                  _flat(g_naive, splitter.groups[1], splitter), rtol=1e-4, atol=1e-6)


def test_trainer_writes_the_stats_file_the_plot_draws(tmp_path):
    model = tiny_llava(vision_feature_layer=(4, 3, 1))
    apply_detached_skip_links(model, detach_layers=[1])
    inputs = llava_inputs(model, batch=4)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             remove_unused_columns=False, bf16=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    callback = attach_grad_stats(trainer, dense_steps=3, every=2, window=2)
    assert callback is not None
    trainer.train()
    stats = json.loads((tmp_path / STATS_FILE).read_text())
    assert stats["layer_spec"] == {"num_blocks": 4, "main": 4, "taps": [3, 1], "detached_layers": [1]}
    assert [g["name"] for g in stats["groups"]] == ["embeddings", "block_1", "blocks_2-3", "block_4"]
    assert [s["step"] for s in stats["steps"]] == [1, 2, 3, 4]  # dense 1..3, then every 2nd
    assert [(w["first_step"], w["last_step"]) for w in stats["windows"]] == [(1, 2), (3, 4)]
    window = stats["windows"][0]["groups"]["block_1"]
    for key in ("trcov_main", "trcov_skip", "cos_mean", "snr_main", "snr_full", "norm_main", "norm_skip"):
        assert math.isfinite(window[key]), key
    assert window["norm_skip"] > 0 and stats["steps"][0]["groups"]["block_1"]["taps"]["1"]["detached"] is True
    logged = [k for h in trainer.state.log_history for k in h if k.startswith("dsl_grad/")]
    assert "dsl_grad/block_1/trcov_ratio" in logged
    png = tmp_path / "curves.png"
    diagnostics_main(["plot", str(tmp_path), "--out", str(png)])
    assert png.stat().st_size > 1000


def test_refusals_name_the_value():
    with pytest.raises(DSLError, match="Qwen3-VL feeds its DeepStack taps through separate mergers"):
        feature_layout(tiny_qwen3_vl())
    with pytest.raises(DSLError, match="a single feature layer"):
        feature_layout(tiny_llava(vision_feature_layer=(4,)))
    from llava_dsl.hf.diagnostics import check_grad_stats_flags
    with pytest.raises(DSLError, match="--dsl_grad_stats_window=1"):
        check_grad_stats_flags(5, 0, 1)
    assert check_grad_stats_flags(0, 0, 1) is False


@pytest.mark.parametrize("order", ["dsl_then_peft", "peft_then_dsl"])
def test_split_under_peft_reads_the_trained_copy_of_the_tower(order):
    """With LoRA, the tower and projector train as PEFT modules_to_save copies: the split follows the copy that runs,
    and what it says training applies is that copy's .grad."""
    from peft import LoraConfig, get_peft_model

    from llava_dsl.hf import lora_target_modules

    model = tiny_llava(vision_feature_layer=(4, 3, 1))
    inputs = llava_inputs(model)
    if order == "dsl_then_peft":
        apply_detached_skip_links(model, detach_layers=[1])
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_modules(model),
                                             modules_to_save=["multi_modal_projector", "vision_tower"]))
    if order == "peft_then_dsl":
        apply_detached_skip_links(model, detach_layers=[1])
    model.train()
    clip, projector, layout = feature_layout(model)
    assert ".modules_to_save.default" in next(n for n, m in model.named_modules() if m is clip)
    assert layout.detached_layers == (1,)
    splitter = GradientSplitter(clip, clip=clip, spec=layout, features_at=projector)
    with splitter.observing():
        model(**inputs).loss.backward()
    parts = splitter.take()
    for group in splitter.groups[:2]:  # embeddings and block_1: reached by both taps
        main, skip, applied = split_into_main_and_skip(parts, layout, group.name)
        grad = torch.cat([p.grad.reshape(-1) for p in group.params])
        torch.testing.assert_close(applied, grad, rtol=1e-5, atol=1e-7, msg=group.name)
        assert skip.norm() > 0 and not torch.allclose(main + skip, grad, rtol=1e-4, atol=1e-6)
