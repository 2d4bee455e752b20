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


def test_entry_point_trains_below_the_trivial_predictor(tmp_path, capsys):
    save_tiny_llava(str(tmp_path / "model"))
    (tmp_path / "images").mkdir()
    records = []
    for i in range(24):
        _blocks_image(tmp_path / "images" / f"{i}.png", i)
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "blocks"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "probe"
    report = main(["--model_name_or_path", str(tmp_path / "model"), "--data_path", str(tmp_path / "data.json"),
                   "--image_folder", str(tmp_path / "images"), "--output_dir", str(out), "--num_eval_images", "4",
                   "--max_steps", "300", "--eval_every", "50", "--batch_size", "8", "--learning_rate", "3e-3",
                   "--threshold", "1.0,0.0001"])
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


def test_refusals(tmp_path, capsys):
    with pytest.raises(Exception, match="only LlavaForConditionalGeneration"):
        visual_tokens(tiny_qwen3_vl(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(Exception, match="only LlavaForConditionalGeneration"):
        visual_tokens(tiny_llava(family="llava_next"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", "x", "--data_path", str(tmp_path / "none.json"), "--image_folder",
              str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert "none.json" in capsys.readouterr().err
