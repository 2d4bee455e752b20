"""``python -m llava_dsl.train <LLaVA's train.py flags> [plugin flags]``: LLaVA's own train(), with the plugin.

Plugin flags (all persisted into the model config):
  --mm_projector_type mlp_multilayer | detached_mlp_multilayer | [detached_]mlp{N}x_gelu_multilayer
  --mm_vision_skip_layers "6,12,18"  or  --mm_vision_skip_stride S
  --mm_vision_detach_depth D
  --unfreeze_mm_vision_tower True  --mm_vision_tower_lr LR
  --attn_implementation eager|sdpa|flash_attention_2   (what LLaVA's train_mem.py hard-codes)
  --skip_bad_samples True  --max_masked_sample_fraction F   (docs/when_things_go_wrong.md)

Restarting the same command resumes from the newest complete checkpoint in --output_dir.
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


def _requested(argv: List[str], name: str) -> bool:
    """True if a boolean flag is on: ``--name``, ``--name True``, ``--name=true``."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            following = argv[i + 1] if i + 1 < len(argv) else ""
            return following.startswith("--") or following.lower() in ("", "true", "1", "yes")
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    return False


def hardware_problems(argv: List[str], attn_implementation: Optional[str], cuda: bool) -> List[str]:
    """What this command asks of the hardware that it does not have: one line per problem, with the fix."""
    import importlib.util

    problems = []
    bits = _flag_value(argv, "bits", "16")
    if attn_implementation == "flash_attention_2":
        if not cuda:
            problems.append("--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU use "
                            "--attn_implementation sdpa (or eager)")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append("--attn_implementation flash_attention_2 needs the flash-attn package: "
                            "pip install flash-attn --no-build-isolation (or use --attn_implementation sdpa)")
    if _requested(argv, "fp16") and not cuda:
        problems.append("--fp16 True needs a CUDA GPU; on CPU use --bf16 True, or --bf16 False for fp32")
    if _requested(argv, "tf32") and not cuda:
        problems.append("--tf32 True needs an Ampere-or-newer CUDA GPU; on CPU use --tf32 False")
    if bits in ("4", "8"):
        if not cuda:
            problems.append(f"--bits {bits} (QLoRA through bitsandbytes) needs a CUDA GPU; on CPU drop --bits "
                            f"(16-bit LoRA: --lora_enable True)")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"--bits {bits} needs the bitsandbytes package: pip install bitsandbytes")
    return problems


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Read here for LLaVA's train(attn_implementation=...) and left in argv: the plugin's ModelArguments declares it,
    # so that --help lists it and the parser accepts it.
    attn_implementation = _pop_flag(list(argv), "attn_implementation")[1]

    import torch

    problems = hardware_problems(argv, attn_implementation, torch.cuda.is_available())
    if problems:  # before any weights load, not a stack trace minutes later
        raise SystemExit("\n".join(f"llava_dsl.train: {problem}" for problem in problems))

    import transformers

    import llava_dsl
    from llava_dsl.compat.distributed import close_process_group
    from llava_dsl.compat.deepspeed import cpu_safe_deepspeed_argv, init_deepspeed_distributed

    argv = cpu_safe_deepspeed_argv(argv, torch.cuda.is_available())
    if _flag_value(argv, "deepspeed", "") and not torch.cuda.is_available():
        # before train() does it, so that CPU runs leave no shared memory behind; on CUDA the Trainer's own init stays
        init_deepspeed_distributed(cuda=False, timeout_s=float(_flag_value(argv, "ddp_timeout", "1800")))
    llava_dsl.register()
    # LLaVA builds the projector before the Trainer seeds; seed first so a run is reproducible from its flags.
    transformers.set_seed(int(_flag_value(argv, "seed", "42")))
    import llava.train.train as llava_train

    sys.argv = [sys.argv[0]] + argv  # LLaVA's train() parses sys.argv itself
    llava_train.train(attn_implementation=attn_implementation)
    close_process_group()


if __name__ == "__main__":
    main()
