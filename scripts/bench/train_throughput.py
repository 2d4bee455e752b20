"""Stage-2 (joint) training throughput through the real entry point, per projector type, side by side.

    python scripts/bench/train_throughput.py --out scripts/bench/results_train_<device>.json [--via-scripts] [--profile 10,5]

Builds a scaled tiny model (a CLIP-L-shaped tower by default, since the vision side is what the projector types
change) and runs `python -m llava_dsl.train` for `mlp2x_gelu`, `mlp_multilayer` and `detached_mlp_multilayer`
with the vision tower unfrozen. Every run goes through ``step_timer`` (this folder), which times each optimizer
step between two device synchronisations. A run's seconds per step is the median over its steps after --warmup;
each type runs --repeats times, in alternating order (A B, B A, ...), so drift in the machine hits every type
alike, and the reported ratio is that of the medians over repeats, with the ratio of each repeat beside it.
--profile START,COUNT adds one profiled run per type (top operators by device and host time).

With --via-scripts the runs go through scripts/zero3/pretrain.sh (one step, for the adapter each stage-2 run starts
from) and scripts/zero3/finetune.sh, unchanged, with their defaults except the model, data, sizes and step counts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(BENCH))
sys.path.insert(0, ROOT)

from llava_dsl.assets.tiny_models import build_language_model, build_tokenizer, build_vision_tower, write_llava_datasets  # noqa: E402

TYPES = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")


def build_assets(out: str, args) -> dict:
    tokenizer = build_tokenizer(os.path.join(out, "tokenizer"))
    llm = build_language_model(os.path.join(out, "llm"), tokenizer, hidden_size=args.llm_hidden,
                                           intermediate_size=args.llm_intermediate or args.llm_hidden * 4,
                                           num_layers=args.llm_layers,
                                           num_heads=args.llm_heads or max(1, args.llm_hidden // 64))
    tower = build_vision_tower(os.path.join(out, "tower"), image_size=args.image_size, patch_size=args.patch_size,
                                           hidden_size=args.vision_hidden,
                                           intermediate_size=args.vision_intermediate or args.vision_hidden * 4,
                                           num_layers=args.vision_layers,
                                           num_heads=args.vision_heads or max(1, args.vision_hidden // 64))
    data = write_llava_datasets(os.path.join(out, "data"), num_samples=args.samples,
                                            image_size=args.image_size)
    return {"llm": llm, "tower": tower, **data}


def _env(timer_out: str, profile: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([BENCH, ROOT, os.environ.get("PYTHONPATH", "")]),
           "STEP_TIMER_OUT": timer_out}
    env.pop("STEP_TIMER_PROFILE", None)
    if profile:
        env["STEP_TIMER_PROFILE"] = profile
    return env


def run(assets: dict, projector: str, steps: int, out: str, args, timer_out: str, profile: str = "") -> None:
    command = [sys.executable, "-m", "step_timer"]
    if args.deepspeed:
        command = ["deepspeed", "--num_gpus", str(args.num_gpus), "--master_port", str(args.master_port),
                   "--module", "step_timer", "--deepspeed", args.deepspeed]
    flags = {
        "model_name_or_path": assets["llm"], "vision_tower": assets["tower"], "version": "v1",
        "data_path": assets["finetune"], "image_folder": assets["image_folder"], "mm_projector_type": projector,
        "mm_vision_select_layer": -2, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "max_steps": steps, "per_device_train_batch_size": args.batch,
        "learning_rate": 2e-5, "save_strategy": "no", "report_to": "none",
        "model_max_length": args.model_max_length,
        "bf16": args.bf16, "tf32": False, "logging_steps": 1000, "dataloader_num_workers": 2,
        "lazy_preprocess": True, "output_dir": out, "unfreeze_mm_vision_tower": True, "mm_vision_tower_lr": 2e-6,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    command += [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    if args.attn_implementation:
        command += ["--attn_implementation", args.attn_implementation]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(timer_out, profile))
    if result.returncode != 0:
        raise SystemExit(f"{projector} x {steps} steps failed:\n{result.stderr[-4000:]}")


def run_scripts(assets: dict, projector: str, steps: int, out: str, args, timer_out: str, profile: str = "") -> None:
    """finetune.sh (ZeRO-3, the deepspeed launcher) for ``steps`` steps; pretrain.sh first writes its adapter."""
    env = {**_env(timer_out, profile), "PYTHON": sys.executable, "NUM_GPUS": str(args.num_gpus),
           "MASTER_PORT": str(args.master_port), "TRAIN_MODULE": args.train_module,
           "MODEL_NAME_OR_PATH": assets["llm"], "VISION_TOWER": assets["tower"], "PROJECTOR_TYPE": projector,
           "PRETRAIN_DATA_PATH": assets["pretrain"], "PRETRAIN_IMAGE_FOLDER": assets["image_folder"],
           "FINETUNE_DATA_PATH": assets["finetune"], "FINETUNE_IMAGE_FOLDER": assets["image_folder"],
           "PER_DEVICE_TRAIN_BATCH_SIZE": str(args.batch), "GRADIENT_ACCUMULATION_STEPS": "1",
           "PRETRAIN_GLOBAL_BATCH_SIZE": str(args.batch * args.num_gpus),
           "FINETUNE_GLOBAL_BATCH_SIZE": str(args.batch * args.num_gpus),
           "MODEL_MAX_LENGTH": str(args.model_max_length),
           "BF16": str(bool(args.bf16)), "GRADIENT_CHECKPOINTING": str(bool(args.gradient_checkpointing)),
           "SAVE_STRATEGY": "no", "LOGGING_STEPS": "1000", "RUN_NAME": f"llava-{projector}",
           "CHECKPOINT_ROOT": os.path.dirname(out), "FINETUNE_OUTPUT_DIR": out,
           "DEEPSPEED_CONFIG": args.deepspeed or os.path.join(ROOT, "scripts", "zero3", "zero3.json")}
    if args.attn_implementation:
        env["ATTN_IMPLEMENTATION"] = args.attn_implementation
    adapter = os.path.join(os.path.dirname(out), f"llava-{projector}-pretrain", "mm_projector.bin")
    stages = [("finetune.sh", {"MAX_STEPS": str(steps)})]
    if not os.path.exists(adapter):
        stages.insert(0, ("pretrain.sh", {"MAX_STEPS": "1", "STEP_TIMER_OUT": timer_out + ".pretrain"}))
    for script, extra in stages:
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "zero3", script)], capture_output=True,
                                text=True, env={**env, **extra}, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{script} for {projector} x {steps} steps failed:\n{result.stdout[-2000:]}\n"
                             f"{result.stderr[-4000:]}")
        retraces = (result.stdout + result.stderr).count("Invalidate trace cache")
        if retraces:  # ZeRO-3 fell back from its recorded module order: no prefetching on those steps
            print(f"{script} {projector}: DeepSpeed invalidated its ZeRO-3 trace {retraces} times", flush=True)
        flushes = (result.stdout + result.stderr).count("allocator cache flushes")
        if flushes:  # memory pressure: the allocator emptied its cache and retried mid-step
            print(f"{script} {projector}: DeepSpeed reported allocator cache flushes {flushes} times", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps of each run left out of its median")
    parser.add_argument("--repeats", type=int, default=2, help="runs per type, in alternating order")
    parser.add_argument("--profile", default="", help="START,COUNT: one more run per type, profiled over those steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--vision-hidden", type=int, default=1024)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    # Full shapes (defaults: MLP 4x the width, heads of 64): LLaMA-7B is --llm-hidden 4096 --llm-intermediate 11008
    # --llm-heads 32 (--llm-layers 32); CLIP-L/14-336 is the default tower (24 blocks, 1024 wide, 16 heads, MLP 4096,
    # patch 14, 336 px: 577 tokens).
    parser.add_argument("--llm-intermediate", type=int, default=None, help="LLM MLP width (default 4 x --llm-hidden)")
    parser.add_argument("--llm-heads", type=int, default=None, help="LLM attention heads (default --llm-hidden / 64)")
    parser.add_argument("--vision-intermediate", type=int, default=None,
                        help="tower MLP width (default 4 x --vision-hidden)")
    parser.add_argument("--vision-heads", type=int, default=None,
                        help="tower attention heads (default --vision-hidden / 64)")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--model-max-length", type=int, default=512,
                        help="LLaVA's --model_max_length; 576 image tokens need more than the default to stay whole")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed json; runs under the deepspeed launcher")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--master-port", type=int, default=29661)
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated projector types to time")
    parser.add_argument("--train-module", default="step_timer",
                        help="entry module for --via-scripts (scripts/bench on PYTHONPATH); suite_timer also skips the "
                             "final save")
    parser.add_argument("--via-scripts", action="store_true",
                        help="train through scripts/zero3/pretrain.sh + finetune.sh (ZeRO-3, deepspeed launcher)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup}: no step would be timed")
    if args.profile:
        start, _, count = args.profile.partition(",")
        if not (start.isdigit() and count.isdigit() and int(count) > 0 and int(start) + int(count) <= args.steps):
            raise SystemExit(f"--profile={args.profile}: expected START,COUNT with COUNT > 0 and START + COUNT <= "
                             f"--steps={args.steps} (optimizer steps START..START+COUNT-1 are profiled)")

    import torch

    work = tempfile.mkdtemp(prefix="llava-throughput-")
    assets = build_assets(work, args)
    types = [t for t in args.types.split(",") if t]
    unknown = sorted(set(types) - set(TYPES))
    if unknown or not {"mlp2x_gelu", "detached_mlp_multilayer"} <= set(types):
        raise SystemExit(f"--types={args.types}: expected a subset of {','.join(TYPES)} that holds mlp2x_gelu and "
                         f"detached_mlp_multilayer")
    runner = run_scripts if args.via_scripts else run
    runs = {t: [] for t in types}
    for repeat in range(args.repeats):
        for projector in (types if repeat % 2 == 0 else types[::-1]):
            timer_out = os.path.join(work, f"steps-{projector}-{repeat}.json")
            runner(assets, projector, args.steps, os.path.join(work, f"llava-{projector}"), args, timer_out)
            timed = json.load(open(timer_out))
            median = statistics.median(timed["step_s"][args.warmup:])
            between = statistics.median(timed["between_s"][args.warmup:])
            runs[projector].append({"median_step_s": median, "median_between_s": between, **timed})
            print(f"repeat {repeat} {projector}: {median * 1000:.1f} ms/step (+{between * 1000:.1f} ms between "
                  f"steps), memory {timed['memory']}", flush=True)
    profiled = {}
    if args.profile:
        for projector in types:
            timer_out = os.path.join(work, f"steps-{projector}-profiled.json")
            runner(assets, projector, args.steps, os.path.join(work, f"llava-{projector}"), args, timer_out,
                   profile=args.profile)
            profile_file = os.path.splitext(args.out)[0] + f".{projector}.profile.txt"
            shutil.copy(os.path.splitext(timer_out)[0] + ".profile.txt", profile_file)
            timed = json.load(open(timer_out))
            profiled[projector] = {"table": profile_file, **{k: v for k, v in timed.items() if k.startswith("profiled_")}}
            print(f"profile of {projector}: {profile_file}", flush=True)

    per_step = {t: statistics.median(r["median_step_s"] for r in runs[t]) for t in types}
    throughput = {t: args.batch * max(1, args.num_gpus) / s for t, s in per_step.items()}
    per_repeat = [runs["mlp2x_gelu"][i]["median_step_s"] / runs["detached_mlp_multilayer"][i]["median_step_s"]
                  for i in range(args.repeats)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__, "args": vars(args),
        "runs": runs, "seconds_per_step": per_step, "samples_per_second": throughput,
        "throughput_ratio_detached_vs_mlp2x_gelu": throughput["detached_mlp_multilayer"] / throughput["mlp2x_gelu"],
        "throughput_ratio_per_repeat": per_repeat, "profiled_runs": profiled,
    }
    if args.profile and torch.cuda.is_available():
        device_s = {t: profiled[t]["profiled_device_s_per_step"] for t in types}
        result["profiled_device_s_per_step"] = device_s
        result["device_time_ratio_mlp2x_gelu_vs_detached"] = device_s["mlp2x_gelu"] / device_s["detached_mlp_multilayer"]
    if "mlp_multilayer" in throughput:
        result["throughput_ratio_detached_vs_naive"] = throughput["detached_mlp_multilayer"] / throughput["mlp_multilayer"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"device: {device}; batch {args.batch}; {args.repeats} runs per type, median of steps "
          f"{args.warmup + 1}..{args.steps} in each")
    print("| projector | s/step | samples/s |\n|---|---|---|")
    for t in types:
        print(f"| {t} | {per_step[t]:.4f} | {throughput[t]:.1f} |")
    print(f"throughput detached / mlp2x_gelu = {result['throughput_ratio_detached_vs_mlp2x_gelu']:.3f} (target >= 0.97); "
          f"per repeat: {', '.join(f'{r:.3f}' for r in per_repeat)}")
    if "device_time_ratio_mlp2x_gelu_vs_detached" in result:
        print("kernel time per step (profiled run): " + ", ".join(
            f"{t} {s * 1000:.1f} ms" for t, s in result["profiled_device_s_per_step"].items()) +
            f"; mlp2x_gelu / detached = {result['device_time_ratio_mlp2x_gelu_vs_detached']:.3f}")
    if "throughput_ratio_detached_vs_naive" in result:
        print(f"throughput detached / naive      = {result['throughput_ratio_detached_vs_naive']:.3f}")


if __name__ == "__main__":
    main()
