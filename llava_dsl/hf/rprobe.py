"""R-Probe on the stock Hugging Face path: can the language model's own first layers decode a stock Llava model's
visual tokens back to pixels? (docs/rprobe.md explains the probe; docs/hf.md this entry point.)

    python -m llava_dsl.hf.rprobe --model_name_or_path MODEL --data_path data.json --image_folder images/ \\
        --output_dir probe_out --max_steps 2000 --eval_every 50 --threshold 0.1

The visual tokens are ``get_image_features`` of the frozen model (vision tower, feature layers, projector), computed
once. The probe is a copy of the first ``ceil(L / 4)`` decoder layers of the language model (whatever its class:
the copy is of the modules themselves, so transformers 4.57 and 5.x layers alike, with the model's own rotary
embedding passed as ``position_embeddings``), the model's final norm, and an MLP head regressing each token's
``r x r x 3`` pixel region (``llava_dsl.rprobe.model``: geometry, targets, metrics and steps-to-threshold are the
LLaVA-1.5 stage's). Reported in ``report.json``: held-out MSE (normalised units) and PSNR per evaluation, the
trivial predictor's, steps to each threshold, and the initial-copy check (max |probe - LM| per tensor, 0).

One process on one device (``--device``: cpu, cuda or auto). The frozen model runs in ``--dtype`` (float32,
bfloat16, float16) and encodes ``--eval_batch_size`` images per forward; the tokens are cached on the CPU in that dtype
and moved to the device a batch at a time. The probe keeps float32 weights (its copy of the LM is exact) and runs under
autocast in ``--dtype``. The held-out set is evaluated ``--eval_batch_size`` images at a time; its metrics are
per-image means, so the batch size does not change them. Llava only: LLaVA-NeXT's anyres tiles and Qwen3-VL's merged
patches do not map one token to one square image region.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from llava_dsl.rprobe.model import (ProbeGeometry, attention_bias, patchify, per_image_mse, per_image_psnr, probe_depth,
                                    reconstruction_loss, steps_to_threshold, unpatchify)


class HFRProbe(nn.Module):
    """``layers`` (copies of the LM's decoder layers 0..depth-1) -> ``norm`` (copy of its final norm) -> ``head``.

    Causal attention and positions ``0..n-1`` as the LM sees image tokens (``bidirectional=True``: full attention,
    a diagnostic variant). ``rotary`` is a copy of the LM's rotary embedding (no parameters).
    """

    def __init__(self, language_model: nn.Module, depth: int, pixels_per_token: int,
                 head_hidden: Optional[int] = None, bidirectional: bool = False):
        super().__init__()
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) < depth:
            raise ValueError(f"{type(language_model).__name__}: expected .layers with at least {depth} decoder "
                             f"layers, found {type(layers).__name__} of {len(layers) if layers is not None else 0}")
        self.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(depth))
        self.norm = copy.deepcopy(language_model.norm)
        rotary = getattr(language_model, "rotary_emb", None)
        self.rotary = copy.deepcopy(rotary) if rotary is not None else None
        for layer in self.layers:  # the probe passes an explicit 4D mask: eager or SDPA, never flash-attention
            config = getattr(getattr(layer, "self_attn", None), "config", None)
            if config is not None and getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
                config._attn_implementation = "sdpa"
        hidden = language_model.config.hidden_size
        self.depth, self.hidden_size, self.bidirectional = depth, hidden, bidirectional
        head_hidden = head_hidden or hidden
        self.head = nn.Sequential(nn.Linear(hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, pixels_per_token))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [B, T, H] -> per-token pixel predictions [B, T, P]."""
        b, t, _ = embeds.shape
        h = embeds.to(self.head[0].weight.dtype)
        bias = attention_bias(torch.ones(b, t, dtype=torch.bool, device=h.device), self.bidirectional, h.dtype)
        positions = torch.arange(t, device=h.device).unsqueeze(0).expand(b, t)
        kwargs = {"attention_mask": bias, "position_ids": positions}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(h, positions)
        for layer in self.layers:
            out = layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out  # a tuple up to transformers 4.5x, a tensor after
        return self.head(self.norm(h))


def copy_differences(probe: HFRProbe, language_model: nn.Module) -> Dict[str, float]:
    """Max |probe - LM| per copied tensor (``layers.i.<name>``, ``norm.<name>``)."""
    out = {}
    pairs = [(f"layers.{i}.", probe.layers[i], language_model.layers[i]) for i in range(probe.depth)]
    pairs.append(("norm.", probe.norm, language_model.norm))
    for prefix, dst, src in pairs:
        src_params = dict(src.named_parameters())
        for name, p in dst.named_parameters():
            s = src_params.get(name)
            out[prefix + name] = (float((p.detach().float() - s.detach().float()).abs().max())
                                  if s is not None and s.shape == p.shape else float("inf"))
    return out


# --------------------------------------------------------------------------------------------------
# Tokens and targets from a stock Llava model
# --------------------------------------------------------------------------------------------------
def _llava(model):
    from .families import ADAPTERS, DSLError, adapter_for

    t = adapter_for(model)
    if not t.token_per_patch:
        fits = ", ".join(name for name, family in ADAPTERS.items() if family.token_per_patch)
        raise DSLError(f"{t.name}: R-Probe maps each visual token to one square image region; only {fits} (one "
                       f"fixed-size image, a token per patch) fits: {t.no_token_per_patch}")
    return t


@torch.no_grad()
def visual_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, N, H_lm]: what the language model receives for these images (vision tower, feature layers, projector)."""
    t = _llava(model)
    cfg = t.config
    out = t.inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                     vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    features = getattr(out, "pooler_output", out)  # 5.x: an output object; 4.57: a list per image
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def geometry_for(model, pixel_values: torch.Tensor, num_tokens: int) -> ProbeGeometry:
    cfg = _llava(model).config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    geometry = ProbeGeometry(image_size=int(pixel_values.shape[-1]), grid=grid,
                             has_cls=cfg.vision_feature_select_strategy == "full")
    geometry.check_tokens(num_tokens, int(pixel_values.shape[-1]), f"{type(model).__name__} visual tokens")
    return geometry


def load_images(records: Sequence[Dict]) -> List[str]:
    """The distinct image paths of LLaVA-format records, in first-seen order."""
    seen, out = set(), []
    for record in records:
        if record["image"] not in seen:
            seen.add(record["image"])
            out.append(record["image"])
    return out


def pixels(processor, paths: Sequence[str]) -> torch.Tensor:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def batches(n: int, size: int):
    """Index ranges [start, end) of ``n`` items, ``size`` at a time."""
    return ((start, min(start + size, n)) for start in range(0, n, size))


def encode_images(model, processor, paths: Sequence[str], batch_size: int, device: torch.device, dtype: torch.dtype):
    """(tokens [N, T, H] in ``dtype``, targets [N, T', P] float32, geometry), ``batch_size`` images per forward;
    both cached on the CPU (a large set's tokens need not fit on the device)."""
    tokens, targets, geometry = [], [], None
    for start, end in batches(len(paths), batch_size):
        pv = pixels(processor, paths[start:end])
        batch = visual_tokens(model, pv.to(device=device, dtype=dtype))
        if geometry is None:
            geometry = geometry_for(model, pv, batch.shape[1])
        tokens.append(batch.cpu())
        targets.append(patchify(pv.float(), geometry.region))
    return torch.cat(tokens), torch.cat(targets), geometry


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def train_probe(probe: HFRProbe, geometry: ProbeGeometry, train_tokens, train_targets, eval_tokens, eval_targets,
                mean, std, *, max_steps: int, batch_size: int, learning_rate: float, eval_every: int,
                thresholds: Sequence[float], seed: int = 0, eval_batch_size: int = 32,
                autocast_dtype: torch.dtype = torch.float32, log=print) -> Dict:
    """AdamW on the pixel MSE; held-out MSE / PSNR every ``eval_every`` steps (and at 0 and the end), evaluated
    ``eval_batch_size`` images at a time. Tokens and targets may live on the CPU: each batch moves to the probe's
    device; below float32, the probe runs under autocast in ``autocast_dtype``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=0.0)
    image_size, region, grid = geometry.image_size, geometry.region, geometry.grid
    device = probe.head[0].weight.device

    def predict(tokens):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = probe(tokens.to(device))
        return out[:, 1:] if geometry.has_cls else out

    def evaluate(step):
        probe.eval()
        mse, psnr = [], []
        with torch.no_grad():
            for start, end in batches(eval_tokens.shape[0], eval_batch_size):
                prediction = predict(eval_tokens[start:end]).float().cpu()
                target = eval_targets[start:end]
                mse.append(per_image_mse(prediction, target))
                psnr.append(per_image_psnr(unpatchify(prediction, region, grid), unpatchify(target, region, grid),
                                           mean, std))
        mse, psnr = float(torch.cat(mse).mean()), float(torch.cat(psnr).mean())
        probe.train()
        log(f"llava_dsl.hf.rprobe: step {step}: held-out MSE {mse:.5f}, PSNR {psnr:.2f} dB")
        return {"step": step, "mse": mse, "psnr": psnr}

    trivial_pred = train_targets.float().mean(0, keepdim=True).expand_as(eval_targets)
    trivial = {"mse": float(per_image_mse(trivial_pred, eval_targets).mean()),
               "psnr": float(per_image_psnr(unpatchify(trivial_pred, region, grid),
                                            unpatchify(eval_targets, region, grid), mean, std).mean())}
    evals = [evaluate(0)]
    probe.train()
    start = time.time()
    n = train_tokens.shape[0]
    for step in range(1, max_steps + 1):
        index = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss = reconstruction_loss(predict(train_tokens[index]), train_targets[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == max_steps:
            evals.append(evaluate(step))
    steps, values = [e["step"] for e in evals], [e["mse"] for e in evals]
    return {"evals": evals, "trivial": trivial, "final": evals[-1],
            "steps_to_threshold": {str(t): steps_to_threshold(steps, values, t) for t in thresholds},
            "train_seconds": time.time() - start, "image_size": image_size}


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser():
    p = argparse.ArgumentParser(prog="python -m llava_dsl.hf.rprobe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", required=True, help="a stock Llava from_pretrained folder")
    p.add_argument("--data_path", required=True, help="LLaVA-format json list (its images are what is probed)")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_eval_images", type=int, default=None,
                   help="held-out images: the last N distinct images (default: a quarter, at least 1)")
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=8, help="training images per probe step")
    p.add_argument("--eval_batch_size", type=int, default=32,
                   help="images per forward when encoding the images and when evaluating the held-out set")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model and the probe run (auto: cuda when available)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32",
                   help="the frozen model's dtype; the probe keeps float32 weights and runs under autocast in it")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--threshold", type=str, default="0.1",
                   help="held-out MSE threshold(s) for steps-to-threshold, comma-separated (normalised units)")
    p.add_argument("--depth", type=int, default=None, help="decoder layers to copy (default: ceil(L / 4))")
    p.add_argument("--head_hidden", type=int, default=None)
    p.add_argument("--bidirectional", action="store_true", help="full attention instead of the LM's causal mask")
    p.add_argument("--seed", type=int, default=0)
    return p


def _fail(message: str):
    print(f"llava_dsl.hf.rprobe: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> Dict:
    args = _parser().parse_args(argv)
    if min(args.max_steps, args.eval_every, args.batch_size, args.eval_batch_size) < 1:
        _fail(f"--max_steps={args.max_steps} --eval_every={args.eval_every} --batch_size={args.batch_size} "
              f"--eval_batch_size={args.eval_batch_size}: expected positive integers")
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use cpu or auto")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = _DTYPES[args.dtype]
    try:
        thresholds = [float(v) for v in args.threshold.split(",") if v.strip()]
    except ValueError:
        _fail(f"--threshold={args.threshold!r}: expected comma-separated numbers such as '0.1,0.05'")

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_dsl.checkpointing.atomic import atomic_torch_save, atomic_write_text

    from .core import CONFIG_KEY, DSLError
    from .data import DataError, load_llava_json

    try:
        paths = load_images(load_llava_json(args.data_path, args.image_folder))
    except DataError as e:
        _fail(str(e))
    n_eval = args.num_eval_images if args.num_eval_images is not None else max(1, len(paths) // 4)
    if not 1 <= n_eval < len(paths):
        _fail(f"--num_eval_images={n_eval}: expected 1..{len(paths) - 1} ({args.data_path} has {len(paths)} distinct "
              f"images; at least one must remain for training)")
    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    try:
        t = _llava(model)
    except DSLError as e:
        _fail(f"{e} (--model_name_or_path={args.model_name_or_path!r})")
    language_model = t.inner.language_model
    num_layers = len(language_model.layers)
    depth = args.depth or probe_depth(num_layers)
    if not 1 <= depth <= num_layers:
        _fail(f"--depth={depth}: expected 1..{num_layers} (the language model's decoder layers)")

    tokens, targets, geometry = encode_images(model, processor, paths, args.eval_batch_size, device, dtype)
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    probe = HFRProbe(language_model, depth, geometry.pixels_per_token, args.head_hidden, args.bidirectional)
    probe = probe.to(device=device, dtype=torch.float32)  # float32 weights: the copy of the LM is exact
    init_check = copy_differences(probe, language_model)
    if any(v != 0 for v in init_check.values()):
        raise RuntimeError(f"the probe's copy of the LM differs from it: {init_check}")
    split = len(paths) - n_eval
    result = train_probe(probe, geometry, tokens[:split], targets[:split], tokens[split:], targets[split:], mean, std,
                         max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         eval_every=args.eval_every, thresholds=thresholds, seed=args.seed,
                         eval_batch_size=args.eval_batch_size, autocast_dtype=dtype)
    report = {
        "model": args.model_name_or_path, "model_class": type(model).__name__,
        CONFIG_KEY: getattr(model.config, CONFIG_KEY, None),
        "depth": depth, "num_llm_layers": num_layers, "geometry": geometry.as_dict(), "device": str(device),
        "dtype": args.dtype,
        "train_images": split, "eval_images": n_eval, "thresholds": thresholds,
        "config": {k: v for k, v in vars(args).items()},
        "init_check": {"max_abs_diff": max(init_check.values()), "tensors": len(init_check)},
        **result,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "report.json"), json.dumps(report, indent=1))
    atomic_torch_save(probe.state_dict(), os.path.join(args.output_dir, "probe.pt"))
    final, trivial = result["final"], result["trivial"]
    print(f"llava_dsl.hf.rprobe: held-out MSE {final['mse']:.5f} (trivial predictor {trivial['mse']:.5f}), PSNR "
          f"{final['psnr']:.2f} dB (trivial {trivial['psnr']:.2f}); steps to threshold "
          f"{result['steps_to_threshold']}; report {os.path.join(args.output_dir, 'report.json')}")
    if not math.isfinite(final["mse"]):
        _fail(f"held-out MSE is {final['mse']}: the probe diverged (lower --learning_rate)")
    return report


if __name__ == "__main__":
    main()
