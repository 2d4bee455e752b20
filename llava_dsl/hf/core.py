"""Detached Skip-Links injected into stock Hugging Face models (no fork of transformers, no ``llava`` import).

The stop-gradient sits where a skip is *consumed*, which the model's family adapter (``families.py``) names:

* Llava / LLaVA-NeXT / VipLlava: ``get_image_features`` concatenates the listed hidden states in list order and
  feeds them to ``multi_modal_projector``; a forward pre-hook on the projector detaches the channel slices of the
  detached taps (VipLlava: before the projector's LayerNorm). The vision tower's own outputs are never detached: a
  block's output also feeds the next block, so detaching it would cut the main path too.
* Qwen3-VL (DeepStack): a forward pre-hook on ``visual.deepstack_merger_list[j]`` detaches that merger's input.

Forward values are bit-identical to the model without the hook; only the backward differs.

Layer indices follow LLaVA's hidden-state convention (``llava_dsl.LayerSpec``): 0 = embeddings, i = output of
block i, negatives count from the end.

PEFT ``modules_to_save``: the hooks and the freeze act on the copy that trains. Applied before ``get_peft_model``,
they follow the module into its copy when PEFT wraps it (a module-registration hook, installed by the first apply).
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from llava_dsl.config_schema import HF_DETACH_LAYERS
from llava_dsl.skip_links.layer_spec import LayerSpec, LayerSpecError, parse_layer_list, resolve_layer_spec

from .families import (ADAPTERS, INNER_NAMES, DSLError, FamilyAdapter, _absolute, adapter_for,
                       is_modules_to_save_wrapper, peft_original_parameters, unwrap_model)

logger = logging.getLogger("llava_dsl.hf")

CONFIG_KEY = HF_DETACH_LAYERS  # the name an export of the LLaVA path writes too
_STATE = "_llava_dsl_state"
SUPPORTED = ADAPTERS  # class name -> family adapter (llava_dsl.hf.families)


class DSLNotAppliedError(RuntimeError):
    """A model whose config asks for Detached Skip-Links is trained without the hook."""


@dataclass
class DSLState:
    """What ``apply_detached_skip_links`` attached to a model (kept on the inner model as ``_llava_dsl_state``)."""

    family: str
    spec: LayerSpec
    detach_layers: Tuple[int, ...]
    freeze_unused: bool = True
    handles: list = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)  # module names this state set to requires_grad=False
    frozen_params: list = field(default_factory=list)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower that trains (Llava's ``vision_tower``, Qwen3-VL's ``visual``; PEFT's trained copy when the
    tower is in ``modules_to_save``)."""
    return adapter_for(model).tower()


# --------------------------------------------------------------------------------------------------
# Resolving which layers are tapped and detached
# --------------------------------------------------------------------------------------------------
def _layer_spec(num_blocks: int, main, source: str, **choice) -> LayerSpec:
    try:
        return resolve_layer_spec(num_blocks, main, **choice)
    except LayerSpecError as e:
        raise DSLError(f"{source}: {e}") from None


def _spec_from(adapter: FamilyAdapter, main: int, taps: Sequence[int], detach_depth, source: str) -> LayerSpec:
    if not taps:
        raise DSLError(f"{source}: a single feature layer ({main}) has no skip link to detach; Detached Skip-Links "
                       f"need the feature layers to be a list (main layer and taps), e.g. "
                       f"apply_detached_skip_links(model, skip_stride=...) or build the model with "
                       f"llava_dsl.hf.dsl_llava_config(...)")
    return _layer_spec(adapter.num_blocks(), main, source, skip_layers=list(taps), detach_depth=detach_depth)


def resolve(model: nn.Module, detach_layers=None, *, skip_layers=None, skip_stride=None, detach_depth=None,
            main_layer=None) -> Tuple[LayerSpec, Tuple[int, ...], Optional[List[int]]]:
    """(spec, detached hidden-state indices deep-first, new feature-layer list or None if unchanged)."""
    adapter = adapter_for(model)
    n = adapter.num_blocks()
    main, taps = adapter.feature_layers()
    new_layers = None
    if skip_layers is not None or skip_stride is not None or main_layer is not None:
        want_main = main if main_layer is None else main_layer
        source = (f"skip_layers={skip_layers!r}, skip_stride={skip_stride!r}, main_layer={want_main!r}, "
                  f"detach_depth={detach_depth!r}")
        spec = _layer_spec(n, want_main, source, skip_layers=skip_layers, skip_stride=skip_stride,
                           detach_depth=detach_depth)
        new_layers = adapter.new_feature_layers(spec, source)
        if new_layers is not None:
            main, taps = spec.main, list(spec.taps)
    else:
        spec = _spec_from(adapter, main, taps, detach_depth if detach_layers is None else None, adapter.layer_source())

    if detach_layers is not None:
        source = f"detach_layers={list(detach_layers) if not isinstance(detach_layers, str) else detach_layers!r}"
        try:
            listed = parse_layer_list(detach_layers, "detach_layers")
        except LayerSpecError as e:
            raise DSLError(str(e)) from None
        wanted = [_absolute(v, n, "detach_layers", detach_layers) for v in listed]
        if len(set(wanted)) != len(wanted):
            raise DSLError(f"{source}: duplicate layers (resolved against {n} blocks: {wanted})")
        for layer in wanted:
            if layer == main:
                raise DSLError(f"{source}: layer {layer} is the main layer of the feature layers {[main] + taps} "
                               f"({adapter.layer_source()}); detaching it would cut the main path. Expected a "
                               f"subset of the taps {taps}")
            if layer not in taps:
                raise DSLError(f"{source}: layer {layer} is not a tapped layer; expected a subset of the taps "
                               f"{taps} (feature layers {[main] + taps}, hidden-state indices, 0 = embeddings)")
        if detach_depth is not None and len(wanted) != detach_depth:
            raise DSLError(f"{source} and detach_depth={detach_depth} disagree; give one of them")
        detached = tuple(sorted(wanted, reverse=True))
    else:
        detached = tuple(spec.detached_layers)
    return spec, detached, new_layers


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
def _slice_hook(width: int, count: int, positions: Tuple[int, ...]):
    positions = frozenset(positions)

    def hook(module, args):
        if not args:
            raise DSLError(f"{type(module).__name__} was called without a positional input; the Detached Skip-Links "
                           f"hook expects the concatenated vision features as its first argument")
        x = args[0]
        if x.shape[-1] != width * count:
            raise DSLError(f"{type(module).__name__} input has {x.shape[-1]} channels, but the Detached Skip-Links "
                           f"hook was set up for {count} layers x {width}; were the feature layers changed (in the "
                           f"config or as a forward argument) after apply_detached_skip_links? Re-apply it.")
        pieces = list(x.split(width, dim=-1))
        for p in positions:
            pieces[p] = pieces[p].detach()
        return (torch.cat(pieces, dim=-1),) + tuple(args[1:])

    return hook


def _detach_input_hook(module, args):
    return (args[0].detach(),) + tuple(args[1:])


def _attach(adapter: FamilyAdapter, state: DSLState) -> None:
    """Hooks at the adapter's detach points and the freeze of what no loss reaches, on the modules that train."""
    for point in adapter.detach_points(state.detach_layers):
        hook = _detach_input_hook if point.positions is None else \
            _slice_hook(point.width, point.count, point.positions)
        state.handles.append(point.module.register_forward_pre_hook(hook))
    if not state.freeze_unused:
        return
    names = {id(m): name for name, m in adapter.outer.named_modules()}
    frozen = []
    for module in adapter.unused_modules():
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            frozen.append(names.get(id(module), type(module).__name__))
            for p in params:
                p.requires_grad_(False)
                state.frozen_params.append(p)
    state.frozen += frozen
    if frozen:
        main, taps = adapter.feature_layers()
        logger.warning("llava_dsl.hf: froze %d vision-tower module(s) that no loss reaches (feature layers %s of a "
                       "%d-block tower; DDP fails on parameters without gradient): %s", len(frozen),
                       sorted([main] + taps, reverse=True), adapter.num_blocks(), ", ".join(frozen))


def _detach_hooks(root: nn.Module, state: DSLState) -> None:
    """Remove the state's hooks, also from deep copies of hooked modules (PEFT's ``modules_to_save`` copies carry
    the hook dict entries, under the same ids)."""
    ids = {handle.id for handle in state.handles}
    for handle in state.handles:
        handle.remove()
    state.handles = []
    if ids:
        for module in root.modules():
            for hook_id in ids:
                module._forward_pre_hooks.pop(hook_id, None)


def _unfreeze(root: nn.Module, state: DSLState) -> None:
    """Unfreeze what the state froze, except a PEFT original (PEFT keeps it frozen: its copy trains)."""
    originals = peft_original_parameters(root)
    for p in state.frozen_params:
        if id(p) not in originals:
            p.requires_grad_(True)
    state.frozen_params, state.frozen = [], []


def is_applied(model: nn.Module) -> bool:
    return adapter_for(model).inner.__dict__.get(_STATE) is not None


def dsl_state(model: nn.Module) -> Optional[DSLState]:
    return adapter_for(model).inner.__dict__.get(_STATE)


def apply_detached_skip_links(model: nn.Module, detach_layers: Optional[Sequence[int]] = None, *,
                              skip_layers=None, skip_stride: Optional[int] = None, detach_depth: Optional[int] = None,
                              main_layer: Optional[int] = None, freeze_unused: bool = True) -> nn.Module:
    """Inject Detached Skip-Links into a stock model (in place; returns it).

    ``detach_layers``: hidden-state indices (LLaVA indexing) of the taps to detach; each must be one of the taps in
    the model's feature layers (Llava: ``config.vision_feature_layer``, main layer first), never the main layer.
    ``skip_layers`` / ``skip_stride`` / ``main_layer``: choose the taps with the LLaVA-1.5 plugin's rules (they set
    the feature-layer list to main + taps deep-first, when the projector's width fits). ``detach_depth``: detach
    that many of the shallowest taps. With no argument: the config's ``dsl_detach_layers`` (re-apply after
    ``from_pretrained``), else the default depth (the taps in the first half of the tower).

    The choice is written to ``config.dsl_detach_layers``, so ``save_pretrained`` keeps it. With
    ``freeze_unused``, tower modules no loss can reach (blocks deeper than the deepest feature layer,
    ``post_layernorm``) are frozen, which DDP needs; one log line names them.
    """
    adapter = adapter_for(model)
    if detach_layers is None and skip_layers is None and skip_stride is None and detach_depth is None \
            and main_layer is None and getattr(adapter.config, CONFIG_KEY, None) is not None:
        detach_layers = list(getattr(adapter.config, CONFIG_KEY))
    spec, detached, new_layers = resolve(model, detach_layers, skip_layers=skip_layers, skip_stride=skip_stride,
                                         detach_depth=detach_depth, main_layer=main_layer)
    if is_applied(model):
        remove_detached_skip_links(model, keep_config=True)
    if new_layers is not None:
        adapter.set_feature_layers(new_layers)
    state = DSLState(family=type(adapter).__name__, spec=spec, detach_layers=detached, freeze_unused=freeze_unused)
    _attach(adapter, state)
    setattr(adapter.config, CONFIG_KEY, list(detached))
    adapter.inner.__dict__[_STATE] = state
    _APPLIED.add(adapter.inner)
    _install_peft_follow()
    return model


def remove_detached_skip_links(model: nn.Module, keep_config: bool = False) -> nn.Module:
    """Remove the hooks, unfreeze what ``apply_detached_skip_links`` froze, and clear ``config.dsl_detach_layers``
    (the model is then naive multi-layer fusion, also after saving)."""
    adapter = adapter_for(model)
    state = adapter.inner.__dict__.pop(_STATE, None)
    if state is not None:
        _detach_hooks(adapter.inner, state)
        _unfreeze(adapter.inner, state)
    _APPLIED.discard(adapter.inner)
    if not keep_config and hasattr(adapter.config, CONFIG_KEY):
        setattr(adapter.config, CONFIG_KEY, None)
    return model


# --------------------------------------------------------------------------------------------------
# PEFT modules_to_save applied after apply_detached_skip_links: the state follows into the trained copy
# --------------------------------------------------------------------------------------------------
_APPLIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # inner models that carry a state
_FOLLOW_HANDLE = None


def _follow_into_peft_copy(parent: nn.Module, name: str, module):
    """A module-registration hook: when PEFT sets a ``ModulesToSaveWrapper`` on a model with a state, the wrapper's
    copy (a deep copy, made trainable whole) gets the hooks and the freeze; the original keeps neither."""
    if module is None or not _APPLIED or not is_modules_to_save_wrapper(module):
        return None
    for inner in list(_APPLIED):
        state = inner.__dict__.get(_STATE)
        if state is None or not any(parent is m for m in inner.modules()):
            continue
        parent._modules[name] = module  # torch stores it right after this hook; the state needs it in place now
        _detach_hooks(inner, state)
        originals = peft_original_parameters(inner)
        state.frozen_params = [p for p in state.frozen_params if id(p) not in originals]
        state.frozen = []
        _attach(adapter_for(inner), state)
    return None


def _install_peft_follow() -> None:
    global _FOLLOW_HANDLE
    if _FOLLOW_HANDLE is None:
        _FOLLOW_HANDLE = torch.nn.modules.module.register_module_module_registration_hook(_follow_into_peft_copy)


# --------------------------------------------------------------------------------------------------
# The guard: a model whose config says DSL, trained without the hook, fails at its first training forward.
# --------------------------------------------------------------------------------------------------
_GUARD_HANDLE = None


def _guard(module, args):
    if type(module).__name__ not in INNER_NAMES and \
            not any(c.__name__ in INNER_NAMES for c in type(module).__mro__[1:]):
        return None
    if not module.training or not torch.is_grad_enabled():
        return None
    wanted = getattr(getattr(module, "config", None), CONFIG_KEY, None)
    if wanted and module.__dict__.get(_STATE) is None:
        raise DSLNotAppliedError(
            f"{type(module).__name__}: config.{CONFIG_KEY}={list(wanted)} asks for Detached Skip-Links, but no hook is "
            f"attached (hooks do not survive from_pretrained). Call "
            f"llava_dsl.hf.apply_detached_skip_links(model) after loading; to train naive fusion on purpose, call "
            f"llava_dsl.hf.remove_detached_skip_links(model) first")
    return None


def install_guard(enabled: bool = True) -> None:
    """Installed on import of ``llava_dsl.hf``: a global forward pre-hook that checks supported models only."""
    global _GUARD_HANDLE
    if enabled and _GUARD_HANDLE is None:
        _GUARD_HANDLE = torch.nn.modules.module.register_module_forward_pre_hook(_guard)
    elif not enabled and _GUARD_HANDLE is not None:
        _GUARD_HANDLE.remove()
        _GUARD_HANDLE = None


# --------------------------------------------------------------------------------------------------
# Helpers: the tower's own learning rate, LoRA outside the tower, a fresh config with the right list
# --------------------------------------------------------------------------------------------------
def _ids(modules) -> set:
    return {id(m) for root in modules for m in root.modules()}


def tower_parameter_names(model: nn.Module) -> List[str]:
    """Names (as ``model.named_parameters()`` gives them, wrappers included) of the trained vision tower's parameters;
    what the family adapter counts as projector (Qwen3-VL's mergers) is not tower."""
    adapter = adapter_for(model)
    projector = {id(p) for root in adapter.projector_roots() for p in root.parameters()}
    ids = {id(p) for p in adapter.tower().parameters() if id(p) not in projector}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def tower_param_groups(model: nn.Module, vision_tower_lr: float, weight_decay: float = 0.0,
                       decay_parameter_names: Optional[Sequence[str]] = None) -> List[Dict]:
    """Optimizer parameter groups: the trainable tower parameters with ``lr=vision_tower_lr``, the rest without an
    ``lr`` (the optimizer's default). Weight decay on ``decay_parameter_names`` only (all, when None)."""
    tower = set(tower_parameter_names(model))
    decay = None if decay_parameter_names is None else set(decay_parameter_names)
    groups: Dict[Tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name in tower, decay is None or name in decay)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_tower, decays), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if is_tower:
            group["lr"] = vision_tower_lr
        out.append(group)
    return out


class TowerLRMixin:
    """Mix into a ``transformers.Trainer`` (or TRL trainer) subclass: ``vision_tower_lr=`` gives the tower its own
    learning rate; the rest uses ``args.learning_rate``. ``class MyTrainer(TowerLRMixin, Trainer): pass``."""

    def __init__(self, *args, vision_tower_lr: Optional[float] = None, **kwargs):
        self.vision_tower_lr = vision_tower_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        if self.vision_tower_lr is None or getattr(self, "optimizer", None) is not None:
            return super().create_optimizer(*args, **kwargs)
        model = self.model
        decay = self.get_decay_parameter_names(model)
        groups = tower_param_groups(model, self.vision_tower_lr, self.args.weight_decay, decay)
        try:
            cls, kwargs_ = self.get_optimizer_cls_and_kwargs(self.args, model)
        except TypeError:
            cls, kwargs_ = self.get_optimizer_cls_and_kwargs(self.args)
        self.optimizer = cls(groups, **kwargs_)
        return self.optimizer


_LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_modules(model: nn.Module, names: Sequence[str] = _LM_LINEAR, include_projector: bool = False) -> List[str]:
    """Full module names for PEFT's ``target_modules``: the language model's Linear layers whose last name part is
    in ``names`` (and the projector's Linears with ``include_projector``), never a module of the vision tower.
    Full names, so PEFT's suffix match cannot reach the tower's ``q_proj``/``k_proj``... of the same name."""
    base = unwrap_model(model)
    adapter = adapter_for(base)
    projector_ids = _ids(adapter.projector_roots())
    tower_ids = _ids([adapter.tower_root()])
    out = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module) in projector_ids:
            if include_projector:
                out.append(name)
        elif id(module) not in tower_ids and name.split(".")[-1] in names:
            out.append(name)
    if not out:
        raise DSLError(f"{type(base).__name__}: no language-model Linear named {list(names)} found for LoRA")
    return out


def lora_target_regex(model: nn.Module, names: Sequence[str] = _LM_LINEAR) -> str:
    """The same choice as a regex for ``LoraConfig(target_modules=...)`` (PEFT full-matches a string)."""
    return "|".join(re.escape(n) for n in lora_target_modules(model, names))


def dsl_llava_config(vision_config, text_config, num_blocks: Optional[int] = None, main_layer: int = -2,
                     skip_layers=None, skip_stride: Optional[int] = None, detach_depth: Optional[int] = None,
                     next_model: bool = False, **kwargs):
    """A fresh ``LlavaConfig`` (or ``LlavaNextConfig``) whose ``vision_feature_layer`` is main + taps chosen by the
    LLaVA-1.5 plugin's rules, with ``dsl_detach_layers`` set: build the model from it, then
    ``apply_detached_skip_links(model)``."""
    from transformers import LlavaConfig, LlavaNextConfig

    if isinstance(vision_config, dict):
        n = num_blocks or vision_config.get("num_hidden_layers")
    else:
        n = num_blocks or vision_config.num_hidden_layers
    try:
        spec = resolve_layer_spec(int(n), main_layer, skip_layers=skip_layers, skip_stride=skip_stride,
                                  detach_depth=detach_depth)
    except LayerSpecError as e:
        raise DSLError(str(e)) from None
    cls = LlavaNextConfig if next_model else LlavaConfig
    config = cls(vision_config=vision_config, text_config=text_config, vision_feature_layer=list(spec.concat_order),
                 **kwargs)
    setattr(config, CONFIG_KEY, list(spec.detached_layers))
    return config
