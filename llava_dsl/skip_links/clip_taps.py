"""A partial CLIP vision forward that keeps only the hidden states a layer spec needs and stops after the
deepest one (upstream runs every block and keeps all of them). Pure torch, no ``llava`` import."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn


def clip_hidden_states(vision_model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Run a Hugging Face ``CLIPVisionModel`` up to the deepest requested hidden state and keep only those.

    Equivalent to ``vision_model(pixel_values, output_hidden_states=True).hidden_states[i]`` for each i,
    but blocks past ``max(layers)`` are not computed and the other N + 1 states are not kept.
    """
    transformer = vision_model.vision_model
    encoder = transformer.encoder
    wanted = set(layers)
    hidden = transformer.pre_layrnorm(transformer.embeddings(pixel_values))
    kept = {0: hidden} if 0 in wanted else {}
    checkpointing = getattr(encoder, "gradient_checkpointing", False) and encoder.training
    for index, block in enumerate(encoder.layers[: max(wanted)], start=1):
        if checkpointing:
            hidden = encoder._gradient_checkpointing_func(block.__call__, hidden, None, None, False)[0]
        else:
            hidden = block(hidden, None, None)[0]
        if index in wanted:
            kept[index] = hidden
    return kept
