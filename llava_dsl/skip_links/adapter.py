"""The one loader for a stage-1 ``mm_projector.bin``: ``--pretrain_mm_mlp_adapter``, the R-Probe stage's
stage-1 checkpoints, and resuming a stage-1 run. It refuses a missing, truncated or foreign file and a shape
that does not fit, naming the file, and loads into ZeRO-3-partitioned parameters. No ``llava`` import."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from llava_dsl.compat.deepspeed import full_shape, gathered


def read_adapter(path: str, source: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path``; ``source`` names where the path came from (a flag, a checkpoint)."""
    try:
        saved = torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}={path}: no such file") from None
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{source}={path}: cannot be read as a torch state dict ({error})") from error
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"{source}={path}: expected a state dict of tensors, found {type(saved).__name__}")
    return saved


def load_projector_adapter(projector: nn.Module, path: str, projector_type: Optional[str],
                           source: str = "--pretrain_mm_mlp_adapter") -> None:
    """Load the ``mm_projector.*`` weights of ``path`` into ``projector``; shape-checked, ZeRO-3-safe."""
    saved = read_adapter(path, source)
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in saved.items() if "mm_projector." in k}
    expected = {name: full_shape(p) for name, p in projector.named_parameters()}
    found = {name: tuple(v.shape) for name, v in weights.items()}
    if found != expected:
        raise ValueError(
            f"{source}={path}: its projector weights {found} do not fit the "
            f"mm_projector_type={projector_type!r} projector, which expects {expected} "
            f"(was the adapter trained with another projector type or other vision layers?)")
    with gathered(list(projector.parameters()), modifier_rank=0):
        projector.load_state_dict(weights)


def load_adapter_checkpoint(model: nn.Module, path: str) -> None:
    """Resume a stage-1 run: load its checkpoint's ``mm_projector.bin`` by full parameter name (single process;
    ZeRO-3 resumes from DeepSpeed's own files instead)."""
    saved = read_adapter(path, "stage-1 checkpoint")
    params = dict(model.named_parameters())
    unknown = sorted(k for k in saved if k not in params)
    trained = sorted(k for k, p in params.items() if p.requires_grad and k not in saved)
    if unknown or trained:
        raise ValueError(f"{path} does not fit the model being trained: weights it holds that the model lacks "
                         f"{unknown}, trainable parameters it lacks {trained}")
    with torch.no_grad():
        for key, value in saved.items():
            if tuple(params[key].shape) != tuple(value.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(params[key].shape)}")
            params[key].copy_(value)
