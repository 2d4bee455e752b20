"""Stage-2 (joint) training throughput through the real entry point, per projector type, side by side.

    python scripts/bench/train_throughput.py --out scripts/bench/results_train_<device>.json [--deepspeed ...]

Builds a scaled tiny model (a CLIP-L-shaped tower by default, since the vision side is what the projector types
change) and runs `python -m llava_dsl.train` for `mlp2x_gelu`, `mlp_multilayer` and `detached_mlp_multilayer`
with the vision tower unfrozen. Each type runs twice, with --max_steps SHORT and LONG, in interleaved order; the
difference of the Trainer's train_runtime removes start-up and first-step costs: seconds per step =
(runtime_long - runtime_short) / (LONG - SHORT).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from llava_dsl import tiny_assets  # noqa: E402

TYPES = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")


def build_assets(out: str, args) -> dict:
    tokenizer = tiny_assets.build_tokenizer(os.path.join(out, "tokenizer"))
    llm = tiny_assets.build_language_model(os.path.join(out, "llm"), tokenizer, hidden_size=args.llm_hidden,
                                           intermediate_size=args.llm_hidden * 4, num_layers=args.llm_layers,
                                           num_heads=max(1, args.llm_hidden // 64))
    tower = tiny_assets.build_vision_tower(os.path.join(out, "tower"), image_size=args.image_size, patch_size=14,
                                           hidden_size=args.vision_hidden, intermediate_size=args.vision_hidden * 4,
                                           num_layers=args.vision_layers, num_heads=max(1, args.vision_hidden // 64))
    data = tiny_assets.write_llava_datasets(os.path.join(out, "data"), num_samples=args.samples,
                                            image_size=args.image_size)
    return {"llm": llm, "tower": tower, **data}


def run(assets: dict, projector: str, steps: int, out: str, args) -> float:
    command = [sys.executable, "-m", "llava_dsl.train"]
    if args.deepspeed:
        command = ["deepspeed", "--num_gpus", str(args.num_gpus), "--master_port", str(args.master_port),
                   "--module", "llava_dsl.train", "--deepspeed", args.deepspeed]
    flags = {
        "model_name_or_path": assets["llm"], "vision_tower": assets["tower"], "version": "v1",
        "data_path": assets["finetune"], "image_folder": assets["image_folder"], "mm_projector_type": projector,
        "mm_vision_select_layer": -2, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "max_steps": steps, "per_device_train_batch_size": args.batch,
        "learning_rate": 2e-5, "save_strategy": "no", "report_to": "none", "model_max_length": 512,
        "bf16": args.bf16, "tf32": False, "logging_steps": 1000, "dataloader_num_workers": 2,
        "lazy_preprocess": True, "output_dir": out, "unfreeze_mm_vision_tower": True, "mm_vision_tower_lr": 2e-6,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    command += [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    if args.attn_implementation:
        command += ["--attn_implementation", args.attn_implementation]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{projector} x {steps} steps failed:\n{result.stderr[-4000:]}")
    history = json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
    return next(entry["train_runtime"] for entry in history if "train_runtime" in entry)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--vision-hidden", type=int, default=1024)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed json; runs under the deepspeed launcher")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--master-port", type=int, default=29661)
    args = parser.parse_args(argv)

    import torch

    work = tempfile.mkdtemp(prefix="llava-throughput-")
    assets = build_assets(work, args)
    runtimes = {t: {} for t in TYPES}
    for steps in (args.short, args.long):
        for projector in TYPES:  # interleaved, so drift hits every type alike
            runtimes[projector][steps] = run(assets, projector, steps, os.path.join(work, f"llava-{projector}"), args)
    per_step = {t: (r[args.long] - r[args.short]) / (args.long - args.short) for t, r in runtimes.items()}
    throughput = {t: args.batch * max(1, args.num_gpus) / s for t, s in per_step.items()}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__, "args": vars(args),
        "runtimes_s": runtimes, "seconds_per_step": per_step, "samples_per_second": throughput,
        "throughput_ratio_detached_vs_mlp2x_gelu": throughput["detached_mlp_multilayer"] / throughput["mlp2x_gelu"],
        "throughput_ratio_detached_vs_naive": throughput["detached_mlp_multilayer"] / throughput["mlp_multilayer"],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"device: {device}; batch {args.batch}; {args.long - args.short} timed steps per type")
    print("| projector | s/step | samples/s |\n|---|---|---|")
    for t in TYPES:
        print(f"| {t} | {per_step[t]:.4f} | {throughput[t]:.1f} |")
    print(f"throughput detached / mlp2x_gelu = {result['throughput_ratio_detached_vs_mlp2x_gelu']:.3f} (target >= 0.97)")
    print(f"throughput detached / naive      = {result['throughput_ratio_detached_vs_naive']:.3f}")


if __name__ == "__main__":
    main()
