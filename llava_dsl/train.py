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
from dataclasses import dataclass
from typing import List, Optional


@dataclass
class EntryPointFlags:
    """The flags this entry point reads before LLaVA's train() parses all of them again: same names, types and
    defaults as in LLaVA's / transformers' arguments, so a value is accepted or refused the same way."""

    attn_implementation: Optional[str] = None
    bits: int = 16
    fp16: bool = False
    tf32: Optional[bool] = None
    deepspeed: Optional[str] = None
    ddp_timeout: int = 1800
    seed: int = 42


def parse_entry_point_flags(argv: List[str]) -> EntryPointFlags:
    """``EntryPointFlags`` from argv, every other flag left to LLaVA's parser; a bad value exits naming the flag
    and the value (``argument --seed: invalid int value: 'abc'``)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EntryPointFlags, prog="python -m llava_dsl.train", add_help=False,
                              usage="python -m llava_dsl.train <LLaVA's train.py flags> [plugin flags] (--help)")
    flags, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                  look_for_args_file=False)
    return flags


def hardware_problems(flags: EntryPointFlags, cuda: bool) -> List[str]:
    """What this command asks of the hardware that it does not have: one line per problem, with the fix."""
    import importlib.util

    problems, bits = [], flags.bits
    if flags.attn_implementation == "flash_attention_2":
        if not cuda:
            problems.append("--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU use "
                            "--attn_implementation sdpa (or eager)")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append("--attn_implementation flash_attention_2 needs the flash-attn package: "
                            "pip install flash-attn --no-build-isolation (or use --attn_implementation sdpa)")
    if flags.fp16 and not cuda:
        problems.append("--fp16 True needs a CUDA GPU; on CPU use --bf16 True, or --bf16 False for fp32")
    if flags.tf32 and not cuda:
        problems.append("--tf32 True needs an Ampere-or-newer CUDA GPU; on CPU use --tf32 False")
    if bits in (4, 8):
        if not cuda:
            problems.append(f"--bits {bits} (QLoRA through bitsandbytes) needs a CUDA GPU; on CPU drop --bits "
                            f"(16-bit LoRA: --lora_enable True)")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"--bits {bits} needs the bitsandbytes package: pip install bitsandbytes")
    return problems


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # all left in argv: the plugin's ModelArguments declares --attn_implementation (so --help lists it), and LLaVA's
    # train() takes it as an argument, which its parser does not fill in
    flags = parse_entry_point_flags(argv)

    import torch

    problems = hardware_problems(flags, torch.cuda.is_available())
    if problems:  # before any weights load, not a stack trace minutes later
        raise SystemExit("\n".join(f"llava_dsl.train: {problem}" for problem in problems))

    import transformers

    import llava_dsl
    from llava_dsl.compat.distributed import close_process_group
    from llava_dsl.compat.deepspeed import cpu_safe_deepspeed_argv, init_deepspeed_distributed

    argv = cpu_safe_deepspeed_argv(argv, torch.cuda.is_available())
    if flags.deepspeed and not torch.cuda.is_available():
        # before train() does it, so that CPU runs leave no shared memory behind; on CUDA the Trainer's own init stays
        init_deepspeed_distributed(cuda=False, timeout_s=float(flags.ddp_timeout))
    llava_dsl.register()
    # LLaVA builds the projector before the Trainer seeds; seed first so a run is reproducible from its flags.
    transformers.set_seed(flags.seed)
    import llava.train.train as llava_train

    sys.argv = [sys.argv[0]] + argv  # LLaVA's train() parses sys.argv itself
    llava_train.train(attn_implementation=flags.attn_implementation)
    close_process_group()

if __name__ == "__main__":
    main()
