"""The vision tower of a checkpoint and the layers its projector reads, for the probes: a CLIP vision folder, a
LLaVA-1.5 checkpoint (the plugin's config keys) or a stock Hugging Face Llava / LLaVA-NeXT folder."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch.nn as nn


class ProbeError(ValueError):
    """A checkpoint or flag the probes cannot use; the message names it and what was expected."""


@dataclass
class Tower:
    clip: nn.Module                 # a transformers CLIPVisionModel (eval mode, fp32)
    kind: str                       # "clip", "llava" (LLaVA-1.5) or "hf" (stock transformers Llava)
    source: str                     # the folder it came from
    main: int                       # hidden-state index of the main feature
    taps: Tuple[int, ...]           # the projector's skip taps, deep to shallow (empty: a single-layer projector)
    detached: Tuple[int, ...] = ()  # the taps that get stop-gradient in training
    trained: bool = True            # False: the checkpoint holds no trained tower weights (a frozen tower)
    note: str = ""
    model: Optional[nn.Module] = field(default=None, repr=False)  # the whole HF model when it was loaded

    @property
    def concat_order(self) -> Tuple[int, ...]:
        return (self.main,) + self.taps

    @property
    def num_blocks(self) -> int:
        return int(self.clip.config.num_hidden_layers)


def read_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ProbeError(f"{path}: no config.json; expected a CLIP vision folder, a LLaVA-1.5 checkpoint or a "
                         f"Hugging Face Llava folder")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def llava_layers(config: dict, num_blocks: int, source: str) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
    """(main, taps deep to shallow, detached taps) that a LLaVA-1.5 checkpoint's config records."""
    from llava_dsl.skip_links.layer_spec import LayerSpecError, absolute_layer, resolve_layer_spec

    select = int(config.get("mm_vision_select_layer", -2))
    try:
        if not config.get("mm_vision_skip_layers") and config.get("mm_vision_skip_stride") is None:
            return absolute_layer(select, num_blocks, "mm_vision_select_layer", select), (), ()
        spec = resolve_layer_spec(num_blocks, select, config.get("mm_vision_skip_layers"),
                                  config.get("mm_vision_skip_stride") if not config.get("mm_vision_skip_layers")
                                  else None, config.get("mm_vision_detach_depth"),
                                  detach=str(config.get("mm_projector_type", "")).startswith("detached_"))
    except LayerSpecError as error:
        raise ProbeError(f"{source}/config.json: {error}") from None
    return spec.main, spec.taps, spec.detached_layers


def _load_llava15(path: str, config: dict) -> Tower:
    import torch
    from transformers import CLIPVisionModel

    from llava_dsl.export_hf import LLAVA_PREFIX_TOWER, ExportError, load_checkpoint_weights, resolve_tower

    try:
        tower_path = resolve_tower(config, None, f"{path}/config.json")
    except ExportError as error:
        raise ProbeError(str(error)) from None
    clip = CLIPVisionModel.from_pretrained(tower_path, torch_dtype=torch.float32)
    trained = bool(config.get("unfreeze_mm_vision_tower", False))
    note = ""
    if trained:
        weights = {k[len(LLAVA_PREFIX_TOWER):]: v.float() for k, v in load_checkpoint_weights(path).items()
                   if k.startswith(LLAVA_PREFIX_TOWER)}
        if not weights:
            raise ProbeError(f"{path}: unfreeze_mm_vision_tower=True but the weights hold no {LLAVA_PREFIX_TOWER}* "
                             f"tensors (the trained tower)")
        missing, unexpected = clip.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ProbeError(f"{path}: the checkpoint's tower tensors do not fit {tower_path}: missing "
                             f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    else:
        note = f"the tower was frozen in training (unfreeze_mm_vision_tower is not set): this is {tower_path} itself"
    main, taps, detached = llava_layers(config, int(clip.config.num_hidden_layers), path)
    return Tower(clip.eval(), "llava", path, main, taps, detached, trained, note)


def _load_hf(path: str, config: dict, keep_model: bool) -> Tower:
    import torch

    try:
        from transformers import AutoModelForImageTextToText as Auto
    except ImportError:  # older transformers: the Llava class itself
        from transformers import LlavaForConditionalGeneration as Auto

    from llava_dsl.hf import CONFIG_KEY, unwrap_model, vision_tower

    model = Auto.from_pretrained(path, torch_dtype=torch.float32).eval()
    clip = vision_tower(unwrap_model(model))
    num_blocks = int(clip.config.num_hidden_layers)
    layers = config.get("vision_feature_layer", -2)
    layers = [layers] if isinstance(layers, int) else list(layers)
    absolute = [layer + num_blocks + 1 if layer < 0 else layer for layer in layers]
    main, taps = absolute[0], tuple(absolute[1:])
    detach = [d + num_blocks + 1 if d < 0 else d for d in (config.get(CONFIG_KEY) or [])]
    return Tower(clip, "hf", path, main, taps, tuple(t for t in taps if t in detach), True, "",
                 model if keep_model else None)


def load_tower(path: str, keep_model: bool = False) -> Tower:
    """The tower of ``path``: a CLIP vision folder (``model_type`` clip_vision_model / clip; every layer is a
    candidate, main = -2), a LLaVA-1.5 checkpoint (``mm_vision_tower`` in its config) or a Hugging Face
    Llava / LLaVA-NeXT folder (``vision_config``; ``keep_model`` keeps the whole model on ``Tower.model``)."""
    import torch
    from transformers import CLIPVisionModel

    path = os.path.abspath(os.path.expanduser(path))
    config = read_config(path)
    model_type = config.get("model_type")
    if "mm_vision_tower" in config:
        return _load_llava15(path, config)
    if model_type in ("llava", "llava_next"):
        return _load_hf(path, config, keep_model)
    if model_type in ("clip_vision_model", "clip"):
        clip = CLIPVisionModel.from_pretrained(path, torch_dtype=torch.float32).eval()
        blocks = int(clip.config.num_hidden_layers)
        return Tower(clip, "clip", path, blocks - 1, tuple(range(blocks - 2, 0, -1)), (), True,
                     "a vision tower folder: no projector, so every block below -2 counts as a tap")
    raise ProbeError(f"{path}/config.json: model_type {model_type!r} with no mm_vision_tower; expected a LLaVA-1.5 "
                     f"checkpoint, a Hugging Face Llava / LLaVA-NeXT folder or a CLIP vision folder")
