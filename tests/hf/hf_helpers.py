"""Shared pieces of tests/hf (not named conftest: tests/conftest.py is the suite's)."""
import os
import signal
import socket
import subprocess
import sys

import torch

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, timeout=300, env=None, check=True):
    """Run a command in its own process group (killed whole on timeout); return (rc, output)."""
    command = [str(c) for c in command]
    p = subprocess.Popen(command, cwd=ROOT, env=child_env(**(env or {})), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"{' '.join(command)} ran over {timeout} s:\n{out[-4000:]}") from None
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({p.returncode}):\n{out[-6000:]}")
    return p.returncode, out


def grads(model, prefix):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if n.startswith(prefix) and p.grad is not None}


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} max diff {(a[k] - b[k]).abs().max().item():.3g}"
