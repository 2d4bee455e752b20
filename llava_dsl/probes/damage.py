"""Is the shallow tower damaged? Linear probes on the frozen features of each tapped block.

    python -m llava_dsl.probes damage CKPT [CKPT ...] [--reference TOWER] [--layers 1,2,3] --output damage.json

For every tower (each checkpoint's, and the reference: by default the pretrained tower a LLaVA-1.5 checkpoint
names in ``mm_vision_tower``) and every probed hidden state (default: the main layer and the taps of the first
checkpoint), two probes are fitted on the patch tokens of ``num_train`` renders and scored on ``num_test`` others:

- ``glyph_accuracy``: which digit is centred in the patch (the patches that hold one, 10 classes), a least-squares
  linear classifier (ridge regression on one-hot targets, argmax);
- ``pixel_r2``: ridge regression of the patch's own (normalised) pixels; R^2 = 1 - SSE / SS around the training
  mean, over all held-out patches and channels.

The images are the digit strings of the package's renderer (``assets.pretrained.render_batch``: training font
sizes and strings for the fit, held-out ones for the score) at the tower's own image and patch size, the same
images for every tower. The fit is closed form in float64 (streamed sums of X^T X and X^T Y, so memory does not
grow with the number of renders); nothing is random but the renders, which follow from ``seed``: the same
command gives the same numbers on one machine. A drop against the reference at a tapped layer is damage.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from llava_dsl.probes.towers import ProbeError, Tower, load_tower

NUM_CLASSES = 10  # digits: the glyph probe's classes (patches without a centred digit are left out)


@dataclass(frozen=True)
class DamageSettings:
    num_train: int = 1500
    num_test: int = 800
    seed: int = 0
    ridge: float = 1e-3        # the penalty, relative to the mean eigenvalue of the feature covariance
    batch_size: int = 64
    min_digits: int = 2
    max_digits: int = 5


def _batches(image_size: int, patch_size: int, count: int, heldout: bool, settings: DamageSettings):
    """(pixels [B, 3, S, S], glyph targets [B, P] (0 none, 1 + digit), pixel targets [B, P, 3 * p * p])."""
    from llava_dsl.assets.pretrained import render_batch, tower_settings

    shape = tower_settings("dense", image_size=image_size, patch_size=patch_size, min_digits=settings.min_digits,
                           max_digits=settings.max_digits)
    rng = random.Random(f"damage-probe-{settings.seed}-{'test' if heldout else 'train'}")
    done = 0
    while done < count:
        n = min(settings.batch_size, count - done)
        pixels, targets = render_batch(shape, rng, n, heldout)
        grid = image_size // patch_size
        patches = pixels.reshape(n, 3, grid, patch_size, grid, patch_size).permute(0, 2, 4, 1, 3, 5)
        yield pixels, targets["dense"], patches.reshape(n, grid * grid, -1)
        done += n


@torch.no_grad()
def _features(tower: Tower, pixels: torch.Tensor, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Patch tokens (CLS dropped) of each hidden state, float64, [B * P, C]."""
    device = next(tower.clip.parameters()).device
    states = tower.clip(pixel_values=pixels.to(device), output_hidden_states=True).hidden_states
    return {layer: states[layer][:, 1:].reshape(-1, states[layer].shape[-1]).double().cpu() for layer in layers}


class _Ridge:
    """Ridge regression with an intercept from streamed sums (centred in closed form at the end)."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.sxx, self.sxy = x.T @ x, x.T @ y
        else:
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.sxx += x.T @ x
            self.sxy += x.T @ y
        self.n += x.shape[0]

    def fit(self, ridge: float):
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx / self.n - torch.outer(mx, mx)
        cxy = self.sxy / self.n - torch.outer(mx, my)
        penalty = ridge * float(torch.diagonal(cxx).mean()) + 1e-12
        weight = torch.linalg.solve(cxx + penalty * torch.eye(cxx.shape[0], dtype=cxx.dtype), cxy)
        self.weight, self.bias, self.y_mean = weight, my - mx @ weight, my
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def probe_tower(tower: Tower, layers: Sequence[int], settings: DamageSettings = DamageSettings()) -> Dict[int, dict]:
    """{layer: {"glyph_accuracy", "pixel_r2", "glyph_patches", "patches"}} of one tower."""
    config = tower.clip.config
    size, patch = int(config.image_size), int(config.patch_size)
    bad = [layer for layer in layers if not 0 <= layer <= tower.num_blocks]
    if bad:
        raise ProbeError(f"layers {bad}: out of range for {tower.source}'s tower of {tower.num_blocks} blocks "
                         f"(hidden states 0..{tower.num_blocks})")
    glyph = {layer: _Ridge() for layer in layers}
    pixel = {layer: _Ridge() for layer in layers}
    for pixels, classes, targets in _batches(size, patch, settings.num_train, False, settings):
        feats = _features(tower, pixels, layers)
        classes, targets = classes.reshape(-1), targets.reshape(-1, targets.shape[-1]).double()
        has_glyph = classes > 0
        one_hot = torch.nn.functional.one_hot(classes[has_glyph] - 1, NUM_CLASSES).double()
        for layer in layers:
            glyph[layer].add(feats[layer][has_glyph], one_hot)
            pixel[layer].add(feats[layer], targets)
    for layer in layers:
        if glyph[layer].n == 0:
            raise ProbeError(f"no patch of the {settings.num_train} training renders holds a digit's centre")
        glyph[layer].fit(settings.ridge)
        pixel[layer].fit(settings.ridge)
    right = {layer: 0 for layer in layers}
    sse = {layer: 0.0 for layer in layers}
    sst, glyph_patches, patches = 0.0, 0, 0
    for pixels, classes, targets in _batches(size, patch, settings.num_test, True, settings):
        feats = _features(tower, pixels, layers)
        classes, targets = classes.reshape(-1), targets.reshape(-1, targets.shape[-1]).double()
        has_glyph = classes > 0
        glyph_patches += int(has_glyph.sum())
        patches += targets.shape[0]
        sst += float(((targets - pixel[layers[0]].y_mean) ** 2).sum())
        for layer in layers:
            predicted = glyph[layer].predict(feats[layer][has_glyph]).argmax(-1) + 1
            right[layer] += int((predicted == classes[has_glyph]).sum())
            sse[layer] += float(((pixel[layer].predict(feats[layer]) - targets) ** 2).sum())
    return {layer: {"glyph_accuracy": right[layer] / max(1, glyph_patches),
                    "pixel_r2": 1.0 - sse[layer] / sst if sst > 0 else float("nan"),
                    "glyph_patches": glyph_patches, "patches": patches} for layer in layers}


def _describe(tower: Tower) -> dict:
    return {"source": tower.source, "kind": tower.kind, "trained_tower": tower.trained, "main": tower.main,
            "taps": list(tower.taps), "detached": list(tower.detached), **({"note": tower.note} if tower.note else {})}


def damage_probe(checkpoints: Sequence[str], reference: Optional[str] = None, layers: Optional[Sequence[int]] = None,
                 settings: DamageSettings = DamageSettings(), device: str = "cpu", log=print) -> dict:
    """Probe each checkpoint's tower and the reference tower on the same renders; returns the JSON-ready report.

    ``reference``: a CLIP folder or any checkpoint ``load_tower`` reads; default the ``mm_vision_tower`` of the
    first LLaVA-1.5 checkpoint (a Hugging Face folder names no pretrained tower: pass ``--reference``, e.g. the
    base model's folder, or go without). ``layers``: hidden-state indices; default the first checkpoint's main
    layer and taps. Per checkpoint, ``vs_reference`` holds checkpoint - reference for every probed layer."""
    if not checkpoints:
        raise ProbeError("damage: expected at least one checkpoint")
    towers = []
    for path in checkpoints:
        tower = load_tower(path)
        tower.clip.to(device)
        towers.append(tower)
    first = towers[0]
    if layers is None:
        layers = sorted(first.concat_order)
    layers = [int(layer) for layer in layers]
    if reference is None and first.kind == "llava":
        from llava_dsl.export_hf import resolve_tower
        from llava_dsl.probes.towers import read_config

        reference = resolve_tower(read_config(first.source), None, first.source)
    report = {"settings": asdict(settings), "layers": layers, "reference": None, "checkpoints": {}}
    ref_scores = None
    if reference is not None:
        ref = load_tower(reference)
        ref.clip.to(device)
        log(f"llava_dsl.probes damage: reference {ref.source}")
        ref_scores = probe_tower(ref, layers, settings)
        report["reference"] = {**_describe(ref), "layers": {str(k): v for k, v in ref_scores.items()}}
    for tower in towers:
        log(f"llava_dsl.probes damage: {tower.source}")
        scores = probe_tower(tower, layers, settings)
        entry = {**_describe(tower), "layers": {str(k): v for k, v in scores.items()}}
        if ref_scores is not None:
            entry["vs_reference"] = {str(k): {m: scores[k][m] - ref_scores[k][m] for m in ("glyph_accuracy", "pixel_r2")}
                                     for k in layers}
        report["checkpoints"][tower.source] = entry
    return report


def table(report: dict) -> str:
    """A plain-text table of a report: one row per tower and layer."""
    lines = [f"{'tower':<48} {'layer':>5} {'role':<9} {'glyph acc':>9} {'pixel R2':>9}"]
    rows: List = []
    if report.get("reference"):
        rows.append(("reference " + report["reference"]["source"], report["reference"]))
    rows += list(report["checkpoints"].items())
    for name, entry in rows:
        for layer, values in entry["layers"].items():
            layer_i = int(layer)
            role = "main" if layer_i == entry["main"] else "detached" if layer_i in entry["detached"] else \
                "tap" if layer_i in entry["taps"] else ""
            shown = name if len(name) <= 48 else "..." + name[-45:]
            lines.append(f"{shown:<48} {layer_i:>5} {role:<9} {values['glyph_accuracy']:>9.4f} "
                         f"{values['pixel_r2']:>9.4f}")
    return "\n".join(lines)


def _check_finite(report: dict) -> None:
    for entry in [report.get("reference")] + list(report["checkpoints"].values()):
        for layer, values in (entry or {}).get("layers", {}).items():
            if not all(math.isfinite(v) for v in (values["glyph_accuracy"], values["pixel_r2"])):
                raise ProbeError(f"{entry['source']} layer {layer}: a probe gave a non-finite score {values}")
