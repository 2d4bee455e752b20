"""Which checkpoints are complete: the completion marker written last (step, world size, every file with its
size), the check against it, setting interrupted checkpoints aside, and finding the newest complete one."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Tuple

from llava_dsl.checkpointing.atomic import atomic_write_text

COMPLETION_MARKER = "checkpoint_complete.json"

INCOMPLETE_DIR = "incomplete-checkpoints"

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

_STAGING = re.compile(r"^tmp-checkpoint-(\d+)$")  # transformers' staging name for a checkpoint being written

_PARTIAL_SAVE = re.compile(r"^\.saving-")  # atomic_directory's staging folder

_PARTIAL_FILE = re.compile(r"^\..+\.tmp-\d+$")  # atomic_file's temporary file


def _files_with_sizes(folder: str) -> Dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETION_MARKER:
                sizes[relative] = os.path.getsize(path)
    return sizes


def write_completion_marker(checkpoint: str, global_step: int, world_size: int, deepspeed: bool) -> None:
    """The last file of a checkpoint: what it holds, so a later run can tell a whole checkpoint from a cut one."""
    marker = {"global_step": global_step, "world_size": world_size, "deepspeed": deepspeed,
              "files": _files_with_sizes(checkpoint)}
    atomic_write_text(os.path.join(checkpoint, COMPLETION_MARKER), json.dumps(marker, indent=1, sort_keys=True))


def read_completion_marker(checkpoint: str) -> Optional[dict]:
    try:
        with open(os.path.join(checkpoint, COMPLETION_MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_problem(checkpoint: str) -> Optional[str]:
    """None for a complete checkpoint, else why it cannot be resumed from."""
    marker = read_completion_marker(checkpoint)
    if marker is None:
        return (f"no readable {COMPLETION_MARKER} (a save that was interrupted, or a checkpoint not written by "
                f"llava_dsl, e.g. upstream LLaVA's stage-1 checkpoints, which hold only mm_projector.bin)")
    for relative, size in sorted(marker.get("files", {}).items()):
        path = os.path.join(checkpoint, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        if os.path.getsize(path) != size:
            return f"{relative} has {os.path.getsize(path)} bytes, {size} when the checkpoint was completed"
    return None


def _step(name: str) -> int:
    return int((_CHECKPOINT.match(name) or _STAGING.match(name)).group(1))


def set_aside_incomplete(output_dir: str) -> List[str]:
    """Move incomplete checkpoints out of the way of resuming and rotation; return one message per move."""
    messages = []
    if not os.path.isdir(output_dir):
        return messages
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _PARTIAL_SAVE.match(name) and os.path.isdir(path):
            shutil.rmtree(path)
            messages.append(f"removed {path}: files of a final save that was interrupted (the files it would have "
                            f"replaced are untouched)")
            continue
        if _PARTIAL_FILE.match(name) and os.path.isfile(path):
            os.remove(path)
            messages.append(f"removed {path}: a temporary file of an interrupted save")
            continue
        if _STAGING.match(name) and os.path.isdir(path):
            problem = "its save was interrupted before it was renamed to " + name[len("tmp-"):]
        elif _CHECKPOINT.match(name) and os.path.isdir(path):
            problem = checkpoint_problem(path)
        else:
            continue
        if problem is None:
            continue
        target = move_aside(output_dir, path)
        messages.append(f"{path} is incomplete ({problem}); moved to {target}, not resumed from")
    return messages


def move_aside(output_dir: str, path: str) -> str:
    folder = os.path.join(output_dir, INCOMPLETE_DIR)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    return sorted((_step(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
                  if _CHECKPOINT.match(name) and os.path.isdir(os.path.join(output_dir, name)))


def latest_complete_checkpoint(output_dir: str) -> Optional[str]:
    for _, path in reversed(checkpoints(output_dir)):
        if checkpoint_problem(path) is None:
            return path
    return None
