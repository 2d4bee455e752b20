"""The built-in end-to-end demo: `python -m llava_dsl.demo` (or `make demo`).

On a CPU, with no downloads: builds tiny local assets (LLaMA-style LM, 8-block CLIP tower, a tokenizer
trained on the spot, rendered-text images), then trains LLaVA-1.5's two stages through LLaVA's own train()
for the single-layer baseline (`mlp2x_gelu`), naive multi-layer fusion (`mlp_multilayer`) and Detached
Skip-Links (`detached_mlp_multilayer`), stage 2 with the vision tower unfrozen. Same seed and data for all.
Each stage-2 checkpoint is reloaded through LLaVA's `load_pretrained_model` and answers one question.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

PROJECTORS = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")


def stage_flags(assets: Dict[str, str], stage: str, projector: str, output_dir: str, seed: int) -> List[str]:
    flags = {
        "model_name_or_path": assets["llm"], "vision_tower": assets["vision_tower"],
        "version": "plain" if stage == "pretrain" else "v1", "data_path": assets[stage],
        "image_folder": assets["image_folder"], "mm_projector_type": projector, "mm_vision_select_layer": -2,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "num_train_epochs": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3 if stage == "pretrain" else 2e-4,
        "save_strategy": "no", "report_to": "none", "model_max_length": 128, "bf16": False, "tf32": False,
        "logging_steps": 1, "dataloader_num_workers": 0, "lazy_preprocess": True, "seed": seed,
        "output_dir": output_dir,
    }
    if stage == "pretrain":
        flags["tune_mm_mlp_adapter"] = True
    else:
        flags.update(pretrain_mm_mlp_adapter=os.path.join(output_dir.replace("-finetune", "-pretrain"),
                                                          "mm_projector.bin"),
                     unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-5)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def train_stage(flags: List[str], log_path: str) -> List[float]:
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-m", "llava_dsl.train"] + flags, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"training failed (exit {result.returncode}); see {log_path}")
    output_dir = flags[flags.index("--output_dir") + 1]
    history = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def answer(checkpoint: str, image_path: str) -> str:
    import torch
    from PIL import Image

    import llava_dsl

    llava_dsl.register()
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, os.path.basename(checkpoint),
                                                           device_map="cpu", device="cpu")
    model = model.float().eval()
    pixels = process_images([Image.open(image_path).convert("RGB")], processor, model.config).float()
    prompt = "USER: <image>\nWhat is written in the image? ASSISTANT:"
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0)
    with torch.no_grad():
        output = model.generate(input_ids, images=pixels, do_sample=False, max_new_tokens=6)
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=32)
    args = parser.parse_args(argv)

    from .tiny_assets import build_all

    started = time.time()
    assets = build_all(os.path.join(args.output_dir, "assets"), seed=args.seed, num_samples=args.num_samples)
    rows = []
    for projector in PROJECTORS:
        row = {"projector": projector}
        for stage in ("pretrain", "finetune"):
            output_dir = os.path.join(args.output_dir, f"llava-{projector}-{stage}")
            print(f"[{time.time() - started:5.0f}s] {projector}: {stage} -> {output_dir}", flush=True)
            losses = train_stage(stage_flags(assets, stage, projector, output_dir, args.seed), output_dir + ".log")
            row[f"{stage}_first_loss"], row[f"{stage}_last_loss"] = losses[0], losses[-1]
        first_image = os.path.join(assets["image_folder"], sorted(os.listdir(assets["image_folder"]))[0])
        row["answer"] = answer(output_dir, first_image)
        rows.append(row)

    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\nTiny end-to-end run ({time.time() - started:.0f}s, CPU, random tiny models: losses show the"
          f" pipeline works, not model quality)\n")
    print("| projector | stage 1 loss (first -> last) | stage 2 joint loss (first -> last) | reloaded answer |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['projector']} | {row['pretrain_first_loss']:.3f} -> {row['pretrain_last_loss']:.3f} | "
              f"{row['finetune_first_loss']:.3f} -> {row['finetune_last_loss']:.3f} | {row['answer']!r} |")
    print(f"\nCheckpoints, logs and results.json are in {args.output_dir}/")


if __name__ == "__main__":
    main()
