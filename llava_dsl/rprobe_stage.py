"""R-Probe on LLaVA checkpoints: the probe stage, checkpoint comparison, and the auxiliary-loss trainer.

    python -m llava_dsl.rprobe_stage train   --model-path CKPT --data-path JSON --image-folder DIR --output-dir OUT
    python -m llava_dsl.rprobe_stage eval    --model-path CKPT --probe-path OUT/rprobe.bin --eval-data-path JSON ...
    python -m llava_dsl.rprobe_stage compare --checkpoints A B C --data-path JSON --eval-data-path JSON --steps N ...

Every MLLM parameter stays frozen; only the probe (``llava_dsl.rprobe.RProbe``) trains. One process runs a
plain torch loop; under the ``deepspeed`` launcher with ``--deepspeed zero3.json`` the same code runs ZeRO-3
(the checkpoint is loaded partitioned, the probe's copy of the LLM layers is gathered, not copied from
empty partitions). Training checkpoints (``--save-every``) let the same command resume after a kill with the
same trajectory; every file the stage writes is written atomically. See docs/rprobe.md.

Everything here that touches ``llava`` is listed in ``LLAVA_TOUCHES`` with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .integration import DSLTrainer, TrainingArguments as DSLTrainingArguments
from .rprobe import (
    NORM_INITS, PIXEL_LAYOUT, ProbeGeometry, ProbeMismatchError, RProbe, RunningMean, batch_indices,
    build_conditional_sequence, copy_llm_weights, gathered, patchify, per_image_mse, per_image_psnr,
    plot_curves, probe_depth, reconstruction_grid, reconstruction_loss, steps_to_threshold, to_pil,
    unpatchify, weight_differences,
)
from .safety import (
    atomic_file, atomic_torch_save, atomic_write_text, init_deepspeed_distributed, latest_complete_checkpoint,
    move_aside, read_completion_marker, set_aside_incomplete, write_completion_marker,
)

LLAVA_TOUCHES = (
    ("llava_dsl.register()", "checkpoints with the plugin's projector types and multi-layer towers must load"),
    ("llava.model.LlavaLlamaForCausalLM.from_pretrained", "load a LLaVA checkpoint (full weights, or a base LLM + "
     "stage-1 mm_projector.bin) in the probe's dtype instead of the builder's fixed fp16"),
    ("model.get_vision_tower().load_model()", "LLaVA keeps only the tower's name unless the tower was trained"),
    ("model.get_vision_tower().image_processor / .config", "processed image size, patch grid, normalisation"),
    ("llava.mm_utils.process_images", "the image exactly as the model sees it (pad-to-square, CLIP normalisation)"),
    ("model.encode_images", "the projected visual tokens: vision tower + projector, frozen"),
    ("model.get_model().layers / .norm", "the LLM weights the probe's decoder is initialised from"),
    ("model.get_model().embed_tokens", "frozen text embeddings of the conditional variant's prompt"),
    ("model.get_model().mm_projector (forward hook)", "aux mode: the projected tokens of the LM forward, with grad"),
    ("llava.constants.IMAGE_TOKEN_INDEX", "aux mode: which samples of a batch carry an image"),
    ("llava_dsl.integration.DSLTrainer / TrainingArguments", "aux mode extends the plugin's trainer and flags"),
)

PROBE_FILE = "rprobe.bin"
STATE_FILE = "probe_state.json"  # in a training checkpoint: step, history, losses, the run's flags
DEEPSPEED_TAG = "deepspeed"  # the sub-folder of a ZeRO-3 training checkpoint that DeepSpeed writes
# Test hook: SIGKILL the process once it has run this many training steps (a kill at a known point).
KILL_AFTER_STEPS_ENV = "LLAVA_DSL_TEST_SIGKILL_AFTER_STEPS"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint the probe cannot run on."""


class ProbeDataError(ValueError):
    """Probe data that cannot be used (missing/unreadable image, malformed entry)."""


def _log(message: str) -> None:
    if _rank() == 0:
        print(f"[rprobe] {message}", flush=True)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------
@dataclass
class ProbeConfig:
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0
    depth: Optional[int] = None  # default ceil(L / 4)
    head_hidden: Optional[int] = None  # default: the LLM's hidden size
    bidirectional: bool = False
    norm_init: str = "llm"
    conditional: bool = False
    use_text: bool = True
    max_text_tokens: int = 64
    crop_fraction: float = 0.5
    eval_max_images: Optional[int] = None
    baseline_max_images: int = 512
    grid_images: int = 6
    num_workers: int = 0
    cache_images: bool = False
    save_every: int = 500  # training checkpoints (when run_probe gets a checkpoint_dir); 0 = none
    save_total_limit: int = 1  # newest checkpoints kept; 0 = all

    def validate(self) -> None:
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--eval-every": self.eval_every,
                    "--rprobe_max_text_tokens": self.max_text_tokens,
                    "--baseline-max-images": self.baseline_max_images}
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag}={value}: expected a positive integer")
        if self.save_every < 0:
            raise ValueError(f"--save-every={self.save_every}: expected an integer >= 0 (0: no checkpoints)")
        if self.save_total_limit < 0:
            raise ValueError(f"--save-total-limit={self.save_total_limit}: expected an integer >= 0 (0: keep all)")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate={self.learning_rate}: expected > 0")
        if self.norm_init not in NORM_INITS:
            raise ValueError(f"--rprobe_norm_init={self.norm_init!r}: expected one of {NORM_INITS}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"--rprobe_crop_fraction={self.crop_fraction}: expected a value in (0, 1]")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"--rprobe_depth={self.depth}: expected >= 1")


# --------------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    path: str
    model: nn.Module
    tokenizer: Any
    processor: Any
    geometry: ProbeGeometry
    mean: List[float]
    std: List[float]


def _has_full_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def _load_projector_bin(model: nn.Module, path: str) -> None:
    saved = torch.load(path, map_location="cpu")
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in saved.items() if "mm_projector." in k}
    projector = model.get_model().mm_projector
    expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in projector.named_parameters()}
    found = {n: tuple(v.shape) for n, v in weights.items()}
    if found != expected:
        raise CheckpointError(f"{path}: projector weights {found} do not fit the projector its config.json "
                              f"describes, which expects {expected}")
    with gathered(list(projector.parameters()), modifier_rank=0), torch.no_grad():
        for name, p in projector.named_parameters():
            p.copy_(weights[name].to(p.dtype))


def geometry_of(model: nn.Module) -> Tuple[ProbeGeometry, List[float], List[float]]:
    """Processed image size, token grid and normalisation of a loaded LLaVA model."""
    tower = model.get_vision_tower()
    processor = tower.image_processor
    crop = getattr(processor, "crop_size", None) or {}
    height, width = crop.get("height"), crop.get("width")
    if height is None or height != width:
        raise CheckpointError(f"image processor of {tower.vision_tower_name}: crop_size={crop}; the probe needs a "
                              f"square processed image")
    grid = tower.config.image_size // tower.config.patch_size
    select = getattr(model.config, "mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointError(f"mm_vision_select_feature={select!r}: expected 'patch' or 'cls_patch'")
    geometry = ProbeGeometry(image_size=int(height), grid=int(grid), has_cls=select == "cls_patch")
    return geometry, [float(x) for x in processor.image_mean], [float(x) for x in processor.image_std]


def load_checkpoint(model_path: str, model_base: Optional[str] = None, dtype: torch.dtype = torch.float32,
                    device: Optional[str] = "cpu", freeze: bool = True) -> LoadedCheckpoint:
    """Load a LLaVA checkpoint, every parameter frozen (``freeze=False``: as LLaVA's training would load it).

    ``model_path`` holds full weights, or (stage 1) a config.json + mm_projector.bin, then ``model_base`` is
    the LLM they were trained on. ``device=None`` leaves placement to DeepSpeed (ZeRO-3 loads partitioned when
    an ``HfDeepSpeedConfig`` is alive).
    """
    import llava_dsl
    from transformers import AutoConfig, AutoTokenizer

    llava_dsl.register()
    from llava.model import LlavaLlamaForCausalLM

    if not os.path.isdir(model_path):
        raise CheckpointError(f"--model-path={model_path}: no such directory")
    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{model_path}: no config.json; expected a LLaVA checkpoint folder")
    config = AutoConfig.from_pretrained(model_path)
    if not getattr(config, "mm_vision_tower", None) or getattr(config, "model_type", None) != "llava_llama":
        raise CheckpointError(
            f"{model_path}: config.json has model_type={getattr(config, 'model_type', None)!r} and "
            f"mm_vision_tower={getattr(config, 'mm_vision_tower', None)!r}; the probe needs a LLaVA (llava_llama) "
            f"checkpoint with vision modules (a plain LLM has no visual tokens to probe)")
    if _has_full_weights(model_path):
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
        tokenizer_path = model_path
    elif os.path.isfile(os.path.join(model_path, "mm_projector.bin")):
        if model_base is None:
            raise CheckpointError(f"{model_path} holds only mm_projector.bin (a stage-1 output); pass --model-base "
                                  f"with the LLM it was trained on")
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, torch_dtype=dtype)
        _load_projector_bin(model, os.path.join(model_path, "mm_projector.bin"))
        tokenizer_path = model_base
    else:
        raise CheckpointError(f"{model_path}: neither model weights ({', '.join(WEIGHT_FILES)}) nor mm_projector.bin")
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    if device is not None:
        model.to(device=device, dtype=dtype)
    else:
        tower.to(dtype=dtype)
    if freeze:
        model.requires_grad_(False)
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, use_fast=False)
    geometry, mean, std = geometry_of(model)
    return LoadedCheckpoint(model_path, model, tokenizer, tower.image_processor, geometry, mean, std)


# --------------------------------------------------------------------------------------------------
# Data: LLaVA's json + image folder, images processed the way LLaVA does.
# --------------------------------------------------------------------------------------------------
def _entry_name(entry: Dict, index: int, data_path: str) -> str:
    return f"entry {index} (id {entry.get('id')!r}) of {data_path}"


def _first_answer(entry: Dict) -> str:
    for turn in entry.get("conversations") or []:
        if turn.get("from") == "gpt":
            return str(turn.get("value", ""))
    return ""


class ProbeImageSet(torch.utils.data.Dataset):
    """Images of a LLaVA json (entries without an image are counted, not used).

    Whole-image mode: ``pixels`` [3, S, S]. Conditional mode adds the target crop ``target`` [3, S, S]
    (box from the entry's ``rprobe_crop`` [x0, y0, x1, y1] in original pixels, else a centred box of
    ``crop_fraction`` of each side) and ``text_ids`` (the entry's ``rprobe_text``, else its first answer).
    """

    def __init__(self, data_path: str, image_folder: str, processor, model_config, tokenizer=None,
                 conditional: bool = False, use_text: bool = True, max_text_tokens: int = 64,
                 crop_fraction: float = 0.5, entries: Optional[List[Tuple[int, Dict]]] = None,
                 cache: bool = False):
        self.cache: Optional[Dict[int, Dict[str, torch.Tensor]]] = {} if cache else None
        self.data_path, self.image_folder = data_path, image_folder
        self.processor, self.model_config, self.tokenizer = processor, model_config, tokenizer
        self.conditional, self.use_text = conditional, use_text
        self.max_text_tokens, self.crop_fraction = max_text_tokens, crop_fraction
        aspect = getattr(model_config, "image_aspect_ratio", None)
        if aspect == "anyres":
            raise CheckpointError("image_aspect_ratio='anyres' tiles an image into several grids; the probe maps "
                                  "tokens onto one grid (use a 'pad' or 'square' checkpoint)")
        if conditional and use_text and tokenizer is None:
            raise ValueError("the conditional variant with text needs the checkpoint's tokenizer")
        if entries is None:
            entries = list(enumerate(read_entries(data_path)))
        self.skipped_without_image = sum(1 for _, e in entries if "image" not in e)
        self.items = [(i, e) for i, e in entries if "image" in e]
        if not self.items:
            raise ProbeDataError(f"{data_path}: no entry has an 'image' field")
        missing = []
        for index, entry in self.items:
            if not isinstance(entry["image"], str):
                raise ProbeDataError(f"{_entry_name(entry, index, data_path)}: 'image' is "
                                     f"{type(entry['image']).__name__}, expected one file name")
            path = os.path.join(image_folder, entry["image"])
            if not os.path.isfile(path):
                missing.append(f"{path} ({_entry_name(entry, index, data_path)})")
        if missing:
            raise ProbeDataError(f"{len(missing)} image(s) not found under --image-folder={image_folder}: "
                                 + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, index: int, entry: Dict):
        from PIL import Image

        path = os.path.join(self.image_folder, entry["image"])
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:
            raise ProbeDataError(f"{path} ({_entry_name(entry, index, self.data_path)}): cannot be read as an "
                                 f"image ({error})") from error

    def _process(self, image) -> torch.Tensor:
        from llava.mm_utils import process_images

        return process_images([image], self.processor, self.model_config)[0].float()

    def crop_box(self, index: int, entry: Dict, size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        width, height = size
        box = entry.get("rprobe_crop")
        if box is None:
            cw, ch = max(1, round(width * self.crop_fraction)), max(1, round(height * self.crop_fraction))
            x0, y0 = (width - cw) // 2, (height - ch) // 2
            return x0, y0, x0 + cw, y0 + ch
        ok = (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box))
        if not ok or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise ProbeDataError(f"{_entry_name(entry, index, self.data_path)}: rprobe_crop={box!r}; expected "
                                 f"[x0, y0, x1, y1] with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
        return tuple(int(round(v)) for v in box)  # type: ignore[return-value]

    def text_of(self, entry: Dict) -> str:
        return str(entry["rprobe_text"]) if "rprobe_text" in entry else _first_answer(entry)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        index, entry = self.items[i]
        image = self._open(index, entry)
        item = {"pixels": self._process(image), "index": torch.tensor(index)}
        if self.conditional:
            item["target"] = self._process(image.crop(self.crop_box(index, entry, image.size)))
            ids: List[int] = []
            if self.use_text:
                ids = self.tokenizer(self.text_of(entry), add_special_tokens=False).input_ids[: self.max_text_tokens]
            item["text_ids"] = torch.tensor(ids, dtype=torch.long)
        if self.cache is not None:
            self.cache[i] = item
        return item

    def subset(self, count: Optional[int]) -> "ProbeImageSet":
        if count is None or count >= len(self.items):
            return self
        clone = object.__new__(ProbeImageSet)
        clone.__dict__.update(self.__dict__)
        clone.items = self.items[:count]
        return clone


def read_entries(data_path: str) -> List[Dict]:
    try:
        with open(data_path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise ProbeDataError(f"--data-path={data_path}: no such file") from None
    except ValueError as error:
        raise ProbeDataError(f"{data_path}: not valid json ({error})") from error
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProbeDataError(f"{data_path}: expected a json list of LLaVA entries (objects)")
    return entries


def collate(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    batch = {"pixels": torch.stack([x["pixels"] for x in items]), "index": torch.stack([x["index"] for x in items])}
    if "target" in items[0]:
        batch["target"] = torch.stack([x["target"] for x in items])
        lengths = torch.tensor([len(x["text_ids"]) for x in items], dtype=torch.long)
        ids = torch.zeros(len(items), int(lengths.max()) if len(items) else 0, dtype=torch.long)
        for k, x in enumerate(items):
            ids[k, : len(x["text_ids"])] = x["text_ids"]
        batch["text_ids"], batch["text_lengths"] = ids, lengths
    return batch


# --------------------------------------------------------------------------------------------------
# The frozen MLLM + the probe, as one module (one DeepSpeed engine under ZeRO-3).
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Training and evaluation.
# --------------------------------------------------------------------------------------------------
def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _loader(dataset, batch_sampler=None, batch_size=None, num_workers=0):
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                                           num_workers=num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                       num_workers=num_workers)


class _Batches:
    """Endless seeded batch sampler for torch's DataLoader (same order for every checkpoint).

    ``start`` skips the first batches by index only (a resumed run loads no image of a batch already trained).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start: int = 0):
        self.args = (n, batch_size, seed, rank, world)
        self.start = start

    def __iter__(self):
        batches = batch_indices(*self.args)
        for _ in range(self.start):
            next(batches)
        return batches


def trivial_baseline(train_set: ProbeImageSet, eval_set: ProbeImageSet, cfg: ProbeConfig,
                     mean: Sequence[float], std: Sequence[float]) -> Dict[str, Any]:
    """The mean training target (per pixel) as the prediction for every held-out image."""
    key = "target" if cfg.conditional else "pixels"
    running = RunningMean()
    for batch in _loader(train_set.subset(cfg.baseline_max_images), batch_size=cfg.batch_size,
                         num_workers=cfg.num_workers):
        running.update(batch[key])
    mean_image = running.value()
    mse, psnr = [], []
    for batch in _loader(eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers):
        guess = mean_image.unsqueeze(0).expand_as(batch[key])
        mse.append(per_image_mse(guess, batch[key]))
        psnr.append(per_image_psnr(guess, batch[key], mean, std))
    return {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean()),
            "train_images": running.count, "mean_image": mean_image}


def evaluate(forward, eval_set: ProbeImageSet, geometry: ProbeGeometry, cfg: ProbeConfig, device,
             mean: Sequence[float], std: Sequence[float], keep: int = 0) -> Dict[str, Any]:
    """Held-out MSE (normalised units, mean over images) and PSNR (dB on [0, 1] pixels, mean over images).

    Under ZeRO-3 every rank evaluates the whole set: each forward gathers parameters collectively.
    """
    mse, psnr, kept = [], [], []
    with torch.no_grad():
        for batch in _loader(eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers):
            batch = _to_device(batch, device)
            _, predictions, targets = forward(**batch)
            images_p = unpatchify(predictions.float(), geometry.region, geometry.grid)
            images_t = unpatchify(targets.float(), geometry.region, geometry.grid)
            mse.append(per_image_mse(images_p, images_t).cpu())
            psnr.append(per_image_psnr(images_p, images_t, mean, std).cpu())
            for k in range(images_p.shape[0]):
                if len(kept) < keep:
                    kept.append((images_t[k].cpu(), images_p[k].cpu()))
    return {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean()),
            "num_images": int(sum(len(m) for m in mse)), "samples": kept}


def _mean_over_ranks(value: torch.Tensor) -> float:
    """The batch loss averaged over ranks, so the logged train loss is the global batch's."""
    import torch.distributed as dist

    if _world_size() > 1:
        value = value.float().clone()
        dist.all_reduce(value)
        value /= _world_size()
    return float(value)


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


# --------------------------------------------------------------------------------------------------
# Training checkpoints: resume after a kill with the same trajectory.
# --------------------------------------------------------------------------------------------------
# The settings a resumed run must share with the run that wrote the checkpoint (each changes the trajectory),
# with the flag that sets each.
_RUN_FLAGS = {
    "steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--learning-rate",
    "weight_decay": "--weight-decay", "warmup_steps": "--warmup-steps", "grad_clip": "--grad-clip",
    "eval_every": "--eval-every", "seed": "--seed", "depth": "--rprobe_depth", "head_hidden": "--rprobe_head_hidden",
    "bidirectional": "--rprobe_bidirectional", "norm_init": "--rprobe_norm_init",
    "conditional": "--rprobe_conditional", "use_text": "--rprobe_text",
    "max_text_tokens": "--rprobe_max_text_tokens", "crop_fraction": "--rprobe_crop_fraction",
    "eval_max_images": "--eval-max-images", "model_path": "--model-path / --checkpoints", "dtype": "--bf16",
    "train_images": "--data-path (training images)",
    "eval_images": "--eval-data-path / --eval-holdout (held-out images)",
    "world_size": "number of ranks", "deepspeed": "--deepspeed",
}


def _run_settings(ckpt: LoadedCheckpoint, train_set, eval_set, cfg: ProbeConfig, deepspeed: bool) -> Dict[str, Any]:
    settings = {k: getattr(cfg, k) for k in _RUN_FLAGS if hasattr(cfg, k)}
    settings.update(model_path=os.path.abspath(ckpt.path), dtype=str(next(ckpt.model.parameters()).dtype),
                    train_images=len(train_set), eval_images=len(eval_set), world_size=_world_size(),
                    deepspeed=deepspeed)
    return settings


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    """This rank's RNG states as plain lists and tensors (loadable with ``weights_only=True``)."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        match = re.match(r"^checkpoint-(\d+)$", name)
        if match and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def find_resume_point(run_dir: str, settings: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The newest complete training checkpoint in ``run_dir`` and its saved state, or None.

    Incomplete checkpoints are moved aside first (rank 0; every rank then sees the same folder). A checkpoint
    written with other settings (``_RUN_FLAGS``) is refused, naming both values.
    """
    if _rank() == 0:
        for message in set_aside_incomplete(run_dir):
            _log(message)
    _barrier()
    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        return None
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    marker = read_completion_marker(checkpoint)
    saved = {**state["settings"], "world_size": marker["world_size"], "deepspeed": marker["deepspeed"]}
    for key, flag in _RUN_FLAGS.items():
        if saved.get(key) != settings.get(key):
            raise ValueError(
                f"{checkpoint} was written by a run with {flag} {saved.get(key)!r}, this run has "
                f"{settings.get(key)!r}: a resumed run must keep the settings it started with (resume with "
                f"{flag} {saved.get(key)!r}, or start over in another --output-dir or after moving the "
                f"checkpoint away)")
    return checkpoint, state


def save_training_checkpoint(run_dir: str, step: int, state: Dict[str, Any], cfg: ProbeConfig, engine,
                             probe: RProbe, optimizer, scheduler, meta: Dict[str, Any]) -> str:
    """Write ``run_dir/checkpoint-STEP`` atomically; every rank calls this.

    Files go to ``tmp-checkpoint-STEP``; the completion marker (each file with its size) is written last and the
    folder is then renamed, so a kill at any point leaves either a complete checkpoint or one that the next
    start moves aside. Older checkpoints beyond ``save_total_limit`` are removed only after that.
    Plain loop: rprobe.bin (weights + meta, loadable by ``eval``), optimizer.pt, scheduler.pt. ZeRO-3:
    DeepSpeed's own files (partitioned fp32 weights and optimizer state, the scheduler) under ``deepspeed/``.
    Both: ``rng_state_RANK.pth`` per rank and probe_state.json (step, history, losses, settings).
    """
    name = f"checkpoint-{step}"
    staging, final = os.path.join(run_dir, f"tmp-{name}"), os.path.join(run_dir, name)
    if _rank() == 0:
        for path in (staging, final):
            if os.path.exists(path):  # from an earlier run; never mixed into this one
                _log(f"{path} exists from an earlier run; moved to {move_aside(run_dir, path)}")
        os.makedirs(staging)
    _barrier()
    if engine is not None:
        # the frozen MLLM is rebuilt from its own checkpoint on resume: only the probe's state is saved
        engine.save_checkpoint(staging, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    elif _rank() == 0:
        torch.save({"state_dict": probe_state_dict(probe), "meta": meta}, os.path.join(staging, PROBE_FILE))
        torch.save(optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
    torch.save(_rng_state(), os.path.join(staging, f"rng_state_{_rank()}.pth"))
    if _rank() == 0:
        atomic_write_text(os.path.join(staging, STATE_FILE), json.dumps({"step": step, **state}, indent=1))
    _barrier()
    if _rank() == 0:
        write_completion_marker(staging, step, _world_size(), deepspeed=engine is not None)
        os.replace(staging, final)
        old = _checkpoints(run_dir)[:-cfg.save_total_limit] if cfg.save_total_limit else []
        for _, path in old:
            shutil.rmtree(path)
    _barrier()
    return final


def load_training_checkpoint(checkpoint: str, engine, probe: RProbe, optimizer, scheduler) -> None:
    """Probe weights, optimizer and scheduler state from ``checkpoint`` (the RNG is restored separately)."""
    if engine is not None:
        path, _ = engine.load_checkpoint(checkpoint, tag=DEEPSPEED_TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{checkpoint}: DeepSpeed found no checkpoint under {DEEPSPEED_TAG}/")
        return
    saved = torch.load(os.path.join(checkpoint, PROBE_FILE), map_location="cpu", weights_only=True)
    device = next(probe.parameters()).device
    probe.load_state_dict({k: v.to(device) for k, v in saved["state_dict"].items()})
    optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))


_steps_run = 0  # training steps this process has run, over every probe of a compare


def _kill_hook() -> None:
    """Tests only: with $LLAVA_DSL_TEST_SIGKILL_AFTER_STEPS=N, SIGKILL this process after its N-th step."""
    global _steps_run
    _steps_run += 1
    limit = os.environ.get(KILL_AFTER_STEPS_ENV)
    if limit and _steps_run == int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def run_probe(ckpt: LoadedCheckpoint, train_set: ProbeImageSet, eval_set: ProbeImageSet, cfg: ProbeConfig,
              ds_config: Optional[Dict] = None, dump_init: Optional[str] = None,
              checkpoint_dir: Optional[str] = None) -> Dict[str, Any]:
    """Train a fresh probe on ``ckpt`` for ``cfg.steps`` steps; evaluate at step 0, every ``eval_every`` and at the end.

    With ``checkpoint_dir``, a training checkpoint is written there every ``cfg.save_every`` steps, and a run
    that finds a complete one continues from it: weights, optimizer, scheduler, every rank's RNG state, data
    position, evaluation history and per-step losses, so its results equal an uninterrupted run's.
    Returns the history, per-step train losses, final metrics, the init check, timings, the probe's weights
    and a few reconstructions.
    """
    cfg.validate()
    model = ckpt.model
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    if any(before.values()):
        raise RuntimeError("the MLLM must be frozen before probing (load it with load_checkpoint)")
    probe = build_probe(model, ckpt.geometry, cfg, ds_config)
    check = init_check(probe, model, cfg.norm_init)
    if dump_init:
        state = probe_state_dict(probe)
        if _rank() == 0:
            atomic_torch_save(state, dump_init)
    runner = ProbeRunner(model, probe, ckpt.geometry, cfg.conditional)
    trainable = [p for p in probe.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps))
    if ds_config is not None:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(model=runner, model_parameters=trainable,
                                                               optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=ds_config)
        forward, device = engine, engine.device
    else:
        engine, forward, device = None, runner, next(model.parameters()).device
    trainee = engine if engine is not None else runner
    rank, world = _rank(), _world_size()
    meta = probe_meta(model, probe, ckpt.geometry, cfg, ckpt.path, ckpt.mean, ckpt.std)
    settings = _run_settings(ckpt, train_set, eval_set, cfg, engine is not None)
    history: List[Dict[str, Any]] = []
    losses: List[float] = []  # per step, averaged over ranks
    recent: List[float] = []  # since the last evaluation
    train_seconds = eval_seconds = 0.0
    start, resumed = 0, None
    found = find_resume_point(checkpoint_dir, settings) if checkpoint_dir else None
    if found is not None:
        resumed, saved = found
        load_training_checkpoint(resumed, engine, probe, optimizer, scheduler)
        start, history, losses, recent = saved["step"], saved["history"], saved["losses"], saved["recent"]
        train_seconds, eval_seconds = saved["train_seconds"], saved["eval_seconds"]
        _log(f"resuming from {resumed} (step {start} of {cfg.steps}): probe weights, optimizer, scheduler, every "
             f"rank's RNG state, data position and evaluation history")
    elif checkpoint_dir and cfg.save_every:
        _log(f"training checkpoints every {cfg.save_every} steps in {checkpoint_dir}")
    loader = iter(_loader(train_set, batch_sampler=_Batches(len(train_set), cfg.batch_size, cfg.seed, rank, world,
                                                            start=start), num_workers=cfg.num_workers))
    if resumed is not None:  # after the loader, whose creation draws from the RNG
        _set_rng_state(torch.load(os.path.join(resumed, f"rng_state_{rank}.pth"), weights_only=True))

    def evaluation(keep: int = 0) -> Dict[str, Any]:
        nonlocal eval_seconds
        began = time.perf_counter()
        trainee.eval()
        metrics = evaluate(forward, eval_set, ckpt.geometry, cfg, device, ckpt.mean, ckpt.std, keep)
        trainee.train()
        model.eval()
        eval_seconds += time.perf_counter() - began
        return metrics

    def record(step: int, keep: int = 0) -> Dict[str, Any]:
        metrics = evaluation(keep)
        row = {"step": step, "mse": metrics["mse"], "psnr": metrics["psnr"],
               "train_loss": (sum(recent) / len(recent)) if recent else None}
        recent.clear()
        history.append(row)
        loss_text = f" (train loss {row['train_loss']:.4f})" if row["train_loss"] is not None else ""
        _log(f"{os.path.basename(ckpt.path.rstrip('/'))} step {step}: held-out mse {row['mse']:.4f} "
             f"psnr {row['psnr']:.2f} dB{loss_text}")
        return metrics

    if start == 0:
        record(0)
    trainee.train()
    model.eval()  # the MLLM stays in eval mode; only the probe trains
    final = None
    for step in range(start + 1, cfg.steps + 1):
        began = time.perf_counter()
        batch = _to_device(next(loader), device)
        loss = forward(**batch)[0]
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        value = _mean_over_ranks(loss.detach())
        losses.append(value)
        recent.append(value)
        train_seconds += time.perf_counter() - began
        if step % cfg.eval_every == 0 or step == cfg.steps:
            final = record(step, keep=cfg.grid_images if step == cfg.steps else 0)
        if checkpoint_dir and cfg.save_every and step % cfg.save_every == 0:
            state = {"settings": settings, "history": history, "losses": losses, "recent": recent,
                     "train_seconds": train_seconds, "eval_seconds": eval_seconds}
            save_training_checkpoint(checkpoint_dir, step, state, cfg, engine, probe, optimizer, scheduler, meta)
        _kill_hook()
    if final is None:  # resumed from the last step: its row is in the history; redo the metrics and pictures
        final = evaluation(keep=cfg.grid_images)
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    if any(after.values()):
        raise RuntimeError("an MLLM parameter became trainable during probing")
    state = probe_state_dict(probe)
    result = {"history": history, "train_losses": losses,
              "final": {"mse": final["mse"], "psnr": final["psnr"], "num_images": final["num_images"]},
              "init_check": check, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "seconds_per_step": train_seconds / cfg.steps, "probe_depth": probe.depth,
              "llm_layers": len(model.get_model().layers), "geometry": ckpt.geometry.as_dict(),
              "resumed_from": None if resumed is None else {"checkpoint": resumed, "step": start},
              "state_dict": state, "meta": meta, "samples": final["samples"], "probe": probe}
    if engine is not None:
        result["probe"] = None  # partitioned; the gathered weights are in state_dict
        engine.destroy()
    return result


# --------------------------------------------------------------------------------------------------
# DeepSpeed.
# --------------------------------------------------------------------------------------------------
def deepspeed_config(path: str, cfg: ProbeConfig, bf16: bool) -> Dict[str, Any]:
    """LLaVA's ZeRO json with its "auto" values filled from the probe flags (the probe has no HF Trainer)."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    world = _world_size()
    fills = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": 1,
             "train_batch_size": cfg.batch_size * world}
    for key, value in fills.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    fp16, half = config.setdefault("fp16", {}), config.setdefault("bf16", {})
    if fp16.get("enabled", False) == "auto":
        fp16["enabled"] = False  # the probe trains in fp32 or bf16 (--bf16)
    if half.get("enabled", "auto") == "auto":
        half["enabled"] = bf16
    config["gradient_clipping"] = cfg.grad_clip
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not torch.cuda.is_available():
        # gloo: the coalesced all-gather can leave gathered weights stale (see safety.cpu_safe_deepspeed_argv)
        zero["stage3_allgather_sequential"] = True
    config["zero_allow_untested_optimizer"] = True  # the probe's AdamW is a plain torch optimizer
    config.setdefault("steps_per_print", 10 ** 9)
    left = [k for k, v in _walk(config) if v == "auto"]
    if left:
        raise ValueError(f"--deepspeed={path}: 'auto' left for {left}; the probe stage fills only "
                         f"{sorted(fills)}, fp16/bf16 'enabled'; set the others to numbers")
    return config


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


# --------------------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------------------
def _short_names(paths: Sequence[str]) -> List[str]:
    names, seen = [], {}
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(path))) or "checkpoint"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _threshold(args, trivial_mse: float) -> Tuple[float, str]:
    if args.threshold is not None:
        return float(args.threshold), "--threshold"
    return args.threshold_fraction * trivial_mse, f"{args.threshold_fraction} x trivial (mean-image) held-out MSE"


def write_pictures(output_dir: str, names: Sequence[str], results: Sequence[Dict[str, Any]],
                   mean: Sequence[float], std: Sequence[float], threshold: Optional[float],
                   trivial_mse: float) -> Dict[str, str]:
    rows = []
    for k, (original, _) in enumerate(results[0]["samples"]):
        row = [to_pil(original, mean, std)]
        for result in results:
            samples = result["samples"]
            row.append(to_pil(samples[k][1], mean, std) if k < len(samples) else None)
        rows.append(row)
    files = {}
    if rows:
        grid = reconstruction_grid(rows, ["original"] + list(names))
        files["reconstructions"] = os.path.join(output_dir, "reconstructions.png")
        _save_image(grid, files["reconstructions"])
    series = {name: ([r["step"] for r in res["history"]], [r["mse"] for r in res["history"]])
              for name, res in zip(names, results)}
    lines = {"trivial (mean image)": trivial_mse}
    if threshold is not None:
        lines = {f"threshold {threshold:.3g}": threshold, **lines}
    plot = plot_curves(series, lines, "R-Probe held-out MSE", "probe training step", "MSE (normalised)")
    files["curves"] = os.path.join(output_dir, "mse_curve.png")
    _save_image(plot, files["curves"])
    return files


def _save_image(image, path: str) -> None:
    with atomic_file(path) as temporary:
        image.save(temporary, format="PNG")  # the temporary name has no extension to infer it from


def _public(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("state_dict", "samples", "probe", "meta")}


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
def _bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: expected True or False")


def _add(parser, name: str, **kwargs):
    """Flags accept dashes and underscores (--model-path / --model_path)."""
    stem = name[2:]
    names = dict.fromkeys([name, "--" + stem.replace("-", "_"), "--" + stem.replace("_", "-")])
    parser.add_argument(*names, **kwargs)


def _common(parser) -> None:
    _add(parser, "--model-base", default=None, help="LLM for checkpoints that hold only mm_projector.bin")
    _add(parser, "--data-path", help="LLaVA json whose images train the probe")
    _add(parser, "--image-folder", help="folder the json's image paths are relative to")
    _add(parser, "--eval-data-path", default=None, help="LLaVA json of held-out images")
    _add(parser, "--eval-image-folder", default=None, help="default: --image-folder")
    _add(parser, "--eval-holdout", type=int, default=0,
         help="without --eval-data-path: hold out the last N image entries of --data-path")
    _add(parser, "--output-dir", required=True)
    _add(parser, "--steps", type=int, default=ProbeConfig.steps)
    _add(parser, "--batch-size", type=int, default=ProbeConfig.batch_size, help="per process")
    _add(parser, "--learning-rate", type=float, default=ProbeConfig.learning_rate)
    _add(parser, "--weight-decay", type=float, default=ProbeConfig.weight_decay)
    _add(parser, "--warmup-steps", type=int, default=ProbeConfig.warmup_steps)
    _add(parser, "--grad-clip", type=float, default=ProbeConfig.grad_clip)
    _add(parser, "--eval-every", type=int, default=ProbeConfig.eval_every)
    _add(parser, "--seed", type=int, default=ProbeConfig.seed)
    _add(parser, "--rprobe_depth", type=int, default=None, help="decoder layers copied (default ceil(L/4))")
    _add(parser, "--rprobe_head_hidden", type=int, default=None, help="MLP head width (default: LLM hidden size)")
    _add(parser, "--rprobe_bidirectional", type=_bool, nargs="?", const=True, default=False,
         help="full attention instead of the LLM's causal mask")
    _add(parser, "--rprobe_norm_init", choices=NORM_INITS, default="llm",
         help="probe RMSNorm: copy of the LLM's final norm (llm) or fresh (ones)")
    _add(parser, "--rprobe_conditional", type=_bool, nargs="?", const=True, default=False,
         help="[context image ; text ; target crop] -> reconstruct the crop")
    _add(parser, "--rprobe_text", type=_bool, default=True, help="conditional: include the text prompt")
    _add(parser, "--rprobe_max_text_tokens", type=int, default=ProbeConfig.max_text_tokens)
    _add(parser, "--rprobe_crop_fraction", type=float, default=ProbeConfig.crop_fraction,
         help="conditional: side of the centred default crop, as a fraction of the image")
    _add(parser, "--eval-max-images", type=int, default=None)
    _add(parser, "--baseline-max-images", type=int, default=ProbeConfig.baseline_max_images)
    _add(parser, "--grid-images", type=int, default=ProbeConfig.grid_images)
    _add(parser, "--num-workers", type=int, default=0)
    _add(parser, "--cache-images", type=_bool, nargs="?", const=True, default=False,
         help="keep processed images in memory (small data sets; with --num-workers 0)")
    _add(parser, "--threshold", type=float, default=None, help="MSE threshold for steps-to-threshold")
    _add(parser, "--threshold-fraction", type=float, default=0.5,
         help="without --threshold: this fraction of the trivial predictor's held-out MSE")
    _add(parser, "--bf16", type=_bool, nargs="?", const=True, default=False, help="MLLM (and DeepSpeed) in bf16")
    _add(parser, "--device", default=None, help="single process: cuda / cpu (default cuda when available)")
    _add(parser, "--deepspeed", default=None, help="DeepSpeed json (ZeRO-3: scripts/zero3/zero3.json)")
    _add(parser, "--dump-init", type=_bool, nargs="?", const=True, default=False,
         help="write the probe's initial (gathered) weights to OUTPUT_DIR/<name>/rprobe_init.bin")
    _add(parser, "--save-every", type=int, default=ProbeConfig.save_every,
         help="training checkpoint every N steps in OUTPUT_DIR/<name>/checkpoint-N; the same command resumes "
              "from the newest complete one (0: none)")
    _add(parser, "--save-total-limit", type=int, default=ProbeConfig.save_total_limit,
         help="keep the newest N training checkpoints (0: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.rprobe_stage", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a probe on one checkpoint")
    _add(train, "--model-path", required=True)
    _common(train)
    compare = sub.add_parser("compare", help="same probe budget on several checkpoints; JSON report + PNGs")
    _add(compare, "--checkpoints", nargs="+", required=True)
    _common(compare)
    ev = sub.add_parser("eval", help="evaluate saved probe weights on held-out images")
    _add(ev, "--model-path", required=True)
    _add(ev, "--probe-path", required=True)
    _common(ev)
    return parser


def config_from_args(args) -> ProbeConfig:
    cfg = ProbeConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
                      eval_every=args.eval_every, seed=args.seed, depth=args.rprobe_depth,
                      head_hidden=args.rprobe_head_hidden, bidirectional=args.rprobe_bidirectional,
                      norm_init=args.rprobe_norm_init, conditional=args.rprobe_conditional,
                      use_text=args.rprobe_text, max_text_tokens=args.rprobe_max_text_tokens,
                      crop_fraction=args.rprobe_crop_fraction, eval_max_images=args.eval_max_images,
                      baseline_max_images=args.baseline_max_images, grid_images=args.grid_images,
                      num_workers=args.num_workers, cache_images=args.cache_images,
                      save_every=args.save_every, save_total_limit=args.save_total_limit)
    cfg.validate()
    return cfg


def _datasets(args, cfg: ProbeConfig, ckpt: LoadedCheckpoint, need_train: bool = True
              ) -> Tuple[Optional[ProbeImageSet], ProbeImageSet]:
    kwargs = dict(processor=ckpt.processor, model_config=ckpt.model.config, tokenizer=ckpt.tokenizer,
                  conditional=cfg.conditional, use_text=cfg.use_text, max_text_tokens=cfg.max_text_tokens,
                  crop_fraction=cfg.crop_fraction, cache=cfg.cache_images)
    train_entries = eval_entries = None
    if args.eval_data_path is None:
        if not args.eval_holdout or args.data_path is None:
            raise ValueError("held-out images are needed: pass --eval-data-path, or --eval-holdout N with --data-path")
        entries = [(i, e) for i, e in enumerate(read_entries(args.data_path)) if "image" in e]
        if args.eval_holdout >= len(entries):
            raise ValueError(f"--eval-holdout={args.eval_holdout} leaves no training image of {len(entries)}")
        train_entries, eval_entries = entries[: -args.eval_holdout], entries[-args.eval_holdout:]
    train_set = None
    if need_train:
        if args.data_path is None or args.image_folder is None:
            raise ValueError("--data-path and --image-folder are required to train a probe")
        train_set = ProbeImageSet(args.data_path, args.image_folder, entries=train_entries, **kwargs)
    eval_path = args.eval_data_path or args.data_path
    eval_folder = args.eval_image_folder or args.image_folder
    if eval_folder is None:
        raise ValueError("--eval-image-folder (or --image-folder) is required")
    eval_set = ProbeImageSet(eval_path, eval_folder, entries=eval_entries, **kwargs).subset(cfg.eval_max_images)
    return train_set, eval_set


def _setup(args) -> Tuple[Optional[Dict], Optional[str], torch.dtype]:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.deepspeed:
        init_deepspeed_distributed(torch.cuda.is_available())
        return args.deepspeed, None, dtype
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("several processes without --deepspeed: the plain loop runs on one process; "
                         "pass --deepspeed scripts/zero3/zero3.json under the deepspeed launcher")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return None, device, dtype


def _load(args, path: str, ds_config: Optional[Dict], device: Optional[str], dtype: torch.dtype) -> LoadedCheckpoint:
    with _deepspeed_loading(ds_config if ds_config and ds_config["zero_optimization"].get("stage") == 3 else None):
        return load_checkpoint(path, args.model_base, dtype=dtype, device=device)


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


def command_compare(args, checkpoints: Sequence[str]) -> Dict[str, Any]:
    """Train one probe per checkpoint with identical seed, data and budget; write report.json + PNGs."""
    cfg = config_from_args(args)
    ds_path, device, dtype = _setup(args)
    ds_config = deepspeed_config(ds_path, cfg, args.bf16) if ds_path else None
    os.makedirs(args.output_dir, exist_ok=True)
    names = _short_names(checkpoints)
    results, trivial, reference = [], None, None
    for name, path in zip(names, checkpoints):
        ckpt = _load(args, path, ds_config, device, dtype)
        norm = {"geometry": ckpt.geometry.as_dict(), "mean": ckpt.mean, "std": ckpt.std,
                "image_aspect_ratio": getattr(ckpt.model.config, "image_aspect_ratio", None)}
        if reference is None:
            reference = (path, norm)
        elif norm != reference[1]:
            raise ProbeMismatchError(f"{path} sees images as {norm}, {reference[0]} as {reference[1]}; compare needs "
                                     f"the same processed image size, token grid, normalisation and aspect handling")
        train_set, eval_set = _datasets(args, cfg, ckpt)
        if trivial is None:
            trivial = trivial_baseline(train_set, eval_set, cfg, ckpt.mean, ckpt.std)
            _log(f"trivial predictor (mean of {trivial['train_images']} training images): held-out mse "
                 f"{trivial['mse']:.4f}, psnr {trivial['psnr']:.2f} dB")
        run_dir = os.path.join(args.output_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        result = run_probe(ckpt, train_set, eval_set, cfg, ds_config,
                           dump_init=os.path.join(run_dir, "rprobe_init.bin") if args.dump_init else None,
                           checkpoint_dir=run_dir)
        if _rank() == 0:
            save_probe(os.path.join(run_dir, PROBE_FILE), result["state_dict"], result["meta"])
        result["probe_path"] = os.path.join(run_dir, PROBE_FILE)
        result["checkpoint"], result["name"] = os.path.abspath(path), name
        result["data"] = {"train_images": len(train_set), "eval_images": len(eval_set),
                          "train_entries_without_image": train_set.skipped_without_image}
        result.pop("probe", None)
        results.append(result)
        del ckpt
        gc.collect()
    threshold, source = _threshold(args, trivial["mse"])
    for result in results:
        result["steps_to_threshold"] = steps_to_threshold([r["step"] for r in result["history"]],
                                                          [r["mse"] for r in result["history"]], threshold)
    report = {
        "what": "R-Probe: held-out pixel reconstruction from projected visual tokens by a copy of the LLM's first "
                "ceil(L/4) decoder layers + MLP head; MLLM frozen",
        "units": {"mse": "mean squared error in the image processor's normalised units ((x/255 - mean) / std), "
                         "mean over held-out images",
                  "psnr": "dB on [0, 1] pixels after un-normalising (clamped), mean over held-out images",
                  "pixel_layout": PIXEL_LAYOUT},
        "normalisation": {"image_mean": reference[1]["mean"], "image_std": reference[1]["std"]},
        "threshold": {"mse": threshold, "source": source,
                      "resolution_steps": cfg.eval_every, "rule": "first evaluated step with held-out mse < threshold"},
        "trivial": {k: v for k, v in trivial.items() if k != "mean_image"},
        "config": {**asdict(cfg), "deepspeed": ds_path, "world_size": _world_size(), "bf16": bool(args.bf16),
                   "data_path": args.data_path, "eval_data_path": args.eval_data_path,
                   "eval_holdout": args.eval_holdout, "model_base": args.model_base},
        "checkpoints": [_public(r) for r in results],
    }
    if _rank() == 0:
        mean, std = reference[1]["mean"], reference[1]["std"]
        report["pictures"] = write_pictures(args.output_dir, names, results, mean, std, threshold, trivial["mse"])
        _write_json(os.path.join(args.output_dir, "report.json"), report)
        for result in report["checkpoints"]:
            _log(f"{result['name']}: final held-out mse {result['final']['mse']:.4f} (trivial {trivial['mse']:.4f}), "
                 f"psnr {result['final']['psnr']:.2f} dB, steps to mse < {threshold:.4g}: "
                 f"{result['steps_to_threshold']}, {result['seconds_per_step'] * 1000:.1f} ms/step")
        _log(f"report: {os.path.join(args.output_dir, 'report.json')}")
    return report


def command_eval(args) -> Dict[str, Any]:
    if args.deepspeed:
        raise SystemExit("eval runs in one process; drop --deepspeed")
    cfg = config_from_args(args)
    _, device, dtype = _setup(args)
    ckpt = _load(args, args.model_path, None, device, dtype)
    probe, meta = load_probe(args.probe_path, ckpt)
    # the held-out inputs are built the way the probe was trained on them
    cfg.conditional = bool(meta["conditional"])
    cfg.use_text, cfg.max_text_tokens = meta["use_text"], meta["max_text_tokens"]
    cfg.crop_fraction = meta["crop_fraction"]
    _, eval_set = _datasets(args, cfg, ckpt, need_train=False)
    runner = ProbeRunner(ckpt.model, probe, ckpt.geometry, cfg.conditional).eval()
    metrics = evaluate(runner, eval_set, ckpt.geometry, cfg, next(ckpt.model.parameters()).device,
                       ckpt.mean, ckpt.std, keep=cfg.grid_images)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = [[to_pil(t, ckpt.mean, ckpt.std), to_pil(p, ckpt.mean, ckpt.std)] for t, p in metrics["samples"]]
    report = {"checkpoint": os.path.abspath(args.model_path), "probe_path": os.path.abspath(args.probe_path),
              "mse": metrics["mse"], "psnr": metrics["psnr"], "num_images": metrics["num_images"], "probe_meta": meta}
    if rows:
        report["reconstructions"] = os.path.join(args.output_dir, "reconstructions.png")
        _save_image(reconstruction_grid(rows, ["original", "probe"]), report["reconstructions"])
    _write_json(os.path.join(args.output_dir, "eval.json"), report)
    _log(f"held-out mse {metrics['mse']:.4f}, psnr {metrics['psnr']:.2f} dB on {metrics['num_images']} images")
    return report


def _strip_local_rank(argv: Sequence[str]) -> List[str]:
    """The deepspeed launcher puts --local_rank=N before the sub-command; the rank is also in $LOCAL_RANK."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            rest.append(arg)
    return rest


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line, returning the report (``main`` is the console entry point and returns nothing)."""
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            return command_eval(args)
        checkpoints = args.checkpoints if args.command == "compare" else [args.model_path]
        report = command_compare(args, checkpoints)
        if args.command == "train" and _rank() == 0:
            # one checkpoint: its probe also goes beside report.json at the top of the output folder
            only = report["checkpoints"][0]
            with atomic_file(os.path.join(args.output_dir, PROBE_FILE)) as temporary:
                shutil.copyfile(only["probe_path"], temporary)
        return report
    finally:
        _close_process_group()


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Auxiliary-loss mode: LM loss + λ · probe loss during ordinary LLaVA training.
# --------------------------------------------------------------------------------------------------
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
class RProbeTrainingArguments(DSLTrainingArguments):
    rprobe_aux_weight: float = field(default=0.0, metadata={
        "help": "λ: add λ · R-Probe pixel MSE to the LM loss (0 = plain training, bit for bit)."})
    rprobe_bidirectional: bool = field(default=False, metadata={
        "help": "aux probe attends bidirectionally instead of causally."})


class RProbeAuxTrainer(DSLTrainer):
    """DSLTrainer whose loss is LM loss + λ · probe loss; the probe rides on the model as ``rprobe_head``.

    λ = 0 attaches nothing and defers to DSLTrainer, so training is unchanged bit for bit.
    """

    def __init__(self, model=None, args=None, **kwargs):
        weight = float(getattr(args, "rprobe_aux_weight", 0.0) or 0.0)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--rprobe_aux_weight={weight}: expected a finite value >= 0")
        self.rprobe_aux_weight = weight
        self._rprobe_losses: List[float] = []
        if weight:
            attach_aux_probe(model, bidirectional=bool(getattr(args, "rprobe_bidirectional", False)),
                             seed=int(getattr(args, "seed", 0)))
        super().__init__(model=model, args=args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False):
        if not self.rprobe_aux_weight:
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
        self._rprobe_losses.append(float(probe_loss.detach()))
        total = loss + self.rprobe_aux_weight * probe_loss
        return (total, outputs) if return_outputs else total

    def log(self, logs: Dict[str, float]) -> None:
        if self._rprobe_losses and "loss" in logs:
            logs["rprobe_loss"] = round(sum(self._rprobe_losses) / len(self._rprobe_losses), 4)
            self._rprobe_losses.clear()
        super().log(logs)


if __name__ == "__main__":
    main()
