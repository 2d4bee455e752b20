"""The gradient diagnostics (docs/diagnostics.md) on the stock Hugging Face path: per block group of the CLIP tower,
the gradient split into the part that arrives through the main feature and the parts sent by the skip taps, with
the same statistics, logs and ``dsl_grad_stats.json`` as the LLaVA-1.5 plugin, so that
``python -m llava_dsl.diagnostics plot`` draws it unchanged.

    from llava_dsl.hf.diagnostics import attach_grad_stats
    trainer = Trainer(model=model, ...)                  # or SFTTrainer; model: stock Llava / LLaVA-NeXT
    attach_grad_stats(trainer, dense_steps=200, every=50, window=10)
    trainer.train()

The split is ``llava_dsl.diagnostics.splitter.GradientSplitter``: references to the tower's hidden states are kept
during the forward, d loss / d(projector input) is captured during the normal backward at the input the projector
consumes (after the Detached Skip-Links pre-hook), and each channel slice is pushed back through the tower on its
own. A detached tap's slice reports the gradient it *would* send (the counterfactual). ``.grad`` is never touched.
The window statistics, the per-step records and the file are ``llava_dsl.diagnostics.callback.GradStatsCallback``'s.

Supported: Llava and LLaVA-NeXT with a CLIP vision tower (``CLIPVisionModel``, with or without the
``.vision_model`` wrapper) and a list ``vision_feature_layer``. Qwen3-VL's DeepStack mergers have no channel
slices to split and are refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

import torch.nn as nn

from llava_dsl.diagnostics.callback import GradStatsCallback
from llava_dsl.diagnostics.callback import check_grad_stats_flags as _check_grad_stats_flags
from llava_dsl.diagnostics.splitter import GradientSplitter, vision_transformer

from .core import dsl_state
from .families import ADAPTERS, DSLError, adapter_for


@dataclass(frozen=True)
class FeatureLayout:
    """The projector input's layers, as the splitter and the statistics file read them (LayerSpec's fields)."""

    num_blocks: int
    concat_order: Tuple[int, ...]  # the projector input's order (the model's feature-layer list)
    detached_layers: Tuple[int, ...]
    main: int  # the family adapter's main layer (Llava: the list's first; VipLlava: its deepest)

    @property
    def taps(self) -> Tuple[int, ...]:
        return tuple(layer for layer in self.concat_order if layer != self.main)


def feature_layout(model: nn.Module) -> Tuple[nn.Module, nn.Module, FeatureLayout]:
    """(CLIP vision model, projector, layout) of a stock model whose projector reads channel slices (Llava,
    LLaVA-NeXT, VipLlava; PEFT / DDP / DeepSpeed wrapped or not: the modules that train); a clear error otherwise."""
    adapter = adapter_for(model)
    if not adapter.channel_slices:
        supported = ", ".join(name for name, family in ADAPTERS.items() if family.channel_slices)
        raise DSLError(f"{adapter.name}: the gradient diagnostics split the projector input into per-layer channel "
                       f"slices; {adapter.no_channel_slices} (supported: {supported}, with a CLIP vision tower)")
    main, taps = adapter.feature_layers()
    if not taps:
        raise DSLError(f"{adapter.layer_source()}: a single feature layer has no skip part to measure; expected a "
                       f"list (main layer and taps)")
    clip = adapter.tower()
    try:
        vision_transformer(clip)
    except TypeError as e:
        raise DSLError(f"{e} (the vision tower of {adapter.name})") from None
    state = dsl_state(model)
    detached = tuple(state.detach_layers) if state is not None else ()
    layout = FeatureLayout(adapter.num_blocks(), tuple(adapter.listed_layers()), detached, main)
    return clip, adapter.projector(), layout


def check_grad_stats_flags(every: int, dense_steps: int, window: int) -> bool:
    """True when the flags ask for a measurement; an error naming the flag for values that cannot work."""
    return _check_grad_stats_flags(every, dense_steps, window, error=DSLError)


class HFGradStatsCallback(GradStatsCallback):
    """``GradStatsCallback`` on a stock model: the split hooks sit on the CLIP model (start of a measured pass) and
    on the projector (the consumed input). Checkpoints carry the statistics (``on_save``); a resumed run continues
    them when it is given the checkpoint (``resume_from``)."""

    def __init__(self, trainer, model: nn.Module, every: int, dense_steps: int, window: int,
                 resume_from: Optional[str] = None):
        clip, projector, layout = feature_layout(model)
        super().__init__(trainer, SimpleNamespace(layer_spec=layout, vision_tower=clip), every, dense_steps, window)
        self.splitter = GradientSplitter(clip, grad_scale=self.splitter.grad_scale, clip=clip, spec=layout,
                                         features_at=projector)
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from:
            self.load_checkpoint_state(self.resume_from)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            self.save_checkpoint_state(checkpoint)


def attach_grad_stats(trainer, every: int = 0, dense_steps: int = 0, window: int = 10,
                      resume_from: Optional[str] = None) -> Optional[HFGradStatsCallback]:
    """Add the measurement to ``trainer`` (every ``every``-th optimizer step, and each of the first ``dense_steps``);
    with both 0, nothing is added and nothing is hooked. Returns the callback."""
    if not check_grad_stats_flags(every, dense_steps, window):
        return None
    clip, _, _ = feature_layout(trainer.model)
    if not any(p.requires_grad for p in clip.parameters()):
        raise DSLError(f"--dsl_grad_stats_every={every} / --dsl_grad_stats_dense_steps={dense_steps}: the vision "
                       f"tower is frozen, so no gradient reaches its blocks; train it (drop --freeze_vision_tower)")
    callback = HFGradStatsCallback(trainer, trainer.model, every, dense_steps, window, resume_from=resume_from)
    trainer.add_callback(callback)
    return callback
