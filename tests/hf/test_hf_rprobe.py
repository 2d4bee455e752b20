"""R-Probe on a stock Llava (python -m llava_dsl.hf.rprobe): the probe's decoder layers start as the language
model's first quarter and read the tokens as the LM does; trained on a tiny model's visual tokens, its held-out MSE
falls well below the trivial predictor's."""
import json

import pytest
import torch
from PIL import Image

from llava_dsl.hf.rprobe import HFRProbe, copy_differences, main, visual_tokens
from llava_dsl.hf.tiny import save_tiny_llava, tiny_llava, tiny_qwen3_vl
from llava_dsl.rprobe.model import probe_depth


def test_probe_layers_start_equal_to_the_lm_and_read_tokens_as_it_does():
    model = tiny_llava().eval()
    lm = model.model.language_model
    depth = probe_depth(len(lm.layers))
    assert depth == 1  # ceil(2 / 4)
    probe = HFRProbe(lm, depth, pixels_per_token=8 * 8 * 3).eval()
    diffs = copy_differences(probe, lm)
    assert diffs and all(v == 0 for v in diffs.values()), diffs
    names = {n for n, _ in probe.named_parameters() if n.startswith(("layers.", "norm."))}
    assert names == {f"layers.0.{n}" for n, _ in lm.layers[0].named_parameters()} | {"norm.weight"}
    # the copy is a copy: training it leaves the LM alone
    assert all(p.data_ptr() != q.data_ptr() for p in probe.layers[0].parameters() for q in lm.layers[0].parameters())
    # causal mask, positions 0..n-1 and the LM's rotary embedding: layer 0 of the probe gives the LM's hidden state 1
    pixel = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = visual_tokens(model, pixel)
    assert tokens.shape == (2, 16, lm.config.hidden_size)
    with torch.no_grad():
        expected = lm(inputs_embeds=tokens, output_hidden_states=True).hidden_states[1]
        h = tokens
        b, t, _ = h.shape
        from llava_dsl.rprobe.model import attention_bias
        positions = torch.arange(t).unsqueeze(0).expand(b, t)
        out = probe.layers[0](h, attention_mask=attention_bias(torch.ones(b, t, dtype=torch.bool), False, h.dtype),
                              position_ids=positions, position_embeddings=probe.rotary(h, positions))
        out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _blocks_image(path, seed):
    """32 x 32 px, one random colour per 8 x 8 region (the tiny tower's token grid)."""
    g = torch.Generator().manual_seed(seed)
    colours = (torch.rand(4, 4, 3, generator=g) * 255).to(torch.uint8)
    pixels = colours.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    """A tiny Llava and 24 block images (20 to train on, 4 held out); the flags every run shares."""
    tmp_path = tmp_path_factory.mktemp("hf_rprobe")
    save_tiny_llava(str(tmp_path / "model"))
    (tmp_path / "images").mkdir()
    records = []
    for i in range(24):
        _blocks_image(tmp_path / "images" / f"{i}.png", i)
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "blocks"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return ["--model_name_or_path", str(tmp_path / "model"), "--data_path", str(tmp_path / "data.json"),
            "--image_folder", str(tmp_path / "images"), "--num_eval_images", "4"]


def test_entry_point_trains_below_the_trivial_predictor(probe_data, tmp_path, capsys):
    out = tmp_path / "probe"
    report = main(probe_data + ["--output_dir", str(out), "--max_steps", "300", "--eval_every", "50",
                                "--batch_size", "8", "--learning_rate", "3e-3", "--threshold", "1.0,0.0001"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["final"] == report["final"] and (out / "probe.pt").is_file()
    assert saved["depth"] == 1 and saved["num_llm_layers"] == 2 and saved["init_check"]["max_abs_diff"] == 0
    assert saved["geometry"] == {"image_size": 32, "grid": 4, "has_cls": False, "channels": 3}
    assert saved["train_images"] == 20 and saved["eval_images"] == 4
    trivial, first, final = saved["trivial"]["mse"], saved["evals"][0]["mse"], saved["final"]["mse"]
    assert final < 0.25 * trivial, (final, trivial)  # the tokens carry the regions' colours, and the probe reads them
    assert final < first and saved["final"]["psnr"] > saved["trivial"]["psnr"] + 3
    assert [e["step"] for e in saved["evals"]] == [0, 50, 100, 150, 200, 250, 300]
    crossed = saved["steps_to_threshold"]["1.0"]
    assert crossed is not None and crossed == min(e["step"] for e in saved["evals"] if e["mse"] < 1.0)
    assert saved["steps_to_threshold"]["0.0001"] is None
    assert "held-out MSE" in capsys.readouterr().out
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"  # --device auto on a machine without CUDA


def test_batch_sizes_do_not_change_the_results(probe_data, tmp_path):
    """Images encoded and the held-out set evaluated one at a time, or all in one batch, or 3 at a time (a last
    batch of 1): the same tokens, the same training, the same per-image metrics."""
    flags = probe_data + ["--max_steps", "20", "--eval_every", "10", "--batch_size", "4", "--learning_rate", "3e-3"]
    reports = [main(flags + ["--output_dir", str(tmp_path / str(size)), "--eval_batch_size", str(size)])
               for size in (1, 24, 3)]
    evals = [[(e["step"], e["mse"], e["psnr"]) for e in r["evals"]] for r in reports]
    assert [step for step, _, _ in evals[0]] == [0, 10, 20]
    for other in evals[1:]:
        for (step, mse, psnr), (step2, mse2, psnr2) in zip(evals[0], other, strict=True):
            assert step == step2 and mse2 == pytest.approx(mse, rel=1e-5) and psnr2 == pytest.approx(psnr, rel=1e-5)
    assert reports[0]["trivial"]["mse"] == pytest.approx(reports[1]["trivial"]["mse"], rel=1e-6)
    assert evals[0][-1][1] < evals[0][0][1]  # it trained


def test_a_bfloat16_run_keeps_an_exact_float32_copy_of_the_lm(probe_data, tmp_path):
    report = main(probe_data + ["--output_dir", str(tmp_path / "bf16"), "--max_steps", "5", "--eval_every", "5",
                                "--dtype", "bfloat16", "--device", "cpu"])
    assert report["dtype"] == "bfloat16" and report["init_check"]["max_abs_diff"] == 0
    state = torch.load(tmp_path / "bf16" / "probe.pt")
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    assert all(e["mse"] == e["mse"] for e in report["evals"])  # finite, not NaN


def test_refusals(tmp_path, capsys):
    with pytest.raises(Exception, match="only LlavaForConditionalGeneration"):
        visual_tokens(tiny_qwen3_vl(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(Exception, match="only LlavaForConditionalGeneration"):
        visual_tokens(tiny_llava(family="llava_next"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", "x", "--data_path", str(tmp_path / "none.json"), "--image_folder",
              str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert "none.json" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--model_name_or_path", "x", "--data_path", "d", "--image_folder", "i", "--output_dir", "o",
                  "--device", "cuda"])
        assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err
