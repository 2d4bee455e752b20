"""R-Probe stage after a kill: the same command resumes from the newest complete training checkpoint, and the
per-step train losses, evaluation history and final probe weights equal an uninterrupted run's exactly, in one
process and under 2-rank ZeRO-3 (the real deepspeed launcher). Interrupted saves are moved aside, never resumed
from; a restart with other settings is refused.

Every run is a subprocess: this file run as a script is ``python -m llava_dsl.rprobe`` with a step callback
(``run_probe(on_step=...)``) that SIGKILLs the process at a known step when $RPROBE_TEST_KILL_AFTER_STEPS is
set, after its checkpoint at step 2 and before the one at step 4.
"""
import json
import os
import shutil
import signal
import sys

import pytest
import torch
from support import DEEPSPEED, ROOT, free_port, run_in_process_group, run_module
from test_rprobe import probe_data  # noqa: F401  (probe_data is a fixture used below)

from llava_dsl.checkpointing.completeness import COMPLETION_MARKER, INCOMPLETE_DIR
from llava_dsl.rprobe.cli import run
from llava_dsl.rprobe.runner import PROBE_FILE

KILL_AFTER_STEPS_ENV = "RPROBE_TEST_KILL_AFTER_STEPS"  # read by this file run as a script (see the end)
THIS_FILE = os.path.abspath(__file__)
STEPS, SAVE_EVERY, KILL_AT = 6, 2, 3  # checkpoints at 2, 4, 6; killed after step 3: resumes at 2, redoes 3


def _flags(command, checkpoints, data, out, **extra):
    flags = {"data-path": data["train"], "image-folder": data["train_images"], "eval-data-path": data["heldout"],
             "eval-image-folder": data["heldout_images"], "steps": STEPS, "eval-every": 3, "batch-size": 2,
             "learning-rate": 1e-3, "warmup-steps": 2, "seed": 5, "save-every": SAVE_EVERY,
             "save-total-limit": 2, "grid-images": 2, "output-dir": out, **extra}
    args = [command] + (["--model-path", checkpoints[0]] if command == "train" else ["--checkpoints", *checkpoints])
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args + ["--cache-images"]


def _probe(args, kill_after=None):
    return run_module(THIS_FILE, args, launcher=[sys.executable], check=kill_after is None,
                      env={KILL_AFTER_STEPS_ENV: str(kill_after)} if kill_after else {})


def _launch(args, kill_after=None, timeout=400):
    """The deepspeed launcher, 2 ranks, in its own process group (a hung rank dies with it on timeout)."""
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", free_port(), THIS_FILE, *args]
    code, output = run_in_process_group(command, env={KILL_AFTER_STEPS_ENV: str(kill_after) if kill_after else None},
                                        timeout=timeout)
    if kill_after is None:
        assert code == 0, f"{' '.join(map(str, command))} failed ({code}):\n{output[-6000:]}"
    return code, output


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _entries(out):
    return _read_json(os.path.join(out, "report.json"))["checkpoints"]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_run(resumed, reference):
    """Exact equality: per-step train losses, every evaluation row, the final metrics and the probe's weights."""
    assert len(resumed["train_losses"]) == STEPS
    assert resumed["train_losses"] == reference["train_losses"]
    assert [row["step"] for row in resumed["history"]] == [0, 3, 6]
    assert resumed["history"] == reference["history"]
    assert resumed["final"] == reference["final"]
    a, b = _weights(resumed["probe_path"]), _weights(reference["probe_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# One process (plain torch loop).
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(runs, probe_data, tmp_path_factory):  # noqa: F811
    """An uninterrupted run; the same run killed after step 3, given two interrupted saves, then restarted."""
    base = tmp_path_factory.mktemp("rprobe_resume")
    reference, resumed = str(base / "reference"), str(base / "resumed")
    _probe(_flags("train", [runs["ft"]], probe_data, reference))
    killed = _probe(_flags("train", [runs["ft"]], probe_data, resumed), kill_after=KILL_AT)
    run_dir = os.path.join(resumed, "llava-ft")
    after_kill = sorted(os.listdir(resumed)), sorted(os.listdir(run_dir))
    # two saves cut short, newer than the complete checkpoint-2: a staging folder that never got renamed
    # (everything copied, the state claiming step 4, one file truncated) and a checkpoint without its marker
    staging = os.path.join(run_dir, "tmp-checkpoint-4")
    shutil.copytree(os.path.join(run_dir, "checkpoint-2"), staging)
    state_file = os.path.join(staging, "probe_state.json")
    state = _read_json(state_file)
    with open(state_file, "w") as f:
        json.dump({**state, "step": 4}, f)
    with open(os.path.join(staging, "optimizer.pt"), "r+b") as f:
        f.truncate(100)
    unmarked = os.path.join(run_dir, "checkpoint-5")
    shutil.copytree(os.path.join(run_dir, "checkpoint-2"), unmarked)
    os.remove(os.path.join(unmarked, COMPLETION_MARKER))
    restarted = _probe(_flags("train", [runs["ft"]], probe_data, resumed))
    return {"reference": reference, "resumed": resumed, "run_dir": run_dir, "killed": killed,
            "after_kill": after_kill, "restarted": restarted.stdout + restarted.stderr}


def test_killed_single_process_run_resumes_with_the_same_trajectory(single):
    assert single["killed"].returncode == -signal.SIGKILL
    assert single["after_kill"] == (["llava-ft"], ["checkpoint-2"])  # killed after step 3: no report, nothing later
    assert f"resuming from {os.path.join(single['run_dir'], 'checkpoint-2')} (step 2 of {STEPS})" in single["restarted"]
    (reference,), (resumed,) = _entries(single["reference"]), _entries(single["resumed"])
    assert reference["resumed_from"] is None and resumed["resumed_from"]["step"] == 2
    _assert_same_run(resumed, reference)
    # the top-level copy of the probe and the checkpoints kept (--save-total-limit 2)
    top = _weights(os.path.join(single["resumed"], PROBE_FILE))
    assert all(torch.equal(top[k], v) for k, v in _weights(reference["probe_path"]).items())
    assert sorted(n for n in os.listdir(single["run_dir"]) if n.startswith("checkpoint-")) == \
        ["checkpoint-4", "checkpoint-6"]
    for name in ("rprobe.bin", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "probe_state.json",
                 COMPLETION_MARKER):
        assert os.path.isfile(os.path.join(single["run_dir"], "checkpoint-6", name)), name


def test_interrupted_saves_are_moved_aside_not_resumed_from(single):
    aside = os.path.join(single["run_dir"], INCOMPLETE_DIR)
    moved = sorted(os.listdir(aside))
    assert [n.rsplit("-", 3)[0] for n in moved] == ["checkpoint-5", "tmp-checkpoint-4"], moved
    assert "tmp-checkpoint-4 is incomplete" in single["restarted"]
    assert f"checkpoint-5 is incomplete (no readable {COMPLETION_MARKER}" in single["restarted"]
    assert not os.path.exists(os.path.join(single["run_dir"], "tmp-checkpoint-4"))


def test_resuming_with_other_settings_is_refused(single, runs, probe_data, tmp_path):  # noqa: F811
    out = str(tmp_path / "copy")
    shutil.copytree(single["resumed"], out)
    with pytest.raises(ValueError, match=r"checkpoint-6 was written by a run with --steps 6, this run has 8"):
        run(_flags("train", [runs["ft"]], probe_data, out, steps=8))
    with pytest.raises(ValueError, match=r"with --learning-rate 0\.001, this run has 0\.002"):
        run(_flags("train", [runs["ft"]], probe_data, out, **{"learning-rate": 2e-3}))


# --------------------------------------------------------------------------------------------------
# 2-rank ZeRO-3 under the deepspeed launcher.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3(runs, probe_data, tmp_path_factory):  # noqa: F811
    """``compare`` of the same checkpoint twice: probe A trains uninterrupted (steps 1-6), probe B is killed on
    both ranks after its step 3 (the process's 9th), and the same command is run again: A resumes from its final
    checkpoint, B from checkpoint-2. A is the uninterrupted reference for B (same seed, data order, budget)."""
    out = str(tmp_path_factory.mktemp("rprobe_resume_zero3"))
    args = _flags("compare", [runs["ft"], runs["ft"]], probe_data, out,
                  deepspeed=os.path.join(ROOT, "scripts", "zero3", "zero3.json"))
    code, killed = _launch(args, kill_after=STEPS + KILL_AT)
    after_kill = sorted(os.listdir(out)), sorted(os.listdir(os.path.join(out, "llava-ft-2")))
    _, restarted = _launch(args)
    return {"out": out, "code": code, "killed": killed, "after_kill": after_kill, "restarted": restarted}


def test_killed_zero3_run_resumes_with_the_same_trajectory(zero3):
    out = zero3["out"]
    assert zero3["code"] != 0 and "exits with return code = -9" in zero3["killed"], zero3["killed"][-3000:]
    assert zero3["after_kill"] == (["llava-ft", "llava-ft-2"], ["checkpoint-2"])
    b_dir = os.path.join(out, "llava-ft-2")
    assert f"resuming from {os.path.join(b_dir, 'checkpoint-2')} (step 2 of {STEPS})" in zero3["restarted"]
    reference, resumed = _entries(out)
    assert reference["resumed_from"]["step"] == STEPS and resumed["resumed_from"]["step"] == 2
    _assert_same_run(resumed, reference)
    assert _read_json(os.path.join(out, "report.json"))["config"]["world_size"] == 2
    # DeepSpeed's own partitioned files, one RNG state per rank
    checkpoint = os.path.join(b_dir, "checkpoint-6")
    for name in ("deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_0.pth", "rng_state_1.pth",
                 "probe_state.json", COMPLETION_MARKER):
        assert os.path.isfile(os.path.join(checkpoint, name)), name
    assert sorted(n for n in os.listdir(b_dir) if n.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-6"]


def test_zero3_checkpoints_refuse_another_world_size(zero3, runs, probe_data):  # noqa: F811
    with pytest.raises(ValueError, match=r"llava-ft/checkpoint-6 was written by a run with number of ranks 2, "
                                         r"this run has 1"):
        run(_flags("train", [runs["ft"]], probe_data, zero3["out"]))


def _kill_after(limit: int):
    """A step callback that SIGKILLs this process after its ``limit``-th step, counted over every probe it runs."""
    steps_run = [0]

    def on_step(step: int) -> None:
        steps_run[0] += 1
        if steps_run[0] == limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


if __name__ == "__main__":  # the R-Probe stage's command line, with the kill callback when asked for
    import llava_dsl.rprobe.cli as cli

    limit = int(os.environ.get(KILL_AFTER_STEPS_ENV) or 0)
    if limit:
        run_probe_without_kill = cli.run_probe
        callback = _kill_after(limit)
        cli.run_probe = lambda *args, **kwargs: run_probe_without_kill(*args, on_step=callback, **kwargs)
    cli.main()
