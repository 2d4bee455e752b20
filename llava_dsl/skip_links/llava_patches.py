"""Detached Skip-Links inside LLaVA-1.5: the multi-layer tower, the projector builder, vision-module
initialisation (resolve and persist the layer spec, shape-checked adapter loading), joint training of the tower
with its own learning rate, and the flags. ``PATCHES`` lists the names this feature swaps inside ``llava``; ``initialize_vision_modules`` is swapped by
``llava_dsl.plugin``, which composes it with DPVR's routing."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import llava.model.llava_arch as llava_arch
import llava.model.multimodal_encoder.builder as encoder_builder
import llava.model.multimodal_projector.builder as projector_builder
import torch
import torch.nn as nn
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

from llava_dsl.compat.distributed import print_once
from llava_dsl.skip_links.adapter import load_projector_adapter
from llava_dsl.skip_links.clip_taps import clip_hidden_states
from llava_dsl.skip_links.fusion import fuse_layers
from llava_dsl.skip_links.layer_spec import LayerSpec, LayerSpecError, absolute_layer, resolve_layer_spec
from llava_dsl.skip_links.projectors import projector_type

_UPSTREAM_BUILD_VISION_PROJECTOR = projector_builder.build_vision_projector

_UPSTREAM_INITIALIZE_VISION_MODULES = llava_arch.LlavaMetaModel.initialize_vision_modules


@dataclass
class SkipLinkModelArguments:
    """The layer flags, mixed into the plugin's ModelArguments (persisted into the model config)."""

    mm_vision_skip_layers: Optional[str] = field(default=None, metadata={
        "help": "Tapped vision-tower layers, e.g. '6,12,18' (hidden-state indices; 0 = embeddings, i = block i)."})
    mm_vision_skip_stride: Optional[int] = field(default=None, metadata={
        "help": "Tap every S-th block below the main layer (S, 2S, ...). Default: depth // 4."})
    mm_vision_detach_depth: Optional[int] = field(default=None, metadata={
        "help": "How many of the shallowest taps get stop-gradient (detached types). Default: taps in the first half."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={
        "help": "Train the vision tower jointly (stage 2). Its weights are saved with the model."})


@dataclass
class JointTrainingArguments:
    """The joint-training flag, mixed into the plugin's TrainingArguments."""

    mm_vision_tower_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the vision tower when it is unfrozen (default: --learning_rate)."})


def resolve_spec_for(args, num_blocks: int) -> Optional[LayerSpec]:
    """The LayerSpec that ``args`` (train flags or a model config) ask for; None for LLaVA's own types."""
    kind = projector_type(getattr(args, "mm_projector_type", None))
    skip_layers, stride, detach_depth = (getattr(args, name, None) for name in (
        "mm_vision_skip_layers", "mm_vision_skip_stride", "mm_vision_detach_depth"))
    if kind is None or not kind.multilayer:
        given = {"--mm_vision_skip_layers": skip_layers, "--mm_vision_skip_stride": stride,
                 "--mm_vision_detach_depth": detach_depth}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            raise LayerSpecError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())} given with "
                f"--mm_projector_type {getattr(args, 'mm_projector_type', None)!r}, which reads a single layer; "
                f"use mlp_multilayer or detached_mlp_multilayer")
        return None
    return resolve_layer_spec(num_blocks, args.mm_vision_select_layer, skip_layers, stride, detach_depth,
                              detach=kind.detached)


class MultiLayerCLIPVisionTower(CLIPVisionTower):
    """LLaVA's CLIPVisionTower that can return the fused multi-layer feature and can be trained.

    For LLaVA's own projector types with a frozen tower it is the upstream tower, call for call.
    """

    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__(vision_tower, args, delay_load)
        self.layer_spec = resolve_spec_for(args, self.config.num_hidden_layers)

    def load_model(self, device_map=None):
        # A trained tower is built eagerly while LLaVA's loader holds the model on the meta device; the
        # pretrained weights it reads are discarded (the checkpoint's trained weights fill the tower next), and
        # torch warns once per tensor about exactly that.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            super().load_model(device_map=device_map)

    keep_full_precision = False  # set for a trainable tower beside an fp32 LLM

    def to(self, *args, **kwargs):
        # LLaVA's train() casts the tower to fp16 whenever bf16 is off; that would round a trainable tower's
        # fp32 weights before the first step, so such a tower only moves device.
        if self.keep_full_precision:
            args = tuple(a for a in args if not isinstance(a, torch.dtype))
            kwargs.pop("dtype", None)
        return super().to(*args, **kwargs)

    @property
    def trainable(self) -> bool:
        return self.is_loaded and any(p.requires_grad for p in self.vision_tower.parameters())

    def forward(self, images):
        if self.layer_spec is None and not self.trainable:
            return super().forward(images)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            if isinstance(images, list):
                return [self._features(image.unsqueeze(0)).to(image.dtype) for image in images]
            return self._features(images).to(images.dtype)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(device=self.device, dtype=self.dtype)
        if self.layer_spec is None:
            main = absolute_layer(self.select_layer, self.config.num_hidden_layers, "mm_vision_select_layer",
                                  self.select_layer)
            features = clip_hidden_states(self.vision_tower, pixels, [main])[main]
        else:
            states = clip_hidden_states(self.vision_tower, pixels, self.layer_spec.concat_order)
            features = fuse_layers(states, self.layer_spec)
        if self.select_feature == "patch":
            return features[:, 1:]
        if self.select_feature == "cls_patch":
            return features
        raise ValueError(f"mm_vision_select_feature={self.select_feature!r}: expected 'patch' or 'cls_patch'")


def build_vision_projector(config, delay_load=False, **kwargs):
    """LLaVA's builder, plus the registered types it does not know (``projectors.KINDS``)."""
    kind = projector_type(getattr(config, "mm_projector_type", None))
    if kind is None or kind.build is None:
        return _UPSTREAM_BUILD_VISION_PROJECTOR(config, delay_load=delay_load, **kwargs)
    return kind.build(config, kind.depth)


def _tower_depth(vision_tower_name: str) -> int:
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig.from_pretrained(vision_tower_name).num_hidden_layers


def initialize_vision_modules(self, model_args, fsdp=None):
    existing = self.get_vision_tower()
    num_blocks = existing.config.num_hidden_layers if existing is not None else _tower_depth(model_args.vision_tower)
    spec = resolve_spec_for(model_args, num_blocks)  # fails fast, before any weights are loaded
    if existing is not None and getattr(self, "mm_projector", None) is not None:
        built = getattr(existing, "layer_spec", None)
        built_layers = list(built.concat_order) if built else [existing.select_layer]
        asked_layers = list(spec.concat_order) if spec else [model_args.mm_vision_select_layer]
        if built_layers != asked_layers:
            raise LayerSpecError(
                f"{model_args.model_name_or_path} was built with mm_projector_type="
                f"{getattr(self.config, 'mm_projector_type', None)!r} over vision layers {built_layers}, but the "
                f"flags ask for --mm_projector_type {model_args.mm_projector_type!r} over {asked_layers}; "
                f"the projector's input width depends on them")
    self.config.mm_vision_skip_layers = list(spec.taps) if spec else None
    self.config.mm_vision_detach_depth = spec.detach_depth if spec else None
    self.config.unfreeze_mm_vision_tower = bool(getattr(model_args, "unfreeze_mm_vision_tower", False))
    if existing is not None and spec is not None:
        existing.layer_spec = spec  # same layers, possibly another detach depth for this stage
    layers = (f"vision layers {list(spec.concat_order)} (main, then taps deep to shallow), stop-gradient on "
              f"{list(spec.detached_layers) or 'none'}") if spec else f"vision layer {model_args.mm_vision_select_layer}"
    print_once(
        f"llava_dsl: projector {model_args.mm_projector_type} over {layers}; vision tower "
        f"{'trainable' if self.config.unfreeze_mm_vision_tower else 'frozen'}; "
        f"attention {getattr(self.config, '_attn_implementation', None)}")

    upstream_args = dataclasses.replace(model_args, pretrain_mm_mlp_adapter=None)
    _UPSTREAM_INITIALIZE_VISION_MODULES(self, upstream_args, fsdp=fsdp)
    tower = self.get_vision_tower()
    if isinstance(tower, MultiLayerCLIPVisionTower):
        tower.keep_full_precision = self.config.unfreeze_mm_vision_tower and self.dtype == torch.float32
    if model_args.pretrain_mm_mlp_adapter is not None:
        load_projector_adapter(self.mm_projector, model_args.pretrain_mm_mlp_adapter,
                               getattr(self.config, "mm_projector_type", None))


def vision_tower_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, CLIPVisionTower) for p in m.parameters()]


def prepare_joint_training(model: nn.Module, args) -> None:
    """Unfreeze the tower if the config asks for it; persist the tower learning rate.

    Runs when the Trainer is built: the last point where train() has finished preparing the model.
    """
    config = model.config
    unfreeze = bool(getattr(config, "unfreeze_mm_vision_tower", False))
    tower_lr = getattr(args, "mm_vision_tower_lr", None)
    if unfreeze and getattr(args, "tune_mm_mlp_adapter", False):
        raise ValueError(
            "--unfreeze_mm_vision_tower True with --tune_mm_mlp_adapter True: tune_mm_mlp_adapter trains and saves "
            "only the projector (stage 1), so a trained tower would be lost; unfreeze the tower in stage 2")
    if tower_lr is not None and not unfreeze:
        raise ValueError(f"--mm_vision_tower_lr={tower_lr} given but the vision tower is frozen; "
                         f"add --unfreeze_mm_vision_tower True")
    config.mm_vision_tower_lr = tower_lr
    if not unfreeze:
        return
    for tower in (m for m in model.modules() if isinstance(m, CLIPVisionTower)):
        tower.vision_tower.requires_grad_(True)


def split_param_groups(groups: List[Dict], selected: set, lr: float) -> List[Dict]:
    """Move the parameters whose id is in ``selected`` into copies of their groups with learning rate ``lr``."""
    result, moved = [], []
    for group in groups:
        keep = [p for p in group["params"] if id(p) not in selected]
        take = [p for p in group["params"] if id(p) in selected]
        result.append({**group, "params": keep})
        if take:
            moved.append({**group, "params": take, "lr": lr})
    return result + moved


class JointTrainingMixin:
    """Trainer mixin: the unfrozen tower's parameters get their own optimizer group at --mm_vision_tower_lr."""

    def create_optimizer(self):
        optimizer = super().create_optimizer()
        lr = getattr(self.args, "mm_vision_tower_lr", None)
        if lr is None or getattr(optimizer, "_llava_dsl_grouped", False):
            return optimizer
        selected = {id(p) for p in vision_tower_parameters(self.model) if p.requires_grad}
        groups = split_param_groups(optimizer.param_groups, selected, lr)
        optimizer.param_groups.clear()
        for group in groups:
            if group["params"]:
                optimizer.param_groups.append(group)
        optimizer._llava_dsl_grouped = True
        return optimizer


PATCHES = (
    (projector_builder, "build_vision_projector", build_vision_projector,
     "the projector builder is an if/regex chain with no registry"),
    (llava_arch, "build_vision_projector", build_vision_projector,
     "llava_arch imported the builder by name, so the module attribute alone is not enough"),
    (encoder_builder, "CLIPVisionTower", MultiLayerCLIPVisionTower,
     "build_vision_tower looks the tower class up at call time; ours returns fused layers and can train"),
)
