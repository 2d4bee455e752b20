"""The projector types, one entry each: how it is built, which tower layers it reads, and which Hugging Face
Llava projector it exports to. The plugin's ``build_vision_projector``, ``export_hf.projector_mapping`` and the
tests of ``patches/`` all read ``KINDS``: a new type is one entry here plus its test. Pure torch, no ``llava``."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch.nn as nn

from llava_dsl.skip_links.fusion import build_multilayer_mlp
from llava_dsl.skip_links.layer_spec import LayerSpecError


@dataclass(frozen=True)
class ProjectorKind:
    name: str                # the canonical mm_projector_type
    pattern: str             # full match on mm_projector_type; group ``depth`` = the number of Linear layers
    depth: int               # Linear layers when the name gives none; ``projector_type`` returns the name's
    multilayer: bool         # reads the main layer and the taps of a LayerSpec, not one layer
    detached: bool           # stop-gradient on the shallowest taps
    build: Optional[Callable[[Any, int], nn.Module]]  # (model config, depth) -> projector; None: LLaVA's builder
    hf: Optional[str]        # HF LlavaMultiModalProjector form: "mlp2x" (Linear, GELU, Linear) or "linear"
    hf_refusal: str = ""     # why it does not export, when ``hf`` is None


def _build_multilayer(config, depth: int) -> nn.Module:
    """LLaVA's ``mlp{N}x_gelu`` over the channel concat of the main layer and the taps persisted in the config."""
    taps = getattr(config, "mm_vision_skip_layers", None)
    if not taps:
        raise LayerSpecError(
            f"config has mm_projector_type={config.mm_projector_type!r} but no mm_vision_skip_layers; a multilayer "
            f"checkpoint records its tapped layers in config.json (was it written without llava_dsl?)")
    return build_multilayer_mlp(config.mm_hidden_size, 1 + len(taps), config.hidden_size, depth)


_MULTILAYER = r"mlp(?:(?P<depth>\d+)x_gelu)?_multilayer"

KINDS = (
    # LLaVA's own types, built by LLaVA. "linear" exports exactly: linear_1 holds the trained Linear, the activation
    # is the identity and linear_2 the identity matrix with zero bias (x * 1 + 0 is exact in every float format).
    ProjectorKind("linear", "linear", 1, multilayer=False, detached=False, build=None, hf="linear"),
    ProjectorKind("mlp2x_gelu", r"mlp(?P<depth>\d+)x_gelu", 2, multilayer=False, detached=False, build=None,
                  hf="mlp2x"),
    ProjectorKind("identity", "identity", 0, multilayer=False, detached=False, build=None, hf=None,
                  hf_refusal="it has no weights: it feeds vision features to the LLM unchanged, while Hugging Face "
                             "Llava always applies linear_1/linear_2; there is nothing trained to export into them"),
    # The plugin's: the naive multi-layer fusion and Detached Skip-Links.
    ProjectorKind("mlp_multilayer", _MULTILAYER, 2, multilayer=True, detached=False, build=_build_multilayer,
                  hf="mlp2x"),
    ProjectorKind("detached_mlp_multilayer", "detached_" + _MULTILAYER, 2, multilayer=True, detached=True,
                  build=_build_multilayer, hf="mlp2x"),
)


def projector_type(name: Optional[str]) -> Optional[ProjectorKind]:
    """The entry ``name`` matches, with the depth the name gives (``mlp3x_gelu_multilayer``: 3); None if none does."""
    for kind in KINDS:
        match = re.fullmatch(kind.pattern, name or "")
        if match:
            depth = int(match.group("depth")) if match.groupdict().get("depth") else kind.depth
            if kind.multilayer and depth < 1:
                raise ValueError(f"mm_projector_type={name!r}: the MLP needs at least one Linear layer")
            return replace(kind, depth=depth)
    return None
