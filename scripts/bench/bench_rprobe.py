#!/usr/bin/env python
"""Cost of one R-Probe step against one full-LLM forward + backward on the same visual tokens, same shapes.

    python scripts/bench/bench_rprobe.py --device cuda --dtype bfloat16 --json rprobe.json     # LLaVA-1.5-7B shapes
    python scripts/bench/bench_rprobe.py --tiny                                                # CPU smoke run

The probe is ``llava_dsl.rprobe.model.RProbe``, built and initialised the way the probe stage builds it
(``probe_depth`` = ceil(L / 4) copied decoder layers via ``copy_llm_weights``, the LLM's final norm, a
Linear-GELU-Linear head regressing region x region x 3 pixels per token). Random weights: the cost does not depend
on their values. Per round, in alternating order:

  probe_step    what one step of ``rprobe.loop.run_probe``'s plain loop does after the frozen MLLM has produced the
                visual tokens: probe forward over the [B, N, H] tokens, pixel MSE, backward, gradient clipping at 1.0,
                AdamW step, zero_grad
  probe_fb      the probe's forward + backward alone (no clipping or optimizer step)
  llm_fb        the whole LLM (every decoder layer, final norm, LM head, cross-entropy over random labels) forward +
                backward on the same tokens as ``inputs_embeds``, every LLM parameter trainable; no optimizer step

The tokens themselves (tower + projector, frozen) are the same input for both and are not timed. Figures are
medians over --repeats rounds after --warmup rounds, each call between two device synchronisations; peak memory is
the GPU's peak allocation during each call over what was allocated before it. Headline: probe_step / llm_fb
(target <= 0.35: the probe copies a quarter of the layers). Both models run in --dtype; the stage's plain loop keeps
the probe in fp32 (bf16 under DeepSpeed with --bf16), so a bf16 run here is the like-for-like comparison.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llava_dsl.rprobe.model import ProbeGeometry, RProbe, copy_llm_weights, probe_depth, reconstruction_loss  # noqa: E402


def llm_config(args) -> LlamaConfig:
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return config


def build(args):
    torch.manual_seed(0)
    config = llm_config(args)
    geometry = ProbeGeometry(image_size=args.image_size, grid=args.grid)
    dtype, previous = getattr(torch, args.dtype), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            llm = LlamaForCausalLM(config).train()
            probe = RProbe(config, args.probe_depth or probe_depth(args.layers), geometry.pixels_per_token).train()
    finally:
        torch.set_default_dtype(previous)
    copy_llm_weights(probe, llm.model.layers, llm.model.norm)
    tokens = torch.randn(args.batch, geometry.num_tokens, args.hidden, device=args.device, dtype=dtype) * 0.02
    pixels = torch.randn(args.batch, geometry.num_tokens, geometry.pixels_per_token, device=args.device)
    labels = torch.randint(0, args.vocab, (args.batch, geometry.num_tokens), device=args.device)
    return llm, probe, geometry, tokens, pixels, labels


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn):
    """(seconds, peak allocated over the allocation before, MiB; 0 on CPU) of one call between synchronisations."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    began = time.perf_counter()
    fn()
    _sync()
    seconds = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else 0.0
    return seconds, peak


def variants(llm, probe, tokens, pixels, labels):
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-4)

    def probe_fb():
        loss = reconstruction_loss(probe(tokens), pixels)
        loss.backward()
        probe.zero_grad(set_to_none=True)

    def probe_step():
        loss = reconstruction_loss(probe(tokens), pixels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def llm_fb():
        loss = llm(inputs_embeds=tokens, labels=labels).loss
        loss.backward()
        llm.zero_grad(set_to_none=True)

    return {"probe_step": probe_step, "probe_fb": probe_fb, "llm_fb": llm_fb}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(args) -> dict:
    llm, probe, geometry, tokens, pixels, labels = build(args)
    calls = variants(llm, probe, tokens, pixels, labels)
    names = list(calls)
    for _ in range(args.warmup):
        for name in names:
            measure(calls[name])
    seconds = {n: [] for n in names}
    peaks = {n: [] for n in names}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            s, peak = measure(calls[name])
            seconds[name].append(s)
            peaks[name].append(peak)
    median = {n: statistics.median(v) for n, v in seconds.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "shapes": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                   "heads": args.heads, "vocab": args.vocab, "batch": args.batch, "tokens": geometry.num_tokens,
                   "pixels_per_token": geometry.pixels_per_token, "probe_depth": probe.depth},
        "parameters": {"llm": count(llm), "probe": count(probe)},
        "seconds": seconds, "median_s": median, "peak_mib": {n: max(v) for n, v in peaks.items()},
        "ratio_probe_step_vs_llm_fb": median["probe_step"] / median["llm_fb"],
        "ratio_probe_fb_vs_llm_fb": median["probe_fb"] / median["llm_fb"],
        "repeats": args.repeats, "warmup": args.warmup,
    }
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--image-size", type=int, default=336, help="processed image side, pixels")
    parser.add_argument("--grid", type=int, default=24, help="visual tokens per side (CLIP-L/14-336: 24, so 576)")
    parser.add_argument("--probe-depth", type=int, default=None, help="default ceil(layers / 4), as the stage")
    parser.add_argument("--batch", type=int, default=16, help="the probe stage's default batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=("float32", "bfloat16"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 4 layers, width 64, 16 tokens")
    parser.add_argument("--json", default=None)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 4, 64, 172, 2, 512
        args.image_size, args.grid, args.batch, args.repeats, args.warmup = 56, 4, 2, min(args.repeats, 3), 1
    result = run(args)
    m = result["median_s"]
    print(f"R-Probe cost, {result['gpu']} ({args.dtype}): {args.layers} layers x {args.hidden}, batch {args.batch} x "
          f"{result['shapes']['tokens']} tokens, probe depth {result['shapes']['probe_depth']}")
    for name in m:
        print(f"  {name:10s} {1e3 * m[name]:9.2f} ms median  peak +{result['peak_mib'][name]:.0f} MiB")
    print(f"  probe step / LLM forward+backward = {result['ratio_probe_step_vs_llm_fb']:.3f} (target <= 0.35); "
          f"probe forward+backward / LLM forward+backward = {result['ratio_probe_fb_vs_llm_fb']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
