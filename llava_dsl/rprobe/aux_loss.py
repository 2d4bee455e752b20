"""R-Probe as an auxiliary loss during ordinary LLaVA training: LM loss + λ · probe pixel MSE on the projected
tokens (``--rprobe_aux_weight``, ``--rprobe_bidirectional``). λ = 0 attaches nothing: training is unchanged."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from llava_dsl.rprobe.model import ProbeGeometry, RProbe, copy_llm_weights, geometry_of, patchify, probe_depth


def _llava_model(model: nn.Module) -> nn.Module:
    """The object that has ``get_model()`` (through DeepSpeed / DDP / PEFT wrappers)."""
    while not hasattr(model, "get_model") and hasattr(model, "module"):
        model = model.module
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and not hasattr(model, "rprobe_head"):
        model = model.module
    return model


def attach_aux_probe(model: nn.Module, bidirectional: bool = False, seed: int = 0, norm_init: str = "llm") -> RProbe:
    """Attach a probe (initialised from the LLM's first ceil(L/4) layers) to ``model`` as ``rprobe_head``."""
    llava_model = _llava_model(model)
    geometry, _, _ = geometry_of(llava_model)
    llm = llava_model.get_model()
    dtype = next(llm.layers[0].parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG (data order, dropout) as it was
        torch.manual_seed(seed)
        probe = RProbe(llava_model.config, probe_depth(len(llm.layers)), geometry.pixels_per_token,
                       bidirectional=bidirectional)
    probe.to(dtype=dtype)
    copy_llm_weights(probe, llm.layers, llm.norm, norm_init)
    probe.geometry = geometry
    model.rprobe_head = probe  # a name LLaVA's 'mm_projector' substring matching never picks up
    return probe


def aux_probe_loss(probe: RProbe, projected: torch.Tensor, images: torch.Tensor, has_image: torch.Tensor
                   ) -> torch.Tensor:
    """Probe MSE over the samples that carry an image (the rest contribute 0), from the projected tokens."""
    geometry: ProbeGeometry = probe.geometry
    geometry.check_tokens(projected.shape[1], images.shape[-1], "mm_projector output")
    predictions = probe.predict_pixels(projected, geometry)
    targets = patchify(images, geometry.region)
    per_sample = (predictions.float() - targets.float()).pow(2).flatten(1).mean(dim=1)
    weights = has_image.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


@dataclass
class RProbeAuxArguments:
    """Flags of the auxiliary-loss mode, mixed into the plugin's TrainingArguments."""

    rprobe_aux_weight: float = field(default=0.0, metadata={
        "help": "λ: add λ · R-Probe pixel MSE to the LM loss (docs/rprobe.md); 0 = plain training, bit for bit."})
    rprobe_bidirectional: bool = field(default=False, metadata={
        "help": "The auxiliary probe attends bidirectionally instead of causally."})


def aux_weight_from(args) -> float:
    weight = float(getattr(args, "rprobe_aux_weight", 0.0) or 0.0)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"--rprobe_aux_weight={weight}: expected a finite value >= 0")
    return weight


def attach_aux_probe_if_asked(model: nn.Module, args) -> None:
    """Attach the probe when --rprobe_aux_weight > 0; λ = 0 attaches nothing, so training is unchanged bit for bit."""
    if aux_weight_from(args):
        attach_aux_probe(model, bidirectional=bool(getattr(args, "rprobe_bidirectional", False)),
                         seed=int(getattr(args, "seed", 0)))


class RProbeAuxMixin:
    """Trainer mixin: loss = LM loss + λ · probe loss; the probe rides on the model as ``rprobe_head``
    (attached by ``attach_aux_probe_if_asked`` before the Trainer is built). λ = 0 defers to the next class."""

    def compute_loss(self, model, inputs, return_outputs=False):
        weight = aux_weight_from(self.args)
        if not weight:
            return super().compute_loss(model, inputs, return_outputs)
        from llava.constants import IMAGE_TOKEN_INDEX

        images = inputs.get("images")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("--rprobe_aux_weight needs batches with a [B, 3, H, W] 'images' tensor "
                             f"(got {type(images).__name__}); anyres/multi-image batches are not supported")
        holder = _unwrap(model)
        projector = _llava_model(holder).get_model().mm_projector
        captured: List[torch.Tensor] = []
        handle = projector.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"expected one projector call per forward, saw {len(captured)}")
        has_image = (inputs["input_ids"] == IMAGE_TOKEN_INDEX).any(dim=1)
        probe_loss = aux_probe_loss(holder.rprobe_head, captured[0], images, has_image)
        self.__dict__.setdefault("_rprobe_losses", []).append(float(probe_loss.detach()))
        total = loss + weight * probe_loss
        return (total, outputs) if return_outputs else total

    def log(self, logs: Dict[str, float]) -> None:
        losses = self.__dict__.get("_rprobe_losses")
        if losses and "loss" in logs:
            logs["rprobe_loss"] = round(sum(losses) / len(losses), 4)
            losses.clear()
        super().log(logs)
