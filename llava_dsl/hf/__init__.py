"""Detached Skip-Links for stock Hugging Face models (the second front door; no ``llava`` import).

    from llava_dsl.hf import apply_detached_skip_links
    apply_detached_skip_links(model, detach_layers=[3, 1])   # Llava, LLaVA-NeXT, VipLlava, Qwen3-VL

Importing this package installs a guard: a supported model whose config carries ``dsl_detach_layers`` but has no
hook fails at its first training forward instead of silently training naive fusion. See docs/hf.md.
"""
from .core import (CONFIG_KEY, SUPPORTED, DSLError, DSLNotAppliedError, TowerLRMixin, apply_detached_skip_links,
                   dsl_llava_config, dsl_state, install_guard, is_applied, lora_target_modules, lora_target_regex,
                   remove_detached_skip_links, resolve, tower_param_groups, tower_parameter_names, unwrap_model,
                   vision_tower)
from .families import ADAPTERS, FamilyAdapter, adapter_for

install_guard(True)

__all__ = ["apply_detached_skip_links", "remove_detached_skip_links", "is_applied", "dsl_state", "resolve",
           "tower_param_groups", "tower_parameter_names", "TowerLRMixin", "lora_target_modules", "lora_target_regex",
           "dsl_llava_config", "vision_tower", "unwrap_model", "install_guard", "DSLError", "DSLNotAppliedError",
           "SUPPORTED", "CONFIG_KEY", "ADAPTERS", "FamilyAdapter", "adapter_for"]
