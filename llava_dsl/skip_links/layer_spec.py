"""Which vision-tower layers a multi-layer projector reads, and which of them are detached.

Indices follow LLaVA's hidden-state convention for a tower of N blocks: ``hidden_states`` has N + 1
entries, 0 is the embedding output, i is the output of block i, and negative indices count from the end
(``-2`` is block N - 1, LLaVA-1.5's ``--mm_vision_select_layer``).

Plain python: nothing here imports torch or llava.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union


class LayerSpecError(ValueError):
    """A layer flag that does not fit the vision tower (names the flag, the value and the tower depth)."""


@dataclass(frozen=True)
class LayerSpec:
    """A resolved layer choice.

    ``main``: hidden-state index of the main feature (``mm_vision_select_layer``), non-negative.
    ``taps``: the tapped skip layers, deepest first (the order they are concatenated after ``main``).
    ``detach_depth``: how many of the shallowest taps pass through stop-gradient.
    """

    num_blocks: int
    main: int
    taps: Tuple[int, ...]
    detach_depth: int

    @property
    def concat_order(self) -> Tuple[int, ...]:
        """Channel-concat order of the fused feature: main first, then taps from deep to shallow.

        This is also the order of Hugging Face Llava's ``vision_feature_layer`` list for an export.
        """
        return (self.main,) + self.taps

    @property
    def num_layers(self) -> int:
        return 1 + len(self.taps)

    @property
    def detached_layers(self) -> Tuple[int, ...]:
        """The taps that get stop-gradient: the ``detach_depth`` shallowest ones (the tail of concat_order)."""
        return self.taps[len(self.taps) - self.detach_depth:] if self.detach_depth else ()

    @property
    def deepest(self) -> int:
        """The deepest hidden-state index needed; blocks past it never have to run."""
        return self.main


def parse_layer_list(value: Union[str, Sequence[int], None], flag: str = "--mm_vision_skip_layers") -> Optional[Tuple[int, ...]]:
    """Accepts ``"6,12,18"``, ``"[6, 12, 18]"`` or a list of ints (as persisted in a model config)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        if not text:
            raise LayerSpecError(f"{flag}={value!r}: expected a comma-separated list of block indices such as '6,12,18'")
        items: Iterable = text.split(",")
    else:
        items = value
    layers = []
    for item in items:
        try:
            layers.append(int(str(item).strip()))
        except ValueError:
            raise LayerSpecError(
                f"{flag}={value!r}: {str(item).strip()!r} is not an integer; expected a comma-separated "
                f"list of block indices such as '6,12,18'") from None
    return tuple(layers)


def absolute_layer(index: int, num_blocks: int, flag: str, value) -> int:
    """LLaVA indexing -> a non-negative hidden-state index, or a LayerSpecError naming the flag."""
    absolute = index + num_blocks + 1 if index < 0 else index
    if not 0 <= absolute <= num_blocks:
        raise LayerSpecError(
            f"{flag}={value!r}: layer {index} is out of range for a vision tower with {num_blocks} blocks "
            f"(valid hidden-state indices: 0..{num_blocks}, or -{num_blocks + 1}..-1 from the end)")
    return absolute


def resolve_layer_spec(
    num_blocks: int,
    select_layer: int,
    skip_layers: Union[str, Sequence[int], None] = None,
    skip_stride: Optional[int] = None,
    detach_depth: Optional[int] = None,
    detach: bool = True,
) -> LayerSpec:
    """Resolve the flags against a tower of ``num_blocks`` blocks.

    Taps come from an explicit list, or from a stride S (every S-th block below the main layer: S, 2S, ...);
    with neither, S = num_blocks // 4 (CLIP-L/24: taps 6, 12, 18 below main 23). The default detach depth
    covers the taps in the first half of the tower. ``detach=False`` is the naive fusion (no stop-gradient).
    """
    if num_blocks < 1:
        raise LayerSpecError(f"vision tower depth {num_blocks}: expected at least one block")
    main = absolute_layer(select_layer, num_blocks, "--mm_vision_select_layer", select_layer)
    if main == 0:
        raise LayerSpecError(
            f"--mm_vision_select_layer={select_layer}: the main layer is the embedding output (index 0) of a "
            f"{num_blocks}-block tower, so there is no block below it to tap")

    explicit = parse_layer_list(skip_layers)
    if explicit is not None and skip_stride is not None:
        raise LayerSpecError(
            f"--mm_vision_skip_layers={skip_layers!r} and --mm_vision_skip_stride={skip_stride!r} were both given; "
            f"use one of them")

    if explicit is not None:
        flag, value = "--mm_vision_skip_layers", skip_layers
        taps = [absolute_layer(i, num_blocks, flag, value) for i in explicit]
        if len(set(taps)) != len(taps):
            raise LayerSpecError(f"{flag}={value!r}: duplicate layers (resolved against {num_blocks} blocks: {taps})")
        if not taps:
            raise LayerSpecError(f"{flag}={value!r}: expected at least one tapped layer")
    else:
        flag = "--mm_vision_skip_stride"
        stride = skip_stride if skip_stride is not None else max(1, num_blocks // 4)
        value = stride
        if stride < 1:
            raise LayerSpecError(f"{flag}={stride}: expected a positive stride")
        taps = list(range(stride, main, stride))
        if not taps:
            raise LayerSpecError(
                f"{flag}={stride}: no block below the main layer {main} of a {num_blocks}-block tower is a "
                f"multiple of {stride}, so nothing would be tapped; use a smaller stride")

    for tap in taps:
        if tap >= main:
            raise LayerSpecError(
                f"{flag}={value!r}: tapped layer {tap} is not below the main layer {main} "
                f"(--mm_vision_select_layer={select_layer}, tower of {num_blocks} blocks); skip links come from "
                f"shallower blocks")
    taps_deep_first = tuple(sorted(taps, reverse=True))

    if not detach:
        if detach_depth not in (None, 0):
            raise LayerSpecError(
                f"--mm_vision_detach_depth={detach_depth}: only the detached projector types "
                f"(e.g. detached_mlp_multilayer) detach taps; the naive fusion detaches none")
        depth = 0
    elif detach_depth is None:
        depth = sum(1 for tap in taps if tap <= num_blocks // 2)
    else:
        depth = detach_depth
        if not 0 <= depth <= len(taps):
            raise LayerSpecError(
                f"--mm_vision_detach_depth={detach_depth}: expected 0..{len(taps)} (the number of tapped layers "
                f"{sorted(taps)} of the {num_blocks}-block tower)")
    return LayerSpec(num_blocks=num_blocks, main=main, taps=taps_deep_first, detach_depth=depth)
