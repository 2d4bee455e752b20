"""Every key the plugin writes into a model's config.json, in one table, with what an export does with it.

A feature that persists a new key adds it here; ``export_hf`` reads this table (and refuses a checkpoint whose
keys it cannot carry), and a test fails if a feature writes a key this table does not list. Plain python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# What a Hugging Face export does with a key:
MAPPED = "mapped"          # carried over in another form (e.g. the tapped layers become vision_feature_layer)
TRAINING_ONLY = "training_only"  # changes training only; inference is the same without it, so it is dropped
REFUSED = "refused"        # changes the forward pass in a way stock transformers cannot reproduce: export refuses


# The key of a Hugging Face config that names the detached taps: written by the export for detached projector types,
# read and written by llava_dsl.hf (its CONFIG_KEY is this name).
HF_DETACH_LAYERS = "dsl_detach_layers"


@dataclass(frozen=True)
class ConfigKey:
    name: str
    feature: str
    export: str
    reason: str


PLUGIN_CONFIG_KEYS: Tuple[ConfigKey, ...] = (
    ConfigKey("mm_vision_skip_layers", "skip_links", MAPPED,
              "the taps; with the main layer they become vision_feature_layer"),
    ConfigKey("mm_vision_detach_depth", "skip_links", MAPPED,
              f"stop-gradient changes the backward pass only; the detached taps become {HF_DETACH_LAYERS} "
              f"(hidden-state indices), which stock transformers ignores and llava_dsl.hf.apply_detached_skip_links "
              f"reads"),
    ConfigKey("unfreeze_mm_vision_tower", "skip_links", MAPPED,
              "says the checkpoint holds trained tower weights, which the export uses"),
    ConfigKey("mm_vision_tower_lr", "skip_links", TRAINING_ONLY, "an optimizer setting"),
    ConfigKey("mm_routing", "dpvr", REFUSED,
              "DPVR-LF routes vision tokens through a side branch that stock Llava does not have"),
    ConfigKey("dpvr_route_layer", "dpvr", REFUSED, "part of the DPVR-LF routing"),
    ConfigKey("dpvr_side_init_layer", "dpvr", REFUSED, "part of the DPVR-LF routing"),
    ConfigKey("dpvr_side_attention", "dpvr", REFUSED, "part of the DPVR-LF routing"),
    ConfigKey("dpvr_tune_fusion_layer", "dpvr", REFUSED, "part of the DPVR-LF routing"),
    ConfigKey("dpvr_route_source", "dpvr", REFUSED, "part of the DPVR-LF routing"),
)

BY_NAME: Dict[str, ConfigKey] = {key.name: key for key in PLUGIN_CONFIG_KEYS}


def keys_of(feature: str) -> Tuple[str, ...]:
    """The config keys one feature writes, in table order."""
    names = tuple(key.name for key in PLUGIN_CONFIG_KEYS if key.feature == feature)
    if not names:
        raise KeyError(f"no config keys registered for feature {feature!r}")
    return names
