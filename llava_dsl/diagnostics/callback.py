"""The Trainer side of the gradient diagnostics: the flags, which steps are measured, averaging over ranks,
windows written to the logs and to ``dsl_grad_stats.json`` (appended, so a resumed run keeps every window)."""
from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
from transformers import CLIPVisionModel, TrainerCallback

from llava_dsl.checkpointing.atomic import atomic_torch_save, atomic_write_text
from llava_dsl.compat.distributed import print_once, world_size
from llava_dsl.diagnostics.splitter import (GradientSplitter, PartsWindow, _synchronize, split_into_main_and_skip,
                                            split_into_parts)
from llava_dsl.diagnostics.stats import LOG_PREFIX, MAIN_KEYS, STATS_FILE, _sq_norm, cosine


@dataclass
class GradStatsArguments:
    """The gradient-diagnostics flags, mixed into the plugin's TrainingArguments."""

    dsl_grad_stats_every: int = field(default=0, metadata={
        "help": "Split the vision tower's gradient into main and skip parts every N optimizer steps (0: off); "
                "docs/diagnostics.md."})
    dsl_grad_stats_dense_steps: int = field(default=0, metadata={
        "help": "Also measure every one of the first K optimizer steps (the paper's early-training regime)."})
    dsl_grad_stats_window: int = field(default=10, metadata={
        "help": "Measured steps per statistics window (tr(Cov), SNR, mean cosine)."})


def is_measured_step(step: int, every: int, dense_steps: int) -> bool:
    """Step ``step`` (1-based optimizer step): every step up to ``dense_steps``, then every ``every``-th."""
    return step <= dense_steps or (every > 0 and step % every == 0)


def find_multilayer_tower(model: nn.Module) -> Optional[nn.Module]:
    """The module that returns the projector input: has a ``layer_spec`` and a CLIPVisionModel ``vision_tower``."""
    for module in model.modules():
        if getattr(module, "layer_spec", None) is not None and isinstance(getattr(module, "vision_tower", None),
                                                                          CLIPVisionModel):
            return module
    return None


def _all_reduce_mean(parts: Dict[int, Dict[str, torch.Tensor]], world: int) -> None:
    """Average each slice's parts over ranks (each rank saw its own micro-batches, as DDP / ZeRO average grads)."""
    import torch.distributed as dist

    for layer in sorted(parts):
        names = sorted(parts[layer])
        flat = torch.cat([parts[layer][n] for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for n, piece in zip(names, flat.split([parts[layer][n].numel() for n in names])):
            parts[layer][n] = piece


CHECKPOINT_STATE_FILE = "dsl_grad_stats_state.pt"  # in each training checkpoint


class GradStatsCallback(TrainerCallback):
    """Measures the split at the chosen steps, logs window statistics, writes ``<output_dir>/dsl_grad_stats.json``."""

    def __init__(self, trainer, tower: nn.Module, every: int, dense_steps: int, window: int):
        self.trainer = trainer
        self.every, self.dense_steps, self.window = every, dense_steps, window
        self.splitter = GradientSplitter(tower, grad_scale=functools.partial(_loss_scale, trainer))
        self.spec = tower.layer_spec
        self.steps: List[Dict] = []
        self.windows: List[Dict] = []
        self._open: Dict[str, PartsWindow] = {}
        self._open_steps: List[int] = []
        self._measuring = False
        self._step_start = 0.0
        self._step_seconds = {"measured": [], "unmeasured": []}
        self._unmeasured_events: List[tuple] = []  # (start, end) CUDA events of unmeasured steps not read yet

    # -- per step --
    def on_step_begin(self, args, state, control, **kwargs):
        self._measuring = is_measured_step(state.global_step + 1, self.every, self.dense_steps)
        if not self._measuring:
            self._step_start = self._mark()
            return
        self.splitter.seconds = 0.0
        self.splitter.install()
        self._read_unmeasured_events()
        self._step_start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._measuring:
            end = self._mark()
            if isinstance(end, float):
                self._step_seconds["unmeasured"].append(end - self._step_start)
            else:
                self._unmeasured_events.append((self._step_start, end))
            return
        elapsed = self._now() - self._step_start
        self.splitter.remove()
        self._measuring = False
        start = self._now()
        parts = self.splitter.take()
        world = world_size()
        if world > 1:
            _all_reduce_mean(parts, world)
        record = {"step": state.global_step, "groups": {}}
        for group in self.splitter.groups:
            main, skip, applied = split_into_main_and_skip(parts, self.spec, group.name)
            record["groups"][group.name] = {
                "norm_main": math.sqrt(_sq_norm(main)), "norm_skip": math.sqrt(_sq_norm(skip)),
                "norm_full": math.sqrt(_sq_norm(main + skip)), "norm_applied": math.sqrt(_sq_norm(applied)),
                "cos": cosine(main, skip),
                "taps": {str(t): {"norm": math.sqrt(_sq_norm(parts[t][group.name])),
                                  "cos_main": cosine(main, parts[t][group.name]),
                                  "detached": t in self.spec.detached_layers}
                         for t in self.spec.taps if group.name in parts[t]},
            }
            main, tap_parts = split_into_parts(parts, self.spec, group.name)  # per tap, as well as summed
            self._open.setdefault(group.name, PartsWindow(tap_parts, self.spec.taps)).add(main, tap_parts)
        self._open_steps.append(state.global_step)
        record["overhead_seconds"] = self.splitter.seconds + (self._now() - start)
        self._step_seconds["measured"].append(elapsed + (self._now() - start))
        self.steps.append(record)
        if len(self._open_steps) >= self.window:
            self._close_window(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.splitter.remove()
        if len(self._open_steps) >= 2:
            self._close_window(state, control, partial=True)
        else:
            self._write(state)

    # -- resume: the open window and everything measured so far travel with each checkpoint --
    def save_checkpoint_state(self, checkpoint: str) -> None:
        """Called by the trainer while ``checkpoint`` is written (before its completion marker)."""
        self._read_unmeasured_events()
        state = {"windows": self.windows, "steps": self.steps, "open_steps": self._open_steps,
                 "open": {name: vars(acc) for name, acc in self._open.items()},
                 "step_seconds": self._step_seconds}
        atomic_torch_save(state, os.path.join(checkpoint, CHECKPOINT_STATE_FILE))

    def load_checkpoint_state(self, checkpoint: str) -> None:
        """Called when a run resumes from ``checkpoint``: continue the statistics where that checkpoint left them."""
        path = os.path.join(checkpoint, CHECKPOINT_STATE_FILE)
        if not os.path.exists(path):
            print_once(f"llava_dsl: {checkpoint} holds no gradient statistics (written without --dsl_grad_stats_*); "
                        f"{STATS_FILE} starts at the resumed step")
            return
        # the open window's sums go where the gradients added to them will be (saved from, say, cuda:0)
        state = torch.load(path, map_location=self._device(), weights_only=True)
        self.windows, self.steps, self._open_steps = state["windows"], state["steps"], state["open_steps"]
        self._step_seconds = state["step_seconds"]
        self._open = {}
        for name, fields in state["open"].items():
            self._open[name] = PartsWindow()
            vars(self._open[name]).update(fields)

    # -- windows, logging, file --
    def _close_window(self, state, control, partial: bool = False) -> None:
        summary = {name: acc.summary() for name, acc in self._open.items()}
        self.windows.append({"first_step": self._open_steps[0], "last_step": self._open_steps[-1],
                             "num_steps": len(self._open_steps), "partial": partial, "groups": summary})
        self._open, self._open_steps = {}, []
        # a group that no tap reaches (above the deepest tap) has g_skip = 0: only its main-part keys mean anything
        main_only = {g.name for g in self.splitter.groups if not any(t >= g.last for t in self.spec.taps)}
        logs = {f"{LOG_PREFIX}/{group}/{key}": value for group, values in summary.items()
                for key, value in values.items()
                if math.isfinite(value) and (group not in main_only or key in MAIN_KEYS)}
        # Trainer.log runs the on_log event, which clears control.should_log; the Trainer has not yet logged this
        # step's loss (it does so right after on_step_end), so keep its decision
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = should_log
        self._write(state)

    def _write(self, state) -> None:
        self._read_unmeasured_events()
        if not state.is_world_process_zero:
            return
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        overheads = [s["overhead_seconds"] for s in self.steps]
        payload = {
            "layer_spec": {"num_blocks": self.spec.num_blocks, "main": self.spec.main, "taps": list(self.spec.taps),
                           "detached_layers": list(self.spec.detached_layers)},
            "groups": [{"name": g.name, "blocks": [g.first, g.last], "num_params": g.numel,
                        "reached_by": [l for l in self.spec.concat_order if l >= g.last]}
                       for g in self.splitter.groups],
            "schedule": {"every": self.every, "dense_steps": self.dense_steps, "window": self.window},
            "world_size": world_size(),
            "zero3": self.splitter.zero3,
            "timing": {"overhead_seconds_mean": mean(overheads),
                       "measured_step_seconds_mean": mean(self._step_seconds["measured"]),
                       "unmeasured_step_seconds_mean": mean(self._step_seconds["unmeasured"])},
            "windows": self.windows,
            "steps": self.steps,
        }
        atomic_write_text(os.path.join(self.trainer.args.output_dir, STATS_FILE), json.dumps(payload, indent=1))

    # -- timing: a measured step waits for the device (its split is timed on the host); an unmeasured step must
    # not, so on CUDA it records a pair of events, read once the device has caught up anyway --
    def _device(self) -> torch.device:
        return next(iter(self.splitter.clip.parameters())).device

    def _now(self) -> float:
        _synchronize(self._device())
        return time.perf_counter()

    def _mark(self):
        if self._device().type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _read_unmeasured_events(self) -> None:
        if not self._unmeasured_events:
            return
        self._unmeasured_events[-1][1].synchronize()  # the stream ran every earlier event before it
        self._step_seconds["unmeasured"] += [start.elapsed_time(end) / 1000 for start, end in self._unmeasured_events]
        self._unmeasured_events = []


def _loss_scale(trainer) -> float:
    """The fp16 loss scale inside the captured gradient (1 otherwise), so parts are in true gradient units."""
    if not getattr(trainer.args, "fp16", False):
        return 1.0
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    optimizer = getattr(getattr(trainer, "model_wrapped", None), "optimizer", None)
    for name in ("loss_scale", "cur_scale"):
        if optimizer is not None and hasattr(optimizer, name):
            return float(getattr(optimizer, name))
    return 1.0


def check_grad_stats_flags(every: int, dense_steps: int, window: int, error: type = ValueError) -> bool:
    """True when the flags ask for a measurement; ``error`` (the front door's ValueError) naming the flag for
    values that cannot work."""
    if every < 0 or dense_steps < 0:
        raise error(f"--dsl_grad_stats_every={every} --dsl_grad_stats_dense_steps={dense_steps}: expected >= 0 "
                    f"(0: off)")
    if every == 0 and dense_steps == 0:
        return False
    if window < 2:
        raise error(f"--dsl_grad_stats_window={window}: a window needs at least 2 measured steps (tr(Cov) and SNR "
                    f"are moments over the window's step gradients)")
    return True


def attach_grad_stats(trainer) -> Optional[GradStatsCallback]:
    """Add the callback to ``trainer`` when ``--dsl_grad_stats_every`` / ``--dsl_grad_stats_dense_steps`` ask
    for it; otherwise do nothing (no hook anywhere, zero cost)."""
    args = trainer.args
    every = int(getattr(args, "dsl_grad_stats_every", 0) or 0)
    dense = int(getattr(args, "dsl_grad_stats_dense_steps", 0) or 0)
    window = int(getattr(args, "dsl_grad_stats_window", 10) or 0)
    if not check_grad_stats_flags(every, dense, window):
        return None
    tower = find_multilayer_tower(trainer.model)
    if tower is None:
        raise ValueError(
            f"--dsl_grad_stats_every={every} / --dsl_grad_stats_dense_steps={dense}: the model has no multi-layer "
            f"vision tower; use --mm_projector_type mlp_multilayer or detached_mlp_multilayer (the split is by "
            f"the projector's per-layer input slices)")
    if not any(p.requires_grad for p in tower.vision_tower.parameters()):
        raise ValueError(
            f"--dsl_grad_stats_every={every} / --dsl_grad_stats_dense_steps={dense}: the vision tower is frozen, "
            f"so no gradient reaches its blocks; add --unfreeze_mm_vision_tower True")
    callback = GradStatsCallback(trainer, tower, every, dense, window)
    trainer.add_callback(callback)
    return callback
