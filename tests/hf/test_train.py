"""Training through the ecosystem's own loops: one Trainer SGD step and the entry point's refusals (in process, in
both environments); then, marked ``launch`` and run once, in the transformers 5.x environment (make test-hf5): the
entry point end to end, resume after a kill, 2-rank ZeRO-3 against one process (the deepspeed launcher, CPU, gloo)
and DDP with a main layer below the last block. One uninterrupted single-process run is the reference for the
end-to-end checks, for the resumed run and for ZeRO-3."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hf_helpers import ROOT, child_env, run
from PIL import Image
from safetensors.torch import load_file
from support import free_port
from test_core import backward
from transformers import Trainer, TrainingArguments

from llava_dsl.diagnostics.__main__ import main as diagnostics_main
from llava_dsl.diagnostics.stats import STATS_FILE
from llava_dsl.hf import TowerLRMixin, apply_detached_skip_links, remove_detached_skip_links, sft
from llava_dsl.hf.tiny import llava_inputs, save_tiny_llava, tiny_llava

TOWER_LR, LR = 0.5, 0.01


def test_one_trainer_sgd_step_updates_the_shallow_block_by_minus_lr_g_main(tmp_path):
    model = tiny_llava()
    inputs = llava_inputs(model)
    # the Trainer divides the summed loss by the count of unshifted labels; with the first label masked that count
    # equals the model's own (shifted) one, so the model's mean loss and the Trainer's loss are the same
    inputs["labels"][:, 0] = -100
    apply_detached_skip_links(model, detach_layers=[3, 1])
    model.train()
    prefix = "model.vision_tower."
    g_dsl = backward(model, inputs, prefix)
    remove_detached_skip_links(model)
    g_main = backward(model, inputs, prefix, reference=[3, 1])  # consumption-side reference
    g_naive = backward(model, inputs, prefix)
    apply_detached_skip_links(model, detach_layers=[3, 1])
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(inputs["input_ids"].shape[0])]

    class T(TowerLRMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd", learning_rate=LR, max_steps=1,
                             per_device_train_batch_size=len(rows), lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=100,
                             remove_unused_columns=False, dataloader_drop_last=False)
    trainer = T(model=model, args=args, train_dataset=rows, vision_tower_lr=TOWER_LR,
                data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    trainer.train()
    shallow = [n for n in g_main if "layers.0." in n]
    assert shallow
    for n in shallow:
        update = model.state_dict()[n] - before[n]
        # atol: the float32 rounding of (w - lr g) - w for weights of order 1
        torch.testing.assert_close(update, -TOWER_LR * g_main[n], rtol=1e-5, atol=2e-7)
    # and not the naive update: the skip part is far above that rounding on the shallow block
    off = max((model.state_dict()[n] - before[n] + TOWER_LR * g_naive[n]).abs().max().item() for n in shallow)
    assert off > 100 * 2e-7, off
    for n in shallow:
        torch.testing.assert_close(g_dsl[n], g_main[n], rtol=0, atol=0)
    lm = "model.language_model.layers.0.mlp.down_proj.weight"
    lm = lm if lm in before else [n for n in before if "language_model" in n and n.endswith("down_proj.weight")][0]
    assert not torch.equal(model.state_dict()[lm], before[lm])  # the rest moved with its own LR


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("hfdata")
    os.makedirs(out / "images")
    save_tiny_llava(str(out / "model"))
    save_tiny_llava(str(out / "model_low"), vision_feature_layer=[3, 2, 1])  # main layer below the last block
    records = []
    for i in range(8):
        Image.new("RGB", (40, 36), (30 * i, 100, 200 - 20 * i)).save(out / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the color ?"}, {"from": "gpt", "value": f"red {i}"},
            {"from": "human", "value": "is it blue ?"}, {"from": "gpt", "value": "no"}]})
    with open(out / "data.json", "w") as f:
        json.dump(records, f)
    return out


def sft_args(data, output_dir, model="model", steps=4, **extra):
    args = {"model_name_or_path": data / model, "data_path": data / "data.json", "image_folder": data / "images",
            "output_dir": output_dir, "max_steps": steps, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
            "vision_tower_lr": 1e-4, "dsl_detach_depth": 1, "logging_steps": 1, "save_strategy": "no",
            "use_cpu": True, "bf16": False, "seed": 0, "report_to": "none", "lr_scheduler_type": "constant",
            "dataloader_num_workers": 0, **extra}
    out = []
    for k, v in args.items():
        if v is not None:
            out += [f"--{k}", str(v)]
    return out


def loaded(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder)).state_dict()


def weights(folder):
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(folder, f)))
    return out


# --------------------------------------------------------------------------------------------------
# The entry point's refusals, in process (main() is what python -m runs; each fails before training)
# --------------------------------------------------------------------------------------------------
def _refused(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        sft.main([str(a) for a in argv])
    assert raised.value.code == 2, raised.value.code
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--mm_routing", "dpvr_lf"], "DPVR-LF is not available on the stock Hugging Face path"),
    (["--load_in_4bit", "True", "--lora_r", "4"], "needs a CUDA GPU"),
    (["--dsl_detach_layers", "2"], "detach_layers=[2]: layer 2 is not a tapped layer"),
    (["--vision_tower_lr", "1e-4", "--freeze_vision_tower", "True"], "a frozen tower has no learning rate"),
    (["--dsl_grad_stats_every", "2", "--dsl_grad_stats_window", "1"], "--dsl_grad_stats_window=1: a window needs"),
    (["--dsl_grad_stats_dense_steps", "-1"], "--dsl_grad_stats_dense_steps=-1: expected >= 0"),
    (["--dsl_detach_layers", "1", "--dsl_detach_depth", "1"], "--dsl_detach_layers='1' and --dsl_detach_depth=1: "
                                                              "both choose"),
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--deepspeed", os.path.join(ROOT, "scripts", "hf", "zero3.json"), "--ddp_timeout", "x"],
     "argument --ddp_timeout/--ddp-timeout: invalid int value: 'x'"),
])
def test_entry_point_refuses_bad_flags(data, tmp_path, capsys, monkeypatch, flags, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were refused")

    if "both choose" in message:  # refused from the flags alone, before any model loads
        monkeypatch.setattr(sft, "build_model", no_model)
    detach_depth = None if "--dsl_detach_layers" in flags else 1  # the flags choose it
    err = _refused(sft_args(data, tmp_path / "x", dsl_detach_depth=detach_depth) + flags, capsys)
    assert message in err, err[-2000:]
    assert "Traceback" not in err and len(err) < 2000, err[-2000:]  # one message, not the whole usage
    assert not (tmp_path / "x" / "config.json").exists()


def test_a_cpu_run_without_bf16_trains_in_float32_and_says_so(data, tmp_path, capsys):
    """TRL's SFTConfig defaults bf16 to True, which transformers refuses without a GPU ("Your setup doesn't support
    bf16/gpu") unless --use_cpu is given; every run on a machine without CUDA gets --bf16 False, said in one line."""
    assert not torch.cuda.is_available()
    trainer = sft.main([str(a) for a in sft_args(data, tmp_path / "x", steps=1, bf16=None, use_cpu=None)])
    out = capsys.readouterr().out
    assert trainer.args.bf16 is False and "no CUDA: --bf16 False" in out, out[-2000:]
    assert (tmp_path / "x" / "config.json").exists()


def _checkpoint(folder, step, complete=True):
    """A checkpoint folder as the Trainer writes one (weights, optimizer, scheduler, RNG, trainer state)."""
    from llava_dsl.checkpointing.completeness import write_completion_marker

    os.makedirs(folder)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"x" * (step + 10))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_completion_marker(str(folder), step, 1, deepspeed=False)
    return folder


def _cpu_args(output_dir):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to=[])


def test_resume_latest_skips_an_incomplete_checkpoint_and_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "run"
    _checkpoint(out / "checkpoint-2", 2)
    cut = _checkpoint(out / "checkpoint-4", 4)
    (cut / "optimizer.pt").unlink()  # killed while the Trainer was writing it
    _checkpoint(out / "checkpoint-6", 6, complete=False)  # killed before the completion marker
    assert sft.resolve_checkpoint("latest", _cpu_args(out)) == str(out / "checkpoint-2")
    said = capsys.readouterr().out
    assert f"{out / 'checkpoint-4'} is incomplete (optimizer.pt is missing)" in said, said
    assert f"{out / 'checkpoint-6'} is incomplete (no readable checkpoint_complete.json" in said, said
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "incomplete-checkpoints"]
    assert sft.resolve_checkpoint("latest", _cpu_args(tmp_path / "empty")) is None


def test_resume_from_an_incomplete_path_is_refused_by_name(tmp_path, capsys):
    cut = _checkpoint(tmp_path / "run" / "checkpoint-4", 4)
    (cut / "rng_state.pth").write_bytes(b"x")  # cut short
    with pytest.raises(SystemExit):
        sft.resolve_checkpoint(str(cut), _cpu_args(tmp_path / "run"))
    err = capsys.readouterr().err
    assert f"--resume_from_checkpoint={str(cut)!r}: cannot resume from it: rng_state.pth has 1 bytes" in err, err
    assert cut.is_dir()  # named, left where it is


def test_entry_point_names_bad_data(data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    records = json.load(open(data / "data.json"))
    records[3]["image"] = "missing.png"
    bad.write_text(json.dumps(records))
    args = sft_args(data, tmp_path / "x")
    args[args.index("--data_path") + 1] = str(bad)
    err = _refused(args, capsys)
    assert "record 3 (id 's3')" in err and "missing.png" in err and str(bad) in err, err[-2000:]


# --------------------------------------------------------------------------------------------------
# Launched runs (marker ``launch``: once, in the 5.x environment)
# --------------------------------------------------------------------------------------------------
STEPS, EVERY = 6, 2


def _reference_args(data, out, **extra):
    """Batch 4 on one process; the detach choice left to the config default (taps in the first half: [1])."""
    return sft_args(data, out, steps=STEPS, **{
        "per_device_train_batch_size": 4, "dsl_detach_depth": None, "save_strategy": "steps", "save_steps": EVERY,
        "dsl_grad_stats_dense_steps": STEPS, "dsl_grad_stats_window": 2, **extra})


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted single-process run of ``python -m llava_dsl.hf.sft``: (output folder, log)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _, log = run([sys.executable, "-m", "llava_dsl.hf.sft"] + _reference_args(data, out))
    return out, log


@pytest.mark.launch
def test_entry_point_trains_saves_the_choice_and_measures_the_split(data, reference, tmp_path):
    out, log = reference
    assert "dsl_detach_layers=[1]" in log and "post_layernorm" in log
    with open(out / "config.json") as f:
        assert json.load(f)["dsl_detach_layers"] == [1]
    w0, w1 = weights(data / "model"), weights(out)
    tower = [k for k in w0 if "vision_tower" in k and "layers.0." in k]
    assert tower and any(not torch.equal(w0[k], w1[k]) for k in tower)  # the tower trained
    post = [k for k in w0 if "post_layernorm" in k]
    assert post and all(torch.equal(w0[k], w1[k]) for k in post)  # frozen: no loss reaches it
    # --dsl_grad_stats_*: the LLaVA path's file, every step measured, windows of 2, drawn by the diagnostics plot
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["layer_spec"] == {"num_blocks": 4, "main": 4, "taps": [3, 1], "detached_layers": [1]}
    assert [s["step"] for s in stats["steps"]] == list(range(1, STEPS + 1))
    assert len(stats["windows"]) == STEPS // 2
    assert stats["windows"][0]["groups"]["block_1"]["norm_skip"] > 0
    assert "dsl_grad/block_1/trcov_ratio" in log
    diagnostics_main(["plot", str(out), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.launch
def test_resume_after_a_kill_equals_the_uninterrupted_run(data, reference, tmp_path):
    full, _ = reference
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "llava_dsl.hf.sft"] + _reference_args(data, killed)
    p = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (killed / f"checkpoint-{EVERY}" / "checkpoint_complete.json").exists():
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed after its first checkpoint"
    assert not (killed / "config.json").exists()
    # a newer checkpoint cut by the kill: its optimizer state never reached the disk (the Trainer would resume
    # from it with a fresh optimizer, silently)
    cut = killed / f"checkpoint-{2 * EVERY}"
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(killed / f"checkpoint-{EVERY}", cut)
    (cut / "optimizer.pt").unlink()
    _, log = run(command + ["--resume_from_checkpoint", "latest"])
    assert f"{cut} is incomplete (optimizer.pt is missing); moved to" in log, log[-3000:]
    assert f"resuming from {killed / f'checkpoint-{EVERY}'} (step {EVERY})" in log, log[-3000:]
    assert "dsl_detach_layers=[1]" in log
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    w0 = weights(data / "model")
    assert any(not torch.equal(w0[k], a[k]) for k in a if "layers.0." in k and "vision_tower" in k)
    # the gradient statistics continue: the steps after the checkpoint are measured as in the uninterrupted run (the
    # steps before it are there too when the kill came after the checkpoint's on_save)
    full_steps = {r["step"]: r for r in json.loads((full / STATS_FILE).read_text())["steps"]}
    resumed = json.loads((killed / STATS_FILE).read_text())["steps"]
    assert [r["step"] for r in resumed][-2:] == [STEPS - 1, STEPS]
    for record in resumed:
        for group, values in record["groups"].items():
            for key in ("norm_main", "norm_skip"):
                assert values[key] == pytest.approx(full_steps[record["step"]]["groups"][group][key], rel=1e-4,
                                                    abs=1e-9), (record["step"], group, key)


@pytest.mark.launch
def test_zero3_two_ranks_equal_one_process(data, reference, tmp_path):
    """The deepspeed launcher, 2 CPU ranks (gloo) x batch 2 under ZeRO-3 (scripts/hf/zero3.json) against the
    reference's one process x batch 4 without DeepSpeed: the same samples per step, the same weights after it."""
    one, _ = reference
    two = tmp_path / "two"
    _, log = run(["deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module", "llava_dsl.hf.sft"]
                 + _reference_args(data, two, per_device_train_batch_size=2, save_strategy="no",
                                   use_cpu=None, bf16=None,
                                   deepspeed=os.path.join(ROOT, "scripts", "hf", "zero3.json")), timeout=500)
    assert "stage3_allgather_sequential=true" in log  # the CPU-safe config of llava_dsl.compat.deepspeed
    # no --use_cpu / --bf16 given: the entry point adds them on a machine without CUDA, and says so
    assert "dist_world_size=2" in log and "no CUDA: --bf16 False --use_cpu True" in log
    # read back as users do: transformers 5.x writes the ZeRO-3-gathered state dict under its legacy key names
    # (language_model.model.model.*), which from_pretrained maps back
    a, b = loaded(one), loaded(two)
    assert a.keys() == b.keys()
    w0 = loaded(data / "model")
    moved = [k for k in a if "vision_tower" in k and "layers.0." in k and not torch.equal(w0[k], a[k])]
    assert moved
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # the gradient split under ZeRO-3, averaged over the ranks, is the one process's
    one_stats, two_stats = (json.loads((d / STATS_FILE).read_text()) for d in (one, two))
    assert two_stats["zero3"] is True and two_stats["world_size"] == 2
    assert [r["step"] for r in two_stats["steps"]] == [r["step"] for r in one_stats["steps"]]
    for r1, r2 in zip(one_stats["steps"], two_stats["steps"]):
        for group, values in r1["groups"].items():
            for key in ("norm_main", "norm_skip", "norm_applied"):
                assert r2["groups"][group][key] == pytest.approx(values[key], rel=1e-3, abs=1e-9), \
                    (r1["step"], group, key)


@pytest.mark.launch
def test_ddp_two_ranks_with_unused_tower_blocks(data, tmp_path):
    """Main layer 3 of a 4-block tower: block 4 and post_layernorm get no gradient. Without the freeze DDP fails
    ("Expected to have finished reduction"); with it, two gloo ranks train."""
    out = tmp_path / "ddp"
    _, log = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  free_port(), "-m", "llava_dsl.hf.sft"] + sft_args(
        data, out, model="model_low", steps=2, ddp_find_unused_parameters="False", ddp_backend="gloo",
        gradient_checkpointing="True"), timeout=400)
    assert "encoder.layers.3" in log
    with open(out / "config.json") as f:
        assert json.load(f)["dsl_detach_layers"] == [1]
