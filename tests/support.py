"""Helpers shared by the test files: paths, the child-process environment, the launchers, LLaVA's flags.
A plain module (not conftest: a folder's own conftest.py would shadow that name for the files imported after it)."""
import os
import shutil
import signal
import socket
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# Child processes use the tools installed beside the interpreter running the tests (python, deepspeed,
# shellcheck), whatever the caller's PATH holds: `.venv/bin/python -m pytest` and `make test` run the same.
INTERPRETER_BIN = os.path.dirname(sys.executable)
DEEPSPEED = os.path.join(INTERPRETER_BIN, "deepspeed")
if not os.path.exists(DEEPSPEED) and shutil.which("deepspeed"):
    DEEPSPEED = shutil.which("deepspeed")


def interpreter_first_on_path(env: dict) -> dict:
    """``env`` with this interpreter's bin folder first on PATH."""
    return {**env, "PATH": INTERPRETER_BIN + os.pathsep + env.get("PATH", os.defpath)}


TOWER_LR = 1e-6
STEPS = 4  # 16 samples / batch 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(env=None) -> dict:
    """The environment of a test's child process: this repo importable, one thread (tiny models: faster), plus
    ``env``, where a value of None removes that variable."""
    merged = {**interpreter_first_on_path(dict(os.environ)),
              # the repo, and this folder: test files run as scripts import this module
              "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
              "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    return {key: value for key, value in merged.items() if value is not None}


def run_in_process_group(command, env=None, timeout=600):
    """Run ``command`` (e.g. the deepspeed launcher) in its own process group, so that a hung rank is killed with it
    on timeout; return (exit status, stdout and stderr together)."""
    command = [str(part) for part in command]
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(command)} ran over {timeout} s:\n{output[-4000:]}") from None
    return process.returncode, output


def run_module(module, args, env=None, check=True, launcher=None, timeout=600):
    """Run ``python -m module args`` (or a launcher command) and return the CompletedProcess."""
    command = (launcher or [sys.executable, "-m"]) + [module] + [str(a) for a in args]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(env), timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def llava_flags(assets, stage, output_dir, projector="detached_mlp_multilayer", **extra):
    """LLaVA-1.5's train.py flags for a tiny CPU run; ``stage`` is 'pretrain' or 'finetune'."""
    flags = {
        "model_name_or_path": assets["llm"],
        "version": "plain" if stage == "pretrain" else "v1",
        "data_path": assets[stage],
        "image_folder": assets["image_folder"],
        "vision_tower": assets["vision_tower"],
        "mm_vision_select_layer": -2,
        "mm_projector_type": projector,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
        "report_to": "none",
        "model_max_length": 128,
        "bf16": False,
        "tf32": False,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "lazy_preprocess": True,
        "learning_rate": 1e-3,
        "output_dir": output_dir,
    }
    if stage == "pretrain":
        flags["tune_mm_mlp_adapter"] = True
    flags.update(extra)
    args = []
    for key, value in flags.items():
        if value is None:
            continue
        args += [f"--{key}", str(value)]
    return args
