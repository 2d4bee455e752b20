"""Per-tap gradient interference: each tap's part of the split, and the window statistics per tap, summed and
"if the detached arm's taps were dropped", against the same quantities computed from the stacked step gradients."""
import pytest
import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_dsl.diagnostics.splitter import GradientSplitter, PartsWindow, split_into_main_and_skip, split_into_parts
from llava_dsl.diagnostics.stats import WindowAccumulator, cosine, gradient_snr, trace_covariance
from llava_dsl.skip_links.layer_spec import resolve_layer_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyFusion(nn.Module):
    """CLIP tower -> concat of the spec's hidden states (main first) -> a linear projector: the projector input
    is what the splitter cuts into per-layer slices."""

    def __init__(self, spec, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                                     num_attention_heads=2, image_size=16, patch_size=8))
        self.projector = nn.Linear(16 * len(spec.concat_order), 8)
        self.spec = spec

    def loss(self, pixels, target):
        states = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        fused = torch.cat([states[layer] for layer in self.spec.concat_order], dim=-1)
        return ((self.projector(fused) - target) ** 2).mean()


@pytest.fixture(scope="module")
def measured_steps():
    """Five steps on different batches at fixed weights: per-group .grad and the per-slice parts of each."""
    spec = resolve_layer_spec(4, -2, "1,2", detach=False)  # main 3, taps 2, 1: groups embeddings, block_1, ...
    model = TinyFusion(spec)
    splitter = GradientSplitter(model.clip, clip=model.clip, spec=spec, features_at=model.projector)
    steps = []
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        pixels, target = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 8, generator=g)
        model.zero_grad(set_to_none=True)
        with splitter.observing():
            model.loss(pixels, target).backward()
        grads = {grp.name: torch.cat([p.grad.reshape(-1) for p in grp.params]) for grp in splitter.groups}
        steps.append((grads, splitter.take()))
    return spec, splitter, steps


def test_per_tap_parts_sum_to_the_summed_skip_and_the_full_gradient(measured_steps):
    spec, splitter, steps = measured_steps
    assert [g.name for g in splitter.groups] == ["embeddings", "block_1", "block_2", "block_3"]
    for grads, parts in steps:
        for name, full in grads.items():
            main, taps = split_into_parts(parts, spec, name)
            _, skip, _ = split_into_main_and_skip(parts, spec, name)
            assert list(taps) == [t for t in (2, 1) if t >= splitter.groups[[g.name for g in splitter.groups]
                                                                               .index(name)].last]
            assert torch.equal(sum(taps.values(), torch.zeros_like(main)), skip)
            torch.testing.assert_close(main + skip, full, rtol=1e-5, atol=1e-6 * full.abs().max().item())
            if name in ("embeddings", "block_1"):  # both taps reach them, each with a part of its own
                assert all(part.norm() > 0 for part in taps.values()) and not torch.equal(taps[1], taps[2])


def test_window_per_tap_statistics_match_the_stacked_samples(measured_steps):
    spec, _, steps = measured_steps
    name = "block_1"
    window, summed = PartsWindow([2, 1], spec.taps), WindowAccumulator()
    rows = {"main": [], 1: [], 2: []}
    for _, parts in steps:
        main, taps = split_into_parts(parts, spec, name)
        window.add(main, taps)
        summed.add(main, taps[1] + taps[2])
        rows["main"].append(main)
        rows[1].append(taps[1])
        rows[2].append(taps[2])
    got, before = window.summary(), summed.summary()
    for key, value in before.items():  # the summed statistics keep their names and values
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    main = torch.stack(rows["main"])
    for tap in (1, 2):
        part = torch.stack(rows[tap])
        assert got[f"tap{tap}/trcov_ratio"] == pytest.approx(trace_covariance(part) / trace_covariance(main), rel=1e-6)
        assert got[f"tap{tap}/snr_tap"] == pytest.approx(gradient_snr(part), rel=1e-6)
        assert got[f"tap{tap}/snr_with"] == pytest.approx(gradient_snr(main + part), rel=1e-6)
        assert got[f"tap{tap}/norm_ratio"] == pytest.approx(float(part.norm(dim=1).mean() / main.norm(dim=1).mean()),
                                                            rel=1e-6)
        assert got[f"tap{tap}/cos_of_means"] == pytest.approx(cosine(main.mean(0), part.mean(0)), rel=1e-6)
    skip = torch.stack(rows[1]) + torch.stack(rows[2])
    assert got["snr_skip"] == pytest.approx(gradient_snr(skip), rel=1e-6)
    assert got["norm_ratio"] == pytest.approx(float(skip.norm(dim=1).mean() / main.norm(dim=1).mean()), rel=1e-6)
    # "SNR if dropped" models exactly the detached taps: depth 1 drops tap 1 only and keeps tap 2
    assert got["snr_if_detach_depth_0"] == pytest.approx(got["snr_full"], rel=1e-9)
    assert got["snr_if_detach_depth_1"] == pytest.approx(gradient_snr(main + torch.stack(rows[2])), rel=1e-6)
    assert got["snr_if_detach_depth_2"] == pytest.approx(got["snr_main"], rel=1e-9)
    assert got["snr_if_detach_depth_1"] != pytest.approx(got["snr_main"], rel=1e-4)  # tap 2 really kept


def test_window_of_a_group_only_the_deep_tap_reaches(measured_steps):
    spec, _, steps = measured_steps
    window = PartsWindow([2], spec.taps)
    for _, parts in steps:
        window.add(*split_into_parts(parts, spec, "block_2"))
    got = window.summary()
    assert set(k for k in got if k.startswith("tap")) == {f"tap2/{k}" for k in (
        "trcov_ratio", "norm_ratio", "snr_tap", "snr_with", "cos_mean", "cos_of_means")}
    assert got["tap2/trcov_ratio"] == pytest.approx(got["trcov_ratio"], rel=1e-9)
    # detaching tap 1 does not change what block 2 receives; detaching both leaves the main part
    assert got["snr_if_detach_depth_1"] == pytest.approx(got["snr_full"], rel=1e-9)
    assert got["snr_if_detach_depth_2"] == pytest.approx(got["snr_main"], rel=1e-9)
    with pytest.raises(ValueError, match=r"taps \[1, 2\], this window holds taps \[2\]"):
        window.add(*split_into_parts(steps[0][1], spec, "block_1"))
