"""``python -m llava_dsl.train <LLaVA's train.py flags> [plugin flags]``: LLaVA's own train(), with the plugin.

Plugin flags (all persisted into the model config):
  --mm_projector_type mlp_multilayer | detached_mlp_multilayer | [detached_]mlp{N}x_gelu_multilayer
  --mm_vision_skip_layers "6,12,18"  or  --mm_vision_skip_stride S
  --mm_vision_detach_depth D
  --unfreeze_mm_vision_tower True  --mm_vision_tower_lr LR
  --attn_implementation eager|sdpa|flash_attention_2   (what LLaVA's train_mem.py hard-codes)
"""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple


def _pop_flag(argv: List[str], name: str) -> Tuple[List[str], Optional[str]]:
    """Remove ``--name value`` / ``--name=value`` from argv (LLaVA's parser does not know it)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv):
                raise SystemExit(f"--{name}: expected a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, value


def _flag_value(argv: List[str], name: str, default: str) -> str:
    return _pop_flag(list(argv), name)[1] or default


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, attn_implementation = _pop_flag(argv, "attn_implementation")

    import llava_dsl
    import transformers

    llava_dsl.register()
    # LLaVA builds the projector before the Trainer seeds; seed first so a run is reproducible from its flags.
    transformers.set_seed(int(_flag_value(argv, "seed", "42")))
    import llava.train.train as llava_train

    sys.argv = [sys.argv[0]] + argv  # LLaVA's train() parses sys.argv itself
    llava_train.train(attn_implementation=attn_implementation)
    _close_process_group()


def _close_process_group() -> None:
    """A barrier then an explicit teardown: without it, gloo ranks occasionally crash at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
