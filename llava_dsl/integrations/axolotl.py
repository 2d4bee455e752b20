"""Detached Skip-Links in axolotl: a plugin with its own YAML keys.

    plugins:
      - llava_dsl.integrations.axolotl.DSLPlugin
    dsl_detach_layers: [3, 1]     # or dsl_detach_depth: 1; dsl_off: true trains naive fusion

``post_model_load`` runs in axolotl's ``ModelLoader.load`` after adapters are attached, so with LoRA the PEFT model
is the one hooked. With no ``dsl_*`` key the plugin re-applies a checkpoint's ``dsl_detach_layers`` and otherwise
does nothing (it imports nothing either), so it is safe to list in every config. Written against axolotl 0.19.0's
``BasePlugin`` (the newest release on this project's index), which loads only the plugins listed under
``plugins:``; not run through ``axolotl train`` here (docs/integrations.md says why). ``freeze_mm_modules: true``
(axolotl's switch for text-only training of a multimodal model) with a detach request is refused: the detach would
change nothing.
"""
from __future__ import annotations

from typing import List, Optional, Union

from pydantic import BaseModel

from llava_dsl.integrations import DSLOptions, configure, parse_depth, parse_layers

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # the options below stay importable (and testable) without axolotl
    BasePlugin = object

SOURCE = "axolotl YAML (dsl_detach_layers / dsl_detach_depth)"
UNFREEZE = "set freeze_mm_modules: false (and leave the vision tower out of any frozen parameters)"


class DSLArgs(BaseModel):
    """The plugin's YAML keys (axolotl merges them into its config schema)."""

    dsl_detach_layers: Optional[Union[List[int], str, int]] = None
    dsl_detach_depth: Optional[int] = None
    dsl_off: Optional[bool] = None


def options_from_cfg(cfg) -> DSLOptions:
    get = cfg.get if hasattr(cfg, "get") else lambda key, default=None: getattr(cfg, key, default)
    options = DSLOptions(detach_layers=parse_layers(get("dsl_detach_layers"), "dsl_detach_layers"),
                         detach_depth=parse_depth(get("dsl_detach_depth"), "dsl_detach_depth"),
                         off=bool(get("dsl_off")), source=SOURCE, unfreeze_hint=UNFREEZE)
    if options.requested and get("freeze_mm_modules"):
        # axolotl freezes the multimodal modules after post_model_load, so the tower still looks trainable here
        from llava_dsl.hf import DSLError

        raise DSLError(f"{SOURCE}: Detached Skip-Links "
                       f"{options.detach_layers or f'depth {options.detach_depth}'} asked for, but "
                       f"freeze_mm_modules: true freezes the vision tower, so the detach would change nothing; "
                       f"{UNFREEZE}")
    return options


class DSLPlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "llava_dsl.integrations.axolotl.DSLArgs"

    def post_model_load(self, cfg, model):
        configure(model, options_from_cfg(cfg))
