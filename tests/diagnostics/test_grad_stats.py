"""Skip-path vs main-path gradient split of the vision tower (llava_dsl.diagnostics) and its diagnostics CLI.

In-process checks on a LLaVA model built through LLaVA's own classes, then real training runs through
`python -m llava_dsl.diagnostics train` (single process, and 2-rank ZeRO-3 under the deepspeed launcher).
"""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from matplotlib.colors import to_rgb
from support import DEEPSPEED, ROOT, free_port, llava_flags, run_module
from safetensors.torch import load_file

from llava_dsl.diagnostics.callback import GradStatsCallback, attach_grad_stats, is_measured_step
from llava_dsl.diagnostics.splitter import GradientSplitter, group_bounds, split_into_main_and_skip
from llava_dsl.diagnostics.stats import WindowAccumulator, cosine, gradient_snr, trace_covariance
from llava_dsl.skip_links.layer_spec import resolve_layer_spec

TAPS = "2,4,6"  # 8-block tower, main -2 = block 7: groups embeddings, 1-2, 3-4, 5-6, 7
PALETTE = [tuple(round(255 * c) for c in to_rgb(f"C{i}")) for i in range(10)]  # the default cycle the plots use
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only adds contention on a shared machine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------
# Statistics helpers against hand-computed values.
# --------------------------------------------------------------------------------------------------
def test_statistics_helpers_match_hand_computed_values():
    main = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    skip = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    # mean (2, 1); deviations (-1, -1), (1, 1): tr(Cov) = (2 + 2) / 2; E||g||^2 = (1 + 13) / 2 = 7, ||E g||^2 = 5
    assert trace_covariance(main) == pytest.approx(2.0)
    assert gradient_snr(main) == pytest.approx(5 / 7)
    assert gradient_snr(torch.tensor([[1.0, 2.0], [1.0, 2.0]])) == pytest.approx(1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([-2.0, -2.0])) == pytest.approx(-1.0)

    window = WindowAccumulator()
    for m, s in zip(main, skip):
        window.add(m, s)
    got = window.summary()
    # skip: mean (1, 0), deviations (-1, 1), (1, -1) -> 2; full = main + skip = (1, 1), (5, 1): mean (3, 1),
    # deviations (-2, 0), (2, 0) -> 4, E||full||^2 = (2 + 26) / 2 = 14, ||E full||^2 = 10
    expected = {
        "trcov_main": 2.0, "trcov_skip": 2.0, "trcov_full": 4.0, "trcov_ratio": 1.0,
        "cos_mean": (0.0 + 4 / math.sqrt(65)) / 2,          # cos((1,0),(0,1)) = 0, cos((3,2),(2,-1)) = 4/sqrt(65)
        "cos_of_means": 2 / math.sqrt(5),                   # cos((2,1),(1,0))
        "snr_main": 5 / 7, "snr_full": 10 / 14,
        "norm_main": (1 + math.sqrt(13)) / 2, "norm_skip": (1 + math.sqrt(5)) / 2,
    }
    assert got == pytest.approx(expected)

    # the streaming window equals the batch helpers on random samples
    g = torch.Generator().manual_seed(0)
    main, skip = torch.randn(7, 50, generator=g), torch.randn(7, 50, generator=g) * 3 + 1
    window = WindowAccumulator()
    for m, s in zip(main, skip):
        window.add(m, s)
    got = window.summary()
    assert got["trcov_main"] == pytest.approx(trace_covariance(main), rel=1e-5)
    assert got["trcov_skip"] == pytest.approx(trace_covariance(skip), rel=1e-5)
    assert got["trcov_full"] == pytest.approx(trace_covariance(main + skip), rel=1e-5)
    assert got["snr_full"] == pytest.approx(gradient_snr(main + skip), rel=1e-5)
    assert got["cos_mean"] == pytest.approx(sum(cosine(m, s) for m, s in zip(main, skip)) / 7, rel=1e-5)


def test_groups_and_schedule():
    assert group_bounds((7, 6, 4, 2)) == [("embeddings", 0, 0), ("blocks_1-2", 1, 2), ("blocks_3-4", 3, 4),
                                          ("blocks_5-6", 5, 6), ("block_7", 7, 7)]
    assert group_bounds((23, 18, 12, 6))[1:] == [("blocks_1-6", 1, 6), ("blocks_7-12", 7, 12),
                                                 ("blocks_13-18", 13, 18), ("blocks_19-23", 19, 23)]
    assert [s for s in range(1, 21) if is_measured_step(s, every=5, dense_steps=3)] == [1, 2, 3, 5, 10, 15, 20]
    assert [s for s in range(1, 6) if is_measured_step(s, every=0, dense_steps=2)] == [1, 2]


# --------------------------------------------------------------------------------------------------
# In-process: a LLaVA model built through LLaVA's classes, one batch.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_model(tiny_assets):
    import llava_dsl

    llava_dsl.register()
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from llava_dsl.plugin import ModelArguments

    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_assets["llm"])
    model.get_model().initialize_vision_modules(ModelArguments(
        model_name_or_path=tiny_assets["llm"], vision_tower=tiny_assets["vision_tower"], mm_vision_select_layer=-2,
        mm_projector_type="mlp_multilayer", mm_vision_skip_layers=TAPS, unfreeze_mm_vision_tower=True))
    model.float()
    tower = model.get_vision_tower()
    tower.vision_tower.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    ids[:, 3] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "images": torch.randn(2, 3, 32, 32, generator=g)}
    return model, tower, batch


def assert_float_close(actual, expected, scale):
    """Equal up to fp32 summation-order error, relative to the group's largest gradient entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale.abs().max().item())


def spec(detach_depth=None):
    """Taps 6, 4, 2 below main 7; None = naive fusion, D = the D shallowest taps detached."""
    return resolve_layer_spec(8, -2, TAPS, detach=detach_depth is not None, detach_depth=detach_depth)


def backward(model, tower, batch, layer_spec, observe=True):
    """One forward/backward; returns ({group: .grad flattened}, per-slice parts or None, splitter)."""
    tower.layer_spec = layer_spec
    model.zero_grad(set_to_none=True)
    splitter = GradientSplitter(tower)
    if observe:
        with splitter.observing():
            model(**batch).loss.backward()
    else:
        model(**batch).loss.backward()
    grads = {g.name: torch.cat([p.grad.reshape(-1) for p in g.params]) for g in splitter.groups}
    return grads, splitter.take() if observe else None, splitter


def test_naive_parts_add_up_to_the_full_gradient(llava_model):
    model, tower, batch = llava_model
    plain, _, _ = backward(model, tower, batch, spec(), observe=False)
    grads, parts, splitter = backward(model, tower, batch, spec())
    assert [g.name for g in splitter.groups] == ["embeddings", "blocks_1-2", "blocks_3-4", "blocks_5-6", "block_7"]
    for name, full in grads.items():
        assert torch.equal(full, plain[name]), f"{name}: observing changed .grad"
        main, skip, applied = split_into_main_and_skip(parts, spec(), name)
        assert_float_close(main + skip, full, full)
        assert_float_close(applied, full, full)
        assert main.norm() > 0, name
        if name == "block_7":  # above every tap: all of its gradient comes through the main feature
            assert skip.norm() == 0
        else:
            assert skip.norm() > 0.05 * full.norm(), name
    assert tower._forward_hooks == {} and tower._forward_pre_hooks == {}  # nothing left behind


@pytest.mark.parametrize("detach_depth", [3, 2])
def test_detached_update_is_the_main_part_and_reported_skip_is_the_naive_one(llava_model, detach_depth):
    model, tower, batch = llava_model
    _, naive_parts, _ = backward(model, tower, batch, spec())
    detached = spec(detach_depth)
    plain, _, _ = backward(model, tower, batch, detached, observe=False)
    grads, parts, _ = backward(model, tower, batch, detached)
    attached_taps = [t for t in detached.taps if t not in detached.detached_layers]
    for name, full in grads.items():
        assert torch.equal(full, plain[name]), f"{name}: observing changed .grad"
        main, skip, applied = split_into_main_and_skip(parts, detached, name)
        expected = main + sum((parts[t][name] for t in attached_taps if name in parts[t]), torch.zeros_like(main))
        assert_float_close(full, expected, full)
        assert_float_close(applied, full, full)
        if detach_depth == 3:  # every tap detached: the update is the main part alone
            assert_float_close(full, main, full)
        # the counterfactual skip (never applied) is what the naive run computes from the same state and batch
        for layer in detached.concat_order:
            if name in parts[layer]:
                assert_float_close(parts[layer][name], naive_parts[layer][name], full)
        if name == "blocks_1-2":
            assert skip.norm() > 0.05 * main.norm()  # a real counterfactual, not an empty one
            assert not torch.allclose(full, main + skip)


def test_gradient_checkpointed_tower_is_split_without_touching_grad(llava_model):
    model, tower, batch = llava_model
    plain, _, _ = backward(model, tower, batch, spec(), observe=False)
    encoder = tower.vision_tower.vision_model.encoder
    tower.vision_tower.gradient_checkpointing_enable()  # reentrant by default, as LLaVA's --gradient_checkpointing
    reentrant = encoder._gradient_checkpointing_func
    try:
        model.train()
        grads, parts, _ = backward(model, tower, batch, spec())
        assert encoder._gradient_checkpointing_func is reentrant  # restored after the measured step
    finally:
        tower.vision_tower.gradient_checkpointing_disable()
        model.eval()
    for name, full in grads.items():
        assert_float_close(full, plain[name], full)
        main, skip, _ = split_into_main_and_skip(parts, spec(), name)
        assert_float_close(main + skip, full, full)


def test_flags_refuse_models_without_a_trainable_multilayer_tower(llava_model):
    model, tower, _ = llava_model
    args = SimpleNamespace(dsl_grad_stats_every=5, dsl_grad_stats_dense_steps=0, dsl_grad_stats_window=10)
    assert attach_grad_stats(SimpleNamespace(args=SimpleNamespace(dsl_grad_stats_every=0,
                                                                  dsl_grad_stats_dense_steps=0))) is None
    with pytest.raises(ValueError, match="--dsl_grad_stats_window=1"):
        attach_grad_stats(SimpleNamespace(args=SimpleNamespace(**{**vars(args), "dsl_grad_stats_window": 1}),
                                          model=model))
    with pytest.raises(ValueError, match="--dsl_grad_stats_every=-1 --dsl_grad_stats_dense_steps=0: expected >= 0"):
        attach_grad_stats(SimpleNamespace(args=SimpleNamespace(**{**vars(args), "dsl_grad_stats_every": -1})))
    tower.layer_spec, saved = None, tower.layer_spec
    try:
        with pytest.raises(ValueError, match="--dsl_grad_stats_every=5.*mlp_multilayer or detached_mlp_multilayer"):
            attach_grad_stats(SimpleNamespace(args=args, model=model))
    finally:
        tower.layer_spec = saved
    tower.vision_tower.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="frozen.*--unfreeze_mm_vision_tower True"):
            attach_grad_stats(SimpleNamespace(args=args, model=model))
    finally:
        tower.vision_tower.requires_grad_(True)


def _callback(tower, every, tmp_path):
    """The callback as attach_grad_stats builds it, on a stand-in for the trainer (fp32: no loss scale)."""
    trainer = SimpleNamespace(args=SimpleNamespace(fp16=False, output_dir=str(tmp_path)))
    return GradStatsCallback(trainer, tower, every=every, dense_steps=0, window=10)


def _step(callback, step, model=None, batch=None):
    """Optimizer step ``step`` as the Trainer drives it: on_step_begin, forward/backward, on_step_end."""
    state = SimpleNamespace(global_step=step - 1, is_world_process_zero=True)
    callback.on_step_begin(None, state, None)
    if model is not None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    state.global_step = step
    callback.on_step_end(None, state, None)


def test_a_resumed_open_window_lives_on_the_towers_device(llava_model, tmp_path):
    """The open window's sums are saved from the tower's device and must come back there: reloaded onto the CPU
    for a CUDA tower, the next ``sum += gradient`` mixed devices. The tower's copy on the meta device stands in
    for the GPU (no GPU here)."""
    import copy

    model, tower, batch = llava_model
    tower.layer_spec = spec()
    saving = _callback(tower, every=1, tmp_path=tmp_path)
    for step in (1, 2):
        _step(saving, step, model, batch)
    saving.save_checkpoint_state(str(tmp_path))
    elsewhere = SimpleNamespace(layer_spec=tower.layer_spec, vision_tower=copy.deepcopy(tower.vision_tower).to("meta"))
    resumed = _callback(elsewhere, every=1, tmp_path=tmp_path)
    resumed.load_checkpoint_state(str(tmp_path))
    assert resumed._open_steps == [1, 2] and sorted(resumed._open) == sorted(saving._open)
    for name, window in resumed._open.items():
        assert window.n == 2 and window.sums and all(total.device.type == "meta" for total in window.sums)
    same = _callback(tower, every=1, tmp_path=tmp_path)  # on the saving device the window continues unchanged
    same.load_checkpoint_state(str(tmp_path))
    for name, window in saving._open.items():
        assert same._open[name].n == 2 and all(torch.equal(a, b) for a, b in zip(same._open[name].sums, window.sums))


def test_only_measured_steps_wait_for_the_device(llava_model, tmp_path, monkeypatch):
    """With the measurement on, an unmeasured step never synchronises the device (on a GPU that stalls every
    step); it is timed with CUDA events, read once a measured step has synchronised anyway. The tower reads as a
    CUDA one, and torch.cuda's events and synchronisation are counted (no GPU here)."""
    import llava_dsl.diagnostics.callback as callback_module

    _, tower, _ = llava_model
    tower.layer_spec = spec()
    waits = []
    monkeypatch.setattr(callback_module, "_synchronize", waits.append)

    class Event:  # torch.cuda.Event's timing interface; consecutive events 125 ms apart
        made = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            Event.made += 1
            self.seconds, self.recorded = Event.made * 0.125, False

        def record(self):
            self.recorded = True

        def synchronize(self):
            waits.append("event")

        def elapsed_time(self, end):
            assert self.recorded and end.recorded
            return (end.seconds - self.seconds) * 1000

    monkeypatch.setattr(torch.cuda, "Event", Event)
    callback = _callback(tower, every=4, tmp_path=tmp_path)
    monkeypatch.setattr(callback, "_device", lambda: torch.device("cuda"), raising=False)
    for step in (1, 2, 3):
        _step(callback, step)
    assert waits == [] and Event.made == 6
    _step(callback, 4)  # measured (no pass to observe: zero parts)
    assert waits[0] == "event" and waits[1:] and all(w == torch.device("cuda") for w in waits[1:])
    assert callback._step_seconds["unmeasured"] == pytest.approx([0.125] * 3)
    assert len(callback._step_seconds["measured"]) == 1 and [s["step"] for s in callback.steps] == [4]


# --------------------------------------------------------------------------------------------------
# Real training runs: single process (naive, detached, detached without stats) and 2-rank ZeRO-3.
# --------------------------------------------------------------------------------------------------
STEPS = 3


@pytest.fixture(scope="module")
def stats_runs(tiny_assets, tmp_path_factory):
    """Two samples, batch 1 x 2 accumulation (or 2 ranks): every step holds both samples, so the first step
    starts from the same state on the same batch in all runs. The two samples differ in length, so LLaVA's
    modality-length sampler orders them by length, not by each rank's torch RNG, and the two ranks take one
    each. The projector comes from a fixed adapter, so every run, ZeRO-3 included, starts from identical
    weights."""
    from transformers import AutoConfig, CLIPVisionConfig

    out = tmp_path_factory.mktemp("grad_stats")
    samples = json.load(open(tiny_assets["finetune"]))
    length = lambda sample: sum(len(turn["value"].split()) for turn in sample["conversations"])  # LLaVA's
    data = [samples[0], next(s for s in samples if length(s) != length(samples[0]))]
    two = str(out / "two.json")
    json.dump(data, open(two, "w"))
    width = CLIPVisionConfig.from_pretrained(tiny_assets["vision_tower"]).hidden_size * 4  # main + 3 taps
    hidden = AutoConfig.from_pretrained(tiny_assets["llm"]).hidden_size
    g = torch.Generator().manual_seed(0)
    adapter = str(out / "mm_projector.bin")
    torch.save({"model.mm_projector.0.weight": torch.randn(hidden, width, generator=g) * 0.05,
                "model.mm_projector.0.bias": torch.zeros(hidden),
                "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.05,
                "model.mm_projector.2.bias": torch.zeros(hidden)}, adapter)

    def flags(name, projector, stats=True, **extra):
        f = llava_flags(tiny_assets, "finetune", str(out / name), projector=projector, data_path=two,
                        mm_vision_skip_layers=TAPS, pretrain_mm_mlp_adapter=adapter, unfreeze_mm_vision_tower=True,
                        mm_vision_tower_lr=1e-3, num_train_epochs=STEPS, per_device_train_batch_size=1,
                        group_by_modality_length=True, **extra)
        return f + (["--dsl_grad_stats_dense_steps", STEPS, "--dsl_grad_stats_window", STEPS] if stats else [])

    det = dict(mm_vision_detach_depth=2)
    # the real CLI once; the other two in this process (same code path, no second interpreter start)
    run_module("llava_dsl.diagnostics", ["train"] + flags(
        "llava-detached", "detached_mlp_multilayer", gradient_accumulation_steps=2, **det), env=ONE_THREAD)
    train_in_process(flags("llava-plain", "detached_mlp_multilayer", stats=False, gradient_accumulation_steps=2,
                           **det))
    train_in_process(flags("llava-naive", "mlp_multilayer", gradient_accumulation_steps=2))
    # the detached run again as 2 ranks x 1 sample under ZeRO-3, every tower tensor partitioned
    config = json.load(open(os.path.join(ROOT, "scripts", "zero3", "zero3.json")))
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    zero3_config = str(out / "zero3_partition_all.json")
    json.dump(config, open(zero3_config, "w"))
    run_module("llava_dsl.diagnostics", ["train"] + flags(
        "llava-zero3", "detached_mlp_multilayer", gradient_accumulation_steps=1, deepspeed=zero3_config, **det),
        env=ONE_THREAD, launcher=[DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module"])
    return {name: str(out / f"llava-{name}") for name in ("detached", "plain", "naive", "zero3")}


def train_in_process(args):
    import sys

    from llava_dsl.diagnostics.__main__ import train

    argv = sys.argv
    try:
        train([str(a) for a in args])
    finally:
        sys.argv = argv


def stats_of(run_dir):
    return json.load(open(os.path.join(run_dir, "dsl_grad_stats.json")))


def losses(run_dir):
    history = json.load(open(os.path.join(run_dir, "trainer_state.json")))["log_history"]
    return [e["loss"] for e in history if "loss" in e]


def test_measuring_does_not_change_training(stats_runs):
    measured = load_file(os.path.join(stats_runs["detached"], "model.safetensors"))
    plain = load_file(os.path.join(stats_runs["plain"], "model.safetensors"))
    tower = [k for k in plain if "vision_tower" in k]
    assert tower and sorted(measured) == sorted(plain)
    assert [k for k in plain if not torch.equal(measured[k], plain[k])] == []
    assert losses(stats_runs["detached"]) == losses(stats_runs["plain"]) and len(losses(stats_runs["plain"])) == STEPS
    assert not os.path.exists(os.path.join(stats_runs["plain"], "dsl_grad_stats.json"))


def test_runs_log_and_write_the_window_statistics(stats_runs):
    for name in ("detached", "naive"):
        stats = stats_of(stats_runs[name])
        assert [s["step"] for s in stats["steps"]] == list(range(1, STEPS + 1))
        assert [g["name"] for g in stats["groups"]] == ["embeddings", "blocks_1-2", "blocks_3-4", "blocks_5-6",
                                                        "block_7"]
        (window,) = stats["windows"]
        assert (window["first_step"], window["last_step"], window["num_steps"]) == (1, STEPS, STEPS)
        shallow = window["groups"]["blocks_1-2"]
        assert shallow["trcov_main"] > 0 and shallow["trcov_skip"] > 0
        assert shallow["trcov_ratio"] == pytest.approx(shallow["trcov_skip"] / shallow["trcov_main"])
        assert 0 < shallow["snr_main"] <= 1 and 0 < shallow["snr_full"] <= 1
        assert stats["timing"]["overhead_seconds_mean"] > 0
        # the same numbers reached the Trainer's log (and so every --report_to target)
        history = json.load(open(os.path.join(stats_runs[name], "trainer_state.json")))["log_history"]
        logged = [e for e in history if "dsl_grad/blocks_1-2/trcov_ratio" in e]
        assert len(logged) == 1 and logged[0]["step"] == STEPS
        assert logged[0]["dsl_grad/blocks_1-2/trcov_ratio"] == pytest.approx(shallow["trcov_ratio"])
    # step 1 starts from the same state and batch: the detached run's counterfactual skip is the naive one
    detached, naive = stats_of(stats_runs["detached"])["steps"][0], stats_of(stats_runs["naive"])["steps"][0]
    for group, values in naive["groups"].items():
        for key in ("norm_main", "norm_skip", "cos"):
            assert detached["groups"][group][key] == pytest.approx(values[key], rel=1e-4, abs=1e-9), (group, key)
        # what was applied differs: the naive run applies the full gradient, the detached one leaves taps 2, 4 out
        if group == "blocks_1-2":
            assert values["norm_applied"] == pytest.approx(values["norm_full"])
            assert detached["groups"][group]["norm_applied"] != pytest.approx(values["norm_full"], rel=1e-3)


def test_plot_draws_naive_and_detached_side_by_side(stats_runs, tmp_path):
    from PIL import Image


    out = str(tmp_path / "curves.png")
    run_module("llava_dsl.diagnostics", ["plot", stats_runs["naive"], stats_runs["detached"], "--out", out])
    image = Image.open(out).convert("RGB")
    column = image.width // 2
    groups = [g["name"] for g in stats_of(stats_runs["naive"])["groups"]]
    for left in (0, column):
        colors = {c for _, c in image.crop((left, 0, left + column, image.height - 30)).getcolors(1 << 20)}
        for i, group in enumerate(groups):  # every group's curves are drawn in both columns
            assert PALETTE[i] in colors, (group, left)
    missing = run_module("llava_dsl.diagnostics", ["plot", str(tmp_path), "--out", out], check=False)
    assert missing.returncode != 0 and "dsl_grad_stats.json" in missing.stderr


def test_zero3_two_ranks_report_what_one_process_reports(stats_runs):
    zero3, single = stats_of(stats_runs["zero3"]), stats_of(stats_runs["detached"])
    assert [s["step"] for s in zero3["steps"]] == [s["step"] for s in single["steps"]] == list(range(1, STEPS + 1))
    assert [g["name"] for g in zero3["groups"]] == [g["name"] for g in single["groups"]]
    # step 1: same weights, same two samples (one per rank vs two accumulated micro-batches); only the order of
    # the fp32 sums differs
    for group, values in single["steps"][0]["groups"].items():
        for key in ("norm_main", "norm_skip", "norm_full", "norm_applied", "cos"):
            assert zero3["steps"][0]["groups"][group][key] == pytest.approx(values[key], rel=1e-4, abs=1e-9), \
                (group, key)
    # the window statistics over all steps follow within the drift of a few Adam steps
    (window_zero3,), (window_single,) = zero3["windows"], single["windows"]
    for group, values in window_single["groups"].items():
        for key in ("trcov_main", "trcov_skip", "snr_main", "snr_full"):
            assert window_zero3["groups"][group][key] == pytest.approx(values[key], rel=1e-2), (group, key)
    zero3_losses, single_losses = losses(stats_runs["zero3"]), losses(stats_runs["detached"])
    assert zero3_losses[0] == pytest.approx(single_losses[0], rel=1e-5)
    assert zero3_losses == pytest.approx(single_losses, rel=1e-3)  # Adam amplifies the summation-order noise
