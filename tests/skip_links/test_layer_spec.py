"""Layer-spec resolution: defaults for several tower depths, explicit specs, and every invalid spec."""
import pytest

from llava_dsl.skip_links.layer_spec import LayerSpec, LayerSpecError, parse_layer_list, resolve_layer_spec


@pytest.mark.parametrize(
    "blocks, select, kwargs, main, taps, depth",
    [
        # defaults: stride = depth // 4, detach the taps in the first half of the tower
        (24, -2, {}, 23, (18, 12, 6), 2),          # CLIP-L/14: main 23, taps 6/12/18, detach 6 and 12
        (12, -2, {}, 11, (9, 6, 3), 2),            # ViT-B/12
        (8, -2, {}, 7, (6, 4, 2), 2),
        (27, -2, {}, 26, (24, 18, 12, 6), 2),      # SigLIP-So400m (27 blocks): stride 6
        (32, -1, {}, 32, (24, 16, 8), 2),          # main = last block
        (4, -1, {}, 4, (3, 2, 1), 2),              # stride floor at 1
        # explicit stride / list / depth
        (24, -2, {"skip_stride": 4}, 23, (20, 16, 12, 8, 4), 3),
        (24, -2, {"skip_stride": 3}, 23, (21, 18, 15, 12, 9, 6, 3), 4),
        (24, -2, {"skip_stride": 12}, 23, (12,), 1),
        (24, -2, {"skip_layers": "6,12,18"}, 23, (18, 12, 6), 2),
        (24, -2, {"skip_layers": "18, 6 ,12"}, 23, (18, 12, 6), 2),   # order of the flag does not matter
        (24, -2, {"skip_layers": [-7, 6]}, 23, (18, 6), 1),              # negative taps count from the end
        (24, 20, {"skip_layers": "0,10"}, 20, (10, 0), 2),           # embeddings output can be tapped
        (24, -2, {"skip_layers": "6,12,18", "detach_depth": 1}, 23, (18, 12, 6), 1),
        (24, -2, {"skip_layers": "6,12,18", "detach_depth": 3}, 23, (18, 12, 6), 3),
        (24, -2, {"skip_layers": "6,12,18", "detach_depth": 0}, 23, (18, 12, 6), 0),
        (24, -2, {"detach": False}, 23, (18, 12, 6), 0),             # naive fusion never detaches
    ],
)
def test_resolution_table(blocks, select, kwargs, main, taps, depth):
    spec = resolve_layer_spec(blocks, select, **kwargs)
    assert (spec.main, spec.taps, spec.detach_depth) == (main, taps, depth)
    assert spec.concat_order == (main,) + taps
    assert spec.detached_layers == (taps[len(taps) - depth:] if depth else ())


def test_detached_layers_are_the_shallowest():
    spec = resolve_layer_spec(24, -2, skip_layers="6,12,18", detach_depth=2)
    assert spec.detached_layers == (12, 6)
    assert spec.num_layers == 4 and spec.deepest == 23


@pytest.mark.parametrize(
    "blocks, select, kwargs, fragments",
    [
        (24, -2, {"skip_layers": "6,30"}, ["--mm_vision_skip_layers", "'6,30'", "30", "24 blocks"]),
        (24, -2, {"skip_layers": "-26"}, ["--mm_vision_skip_layers", "-26", "24 blocks"]),
        (24, 30, {}, ["--mm_vision_select_layer=30", "24 blocks"]),
        (24, 0, {}, ["--mm_vision_select_layer=0", "embedding"]),
        (24, -2, {"skip_layers": "6,6,12"}, ["--mm_vision_skip_layers", "duplicate", "24 blocks"]),
        (24, -2, {"skip_layers": "6,-19"}, ["duplicate"]),                       # -19 == 6 on 24 blocks
        (24, -2, {"skip_layers": "6,23"}, ["--mm_vision_skip_layers", "23", "not below the main layer 23"]),
        (24, 12, {"skip_layers": "6,18"}, ["18", "not below the main layer 12", "24 blocks"]),
        (24, -2, {"skip_layers": "6,12", "detach_depth": 3}, ["--mm_vision_detach_depth=3", "0..2", "24-block"]),
        (24, -2, {"detach_depth": -1}, ["--mm_vision_detach_depth=-1", "0..3"]),
        (24, -2, {"skip_layers": "6,12", "skip_stride": 6}, ["--mm_vision_skip_layers", "--mm_vision_skip_stride", "both"]),
        (24, -2, {"skip_stride": 0}, ["--mm_vision_skip_stride=0", "positive"]),
        (24, -2, {"skip_stride": 23}, ["--mm_vision_skip_stride=23", "24-block", "smaller stride"]),
        (24, -2, {"skip_layers": "six,12"}, ["--mm_vision_skip_layers", "'six'", "not an integer"]),
        (24, -2, {"skip_layers": ""}, ["--mm_vision_skip_layers", "comma-separated"]),
        (24, -2, {"detach": False, "detach_depth": 1}, ["--mm_vision_detach_depth=1", "naive"]),
    ],
)
def test_invalid_specs_name_flag_value_and_depth(blocks, select, kwargs, fragments):
    with pytest.raises(LayerSpecError) as caught:
        resolve_layer_spec(blocks, select, **kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_parse_layer_list_accepts_config_forms():
    assert parse_layer_list("[6, 12, 18]") == (6, 12, 18)
    assert parse_layer_list([18, 12, 6]) == (18, 12, 6)
    assert parse_layer_list(None) is None


def test_resolved_spec_is_a_fixed_point():
    """What is persisted (taps + depth) resolves to the same spec when a checkpoint is reloaded."""
    spec = resolve_layer_spec(24, -2, skip_stride=4, detach_depth=2)
    again = resolve_layer_spec(24, -2, skip_layers=list(spec.taps), detach_depth=spec.detach_depth)
    assert again == spec
    assert isinstance(again, LayerSpec)
