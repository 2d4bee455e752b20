"""Multi-layer fusion with Detached Skip-Links: pure torch, no llava import.

    z = MLP([h_main ; h_deep... ; stopgrad(h_shallow...)])

The stop-gradient sits on the shallow taps only, at the concatenation. Forward values equal the naive
fusion; the backward pass differs: shallow ViT blocks still get gradient through the main path (h_main is
computed on top of them) but never straight through the shortcut. No parameters are added.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from llava_dsl.skip_links.layer_spec import LayerSpec


def build_multilayer_mlp(layer_width: int, num_layers: int, hidden_size: int, mlp_depth: int = 2) -> nn.Sequential:
    """LLaVA's ``mlp{N}x_gelu`` with the first Linear widened to ``num_layers * layer_width``.

    Same module layout as LLaVA's, so state-dict keys stay ``0.*``, ``2.*``, ... and a checkpoint maps onto
    Hugging Face Llava's ``linear_1`` / ``linear_2`` when the depth is 2.
    """
    modules = [nn.Linear(num_layers * layer_width, hidden_size)]
    for _ in range(1, mlp_depth):
        modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*modules)


def fuse_layers(hidden_states: Dict[int, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
    """Channel-concat the spec's layers in ``spec.concat_order``, stop-gradient on ``spec.detached_layers``."""
    detached = set(spec.detached_layers)
    parts = [hidden_states[i].detach() if i in detached else hidden_states[i] for i in spec.concat_order]
    return torch.cat(parts, dim=-1)
