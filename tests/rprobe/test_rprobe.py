"""R-Probe: the pure core (geometry, metrics, sequences), the probe stage on tiny LLaVA checkpoints trained
through the real CLI (the session fixture ``runs`` in conftest.py), ZeRO-3 under the deepspeed launcher, the compare
report, errors, and the auxiliary-loss trainer.
"""
import json
import math
import os

import pytest
import torch
from support import DEEPSPEED, ROOT, free_port, run_in_process_group, run_module
from PIL import Image
from safetensors.torch import load_file

from llava_dsl.plots import _wrap, plot_curves, reconstruction_grid
from llava_dsl.rprobe.data import batch_indices
from llava_dsl.rprobe.model import (
    ProbeGeometry,
    ProbeMismatchError,
    RProbe,
    attention_bias,
    build_conditional_sequence,
    patchify,
    per_image_mse,
    per_image_psnr,
    probe_depth,
    psnr_from_mse,
    steps_to_threshold,
    unpatchify,
)
from llava_dsl.rprobe.report import to_pil

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------------------------------
# Pure core.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", [["--local_rank=1"], ["--local-rank", "1"]])
def test_the_command_line_takes_the_deepspeed_launchers_rank_flag(launcher):
    """The deepspeed launcher puts --local_rank=N (torchrun: --local-rank) before the sub-command."""
    from llava_dsl.rprobe.cli import build_parser

    args = build_parser().parse_args(launcher + ["eval", "--model-path", "m", "--probe-path", "p", "--output-dir", "o"])
    assert args.command == "eval" and args.local_rank == 1 and args.probe_path == "p"


def test_probe_depth_is_the_first_quarter_rounded_up():
    assert [probe_depth(n) for n in (1, 2, 4, 5, 8, 32, 40)] == [1, 1, 1, 2, 2, 8, 10]
    with pytest.raises(ValueError):
        probe_depth(0)


def test_patchify_layout_and_round_trip():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(pixels, region=2)
    assert patches.shape == (2, 4, 2 * 2 * 3)
    # token 1 = top-right 2x2 region; values ordered (row, col, channel), channel last
    expected = [pixels[0, c, r, 2 + k] for r in range(2) for k in range(2) for c in range(3)]
    assert patches[0, 1].tolist() == [float(v) for v in expected]
    assert torch.equal(unpatchify(patches, region=2, grid=2), pixels)
    geometry = ProbeGeometry(image_size=336, grid=24, has_cls=True)
    assert (geometry.region, geometry.num_tokens, geometry.pixels_per_token) == (14, 577, 14 * 14 * 3)
    with pytest.raises(ProbeMismatchError, match="577"):
        geometry.check_tokens(576, 336, "test")


def test_mse_and_psnr_against_hand_computed_values():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    assert per_image_mse(a, b).tolist() == [0.5, 9.0]  # (1 + 1) / 4 and 9
    assert float(psnr_from_mse(torch.tensor(0.01))) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert float(psnr_from_mse(torch.tensor(0.0))) == pytest.approx(100.0)  # floored at 1e-10
    # [0, 1] pixels 0.5 vs 0.6 everywhere: MSE 0.01 -> 20 dB, whatever the normalisation
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    target = (torch.full((1, 3, 4, 4), 0.5) - mean) / std
    prediction = (torch.full((1, 3, 4, 4), 0.6) - mean) / std
    assert float(per_image_psnr(prediction, target, MEAN, STD)) == pytest.approx(20.0, abs=1e-4)
    # the same pair in normalised units: mean over channels of (0.1 / std_c)^2
    normalised = sum((0.1 / s) ** 2 for s in STD) / 3
    assert float(per_image_mse(prediction, target)) == pytest.approx(normalised, rel=1e-5)


def test_steps_to_threshold_on_a_synthetic_curve():
    steps = list(range(0, 501, 50))
    curve = [1.0 / (1.0 + s / 100.0) for s in steps]  # 0.5 exactly at step 100, below from 150 on
    assert steps_to_threshold(steps, curve, 0.5) == 150  # strictly below
    assert steps_to_threshold(steps, curve, 0.75) == 50  # 1 / 1.5 = 0.667 < 0.75
    assert steps_to_threshold(steps, curve, 0.1) is None
    assert steps_to_threshold(steps, curve, 2.0) == 0


def test_batches_are_seeded_and_ranks_split_each_global_batch():
    a, b = batch_indices(10, 3, seed=7), batch_indices(10, 3, seed=7)
    first = [next(a) for _ in range(8)]
    assert first == [next(b) for _ in range(8)]
    assert sorted(sum(first[:3], []) + first[3][:1]) == list(range(10))  # one epoch, then the next
    r0, r1 = batch_indices(10, 2, seed=7, rank=0, world_size=2), batch_indices(10, 2, seed=7, rank=1, world_size=2)
    single = batch_indices(10, 4, seed=7)
    for _ in range(6):
        assert next(r0) + next(r1) == next(single)


def _tiny_llama_config(layers=4):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2)


def test_conditional_sequence_order_and_target_positions():
    h = 4
    context = torch.full((2, 3, h), 1.0)
    text = [torch.full((2, h), 2.0), torch.zeros(0, h)]
    target = torch.full((2, 5, h), 3.0) + torch.arange(5.0).view(1, 5, 1)
    embeds, key_mask, target_index = build_conditional_sequence(context, text, target)
    assert embeds.shape == (2, 3 + 2 + 5, h)
    assert embeds[0, :, 0].tolist() == [1, 1, 1, 2, 2, 3, 4, 5, 6, 7]  # context ; text ; target
    assert embeds[1, :8, 0].tolist() == [1, 1, 1, 3, 4, 5, 6, 7]  # no text: the target follows the context
    assert key_mask.tolist() == [[True] * 10, [True] * 8 + [False] * 2]
    assert target_index.tolist() == [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]]
    assert torch.equal(torch.gather(embeds, 1, target_index.unsqueeze(-1).expand(-1, -1, h)), target)


def test_probe_reads_only_target_positions_and_attends_causally_by_default():
    torch.manual_seed(0)
    probe = RProbe(_tiny_llama_config(), depth=1, pixels_per_token=6).eval()
    embeds = torch.randn(1, 7, 16)
    index = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        full = probe(embeds)
        assert torch.allclose(probe(embeds, target_index=index), full[:, 4:], atol=1e-6)
        changed = embeds.clone()
        changed[:, 6] += 1.0  # a later token cannot change earlier outputs under the LLM's causal mask
        assert torch.allclose(probe(changed)[:, :6], full[:, :6], atol=1e-6)
        probe.bidirectional = True
        assert not torch.allclose(probe(changed)[:, :6], probe(embeds)[:, :6], atol=1e-4)
    bias = attention_bias(torch.tensor([[True, True, False]]), bidirectional=False, dtype=torch.float32)
    assert (bias[0, 0] == 0).tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_pictures_are_drawn_with_pillow():
    image = torch.zeros(3, 8, 8)
    grid = reconstruction_grid([[to_pil(image, MEAN, STD)] * 2], ["original", "a"], min_cell=32)
    assert grid.size[0] > 2 * 32 and grid.getpixel((grid.size[0] - 2, grid.size[1] - 2)) == (255, 255, 255)
    plot = plot_curves({"a": ([0, 10], [1.0, 0.5])}, {"threshold": 0.7}, "t", "step", "mse")
    assert plot.size == (720, 440) and len(plot.getcolors(1 << 20)) > 3


def test_long_checkpoint_names_are_drawn_whole():
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = lambda text: ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)
    names = ["llava-mlp_multilayer-stage2", "llava-detached_mlp_multilayer-stage2"]  # differ only mid-name
    for name in names:
        lines = _wrap(name, 96, measure)
        assert "".join(lines) == name and len(lines) > 1 and all(measure(line) <= 96 for line in lines)
    # the curve plot's legend: matplotlib's constrained layout narrows the axes to fit whole labels in the figure
    import llava_dsl.plots as plots

    seen = {}
    original = plots.to_image
    plots.to_image = lambda fig: seen.setdefault("fig", fig) and original(fig)
    try:
        assert plot_curves({name: ([0, 10], [1.0, 0.5]) for name in names}, {}, "t", "step", "mse").size == (720, 440)
    finally:
        plots.to_image = original
    figure_box = seen["fig"].get_window_extent()
    for text in seen["fig"].axes[0].get_legend().get_texts():
        assert text.get_text() in names and figure_box.contains(*text.get_window_extent().corners()[-1])


# --------------------------------------------------------------------------------------------------
# The probe stage on tiny LLaVA checkpoints.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    """Rendered-text images the LLaVA checkpoints never saw: 48 to train the probe, 12 held out."""
    from llava_dsl.assets.tiny_models import write_llava_datasets

    out = tmp_path_factory.mktemp("rprobe_data")
    train = write_llava_datasets(str(out / "train"), num_samples=48, seed=1)
    heldout = write_llava_datasets(str(out / "heldout"), num_samples=12, seed=2)
    return {"train": train["pretrain"], "train_images": train["image_folder"],
            "heldout": heldout["pretrain"], "heldout_images": heldout["image_folder"]}


@pytest.fixture(scope="module")
def ft(runs):
    from llava_dsl.rprobe.checkpoint import load_checkpoint

    return load_checkpoint(runs["ft"])


def _sets(ckpt, data, cfg):
    from llava_dsl.rprobe.data import ProbeImageSet

    kwargs = dict(processor=ckpt.processor, model_config=ckpt.model.config, tokenizer=ckpt.tokenizer,
                  conditional=cfg.conditional, cache=True)
    return (ProbeImageSet(data["train"], data["train_images"], **kwargs),
            ProbeImageSet(data["heldout"], data["heldout_images"], **kwargs))


def _llm_layer_weights(checkpoint, layers):
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    out = {f"layers.{i}.{k[len(f'model.layers.{i}.'):]}": v for i in range(layers)
           for k, v in saved.items() if k.startswith(f"model.layers.{i}.")}
    out["norm.weight"] = saved["model.norm.weight"]
    return out


def test_probe_initialisation_copies_the_llm_first_quarter(ft, runs):
    from llava_dsl.rprobe.loop import ProbeConfig
    from llava_dsl.rprobe.runner import build_probe

    llm_layers = len(ft.model.get_model().layers)
    for depth in (None, llm_layers):  # default ceil(L/4), and every layer
        probe = build_probe(ft.model, ft.geometry, ProbeConfig(depth=depth))
        expected_depth = depth or math.ceil(llm_layers / 4)
        assert probe.depth == len(probe.layers) == expected_depth
        reference = _llm_layer_weights(runs["ft"], expected_depth)  # read from the file, not the model
        decoder = {k: v for k, v in probe.state_dict().items() if not k.startswith("head.")}
        assert decoder.keys() == reference.keys()
        for name, value in decoder.items():
            assert torch.equal(value, reference[name].float()), name
        # copies, not shared storage: training the probe cannot move the LLM
        llm_weight = ft.model.get_model().layers[0].mlp.up_proj.weight
        assert probe.layers[0].mlp.up_proj.weight.data_ptr() != llm_weight.data_ptr()
    fresh = build_probe(ft.model, ft.geometry, ProbeConfig(norm_init="ones"))
    assert torch.equal(fresh.norm.weight, torch.ones_like(fresh.norm.weight))


def test_probe_training_freezes_the_mllm_and_beats_the_mean_image(ft, probe_data):
    """Margin, derived from the held-out images themselves: predicting each image's own mean colour (an oracle
    that knows the image) reaches MSE ``oracle``; no image-agnostic predictor does better than about the trivial
    mean-image MSE. The probe must close at least half of that gap, i.e. read per-image content from the tokens."""
    from llava_dsl.rprobe.loop import ProbeConfig, run_probe, trivial_baseline

    cfg = ProbeConfig(steps=60, batch_size=8, learning_rate=1e-3, warmup_steps=5, eval_every=30, seed=0)
    train_set, eval_set = _sets(ft, probe_data, cfg)
    before = {k: v.clone() for k, v in ft.model.state_dict().items()}
    result = run_probe(ft, train_set, eval_set, cfg)
    after = ft.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "an MLLM tensor changed"
    assert all(not p.requires_grad for p in ft.model.parameters())
    init = _llm_layer_weights(ft.path, result["probe_depth"])
    trained = result["state_dict"]
    assert all(not torch.equal(trained[k], init[k].float()) for k in init), "a probe decoder tensor did not train"
    assert result["init_check"]["max_abs_diff"] == 0.0

    trivial = trivial_baseline(train_set, eval_set, cfg, ft.mean, ft.std)
    held_out = torch.stack([eval_set[i]["pixels"] for i in range(len(eval_set))])
    oracle = float(per_image_mse(held_out.mean(dim=(2, 3), keepdim=True).expand_as(held_out), held_out).mean())
    bar = oracle + 0.5 * (trivial["mse"] - oracle)
    assert [row["step"] for row in result["history"]] == [0, 30, 60]
    final = result["final"]["mse"]
    assert final < bar, f"probe {final:.4f} vs bar {bar:.4f} (trivial {trivial['mse']:.4f}, oracle {oracle:.4f})"
    assert result["final"]["psnr"] > trivial["psnr"]


def test_conditional_mode_reconstructs_only_the_target_crop(ft, probe_data, tmp_path):
    from llava.mm_utils import process_images

    from llava_dsl.rprobe.data import ProbeImageSet, collate
    from llava_dsl.rprobe.loop import ProbeConfig, run_probe
    from llava_dsl.rprobe.runner import ProbeRunner

    entries = json.load(open(probe_data["train"]))[:6]
    for k, entry in enumerate(entries):
        entry["rprobe_crop"] = [0, 0, 16 + k, 20]  # original images are 32 x 32
    data = tmp_path / "cond.json"
    data.write_text(json.dumps(entries))
    cfg = ProbeConfig(steps=2, batch_size=3, eval_every=2, conditional=True, learning_rate=1e-3)
    dataset = ProbeImageSet(str(data), probe_data["train_images"], ft.processor, ft.model.config, ft.tokenizer,
                            conditional=True, cache=True)
    item = dataset[1]
    image = Image.open(os.path.join(probe_data["train_images"], entries[1]["image"])).convert("RGB")
    expected = process_images([image.crop((0, 0, 17, 20))], ft.processor, ft.model.config)[0]
    assert torch.equal(item["target"], expected.float())
    answer = entries[1]["conversations"][1]["value"]
    assert item["text_ids"].tolist() == ft.tokenizer(answer, add_special_tokens=False).input_ids

    result = run_probe(ft, dataset, dataset, cfg)
    probe = result["probe"].eval()
    runner = ProbeRunner(ft.model, probe, ft.geometry, conditional=True)
    batch = collate([dataset[i] for i in range(3)])
    with torch.no_grad():
        _, predictions, targets = runner(**batch)
        # by hand: [context ; text ; crop] through the probe, read at the crop's positions only
        tokens = ft.model.encode_images(torch.cat([batch["pixels"], batch["target"]]))
        text = ft.model.get_model().embed_tokens(batch["text_ids"])
        pieces = [text[k, : int(batch["text_lengths"][k])] for k in range(3)]
        embeds, key_mask, index = build_conditional_sequence(tokens[:3], pieces, tokens[3:])
        assert index[0, 0] == ft.geometry.num_tokens + int(batch["text_lengths"][0])
        full = probe(embeds, key_mask)
    manual = torch.gather(full, 1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(predictions, manual, atol=1e-5)
    assert predictions.shape == (3, ft.geometry.num_patch_tokens, ft.geometry.pixels_per_token)
    assert torch.equal(targets, patchify(batch["target"], ft.geometry.region))
    assert not torch.equal(targets, patchify(batch["pixels"], ft.geometry.region))


@pytest.fixture(scope="module")
def compare_run(runs, tiny_assets, probe_data, tmp_path_factory):
    from llava_dsl.rprobe.cli import run

    out = str(tmp_path_factory.mktemp("rprobe_compare"))
    report = run(["compare", "--checkpoints", runs["pre"], runs["ft"], "--model-base", tiny_assets["llm"],
                   "--data-path", probe_data["train"], "--image-folder", probe_data["train_images"],
                   "--eval-data-path", probe_data["heldout"], "--eval-image-folder", probe_data["heldout_images"],
                   "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--learning-rate", "1e-3",
                   "--warmup-steps", "0", "--seed", "3", "--grid-images", "4", "--cache-images",
                   "--output-dir", out])
    return out, report


def test_compare_writes_report_and_pictures(compare_run):
    out, returned = compare_run
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["checkpoints"] == json.loads(json.dumps(returned["checkpoints"]))
    assert [c["name"] for c in report["checkpoints"]] == ["llava-pre", "llava-ft"]
    threshold = report["threshold"]["mse"]
    assert threshold == pytest.approx(0.5 * report["trivial"]["mse"])  # default: half the trivial MSE
    assert report["config"]["steps"] == 6 and report["config"]["seed"] == 3
    for entry in report["checkpoints"]:
        history = entry["history"]
        assert [row["step"] for row in history] == [0, 3, 6]
        assert entry["final"]["mse"] == history[-1]["mse"]
        assert entry["steps_to_threshold"] == next((r["step"] for r in history if r["mse"] < threshold), None)
        assert entry["init_check"]["max_abs_diff"] == 0.0 and entry["init_check"]["tensors_compared"] > 0
        assert os.path.isfile(entry["probe_path"])
    # stage 1 and stage 2 project images differently, so the same probe budget gives different curves
    assert report["checkpoints"][0]["history"][0]["mse"] != report["checkpoints"][1]["history"][0]["mse"]
    grid = Image.open(report["pictures"]["reconstructions"])
    curves = Image.open(report["pictures"]["curves"])
    assert grid.size[0] > 3 * 96 and grid.size[1] > 4 * 96  # 3 columns (original + 2), 4 rows
    assert curves.size == (720, 440)


def test_eval_reloads_probe_weights_and_reproduces_the_final_mse(compare_run, runs, probe_data, tmp_path):
    from llava_dsl.rprobe.cli import run

    out, report = compare_run
    entry = report["checkpoints"][1]
    result = run(["eval", "--model-path", runs["ft"], "--probe-path", entry["probe_path"],
                   "--eval-data-path", probe_data["heldout"], "--image-folder", probe_data["heldout_images"],
                   "--batch-size", "4", "--output-dir", str(tmp_path)])
    assert result["mse"] == pytest.approx(entry["final"]["mse"], rel=1e-5)
    assert os.path.isfile(tmp_path / "eval.json") and os.path.isfile(tmp_path / "reconstructions.png")


def test_probe_weights_for_another_geometry_or_width_are_refused(compare_run, ft, tmp_path):
    from llava_dsl.rprobe.runner import load_probe

    out, report = compare_run
    saved = torch.load(report["checkpoints"][1]["probe_path"])
    load_probe(report["checkpoints"][1]["probe_path"], ft)  # the right checkpoint loads
    other_grid = {**saved, "meta": {**saved["meta"], "geometry": {**saved["meta"]["geometry"], "grid": 8}}}
    torch.save(other_grid, tmp_path / "grid.bin")
    with pytest.raises(ProbeMismatchError, match="geometry"):
        load_probe(str(tmp_path / "grid.bin"), ft)
    other_width = {**saved, "meta": {**saved["meta"], "hidden_size": 128}}
    torch.save(other_width, tmp_path / "width.bin")
    with pytest.raises(ProbeMismatchError, match="hidden size 128"):
        load_probe(str(tmp_path / "width.bin"), ft)
    bad_shapes = {**saved, "state_dict": {**saved["state_dict"], "head.2.weight": torch.zeros(5, 64)}}
    torch.save(bad_shapes, tmp_path / "shape.bin")
    with pytest.raises(ProbeMismatchError, match="head.2.weight"):
        load_probe(str(tmp_path / "shape.bin"), ft)


def test_clear_errors_for_checkpoints_and_images(runs, tiny_assets, ft, probe_data, tmp_path):
    from llava_dsl.rprobe.checkpoint import CheckpointError, load_checkpoint
    from llava_dsl.rprobe.data import ProbeDataError, ProbeImageSet

    with pytest.raises(CheckpointError, match="mm_vision_tower"):
        load_checkpoint(tiny_assets["llm"])  # a plain LLM: no vision modules
    with pytest.raises(CheckpointError, match="--model-base"):
        load_checkpoint(runs["pre"])  # stage 1 wrote only mm_projector.bin
    entries = json.load(open(probe_data["train"]))[:3]
    entries[1]["image"] = "missing.png"
    data = tmp_path / "missing.json"
    data.write_text(json.dumps(entries))
    with pytest.raises(ProbeDataError, match=r"missing\.png.*entry 1 \(id 'tiny-1-00001'\)"):
        ProbeImageSet(str(data), probe_data["train_images"], ft.processor, ft.model.config)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    data.write_text(json.dumps([{"id": "x7", "image": "broken.png", "conversations": []}]))
    dataset = ProbeImageSet(str(data), str(folder), ft.processor, ft.model.config)
    with pytest.raises(ProbeDataError, match=r"broken\.png \(entry 0 \(id 'x7'\).*cannot be read"):
        dataset[0]


# --------------------------------------------------------------------------------------------------
# ZeRO-3 under the deepspeed launcher.
# --------------------------------------------------------------------------------------------------
def test_zero3_two_ranks_copy_gathered_llm_layers_and_train(runs, probe_data, ft, tmp_path):
    out = tmp_path / "zero3"
    flags = ["train", "--deepspeed", os.path.join(ROOT, "scripts", "zero3", "zero3.json"),
             "--model-path", runs["ft"], "--data-path", probe_data["train"], "--image-folder",
             probe_data["train_images"], "--eval-data-path", probe_data["heldout"], "--eval-image-folder",
             probe_data["heldout_images"], "--steps", "2", "--eval-every", "2", "--batch-size", "2",
             "--learning-rate", "1e-3", "--warmup-steps", "0", "--seed", "5", "--cache-images", "--dump-init",
             "--output-dir", str(out)]
    code, output = run_in_process_group([DEEPSPEED, "--num_gpus", "2", "--master_port", free_port(), "--module",
                                         "llava_dsl.rprobe"] + flags, timeout=400)
    assert code == 0, output[-6000:]
    report = json.load(open(out / "report.json"))
    assert report["config"]["world_size"] == 2
    entry = report["checkpoints"][0]
    # rank 0's dump of the gathered initial probe equals the LLM's layers 0..ceil(L/4)-1 in the checkpoint file
    init = torch.load(out / "llava-ft" / "rprobe_init.bin")
    reference = _llm_layer_weights(runs["ft"], entry["probe_depth"])
    assert entry["probe_depth"] == math.ceil(len(ft.model.get_model().layers) / 4)
    for name, value in reference.items():
        assert init[name].shape == value.shape and torch.equal(init[name], value.float()), name
    assert entry["init_check"]["tensors_compared"] == len(reference)
    # the probe trained under ZeRO-3 and was saved whole
    zero3 = torch.load(out / "rprobe.bin")["state_dict"]
    assert init.keys() <= zero3.keys()
    assert all(zero3[k].shape == init[k].shape for k in init)
    assert any(not torch.equal(zero3[k], init[k]) for k in init)
    # and it equals one process without DeepSpeed taking the same global batches (2 ranks x 2 = 4 per step)
    single_out = tmp_path / "single"
    single = [f if f != str(out) else str(single_out) for f in flags if f != "--dump-init"]
    single = [a for i, a in enumerate(single) if a != "--deepspeed" and (i == 0 or single[i - 1] != "--deepspeed")]
    single[single.index("--batch-size") + 1] = "4"
    run_module("llava_dsl.rprobe", single)
    one = torch.load(single_out / "rprobe.bin")["state_dict"]
    assert one.keys() == zero3.keys()
    worst = max((float((one[k] - zero3[k]).abs().max()), k) for k in one)
    assert worst[0] <= 1e-5, worst  # fp32 sums in another order (gloo all-reduce vs one batch of 4)
    rows = lambda path: [(r["step"], r["mse"]) for r in json.load(open(path))["checkpoints"][0]["history"]]
    for (step_a, mse_a), (step_b, mse_b) in zip(rows(out / "report.json"), rows(single_out / "report.json")):
        assert step_a == step_b and mse_a == pytest.approx(mse_b, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Auxiliary loss during LLaVA training.
# --------------------------------------------------------------------------------------------------
def _trainer(runs, tiny_assets, tmp_path, weight, trainer_cls=None):
    from llava.train import train as llava_train

    from llava_dsl.plugin import DSLTrainer, TrainingArguments
    from llava_dsl.rprobe.checkpoint import load_checkpoint

    ckpt = load_checkpoint(runs["ft"], freeze=False)
    tokenizer = ckpt.tokenizer
    tokenizer.model_max_length, tokenizer.pad_token = 128, tokenizer.unk_token
    data_args = llava_train.DataArguments(data_path=tiny_assets["finetune"], lazy_preprocess=True, is_multimodal=True,
                                          image_folder=tiny_assets["image_folder"], image_aspect_ratio="pad")
    data_args.image_processor, data_args.mm_use_im_start_end = ckpt.processor, False
    data = llava_train.make_supervised_data_module(tokenizer=tokenizer, data_args=data_args)
    args = TrainingArguments(output_dir=str(tmp_path / f"aux-{weight}"), max_steps=3,
                             per_device_train_batch_size=2, learning_rate=1e-3, report_to="none",
                             save_strategy="no", logging_steps=1, seed=0, remove_unused_columns=False,
                             dataloader_num_workers=0, rprobe_aux_weight=weight)
    return ckpt.model, (trainer_cls or DSLTrainer)(model=ckpt.model, tokenizer=tokenizer, args=args, **data)


def _lm_loss_only():
    """The plugin's trainer with the auxiliary-loss mixin's compute_loss skipped: the plain LM loss."""
    from llava_dsl.plugin import DSLTrainer
    from llava_dsl.rprobe.aux_loss import RProbeAuxMixin

    class WithoutAuxLoss(DSLTrainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            return super(RProbeAuxMixin, self).compute_loss(model, inputs, return_outputs)

    return WithoutAuxLoss


@pytest.fixture
def v1_template(monkeypatch):
    from llava import conversation

    monkeypatch.setattr(conversation, "default_conversation", conversation.conv_templates["v1"])


def test_aux_weight_zero_leaves_training_bit_for_bit_unchanged(runs, tiny_assets, tmp_path, v1_template):
    plain_model, plain = _trainer(runs, tiny_assets, tmp_path, 0.0, _lm_loss_only())
    plain.train()
    aux_model, aux = _trainer(runs, tiny_assets, tmp_path, 0.0)
    aux.train()
    assert not hasattr(aux_model, "rprobe_head")
    a, b = plain_model.state_dict(), aux_model.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed
    loaded = load_file(os.path.join(runs["ft"], "model.safetensors"))
    # and the run did train: the projector moved away from the checkpoint
    assert not torch.equal(a["model.mm_projector.0.weight"], loaded["model.mm_projector.0.weight"].float())


def test_aux_weight_sends_probe_gradient_into_the_projector(runs, tiny_assets, tmp_path, v1_template):
    weight = 0.5
    model, trainer = _trainer(runs, tiny_assets, tmp_path, weight)
    assert isinstance(model.rprobe_head, RProbe)
    assert not any("mm_projector" in name for name, _ in model.rprobe_head.named_parameters(prefix="rprobe_head"))
    batch = next(iter(trainer.get_train_dataloader()))
    projector = list(model.get_model().mm_projector.parameters())

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in projector]

    total = trainer.compute_loss(model, batch)
    with_probe = grads(total)
    probe_grads = [p.grad for p in model.rprobe_head.parameters()]
    lm_loss = _lm_loss_only().compute_loss(trainer, model, batch)
    lm_only = grads(lm_loss)
    assert all(g is not None and g.abs().sum() > 0 for g in probe_grads)
    assert max(float((a - b).abs().max()) for a, b in zip(with_probe, lm_only)) > 0
    probe_loss = (total - lm_loss) / weight
    assert float(probe_loss) > 0
    trainer.train()  # runs end to end and logs the probe loss
    assert any("rprobe_loss" in row for row in trainer.state.log_history)
