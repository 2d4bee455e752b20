"""LoRA and QLoRA stay inside the language model. LLaVA's ``find_all_linear_names`` returns leaf names such as
``q_proj``, so PEFT also wraps the CLIP tower's layers (LLaVA #1647); and ``--bits 4/8`` would quantize a tower
that is meant to train. ``PATCHES`` lists the two swaps."""
from __future__ import annotations

from typing import List

import llava.train.train as llava_train
import torch.nn as nn
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

_UPSTREAM_LLAVA_LLAMA = llava_train.LlavaLlamaForCausalLM


def _vision_module_ids(model: nn.Module) -> set:
    """ids of every module inside a vision tower or a multimodal projector (never LoRA-wrapped or quantized)."""
    roots = [m for m in model.modules() if isinstance(m, CLIPVisionTower)]
    inner = getattr(model, "get_model", None)
    projector = getattr(inner(), "mm_projector", None) if callable(inner) else None
    if projector is not None:
        roots.append(projector)
    return {id(sub) for root in roots for sub in root.modules()}


def lora_target_modules(model: nn.Module) -> List[str]:
    """Full names of the language model's Linear layers, for PEFT's ``target_modules``.

    LLaVA's ``find_all_linear_names`` returns leaf names (``q_proj``, ``fc1``, ...); PEFT matches those by
    suffix, so whenever the tower is built before LoRA (finetuning from a LLaVA checkpoint whose tower is
    trainable) it also wraps the CLIP tower's layers and trains LoRA and full tower weights at once.
    """
    excluded = _vision_module_ids(model)
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and id(module) not in excluded and name != "lm_head")


class QuantizationSafeLlavaLlama:
    """Stands in for ``LlavaLlamaForCausalLM`` inside train(): bitsandbytes must not quantize the vision tower.

    LLaVA skips only ``mm_projector``; a tower built inside ``from_pretrained`` (finetuning from a LLaVA
    checkpoint with a trained tower) would otherwise be turned into 4-/8-bit layers that cannot train.
    """

    @staticmethod
    def from_pretrained(*args, **kwargs):
        quantization = kwargs.get("quantization_config")
        if quantization is not None:
            skip = list(quantization.llm_int8_skip_modules or [])
            quantization.llm_int8_skip_modules = skip + [m for m in ("mm_projector", "vision_tower") if m not in skip]
        return _UPSTREAM_LLAVA_LLAMA.from_pretrained(*args, **kwargs)

PATCHES = (
    (llava_train, "find_all_linear_names", lora_target_modules,
     "upstream's leaf names make PEFT wrap the vision tower's layers too (LLaVA #1647)"),
    (llava_train, "LlavaLlamaForCausalLM", QuantizationSafeLlavaLlama,
     "with --bits 4/8, keep the vision tower out of bitsandbytes quantization"),
)
