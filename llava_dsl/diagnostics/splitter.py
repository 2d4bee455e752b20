"""The gradient split: per block group of the tower, the part that arrives through the main feature and the
part through the skip taps (counterfactual for detached taps), measured during a normal training step; and
``PartsWindow``, the window statistics of those parts per tap as well as summed."""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from transformers import CLIPVisionModel

from llava_dsl.compat.deepspeed import full_numel, is_partitioned
from llava_dsl.diagnostics.stats import _dot, _sq_norm, cosine


@dataclass
class BlockGroup:
    """Blocks ``first..last`` (1-based; 0..0 = embeddings + pre-LayerNorm), fed by the slices at or above ``last``."""

    name: str
    first: int
    last: int
    params: List[nn.Parameter] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(full_numel(p) for p in self.params)


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


def vision_transformer(clip: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``pre_layrnorm`` and ``encoder.layers``: ``CLIPVisionModel.vision_model``
    (transformers 4.x), or the model itself where there is no such wrapper (``CLIPVisionModel`` in 5.x)."""
    vision = getattr(clip, "vision_model", clip)
    if not all(hasattr(vision, name) for name in ("embeddings", "pre_layrnorm", "encoder")):
        raise TypeError(f"grad stats: {type(clip).__name__} is not a CLIP vision tower (expected embeddings, "
                        f"pre_layrnorm and encoder.layers, directly or under .vision_model)")
    return vision


def block_groups(clip: CLIPVisionModel, concat_order: Sequence[int]) -> List[BlockGroup]:
    vision = vision_transformer(clip)
    trainable = lambda modules: [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = []
    for name, first, last in group_bounds(concat_order):
        modules = [vision.embeddings, vision.pre_layrnorm] if last == 0 else list(vision.encoder.layers[first - 1:last])
        groups.append(BlockGroup(name, first, last, trainable(modules)))
    return groups


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

    Other layouts (stock transformers' Llava, ``llava_dsl.hf.diagnostics``) pass ``clip`` (the CLIP vision model),
    ``spec`` (``concat_order``, ``main``, ``taps``, ``detached_layers``) and ``features_at``: the module whose first
    input is the projector input (``multi_modal_projector``); ``tower`` is then the module whose forward starts a
    measured pass (the CLIP model itself).

        splitter = GradientSplitter(tower)
        with splitter.observing():
            model(**batch).loss.backward()      # as many micro-batches as the step has
        parts = splitter.take()                 # {layer: {group name: flat fp32 gradient}}, summed

    ``parts[spec.main]`` is the main part, ``parts[tap]`` what the tap's slice sends (applied or not).
    Hooks exist only while observing; the normal backward and ``.grad`` are unchanged.
    """

    def __init__(self, tower: nn.Module, grad_scale: Optional[Callable[[], float]] = None, *,
                 clip: Optional[nn.Module] = None, spec=None, features_at: Optional[nn.Module] = None):
        self.tower = tower
        self.spec = tower.layer_spec if spec is None else spec
        self.clip: CLIPVisionModel = tower.vision_tower if clip is None else clip
        self.features_at = features_at
        self.groups = block_groups(self.clip, self.spec.concat_order)
        self.width = self.clip.config.hidden_size
        self.grad_scale = grad_scale or (lambda: 1.0)
        self.zero3 = is_partitioned(self.clip.parameters())
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
        vision = vision_transformer(self.clip)
        wanted = set(self.spec.concat_order)
        self._handles.append(self.tower.register_forward_pre_hook(self._on_tower_start))
        if self.features_at is None:
            self._handles.append(self.tower.register_forward_hook(self._on_tower_output))
        else:  # a forward hook sees the input as consumed (after any pre-hook, e.g. the Detached Skip-Links one)
            self._handles.append(self.features_at.register_forward_hook(
                lambda module, args, output: self._on_tower_output(module, args, args[0])))
        self._handles.append(vision.pre_layrnorm.register_forward_hook(self._on_state(0, start=True)))
        for layer in sorted(wanted - {0}):
            self._handles.append(vision.encoder.layers[layer - 1].register_forward_hook(self._on_state(layer)))
        # Reentrant checkpointing cannot serve torch.autograd.grad (and would write into .grad); for the
        # measured step the same blocks are checkpointed non-reentrantly: same values, same recompute. The
        # function sits on the encoder (transformers 4.37) or on each block (GradientCheckpointingLayer, >= 4.52).
        self._saved_checkpoint_func = []
        for module in [vision.encoder] + list(vision.encoder.layers):
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                self._saved_checkpoint_func.append((module, module._gradient_checkpointing_func))
                module._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                        use_reentrant=False)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._armed = False
        for module, func in self._saved_checkpoint_func or []:
            module._gradient_checkpointing_func = func
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
                          else torch.zeros(full_numel(p), device=grad.device) for p, g in zip(params, grads)]
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


def split_into_parts(parts: Dict[int, Dict[str, torch.Tensor]], spec, group: str):
    """(g_main, {tap: its part}) of one group, taps deep to shallow; only the taps that reach the group."""
    return parts[spec.main][group], {t: parts[t][group] for t in spec.taps if group in parts[t]}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf") if a > 0 else 0.0


class PartsWindow:
    """Streaming window statistics of one group's parts (g_main and each tap's part), without keeping the steps.

    Holds one running vector sum per part and the running Gram matrix E<p_i, p_j> (scalars), so the moments of
    any sum of parts follow exactly: the summed skip (every tap), each tap alone, and the update a detached
    arm would apply (main + the taps it keeps). ``summary()`` returns ``WindowAccumulator``'s keys for the summed
    skip (the same values), plus:

    - ``snr_skip``, ``norm_ratio``: the summed skip part's own SNR, mean ||g_skip|| / mean ||g_main||;
    - ``tap{t}/<key>`` per tap t reaching the group: ``trcov_ratio`` (tr Cov of its part / tr Cov main),
      ``norm_ratio``, ``snr_tap`` (its own SNR), ``snr_with`` (SNR of main + that part), ``cos_mean``,
      ``cos_of_means``;
    - ``snr_if_detach_depth_{D}`` for D = 0..len(taps): the SNR of main + the taps that stay attached when the
      D shallowest taps of the spec are detached (D = 0: ``snr_full``). Compare ``snr_full`` with the depth the
      detached arm uses: that models exactly the taps it detaches, in a naive run as well.
    """

    def __init__(self, taps: Sequence[int] = (), all_taps: Sequence[int] = ()):
        self.taps = [int(t) for t in taps]              # the taps reaching this group, in concat order
        self.all_taps = [int(t) for t in all_taps] or list(self.taps)  # the spec's taps, deep to shallow
        self.n = 0
        self.sums: List[torch.Tensor] = []               # part k: 0 = main, 1.. = self.taps
        k = 1 + len(self.taps)
        self.gram = [[0.0] * k for _ in range(k)]        # sum over steps of <p_i, p_j>
        self.norm_sums = [0.0] * k
        self.cos_skip_sum = 0.0                          # sum over steps of cos(main, summed skip)
        self.norm_skip_sum = 0.0                         # sum over steps of ||summed skip||
        self.cos_tap_sums = [0.0] * len(self.taps)

    def add(self, main: torch.Tensor, taps: Dict[int, torch.Tensor]) -> None:
        if sorted(taps) != sorted(self.taps):
            raise ValueError(f"grad stats: parts for taps {sorted(taps)}, this window holds taps {sorted(self.taps)}")
        vectors = [main.float()] + [taps[t].float() for t in self.taps]
        if not self.sums:
            self.sums = [v.clone() for v in vectors]
        else:
            for total, v in zip(self.sums, vectors):
                total += v
        for i, a in enumerate(vectors):
            self.gram[i][i] += _sq_norm(a)
            self.norm_sums[i] += math.sqrt(_sq_norm(a))
            for j in range(i + 1, len(vectors)):
                value = _dot(a, vectors[j])
                self.gram[i][j] += value
                self.gram[j][i] += value
        skip = sum(vectors[1:], torch.zeros_like(vectors[0]))
        self.norm_skip_sum += math.sqrt(_sq_norm(skip))
        self.cos_skip_sum += cosine(vectors[0], skip)
        for k in range(len(self.taps)):
            self.cos_tap_sums[k] += cosine(vectors[0], vectors[k + 1])
        self.n += 1

    # the moments of the sum of the parts in ``members`` (indices into [main] + taps)
    def _mean_sum(self, members: Sequence[int]) -> torch.Tensor:
        return sum((self.sums[k] for k in members), torch.zeros_like(self.sums[0])) / self.n

    def _second(self, members: Sequence[int]) -> float:
        return sum(self.gram[i][j] for i in members for j in members) / self.n

    def _moments(self, members: Sequence[int]):
        """(||E g||^2, E||g||^2, tr Cov, SNR) of g = the sum of ``members``."""
        mean_sq, second = _sq_norm(self._mean_sum(members)), self._second(members)
        return mean_sq, second, max(second - mean_sq, 0.0), mean_sq / second if second > 0 else 0.0

    def summary(self) -> Dict[str, float]:
        if self.n == 0:
            raise ValueError("grad stats: a window with no measured step has no statistics")
        n, main, skip = self.n, [0], list(range(1, 1 + len(self.taps)))
        _, _, trcov_main, snr_main = self._moments(main)
        _, _, trcov_skip, snr_skip = self._moments(skip)
        _, _, trcov_full, snr_full = self._moments(main + skip)
        norm_main = self.norm_sums[0] / n
        out = {
            "trcov_main": trcov_main, "trcov_skip": trcov_skip, "trcov_full": trcov_full,
            "trcov_ratio": _ratio(trcov_skip, trcov_main),
            "cos_mean": self.cos_skip_sum / n,
            "cos_of_means": cosine(self._mean_sum(main), self._mean_sum(skip)),
            "snr_main": snr_main, "snr_full": snr_full, "snr_skip": snr_skip,
            "norm_main": norm_main,
            "norm_skip": self.norm_skip_sum / n,
        }
        out["norm_ratio"] = _ratio(out["norm_skip"], norm_main)
        for k, tap in enumerate(self.taps, start=1):
            _, _, trcov_tap, snr_tap = self._moments([k])
            out.update({
                f"tap{tap}/trcov_ratio": _ratio(trcov_tap, trcov_main),
                f"tap{tap}/norm_ratio": _ratio(self.norm_sums[k] / n, norm_main),
                f"tap{tap}/snr_tap": snr_tap,
                f"tap{tap}/snr_with": self._moments([0, k])[3],
                f"tap{tap}/cos_mean": self.cos_tap_sums[k - 1] / n,
                f"tap{tap}/cos_of_means": cosine(self._mean_sum([0]), self._mean_sum([k])),
            })
        for depth in range(len(self.all_taps) + 1):
            detached = set(self.all_taps[len(self.all_taps) - depth:]) if depth else set()
            kept = [0] + [k for k, tap in enumerate(self.taps, start=1) if tap not in detached]
            out[f"snr_if_detach_depth_{depth}"] = self._moments(kept)[3]
        return out
