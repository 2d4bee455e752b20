"""What the demo and the study share: LLaVA-1.5's ``train.py`` flags for one tiny CPU stage on the digit data (the
same recipe as LLaVA's scripts/v1_5/*.sh, at the sizes these runs use; each caller adds only what differs, its
checkpointing and its gradient diagnostics), the environment their steps run in, the guard on their output folders,
and the tail of a failed step's log."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Type


def child_env(device: str = "cpu") -> Dict[str, str]:
    """The environment of a step run as a subprocess: this checkout's ``llava_dsl`` importable from any working
    directory, installed or not; offline; one thread; no GPU unless ``device`` asks for one."""
    env = dict(os.environ)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: a second thread only adds contention
    # everything is local: a stray hub name fails at once instead of waiting on the network
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def claim_output_dir(output_dir: str, marker: str, owner: str, note: str, error: Type[Exception]) -> None:
    """Create ``output_dir`` and mark it with the file ``marker`` (text ``note``). A folder that holds other files
    and no marker is refused with ``error`` naming ``owner``, so a mistyped --output_dir loses nothing."""
    from llava_dsl.checkpointing.atomic import atomic_write_text

    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(os.path.join(output_dir, marker)):
        raise error(f"--output_dir {output_dir} is not empty and was not written by {owner}; "
                    f"choose a new or empty folder")
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, marker), f"written by {note}\n")


def log_tail(path: str, lines: int = 15) -> str:
    """The last non-blank ``lines`` of a step's log (progress bars' \\r updates count as lines), indented."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join("  " + line for line in [line for line in re.split(r"[\r\n]", text) if line.strip()][-lines:])


def as_argv(values: Dict[str, object]) -> List[str]:
    """``{"key": value}`` as ``["--key", "value", ...]``; a None value leaves its flag out (LLaVA's default)."""
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def tiny_stage_flags(*, llm: str, vision_tower: str, data_path: str, image_folder: str, projector: str, stage: int,
                     steps: int, batch_size: int, learning_rate: float, seed: int, output_dir: str,
                     skip_layers: str, detach_depth: int, tower_lr: float,
                     adapter: Optional[str] = None) -> Dict[str, object]:
    """Stage 1 trains the projector over a frozen tower; stage 2 starts from its ``adapter`` (mm_projector.bin)
    and trains everything, the tower at ``tower_lr``. ``skip_layers`` / ``detach_depth`` apply to the projectors
    that use them (multi-layer / detached)."""
    if stage not in (1, 2):
        raise ValueError(f"stage {stage!r}: expected 1 (projector only) or 2 (joint)")
    values: Dict[str, object] = {
        "model_name_or_path": llm, "vision_tower": vision_tower, "version": "plain" if stage == 1 else "v1",
        "data_path": data_path, "image_folder": image_folder,
        "mm_projector_type": projector, "mm_vision_select_layer": -2,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "group_by_modality_length": False, "max_steps": steps,
        "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate, "weight_decay": 0.0,
        "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "logging_steps": 1,
        "model_max_length": 256, "bf16": False, "tf32": False, "dataloader_num_workers": 0,
        "lazy_preprocess": True, "report_to": "none", "seed": seed, "output_dir": output_dir,
    }
    if projector != "mlp2x_gelu":
        values["mm_vision_skip_layers"] = skip_layers
    if projector.startswith("detached_"):
        values["mm_vision_detach_depth"] = detach_depth
    if stage == 1:
        values["tune_mm_mlp_adapter"] = True
    else:
        values.update(pretrain_mm_mlp_adapter=adapter, unfreeze_mm_vision_tower=True, mm_vision_tower_lr=tower_lr)
    return values
