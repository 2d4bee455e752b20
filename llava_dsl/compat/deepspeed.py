"""DeepSpeed helpers and fixes, in one place: gathering ZeRO-3-partitioned parameters and reading their full
shapes, casting parameters created outside ``zero.Init``, the ``no_sync`` guard for accelerate, and running the
``deepspeed`` launcher on CPU (gloo, sequential all-gather, the shared-memory buffers DeepSpeed never unlinks)."""
from __future__ import annotations

import base64
import contextlib
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from llava_dsl.compat.distributed import say_once


def is_partitioned(params) -> bool:
    """True if any of ``params`` is a ZeRO-3 partition (its data lives across ranks)."""
    return any(hasattr(p, "ds_id") for p in params)


def full_shape(param: torch.Tensor) -> Tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave param.shape == (0,)


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 partitions leave param.numel() == 0


def cast_params_created_outside_zero_init(model: nn.Module, args) -> List[str]:
    """ZeRO-3 with bf16/fp16: give parameters that zero.Init did not create the compute dtype.

    LLaVA builds mm_projector after from_pretrained, outside zero.Init, so it stays fp32; DeepSpeed >= 0.19
    no longer casts such parameters and then fails at the first matmul or in the optimizer's defragment.
    """
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    params = list(model.named_parameters())
    if dtype is None or not is_partitioned(p for _, p in params):
        return []
    cast = []
    for name, param in params:
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast.append(name)
    return cast


def no_sync_unless_zero_partitions_gradients(no_sync):
    """accelerate 0.34 enters the model's no_sync() on every micro-step between accumulation boundaries, and
    DeepSpeed >= 0.16's engine asserts there under ZeRO-2/3; the engine accumulates (and reduces its partitioned
    gradients) by itself, which is what happened before the engine had a no_sync()."""
    @contextlib.contextmanager
    def guarded(model):
        partitions = getattr(model, "zero_optimization_partition_gradients", None)
        if partitions is not None and partitions():
            yield
        else:
            with no_sync(model):
                yield
    return guarded


def cpu_safe_deepspeed_argv(argv: List[str], cuda: bool) -> List[str]:
    """``argv`` with ``stage3_allgather_sequential`` switched on in a ZeRO-3 ``--deepspeed`` config on CPU.

    DeepSpeed's coalesced all-gather waits only for its last handle, which orders everything on one CUDA
    stream but not under gloo, whose worker threads can finish an earlier gather after the parameter is in
    use: pretrained weights loaded inside GatheredParameters (from_pretrained, the adapter) are then silently
    overwritten with stale partitions, differently in every run. The sequential gather waits for each one.
    The config is passed on base64-encoded (transformers accepts that for --deepspeed), the file is untouched.
    """
    if cuda:
        return list(argv)
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--deepspeed" and i + 1 < len(argv):
            index, path = i + 1, argv[i + 1]
        elif arg.startswith("--deepspeed="):
            index, path = i, arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path):
            return argv  # a dict or an already encoded config
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        zero = config.get("zero_optimization", {})
        if zero.get("stage") != 3 or zero.get("stage3_allgather_sequential"):
            return argv
        config["zero_optimization"] = {**zero, "stage3_allgather_sequential": True}
        encoded = base64.urlsafe_b64encode(json.dumps(config).encode("utf-8")).decode("ascii")
        argv[index] = encoded if index == i + 1 else f"--deepspeed={encoded}"
        say_once(f"ZeRO-3 on CPU: {path} with stage3_allgather_sequential=true (DeepSpeed's coalesced "
                 f"all-gather races under gloo and can leave loaded weights stale)")
        return argv
    return argv

CPU_ALLREDUCE_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def init_deepspeed_distributed(cuda: bool, timeout_s: Optional[float] = None) -> Optional[str]:
    """``deepspeed.init_distributed()``; on CPU, then take the name of this rank's shared all-reduce buffer away.

    DeepSpeed's CPU backend gives every rank a 66 MB buffer in /dev/shm (named as ``CPU_ALLREDUCE_BUFFER`` from the
    environment at init) and never unlinks it, so each CPU run leaves its buffers behind until the tmpfs is full.
    Once every rank has returned from init, every rank has mapped every other rank's buffer: after a barrier the
    names are no longer needed, and the memory goes back when the last process exits, even a killed one.
    Returns the path it unlinked, if any.
    """
    import datetime

    import deepspeed
    import torch.distributed as dist

    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(**kwargs)
    if cuda:
        return None
    path = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                       port=os.environ.get("MASTER_PORT", ""), rank=dist.get_rank())
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # an accelerator without the shared-memory all-reduce (e.g. oneCCL)
        return None
    return path


@contextlib.contextmanager
def gathered(params: Sequence[nn.Parameter], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """Full values of ZeRO-3-partitioned parameters inside the block; a no-op for ordinary ones."""
    params = list(params)
    if is_partitioned(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield
