"""The frozen MLLM and the probe as one module (one DeepSpeed engine under ZeRO-3), its construction, and the
probe's saved file."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from llava_dsl.checkpointing.atomic import atomic_torch_save
from llava_dsl.compat.deepspeed import gathered
from llava_dsl.rprobe.checkpoint import LoadedCheckpoint
from llava_dsl.rprobe.config import ProbeConfig
from llava_dsl.rprobe.model import (PIXEL_LAYOUT, ProbeGeometry, ProbeMismatchError, RProbe, build_conditional_sequence,
                                    copy_llm_weights, patchify, probe_depth, reconstruction_loss, weight_differences)

PROBE_FILE = "rprobe.bin"


class ProbeRunner(nn.Module):
    def __init__(self, mllm: nn.Module, probe: RProbe, geometry: ProbeGeometry, conditional: bool):
        super().__init__()
        self.mllm = mllm
        self.rprobe = probe
        self.geometry = geometry
        self.conditional = conditional

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.mllm.encode_images(pixels.to(self.mllm.dtype))
        self.geometry.check_tokens(tokens.shape[1], pixels.shape[-1], "model.encode_images")
        return tokens

    def forward(self, pixels: torch.Tensor, target: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None, text_lengths: Optional[torch.Tensor] = None,
                **_unused) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, per-patch-token predictions [B, grid^2, P], targets in the same layout)."""
        g = self.geometry
        if not self.conditional:
            predictions = self.rprobe.predict_pixels(self.visual_tokens(pixels), g)
            targets = patchify(pixels, g.region)
        else:
            b = pixels.shape[0]
            tokens = self.visual_tokens(torch.cat([pixels, target]))  # one tower pass for context and crop
            with torch.no_grad():
                text = self.mllm.get_model().embed_tokens(text_ids.to(tokens.device))
            pieces = [text[k, : int(text_lengths[k])] for k in range(b)]
            embeds, key_mask, target_index = build_conditional_sequence(tokens[:b], pieces, tokens[b:])
            if g.has_cls:
                target_index = target_index[:, 1:]  # the crop's CLS output is not regressed
            predictions = self.rprobe(embeds, key_mask, target_index)
            targets = patchify(target, g.region)
        return reconstruction_loss(predictions, targets), predictions, targets


def build_probe(model: nn.Module, geometry: ProbeGeometry, cfg: ProbeConfig, ds_config: Optional[Dict] = None
                ) -> RProbe:
    """A probe whose decoder layers (and norm) are copies of the LLM's first layers; ZeRO-3-aware."""
    llm = model.get_model()
    num_layers = len(llm.layers)
    depth = cfg.depth or probe_depth(num_layers)
    if depth > num_layers:
        raise ValueError(f"--rprobe_depth={depth}: the LLM has only {num_layers} decoder layers")
    init = contextlib.nullcontext()
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        init = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # same head init for every checkpoint and on every rank
        with init:
            probe = RProbe(model.config, depth, geometry.pixels_per_token, cfg.head_hidden, cfg.bidirectional)
    if ds_config is None:
        probe.to(device=next(llm.layers[0].parameters()).device, dtype=torch.float32)
    copy_llm_weights(probe, llm.layers, llm.norm, cfg.norm_init)
    return probe


def init_check(probe: RProbe, model: nn.Module, norm_init: str) -> Dict[str, Any]:
    llm = model.get_model()
    diffs = weight_differences(probe, llm.layers, llm.norm if norm_init == "llm" else None)
    worst = max(diffs.values())
    if worst != 0.0:
        raise RuntimeError(f"probe initialisation differs from the LLM's layers (max |diff| {worst}): {diffs}")
    return {"tensors_compared": len(diffs), "max_abs_diff": worst, "layers": probe.depth,
            "llm_layers": len(llm.layers), "norm_copied": norm_init == "llm"}


def probe_state_dict(probe: RProbe) -> Dict[str, torch.Tensor]:
    """Full (gathered) CPU copy of the probe's weights; under ZeRO-3 every rank must call it."""
    state = {}
    for name, p in probe.named_parameters():
        with gathered([p]):
            state[name] = p.detach().float().cpu().clone()
    return state


def probe_meta(model: nn.Module, probe: RProbe, geometry: ProbeGeometry, cfg: ProbeConfig, model_path: str,
               mean: Sequence[float], std: Sequence[float]) -> Dict[str, Any]:
    return {"model_path": os.path.abspath(model_path), "hidden_size": int(model.config.hidden_size),
            "llm_layers": len(model.get_model().layers), "depth": probe.depth,
            "head_hidden": int(probe.head[0].out_features), "pixels_per_token": geometry.pixels_per_token,
            "geometry": geometry.as_dict(), "bidirectional": probe.bidirectional, "conditional": cfg.conditional,
            "use_text": cfg.use_text, "max_text_tokens": cfg.max_text_tokens, "crop_fraction": cfg.crop_fraction,
            "norm_init": cfg.norm_init, "image_mean": list(mean), "image_std": list(std),
            "pixel_layout": PIXEL_LAYOUT}


def save_probe(path: str, state: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    atomic_torch_save({"state_dict": state, "meta": meta}, path)  # a crash leaves the old file or none


def load_probe(path: str, ckpt: LoadedCheckpoint) -> Tuple[RProbe, Dict[str, Any]]:
    """Probe weights for ``ckpt``; refuses weights trained for another hidden size or token grid."""
    try:
        saved = torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"--probe-path={path}: no such file") from None
    if not isinstance(saved, dict) or "state_dict" not in saved or "meta" not in saved:
        raise ProbeMismatchError(f"{path}: not an R-Probe file (expected keys 'state_dict' and 'meta')")
    meta = saved["meta"]
    model = ckpt.model
    hidden = int(model.config.hidden_size)
    if meta["hidden_size"] != hidden:
        raise ProbeMismatchError(f"{path}: probe trained for hidden size {meta['hidden_size']} (checkpoint "
                                 f"{meta['model_path']}), but {ckpt.path} has hidden size {hidden}")
    if meta["geometry"] != ckpt.geometry.as_dict():
        raise ProbeMismatchError(f"{path}: probe trained for token geometry {meta['geometry']} (checkpoint "
                                 f"{meta['model_path']}), but {ckpt.path} has {ckpt.geometry.as_dict()}")
    if meta["depth"] > len(model.get_model().layers):
        raise ProbeMismatchError(f"{path}: probe has {meta['depth']} decoder layers, {ckpt.path} only "
                                 f"{len(model.get_model().layers)}")
    probe = RProbe(model.config, meta["depth"], meta["pixels_per_token"], meta["head_hidden"], meta["bidirectional"])
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in saved["state_dict"].items()}
    if expected != found:
        bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        raise ProbeMismatchError(f"{path}: weights do not fit a probe for {ckpt.path}: "
                                 + ", ".join(f"{k}: file {found.get(k)} vs model {expected.get(k)}" for k in bad[:5]))
    probe.load_state_dict(saved["state_dict"])
    return probe.to(next(model.parameters()).device), meta


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


@contextlib.contextmanager
def _deepspeed_loading(ds_config: Optional[Dict]):
    """While alive, transformers' from_pretrained builds models partitioned (ZeRO-3 zero.Init)."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield keep
    finally:
        del keep
