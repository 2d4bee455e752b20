"""Loading a LLaVA checkpoint for the probe: full weights or a base LLM + stage-1 ``mm_projector.bin``, in the
probe's dtype, with the tower that was trained. ``LLAVA_TOUCHES`` lists what of LLaVA this feature reads."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn as nn

from llava_dsl.rprobe.model import CheckpointError, ProbeGeometry, geometry_of
from llava_dsl.skip_links.adapter import load_projector_adapter

LLAVA_TOUCHES = (
    ("llava_dsl.register()", "checkpoints with the plugin's projector types and multi-layer towers must load"),
    ("llava.model.LlavaLlamaForCausalLM.from_pretrained", "load a LLaVA checkpoint (full weights, or a base LLM + "
     "stage-1 mm_projector.bin) in the probe's dtype instead of the builder's fixed fp16"),
    ("model.get_vision_tower().load_model()", "LLaVA keeps only the tower's name unless the tower was trained"),
    ("model.get_vision_tower().image_processor / .config", "processed image size, patch grid, normalisation"),
    ("llava.mm_utils.process_images", "the image exactly as the model sees it (pad-to-square, CLIP normalisation)"),
    ("model.encode_images", "the projected visual tokens: vision tower + projector, frozen"),
    ("model.get_model().layers / .norm", "the LLM weights the probe's decoder is initialised from"),
    ("model.get_model().embed_tokens", "frozen text embeddings of the conditional variant's prompt"),
    ("model.get_model().mm_projector (forward hook)", "aux mode: the projected tokens of the LM forward, with grad"),
    ("llava.constants.IMAGE_TOKEN_INDEX", "aux mode: which samples of a batch carry an image"),
    ("llava_dsl.plugin.DSLTrainer / TrainingArguments", "aux mode extends the plugin's trainer and flags"),
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@dataclass
class LoadedCheckpoint:
    path: str
    model: nn.Module
    tokenizer: Any
    processor: Any
    geometry: ProbeGeometry
    mean: List[float]
    std: List[float]


def load_checkpoint(model_path: str, model_base: Optional[str] = None, dtype: torch.dtype = torch.float32,
                    device: Optional[str] = "cpu", freeze: bool = True) -> LoadedCheckpoint:
    """Load a LLaVA checkpoint, every parameter frozen (``freeze=False``: as LLaVA's training would load it).

    ``model_path`` holds full weights, or (stage 1) a config.json + mm_projector.bin, then ``model_base`` is
    the LLM they were trained on. ``device=None`` leaves placement to DeepSpeed (ZeRO-3 loads partitioned when
    an ``HfDeepSpeedConfig`` is alive).
    """
    from transformers import AutoConfig, AutoTokenizer

    import llava_dsl

    llava_dsl.register()
    from llava.model import LlavaLlamaForCausalLM

    if not os.path.isdir(model_path):
        raise CheckpointError(f"--model-path={model_path}: no such directory")
    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{model_path}: no config.json; expected a LLaVA checkpoint folder")
    config = AutoConfig.from_pretrained(model_path)
    if not getattr(config, "mm_vision_tower", None) or getattr(config, "model_type", None) != "llava_llama":
        raise CheckpointError(
            f"{model_path}: config.json has model_type={getattr(config, 'model_type', None)!r} and "
            f"mm_vision_tower={getattr(config, 'mm_vision_tower', None)!r}; the probe needs a LLaVA (llava_llama) "
            f"checkpoint with vision modules (a plain LLM has no visual tokens to probe)")
    if any(os.path.exists(os.path.join(model_path, name)) for name in WEIGHT_FILES):
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
        tokenizer_path = model_path
    elif os.path.isfile(os.path.join(model_path, "mm_projector.bin")):
        if model_base is None:
            raise CheckpointError(f"{model_path} holds only mm_projector.bin (a stage-1 output); pass --model-base "
                                  f"with the LLM it was trained on")
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, torch_dtype=dtype)
        try:
            load_projector_adapter(model.get_model().mm_projector, os.path.join(model_path, "mm_projector.bin"),
                                   getattr(config, "mm_projector_type", None), source="stage-1 checkpoint")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        tokenizer_path = model_base
    else:
        raise CheckpointError(f"{model_path}: neither model weights ({', '.join(WEIGHT_FILES)}) nor mm_projector.bin")
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    if device is not None:
        model.to(device=device, dtype=dtype)
    else:
        tower.to(dtype=dtype)
    if freeze:
        model.requires_grad_(False)
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, use_fast=False)
    geometry, mean, std = geometry_of(model)
    return LoadedCheckpoint(model_path, model, tokenizer, tower.image_processor, geometry, mean, std)
