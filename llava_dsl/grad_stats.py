"""Skip-path vs main-path gradient on the vision tower's block groups: the paper's Proposition 4.3, measured.

A multi-layer projector reads ``[h_main ; h_tap ; ...]`` (concat order: main, then taps deep to shallow). The
gradient that reaches a group of ViT blocks is the sum of what arrives through each slice of that input:

    g_full = g_main + g_skip,    g_skip = sum of the parts sent by the taps at or above the group

At a measured step, ``GradientSplitter`` keeps references to the tower's hidden states during the forward,
captures d loss / d(projector input) during the normal backward, cuts it into its per-layer slices and pushes
each slice back through the tower on its own with ``torch.autograd.grad``, so the parts are exact and add up to
the full gradient. A detached tap's slice is pushed back through the tower's own (un-detached) hidden state,
so a detached run reports the gradient its skip *would* send (the counterfactual) and naive and detached runs
report the same quantities. Nothing in ``.grad`` is touched: the update is the one training would make anyway.

Statistics over a window of W measured steps, per group (population moments over the W step gradients):
    tr(Cov) = E||g||^2 - ||E g||^2,   SNR = ||E g||^2 / E||g||^2,   mean cos(g_main, g_skip), mean norms.

Plain torch + transformers; the trainer side is a ``TrainerCallback`` that any ``transformers.Trainer`` takes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from transformers import CLIPVisionModel, TrainerCallback

STATS_FILE = "dsl_grad_stats.json"
LOG_PREFIX = "dsl_grad"
MAIN_KEYS = ("trcov_main", "snr_main", "norm_main")


# --------------------------------------------------------------------------------------------------
# Statistics over a set of gradient samples (rows).
# --------------------------------------------------------------------------------------------------
def _rows(samples) -> torch.Tensor:
    x = torch.stack([torch.as_tensor(s).reshape(-1) for s in samples]) if isinstance(samples, (list, tuple)) \
        else torch.as_tensor(samples)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"expected n >= 1 gradient samples as rows of an (n, d) matrix, got shape {tuple(x.shape)}")
    return x.double()


def trace_covariance(samples) -> float:
    """tr(Cov) of the rows, population form (1/n): E||g - E g||^2 = E||g||^2 - ||E g||^2."""
    x = _rows(samples)
    return float(((x - x.mean(0)) ** 2).sum(1).mean())


def gradient_snr(samples) -> float:
    """Effective SNR ||E g||^2 / E||g||^2 (1 for a constant gradient, -> 0 for pure noise); 0 if all are zero."""
    x = _rows(samples)
    second = float((x ** 2).sum(1).mean())
    return float((x.mean(0) ** 2).sum()) / second if second > 0 else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); 0 when either is the zero vector (no direction to compare)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _sq_norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v, dtype=torch.float64) ** 2)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double())) if a.numel() else 0.0


class WindowAccumulator:
    """Streaming window statistics of (g_main, g_skip) pairs for one group: two running vector sums, scalars.

    Equal to ``trace_covariance`` / ``gradient_snr`` / ``cosine`` on the stacked samples, without keeping them.
    """

    def __init__(self):
        self.n = 0
        self.sum_main: Optional[torch.Tensor] = None
        self.sum_skip: Optional[torch.Tensor] = None
        self.sq_main = self.sq_skip = self.sq_full = 0.0
        self.cos_sum = self.norm_main_sum = self.norm_skip_sum = 0.0

    def add(self, main: torch.Tensor, skip: torch.Tensor) -> None:
        main, skip = main.float(), skip.float()
        if self.sum_main is None:
            self.sum_main, self.sum_skip = main.clone(), skip.clone()
        else:
            self.sum_main += main
            self.sum_skip += skip
        sq_main, sq_skip, dot = _sq_norm(main), _sq_norm(skip), _dot(main, skip)
        self.n += 1
        self.sq_main += sq_main
        self.sq_skip += sq_skip
        self.sq_full += sq_main + sq_skip + 2 * dot
        self.cos_sum += cosine(main, skip)
        self.norm_main_sum += math.sqrt(sq_main)
        self.norm_skip_sum += math.sqrt(sq_skip)

    def summary(self) -> Dict[str, float]:
        n = self.n
        mean_main, mean_skip = self.sum_main / n, self.sum_skip / n
        m2, s2 = _sq_norm(mean_main), _sq_norm(mean_skip)
        f2 = m2 + s2 + 2 * _dot(mean_main, mean_skip)
        e_main, e_skip, e_full = self.sq_main / n, self.sq_skip / n, self.sq_full / n
        trcov_main, trcov_skip = max(e_main - m2, 0.0), max(e_skip - s2, 0.0)
        return {
            "trcov_main": trcov_main,
            "trcov_skip": trcov_skip,
            "trcov_full": max(e_full - f2, 0.0),
            "trcov_ratio": trcov_skip / trcov_main if trcov_main > 0 else float("inf") if trcov_skip > 0 else 0.0,
            "cos_mean": self.cos_sum / n,
            "cos_of_means": cosine(mean_main, mean_skip),
            "snr_main": m2 / e_main if e_main > 0 else 0.0,
            "snr_full": f2 / e_full if e_full > 0 else 0.0,
            "norm_main": self.norm_main_sum / n,
            "norm_skip": self.norm_skip_sum / n,
        }


# --------------------------------------------------------------------------------------------------
# Block groups of a CLIP tower for a layer spec.
# --------------------------------------------------------------------------------------------------
@dataclass
class BlockGroup:
    """Blocks ``first..last`` (1-based; 0..0 = embeddings + pre-LayerNorm), fed by the slices at or above ``last``."""

    name: str
    first: int
    last: int
    params: List[nn.Parameter] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(_full_numel(p) for p in self.params)


def _full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave p.numel() == 0


def group_bounds(concat_order: Sequence[int]) -> List[tuple]:
    """(name, first, last) for the embeddings and for the blocks between consecutive tapped layers, shallow first.

    Taps 2, 4, 6 and main 7 give: embeddings, blocks 1-2, blocks 3-4, blocks 5-6, block 7.
    """
    bounds, previous = [("embeddings", 0, 0)], 0
    for layer in sorted(set(concat_order)):
        if layer > previous:
            name = f"block_{layer}" if layer == previous + 1 else f"blocks_{previous + 1}-{layer}"
            bounds.append((name, previous + 1, layer))
            previous = layer
    return bounds


def block_groups(clip: CLIPVisionModel, concat_order: Sequence[int]) -> List[BlockGroup]:
    vision = clip.vision_model
    trainable = lambda modules: [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = []
    for name, first, last in group_bounds(concat_order):
        modules = [vision.embeddings, vision.pre_layrnorm] if last == 0 else list(vision.encoder.layers[first - 1:last])
        groups.append(BlockGroup(name, first, last, trainable(modules)))
    return groups


# --------------------------------------------------------------------------------------------------
# The gradient split.
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _zero3_backward_counters_kept(modules: Sequence[nn.Module]):
    """Run an extra backward through ZeRO-3-hooked modules without consuming the main backward's hook state.

    ZeRO-3 gathers a module's partitioned parameters in a pre-backward autograd node guarded by a per-module
    counter (``applied_pre_backward_ref_cnt``) and releases them after the module's backward
    (``ds_grads_remaining``). An extra ``autograd.grad`` through the same graph runs those nodes too and would
    leave the counters spent, so the main backward would then use released (empty) parameters. Restoring the
    counters lets the main backward gather, use and release them exactly as without the extra pass.
    """
    names = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")
    saved = [(m, {n: getattr(m, n) for n in names if hasattr(m, n)}) for m in modules]
    try:
        yield
    finally:
        for module, values in saved:
            for name, value in values.items():
                setattr(module, name, value)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GradientSplitter:
    """Per-slice parameter gradients of a multi-layer vision tower, for the forwards/backwards it observes.

    ``tower``: the module whose forward returns the projector input (LLaVA's vision tower with a
    ``layer_spec``, a ``select_feature`` and a Hugging Face ``CLIPVisionModel`` as ``vision_tower``).

        splitter = GradientSplitter(tower)
        with splitter.observing():
            model(**batch).loss.backward()      # as many micro-batches as the step has
        parts = splitter.take()                 # {layer: {group name: flat fp32 gradient}}, summed

    ``parts[spec.main]`` is the main part, ``parts[tap]`` what the tap's slice sends (applied or not).
    Hooks exist only while observing; the normal backward and ``.grad`` are unchanged.
    """

    def __init__(self, tower: nn.Module, grad_scale: Optional[Callable[[], float]] = None):
        self.tower = tower
        self.spec = tower.layer_spec
        self.clip: CLIPVisionModel = tower.vision_tower
        self.groups = block_groups(self.clip, self.spec.concat_order)
        self.width = self.clip.config.hidden_size
        self.grad_scale = grad_scale or (lambda: 1.0)
        self.zero3 = any(hasattr(p, "ds_id") for p in self.clip.parameters())
        self._handles: List = []
        self._armed = False
        self._call_records: List[Dict[int, torch.Tensor]] = []
        self._sums: Dict[int, Dict[str, torch.Tensor]] = {}
        self._saved_checkpoint_func = None
        self.seconds = 0.0

    # which groups each slice reaches: the groups at or below its layer
    def groups_reached(self, layer: int) -> List[BlockGroup]:
        return [g for g in self.groups if g.last <= layer]

    # ---- hooks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observing(self):
        self.install()
        try:
            yield self
        finally:
            self.remove()

    def install(self) -> None:
        if self._handles:
            return
        vision = self.clip.vision_model
        wanted = set(self.spec.concat_order)
        self._handles.append(self.tower.register_forward_pre_hook(self._on_tower_start))
        self._handles.append(self.tower.register_forward_hook(self._on_tower_output))
        self._handles.append(vision.pre_layrnorm.register_forward_hook(self._on_state(0, start=True)))
        for layer in sorted(wanted - {0}):
            self._handles.append(vision.encoder.layers[layer - 1].register_forward_hook(self._on_state(layer)))
        encoder = vision.encoder
        if getattr(encoder, "gradient_checkpointing", False):
            # Reentrant checkpointing cannot serve torch.autograd.grad (and would write into .grad); for the
            # measured step the same blocks are checkpointed non-reentrantly: same values, same recompute.
            self._saved_checkpoint_func = encoder._gradient_checkpointing_func
            encoder._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                     use_reentrant=False)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._armed = False
        if self._saved_checkpoint_func is not None:
            self.clip.vision_model.encoder._gradient_checkpointing_func = self._saved_checkpoint_func
            self._saved_checkpoint_func = None

    def _on_tower_start(self, module, args):
        self._armed = True
        self._call_records = []

    def _on_state(self, layer: int, start: bool = False):
        def hook(module, args, output):
            if not self._armed:  # e.g. a checkpoint recomputing the block during backward
                return
            if start:
                self._call_records.append({})
            self._call_records[-1][layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def _on_tower_output(self, module, args, output):
        self._armed = False
        outputs = output if isinstance(output, (list, tuple)) else [output]
        if len(outputs) != len(self._call_records):
            raise RuntimeError(
                f"grad stats: the vision tower returned {len(outputs)} feature tensor(s) but its blocks ran "
                f"{len(self._call_records)} time(s); cannot pair hidden states with features")
        for features, states in zip(outputs, self._call_records):
            if features.requires_grad and all(s.requires_grad for s in states.values()):
                features.register_hook(functools.partial(self._split, states))
        self._call_records = []

    # ---- the split ----------------------------------------------------------------------------
    def _split(self, states: Dict[int, torch.Tensor], grad: torch.Tensor) -> None:
        """Tensor hook on the projector input: push each channel slice of d loss / d input back alone."""
        _synchronize(grad.device)
        start = time.perf_counter()
        scale = float(self.grad_scale())
        c = self.width
        expected = c * len(self.spec.concat_order)
        if grad.shape[-1] != expected:
            raise RuntimeError(f"grad stats: projector input has {grad.shape[-1]} channels, expected {expected} "
                               f"({len(self.spec.concat_order)} layers x {c}) for layers {self.spec.concat_order}")
        for index, layer in enumerate(self.spec.concat_order):
            state = states[layer]
            piece = grad[..., index * c:(index + 1) * c].to(state.dtype)
            if piece.shape[1] != state.shape[1]:  # 'patch' features drop the CLS token, which gets no gradient
                padded = piece.new_zeros(state.shape)
                padded[:, state.shape[1] - piece.shape[1]:] = piece
                piece = padded
            groups = self.groups_reached(layer)
            params = [p for g in groups for p in g.params]
            keep = _zero3_backward_counters_kept(list(self.clip.modules())) if self.zero3 else contextlib.nullcontext()
            with keep, torch.enable_grad():
                grads = torch.autograd.grad([state], params, [piece], retain_graph=True, allow_unused=True)
            flat_grads = [g.detach().float().reshape(-1) / scale if g is not None
                          else torch.zeros(_full_numel(p), device=grad.device) for p, g in zip(params, grads)]
            sums, offset = self._sums.setdefault(layer, {}), 0
            for group in groups:
                pieces = flat_grads[offset:offset + len(group.params)]
                offset += len(group.params)
                flat = torch.cat(pieces) if pieces else torch.zeros(0, device=grad.device)
                if group.name in sums:
                    sums[group.name] += flat
                else:
                    sums[group.name] = flat
        _synchronize(grad.device)
        self.seconds += time.perf_counter() - start

    def take(self, device: Optional[torch.device] = None) -> Dict[int, Dict[str, torch.Tensor]]:
        """The per-slice parts summed since the last take; zeros where nothing was observed (every slice and
        reached group is present, so ranks can all-reduce the same structure)."""
        if device is None:
            device = next(iter(self.clip.parameters())).device
        parts = {}
        for layer in self.spec.concat_order:
            got = self._sums.get(layer, {})
            parts[layer] = {g.name: got[g.name] if g.name in got else torch.zeros(g.numel, device=device)
                            for g in self.groups_reached(layer)}
        self._sums = {}
        return parts


def split_into_main_and_skip(parts: Dict[int, Dict[str, torch.Tensor]], spec, group: str):
    """(g_main, g_skip, g_applied) of one group: skip sums every tap reaching it; applied leaves out detached taps."""
    main = parts[spec.main][group]
    taps = [t for t in spec.taps if group in parts[t]]
    skip = sum((parts[t][group] for t in taps), torch.zeros_like(main))
    detached = set(spec.detached_layers)
    applied = main + sum((parts[t][group] for t in taps if t not in detached), torch.zeros_like(main))
    return main, skip, applied


# --------------------------------------------------------------------------------------------------
# Trainer side.
# --------------------------------------------------------------------------------------------------
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


def _distributed() -> Optional[int]:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def _all_reduce_mean(parts: Dict[int, Dict[str, torch.Tensor]], world: int) -> None:
    """Average each slice's parts over ranks (each rank saw its own micro-batches, as DDP / ZeRO average grads)."""
    import torch.distributed as dist

    for layer in sorted(parts):
        names = sorted(parts[layer])
        flat = torch.cat([parts[layer][n] for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for n in names:
            size = parts[layer][n].numel()
            parts[layer][n] = flat[offset:offset + size]
            offset += size


class GradStatsCallback(TrainerCallback):
    """Measures the split at the chosen steps, logs window statistics, writes ``<output_dir>/dsl_grad_stats.json``."""

    def __init__(self, trainer, tower: nn.Module, every: int, dense_steps: int, window: int):
        self.trainer = trainer
        self.every, self.dense_steps, self.window = every, dense_steps, window
        self.splitter = GradientSplitter(tower, grad_scale=functools.partial(_loss_scale, trainer))
        self.spec = tower.layer_spec
        self.steps: List[Dict] = []
        self.windows: List[Dict] = []
        self._open: Dict[str, WindowAccumulator] = {}
        self._open_steps: List[int] = []
        self._measuring = False
        self._step_start = 0.0
        self._step_seconds = {"measured": [], "unmeasured": []}

    # -- per step --
    def on_step_begin(self, args, state, control, **kwargs):
        self._measuring = is_measured_step(state.global_step + 1, self.every, self.dense_steps)
        if self._measuring:
            self.splitter.seconds = 0.0
            self.splitter.install()
        self._step_start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = self._now() - self._step_start
        if not self._measuring:
            self._step_seconds["unmeasured"].append(elapsed)
            return
        self.splitter.remove()
        self._measuring = False
        start = self._now()
        parts = self.splitter.take()
        world = _distributed()
        if world and world > 1:
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
            self._open.setdefault(group.name, WindowAccumulator()).add(main, skip)
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
            "world_size": _distributed() or 1,
            "zero3": self.splitter.zero3,
            "timing": {"overhead_seconds_mean": mean(overheads),
                       "measured_step_seconds_mean": mean(self._step_seconds["measured"]),
                       "unmeasured_step_seconds_mean": mean(self._step_seconds["unmeasured"])},
            "windows": self.windows,
            "steps": self.steps,
        }
        path = os.path.join(self.trainer.args.output_dir, STATS_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(path + ".tmp", path)

    def _now(self) -> float:
        _synchronize(next(iter(self.splitter.clip.parameters())).device)
        return time.perf_counter()


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


def attach_grad_stats(trainer) -> Optional[GradStatsCallback]:
    """Add the callback to ``trainer`` when ``--dsl_grad_stats_every`` / ``--dsl_grad_stats_dense_steps`` ask
    for it; otherwise do nothing (no hook anywhere, zero cost)."""
    args = trainer.args
    every = int(getattr(args, "dsl_grad_stats_every", 0) or 0)
    dense = int(getattr(args, "dsl_grad_stats_dense_steps", 0) or 0)
    window = int(getattr(args, "dsl_grad_stats_window", 10) or 0)
    if every <= 0 and dense <= 0:
        if every < 0 or dense < 0:
            raise ValueError(f"--dsl_grad_stats_every={every} --dsl_grad_stats_dense_steps={dense}: expected >= 0")
        return None
    if every < 0 or dense < 0:
        raise ValueError(f"--dsl_grad_stats_every={every} --dsl_grad_stats_dense_steps={dense}: expected >= 0")
    if window < 2:
        raise ValueError(f"--dsl_grad_stats_window={window}: a window needs at least 2 measured steps "
                         f"(tr(Cov) and SNR are moments over the window's step gradients)")
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
