"""Every touch of the ``llava`` package's internals, in one place.

``register()`` swaps a handful of names inside the installed ``llava`` modules; each swap is listed in
``PATCHES`` with the reason it is needed. Nothing in ``llava`` is edited on disk, and LLaVA's own
``train()``, data pipeline, trainer and savers keep doing their work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import llava.model.llava_arch as llava_arch
import llava.model.multimodal_encoder.builder as encoder_builder
import llava.model.multimodal_projector.builder as projector_builder
import llava.train.train as llava_train
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.train.llava_trainer import LLaVATrainer

from . import dpvr_integration, safety
from .fusion import build_multilayer_mlp, clip_hidden_states, fuse_layers, parse_projector_type
from .grad_stats import attach_grad_stats
from .layer_spec import LayerSpec, LayerSpecError, resolve_layer_spec
from .safety import SafetyTrainerMixin, save_adapter

_UPSTREAM_BUILD_VISION_PROJECTOR = projector_builder.build_vision_projector
_UPSTREAM_INITIALIZE_VISION_MODULES = llava_arch.LlavaMetaModel.initialize_vision_modules
_UPSTREAM_SAFE_SAVE = llava_train.safe_save_model_for_hf_trainer
_UPSTREAM_LLAVA_LLAMA = llava_train.LlavaLlamaForCausalLM

# Config keys this plugin writes; a checkpoint reloads into the same architecture from them alone.
CONFIG_KEYS = ("mm_vision_skip_layers", "mm_vision_detach_depth", "unfreeze_mm_vision_tower", "mm_vision_tower_lr")


# --------------------------------------------------------------------------------------------------
# Flags: LLaVA's dataclasses plus ours. train() builds its HfArgumentParser from these module globals.
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments(llava_train.ModelArguments, dpvr_integration.DPVRArguments):
    mm_vision_skip_layers: Optional[str] = field(default=None, metadata={
        "help": "Tapped vision-tower layers, e.g. '6,12,18' (hidden-state indices; 0 = embeddings, i = block i)."})
    mm_vision_skip_stride: Optional[int] = field(default=None, metadata={
        "help": "Tap every S-th block below the main layer (S, 2S, ...). Default: depth // 4."})
    mm_vision_detach_depth: Optional[int] = field(default=None, metadata={
        "help": "How many of the shallowest taps get stop-gradient (detached types). Default: taps in the first half."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={
        "help": "Train the vision tower jointly (stage 2). Its weights are saved with the model."})


@dataclass
class TrainingArguments(llava_train.TrainingArguments):
    mm_vision_tower_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the vision tower when it is unfrozen (default: --learning_rate)."})
    dsl_grad_stats_every: int = field(default=0, metadata={
        "help": "Split the vision tower's gradient into main and skip parts every N optimizer steps (0: off); "
                "docs/diagnostics.md."})
    dsl_grad_stats_dense_steps: int = field(default=0, metadata={
        "help": "Also measure every one of the first K optimizer steps (the paper's early-training regime)."})
    dsl_grad_stats_window: int = field(default=10, metadata={
        "help": "Measured steps per statistics window (tr(Cov), SNR, mean cosine)."})
    rprobe_aux_weight: float = field(default=0.0, metadata={
        "help": "Add this weight x R-Probe pixel MSE to the LM loss (docs/rprobe.md); 0 = off, training unchanged."})


def _layer_flags(args) -> Tuple:
    return (getattr(args, "mm_vision_skip_layers", None), getattr(args, "mm_vision_skip_stride", None),
            getattr(args, "mm_vision_detach_depth", None))


def resolve_spec_for(args, num_blocks: int) -> Optional[LayerSpec]:
    """The LayerSpec that ``args`` (train flags or a model config) ask for; None for LLaVA's own types."""
    kind = parse_projector_type(getattr(args, "mm_projector_type", None))
    skip_layers, stride, detach_depth = _layer_flags(args)
    if kind is None:
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


# --------------------------------------------------------------------------------------------------
# Vision tower: multi-layer features, trainable when unfrozen.
# --------------------------------------------------------------------------------------------------
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
            main = self.select_layer + self.config.num_hidden_layers + 1 if self.select_layer < 0 else self.select_layer
            features = clip_hidden_states(self.vision_tower, pixels, [main])[main]
        else:
            states = clip_hidden_states(self.vision_tower, pixels, self.layer_spec.concat_order)
            features = fuse_layers(states, self.layer_spec)
        if self.select_feature == "patch":
            return features[:, 1:]
        if self.select_feature == "cls_patch":
            return features
        raise ValueError(f"mm_vision_select_feature={self.select_feature!r}: expected 'patch' or 'cls_patch'")


# --------------------------------------------------------------------------------------------------
# Projector builder.
# --------------------------------------------------------------------------------------------------
def build_vision_projector(config, delay_load=False, **kwargs):
    """LLaVA's builder, plus the multilayer types (which read the persisted layer spec from the config)."""
    kind = parse_projector_type(getattr(config, "mm_projector_type", None))
    if kind is None:
        return _UPSTREAM_BUILD_VISION_PROJECTOR(config, delay_load=delay_load, **kwargs)
    taps = getattr(config, "mm_vision_skip_layers", None)
    if not taps:
        raise LayerSpecError(
            f"config has mm_projector_type={kind.name!r} but no mm_vision_skip_layers; a multilayer checkpoint "
            f"records its tapped layers in config.json (was it written without llava_dsl?)")
    return build_multilayer_mlp(config.mm_hidden_size, 1 + len(taps), config.hidden_size, kind.mlp_depth)


# --------------------------------------------------------------------------------------------------
# initialize_vision_modules: resolve + persist the layer spec, ZeRO-3-safe adapter loading.
# --------------------------------------------------------------------------------------------------
def _print_once(message: str) -> None:
    """Print on the first rank only (LLaVA's rank0_print stays silent in single-process runs)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


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
    _print_once(
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
    dpvr_integration.configure_routing(self, model_args)  # side branch + routing keys (--mm_routing dpvr_lf)


def _shape(param: torch.Tensor) -> Tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave param.shape == (0,)


def load_projector_adapter(projector: nn.Module, path: str, projector_type: Optional[str]) -> None:
    """Load a stage-1 ``mm_projector.bin``; shape-checked, and safe for ZeRO-3-partitioned parameters."""
    try:
        saved = torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter={path}: no such file") from None
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"--pretrain_mm_mlp_adapter={path}: cannot be read as a torch state dict ({error})") from error
    if not isinstance(saved, dict):
        raise ValueError(f"--pretrain_mm_mlp_adapter={path}: expected a state dict, found {type(saved).__name__}")
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in saved.items() if "mm_projector." in k}
    expected = {name: _shape(p) for name, p in projector.named_parameters()}
    found = {name: tuple(v.shape) for name, v in weights.items()}
    if found != expected:
        raise ValueError(
            f"--pretrain_mm_mlp_adapter={path}: its projector weights {found} do not fit the "
            f"mm_projector_type={projector_type!r} projector being trained, which expects {expected} "
            f"(was the adapter trained with another projector type or other vision layers?)")
    params = list(projector.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            projector.load_state_dict(weights)
    else:
        projector.load_state_dict(weights)


# --------------------------------------------------------------------------------------------------
# Trainer: joint ViT training with its own learning rate.
# --------------------------------------------------------------------------------------------------
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


def cast_params_created_outside_zero_init(model: nn.Module, args) -> List[str]:
    """ZeRO-3 with bf16/fp16: give parameters that zero.Init did not create the compute dtype.

    LLaVA builds mm_projector after from_pretrained, outside zero.Init, so it stays fp32; DeepSpeed >= 0.19
    no longer casts such parameters and then fails at the first matmul or in the optimizer's defragment.
    """
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    params = list(model.named_parameters())
    if dtype is None or not any(hasattr(p, "ds_id") for _, p in params):
        return []
    cast = []
    for name, param in params:
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast.append(name)
    return cast


def _no_sync_unless_zero_partitions_gradients(no_sync):
    @contextlib.contextmanager
    def guarded(model):
        partitions = getattr(model, "zero_optimization_partition_gradients", None)
        if partitions is not None and partitions():
            yield
        else:
            with no_sync(model):
                yield
    return guarded


class DSLTrainer(SafetyTrainerMixin, LLaVATrainer):
    def __init__(self, model=None, args=None, **kwargs):
        prepare_joint_training(model, args)
        cast_params_created_outside_zero_init(model, args)
        dpvr_integration.prepare_routed_training(model, args)  # DPVR stage: only the routed parts train
        super().__init__(model=model, args=args, **kwargs)
        self.grad_stats = attach_grad_stats(self)  # None unless a --dsl_grad_stats_* flag asks for it

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # accelerate 0.34 enters the model's no_sync() on every micro-step between accumulation boundaries, and
        # DeepSpeed >= 0.16's engine asserts there under ZeRO-2/3; the engine accumulates (and reduces its
        # partitioned gradients) by itself, which is what happened before the engine had a no_sync().
        self.accelerator.no_sync = _no_sync_unless_zero_partitions_gradients(self.accelerator.no_sync)

    def log(self, logs):
        if torch.cuda.is_available():  # peak GPU memory next to the loss, for every report_to target
            logs = {**logs, "gpu_peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
        super().log(logs)

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


def safe_save_model_for_hf_trainer(trainer, output_dir: str):
    """LLaVA's final save, every file written atomically (``llava_dsl.safety``), minus its
    ``torch.cuda.synchronize()`` on machines without CUDA."""
    if getattr(trainer.args, "tune_mm_mlp_adapter", False):
        save_adapter(trainer, output_dir)
        return
    if trainer.deepspeed and not torch.cuda.is_available():
        trainer.save_model(output_dir)
        return
    _UPSTREAM_SAFE_SAVE(trainer, output_dir)


# --------------------------------------------------------------------------------------------------
# LoRA / QLoRA: adapters and quantization stay inside the language model.
# --------------------------------------------------------------------------------------------------
def _vision_module_ids(model: nn.Module) -> set:
    """ids of every module inside a vision tower or a multimodal projector (never LoRA-wrapped or quantized)."""
    roots = [m for m in model.modules() if isinstance(m, CLIPVisionTower)]
    inner = getattr(model, "get_model", None)
    projector = getattr(inner(), "mm_projector", None) if callable(inner) else None
    if projector is not None:
        roots.append(projector)
    return {id(sub) for root in roots for sub in root.modules()}


def lora_target_modules(model: nn.Module) -> List[str]:
    """Full names of the language model's Linear layers, for PEFT's ``target_modules``.

    LLaVA's ``find_all_linear_names`` returns leaf names (``q_proj``, ``fc1``, ...); PEFT matches those by
    suffix, so whenever the tower is built before LoRA (finetuning from a LLaVA checkpoint whose tower is
    trainable) it also wraps the CLIP tower's layers and trains LoRA and full tower weights at once.
    """
    excluded = _vision_module_ids(model)
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and id(module) not in excluded and name != "lm_head")


class QuantizationSafeLlavaLlama:
    """Stands in for ``LlavaLlamaForCausalLM`` inside train(): bitsandbytes must not quantize the vision tower.

    LLaVA skips only ``mm_projector``; a tower built inside ``from_pretrained`` (finetuning from a LLaVA
    checkpoint with a trained tower) would otherwise be turned into 4-/8-bit layers that cannot train.
    """

    @staticmethod
    def from_pretrained(*args, **kwargs):
        quantization = kwargs.get("quantization_config")
        if quantization is not None:
            skip = list(quantization.llm_int8_skip_modules or [])
            quantization.llm_int8_skip_modules = skip + [m for m in ("mm_projector", "vision_tower") if m not in skip]
        return _UPSTREAM_LLAVA_LLAMA.from_pretrained(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Registration.
# --------------------------------------------------------------------------------------------------
PATCHES = (
    (projector_builder, "build_vision_projector", build_vision_projector,
     "the projector builder is an if/regex chain with no registry"),
    (llava_arch, "build_vision_projector", build_vision_projector,
     "llava_arch imported the builder by name, so the module attribute alone is not enough"),
    (encoder_builder, "CLIPVisionTower", MultiLayerCLIPVisionTower,
     "build_vision_tower looks the tower class up at call time; ours returns fused layers and can train"),
    (llava_arch.LlavaMetaModel, "initialize_vision_modules", initialize_vision_modules,
     "resolve/persist the layer spec before the projector is built; ZeRO-3-safe, shape-checked adapter load"),
    (llava_train, "ModelArguments", ModelArguments, "train() parses flags from these module globals"),
    (llava_train, "TrainingArguments", TrainingArguments, "adds --mm_vision_tower_lr, --dsl_grad_stats_*"),
    (llava_train, "LLaVATrainer", DSLTrainer, "unfreezes the tower and gives it its own optimizer group"),
    (llava_train, "safe_save_model_for_hf_trainer", safe_save_model_for_hf_trainer,
     "upstream writes mm_projector.bin in place (a crash truncates it) and calls torch.cuda.synchronize() on the "
     "DeepSpeed save, which fails without CUDA"),
    (llava_train, "find_all_linear_names", lora_target_modules,
     "upstream's leaf names make PEFT wrap the vision tower's layers too (LLaVA #1647)"),
    (llava_train, "LlavaLlamaForCausalLM", QuantizationSafeLlavaLlama,
     "with --bits 4/8, keep the vision tower out of bitsandbytes quantization"),
)


# Every name the plugin swaps inside `llava`, with its reason: the core's above, then those of the two feature
# modules that also touch LLaVA (safe training and data checks; DPVR-LF routing), kept beside their code.
ALL_PATCHES = PATCHES + safety.PATCHES + dpvr_integration.PATCHES


def register() -> None:
    for owner, name, replacement, _reason in ALL_PATCHES:
        setattr(owner, name, replacement)


def is_registered() -> bool:
    return all(getattr(owner, name) is replacement for owner, name, replacement, _ in ALL_PATCHES)
