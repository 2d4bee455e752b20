"""Detached Skip-Links inside fine-tuning frameworks, each in its own idiom (docs/integrations.md):

* axolotl: ``plugins: [llava_dsl.integrations.axolotl.DSLPlugin]`` and ``dsl_detach_layers`` in its YAML.
* ms-swift: ``--external_plugins <llava_dsl/integrations/ms_swift.py> --callbacks dsl``; ``DSL_DETACH_LAYERS``.
* LLaMA-Factory: ``python -m llava_dsl.integrations.llamafactory cfg.yaml``; ``dsl_detach_layers`` in the same YAML.

Each is a thin adapter from the framework's configuration to ``configure`` below, which calls ``llava_dsl.hf``
(the hook, the layer rules and the guard live there only). ``llava_dsl.hf`` is imported lazily, so a framework run
that asks for nothing imports and hooks nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

from torch import nn

from llava_dsl.config_schema import HF_DETACH_LAYERS
from llava_dsl.skip_links.layer_spec import parse_layer_list

logger = logging.getLogger("llava_dsl.integrations")

CONFIG_KEY = HF_DETACH_LAYERS  # llava_dsl.hf's key, named where importing it installs no guard


@dataclass(frozen=True)
class DSLOptions:
    """What a framework's configuration asked for. ``source`` names where it came from, for error messages
    (e.g. ``"axolotl YAML"``); ``unfreeze_hint`` is the framework's own setting that trains the vision tower."""

    detach_layers: Optional[List[int]] = None
    detach_depth: Optional[int] = None
    off: bool = False
    source: str = "configuration"
    unfreeze_hint: str = "train the vision tower"

    @property
    def requested(self) -> bool:
        return self.detach_layers is not None or self.detach_depth is not None


def parse_layers(value, source: str) -> Optional[List[int]]:
    """``[3, 1]``, ``"3,1"``, ``"[3, 1]"`` or ``3`` -> ``[3, 1]`` / ``[3]`` by the package's one layer-list rule;
    None or ``""`` (an unset environment variable) -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return list(parse_layer_list([value] if isinstance(value, int) else value, flag=source))


def parse_depth(value, source: str) -> Optional[int]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        depth = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}={value!r}: expected a positive number of taps to detach") from None
    if depth < 1:
        raise ValueError(f"{source}={value!r}: expected a positive number of taps to detach")
    return depth


def _config_layers(model: nn.Module) -> Optional[Sequence[int]]:
    """``dsl_detach_layers`` of a loaded checkpoint's config (PeftModel forwards ``.config`` to its base model)."""
    config = getattr(model, "config", None)
    return getattr(config, CONFIG_KEY, None) if config is not None else None


def configure(model: nn.Module, options: DSLOptions) -> Optional[object]:
    """Apply, re-apply or remove Detached Skip-Links on a framework's loaded model; returns ``dsl_state`` or None.

    * layers or a depth requested: apply them (the model's tower must be trainable, else ``DSLError`` naming
      ``unfreeze_hint``: on a frozen tower the detach would silently change nothing);
    * nothing requested but the checkpoint's config carries ``dsl_detach_layers``: re-apply that choice (also on a
      frozen tower, where it is harmless and keeps the guard of ``llava_dsl.hf`` satisfied);
    * ``off``: train naive fusion on purpose (clears ``dsl_detach_layers``, so the guard lets it train);
    * nothing at all: return without importing ``llava_dsl.hf``.
    """
    if options.off and options.requested:
        raise ValueError(f"{options.source}: dsl_off together with detach layers / depth "
                         f"({options.detach_layers or options.detach_depth}); expected one of them")
    saved = _config_layers(model)
    if not (options.off or options.requested or saved):
        return None
    from llava_dsl import hf

    if options.off:
        if hf.is_applied(model) or saved:
            hf.remove_detached_skip_links(model)
            logger.warning("llava_dsl: Detached Skip-Links off (%s); training naive multi-layer fusion", options.source)
        return None
    trainable = any(p.requires_grad for p in hf.vision_tower(model).parameters())
    if options.requested and not trainable:
        asked = options.detach_layers if options.detach_layers is not None else f"depth {options.detach_depth}"
        raise hf.DSLError(f"{options.source}: Detached Skip-Links {asked} asked for, but the vision tower of "
                          f"{type(hf.unwrap_model(model)).__name__} is frozen, so the detach would change nothing; "
                          f"{options.unfreeze_hint}")
    if options.requested:
        hf.apply_detached_skip_links(model, detach_layers=options.detach_layers, detach_depth=options.detach_depth)
        how = "applied"
    else:
        hf.apply_detached_skip_links(model)  # reads config.dsl_detach_layers
        how = f"re-applied from the checkpoint's config.{CONFIG_KEY}"
    state = hf.dsl_state(model)
    logger.warning("llava_dsl: Detached Skip-Links %s (%s): detach layers %s of vision_feature_layer %s", how,
                   options.source, list(state.detach_layers), hf.unwrap_model(model).config.vision_feature_layer)
    return state
