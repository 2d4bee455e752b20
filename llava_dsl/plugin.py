"""``register()``: the plugin's swaps into the installed ``llava`` package, and the flag dataclasses and trainer
that LLaVA's ``train()`` picks up through them.

Each feature keeps the table of names it swaps (``PATCHES``: owner, name, replacement, reason) beside its code;
``FEATURE_PATCHES`` below says which features take part. ``ALL_PATCHES`` is their sum plus the names composed here
from several features (flags, trainer, vision-module initialisation), and ``register()`` applies exactly that list.
The idea itself (``skip_links``) imports no feature built on it; what combines them is composed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import llava.model.llava_arch as llava_arch
import llava.train.train as llava_train
import torch
from llava.train.llava_trainer import LLaVATrainer

from llava_dsl import data_checks
from llava_dsl.checkpointing import trainer as checkpointing_trainer
from llava_dsl.checkpointing.trainer import SafetyTrainerMixin
from llava_dsl.compat import lora as compat_lora
from llava_dsl.compat.deepspeed import cast_params_created_outside_zero_init, no_sync_unless_zero_partitions_gradients
from llava_dsl.diagnostics.callback import GradStatsArguments, attach_grad_stats
from llava_dsl.dpvr import llava_patches as dpvr_patches
from llava_dsl.dpvr.llava_patches import DPVRArguments, configure_routing, prepare_routed_training
from llava_dsl.rprobe.aux_loss import RProbeAuxArguments, RProbeAuxMixin, attach_aux_probe_if_asked
from llava_dsl.skip_links import llava_patches as skip_links_patches
from llava_dsl.skip_links.llava_patches import (JointTrainingArguments, JointTrainingMixin, SkipLinkModelArguments,
                                                initialize_vision_modules as initialize_skip_links,
                                                prepare_joint_training)


# Flags: LLaVA's dataclasses plus each feature's. train() builds its HfArgumentParser from these module globals.
# The feature mixins come first in TrainingArguments so that transformers' required fields keep their place.
@dataclass
class LaunchArguments:
    """What LLaVA's train_mem.py hard-codes, as a flag (read by the entry point, passed to LLaVA's train())."""

    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "Attention kernel of the LLM: eager, sdpa or flash_attention_2 (CUDA + flash-attn only). Default: "
                "LLaVA's (transformers' choice)."})


@dataclass
class ModelArguments(llava_train.ModelArguments, SkipLinkModelArguments, DPVRArguments, LaunchArguments):
    pass


@dataclass
class TrainingArguments(JointTrainingArguments, GradStatsArguments, RProbeAuxArguments,
                        llava_train.TrainingArguments):
    pass


def initialize_vision_modules(self, model_args, fsdp=None):
    initialize_skip_links(self, model_args, fsdp=fsdp)
    configure_routing(self, model_args)  # side branch + routing keys (--mm_routing dpvr_lf)


class DSLTrainer(RProbeAuxMixin, JointTrainingMixin, SafetyTrainerMixin, LLaVATrainer):
    """LLaVA's trainer with: resumable atomic checkpoints (SafetyTrainerMixin), the tower's own learning rate
    (JointTrainingMixin), the optional R-Probe auxiliary loss, and the gradient diagnostics."""

    def __init__(self, model=None, args=None, **kwargs):
        attach_aux_probe_if_asked(model, args)  # first, so that its parameters get the casts below
        prepare_joint_training(model, args)
        cast_params_created_outside_zero_init(model, args)
        prepare_routed_training(model, args)  # DPVR stage: only the routed parts train
        super().__init__(model=model, args=args, **kwargs)
        self.grad_stats = attach_grad_stats(self)  # None unless a --dsl_grad_stats_* flag asks for it

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.no_sync = no_sync_unless_zero_partitions_gradients(self.accelerator.no_sync)

    def log(self, logs):
        if torch.cuda.is_available():  # peak GPU memory next to the loss, for every report_to target
            logs = {**logs, "gpu_peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
        super().log(logs)


# Private transformers.Trainer methods and attributes the plugin's trainer overrides or reads (transformers 4.37.2):
# the checklist for a transformers upgrade. A test fails if the trainer overrides or reads one not named here.
TRAINER_INTERNALS = (
    ("_save_checkpoint", "override", "checkpointing.trainer",
     "whole-state checkpoints in every stage, completion marker last, rotation only after it"),
    ("_load_from_checkpoint", "override", "checkpointing.trainer", "a stage-1 checkpoint holds only mm_projector.bin"),
    ("_load_rng_state", "override", "checkpointing.trainer",
     "4.37 loads rng_state with torch.load's weights_only default, which rejects its numpy state on torch >= 2.6"),
    ("_rotate_checkpoints", "override", "checkpointing.trainer",
     "deferred until the new checkpoint is complete; also called directly after the marker"),
    ("_save", "override", "checkpointing.trainer", "final model folders are written atomically"),
    ("_get_output_dir", "read", "checkpointing.trainer", "where transformers puts checkpoint-N"),
    ("_train_batch_size", "read", "checkpointing.trainer", "planned samples for the masked-sample threshold"),
    ("tmp-checkpoint-N", "behaviour", "checkpointing.completeness",
     "transformers' staging folder name for a checkpoint being written, renamed to checkpoint-N"),
)

COMPOSED_PATCHES = (
    (llava_train, "ModelArguments", ModelArguments, "train() parses flags from these module globals"),
    (llava_train, "TrainingArguments", TrainingArguments,
     "adds the tower LR, gradient-diagnostics and R-Probe auxiliary-loss flags"),
    (llava_train, "LLaVATrainer", DSLTrainer,
     "unfreezes the tower with its own optimizer group; resumable atomic checkpoints; optional aux loss"),
    (llava_arch.LlavaMetaModel, "initialize_vision_modules", initialize_vision_modules,
     "resolve/persist the layer spec before the projector is built; ZeRO-3-safe, shape-checked adapter load; "
     "then the DPVR side branch"),
)

# The features that touch LLaVA, each with its own table.
FEATURE_PATCHES = {
    "skip_links": skip_links_patches.PATCHES,
    "checkpointing": checkpointing_trainer.PATCHES,
    "data_checks": data_checks.PATCHES,
    "lora": compat_lora.PATCHES,
    "dpvr": dpvr_patches.PATCHES,
}

ALL_PATCHES = COMPOSED_PATCHES + tuple(patch for patches in FEATURE_PATCHES.values() for patch in patches)


def register() -> None:
    for owner, name, replacement, _reason in ALL_PATCHES:
        setattr(owner, name, replacement)


def is_registered() -> bool:
    return all(getattr(owner, name) is replacement for owner, name, replacement, _ in ALL_PATCHES)
