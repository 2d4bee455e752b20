"""Shared pieces of tests/hf (not named conftest: tests/conftest.py is the suite's)."""
import os
import sys

import torch
from support import run_in_process_group

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)


def child_env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true",
           "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
           # DeepSpeed JIT-builds its CPU ops into a cache shared by every environment of this torch; the main
           # .venv's older DeepSpeed leaves a deepspeed_shm_comm there that this one cannot use (no
           # vector_kernel_level). Each environment keeps its own (make venv-hf5 builds it).
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions")),
           **extra}
    return {k: v for k, v in env.items() if v is not None}


def run(command, timeout=300, env=None, check=True):
    """Run a command in its own process group (killed whole on timeout) with ``child_env``; return (rc, output)."""
    returncode, output = run_in_process_group(command, env=child_env(**(env or {})), timeout=timeout)
    if check and returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed ({returncode}):\n{output[-6000:]}")
    return returncode, output


def grads(model, prefix):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if n.startswith(prefix) and p.grad is not None}


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} max diff {(a[k] - b[k]).abs().max().item():.3g}"
