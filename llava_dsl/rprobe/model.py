"""R-Probe core: can the LLM's own first layers decode projected visual tokens back to pixels?

Plain torch (plus transformers' Llama decoder layer); no ``llava`` import. The parts:

* ``RProbe``: a copy of the LLM's first ``ceil(L / 4)`` decoder layers, an RMSNorm and an MLP head that
  regresses, for every visual token, the pixels of the image region it covers.
* ``ProbeGeometry``: which pixels belong to which token (square token grid over the processed image,
  optional leading CLS token whose output is not regressed).
* ``patchify`` / ``unpatchify``: targets in the head's layout. Per token the head predicts
  ``region * region * 3`` values ordered (row, column, channel), channel last, rows top to bottom.
* Metrics: pixel MSE in the processor's normalised units and PSNR on [0, 1] pixels after un-normalising;
  ``steps_to_threshold`` for the "steps until held-out MSE < t" comparison.
* ``build_conditional_sequence``: ``[context image tokens ; text tokens ; target-crop tokens]``, only the
  target crop is reconstructed.

The probe sees the tokens the way the LLM does: a causal mask and the LLM's rotary positions ``0..n-1``;
``bidirectional=True`` switches to full attention (a diagnostic variant, not what the LLM does).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llava_dsl.compat.deepspeed import gathered

PIXEL_LAYOUT = "per token: region x region x 3, ordered (row, column, channel), channel last"

NORM_INITS = ("llm", "ones")


class ProbeMismatchError(ValueError):
    """Probe weights or geometry that do not fit the checkpoint they are used with."""


def probe_depth(num_llm_layers: int) -> int:
    """ceil(L / 4): the first quarter of the LLM's decoder layers (at least one)."""
    if num_llm_layers < 1:
        raise ValueError(f"num_llm_layers={num_llm_layers}: the LLM needs at least one decoder layer")
    return max(1, math.ceil(num_llm_layers / 4))


@dataclass(frozen=True)
class ProbeGeometry:
    image_size: int  # side of the processed (square) image, pixels
    grid: int  # tokens per side
    has_cls: bool = False  # the first token is CLS (mm_vision_select_feature='cls_patch'); not regressed
    channels: int = 3

    def __post_init__(self):
        if self.grid < 1 or self.image_size % self.grid:
            raise ProbeMismatchError(
                f"a {self.grid}x{self.grid} token grid does not tile a {self.image_size}-pixel image evenly")

    @property
    def region(self) -> int:
        return self.image_size // self.grid

    @property
    def num_patch_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        return self.num_patch_tokens + int(self.has_cls)

    @property
    def pixels_per_token(self) -> int:
        return self.region * self.region * self.channels

    def as_dict(self) -> Dict:
        return asdict(self)

    def check_tokens(self, num_tokens: int, image_size: int, source: str) -> None:
        """Fail clearly when the visual tokens do not form the grid this geometry assumes."""
        if num_tokens != self.num_tokens or image_size != self.image_size:
            raise ProbeMismatchError(
                f"{source}: got {num_tokens} visual tokens for a {image_size}-pixel image, expected "
                f"{self.num_tokens} ({self.grid}x{self.grid} patch tokens{' + CLS' if self.has_cls else ''}) "
                f"for a {self.image_size}-pixel image; the probe maps each token to one square image region, "
                f"so token pooling / anyres tiling is not supported")


class CheckpointError(ValueError):
    """A checkpoint the probe cannot run on."""


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


def patchify(pixels: torch.Tensor, region: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, (S/region)^2, region*region*C], tokens row-major, pixels (row, col, channel)."""
    b, c, h, w = pixels.shape
    if h % region or w % region:
        raise ValueError(f"image {h}x{w} is not a multiple of the token region {region}")
    gh, gw = h // region, w // region
    x = pixels.reshape(b, c, gh, region, gw, region)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, region * region * c)


def unpatchify(patches: torch.Tensor, region: int, grid: int, channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``: [B, grid^2, region*region*C] -> [B, C, grid*region, grid*region]."""
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, region, region, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * region, grid * region)


def unnormalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Processor-normalised [B, 3, H, W] -> [0, 1] pixels (x * std + mean), not clamped."""
    m = torch.as_tensor(list(mean), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return pixels * s + m


def per_image_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (first axis), over every other axis; float32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr_from_mse(mse: torch.Tensor, peak: float = 1.0, floor: float = 1e-10) -> torch.Tensor:
    """PSNR in dB for an MSE measured on pixels in [0, peak]; the MSE is floored so a perfect match stays finite."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10(peak ** 2 / mse.clamp_min(floor))


def per_image_psnr(prediction: torch.Tensor, target: torch.Tensor, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """PSNR per image on [0, 1] pixels: both un-normalised, both clamped to the displayable range."""
    p = unnormalise(prediction.float(), mean, std).clamp(0, 1)
    t = unnormalise(target.float(), mean, std).clamp(0, 1)
    return psnr_from_mse(per_image_mse(p, t))


def steps_to_threshold(steps: Sequence[int], values: Sequence[float], threshold: float) -> Optional[int]:
    """First evaluated step whose value is strictly below ``threshold``; None if none is.

    Resolution is the evaluation interval: the true crossing lies between the previous evaluation and this one.
    """
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    for step, value in zip(steps, values):
        if value < threshold:
            return int(step)
    return None


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel MSE in normalised units, computed in float32 whatever the probe's dtype."""
    return F.mse_loss(prediction.float(), target.float())


def attention_bias(key_mask: torch.Tensor, bidirectional: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: causal (the LLM's view) or full, and padded keys hidden.

    With right padding every query keeps at least key 0, so no row is fully masked.
    """
    b, t = key_mask.shape
    allowed = key_mask[:, None, None, :].expand(b, 1, t, t)
    if not bidirectional:
        causal = torch.ones(t, t, dtype=torch.bool, device=key_mask.device).tril()
        allowed = allowed & causal
    bias = torch.zeros(b, 1, t, t, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def build_conditional_sequence(context: torch.Tensor, text: Sequence[torch.Tensor],
                               target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample ``[context tokens ; its text tokens ; target-crop tokens]``, right-padded.

    context: [B, Nc, H]; text: B tensors [T_i, H] (T_i may be 0); target: [B, Nt, H].
    Returns (embeds [B, L, H], key_mask [B, L] bool, target_index [B, Nt]) where target_index holds the
    sequence positions of the target tokens, i.e. the only positions the head reads.
    """
    b, nc, h = context.shape
    nt = target.shape[1]
    if len(text) != b or target.shape[0] != b:
        raise ValueError(f"batch sizes differ: context {b}, text {len(text)}, target {target.shape[0]}")
    lengths = [nc + int(t.shape[0]) + nt for t in text]
    total = max(lengths)
    embeds = context.new_zeros(b, total, h)
    key_mask = torch.zeros(b, total, dtype=torch.bool, device=context.device)
    target_index = torch.empty(b, nt, dtype=torch.long, device=context.device)
    for i, t in enumerate(text):
        ti = int(t.shape[0])
        embeds[i, :nc] = context[i]
        if ti:
            embeds[i, nc:nc + ti] = t.to(context.dtype)
        embeds[i, nc + ti:nc + ti + nt] = target[i]
        key_mask[i, :lengths[i]] = True
        target_index[i] = torch.arange(nc + ti, nc + ti + nt, device=context.device)
    return embeds, key_mask, target_index


class RProbe(nn.Module):
    """``layers`` (copies of LLM decoder layers 0..depth-1) -> ``norm`` -> ``head`` (Linear-GELU-Linear).

    Built from the LLM's (Llama) config so the copied layers have the same shapes and rotary settings.
    Submodule names avoid ``mm_projector`` so LLaVA's substring-based projector save/load never matches them.
    """

    def __init__(self, llm_config, depth: int, pixels_per_token: int, head_hidden: Optional[int] = None,
                 bidirectional: bool = False):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

        config = copy.deepcopy(llm_config)
        # flash-attention layers take a 2D mask; the probe passes an explicit 4D mask (causal or full).
        config._attn_implementation = "eager" if getattr(config, "_attn_implementation", None) == "eager" else "sdpa"
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.depth = depth
        self.bidirectional = bidirectional
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(depth))
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        head_hidden = head_hidden or hidden
        self.head = nn.Sequential(nn.Linear(hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, pixels_per_token))

    @property
    def dtype(self) -> torch.dtype:
        return self.head[0].weight.dtype

    def forward(self, embeds: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                target_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """embeds [B, T, H] -> per-token pixel predictions [B, T, P] (or [B, K, P] at ``target_index``)."""
        b, t, _ = embeds.shape
        h = embeds.to(self.dtype)
        if key_mask is None:
            key_mask = torch.ones(b, t, dtype=torch.bool, device=h.device)
        bias = attention_bias(key_mask, self.bidirectional, h.dtype)
        positions = torch.arange(t, device=h.device).unsqueeze(0).expand(b, t)  # the LLM's positions 0..n-1
        for layer in self.layers:
            h = layer(h, attention_mask=bias, position_ids=positions)[0]
        h = self.norm(h)
        if target_index is not None:
            h = torch.gather(h, 1, target_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.head(h)

    def predict_pixels(self, tokens: torch.Tensor, geometry: ProbeGeometry) -> torch.Tensor:
        """Visual tokens of whole images -> per-patch-token predictions (the CLS output dropped)."""
        out = self(tokens)
        return out[:, 1:] if geometry.has_cls else out


def copy_llm_weights(probe: RProbe, llm_layers: Sequence[nn.Module], llm_norm: Optional[nn.Module],
                     norm_init: str = "llm") -> None:
    """Initialise ``probe.layers[i]`` from ``llm_layers[i]`` (and the norm from the LLM's final norm).

    ZeRO-3 safe: source and destination are gathered one layer at a time (never a copy of empty partitions);
    rank 0's copy is what every rank keeps.
    """
    if norm_init not in NORM_INITS:
        raise ValueError(f"norm_init={norm_init!r}: expected one of {NORM_INITS}")
    if len(llm_layers) < probe.depth:
        raise ProbeMismatchError(f"the probe copies {probe.depth} layers but the LLM has only {len(llm_layers)}")
    pairs: List[Tuple[nn.Module, nn.Module]] = [(probe.layers[i], llm_layers[i]) for i in range(probe.depth)]
    if norm_init == "llm":
        pairs.append((probe.norm, llm_norm))
    for dst, src in pairs:
        dst_params, src_params = dict(dst.named_parameters()), dict(src.named_parameters())
        if set(dst_params) != set(src_params):
            raise ProbeMismatchError(
                f"probe module parameters {sorted(dst_params)} differ from the LLM's {sorted(src_params)}")
        with gathered(src_params.values()), gathered(dst_params.values(), modifier_rank=0):
            with torch.no_grad():
                for name, p in dst_params.items():
                    s = src_params[name]
                    if p.shape != s.shape:
                        raise ProbeMismatchError(f"{name}: probe shape {tuple(p.shape)} vs LLM {tuple(s.shape)}")
                    p.copy_(s.to(p.dtype))
    if norm_init == "ones":
        with gathered(list(probe.norm.parameters()), modifier_rank=0), torch.no_grad():
            probe.norm.weight.fill_(1.0)


def weight_differences(probe: RProbe, llm_layers: Sequence[nn.Module], llm_norm: Optional[nn.Module] = None
                       ) -> Dict[str, float]:
    """Max |probe - LLM| per copied tensor, keyed ``layers.i.<name>`` (and ``norm.weight``); gathers under ZeRO-3."""
    result: Dict[str, float] = {}
    pairs = [(f"layers.{i}.", probe.layers[i], llm_layers[i]) for i in range(probe.depth)]
    if llm_norm is not None:
        pairs.append(("norm.", probe.norm, llm_norm))
    for prefix, dst, src in pairs:
        dst_params, src_params = dict(dst.named_parameters()), dict(src.named_parameters())
        with gathered(src_params.values()), gathered(dst_params.values()):
            for name, p in dst_params.items():
                s = src_params[name]
                result[prefix + name] = (float((p.detach().float() - s.detach().float()).abs().max())
                                         if p.shape == s.shape else float("inf"))
    return result
