"""Train a stock Hugging Face VLM with Detached Skip-Links through TRL's SFTTrainer, on LLaVA-format data.

    python -m llava_dsl.hf.sft --model_name_or_path MODEL --data_path data.json --image_folder images/ \\
        --output_dir out --dsl_detach_depth 2 --vision_tower_lr 2e-6 [--lora_r 16] [SFTConfig / TrainingArguments flags]
    accelerate launch --config_file scripts/hf/zero3.yaml -m llava_dsl.hf.sft ...

Every SFTConfig flag (learning_rate, max_steps, save_steps, deepspeed, gradient_checkpointing, bf16, ...) works as in
TRL (without CUDA, ``--bf16`` defaults to False). ``--resume_from_checkpoint PATH|latest`` resumes through the
Trainer's own machinery from a complete checkpoint only (the LLaVA path's completion marker); the detach is re-applied
to the rebuilt model first. See docs/hf.md.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

DPVR_REFUSAL = ("--mm_routing={value!r}: DPVR-LF is not available on the stock Hugging Face path: it reroutes the "
                "vision tokens inside the language model's layers, which needs a fork of the modeling code. Use the "
                "LLaVA-1.5 plugin (python -m llava_dsl.train --mm_routing dpvr_lf), or drop the flag")


@dataclass
class DSLArguments:
    model_name_or_path: str = field(metadata={"help": "a from_pretrained folder (or hub id, where reachable)"})
    data_path: str = field(metadata={"help": "LLaVA-format json list"})
    image_folder: str = field(metadata={"help": "folder the records' 'image' paths are relative to"})
    dsl_detach_layers: Optional[str] = field(default=None, metadata={
        "help": "hidden-state indices of the taps to detach, e.g. '12,6' (LLaVA indexing: 0 = embeddings)"})
    dsl_detach_depth: Optional[int] = field(default=None, metadata={"help": "detach the N shallowest taps"})
    dsl_skip_layers: Optional[str] = field(default=None, metadata={
        "help": "taps, e.g. '6,12,18' (sets vision_feature_layer = main + taps deep-first; the projector must fit)"})
    dsl_skip_stride: Optional[int] = field(default=None, metadata={"help": "tap every S-th block below the main layer"})
    dsl_main_layer: Optional[int] = field(default=None, metadata={"help": "main layer (default: the config's first)"})
    dsl_off: bool = field(default=False, metadata={"help": "naive multi-layer fusion (no stop-gradient)"})
    vision_tower_lr: Optional[float] = field(default=None, metadata={"help": "the tower's own learning rate"})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "keep the vision tower frozen"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model (0: full fine-tuning)"})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base weights (CUDA only)"})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    mm_routing: Optional[str] = field(default=None, metadata={"help": "refused: DPVR-LF needs a modeling fork"})
    dsl_grad_stats_every: int = field(default=0, metadata={
        "help": "split the tower's gradient into main and skip parts every N optimizer steps (0: off); "
                "docs/diagnostics.md"})
    dsl_grad_stats_dense_steps: int = field(default=0, metadata={"help": "also measure each of the first K steps"})
    dsl_grad_stats_window: int = field(default=10, metadata={"help": "measured steps per statistics window"})


def _fail(message: str):
    print(f"llava_dsl.hf.sft: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_arguments(dsl: DSLArguments, args) -> None:
    """Flag checks that need no model; each message names the flag, the value and what was expected."""
    import torch

    if dsl.mm_routing not in (None, "", "none"):
        _fail(DPVR_REFUSAL.format(value=dsl.mm_routing))
    if dsl.load_in_4bit and not torch.cuda.is_available():
        _fail("--load_in_4bit True (QLoRA) needs a CUDA GPU for bitsandbytes' 4-bit weights; this machine has none")
    if dsl.load_in_4bit and dsl.lora_r <= 0:
        _fail(f"--load_in_4bit True with --lora_r {dsl.lora_r}: QLoRA trains LoRA adapters, expected --lora_r > 0")
    if dsl.lora_r < 0:
        _fail(f"--lora_r {dsl.lora_r}: expected 0 (no LoRA) or a positive rank")
    if dsl.vision_tower_lr is not None and dsl.freeze_vision_tower:
        _fail(f"--vision_tower_lr {dsl.vision_tower_lr} with --freeze_vision_tower True: a frozen tower has no "
              f"learning rate")
    if dsl.vision_tower_lr is not None and dsl.vision_tower_lr < 0:
        _fail(f"--vision_tower_lr {dsl.vision_tower_lr}: expected a non-negative learning rate")
    if dsl.dsl_off and any(v is not None for v in (dsl.dsl_detach_layers, dsl.dsl_detach_depth)):
        _fail("--dsl_off True with --dsl_detach_layers/--dsl_detach_depth: naive fusion detaches nothing; give one")
    if dsl.dsl_detach_layers is not None and dsl.dsl_detach_depth is not None:
        _fail(f"--dsl_detach_layers={dsl.dsl_detach_layers!r} and --dsl_detach_depth={dsl.dsl_detach_depth}: both "
              f"choose which taps are detached; give one of them")
    if dsl.dsl_skip_layers is not None and dsl.dsl_skip_stride is not None:
        _fail(f"--dsl_skip_layers={dsl.dsl_skip_layers!r} and --dsl_skip_stride={dsl.dsl_skip_stride}: use one")
    from .core import DSLError
    from .diagnostics import check_grad_stats_flags

    try:
        measured = check_grad_stats_flags(dsl.dsl_grad_stats_every, dsl.dsl_grad_stats_dense_steps,
                                          dsl.dsl_grad_stats_window)
    except DSLError as e:
        _fail(str(e))
    if measured and dsl.freeze_vision_tower:
        _fail(f"--dsl_grad_stats_every={dsl.dsl_grad_stats_every} / --dsl_grad_stats_dense_steps="
              f"{dsl.dsl_grad_stats_dense_steps} with --freeze_vision_tower True: a frozen tower gets no gradient to "
              f"split")
    if not os.path.exists(dsl.model_name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        _fail(f"--model_name_or_path={dsl.model_name_or_path!r}: no such folder (and the hub is offline)")


def _layers(value, flag):
    from llava_dsl.skip_links.layer_spec import LayerSpecError, parse_layer_list

    try:
        layers = parse_layer_list(value, flag)
    except LayerSpecError as e:
        _fail(str(e))
    return None if layers is None else list(layers)


def resolve_checkpoint(value, args):
    """``latest`` (or ``auto``) -> the newest complete checkpoint-N in ``args.output_dir`` (None when there is none
    yet); a PATH -> that checkpoint, if complete. Complete is the LLaVA path's rule (llava_dsl.checkpointing:
    the completion marker ``CheckpointCompleted`` writes last, and every file it lists at its size); incomplete
    checkpoints in the output folder are moved aside with a line saying so, never resumed from."""
    from llava_dsl.checkpointing.completeness import (checkpoint_problem, latest_complete_checkpoint,
                                                      read_completion_marker, set_aside_incomplete)
    from llava_dsl.compat.distributed import say, say_once

    if value in (None, "", "False", "false"):
        return None
    if value in ("latest", "auto", "True", "true"):
        if args.should_save:
            for message in set_aside_incomplete(args.output_dir):
                say(message)
        args.distributed_state.wait_for_everyone()  # every rank sees the same folder from here on
        checkpoint = latest_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            say_once(f"--resume_from_checkpoint={value}: no complete checkpoint in {args.output_dir}; training from "
                     f"step 0")
            return None
    else:
        if not os.path.isdir(value):
            _fail(f"--resume_from_checkpoint={value!r}: no such checkpoint folder (or pass 'latest')")
        problem = checkpoint_problem(value)
        if problem:
            _fail(f"--resume_from_checkpoint={value!r}: cannot resume from it: {problem}")
        checkpoint = value
    marker = read_completion_marker(checkpoint)
    if args.deepspeed and marker.get("world_size") != args.world_size:
        _fail(f"--resume_from_checkpoint: {checkpoint} was written by {marker.get('world_size')} ranks, this run has "
              f"{args.world_size}: its DeepSpeed ZeRO files hold one partition per rank; restart with "
              f"{marker.get('world_size')} ranks")
    say_once(f"resuming from {checkpoint} (step {marker.get('global_step')})")
    return checkpoint


def completion_marker_callback():
    """A TrainerCallback that completes each checkpoint with the LLaVA path's marker (last, once every rank has
    written its files), so that a resume can tell a whole checkpoint from one cut by a kill. Added after every
    callback that writes into the checkpoint on ``on_save``."""
    from transformers import TrainerCallback

    from llava_dsl.checkpointing.completeness import write_completion_marker

    class CheckpointCompleted(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            args.distributed_state.wait_for_everyone()
            if args.should_save:
                checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                write_completion_marker(checkpoint, state.global_step, args.world_size, deepspeed=bool(args.deepspeed))
            args.distributed_state.wait_for_everyone()

    return CheckpointCompleted()


USAGE = ("python -m llava_dsl.hf.sft --model_name_or_path M --data_path D --image_folder I --output_dir O "
         "[--dsl_* flags] [SFTConfig flags] (--help lists them all)")


def parse_arguments(argv):
    """(DSLArguments, SFTConfig) from the command line, with the defaults a machine without CUDA needs.

    HfArgumentParser's argparse pass comes first (a bad value such as ``--seed abc`` is refused naming its flag);
    the machine-dependent choices are made from the parsed values; only then are the dataclasses built, because
    SFTConfig's own checks need them: its bf16 check (TRL defaults bf16 to True, which transformers refuses without a
    GPU) and, with ``--deepspeed``, the world size it writes into the DeepSpeed config.

    Without CUDA: ``--bf16`` defaults to False (every run; ``--bf16 True`` is left to transformers, which runs CPU
    bf16 autocast with ``--use_cpu True`` and refuses it otherwise). With ``--deepspeed`` also what the LLaVA path's
    CPU runs get (llava_dsl.compat.deepspeed): ``--use_cpu True`` unless given (without it accelerate sees one
    process), ZeRO-3's sequential all-gather (the coalesced one races under gloo), and the process group initialised
    here, before the Trainer reads the world size, with DeepSpeed's shared-memory all-reduce buffers unlinked once
    every rank has mapped them. Without that early init, the batch size the Trainer writes into the DeepSpeed config
    (for the launcher's world size) fails DeepSpeed's own check, which sees one process (train_batch_size 4 != 2 * 1
    * 1). What was added is said in one line."""
    import argparse

    import torch
    from transformers import HfArgumentParser
    from trl import SFTConfig

    from llava_dsl.compat.distributed import say_once

    parser = HfArgumentParser((DSLArguments, SFTConfig), prog="python -m llava_dsl.hf.sft", usage=USAGE)
    values = vars(parser.parse_args(argv, namespace=argparse.Namespace(use_cpu=None)))  # None: not given
    cuda = torch.cuda.is_available()
    added = []
    if not cuda and values["bf16"] is None and not values["fp16"]:
        values["bf16"] = False
        added.append("--bf16 False")
    if not cuda and values["deepspeed"]:
        if values["use_cpu"] is None:
            values["use_cpu"] = True
            added.append("--use_cpu True")
        from llava_dsl.compat.deepspeed import cpu_safe_deepspeed_argv, init_deepspeed_distributed

        values["deepspeed"] = cpu_safe_deepspeed_argv(["--deepspeed", values["deepspeed"]], cuda=False)[1]
    if values["use_cpu"] is None:
        values["use_cpu"] = False
    if added:
        say_once(f"no CUDA: {' '.join(added)} (pass them to choose otherwise)")
    if not cuda and values["deepspeed"]:
        init_deepspeed_distributed(cuda=False, timeout_s=values["ddp_timeout"])
    return parser.parse_dict(values)


def build_model(dsl: DSLArguments, args, weights_from=None):
    import torch
    from transformers import AutoModelForImageTextToText

    from .core import DSLError, apply_detached_skip_links, remove_detached_skip_links
    from .families import adapter_for

    kwargs = {}
    if dsl.attn_implementation:
        kwargs["attn_implementation"] = dsl.attn_implementation
    if dsl.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(weights_from or dsl.model_name_or_path, **kwargs)
    try:
        adapter = adapter_for(model)
    except DSLError as e:
        _fail(f"{e} (model {dsl.model_name_or_path!r})")
    if dsl.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        from .core import lora_target_modules

        if dsl.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        save = adapter.modules_to_save(train_tower=not dsl.freeze_vision_tower)
        config = LoraConfig(r=dsl.lora_r, lora_alpha=dsl.lora_alpha, lora_dropout=dsl.lora_dropout,
                            target_modules=lora_target_modules(model), modules_to_save=save or None,
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)  # the tower trains as PEFT's copy; the apply below acts on that copy
    else:
        adapter.tower().requires_grad_(not dsl.freeze_vision_tower)
    try:
        if dsl.dsl_off:
            remove_detached_skip_links(model)
        else:
            apply_detached_skip_links(model, _layers(dsl.dsl_detach_layers, "--dsl_detach_layers"),
                                      skip_layers=_layers(dsl.dsl_skip_layers, "--dsl_skip_layers"),
                                      skip_stride=dsl.dsl_skip_stride, detach_depth=dsl.dsl_detach_depth,
                                      main_layer=dsl.dsl_main_layer)
    except DSLError as e:
        _fail(f"{e} (model {dsl.model_name_or_path!r})")
    return model


def main(argv=None):
    from transformers import AutoProcessor
    from trl import SFTTrainer

    from .core import CONFIG_KEY, TowerLRMixin, unwrap_model
    from .data import DataError, LlavaChatCollator, load_llava_json

    dsl, args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    check_arguments(dsl, args)
    try:
        records = load_llava_json(dsl.data_path, dsl.image_folder)
    except DataError as e:
        _fail(str(e))
    resume = resolve_checkpoint(args.resume_from_checkpoint, args)
    args.resume_from_checkpoint = None
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if args.report_to in (None, "all", ["all"]):
        args.report_to = []

    # Resuming a full fine-tune: the weights come from the checkpoint through from_pretrained, which maps the saved
    # key names back. transformers 4.57's Trainer loads a Llava checkpoint with load_state_dict(strict=False) and the
    # legacy names it was saved under (language_model.model.*), so on its own it loads nothing and only warns.
    # The Trainer still restores optimizer, scheduler, RNG and step; with LoRA it loads the adapter itself.
    full_checkpoint = resume is not None and dsl.lora_r == 0 and os.path.isfile(os.path.join(resume, "config.json"))
    model = build_model(dsl, args, weights_from=resume if full_checkpoint else None)
    chosen = getattr(unwrap_model(model).config, CONFIG_KEY, None)
    if resume is not None:
        saved = os.path.join(resume, "config.json")
        if os.path.isfile(saved):
            with open(saved, encoding="utf-8") as f:
                before = json.load(f).get(CONFIG_KEY)
            if before != chosen:
                _fail(f"--resume_from_checkpoint={resume!r} was trained with {CONFIG_KEY}={before}, but these flags "
                      f"give {chosen}; resume with the same --dsl_* flags")

    from datasets import Dataset

    processor = AutoProcessor.from_pretrained(dsl.model_name_or_path)
    dataset = Dataset.from_list(records)

    class DSLSFTTrainer(TowerLRMixin, SFTTrainer):
        pass

    trainer = DSLSFTTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=LlavaChatCollator(processor, args.max_length),
                            processing_class=processor, vision_tower_lr=dsl.vision_tower_lr)
    from .core import DSLError
    from .diagnostics import attach_grad_stats

    try:
        attach_grad_stats(trainer, dsl.dsl_grad_stats_every, dsl.dsl_grad_stats_dense_steps, dsl.dsl_grad_stats_window,
                          resume_from=resume)
    except DSLError as e:
        _fail(f"{e} (model {dsl.model_name_or_path!r})")
    trainer.add_callback(completion_marker_callback())  # last: after the callbacks that write into checkpoints
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        print(f"llava_dsl.hf.sft: saved to {args.output_dir} ({CONFIG_KEY}={chosen})")
    from llava_dsl.compat.distributed import close_process_group

    # every multi-rank run (DDP or ZeRO-3): without the teardown, a gloo rank sometimes aborts at interpreter exit
    # ("terminate called without an active exception") after training and saving went well
    close_process_group()
    return trainer


if __name__ == "__main__":
    main()
