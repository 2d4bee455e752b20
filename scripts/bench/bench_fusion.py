#!/usr/bin/env python
"""Cost of multi-layer extraction and of the Detached Skip-Link train step, side by side.

Same inputs, same random CLIP-L-shaped tower (24 blocks, 1024 wide, 336 px / patch 14 -> 577 tokens):

  forward, frozen tower (inference / stage 1):
    (a) llava_single_layer : LLaVA's own ``CLIPVisionTower.forward`` with mm_vision_select_layer=-2;
                             runs all 24 blocks and keeps all 25 hidden states.
    (b) plugin_multilayer  : ``llava_dsl.skip_links.llava_patches.MultiLayerCLIPVisionTower`` with
                             detached_mlp_multilayer (main 23, taps 18, 12, 6); runs 23 blocks, keeps 4 states.
  joint train step (tower unfrozen; zero_grad + forward + backward + AdamW over tower and projector):
    mlp2x_gelu / mlp_multilayer / detached_mlp_multilayer, projectors from the plugin's builder
    (LLaVA's own builder for mlp2x_gelu). The loss is the mean square of the projector output: the LLM is
    not part of the step, so the ratios isolate the vision side, where the variants differ.

Timings are medians over ``--repeats`` rounds; the variants of a group run round-robin (rotating start)
so drift on a shared machine hits them equally. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA;
on CPU, with ``--rss``, the peak resident set of each variant in its own subprocess.

    python scripts/bench/bench_fusion.py --small                 # smoke run, under 30 s on 2 busy cores
    python scripts/bench/bench_fusion.py --batch 1 --repeats 7 --threads 2 --rss
    python scripts/bench/bench_fusion.py --device cuda --dtype bfloat16 --batch 16 --repeats 20 --warmup 3
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

import torch  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import llava_dsl  # noqa: E402

FORWARD = ("llava_single_layer", "plugin_multilayer")
TRAIN = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")
TARGETS = (  # (name, numerator, denominator, group, bound)
    ("plugin_multilayer / llava_single_layer (forward)", "plugin_multilayer", "llava_single_layer", "forward", 1.00),
    ("detached / naive multilayer (train step)", "detached_mlp_multilayer", "mlp_multilayer", "train", 1.01),
    ("detached / mlp2x_gelu (train step)", "detached_mlp_multilayer", "mlp2x_gelu", "train", 1.05),
)
RSS_TAG = "RSS_RESULT "


def tower_config(small: bool) -> CLIPVisionConfig:
    if small:  # same shape family, scaled down: 8 blocks -> main 7, taps 6, 4, 2
        return CLIPVisionConfig(image_size=112, patch_size=14, hidden_size=128, intermediate_size=512,
                                num_hidden_layers=8, num_attention_heads=4)
    return CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16)


def save_random_tower(config: CLIPVisionConfig, folder: Path, seed: int) -> None:
    """A random CLIP tower + processor saved like a hub folder, so LLaVA's loader reads it as-is."""
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(folder)
    side = config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)


def tower_args(projector_type: str) -> SimpleNamespace:
    return SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                           mm_projector_type=projector_type, mm_vision_skip_layers=None,
                           mm_vision_skip_stride=None, mm_vision_detach_depth=None)


def build_forward(variant: str, tower_dir: str, device, dtype) -> torch.nn.Module:
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower  # LLaVA's class, unpatched

    from llava_dsl.skip_links.llava_patches import MultiLayerCLIPVisionTower

    if variant == "llava_single_layer":
        tower = CLIPVisionTower(tower_dir, tower_args("mlp2x_gelu"))
    elif variant == "plugin_multilayer":
        tower = MultiLayerCLIPVisionTower(tower_dir, tower_args("detached_mlp_multilayer"))
    else:
        raise ValueError(f"forward variant {variant!r}: expected one of {FORWARD}")
    return tower.to(device=device, dtype=dtype)


class TrainStep:
    """One joint step: tower (unfrozen, as DSLTrainer leaves it) + projector, AdamW with a tower group.

    Order as in the Hugging Face Trainer: forward, backward, optimizer step, then zero_grad (set to None), so
    no gradients are held between steps.
    """

    def __init__(self, tower, projector: torch.nn.Module):
        self.tower, self.projector = tower, projector
        tower.vision_tower.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([
            {"params": list(tower.vision_tower.parameters()), "lr": 2e-6},
            {"params": list(projector.parameters()), "lr": 2e-5},
        ])

    def __call__(self, pixels: torch.Tensor) -> None:
        features = self.tower(pixels)
        loss = self.projector(features).float().pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_projector(variant: str, tower, llm_width: int, seed: int, device, dtype) -> torch.nn.Module:
    from llava_dsl.skip_links.llava_patches import build_vision_projector

    if variant not in TRAIN:
        raise ValueError(f"train variant {variant!r}: expected one of {TRAIN}")
    spec = tower.layer_spec
    config = SimpleNamespace(mm_projector_type=variant, mm_hidden_size=tower.hidden_size, hidden_size=llm_width,
                             mm_vision_skip_layers=list(spec.taps) if spec else None)
    torch.manual_seed(seed)
    return build_vision_projector(config).to(device=device, dtype=dtype)


def build_train(variants, tower_dir: str, llm_width: int, seed: int, device, dtype) -> Dict[str, TrainStep]:
    """Train steps that share what they can, so that all variants fit in memory at once.

    One trainable tower (weights, gradients and AdamW state held once); naive and detached share one projector
    (same builder output; they differ only in where the tower's features stop gradients). The AdamW state dict
    is shared: it is keyed by parameter, so each step still updates exactly the tower plus its own projector.
    The baseline goes through the plugin's tower class too: LLaVA's own ``forward`` runs under no_grad and
    cannot train; with mlp2x_gelu the plugin tower is the single-layer path DSLTrainer runs in stage 2.
    """
    from llava_dsl.skip_links.llava_patches import MultiLayerCLIPVisionTower

    steps, projectors, shared, shared_state = {}, {}, None, None
    for variant in variants:
        tower = MultiLayerCLIPVisionTower(tower_dir, tower_args(variant))
        if shared is None:
            shared = tower.to(device=device, dtype=dtype).vision_tower
        else:
            tower.vision_tower = shared
        built = build_projector(variant, tower, llm_width, seed, device, dtype)
        step = TrainStep(tower, projectors.setdefault(repr(built), built))  # repr lists every layer's shape
        if shared_state is None:
            shared_state = step.optimizer.state
        else:
            step.optimizer.state = shared_state
        steps[variant] = step
    del built
    release_memory(torch.device(device))  # the duplicate towers loaded above
    return steps


def make_pixels(config: CLIPVisionConfig, batch: int, seed: int, device, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    side = config.image_size
    return torch.randn(batch, 3, side, side, generator=generator).to(device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_round_robin(calls: Dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device):
    """Per-variant wall times (s) and, on CUDA, per-call peak memory above the pre-call allocation (MiB)."""
    names = list(calls)
    times = {name: [] for name in names}
    peaks = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            calls[name]()
            synchronize(device)
            elapsed = time.perf_counter() - t0
            print(f"  round {round_index + 1}/{warmup + repeats}{' (warm-up)' if round_index < warmup else ''} "
                  f"{name}: {elapsed:.3f} s", file=sys.stderr, flush=True)
            if round_index >= warmup:
                times[name].append(elapsed)
                if device.type == "cuda":
                    peaks[name].append((torch.cuda.max_memory_allocated(device) - before) / 2**20)
    return times, peaks


def release_memory(device: torch.device) -> None:
    """Hand freed tensors back to the system between phases (glibc keeps freed heap memory resident)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def summarize(samples: List[float]) -> Dict[str, float]:
    return {"n": len(samples), "min": min(samples), "median": statistics.median(samples), "max": max(samples),
            "samples": samples}


# --------------------------------------------------------------------------------------------------
# CPU peak memory: one subprocess per variant, so each sees only its own allocations.
# --------------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} line")


def rss_child(args, device, dtype) -> None:
    """Warm the variant up, reset the peak-RSS mark, run it again; print resident and peak RSS (MiB)."""
    config = tower_config(args.small)
    pixels = make_pixels(config, args.batch, args.seed + 1, device, dtype)
    variant = args._rss_child
    if variant in FORWARD:
        tower = build_forward(variant, args.tower_dir, device, dtype)
        call = lambda: tower(pixels)  # noqa: E731
    else:
        step = build_train([variant], args.tower_dir, args.llm_width, args.seed, device, dtype)[variant]
        call = lambda: step(pixels)  # noqa: E731
    for _ in range(max(1, args.warmup)):  # the first train step allocates the AdamW state
        call()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
    resident = _proc_status_kib("VmRSS")
    call()
    peak = _proc_status_kib("VmHWM")
    print(RSS_TAG + json.dumps({"variant": variant, "resident_mib": resident / 1024, "peak_mib": peak / 1024,
                                "peak_above_resident_mib": (peak - resident) / 1024}), flush=True)


def measure_rss(args, variants, tower_dir: str) -> Dict[str, Dict[str, float]]:
    results = {}
    for variant in variants:
        command = [sys.executable, str(Path(__file__).resolve()), "--_rss-child", variant, "--tower-dir", tower_dir,
                   "--batch", str(args.batch), "--warmup", str(args.warmup), "--llm-width", str(args.llm_width),
                   "--seed", str(args.seed), "--device", "cpu", "--dtype", args.dtype]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.small:
            command.append("--small")
        # Fixed mmap threshold: glibc otherwise raises it as big blocks are freed and keeps later tensors in
        # the heap, where freed memory stays resident and hides the next call's peak.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RSS_TAG)]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"peak-RSS subprocess for {variant!r} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1][len(RSS_TAG):])
        print(f"  peak RSS {variant}: {results[variant]}", file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> Dict[str, object]:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpus_online"] = fields.get("On-line CPU(s) list", "").strip()
    except (OSError, subprocess.CalledProcessError):
        info["cpu_model"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def format_report(result: Dict) -> str:
    lines = []
    setup = result["setup"]
    lines.append(f"tower: {setup['tower']}, batch {setup['batch']}, {setup['dtype']} on {setup['device']}, "
                 f"LLM width {setup['llm_width']}, {setup['repeats']} repeats after {setup['warmup']} warm-up "
                 f"round(s), {result['machine']['torch_threads']} torch threads")
    memory_column = {"cuda": "peak alloc above pre-call (MiB)", "cpu": "peak RSS above resident (MiB)"}[setup["device"]]
    for group, title in (("forward", "Tower forward, frozen (s)"), ("train", "Joint train step, no LLM (s)")):
        lines.append("")
        lines.append(f"| {title} | what runs | min | median | max | {memory_column} |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for name, stats in result[group].items():
            memory = result.get("memory", {}).get(name)
            memory_text = f"{memory:.0f}" if memory is not None else "-"
            lines.append(f"| {name} | {result['what'][name]} | {stats['min']:.3f} | {stats['median']:.3f} | "
                         f"{stats['max']:.3f} | {memory_text} |")
    lines.append("")
    lines.append("| ratio | median / median | min / min | same-round ratio: median [min, max] | target | "
                 "met (medians) |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for ratio in result["ratios"]:
        paired = ratio["paired_ratio"]
        lines.append(f"| {ratio['name']} | {ratio['median_ratio']:.3f} | {ratio['min_ratio']:.3f} | "
                     f"{paired['median']:.3f} [{paired['min']:.3f}, {paired['max']:.3f}] | "
                     f"<= {ratio['target']:.2f} | {'yes' if ratio['met'] else 'NO'} |")
    return "\n".join(lines)


def describe_variants(config: CLIPVisionConfig, spec) -> Dict[str, str]:
    n = config.num_hidden_layers
    layers = ",".join(str(i) for i in spec.concat_order)
    detached = ",".join(str(i) for i in spec.detached_layers) or "none"
    return {
        "llava_single_layer": f"LLaVA CLIPVisionTower, layer -2: {n} blocks, {n + 1} states kept",
        "plugin_multilayer": f"plugin tower, layers {layers}: {spec.main} blocks, {spec.num_layers} states kept",
        "mlp2x_gelu": f"layer {spec.main} -> mlp2x_gelu",
        "mlp_multilayer": f"layers {layers} -> MLP, no stop-gradient",
        "detached_mlp_multilayer": f"layers {layers} -> MLP, stop-gradient on {detached}",
    }


def output_path(out: str, device: torch.device) -> Path:
    path = Path(out)
    return path if path.suffix == ".json" else path / f"results_{device.type}.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice; 1 with --small, whose tiny ops "
                             "only lose to thread start-up and to other processes on the cores)")
    parser.add_argument("--small", action="store_true", help="scaled-down tower (8 blocks, 128 wide) for a smoke run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--llm-width", type=int, default=None,
                        help="projector output width, the LLM's hidden size (default 4096; 256 with --small)")
    parser.add_argument("--rss", action="store_true",
                        help="cpu: also measure each variant's peak RSS in its own subprocess")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="folder for results_<device>.json, or a .json file path (default: this script's folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-dir", default=None, help="reuse a saved random tower folder instead of a temp one")
    parser.add_argument("--_rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.llm_width is None:
        args.llm_width = 256 if args.small else 4096
    if args.threads is None and args.small:
        args.threads = 1
    for flag in ("batch", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: expected at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: expected 0 or more")
    if args.rss and args.device != "cpu":
        parser.error("--rss measures CPU resident memory; on --device cuda peak GPU memory is always reported")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    llava_dsl.register()
    if args._rss_child:
        rss_child(args, device, dtype)
        return {}

    command = "python scripts/bench/bench_fusion.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.perf_counter()
    load_before = os.getloadavg()
    config = tower_config(args.small)
    with tempfile.TemporaryDirectory(prefix="bench_fusion_tower_") as temp:
        tower_dir = args.tower_dir or temp
        if not args.tower_dir:
            save_random_tower(config, Path(tower_dir), args.seed)
        memory, memory_detail = {}, {}
        if args.rss:  # first, while this process holds no model: a 2-process peak could exhaust the machine
            memory_detail = measure_rss(args, FORWARD + TRAIN, tower_dir)
            memory = {name: d["peak_above_resident_mib"] for name, d in memory_detail.items()}
        pixels = make_pixels(config, args.batch, args.seed + 1, device, dtype)

        # Forward, frozen tower.
        towers = {name: build_forward(name, tower_dir, device, dtype) for name in FORWARD}
        spec = towers["plugin_multilayer"].layer_spec
        with torch.no_grad():  # same weights and inputs: (b)'s main-layer slice is (a)'s feature
            single, fused = towers["llava_single_layer"](pixels), towers["plugin_multilayer"](pixels)
            main_slice_diff = (fused[..., : config.hidden_size].float() - single.float()).abs().max().item()
        forward_times, forward_peaks = run_round_robin(
            {name: (lambda t=tower: t(pixels)) for name, tower in towers.items()}, args.repeats, args.warmup, device)
        del towers, single, fused
        release_memory(device)

        # Joint train step.
        steps = build_train(TRAIN, tower_dir, args.llm_width, args.seed, device, dtype)
        train_times, train_peaks = run_round_robin(
            {name: (lambda s=step: s(pixels)) for name, step in steps.items()}, args.repeats, args.warmup, device)
        del steps
        release_memory(device)
        if device.type == "cuda":
            memory = {name: max(p) for name, p in {**forward_peaks, **train_peaks}.items()}

    groups = {"forward": {n: summarize(t) for n, t in forward_times.items()},
              "train": {n: summarize(t) for n, t in train_times.items()}}
    ratios = []
    for name, numerator, denominator, group, bound in TARGETS:
        num, den = groups[group][numerator], groups[group][denominator]
        median_ratio = num["median"] / den["median"]
        # Same-round pairs ran back to back, so their ratio cancels most of the load drift between rounds.
        paired = [a / b for a, b in zip(num["samples"], den["samples"])]
        ratios.append({"name": name, "median_ratio": median_ratio, "min_ratio": num["min"] / den["min"],
                       "paired_ratio": summarize(paired), "target": bound, "met": median_ratio <= bound})
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_description(device),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "setup": {"tower": ("small " if args.small else "CLIP-L/14-336 shape ") +
                           f"({config.num_hidden_layers} blocks, width {config.hidden_size}, "
                           f"{(config.image_size // config.patch_size) ** 2 + 1} tokens, random weights)",
                  "tower_config": {k: getattr(config, k) for k in ("image_size", "patch_size", "hidden_size",
                                                                    "intermediate_size", "num_hidden_layers",
                                                                    "num_attention_heads")},
                  "layer_spec": {"main": spec.main, "taps": list(spec.taps), "detached": list(spec.detached_layers)},
                  "batch": args.batch, "dtype": args.dtype, "device": device.type, "llm_width": args.llm_width,
                  "repeats": args.repeats, "warmup": args.warmup,
                  "loss": "mean square of the projector output (no LLM in the step)",
                  "optimizer": "AdamW, tower group lr 2e-6 + projector group lr 2e-5; the train variants share "
                               "one tower (weights, AdamW state), naive and detached one projector; "
                               "step = forward, backward, AdamW step, zero_grad(set_to_none)"},
        "what": describe_variants(config, spec),
        "checks": {"max_abs_diff_main_slice_vs_llava": main_slice_diff},
        **groups,
        "memory": memory,
        "memory_detail": memory_detail,
        "memory_kind": {"cuda": "torch.cuda.max_memory_allocated minus memory_allocated before the call, max over "
                                "repeats (MiB)",
                        "cpu": "VmHWM minus VmRSS around one call after warm-up, one subprocess per variant (MiB)"
                        }[device.type] if memory else None,
        "ratios": ratios,
        "wall_seconds": time.perf_counter() - started,
    }
    path = output_path(args.out, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    print(f"\n(b) main-layer slice vs (a): max |diff| = {main_slice_diff:.3g}")
    print(f"load average before/after: {load_before} / {result['load_average_1_5_15']['after']}")
    print(f"wrote {path} in {result['wall_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
