"""Rank helpers shared by every stage: rank and world size of the initialised process group (0 and 1 without
one), whether this process is the first rank (the launcher's RANK before the group exists), a barrier that is a no-op in one process, printing on the first rank only, and an
orderly teardown. Nothing here initialises a process group."""
from __future__ import annotations

import os


def _initialised():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _initialised()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _initialised()
    return dist.get_world_size() if dist else 1


def is_first_rank() -> bool:
    """Rank 0 of the process group, or, before it is initialised, of the launcher (its RANK variable)."""
    dist = _initialised()
    return (dist.get_rank() if dist else int(os.environ.get("RANK", "0"))) == 0


def barrier() -> None:
    dist = _initialised()
    if dist:
        dist.barrier()


def say(message: str) -> None:
    """A plugin message, on the rank that calls it."""
    print(f"llava_dsl: {message}", flush=True)


def say_once(message: str) -> None:
    """A plugin message, on the first rank only."""
    if is_first_rank():
        say(message)


def log_once(tag: str, message: str) -> None:
    """``[tag] message`` on the first rank only."""
    print_once(f"[{tag}] {message}")


def print_once(message: str) -> None:
    """Print on the first rank only (LLaVA's rank0_print stays silent in single-process runs)."""
    if is_first_rank():
        print(message, flush=True)


def close_process_group() -> None:
    """A barrier then an explicit teardown: without it, gloo ranks occasionally crash at interpreter exit."""
    dist = _initialised()
    if dist:
        dist.barrier()
        dist.destroy_process_group()
