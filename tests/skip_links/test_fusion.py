"""Detached Skip-Links in the pure-torch core, on a real (tiny, random) Hugging Face CLIP vision tower."""
from dataclasses import replace

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_dsl.skip_links.clip_taps import clip_hidden_states
from llava_dsl.skip_links.fusion import build_multilayer_mlp, fuse_layers
from llava_dsl.skip_links.layer_spec import resolve_layer_spec

BLOCKS = 8


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=BLOCKS, num_attention_heads=4)
    return CLIPVisionModel(config).double().eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def block_grads(tower, pixels, spec, mlp, constant_layers=()):
    """Gradient of a fixed scalar loss on each ViT block's parameters (flattened per block).

    ``constant_layers``: hidden states replaced by values from a separate no-grad pass, i.e. true constants.
    """
    tower.zero_grad()
    states = clip_hidden_states(tower, pixels, spec.concat_order)
    if constant_layers:
        with torch.no_grad():
            constant = clip_hidden_states(tower, pixels, spec.concat_order)
        states = {i: (constant[i] if i in constant_layers else s) for i, s in states.items()}
    out = mlp(fuse_layers(states, spec))
    (out.pow(2).mean() + out.sum() * 0.01).backward()
    return [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in block.parameters()])
            for block in tower.vision_model.encoder.layers]


def test_partial_forward_matches_full_forward_and_skips_deeper_blocks(tower, pixels):
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
             for n, b in enumerate(tower.vision_model.encoder.layers, start=1)]
    try:
        kept = clip_hidden_states(tower, pixels, [5, 2, 0])
    finally:
        for h in hooks:
            h.remove()
    full = tower(pixels, output_hidden_states=True).hidden_states
    assert sorted(kept) == [0, 2, 5]
    for i in kept:
        assert torch.equal(kept[i], full[i])
    assert calls == [1, 2, 3, 4, 5]  # blocks 6..8 never ran


def test_naive_and_detached_forward_are_identical(tower, pixels):
    naive = resolve_layer_spec(BLOCKS, -2, detach=False)
    detached = resolve_layer_spec(BLOCKS, -2)
    states = clip_hidden_states(tower, pixels, naive.concat_order)
    a, b = fuse_layers(states, naive), fuse_layers(states, detached)
    assert torch.equal(a, b)
    assert a.shape == (2, 17, 32 * 4)
    # channel order: main, then taps deep -> shallow
    assert torch.equal(a[..., :32], states[7]) and torch.equal(a[..., 96:], states[2])


def test_detached_gradient_is_exactly_the_main_path_gradient(tower, pixels):
    detached = resolve_layer_spec(BLOCKS, -2, detach_depth=2)  # taps 6, 4, 2; stop-gradient on 4 and 2
    naive = replace(detached, detach_depth=0)
    torch.manual_seed(2)
    mlp = build_multilayer_mlp(32, naive.num_layers, 16).double()

    g_detached = block_grads(tower, pixels, detached, mlp)
    g_constant_taps = block_grads(tower, pixels, naive, mlp, constant_layers={4, 2})  # the reference
    g_naive = block_grads(tower, pixels, naive, mlp)

    for block in range(BLOCKS):
        torch.testing.assert_close(g_detached[block], g_constant_taps[block], rtol=1e-12, atol=1e-15)
    # shallow blocks 1..4 (they feed tap 4 or tap 2) get another gradient than under naive fusion ...
    for block in range(4):
        assert not torch.allclose(g_detached[block], g_naive[block], rtol=1e-6, atol=1e-9), block
    # ... blocks 5..8, above the deepest detached tap, are untouched by the detach
    for block in range(4, BLOCKS):
        torch.testing.assert_close(g_detached[block], g_naive[block], rtol=1e-12, atol=1e-15)


def test_naive_gradient_is_main_path_plus_skip_path(tower, pixels):
    """Linearity on the first block: naive = main path (taps constant) + skip path (main constant)."""
    naive = resolve_layer_spec(BLOCKS, -2, detach=False)
    torch.manual_seed(3)
    mlp = build_multilayer_mlp(32, naive.num_layers, 16).double()
    g_naive = block_grads(tower, pixels, naive, mlp)
    g_main = block_grads(tower, pixels, naive, mlp, constant_layers=set(naive.taps))
    g_skip = block_grads(tower, pixels, naive, mlp, constant_layers={naive.main})
    torch.testing.assert_close(g_naive[0], g_main[0] + g_skip[0], rtol=1e-9, atol=1e-12)
    assert g_skip[0].norm() > 0.01 * g_main[0].norm()


def test_projector_keys_and_shapes_match_llava_mlp():
    mlp = build_multilayer_mlp(layer_width=1024, num_layers=4, hidden_size=4096)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "0.weight": (4096, 4096), "0.bias": (4096,), "2.weight": (4096, 4096), "2.bias": (4096,)}
    deep = build_multilayer_mlp(layer_width=32, num_layers=3, hidden_size=16, mlp_depth=3)
    assert list(deep.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert deep[0].in_features == 96 and isinstance(deep[1], torch.nn.GELU)
