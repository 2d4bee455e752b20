"""The projector registry: every entry resolves its names, builds, and exports as it says; the builder and the
exporter agree on the projector's input width. LLaVA's own types are built by LLaVA (tests/skip_links/test_patches.py
builds every entry through the plugin and through patched LLaVA)."""
from types import SimpleNamespace

import pytest
import torch

from llava_dsl.export_hf import ExportError, projector_mapping
from llava_dsl.skip_links.layer_spec import LayerSpecError
from llava_dsl.skip_links.projectors import KINDS, projector_type

BLOCKS = 8
TAPS = [6, 4, 2]


@pytest.mark.parametrize("name, canonical, depth", [
    ("mlp_multilayer", "mlp_multilayer", 2), ("detached_mlp_multilayer", "detached_mlp_multilayer", 2),
    ("mlp3x_gelu_multilayer", "mlp_multilayer", 3), ("detached_mlp3x_gelu_multilayer", "detached_mlp_multilayer", 3),
    ("mlp2x_gelu", "mlp2x_gelu", 2), ("mlp3x_gelu", "mlp2x_gelu", 3), ("linear", "linear", 1),
    ("identity", "identity", 0),
])
def test_names_resolve_to_their_entry_and_depth(name, canonical, depth):
    kind = projector_type(name)
    assert (kind.name, kind.depth) == (canonical, depth)
    assert kind.multilayer == canonical.endswith("_multilayer")
    assert kind.detached == canonical.startswith("detached_")


@pytest.mark.parametrize("name", ["multilayer", "detached_mlp2x_gelu", "mlp_multilayer_x", "resampler", "", None])
def test_unregistered_names_resolve_to_none(name):
    assert projector_type(name) is None


def test_a_multilayer_mlp_needs_a_linear_layer():
    with pytest.raises(ValueError, match="mlp0x_gelu_multilayer.*at least one Linear"):
        projector_type("mlp0x_gelu_multilayer")


def _config(name, **extra):
    return {"mm_projector_type": name, "mm_vision_select_layer": -2, "mm_hidden_size": 8, "hidden_size": 16, **extra}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_every_entry_exports_as_it_says_and_builds_what_it_exports(kind):
    config = _config(kind.name, **({"mm_vision_skip_layers": TAPS} if kind.multilayer else {}))
    if kind.hf is None:
        with pytest.raises(ExportError) as refused:
            projector_mapping(config, BLOCKS)
        assert kind.hf_refusal in str(refused.value) and kind.hf_refusal
        return
    mapping = projector_mapping(config, BLOCKS)
    assert mapping.kind == kind.hf
    assert mapping.vision_feature_layer == ([BLOCKS - 1] + TAPS if kind.multilayer else BLOCKS - 1)
    if kind.build is not None:
        projector = kind.build(SimpleNamespace(**config), projector_type(kind.name).depth)
        linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
        assert linears[0].in_features == mapping.num_layers * config["mm_hidden_size"]
        assert len(linears) == 2 and linears[-1].out_features == config["hidden_size"]


@pytest.mark.parametrize("kind", [k for k in KINDS if k.multilayer], ids=lambda k: k.name)
def test_multilayer_entries_need_their_taps(kind):
    with pytest.raises(LayerSpecError, match="no mm_vision_skip_layers"):
        kind.build(SimpleNamespace(**_config(kind.name)), 2)
    with pytest.raises(ExportError, match="no mm_vision_skip_layers"):
        projector_mapping(_config(kind.name), BLOCKS)
    with pytest.raises(ExportError, match="exactly two Linear"):
        projector_mapping(_config(kind.name.replace("mlp_", "mlp3x_gelu_"), mm_vision_skip_layers=TAPS), BLOCKS)


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.multilayer], ids=lambda k: k.name)
def test_single_layer_entries_refuse_taps(kind):
    if kind.hf is not None:
        with pytest.raises(ExportError, match="reads one layer"):
            projector_mapping(_config(kind.name, mm_vision_skip_layers=TAPS), BLOCKS)


def test_an_unknown_type_is_refused_naming_the_known_ones():
    with pytest.raises(ExportError, match="'resampler' is not .*linear, mlp2x_gelu, identity, mlp_multilayer"):
        projector_mapping(_config("resampler"), BLOCKS)
