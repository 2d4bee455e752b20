"""Detached Skip-Links injected into stock Hugging Face models (no fork of transformers, no ``llava`` import).

The stop-gradient sits where a skip is *consumed*:

* Llava / LLaVA-NeXT: ``get_image_features`` concatenates ``hidden_states[l]`` for ``l`` in the list
  ``config.vision_feature_layer``, in list order (CLS cropped per layer for the ``default`` strategy, or after the
  concat in LLaVA-NeXT: the channel layout is the same), and feeds it to ``multi_modal_projector``. A forward
  pre-hook on the projector detaches the channel slices of the detached taps. The vision tower's own outputs are
  never detached: a block's output also feeds the next block, so detaching it would cut the main path too.
* Qwen3-VL (DeepStack): block ``deepstack_visual_indexes[j]``'s output enters the language model through
  ``visual.deepstack_merger_list[j]``; a forward pre-hook detaches that merger's input.

Forward values are bit-identical to the model without the hook; only the backward differs.

Layer indices follow LLaVA's hidden-state convention (``llava_dsl.LayerSpec``): 0 = embeddings, i = output of
block i, negatives count from the end. For Qwen3-VL, ``deepstack_visual_indexes`` are 0-based block numbers, so
DeepStack index ``k`` is hidden-state index ``k + 1``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from llava_dsl import LayerSpec, LayerSpecError, resolve_layer_spec

logger = logging.getLogger("llava_dsl.hf")

CONFIG_KEY = "dsl_detach_layers"
_STATE = "_llava_dsl_state"
# outer class name -> (inner class name, family)
SUPPORTED = {
    "LlavaForConditionalGeneration": ("LlavaModel", "llava"),
    "LlavaNextForConditionalGeneration": ("LlavaNextModel", "llava"),
    "Qwen3VLForConditionalGeneration": ("Qwen3VLModel", "qwen3_vl"),
}
_INNER = {inner: family for inner, family in SUPPORTED.values()}
SUPPORTED_NAMES = ", ".join(list(SUPPORTED) + list(_INNER))


class DSLError(ValueError):
    """A Detached Skip-Links request that does not fit the model (names the value, the expectation, the source)."""


class DSLNotAppliedError(RuntimeError):
    """A model whose config asks for Detached Skip-Links is trained without the hook."""


@dataclass
class _Target:
    outer: nn.Module
    inner: nn.Module
    family: str
    config: object  # the multimodal config (LlavaConfig, LlavaNextConfig, Qwen3VLConfig)


@dataclass
class DSLState:
    """What ``apply_detached_skip_links`` attached to a model (kept on the inner model as ``_llava_dsl_state``)."""

    family: str
    spec: LayerSpec
    detach_layers: Tuple[int, ...]
    handles: list = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)  # parameter names this call set to requires_grad=False
    frozen_params: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Finding the parts of a model
# --------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP / DeepSpeed / accelerate wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel",
                                      "FullyShardedDataParallel") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
    return model


def _target(model: nn.Module) -> _Target:
    base = unwrap_model(model)
    for cls in type(base).__mro__:
        if cls.__name__ in SUPPORTED:
            inner_name, family = SUPPORTED[cls.__name__]
            inner = getattr(base, "model", None)
            if inner is None or not any(c.__name__ == inner_name for c in type(inner).__mro__):
                raise DSLError(f"{type(base).__name__}: expected its .model to be a {inner_name} (the layout of "
                               f"transformers >= 4.52); found {type(inner).__name__}")
            return _Target(base, inner, family, base.config)
        if cls.__name__ in _INNER:
            return _Target(base, base, _INNER[cls.__name__], base.config)
    raise DSLError(f"{type(base).__name__} is not supported by llava_dsl.hf.apply_detached_skip_links; supported "
                   f"model classes: {SUPPORTED_NAMES}")


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower module (Llava's ``vision_tower``, Qwen3-VL's ``visual``)."""
    t = _target(model)
    return t.inner.vision_tower if t.family == "llava" else t.inner.visual


def _num_blocks(t: _Target) -> int:
    vc = t.config.vision_config
    return int(vc.depth if t.family == "qwen3_vl" else vc.num_hidden_layers)


def _blocks(tower: nn.Module, num_blocks: int) -> Tuple[str, nn.ModuleList]:
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_blocks and \
                (name.endswith("encoder.layers") or name.endswith("blocks") or name.endswith("layers")):
            return name, module
    raise DSLError(f"{type(tower).__name__}: found no list of {num_blocks} blocks (encoder.layers or blocks)")


# --------------------------------------------------------------------------------------------------
# Resolving which layers are tapped and detached
# --------------------------------------------------------------------------------------------------
def _abs(index: int, num_blocks: int, source: str) -> int:
    value = index + num_blocks + 1 if index < 0 else index
    if not 0 <= value <= num_blocks:
        raise DSLError(f"{source}: layer {index} is out of range for a vision tower with {num_blocks} blocks "
                       f"(hidden-state indices 0..{num_blocks}, or -{num_blocks + 1}..-1 from the end)")
    return value


def _as_list(value, source: str) -> List[int]:
    if isinstance(value, str):
        value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
    try:
        return [int(str(v).strip()) for v in value]
    except (TypeError, ValueError):
        raise DSLError(f"{source}={value!r}: expected a list of integer hidden-state indices such as [3, 1]") from None


def _current_layers(t: _Target) -> Tuple[int, List[int]]:
    """(main, taps in the order they feed the model) as non-negative hidden-state indices."""
    n = _num_blocks(t)
    if t.family == "qwen3_vl":
        indexes = list(t.inner.visual.deepstack_visual_indexes)
        return n, [i + 1 for i in indexes]
    vfl = t.config.vision_feature_layer
    if isinstance(vfl, int):
        return _abs(vfl, n, f"config.vision_feature_layer={vfl}"), []
    layers = [_abs(v, n, f"config.vision_feature_layer={list(vfl)}") for v in vfl]
    return layers[0], layers[1:]


def _spec_from(t: _Target, main: int, taps: Sequence[int], detach_depth, source: str) -> LayerSpec:
    n = _num_blocks(t)
    if not taps:
        raise DSLError(f"{source}: a single feature layer ({main}) has no skip link to detach; Detached Skip-Links "
                       f"need config.vision_feature_layer to be a list (main layer first, then the taps), e.g. "
                       f"apply_detached_skip_links(model, skip_stride=...) or build the model with "
                       f"llava_dsl.hf.dsl_llava_config(...)")
    try:
        return resolve_layer_spec(n, main, skip_layers=list(taps), detach_depth=detach_depth)
    except LayerSpecError as e:
        raise DSLError(f"{source}: {e}") from None


def resolve(model: nn.Module, detach_layers=None, *, skip_layers=None, skip_stride=None, detach_depth=None,
            main_layer=None) -> Tuple[LayerSpec, Tuple[int, ...], Optional[List[int]]]:
    """(spec, detached hidden-state indices deep-first, new vision_feature_layer list or None if unchanged)."""
    t = _target(model)
    n = _num_blocks(t)
    main, taps = _current_layers(t)
    new_vfl = None
    choose_taps = skip_layers is not None or skip_stride is not None or main_layer is not None
    if choose_taps:
        want_main = main if main_layer is None else main_layer
        source = (f"skip_layers={skip_layers!r}, skip_stride={skip_stride!r}, main_layer={want_main!r}, "
                  f"detach_depth={detach_depth!r}")
        try:
            spec = resolve_layer_spec(n, want_main, skip_layers=skip_layers, skip_stride=skip_stride,
                                      detach_depth=detach_depth)
        except LayerSpecError as e:
            raise DSLError(f"{source}: {e}") from None
        if t.family == "qwen3_vl":
            if spec.main != main or sorted(spec.taps) != sorted(taps):
                raise DSLError(
                    f"{source}: Qwen3-VL's DeepStack taps are fixed by its mergers: main layer {main} (the last block) "
                    f"and taps {sorted(taps, reverse=True)} (deepstack_visual_indexes "
                    f"{list(t.inner.visual.deepstack_visual_indexes)} + 1); choose which of them to detach with "
                    f"detach_layers or detach_depth")
        else:
            current = [main] + taps
            wanted = list(spec.concat_order)
            if wanted != current:
                proj_in = t.inner.multi_modal_projector.linear_1.in_features
                hidden = t.config.vision_config.hidden_size
                if proj_in != hidden * len(wanted):
                    raise DSLError(
                        f"{source}: the layers {wanted} need a projector input of {len(wanted)} x {hidden} = "
                        f"{len(wanted) * hidden} channels, but multi_modal_projector.linear_1 takes {proj_in} "
                        f"(config.vision_feature_layer={t.config.vision_feature_layer!r}, {proj_in // hidden} layers); "
                        f"build a fresh model from llava_dsl.hf.dsl_llava_config(...) instead")
                new_vfl = wanted
                main, taps = spec.main, list(spec.taps)
    else:
        source = f"config.vision_feature_layer={getattr(t.config, 'vision_feature_layer', None)!r}"
        if t.family == "qwen3_vl":
            source = (f"Qwen3-VL deepstack_visual_indexes={list(t.inner.visual.deepstack_visual_indexes)} "
                      f"(hidden-state indices {taps})")
        spec = _spec_from(t, main, taps, detach_depth if detach_layers is None else None, source)

    if detach_layers is not None:
        source = f"detach_layers={list(detach_layers) if not isinstance(detach_layers, str) else detach_layers!r}"
        wanted = [_abs(v, n, source) for v in _as_list(detach_layers, "detach_layers")]
        if len(set(wanted)) != len(wanted):
            raise DSLError(f"{source}: duplicate layers (resolved against {n} blocks: {wanted})")
        for layer in wanted:
            if layer == main:
                raise DSLError(f"{source}: layer {layer} is the main layer (the first of the feature layers "
                               f"{[main] + taps}); detaching it would cut the main path. Expected a subset of the "
                               f"taps {taps}")
            if layer not in taps:
                raise DSLError(f"{source}: layer {layer} is not a tapped layer; expected a subset of the taps "
                               f"{taps} (feature layers {[main] + taps}, hidden-state indices, 0 = embeddings)")
        if detach_depth is not None and len(wanted) != detach_depth:
            raise DSLError(f"{source} and detach_depth={detach_depth} disagree; give one of them")
        detached = tuple(sorted(wanted, reverse=True))
    else:
        detached = tuple(spec.detached_layers)
    return spec, detached, new_vfl


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
def _projector_hook(hidden: int, num_layers: int, positions: Tuple[int, ...]):
    positions = frozenset(positions)

    def hook(module, args):
        if not args:
            raise DSLError("multi_modal_projector was called without a positional input; the Detached Skip-Links "
                           "hook expects the concatenated vision features as its first argument")
        x = args[0]
        if x.shape[-1] != hidden * num_layers:
            raise DSLError(f"multi_modal_projector input has {x.shape[-1]} channels, but the Detached Skip-Links hook "
                           f"was set up for {num_layers} layers x {hidden}; was vision_feature_layer changed (in the "
                           f"config or as a forward argument) after apply_detached_skip_links? Re-apply it.")
        pieces = list(x.split(hidden, dim=-1))
        for p in positions:
            pieces[p] = pieces[p].detach()
        return (torch.cat(pieces, dim=-1),) + tuple(args[1:])

    return hook


def _detach_input_hook(module, args):
    return (args[0].detach(),) + tuple(args[1:])


def _unused_modules(t: _Target, spec_main: int, layers: Sequence[int]) -> List[Tuple[str, nn.Module]]:
    """Tower modules no loss can reach: blocks deeper than the deepest feature layer, and Llava's post_layernorm
    (the pooled output is never used)."""
    if t.family != "llava":
        return []
    tower = t.inner.vision_tower
    n = _num_blocks(t)
    deepest = max(layers)
    prefix = "model.vision_tower." if t.outer is not t.inner else "vision_tower."
    name, blocks = _blocks(tower, n)
    out = [(f"{prefix}{name}.{i}", blocks[i]) for i in range(deepest, n)]
    for child_name in ("post_layernorm", "head"):
        for mod_name, module in tower.named_modules():
            if mod_name.split(".")[-1] == child_name:
                out.append((prefix + mod_name, module))
    return out


def is_applied(model: nn.Module) -> bool:
    return getattr(_target(model).inner, _STATE, None) is not None


def dsl_state(model: nn.Module) -> Optional[DSLState]:
    return getattr(_target(model).inner, _STATE, None)


def apply_detached_skip_links(model: nn.Module, detach_layers: Optional[Sequence[int]] = None, *,
                              skip_layers=None, skip_stride: Optional[int] = None, detach_depth: Optional[int] = None,
                              main_layer: Optional[int] = None, freeze_unused: bool = True) -> nn.Module:
    """Inject Detached Skip-Links into a stock model (in place; returns it).

    ``detach_layers``: hidden-state indices (LLaVA indexing) of the taps to detach; each must be one of the taps in
    ``config.vision_feature_layer`` (list, main layer first), never the main layer. ``skip_layers`` /
    ``skip_stride`` / ``main_layer``: choose the taps with the LLaVA-1.5 plugin's rules (they set
    ``config.vision_feature_layer`` to main + taps deep-first, when the projector's width fits). ``detach_depth``:
    detach that many of the shallowest taps. With no argument: the config's ``dsl_detach_layers`` (re-apply after
    ``from_pretrained``), else the default depth (the taps in the first half of the tower).

    The choice is written to ``config.dsl_detach_layers``, so ``save_pretrained`` keeps it. With
    ``freeze_unused``, tower modules no loss can reach (blocks deeper than the deepest feature layer,
    ``post_layernorm``) are frozen, which DDP needs; one log line names them.
    """
    t = _target(model)
    if detach_layers is None and skip_layers is None and skip_stride is None and detach_depth is None \
            and main_layer is None and getattr(t.config, CONFIG_KEY, None) is not None:
        detach_layers = list(getattr(t.config, CONFIG_KEY))
    spec, detached, new_vfl = resolve(model, detach_layers, skip_layers=skip_layers, skip_stride=skip_stride,
                                      detach_depth=detach_depth, main_layer=main_layer)
    if is_applied(model):
        remove_detached_skip_links(model, keep_config=True)
    if new_vfl is not None:
        t.config.vision_feature_layer = list(new_vfl)
    main, taps = _current_layers(t)
    state = DSLState(family=t.family, spec=spec, detach_layers=detached)
    if t.family == "llava":
        layers = [main] + taps
        hidden = t.config.vision_config.hidden_size
        proj_in = t.inner.multi_modal_projector.linear_1.in_features
        if proj_in != hidden * len(layers):
            raise DSLError(f"config.vision_feature_layer={t.config.vision_feature_layer!r} is {len(layers)} layers x "
                           f"{hidden} = {hidden * len(layers)} channels, but multi_modal_projector.linear_1 takes "
                           f"{proj_in}; the projector and the config disagree")
        positions = tuple(i for i, layer in enumerate(layers) if layer in detached)
        if detached:
            state.handles.append(t.inner.multi_modal_projector.register_forward_pre_hook(
                _projector_hook(hidden, len(layers), positions)))
        unused = _unused_modules(t, main, layers) if freeze_unused else []
    else:
        layers = [main] + taps
        for j, layer in enumerate(taps):
            if layer in detached:
                state.handles.append(t.inner.visual.deepstack_merger_list[j].register_forward_pre_hook(_detach_input_hook))
        unused = []
    frozen_modules = []
    for name, module in unused:
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            frozen_modules.append(name)
            for p in params:
                p.requires_grad_(False)
                state.frozen_params.append(p)
    state.frozen = frozen_modules
    if frozen_modules:
        logger.warning("llava_dsl.hf: froze %d vision-tower module(s) that no loss reaches (feature layers %s of a "
                       "%d-block tower; DDP fails on parameters without gradient): %s", len(frozen_modules), layers,
                       _num_blocks(t), ", ".join(frozen_modules))
    setattr(t.config, CONFIG_KEY, list(detached))
    t.inner.__dict__[_STATE] = state
    return model


def remove_detached_skip_links(model: nn.Module, keep_config: bool = False) -> nn.Module:
    """Remove the hooks, unfreeze what ``apply_detached_skip_links`` froze, and clear ``config.dsl_detach_layers``
    (the model is then naive multi-layer fusion, also after saving)."""
    t = _target(model)
    state = t.inner.__dict__.pop(_STATE, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        for p in state.frozen_params:
            p.requires_grad_(True)
    if not keep_config and hasattr(t.config, CONFIG_KEY):
        setattr(t.config, CONFIG_KEY, None)
    return model


# --------------------------------------------------------------------------------------------------
# The guard: a model whose config says DSL, trained without the hook, fails at its first training forward.
# --------------------------------------------------------------------------------------------------
_GUARD_HANDLE = None


def _guard(module, args):
    if type(module).__name__ not in _INNER and not any(c.__name__ in _INNER for c in type(module).__mro__[1:]):
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
def tower_parameter_names(model: nn.Module) -> List[str]:
    """Names (as ``model.named_parameters()`` gives them, wrappers included) of the vision tower's parameters.
    Qwen3-VL's mergers (``merger``, ``deepstack_merger_list``) count as projector, not tower."""
    t = _target(model)
    tower = vision_tower(model)
    ids = set()
    for name, p in tower.named_parameters():
        if t.family == "qwen3_vl" and (name.startswith("merger.") or name.startswith("deepstack_merger_list.")):
            continue
        ids.add(id(p))
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
    t = _target(base)
    tower = vision_tower(base)
    tower_ids = {id(m) for m in tower.modules()}
    if t.family == "qwen3_vl":  # the mergers are the projector
        tower_ids -= {id(m) for m in t.inner.visual.merger.modules()}
        tower_ids -= {id(m) for m in t.inner.visual.deepstack_merger_list.modules()}
    projector = t.inner.multi_modal_projector if t.family == "llava" else None
    proj_ids = set() if projector is None else {id(m) for m in projector.modules()}
    out = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in tower_ids:
            continue
        if t.family == "qwen3_vl" and name.startswith(("model.visual.", "visual.")):
            if include_projector:
                out.append(name)
            continue
        if id(module) in proj_ids:
            if include_projector:
                out.append(name)
            continue
        if name.split(".")[-1] in names:
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
