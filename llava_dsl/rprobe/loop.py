"""The R-Probe training and evaluation loop, plain or under DeepSpeed, with resumable training checkpoints
(optimizer, scheduler, per-rank RNG and history) so a killed run continues on the same trajectory.

Why not ``transformers.Trainer``'s checkpointing: its save, RNG-state and rotation steps are private methods of
its own loop (``_save_checkpoint``, ``_save_rng_state``, ``_rotate_checkpoints``), so using them means training the
probe through a Trainer, and that loses two things. Under ZeRO-3, transformers 4.37 passes
``exclude_frozen_parameters`` to DeepSpeed only for a PEFT model, so every probe checkpoint would hold the whole
frozen MLLM (here: only the probe's state). And the probe's results (the committed runs, ``tests/rprobe``'s
bit-for-bit resume) follow this loop's batch order, schedule and clipping, which a Trainer run would not reproduce.
Shared instead: ``checkpointing.atomic`` publishes the folder; ``checkpointing.completeness`` writes its marker,
sets interrupted saves aside and finds the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from llava_dsl.checkpointing.atomic import atomic_folder, atomic_torch_save, atomic_write_text
from llava_dsl.checkpointing.completeness import (checkpoints, latest_complete_checkpoint, move_aside,
                                                  read_completion_marker, set_aside_incomplete, write_completion_marker)
from llava_dsl.compat.distributed import log_once, barrier, rank, world_size
from llava_dsl.rprobe.checkpoint import LoadedCheckpoint
from llava_dsl.rprobe.config import ProbeConfig
from llava_dsl.rprobe.data import ProbeImageSet, batch_indices, collate
from llava_dsl.rprobe.model import ProbeGeometry, RProbe, per_image_mse, per_image_psnr, unpatchify
from llava_dsl.rprobe.runner import (PROBE_FILE, ProbeRunner, _walk, build_probe, init_check, probe_meta,
                                     probe_state_dict)


STATE_FILE = "probe_state.json"  # in a training checkpoint: step, history, losses, the run's flags

DEEPSPEED_TAG = "deepspeed"  # the sub-folder of a ZeRO-3 training checkpoint that DeepSpeed writes

def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _loader(dataset, batch_sampler=None, batch_size=None, num_workers=0):
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                                           num_workers=num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                       num_workers=num_workers)


class _Batches:
    """Endless seeded batch sampler for torch's DataLoader (same order for every checkpoint).

    ``start`` skips the first batches by index only (a resumed run loads no image of a batch already trained).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start: int = 0):
        self.args = (n, batch_size, seed, rank, world)
        self.start = start

    def __iter__(self):
        batches = batch_indices(*self.args)
        for _ in range(self.start):
            next(batches)
        return batches


def trivial_baseline(train_set: ProbeImageSet, eval_set: ProbeImageSet, cfg: ProbeConfig,
                     mean: Sequence[float], std: Sequence[float]) -> Dict[str, Any]:
    """The mean training target (per pixel) as the prediction for every held-out image."""
    key = "target" if cfg.conditional else "pixels"
    total, count = 0.0, 0  # summed in float64
    for batch in _loader(train_set.subset(cfg.baseline_max_images), batch_size=cfg.batch_size,
                         num_workers=cfg.num_workers):
        total, count = total + batch[key].double().sum(dim=0), count + batch[key].shape[0]
    if not count:
        raise ValueError("the mean of zero images is undefined")
    mean_image = (total / count).float()
    mse, psnr = [], []
    for batch in _loader(eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers):
        guess = mean_image.unsqueeze(0).expand_as(batch[key])
        mse.append(per_image_mse(guess, batch[key]))
        psnr.append(per_image_psnr(guess, batch[key], mean, std))
    return {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean()),
            "train_images": count, "mean_image": mean_image}


def evaluate(forward, eval_set: ProbeImageSet, geometry: ProbeGeometry, cfg: ProbeConfig, device,
             mean: Sequence[float], std: Sequence[float], keep: int = 0) -> Dict[str, Any]:
    """Held-out MSE (normalised units, mean over images) and PSNR (dB on [0, 1] pixels, mean over images).

    Under ZeRO-3 every rank evaluates the whole set: each forward gathers parameters collectively.
    """
    mse, psnr, kept = [], [], []
    with torch.no_grad():
        for batch in _loader(eval_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers):
            batch = _to_device(batch, device)
            _, predictions, targets = forward(**batch)
            images_p = unpatchify(predictions.float(), geometry.region, geometry.grid)
            images_t = unpatchify(targets.float(), geometry.region, geometry.grid)
            mse.append(per_image_mse(images_p, images_t).cpu())
            psnr.append(per_image_psnr(images_p, images_t, mean, std).cpu())
            for k in range(images_p.shape[0]):
                if len(kept) < keep:
                    kept.append((images_t[k].cpu(), images_p[k].cpu()))
    return {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean()),
            "num_images": int(sum(len(m) for m in mse)), "samples": kept}


def _mean_over_ranks(value: torch.Tensor) -> float:
    """The batch loss averaged over ranks, so the logged train loss is the global batch's."""
    import torch.distributed as dist

    if world_size() > 1:
        value = value.float().clone()
        dist.all_reduce(value)
        value /= world_size()
    return float(value)


# The settings a resumed run must share with the one that wrote its checkpoint, with the flag that sets each.
_RUN_FLAGS = {
    "steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--learning-rate",
    "weight_decay": "--weight-decay", "warmup_steps": "--warmup-steps", "grad_clip": "--grad-clip",
    "eval_every": "--eval-every", "seed": "--seed", "depth": "--rprobe_depth", "head_hidden": "--rprobe_head_hidden",
    "bidirectional": "--rprobe_bidirectional", "norm_init": "--rprobe_norm_init",
    "conditional": "--rprobe_conditional", "use_text": "--rprobe_text",
    "max_text_tokens": "--rprobe_max_text_tokens", "crop_fraction": "--rprobe_crop_fraction",
    "eval_max_images": "--eval-max-images", "model_path": "--model-path / --checkpoints", "dtype": "--bf16",
    "train_images": "--data-path (training images)",
    "eval_images": "--eval-data-path / --eval-holdout (held-out images)",
    "world_size": "number of ranks", "deepspeed": "--deepspeed",
}


def _run_settings(ckpt: LoadedCheckpoint, train_set, eval_set, cfg: ProbeConfig, deepspeed: bool) -> Dict[str, Any]:
    settings = {k: getattr(cfg, k) for k in _RUN_FLAGS if hasattr(cfg, k)}
    settings.update(model_path=os.path.abspath(ckpt.path), dtype=str(next(ckpt.model.parameters()).dtype),
                    train_images=len(train_set), eval_images=len(eval_set), world_size=world_size(),
                    deepspeed=deepspeed)
    return settings


def _rng_state() -> Dict[str, Any]:
    """This rank's RNG states as plain lists and tensors (loadable with ``weights_only=True``)."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume_point(run_dir: str, settings: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The newest complete training checkpoint in ``run_dir`` and its saved state, or None.

    Incomplete checkpoints are moved aside first (rank 0; every rank then sees the same folder). A checkpoint
    written with other settings (``_RUN_FLAGS``) is refused, naming both values.
    """
    if rank() == 0:
        for message in set_aside_incomplete(run_dir):
            log_once("rprobe", message)
    barrier()
    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        return None
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    marker = read_completion_marker(checkpoint)
    saved = {**state["settings"], "world_size": marker["world_size"], "deepspeed": marker["deepspeed"]}
    for key, flag in _RUN_FLAGS.items():
        if saved.get(key) != settings.get(key):
            raise ValueError(
                f"{checkpoint} was written by a run with {flag} {saved.get(key)!r}, this run has "
                f"{settings.get(key)!r}: a resumed run must keep the settings it started with (resume with "
                f"{flag} {saved.get(key)!r}, or start over in another --output-dir or after moving the "
                f"checkpoint away)")
    return checkpoint, state


def save_training_checkpoint(run_dir: str, step: int, state: Dict[str, Any], cfg: ProbeConfig, engine,
                             probe: RProbe, optimizer, scheduler, meta: Dict[str, Any]) -> str:
    """Write ``run_dir/checkpoint-STEP`` atomically; every rank calls this.

    Files go to ``tmp-checkpoint-STEP``; the completion marker (each file with its size) is written last and the
    folder is then renamed, so a kill at any point leaves either a complete checkpoint or one that the next
    start moves aside. Older checkpoints beyond ``save_total_limit`` are removed only after that.
    Plain loop: rprobe.bin (weights + meta, loadable by ``eval``), optimizer.pt, scheduler.pt. ZeRO-3:
    DeepSpeed's own files (partitioned fp32 weights and optimizer state, the scheduler) under ``deepspeed/``.
    Both: ``rng_state_RANK.pth`` per rank and probe_state.json (step, history, losses, settings).
    """
    name = f"checkpoint-{step}"
    staging, final = os.path.join(run_dir, f"tmp-{name}"), os.path.join(run_dir, name)
    if rank() == 0:
        for path in (staging, final):
            if os.path.exists(path):  # from an earlier run; never mixed into this one
                log_once("rprobe", f"{path} exists from an earlier run; moved to {move_aside(run_dir, path)}")
    with atomic_folder(final, staging, publish=rank() == 0):
        barrier()
        if engine is not None:
            # the frozen MLLM is rebuilt from its own checkpoint on resume: only the probe's state is saved
            engine.save_checkpoint(staging, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        elif rank() == 0:
            torch.save({"state_dict": probe_state_dict(probe), "meta": meta}, os.path.join(staging, PROBE_FILE))
            torch.save(optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
        torch.save(_rng_state(), os.path.join(staging, f"rng_state_{rank()}.pth"))
        if rank() == 0:
            atomic_write_text(os.path.join(staging, STATE_FILE), json.dumps({"step": step, **state}, indent=1))
        barrier()
        if rank() == 0:
            write_completion_marker(staging, step, world_size(), deepspeed=engine is not None)
    if rank() == 0 and cfg.save_total_limit:
        for _, path in checkpoints(run_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(path)
    barrier()
    return final


def load_training_checkpoint(checkpoint: str, engine, probe: RProbe, optimizer, scheduler) -> None:
    """Probe weights, optimizer and scheduler state from ``checkpoint`` (the RNG is restored separately)."""
    if engine is not None:
        path, _ = engine.load_checkpoint(checkpoint, tag=DEEPSPEED_TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{checkpoint}: DeepSpeed found no checkpoint under {DEEPSPEED_TAG}/")
        return
    saved = torch.load(os.path.join(checkpoint, PROBE_FILE), map_location="cpu", weights_only=True)
    device = next(probe.parameters()).device
    probe.load_state_dict({k: v.to(device) for k, v in saved["state_dict"].items()})
    optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

def run_probe(ckpt: LoadedCheckpoint, train_set: ProbeImageSet, eval_set: ProbeImageSet, cfg: ProbeConfig,
              ds_config: Optional[Dict] = None, dump_init: Optional[str] = None,
              checkpoint_dir: Optional[str] = None, on_step: Optional[Callable[[int], None]] = None
              ) -> Dict[str, Any]:
    """Train a fresh probe on ``ckpt`` for ``cfg.steps`` steps; evaluate at step 0, every ``eval_every`` and at the end.

    With ``checkpoint_dir``, a training checkpoint is written there every ``cfg.save_every`` steps, and a run
    that finds a complete one continues from it: weights, optimizer, scheduler, every rank's RNG state, data
    position, evaluation history and per-step losses, so its results equal an uninterrupted run's.
    Returns the history, per-step train losses, final metrics, the init check, timings, the probe's weights
    and a few reconstructions.
    """
    cfg.validate()
    model = ckpt.model
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    if any(before.values()):
        raise RuntimeError("the MLLM must be frozen before probing (load it with load_checkpoint)")
    probe = build_probe(model, ckpt.geometry, cfg, ds_config)
    check = init_check(probe, model, cfg.norm_init)
    if dump_init:
        state = probe_state_dict(probe)
        if rank() == 0:
            atomic_torch_save(state, dump_init)
    runner = ProbeRunner(model, probe, ckpt.geometry, cfg.conditional)
    trainable = [p for p in probe.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps  # linear warm-up over the first steps, then constant
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0
                                                  else 1.0)
    if ds_config is not None:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(model=runner, model_parameters=trainable,
                                                               optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=ds_config)
        forward, device = engine, engine.device
    else:
        engine, forward, device = None, runner, next(model.parameters()).device
    trainee = engine if engine is not None else runner
    this_rank, world = rank(), world_size()
    meta = probe_meta(model, probe, ckpt.geometry, cfg, ckpt.path, ckpt.mean, ckpt.std)
    settings = _run_settings(ckpt, train_set, eval_set, cfg, engine is not None)
    history: List[Dict[str, Any]] = []
    losses: List[float] = []  # per step, averaged over ranks
    recent: List[float] = []  # since the last evaluation
    train_seconds = eval_seconds = 0.0
    start, resumed = 0, None
    found = find_resume_point(checkpoint_dir, settings) if checkpoint_dir else None
    if found is not None:
        resumed, saved = found
        load_training_checkpoint(resumed, engine, probe, optimizer, scheduler)
        start, history, losses, recent = saved["step"], saved["history"], saved["losses"], saved["recent"]
        train_seconds, eval_seconds = saved["train_seconds"], saved["eval_seconds"]
        log_once("rprobe", f"resuming from {resumed} (step {start} of {cfg.steps}): probe weights, optimizer, scheduler, every "
             f"rank's RNG state, data position and evaluation history")
    elif checkpoint_dir and cfg.save_every:
        log_once("rprobe", f"training checkpoints every {cfg.save_every} steps in {checkpoint_dir}")
    loader = iter(_loader(train_set, batch_sampler=_Batches(len(train_set), cfg.batch_size, cfg.seed, this_rank, world,
                                                            start=start), num_workers=cfg.num_workers))
    if resumed is not None:  # after the loader, whose creation draws from the RNG
        _set_rng_state(torch.load(os.path.join(resumed, f"rng_state_{this_rank}.pth"), weights_only=True))

    def evaluation(keep: int = 0) -> Dict[str, Any]:
        nonlocal eval_seconds
        began = time.perf_counter()
        trainee.eval()
        metrics = evaluate(forward, eval_set, ckpt.geometry, cfg, device, ckpt.mean, ckpt.std, keep)
        trainee.train()
        model.eval()
        eval_seconds += time.perf_counter() - began
        return metrics

    def record(step: int, keep: int = 0) -> Dict[str, Any]:
        metrics = evaluation(keep)
        row = {"step": step, "mse": metrics["mse"], "psnr": metrics["psnr"],
               "train_loss": (sum(recent) / len(recent)) if recent else None}
        recent.clear()
        history.append(row)
        loss_text = f" (train loss {row['train_loss']:.4f})" if row["train_loss"] is not None else ""
        log_once("rprobe", f"{os.path.basename(ckpt.path.rstrip('/'))} step {step}: held-out mse {row['mse']:.4f} "
             f"psnr {row['psnr']:.2f} dB{loss_text}")
        return metrics

    if start == 0:
        record(0)
    trainee.train()
    model.eval()  # the MLLM stays in eval mode; only the probe trains
    final = None
    for step in range(start + 1, cfg.steps + 1):
        began = time.perf_counter()
        batch = _to_device(next(loader), device)
        loss = forward(**batch)[0]
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        value = _mean_over_ranks(loss.detach())
        losses.append(value)
        recent.append(value)
        train_seconds += time.perf_counter() - began
        if step % cfg.eval_every == 0 or step == cfg.steps:
            final = record(step, keep=cfg.grid_images if step == cfg.steps else 0)
        if checkpoint_dir and cfg.save_every and step % cfg.save_every == 0:
            state = {"settings": settings, "history": history, "losses": losses, "recent": recent,
                     "train_seconds": train_seconds, "eval_seconds": eval_seconds}
            save_training_checkpoint(checkpoint_dir, step, state, cfg, engine, probe, optimizer, scheduler, meta)
        if on_step is not None:  # after the step and its checkpoint
            on_step(step)
    if final is None:  # resumed from the last step: its row is in the history; redo the metrics and pictures
        final = evaluation(keep=cfg.grid_images)
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    if any(after.values()):
        raise RuntimeError("an MLLM parameter became trainable during probing")
    state = probe_state_dict(probe)
    result = {"history": history, "train_losses": losses,
              "final": {"mse": final["mse"], "psnr": final["psnr"], "num_images": final["num_images"]},
              "init_check": check, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "seconds_per_step": train_seconds / cfg.steps, "probe_depth": probe.depth,
              "llm_layers": len(model.get_model().layers), "geometry": ckpt.geometry.as_dict(),
              "resumed_from": None if resumed is None else {"checkpoint": resumed, "step": start},
              "state_dict": state, "meta": meta, "samples": final["samples"], "probe": probe}
    if engine is not None:
        result["probe"] = None  # partitioned; the gathered weights are in state_dict
        engine.destroy()
    return result


def deepspeed_config(path: str, cfg: ProbeConfig, bf16: bool) -> Dict[str, Any]:
    """LLaVA's ZeRO json with its "auto" values filled from the probe flags (the probe has no HF Trainer)."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    world = world_size()
    fills = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": 1,
             "train_batch_size": cfg.batch_size * world}
    for key, value in fills.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    fp16, half = config.setdefault("fp16", {}), config.setdefault("bf16", {})
    if fp16.get("enabled", False) == "auto":
        fp16["enabled"] = False  # the probe trains in fp32 or bf16 (--bf16)
    if half.get("enabled", "auto") == "auto":
        half["enabled"] = bf16
    config["gradient_clipping"] = cfg.grad_clip
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not torch.cuda.is_available():
        # gloo: the coalesced all-gather can leave gathered weights stale (see safety.cpu_safe_deepspeed_argv)
        zero["stage3_allgather_sequential"] = True
    config["zero_allow_untested_optimizer"] = True  # the probe's AdamW is a plain torch optimizer
    config.setdefault("steps_per_print", 10 ** 9)
    left = [k for k, v in _walk(config) if v == "auto"]
    if left:
        raise ValueError(f"--deepspeed={path}: 'auto' left for {left}; the probe stage fills only "
                         f"{sorted(fills)}, fp16/bf16 'enabled'; set the others to numbers")
    return config
