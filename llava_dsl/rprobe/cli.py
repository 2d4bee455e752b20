"""R-Probe on LLaVA checkpoints: the probe stage, checkpoint comparison, and the auxiliary-loss trainer.

    python -m llava_dsl.rprobe train   --model-path CKPT --data-path JSON --image-folder DIR --output-dir OUT
    python -m llava_dsl.rprobe eval    --model-path CKPT --probe-path OUT/rprobe.bin --eval-data-path JSON ...
    python -m llava_dsl.rprobe compare --checkpoints A B C --data-path JSON --eval-data-path JSON --steps N ...

Every MLLM parameter stays frozen; only the probe (``llava_dsl.rprobe.model.RProbe``) trains. One process runs a
plain torch loop; under the ``deepspeed`` launcher with ``--deepspeed zero3.json`` the same code runs ZeRO-3
(the checkpoint is loaded partitioned, the probe's copy of the LLM layers is gathered, not copied from
empty partitions). Training checkpoints (``--save-every``) let the same command resume after a kill with the
same trajectory; every file the stage writes is written atomically. See docs/rprobe.md.

Everything here that touches ``llava`` is listed in ``LLAVA_TOUCHES`` with the reason.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from dataclasses import asdict
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from llava_dsl.checkpointing.atomic import atomic_file, atomic_write_text
from llava_dsl.compat.deepspeed import init_deepspeed_distributed
from llava_dsl.compat.distributed import log_once, close_process_group, rank, world_size
from llava_dsl.plots import reconstruction_grid, save_png
from llava_dsl.rprobe.checkpoint import LoadedCheckpoint, load_checkpoint
from llava_dsl.rprobe.config import ProbeConfig
from llava_dsl.rprobe.data import ProbeImageSet, read_entries
from llava_dsl.rprobe.loop import deepspeed_config, evaluate, run_probe, trivial_baseline
from llava_dsl.rprobe.model import NORM_INITS, PIXEL_LAYOUT, ProbeMismatchError, steps_to_threshold
from llava_dsl.rprobe.report import _public, _short_names, _threshold, to_pil, write_pictures
from llava_dsl.rprobe.runner import PROBE_FILE, ProbeRunner, _deepspeed_loading, load_probe, save_probe


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
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.rprobe", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the sub-command; the rank is also in $LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
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
            log_once("rprobe", f"trivial predictor (mean of {trivial['train_images']} training images): held-out mse "
                 f"{trivial['mse']:.4f}, psnr {trivial['psnr']:.2f} dB")
        run_dir = os.path.join(args.output_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        result = run_probe(ckpt, train_set, eval_set, cfg, ds_config,
                           dump_init=os.path.join(run_dir, "rprobe_init.bin") if args.dump_init else None,
                           checkpoint_dir=run_dir)
        if rank() == 0:
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
        "config": {**asdict(cfg), "deepspeed": ds_path, "world_size": world_size(), "bf16": bool(args.bf16),
                   "data_path": args.data_path, "eval_data_path": args.eval_data_path,
                   "eval_holdout": args.eval_holdout, "model_base": args.model_base},
        "checkpoints": [_public(r) for r in results],
    }
    if rank() == 0:
        mean, std = reference[1]["mean"], reference[1]["std"]
        report["pictures"] = write_pictures(args.output_dir, names, results, mean, std, threshold, trivial["mse"])
        _write_json(os.path.join(args.output_dir, "report.json"), report)
        for result in report["checkpoints"]:
            log_once("rprobe", f"{result['name']}: final held-out mse {result['final']['mse']:.4f} (trivial {trivial['mse']:.4f}), "
                 f"psnr {result['final']['psnr']:.2f} dB, steps to mse < {threshold:.4g}: "
                 f"{result['steps_to_threshold']}, {result['seconds_per_step'] * 1000:.1f} ms/step")
        log_once("rprobe", f"report: {os.path.join(args.output_dir, 'report.json')}")
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
        save_png(reconstruction_grid(rows, ["original", "probe"]), report["reconstructions"])
    _write_json(os.path.join(args.output_dir, "eval.json"), report)
    log_once("rprobe", f"held-out mse {metrics['mse']:.4f}, psnr {metrics['psnr']:.2f} dB on {metrics['num_images']} images")
    return report


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line, returning the report (``main`` is the console entry point and returns nothing)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "eval":
            return command_eval(args)
        checkpoints = args.checkpoints if args.command == "compare" else [args.model_path]
        report = command_compare(args, checkpoints)
        if args.command == "train" and rank() == 0:
            # one checkpoint: its probe also goes beside report.json at the top of the output folder
            only = report["checkpoints"][0]
            with atomic_file(os.path.join(args.output_dir, PROBE_FILE)) as temporary:
                shutil.copyfile(only["probe_path"], temporary)
        return report
    finally:
        close_process_group()


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)
