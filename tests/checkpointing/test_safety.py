"""Nothing lost: kill/resume under ZeRO-3 in both stages, atomic saves, the masked-sample guard, bad data.

Every training run is the real CLI: this file, run as a script, is ``python -m llava_dsl.train`` with
``llava_dsl.checkpointing`` registered and ``SafetyTrainerMixin`` in the trainer (see ``_train``), plus two test-only
hooks: each rank appends its exact per-step loss and sample ids to ``OUTPUT_DIR/losses.rank{R}.jsonl``, and
``SAFETY_TEST_KILL=after:N`` makes rank 0 SIGKILL the whole process group (launcher and every rank) right after
checkpoint-N is complete, ``during:N`` once checkpoint-N's model and optimizer files are written but before its
trainer state and its rename. Resumed runs must reproduce an uninterrupted run exactly: same samples, losses
equal bit for bit (tolerance 0), final weights equal.

Runtime: 6 two-rank ZeRO-3 runs (launcher start-up dominates) and 4 single-process runs, 3.4 min of CPU time
in all: about 2 min of wall time on 2 idle cores; 5.8-7.1 min measured on 2 cores shared with other jobs.
"""
import io
import json
import os
import re
import shutil
import signal
import sys
import time

import pytest
import torch
from support import DEEPSPEED, free_port, llava_flags, run_in_process_group

from llava_dsl.checkpointing.atomic import atomic_directory, atomic_torch_save
from llava_dsl.checkpointing.completeness import (
    checkpoint_problem,
    latest_complete_checkpoint,
    set_aside_incomplete,
    write_completion_marker,
)
from llava_dsl.compat.deepspeed import cpu_safe_deepspeed_argv
from llava_dsl.data_checks import BadSampleError, CheckedLazySupervisedDataset, DataArguments, SampleTrackingCollator

KILL_ENV = "SAFETY_TEST_KILL"
THIS_FILE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(THIS_FILE)))
ZERO3 = os.path.join(ROOT, "scripts", "zero3", "zero3.json")


# --------------------------------------------------------------------------------------------------
# The training entry point the runs use (this file as a script).
# --------------------------------------------------------------------------------------------------
def _trainer_class(fault):
    from llava_dsl.checkpointing.trainer import SafetyTrainerMixin
    from llava_dsl.plugin import DSLTrainer

    base = DSLTrainer
    assert issubclass(base, SafetyTrainerMixin)
    when, step = fault.split(":") if fault else (None, "0")
    step = int(step)

    def kill_everything(trainer):
        trainer.args.distributed_state.wait_for_everyone()  # every rank has reached the chosen point
        if trainer.args.process_index == 0:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        time.sleep(600)

    class TestTrainer(base):
        def training_step(self, model, inputs):
            ids = list(inputs.get("sample_ids", ()))
            loss = super().training_step(model, inputs)
            # exact per-step, per-rank losses and samples (the logged losses are rounded and averaged over ranks)
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = os.path.join(self.args.output_dir, f"losses.rank{self.args.process_index}.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "loss": loss.item(), "ids": ids}) + "\n")
            return loss

        def _save_rng_state(self, output_dir):  # inside the staging folder, after model and optimizer files
            super()._save_rng_state(output_dir)
            if when == "during" and self.state.global_step == step:
                kill_everything(self)

        def _save_checkpoint(self, model, trial, metrics=None):
            super()._save_checkpoint(model, trial, metrics=metrics)
            if when == "after" and self.state.global_step == step:
                kill_everything(self)

    return TestTrainer


def _train(argv):
    import llava.train.train as llava_train

    from llava_dsl import plugin
    from llava_dsl import train as entry

    trainer = _trainer_class(os.environ.get(KILL_ENV))
    register_plugin = plugin.register

    def register():
        register_plugin()
        llava_train.LLaVATrainer = trainer  # the plugin's trainer plus the test's kill points

    plugin.register = register
    entry.main(argv)  # the entry point itself switches on the sequential gather for ZeRO-3 on CPU


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def _launch(flags, zero3=False, kill=None, timeout=900):
    """Run one training (2 ZeRO-3 ranks under the deepspeed launcher, or one process) in its own process group;
    return (exit status, stdout and stderr)."""
    command = [sys.executable, THIS_FILE] + flags
    if zero3:
        command = [DEEPSPEED, "--num_gpus", "2", "--master_port", free_port(), THIS_FILE] + flags + ["--deepspeed", ZERO3]
    return run_in_process_group(command, env={KILL_ENV: kill}, timeout=timeout)


def _ok(result):
    code, output = result
    assert code == 0, output[-6000:]
    return output


def _killed(result):
    code, output = result
    assert code == -signal.SIGKILL, f"expected the run to be killed, got exit status {code}:\n{output[-6000:]}"
    return output


def _steps(output_dir, rank):
    """{step: [(loss, sample ids), ...]} in the order the step was run (twice if it was redone)."""
    steps = {}
    with open(os.path.join(output_dir, f"losses.rank{rank}.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).append((entry["loss"], entry["ids"]))
    return steps


def _last(steps):
    return {step: runs[-1] for step, runs in steps.items()}


# --------------------------------------------------------------------------------------------------
# Kill / resume under ZeRO-3.
# --------------------------------------------------------------------------------------------------
def test_zero3_stage1_resumes_after_sigkill_exactly_like_an_uninterrupted_run(tiny_assets, tmp_path):

    flags = lambda out: llava_flags(tiny_assets, "pretrain", str(out), per_device_train_batch_size=2,
                                    save_strategy="steps", save_steps=2)  # 16 samples / (2 ranks x 2) = 4 steps
    reference, resumed = tmp_path / "llava-reference", tmp_path / "llava-resumed"
    _ok(_launch(flags(reference), zero3=True))
    _killed(_launch(flags(resumed), zero3=True, kill="after:2"))
    checkpoint = resumed / "checkpoint-2"
    assert checkpoint_problem(str(checkpoint)) is None
    # upstream's stage-1 checkpoint is mm_projector.bin + config.json; this one can continue the run
    assert {"mm_projector.bin", "config.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
            "trainer_state.json", "latest", "global_step2"} <= set(os.listdir(checkpoint))
    assert not (resumed / "mm_projector.bin").exists()
    # a newer checkpoint cut short: a copy of checkpoint-2 whose rank-1 optimizer partition lost its second half
    cut = resumed / "checkpoint-3"
    shutil.copytree(checkpoint, cut)
    shard = cut / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(shard, shard.stat().st_size // 2)

    output = _ok(_launch(flags(resumed), zero3=True))
    assert f"{cut} is incomplete (global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt has" in output, output[-4000:]
    assert f"resuming from {checkpoint} (step 2)" in output
    set_aside = os.listdir(resumed / "incomplete-checkpoints")
    assert not cut.exists() and [n for n in set_aside if n.startswith("checkpoint-3-")]
    for rank in (0, 1):
        expected, got = _steps(reference, rank), _steps(resumed, rank)
        assert sorted(expected) == [1, 2, 3, 4] and all(len(runs) == 1 for runs in got.values())  # nothing redone
        assert got == expected, (rank, got, expected)  # same samples, bit-identical losses after the restart
    final, at_kill = torch.load(reference / "mm_projector.bin"), torch.load(checkpoint / "mm_projector.bin")
    after_restart = torch.load(resumed / "mm_projector.bin")
    assert sorted(final) == sorted(after_restart) and len(final) == 4
    assert all(torch.equal(final[k], after_restart[k]) for k in final)
    assert not all(torch.equal(final[k], at_kill[k]) for k in final)  # steps 3-4 did train after the restart


def test_zero3_joint_stage2_resumes_after_sigkill_inside_a_checkpoint_save(tiny_assets, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    flags = lambda out: llava_flags(
        tiny_assets, "finetune", str(out), per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
        save_total_limit=1, group_by_modality_length=True, unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-4)
    reference, resumed = tmp_path / "llava-reference", tmp_path / "llava-resumed"
    _ok(_launch(flags(reference), zero3=True))
    _killed(_launch(flags(resumed), zero3=True, kill="during:3"))
    staging = resumed / "tmp-checkpoint-3"
    # killed with checkpoint-3's weights and optimizer partitions on disk, before its trainer state and rename;
    # checkpoint-1 was rotated away only once checkpoint-2 was complete
    assert (staging / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not (staging / "trainer_state.json").exists()
    assert sorted(n for n in os.listdir(resumed) if "checkpoint" in n) == ["checkpoint-2", "tmp-checkpoint-3"]

    output = _ok(_launch(flags(resumed), zero3=True))
    assert f"{staging} is incomplete (its save was interrupted before it was renamed to checkpoint-3)" in output
    assert f"resuming from {resumed / 'checkpoint-2'} (step 2)" in output
    for rank in (0, 1):
        expected, got = _steps(reference, rank), _steps(resumed, rank)
        assert sorted(expected) == [1, 2, 3, 4] and len(got[3]) == 2  # step 3 ran before the kill and again after
        assert _last(got) == _last(expected) and got[3][0] == expected[3][0], (rank, got, expected)
    final, after_restart = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert sorted(final) == sorted(after_restart)
    assert [k for k in final if not torch.equal(final[k], after_restart[k])] == []
    prefix = "model.vision_tower.vision_tower."
    original = CLIPVisionModel.from_pretrained(tiny_assets["vision_tower"]).state_dict()
    assert any(not torch.equal(after_restart[prefix + k].float(), v) for k, v in original.items())  # tower trained


# --------------------------------------------------------------------------------------------------
# Atomic files and complete checkpoints.
# --------------------------------------------------------------------------------------------------
def _dies_by_sigkill(action):
    """Run ``action`` in a forked child that is expected to SIGKILL itself part-way."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _kill_self(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def test_gradient_statistics_survive_a_kill_and_resume(tiny_assets, tmp_path):
    """dsl_grad_stats.json after kill + resume holds every window and step of an uninterrupted run: the windows
    closed before the kill, and the window that was open at the checkpoint, continued after the restart."""
    flags = lambda out: llava_flags(
        tiny_assets, "finetune", str(out), per_device_train_batch_size=2, save_strategy="steps", save_steps=4,
        mm_vision_skip_layers="2,4,6", unfreeze_mm_vision_tower=True, dsl_grad_stats_dense_steps=8,
        dsl_grad_stats_window=3)  # 16 samples / batch 2 = 8 steps: windows 1-3, 4-6, then 7-8 at the end
    reference, resumed = tmp_path / "llava-reference", tmp_path / "llava-resumed"
    _ok(_launch(flags(reference)))
    _killed(_launch(flags(resumed), kill="after:4"))  # step 4 sits in the open window 4-6
    assert (resumed / "checkpoint-4" / "dsl_grad_stats_state.pt").is_file()
    _ok(_launch(flags(resumed)))
    expected = json.loads((reference / "dsl_grad_stats.json").read_text())
    got = json.loads((resumed / "dsl_grad_stats.json").read_text())
    span = lambda stats: [(w["first_step"], w["last_step"], w["num_steps"]) for w in stats["windows"]]
    assert span(expected) == [(1, 3, 3), (4, 6, 3), (7, 8, 2)]
    assert span(got) == span(expected)
    assert [s["step"] for s in got["steps"]] == list(range(1, 9))
    for mine, theirs in zip(got["windows"], expected["windows"]):
        for group, values in theirs["groups"].items():
            for key, value in values.items():
                assert mine["groups"][group][key] == pytest.approx(value, rel=1e-5, abs=1e-12), (group, key)


def test_a_killed_adapter_save_leaves_the_previous_file_and_a_refused_leftover(tmp_path):
    from llava_dsl.skip_links.adapter import load_projector_adapter
    from llava_dsl.skip_links.fusion import build_multilayer_mlp

    projector = build_multilayer_mlp(32, 4, 64, 2)
    weights = lambda scale: {f"model.mm_projector.{k}": v * scale for k, v in projector.state_dict().items()}
    path = tmp_path / "mm_projector.bin"
    atomic_torch_save(weights(1.0), str(path))
    good = path.read_bytes()

    def killed_while_writing():
        real = torch.save

        def half_then_die(obj, file):
            buffer = io.BytesIO()
            real(obj, buffer)
            with open(file, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _kill_self()

        torch.save = half_then_die
        atomic_torch_save(weights(2.0), str(path))

    def killed_before_rename():
        os.replace = _kill_self
        atomic_torch_save(weights(2.0), str(path))

    for interrupted_save in (killed_while_writing, killed_before_rename):
        assert _dies_by_sigkill(interrupted_save)
        assert path.read_bytes() == good
    load_projector_adapter(projector, str(path), "detached_mlp_multilayer")
    assert all(torch.equal(v, weights(1.0)[f"model.mm_projector.{k}"]) for k, v in projector.state_dict().items())
    leftovers = sorted(p for p in tmp_path.iterdir() if p.name.startswith(".mm_projector.bin.tmp-"))
    assert len(leftovers) == 2
    with pytest.raises(ValueError, match=re.escape(f"--pretrain_mm_mlp_adapter={leftovers[0]}: cannot be read")):
        load_projector_adapter(projector, str(leftovers[0]), "detached_mlp_multilayer")  # the half-written one
    messages = set_aside_incomplete(str(tmp_path))
    assert [m for m in messages if "temporary file of an interrupted save" in m] and sorted(os.listdir(tmp_path)) == [
        "mm_projector.bin"]


def test_a_killed_model_folder_save_leaves_only_whole_files_and_no_config(tmp_path):

    out = tmp_path / "llava-final"
    with atomic_directory(str(out)) as staging:
        for name in ("model.safetensors", "tokenizer.model", "config.json"):
            with open(os.path.join(staging, name), "w") as f:
                f.write(f"old {name}")
    old = {name: (out / name).read_text() for name in os.listdir(out)}
    assert sorted(old) == ["config.json", "model.safetensors", "tokenizer.model"]

    def killed_while_writing():
        with atomic_directory(str(out)) as staging:
            with open(os.path.join(staging, "model.safetensors"), "w") as f:
                f.write("new model.saf")
            _kill_self()

    def killed_after_the_first_file():
        real, moved = os.replace, []

        def replace(source, target):
            if moved:
                _kill_self()
            moved.append(target)
            real(source, target)

        os.replace = replace
        with atomic_directory(str(out)) as staging:
            for name in ("model.safetensors", "tokenizer.model", "config.json"):
                with open(os.path.join(staging, name), "w") as f:
                    f.write(f"new {name}")

    assert _dies_by_sigkill(killed_while_writing)
    assert {name: (out / name).read_text() for name in os.listdir(out) if not name.startswith(".")} == old
    assert _dies_by_sigkill(killed_after_the_first_file)
    visible = {name: (out / name).read_text() for name in os.listdir(out) if not name.startswith(".")}
    # weights first and whole, the old config.json already gone, the new one not yet in: not loadable by mistake
    assert visible == {"model.safetensors": "new model.safetensors", "tokenizer.model": "old tokenizer.model"}
    assert len([n for n in os.listdir(out) if n.startswith(".saving-")]) == 2
    assert len(set_aside_incomplete(str(out))) == 2 and sorted(os.listdir(out)) == sorted(visible)


def test_only_complete_checkpoints_are_resumed_from(tmp_path):

    out = tmp_path / "llava-run"

    def checkpoint(name, complete=True):
        folder = out / name
        (folder / "global_step").mkdir(parents=True)
        (folder / "global_step" / "optim_states.pt").write_bytes(b"x" * 100)
        (folder / "trainer_state.json").write_text("{}")
        if complete:
            write_completion_marker(str(folder), int(name.rsplit("-", 1)[1]), 2, deepspeed=True)
        return folder

    checkpoint("checkpoint-2")
    os.truncate(checkpoint("checkpoint-4") / "global_step" / "optim_states.pt", 10)
    upstream = checkpoint("checkpoint-5", complete=False)  # e.g. upstream LLaVA's adapter-only checkpoint
    checkpoint("tmp-checkpoint-6", complete=False)
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    messages = set_aside_incomplete(str(out))
    assert len(messages) == 3
    assert f"{out / 'checkpoint-4'} is incomplete (global_step/optim_states.pt has 10 bytes, 100 when" in messages[0]
    assert f"{upstream} is incomplete (no readable checkpoint_complete.json" in messages[1]
    assert f"{out / 'tmp-checkpoint-6'} is incomplete (its save was interrupted" in messages[2]
    assert sorted(os.listdir(out)) == ["checkpoint-2", "incomplete-checkpoints"]
    assert len(os.listdir(out / "incomplete-checkpoints")) == 3


def test_resume_restores_the_data_checks_or_stops_naming_the_file(tmp_path, capsys):
    """The counts of masked and skipped samples continue from the checkpoint's data_checks.json; a file that
    cannot be read stops the resume naming it (the counts never restart at zero unnoticed)."""
    import transformers

    from llava_dsl.checkpointing.trainer import SafetyTrainerMixin
    from llava_dsl.data_checks import DataChecks

    class Trainer(SafetyTrainerMixin, transformers.Trainer):
        pass

    out = tmp_path / "llava-run"
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=transformers.TrainingArguments(str(out), report_to=[]))
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    path = checkpoint / "data_checks.json"

    def resume(text):
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
        write_completion_marker(str(checkpoint), 4, 1, deepspeed=False)  # a complete checkpoint with this file
        trainer.data_checks = DataChecks()
        return trainer._resume_point(str(checkpoint))

    counts = DataChecks(seen=16, masked=1, masked_examples=["tiny-0-00003"], skipped_indices=[2],
                        skipped_examples=["missing-image"])
    assert resume(json.dumps(counts.__dict__)) == str(checkpoint) and trainer.data_checks == counts
    for text, problem in (('{"seen": 16, "mask', "not valid JSON"), ('{"seen": 16, "unread": 1}', "unread"),
                          ("[16, 1]", "expected")):
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + f".*{problem}.*cannot continue"):
            resume(text)
    assert resume(None) == str(checkpoint) and trainer.data_checks == DataChecks()
    assert f"{checkpoint} holds no data_checks.json" in capsys.readouterr().out


def test_zero3_on_cpu_gathers_sequentially_without_touching_the_config_file():
    """Without stage3_allgather_sequential, ZeRO-3 under gloo leaves some pretrained weights stale at random
    (measured: 7-45 wrong CLIP weights in 12-20 loads of the tiny tower; 0 with it): the resume tests need it."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig  # transformers' subclass would switch ZeRO-3 on here

    original = open(ZERO3).read()
    argv = ["--output_dir", "llava-x", "--deepspeed", ZERO3]
    changed = cpu_safe_deepspeed_argv(argv, cuda=False)
    config = HfDeepSpeedConfig(changed[-1]).config  # what transformers reads from the encoded flag
    assert config["zero_optimization"].pop("stage3_allgather_sequential") is True
    assert config == json.loads(original) and changed[:-1] == argv[:-1] and open(ZERO3).read() == original
    assert cpu_safe_deepspeed_argv(changed, cuda=False) == changed
    assert cpu_safe_deepspeed_argv(argv, cuda=True) == argv


# --------------------------------------------------------------------------------------------------
# The masked-sample guard.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mismatched_llm(tiny_assets, tmp_path_factory):
    """The tiny LM with a tokenizer trained without 'USER' as a user-defined symbol, so that LLaVA's v1 template
    miscounts every later round (see environment.md): every finetuning sample comes out fully masked."""
    import sentencepiece as spm

    from llava_dsl.assets.tiny_models import build_tokenizer

    out = str(tmp_path_factory.mktemp("mismatch") / "llm")
    shutil.copytree(tiny_assets["llm"], out)
    train = spm.SentencePieceTrainer.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spm.SentencePieceTrainer, "train",
                      staticmethod(lambda **kwargs: train(**{**kwargs, "user_defined_symbols": []})))
        build_tokenizer(out)
    return out


def test_template_tokenizer_mismatch_stops_before_training_on_a_masked_sample(tiny_assets, mismatched_llm, tmp_path):
    out = tmp_path / "llava-mismatch"
    code, output = _launch(llava_flags(tiny_assets, "finetune", str(out), model_name_or_path=mismatched_llm))
    assert code != 0
    assert "WARNING: tokenization mismatch" in output  # what upstream LLaVA prints, then trains on anyway
    assert "MaskedSamplesError: stopping: 4 of 4 samples so far had every label masked, more than " \
           "--max_masked_sample_fraction=0.0 of this run's 16 samples allows" in output, output[-4000:]
    assert len(re.findall(r"tiny-0-\d{5} \(tokenization mismatch\)", output)) == 4  # the batch's sample ids
    assert f"(--version, here 'v1') does not match the tokenizer of --model_name_or_path ({mismatched_llm})" in output
    assert not (out / "losses.rank0.jsonl").exists()  # stopped before the first step trained


def test_masked_fraction_threshold_stops_once_the_run_must_end_above_it(tiny_assets, mismatched_llm, tmp_path):
    out = tmp_path / "llava-mismatch-half"
    code, output = _launch(llava_flags(tiny_assets, "finetune", str(out), model_name_or_path=mismatched_llm,
                                       max_masked_sample_fraction=0.5))
    # 16 samples in batches of 4, all masked: 4, 8, 12 after 1, 2, 3 batches; 12 > 0.5 x 16 first at the third
    assert code != 0 and "stopping: 12 of 12 samples so far had every label masked" in output, output[-4000:]
    assert "data checks at step 1: 4 of 4 samples had every label masked (e.g. tiny-0-" in output
    assert "data checks at step 2: 8 of 8 samples had every label masked" in output
    assert sorted(_steps(out, 0)) == [1, 2]


# --------------------------------------------------------------------------------------------------
# Bad data.
# --------------------------------------------------------------------------------------------------
BAD_IDS = ("bad-record", "missing-image", "corrupt-image")


def _bad_data(tiny_assets, folder, which=BAD_IDS):
    """finetune.json with the chosen bad samples first, and a copy of the images with a truncated PNG."""
    images = folder / "images"
    shutil.copytree(tiny_assets["image_folder"], images)
    good = json.load(open(tiny_assets["finetune"]))
    png = sorted(images.iterdir())[0]
    (images / "corrupt.png").write_bytes(png.read_bytes()[:64])
    conversation = lambda: [dict(turn) for turn in good[0]["conversations"]]
    bad = {
        "bad-record": {"id": "bad-record", "image": png.name,
                       "conversations": [conversation()[0], {"from": "bot", "value": "an answer"}]},
        "missing-image": {"id": "missing-image", "image": "does-not-exist.png", "conversations": conversation()},
        "corrupt-image": {"id": "corrupt-image", "image": "corrupt.png", "conversations": conversation()},
    }
    path = folder / "data.json"
    path.write_text(json.dumps([bad[name] for name in which] + good))
    return str(path), str(images), [record["id"] for record in good]


def test_skip_bad_samples_trains_without_them_and_lists_each_with_its_reason(tiny_assets, tmp_path):
    data, images, good_ids = _bad_data(tiny_assets, tmp_path)
    out = tmp_path / "llava-skip"
    output = _ok(_launch(llava_flags(tiny_assets, "finetune", str(out), data_path=data, image_folder=images,
                                     skip_bad_samples=True)))
    listed = {entry["id"]: entry for entry in map(json.loads, open(out / "skipped_samples.jsonl"))}
    assert sorted(listed) == sorted(BAD_IDS)
    assert "conversations[1]['from'] is 'bot'" in listed["bad-record"]["reason"] and listed["bad-record"]["step"] == 0
    assert listed["missing-image"]["reason"] == "image not found"
    assert listed["missing-image"]["image"] == os.path.join(images, "does-not-exist.png")
    assert listed["corrupt-image"]["reason"].startswith("image cannot be read")
    assert all(entry["data_path"] == data and entry["step"] >= 1 for k, entry in listed.items() if k != "bad-record")
    assert [listed[k]["index"] for k in BAD_IDS] == [0, 1, 2]
    assert "3 bad samples skipped (e.g. bad-record" in output and str(out / "skipped_samples.jsonl") in output
    # 18 loadable-looking samples fill 5 batches (4+4+4+4+2); the next sample of the file took each bad one's place
    trained = [i for _, ids in _last(_steps(out, 0)).values() for i in ids]
    assert len(trained) == 18 and set(trained) == set(good_ids)
    history = json.load(open(out / "trainer_state.json"))["log_history"]
    assert history[-1]["skipped_samples"] == 3
    # a tokenizer that matches the template: no masked sample, nothing for the guard
    assert all(entry["masked_samples"] == 0 for entry in history) and "tokenization mismatch" not in output


def test_a_missing_image_stops_the_run_naming_sample_json_and_image(tiny_assets, tmp_path):
    data, images, _ = _bad_data(tiny_assets, tmp_path, which=("missing-image",))
    code, output = _launch(llava_flags(tiny_assets, "finetune", str(tmp_path / "llava-bad"), data_path=data,
                                       image_folder=images))
    image = os.path.join(images, "does-not-exist.png")
    assert code != 0
    assert f"sample id 'missing-image' (record 0 of {data}, image {image}): image not found" in output, output[-4000:]
    assert "--skip_bad_samples True skips such samples" in output


def _tokenizer_and_data_args(tiny_assets, images, monkeypatch):
    """The tiny LM's tokenizer with LLaVA's v1 template, and ``data_args(path, skip)`` as train() builds them."""
    import transformers
    from llava import conversation as conversation_lib

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_assets["llm"], use_fast=False, model_max_length=128)
    tokenizer.pad_token = tokenizer.unk_token
    monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates["v1"])

    def data_args(path, skip):
        args = DataArguments(data_path=path, image_folder=images, image_aspect_ratio="pad", skip_bad_samples=skip)
        args.image_processor = transformers.CLIPImageProcessor.from_pretrained(tiny_assets["vision_tower"])
        args.is_multimodal, args.mm_use_im_start_end = True, False
        return args

    return tokenizer, data_args


def test_dataset_names_bad_records_and_images_and_never_drops_a_skip_silently(tiny_assets, tmp_path, monkeypatch):
    data, images, good_ids = _bad_data(tiny_assets, tmp_path)
    tokenizer, data_args = _tokenizer_and_data_args(tiny_assets, images, monkeypatch)

    with pytest.raises(BadSampleError) as refused:
        CheckedLazySupervisedDataset(data, tokenizer, data_args(data, skip=False))
    assert (f"1 malformed record(s) in --data_path={data}:\n  sample id 'bad-record' (record 0 of {data}, image "
            f"{images}/") in str(refused.value) and "conversations[1]['from'] is 'bot'" in str(refused.value)

    loaded = json.load(open(data))
    images_only = tmp_path / "images-only.json"
    images_only.write_text(json.dumps(loaded[1:]))
    strict = CheckedLazySupervisedDataset(str(images_only), tokenizer, data_args(str(images_only), False))
    corrupt = f"sample id 'corrupt-image' (record 1 of {images_only}, image {images}/corrupt.png): image cannot be read"
    with pytest.raises(BadSampleError, match=re.escape(corrupt)):
        strict[1]

    lenient = CheckedLazySupervisedDataset(data, tokenizer, data_args(data, skip=True))
    assert len(lenient) == len(loaded) - 1 and [r["id"] for r in lenient.skipped_records] == ["bad-record"]
    item = lenient[0]  # missing-image, then corrupt-image, give way to the first good sample
    assert item["sample_id"] == good_ids[0] and [s["id"] for s in item["skipped"]] == ["missing-image", "corrupt-image"]
    assert (item["labels"] != -100).any()

    collator = SampleTrackingCollator(tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="missing-image"):  # no trainer to report it to: refuse, not drop
        collator([item, lenient[3]])
    collator.carry_sample_info = True
    batch = collator([item, lenient[3]])
    assert batch["sample_ids"] == [good_ids[0], good_ids[1]] and len(batch["skipped_samples"]) == 2


def test_an_error_from_code_is_raised_even_with_skip_bad_samples(tiny_assets, tmp_path, monkeypatch):
    """Only the data problems the dataset can name (bad records, missing or unreadable images) are skipped; an
    error from code while loading a sound sample reaches the user, naming that sample, and nothing is skipped."""
    import llava.train.train as llava_train

    data, images, good_ids = _bad_data(tiny_assets, tmp_path, which=("missing-image",))
    tokenizer, data_args = _tokenizer_and_data_args(tiny_assets, images, monkeypatch)
    lenient = CheckedLazySupervisedDataset(data, tokenizer, data_args(data, skip=True))
    assert [s["id"] for s in lenient[0]["skipped"]] == ["missing-image"]

    def broken_preprocess(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(llava_train, "preprocess", broken_preprocess)
    with pytest.raises(TypeError, match="unsupported operand") as raised:
        lenient[1]
    assert f"sample id '{good_ids[0]}' (record 1 of {data}" in "\n".join(getattr(raised.value, "__notes__", []))


if __name__ == "__main__":
    _train(sys.argv[1:])
