"""Which DPVR-LF layer does what: the routing spec, its validation, and the routing layer suggested by an
attention-share report. Plain python."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

ROUTING_MODES = ("dpvr_lf",)

SIDE_ATTENTION = ("vision", "prefix")  # keys of the side branch: vision tokens only, or text prefix + vision


class RoutingError(ValueError):
    """A routing setting that cannot work with the model it is applied to."""


@dataclass(frozen=True)
class RoutingSpec:
    num_layers: int
    route_layer: int
    side_init_layer: int
    side_attention: str = "vision"

    @property
    def routes(self) -> bool:
        """False when R = L-1: no text-only layer, so nothing leaves the stack."""
        return self.route_layer < self.num_layers - 1

    @property
    def joint_layers(self) -> range:
        return range(0, self.route_layer)

    @property
    def text_only_layers(self) -> range:
        return range(self.route_layer, self.num_layers - 1)

    @property
    def fusion_layer(self) -> int:
        return self.num_layers - 1

    def describe(self) -> str:
        if not self.routes:
            return f"route layer {self.route_layer} = L-1: nothing routed ({self.num_layers} joint layers)"
        return (f"{len(self.joint_layers)} joint layers [0, {self.route_layer}), "
                f"{len(self.text_only_layers)} text-only layers [{self.route_layer}, {self.num_layers - 1}), "
                f"fusion layer {self.fusion_layer}; side branch = copy of layer {self.side_init_layer}, "
                f"attending to {'vision tokens only' if self.side_attention == 'vision' else 'text prefix + vision'}")


def resolve_routing(num_layers: int, route_layer: int, side_init_layer: Optional[int] = None,
                    side_attention: str = "vision", source: str = "--dpvr_route_layer") -> RoutingSpec:
    """Validate the routing flags against a decoder of ``num_layers`` layers."""
    if num_layers < 1:
        raise RoutingError(f"the language model has {num_layers} decoder layers; routing needs at least 1")
    if isinstance(route_layer, bool) or not isinstance(route_layer, int):
        raise RoutingError(f"{source}={route_layer!r}: expected an integer layer index")
    if not 0 <= route_layer <= num_layers - 1:
        raise RoutingError(
            f"{source}={route_layer}: expected 0 <= R <= {num_layers - 1} for a {num_layers}-layer language model "
            f"(layers [0, R) joint, [R, {num_layers - 1}) text-only, {num_layers - 1} fused; R = {num_layers - 1} "
            f"routes nothing)")
    if side_init_layer is None:
        side_init_layer = route_layer
    valid_int = isinstance(side_init_layer, int) and not isinstance(side_init_layer, bool)
    if not valid_int or not 0 <= side_init_layer < num_layers:
        raise RoutingError(f"--dpvr_side_init_layer={side_init_layer!r}: expected a layer index in "
                           f"[0, {num_layers - 1}]")
    if side_attention not in SIDE_ATTENTION:
        raise RoutingError(f"--dpvr_side_attention={side_attention!r}: expected one of {', '.join(SIDE_ATTENTION)}")
    return RoutingSpec(num_layers, route_layer, side_init_layer, side_attention)


def suggest_route_layer(shares: Sequence[float], threshold: float) -> int:
    """The first layer R after which the text-to-image attention share stays below ``threshold``.

    Layers R .. L-2 must all be below it (the fusion layer L-1 runs on the full sequence anyway); L-1 (nothing
    routed) when no such layer exists.
    """
    num_layers = len(shares)
    route = num_layers - 1
    for layer in range(num_layers - 2, -1, -1):
        if shares[layer] < threshold:
            route = layer
        else:
            break
    return route
