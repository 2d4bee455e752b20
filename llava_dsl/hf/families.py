"""One adapter class per model family: every fact about where a stock model keeps its parts.

An adapter knows, for its family: the vision tower and its blocks, the projector (or the DeepStack mergers), the
feature layers it reads today (main and taps), where a stop-gradient goes so that it cuts only the skip path, the
tower modules no loss reaches, which parameters count as tower and which as projector (the tower's learning rate,
LoRA's exclusions), and what PEFT's ``modules_to_save`` needs. ``core``, ``sft``, ``diagnostics`` and ``rprobe`` ask
the adapter; none of them branches on the family. A new family is one class here plus its line in ``ADAPTERS``
(as PEFT keeps one per-architecture table of target modules).

Layer indices follow LLaVA's hidden-state convention (``llava_dsl.LayerSpec``): 0 = embeddings, i = output of block
i, negatives count from the end.

Where the tower or the projector sits in a PEFT ``ModulesToSaveWrapper`` (``modules_to_save``), every fact refers to
the copy that trains (the active adapter's), never to the frozen original.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Type

from torch import nn

from llava_dsl.skip_links.layer_spec import LayerSpec, LayerSpecError, absolute_layer


class DSLError(ValueError):
    """A Detached Skip-Links request that does not fit the model (names the value, the expectation, the source)."""


# --------------------------------------------------------------------------------------------------
# Wrappers: the model inside them, the module that trains inside PEFT's modules_to_save
# --------------------------------------------------------------------------------------------------
_WRAPPERS = ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel", "FullyShardedDataParallel")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP / DeepSpeed / accelerate / ``torch.compile`` wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile(model)
        elif type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
    return model


def is_modules_to_save_wrapper(module: nn.Module) -> bool:
    """PEFT's ``ModulesToSaveWrapper`` (a frozen ``original_module`` beside one trained copy per adapter)."""
    return isinstance(module.__dict__.get("_modules", {}).get("modules_to_save"), nn.ModuleDict) and \
        "original_module" in module.__dict__.get("_modules", {})


def active(module: nn.Module) -> nn.Module:
    """The module that runs and trains: inside a PEFT ``modules_to_save`` wrapper, the active adapter's copy;
    otherwise ``module`` itself."""
    if not is_modules_to_save_wrapper(module):
        return module
    if getattr(module, "disable_adapters", False):
        return module.original_module  # PEFT runs the original while adapters are disabled
    copies = module.modules_to_save
    names = getattr(module, "active_adapters", None) or []
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name in copies:
            return copies[name]
    return module.original_module


def peft_original_parameters(root: nn.Module) -> set:
    """ids of the parameters PEFT keeps frozen as ``original_module`` of a ``modules_to_save`` wrapper."""
    out = set()
    for module in root.modules():
        if is_modules_to_save_wrapper(module):
            out.update(id(p) for p in module.original_module.parameters())
    return out


# --------------------------------------------------------------------------------------------------
# The adapters
# --------------------------------------------------------------------------------------------------
@dataclass
class DetachPoint:
    """A module whose first input is where a skip is consumed. ``positions`` None: detach the whole input; else the
    channel slices (each ``width`` wide, ``count`` of them) at these positions."""

    module: nn.Module
    positions: Optional[Tuple[int, ...]] = None
    width: int = 0
    count: int = 0


def _absolute(index: int, num_blocks: int, flag: str, value) -> int:
    try:
        return absolute_layer(index, num_blocks, flag, value)
    except LayerSpecError as e:
        raise DSLError(str(e)) from None


class FamilyAdapter:
    """The facts of one model family. ``outer``: the ``...ForConditionalGeneration`` model (or the inner model when
    that is what was given); ``inner``: the model holding tower, projector and language model."""

    outer_name: str = ""
    inner_name: str = ""
    fixed_taps = False  # the taps are fixed by the architecture (only which of them to detach can be chosen)
    channel_slices = False  # the projector reads main and taps as channel slices of one input (gradient split)
    no_channel_slices = "its projector does not read the feature layers as channel slices of one input"
    token_per_patch = False  # one visual token per square image patch of one fixed-size image (R-Probe)
    no_token_per_patch = "its visual tokens are not one per square patch of one fixed-size image"

    def __init__(self, outer: nn.Module, inner: nn.Module):
        self.outer, self.inner, self.config = outer, inner, outer.config

    @property
    def name(self) -> str:
        return type(self.outer).__name__

    # where the parts are --------------------------------------------------------------------------
    def tower(self) -> nn.Module:
        """The vision tower that trains."""
        return active(self.tower_root())

    def tower_root(self) -> nn.Module:
        """The tower's attribute on the model as it is (a PEFT wrapper included): every module under it is tower."""
        raise NotImplementedError

    def projector_roots(self) -> List[nn.Module]:
        """Modules that count as projector (even where they sit inside the tower)."""
        raise NotImplementedError

    def num_blocks(self) -> int:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        """The tower's transformer blocks (block i = hidden-state index i + 1)."""
        raise NotImplementedError

    # which layers are read ------------------------------------------------------------------------
    def feature_layers(self) -> Tuple[int, List[int]]:
        """(main, taps in the order they feed the model) as non-negative hidden-state indices."""
        raise NotImplementedError

    def layer_source(self) -> str:
        """Where the feature layers come from, for messages (the config key and its value)."""
        raise NotImplementedError

    def new_feature_layers(self, spec: LayerSpec, source: str) -> Optional[List[int]]:
        """The feature-layer list that reads ``spec``'s layers, None when the model reads them already; a DSLError
        when the model cannot read them."""
        raise NotImplementedError

    def set_feature_layers(self, layers: Sequence[int]) -> None:
        raise NotImplementedError

    # the stop-gradient and the modules no loss reaches ------------------------------------------------
    def detach_points(self, detached: Sequence[int]) -> List[DetachPoint]:
        raise NotImplementedError

    def unused_modules(self) -> List[nn.Module]:
        """Tower modules no loss can reach (DDP needs them frozen)."""
        return []

    def modules_to_save(self, train_tower: bool) -> List[str]:
        """PEFT ``modules_to_save`` for a LoRA run on the language model: the projector, and the tower if it trains."""
        raise NotImplementedError


def _blocks_in(tower: nn.Module, num_blocks: int) -> nn.ModuleList:
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_blocks and \
                (name.endswith("encoder.layers") or name.endswith("blocks") or name.endswith("layers")):
            return module
    raise DSLError(f"{type(tower).__name__}: found no list of {num_blocks} blocks (encoder.layers or blocks)")


class ConcatProjectorFamily(FamilyAdapter):
    """A CLIP-like tower whose listed hidden states are concatenated on the channel axis, in list order, and fed
    to ``multi_modal_projector``: the stop-gradient detaches the detached taps' channel slices of that input."""

    channel_slices = True
    layers_key = "vision_feature_layer"

    def tower_root(self):
        return self.inner.vision_tower

    def projector(self) -> nn.Module:
        return active(self.inner.multi_modal_projector)

    def projector_roots(self):
        return [self.inner.multi_modal_projector]

    def num_blocks(self):
        return int(self.config.vision_config.num_hidden_layers)

    def blocks(self):
        return _blocks_in(self.tower(), self.num_blocks())

    def listed_layers(self) -> List[int]:
        """The configured feature layers, non-negative, in concat order."""
        value = getattr(self.config, self.layers_key)
        n = self.num_blocks()
        if isinstance(value, int):
            return [_absolute(value, n, f"config.{self.layers_key}", value)]
        return [_absolute(v, n, f"config.{self.layers_key}", list(value)) for v in value]

    def main_of(self, listed: List[int]) -> int:
        raise NotImplementedError

    def feature_layers(self):
        listed = self.listed_layers()
        main = self.main_of(listed)
        return main, [layer for layer in listed if layer != main]

    def layer_source(self):
        value = getattr(self.config, self.layers_key)
        return f"config.{self.layers_key}={list(value) if not isinstance(value, int) else value!r}"

    def _projector_width(self) -> int:
        return self.projector().linear_1.in_features

    def new_feature_layers(self, spec, source):
        main, taps = self.feature_layers()
        wanted = list(spec.concat_order)
        if spec.main == main and sorted(spec.taps) == sorted(taps):
            return None
        width, hidden = self._projector_width(), self.config.vision_config.hidden_size
        if width != hidden * len(wanted):
            raise DSLError(
                f"{source}: the layers {wanted} need a projector input of {len(wanted)} x {hidden} = "
                f"{len(wanted) * hidden} channels, but multi_modal_projector.linear_1 takes {width} "
                f"({self.layer_source()}, {width // hidden} layers); build a fresh model from "
                f"llava_dsl.hf.dsl_llava_config(...) instead")
        return wanted

    def set_feature_layers(self, layers):
        setattr(self.config, self.layers_key, list(layers))

    def detach_points(self, detached):
        listed = self.listed_layers()
        hidden = self.config.vision_config.hidden_size
        width = self._projector_width()
        if width != hidden * len(listed):
            raise DSLError(f"{self.layer_source()} is {len(listed)} layers x {hidden} = {hidden * len(listed)} "
                           f"channels, but multi_modal_projector.linear_1 takes {width}; the projector and the "
                           f"config disagree")
        positions = tuple(i for i, layer in enumerate(listed) if layer in detached)
        if not positions:
            return []
        return [DetachPoint(self.projector(), positions, hidden, len(listed))]

    def unused_modules(self):
        """The blocks above the deepest feature layer, and the tower's pooled-output parts (never read)."""
        tower = self.tower()
        blocks = self.blocks()
        out = list(blocks)[max(self.listed_layers()):]
        out += [m for name, m in tower.named_modules() if name.split(".")[-1] in ("post_layernorm", "head")]
        return out

    def modules_to_save(self, train_tower):
        return ["multi_modal_projector"] + (["vision_tower"] if train_tower else [])


class LlavaFamily(ConcatProjectorFamily):
    """``LlavaForConditionalGeneration``: ``config.vision_feature_layer`` lists the main layer first (the order
    transformers' Llava and the LLaVA-1.5 plugin's export use), then the taps."""

    outer_name, inner_name = "LlavaForConditionalGeneration", "LlavaModel"
    token_per_patch = True

    def main_of(self, listed):
        return listed[0]


class LlavaNextFamily(LlavaFamily):
    """``LlavaNextForConditionalGeneration``: Llava's layer list; the ``default`` strategy crops CLS after the
    concat instead of per layer, which leaves the channel layout the same. Anyres tiles: no token per patch."""

    outer_name, inner_name = "LlavaNextForConditionalGeneration", "LlavaNextModel"
    token_per_patch = False
    no_token_per_patch = "LLaVA-NeXT's anyres tiles do not map a token to one patch of one image"


class VipLlavaFamily(ConcatProjectorFamily):
    """``VipLlavaForConditionalGeneration``: ``config.vision_feature_layers`` (default ``[-2, -5, -8, -11, 6]``) are
    concatenated in list order, CLS cropped per layer, into a projector that starts with a LayerNorm over all
    channels. The main layer is the *deepest* listed one (the default's ``-2``, LLaVA's usual select layer); the list
    carries no main-first convention, so a layer list in any order never detaches its deepest feature. The
    stop-gradient acts on the projector's input, before the LayerNorm mixes the slices."""

    outer_name, inner_name = "VipLlavaForConditionalGeneration", "VipLlavaModel"
    layers_key = "vision_feature_layers"  # transformers 5 maps it onto vision_feature_layer
    no_token_per_patch = "R-Probe reads tokens through Llava's get_image_features arguments, not VipLlava's"

    def main_of(self, listed):
        return max(listed)


class Qwen3VLFamily(FamilyAdapter):
    """``Qwen3VLForConditionalGeneration`` (DeepStack): block ``deepstack_visual_indexes[j]``'s output enters the
    language model through ``visual.deepstack_merger_list[j]``; the main feature is the last block, through
    ``visual.merger``. ``deepstack_visual_indexes`` are 0-based block numbers, so entry ``k`` is hidden-state index
    ``k + 1``. The mergers count as projector, not tower."""

    outer_name, inner_name = "Qwen3VLForConditionalGeneration", "Qwen3VLModel"
    fixed_taps = True
    no_channel_slices = "Qwen3-VL feeds its DeepStack taps through separate mergers"
    no_token_per_patch = "Qwen3-VL's merged patches do not map a token to one patch"

    def tower_root(self):
        return self.inner.visual

    def projector_roots(self):
        return [self.tower().merger, self.tower().deepstack_merger_list]

    def num_blocks(self):
        return int(self.config.vision_config.depth)

    def blocks(self):
        return self.tower().blocks

    def feature_layers(self):
        return self.num_blocks(), [i + 1 for i in self.tower().deepstack_visual_indexes]

    def layer_source(self):
        return (f"Qwen3-VL deepstack_visual_indexes={list(self.tower().deepstack_visual_indexes)} "
                f"(hidden-state indices {self.feature_layers()[1]})")

    def new_feature_layers(self, spec, source):
        main, taps = self.feature_layers()
        if spec.main != main or sorted(spec.taps) != sorted(taps):
            raise DSLError(
                f"{source}: Qwen3-VL's DeepStack taps are fixed by its mergers: main layer {main} (the last block) "
                f"and taps {sorted(taps, reverse=True)} (deepstack_visual_indexes "
                f"{list(self.tower().deepstack_visual_indexes)} + 1); choose which of them to detach with "
                f"detach_layers or detach_depth")
        return None

    def set_feature_layers(self, layers):
        raise DSLError(f"{self.name}: the DeepStack taps are fixed by the mergers")

    def detach_points(self, detached):
        mergers = self.tower().deepstack_merger_list
        return [DetachPoint(mergers[j]) for j, layer in enumerate(self.feature_layers()[1]) if layer in detached]

    def modules_to_save(self, train_tower):
        return ["visual"] if train_tower else []  # the mergers live inside visual


FAMILIES: Tuple[Type[FamilyAdapter], ...] = (LlavaFamily, LlavaNextFamily, VipLlavaFamily, Qwen3VLFamily)
# class name (the ForConditionalGeneration model, or its inner model) -> adapter
ADAPTERS: Dict[str, Type[FamilyAdapter]] = {
    **{f.outer_name: f for f in FAMILIES}, **{f.inner_name: f for f in FAMILIES}}
INNER_NAMES = frozenset(f.inner_name for f in FAMILIES)
SUPPORTED_NAMES = ", ".join(ADAPTERS)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The family adapter of a stock model (PEFT / DDP / DeepSpeed / compile wrapped or not); a DSLError naming the
    supported classes for anything else."""
    base = unwrap_model(model)
    for cls in type(base).__mro__:
        family = ADAPTERS.get(cls.__name__)
        if family is None:
            continue
        if cls.__name__ == family.inner_name:
            return family(base, base)
        inner = getattr(base, "model", None)
        if inner is None or not any(c.__name__ == family.inner_name for c in type(inner).__mro__):
            raise DSLError(f"{type(base).__name__}: expected its .model to be a {family.inner_name} (the layout of "
                           f"transformers >= 4.52); found {type(inner).__name__}")
        return family(base, inner)
    raise DSLError(f"{type(base).__name__} is not supported by llava_dsl.hf.apply_detached_skip_links; supported "
                   f"model classes: {SUPPORTED_NAMES}")
