#!/usr/bin/env python
"""Cost of DPVR-LF against the stock LLaMA decoder: analytic prefill FLOPs, measured prefill latency, decode step,
peak memory and KV-cache size, side by side.

  1. Analytic prefill FLOPs at LLaVA-1.5-7B shapes (Vicuna-7B: 32 layers, 4096 wide, MLP 11008, vocab 32000),
     for a LLaVA-1.5 prompt (system prompt + "USER: " before the 576 image tokens, question + " ASSISTANT:" after),
     over routing layers and question lengths. Causal attention pairs; the LM head over every position (what
     transformers 4.37's forward computes), and without it.
  2. Measured on a scaled random model (32 layers, 576 image tokens, width --hidden; head dim 128 and MLP ratio
     as Vicuna-7B), one sequence, the same weights for every variant:
       stock         transformers' LlamaForCausalLM forward (SDPA, DynamicCache)
       dpvr_r{L-1}   llava_dsl.dpvr.routed_forward with nothing routed (the loop's own overhead)
       dpvr_r{R}     DPVR-LF at --route-layer
     Prefill: forward over the whole prompt with a KV cache, logits for every position. Decode: one new token
     against that cache, --decode-steps steps. Medians over --repeats rounds; variants run round-robin with a
     rotating start so that load from other processes on a shared machine hits them alike; min and max are kept
     to show the spread.
  3. Peak memory: each variant in its own subprocess (--rss): the resident set before the prefill and its peak
     during it (VmHWM, reset through /proc/self/clear_refs after the model is built, so the build's own peak does
     not hide the prefill's; glibc's mmap threshold fixed, so freed tensors leave the resident set); plus the KV
     cache bytes after the prompt, measured and analytic.

    python scripts/bench/bench_dpvr.py --small                   # smoke run (8 layers, 256 wide)
    python scripts/bench/bench_dpvr.py --threads 2 --repeats 7 --rss --markdown scripts/bench/RESULTS_dpvr.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

import torch   # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM   # noqa: E402

from llava_dsl.dpvr.cost import LLAVA_15_7B, LlamaShape, kv_cache_elements, prefill_flops, side_branch_parameters  # noqa: E402
from llava_dsl.dpvr.decoder import VisionSideBranch, routed_forward  # noqa: E402
from llava_dsl.dpvr.spec import resolve_routing  # noqa: E402

TEXT_BEFORE = 35  # vicuna_v1 system prompt + "USER: " with the LLaMA tokenizer, BOS included
IMAGE_TOKENS = 576  # CLIP-L/336, patch 14
TEXT_AFTER = (8, 20, 64)  # question + " ASSISTANT:": short, LLaVA-bench-like, long
ROUTES = (16, 17, 18, 20)
RSS_TAG = "RSS_RESULT "


# --------------------------------------------------------------------------------------------------
# 1. Analytic FLOPs.
# --------------------------------------------------------------------------------------------------
def flops_table(shape: LlamaShape = LLAVA_15_7B) -> List[Dict]:
    rows = []
    for after in TEXT_AFTER:
        for lm_head in (True, False):
            stock = prefill_flops(shape, TEXT_BEFORE, IMAGE_TOKENS, after, lm_head=lm_head)["total"]
            for route in ROUTES:
                dpvr = prefill_flops(shape, TEXT_BEFORE, IMAGE_TOKENS, after, route_layer=route, lm_head=lm_head)
                rows.append({"text_after": after, "lm_head": lm_head, "route_layer": route,
                             "stock_tflops": stock / 1e12, "dpvr_tflops": dpvr["total"] / 1e12,
                             "ratio": dpvr["total"] / stock})
    return rows


# --------------------------------------------------------------------------------------------------
# 2. Measured latency.
# --------------------------------------------------------------------------------------------------
def scaled_config(args) -> LlamaConfig:
    heads = max(1, args.hidden // 128)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=round(args.hidden * 11008 / 4096),
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return config


def _dtype(args) -> torch.dtype:
    return getattr(torch, args.dtype)


def build(args):
    """Model, side branch, image mask and prompt embeddings. The default (CPU, float32) builds exactly as before;
    --device cuda --dtype bfloat16 builds the weights on the device in that dtype (a 7B model is built in seconds
    there instead of minutes on the host)."""
    torch.manual_seed(0)
    config = scaled_config(args)
    dtype, previous = _dtype(args), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config).eval()
            side = VisionSideBranch(config, args.route_layer).eval()
    finally:
        torch.set_default_dtype(previous)
    side.copy_from(model.model.layers[args.route_layer])
    image_mask = torch.zeros(1, args.text_before + args.image + args.text_after, dtype=torch.bool)
    image_mask[0, args.text_before:args.text_before + args.image] = True
    embeds = torch.randn(1, image_mask.shape[1], config.hidden_size) * 0.02
    return model, side, image_mask.to(args.device), embeds.to(device=args.device, dtype=dtype)


def variants(args, model, side, image_mask) -> Dict[str, Callable]:
    """name -> (prefill(embeds) -> cache, decode(token_embeds, cache) -> cache)."""
    layers = args.layers

    def stock_prefill(embeds):
        return model(inputs_embeds=embeds, use_cache=True).past_key_values

    def stock_decode(token, cache):
        return model(inputs_embeds=token, past_key_values=cache, use_cache=True).past_key_values

    def routed(route):
        spec = resolve_routing(layers, route)
        branch = side if spec.routes else None

        def prefill(embeds):
            out = routed_forward(model.model, branch, spec, embeds, image_mask=image_mask, use_cache=True)
            model.lm_head(out.last_hidden_state)
            return out.past_key_values

        def decode(token, cache):
            out = routed_forward(model.model, branch, spec, token, past_key_values=cache, use_cache=True)
            model.lm_head(out.last_hidden_state)
            return out.past_key_values
        return prefill, decode

    return {"stock": (stock_prefill, stock_decode), f"dpvr_r{layers - 1}": routed(layers - 1),
            f"dpvr_r{args.route_layer}": routed(args.route_layer)}


def cache_bytes(cache) -> int:
    if hasattr(cache, "num_bytes"):
        return cache.num_bytes()
    return sum(t.numel() * t.element_size() for layer in cache for t in layer)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn, *args):
    """(result, wall seconds, process CPU seconds). CPU time is the work done: on a shared machine it is far
    steadier than wall time, which also counts the time other processes hold the cores. On a GPU the device is
    synchronised before and after, and wall time is the figure (CPU time is then only the host's share)."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    _sync()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def cuda_prefill_memory(runs: Dict, embeds) -> Dict[str, Dict[str, float]]:
    """Per variant on a GPU: peak allocated memory during the prefill over what was allocated before it, and the
    KV cache it leaves (the in-process counterpart of --rss, which measures host memory)."""
    out = {}
    for name, (prefill, _) in runs.items():
        _sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            cache = prefill(embeds)
        _sync()
        out[name] = {"allocated_before_mib": before / 2**20,
                     "prefill_peak_over_allocated_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
                     "cache_mib": cache_bytes(cache) / 2**20}
        del cache
    return out


def time_variants(args) -> Dict[str, Dict]:
    model, side, image_mask, embeds = build(args)
    runs = variants(args, model, side, image_mask)
    names = list(runs)
    samples = {n: {"prefill_wall": [], "prefill_cpu": [], "decode_wall": [], "decode_cpu": []} for n in names}
    token = (torch.randn(1, 1, model.config.hidden_size) * 0.02).to(device=embeds.device, dtype=embeds.dtype)
    with torch.inference_mode():
        for name in names:  # warm-up: allocator, kernels, RoPE tables
            for _ in range(args.warmup):
                runs[name][1](token, runs[name][0](embeds))
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                cache, wall, cpu = _timed(runs[name][0], embeds)
                samples[name]["prefill_wall"].append(wall)
                samples[name]["prefill_cpu"].append(cpu)
                walls, cpus = [], []
                for _ in range(args.decode_steps):
                    cache, wall, cpu = _timed(runs[name][1], token, cache)
                    walls.append(1e3 * wall)
                    cpus.append(1e3 * cpu)
                samples[name]["decode_wall"].append(statistics.median(walls))
                samples[name]["decode_cpu"].append(statistics.median(cpus))
        result = {name: {key: summary(values) for key, values in samples[name].items()} for name in names}
        for name in names:  # cache size right after the prompt (the decode steps above grew it)
            result[name]["kv_cache_mib_after_prompt"] = cache_bytes(runs[name][0](embeds)) / 2**20
    if embeds.device.type == "cuda":
        for name, memory in cuda_prefill_memory(runs, embeds).items():
            result[name]["cuda_memory"] = memory
    return result


def summary(values: List[float]) -> Dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


# --------------------------------------------------------------------------------------------------
# 3. Peak memory, one subprocess per variant.
# --------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def rss_child(args) -> None:
    model, side, image_mask, embeds = build(args)
    prefill = variants(args, model, side, image_mask)[args.rss_child][0]
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS: the build's is gone
        f.write("5")
    before = _status_bytes("VmRSS")
    with torch.inference_mode():
        cache = prefill(embeds)
    peak = _status_bytes("VmHWM")
    print(RSS_TAG + json.dumps({"rss_before_mib": before / 2**20, "peak_mib": peak / 2**20,
                                "prefill_peak_over_rss_mib": (peak - before) / 2**20,
                                "cache_mib": cache_bytes(cache) / 2**20}))


def rss_all(args, names: List[str]) -> Dict[str, Dict]:
    """Per variant: median [min, max] over --rss-repeats fresh subprocesses."""
    out = {}
    for name in names:
        runs = []
        for _ in range(args.rss_repeats):
            command = [sys.executable, __file__, "--rss-child", name] + _shape_flags(args)
            # a fixed mmap threshold turns off glibc's adaptive one, which otherwise keeps freed tensors resident
            # depending on allocation history (peaks moved by ~50 MiB between identical runs without it)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            line = next(line for line in done.stdout.splitlines() if line.startswith(RSS_TAG))
            runs.append(json.loads(line[len(RSS_TAG):]))
        out[name] = {key: summary([run[key] for run in runs]) for key in runs[0]}
    return out


def _shape_flags(args) -> List[str]:
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--image", str(args.image),
            "--text-before", str(args.text_before), "--text-after", str(args.text_after),
            "--route-layer", str(args.route_layer), "--threads", str(args.threads), "--device", args.device,
            "--dtype", args.dtype]


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------
def _cell(stat: Dict[str, float], digits: int) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def _ratio(routed: Dict, stock: Dict, key: str) -> str:
    cpu, wall = key + "_cpu", key + "_wall"
    return (f"CPU median **{routed[cpu]['median'] / stock[cpu]['median']:.3f}** "
            f"(best/best {routed[cpu]['min'] / stock[cpu]['min']:.3f}); "
            f"wall median {routed[wall]['median'] / stock[wall]['median']:.3f} "
            f"(best/best {routed[wall]['min'] / stock[wall]['min']:.3f})")


def markdown(args, flops: List[Dict], timings: Dict, rss: Dict) -> str:
    shape = LlamaShape.from_config(scaled_config(args))
    route_name = f"dpvr_r{args.route_layer}"
    side = side_branch_parameters(LLAVA_15_7B)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"# DPVR-LF cost ({datetime.date.today().isoformat()})", "",
        f"Command: `python scripts/bench/bench_dpvr.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, {args.threads} "
        f"thread(s); shared with other jobs (load average at the end {load}), so timings carry their min and max.",
        "", "## 1. Analytic prefill FLOPs at LLaVA-1.5-7B shapes", "",
        f"Prompt: {TEXT_BEFORE} text tokens, {IMAGE_TOKENS} image tokens, then the question. Side branch: one decoder "
        f"layer, {side / 1e6:.1f} M parameters ({100 * side / 7.06e9:.2f} % of LLaVA-1.5-7B's 7.06 B).", "",
        "| text after image | LM head | R | stock TFLOPs | DPVR-LF TFLOPs | ratio |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in flops:
        head = "all positions" if row["lm_head"] else "none"
        lines.append(f"| {row['text_after']} | {head} | {row['route_layer']} | {row['stock_tflops']:.3f} | "
                     f"{row['dpvr_tflops']:.3f} | **{row['ratio']:.3f}** |")
    text = TEXT_BEFORE + 20
    stock_kv = kv_cache_elements(LLAVA_15_7B, text, IMAGE_TOKENS) * 2 / 2**20
    dpvr_kv = kv_cache_elements(LLAVA_15_7B, text, IMAGE_TOKENS, route_layer=18) * 2 / 2**20
    lines += [
        "", f"KV cache after a {text + IMAGE_TOKENS}-token prompt (fp16): stock {stock_kv:.0f} MiB, DPVR-LF R=18 "
        f"{dpvr_kv:.0f} MiB ({dpvr_kv / stock_kv:.3f}x).", "",
        f"## 2. Measured on a scaled model: {shape.num_layers} layers, width {shape.hidden}, {shape.heads} heads, "
        f"MLP {shape.intermediate}, vocab {shape.vocab}; {args.text_before} + {args.image} + {args.text_after} tokens, "
        f"batch 1, {'fp32' if args.dtype == 'float32' else args.dtype}"
        f"{'' if args.device == 'cpu' else ' on ' + args.device}", "",
        f"Prefill: {args.repeats} rounds after {args.warmup} warm-up; decode: median of {args.decode_steps} steps per "
        f"round, then median over rounds. CPU = process CPU time (the work, steady under load); wall = elapsed time "
        f"(includes waiting for cores held by other jobs).", "",
        "| variant | prefill CPU s median [min, max] | prefill wall s | decode step CPU ms | decode step wall ms "
        "| KV cache MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        lines.append(f"| {name} | {_cell(t['prefill_cpu'], 3)} | {_cell(t['prefill_wall'], 3)} | "
                     f"{_cell(t['decode_cpu'], 2)} | {_cell(t['decode_wall'], 2)} | "
                     f"{t['kv_cache_mib_after_prompt']:.1f} |")
    stock, routed = timings["stock"], timings[route_name]
    analytic = (prefill_flops(shape, args.text_before, args.image, args.text_after, route_layer=args.route_layer)
                ["total"] / prefill_flops(shape, args.text_before, args.image, args.text_after)["total"])
    lines += ["", f"- prefill {route_name} / stock: {_ratio(routed, stock, 'prefill')}; analytic FLOPs ratio at this "
              f"shape {analytic:.3f}",
              f"- decode step {route_name} / stock: {_ratio(routed, stock, 'decode')}"]
    if rss:
        lines += ["", f"## 3. Peak memory (own subprocess per variant, prefill only; median [min, max] of "
                  f"{args.rss_repeats} runs)", "",
                  "| variant | RSS before prefill MiB | prefill peak MiB | peak - RSS before MiB | KV cache MiB |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in rss.items():
            lines.append(f"| {name} | {m['rss_before_mib']['median']:.0f} | {_cell(m['peak_mib'], 0)} | "
                         f"{_cell(m['prefill_peak_over_rss_mib'], 0)} | {m['cache_mib']['median']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--image", type=int, default=IMAGE_TOKENS)
    parser.add_argument("--text-before", type=int, default=TEXT_BEFORE)
    parser.add_argument("--text-after", type=int, default=20)
    parser.add_argument("--route-layer", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss", action="store_true", help="peak memory, one subprocess per variant")
    parser.add_argument("--rss-repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="smoke run: 8 layers, width 256, route layer 4")
    parser.add_argument("--markdown", default=None, help="write the report here")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: timings synchronise the device, and "
                        "the GPU's peak memory during the prefill is measured in-process")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.layers, args.hidden, args.route_layer, args.repeats = 8, 256, 4, min(args.repeats, 3)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    resolve_routing(args.layers, args.route_layer)  # fail before the long part
    flops = flops_table()
    timings = time_variants(args)
    rss = rss_all(args, list(timings)) if args.rss else {}
    report = markdown(args, flops, timings, rss)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"flops": flops, "timings": timings, "rss": rss}, indent=2))


if __name__ == "__main__":
    main()
