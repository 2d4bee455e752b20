"""The built-in demo (``make demo``) at ``--scale 1`` (half the default's steps, 40-42.5 % where the default reads
72.5-76 %), on the pretrained parts that ``python -m llava_dsl.assets build`` makes (the session's own cache, shared
with tests/assets): it runs the package's own command lines end to end,
writes every promised output, well-formed, and every arm reads held-out digit strings far better than a model that
ignores the image can. (The reduced asset build reads too little for this; see docs/demo.md.)"""
import collections
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from support import run_module

from llava_dsl.demo.pipeline import BENCHMARKS, MARKER, PROJECTORS, DemoError, Steps, clean, make_plan

SCALE = 1.0

PLAN = make_plan(SCALE)
FIGURES = ("loss_curves", "tower_grad_norms", "grad_stats", "rprobe_mse", "rprobe_reconstructions")


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory, pretrained_assets):
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    root, _ = pretrained_assets
    result = run_module("llava_dsl.demo", ["--scale", SCALE, "--output_dir", out, "--assets_root", root],
                        timeout=3000)
    return out, result.stdout


def _numbers(node, path=""):
    """Every int/float leaf of a JSON tree, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_results_json_has_every_field_for_every_projector(reduced_demo):
    out, _ = reduced_demo
    results = json.load(open(out / "results.json"))
    assert [row["projector"] for row in results["projectors"]] == list(PROJECTORS)
    for row in results["projectors"]:
        for stage in ("stage1", "stage2"):
            assert row[stage]["steps"] == getattr(PLAN, f"{stage}_steps")
            assert {"first_loss", "final_loss", "wall_seconds"} <= set(row[stage])
            assert os.path.isfile(os.path.join(row[stage]["output_dir"], "config.json"))
        assert {"final_mse", "final_psnr", "steps_to_threshold", "history"} <= set(row["rprobe"])
        assert [h["step"] for h in row["rprobe"]["history"]][-1] == PLAN.probe_steps
        for bench in BENCHMARKS:
            ev = row["eval"][bench]
            assert {"score", "unit", "metric", "n", "answered", "wall_seconds"} <= set(ev)
            assert ev["n"] == ev["answered"] == PLAN.eval_questions
        measured = row["stage2"]["grad_stats"]
        assert (measured is None) == (row["projector"] == "mlp2x_gelu")  # no skip path to measure
    assert {"trivial_mse", "trivial_psnr", "threshold", "wall_seconds"} <= set(results["rprobe"])
    assert results["wall_seconds"] > 0 and results["machine"]["cpu_count"] >= 1
    bad = [(path, value) for path, value in _numbers(results) if not math.isfinite(value)]
    assert not bad, f"non-finite numbers in results.json: {bad}"
    # stage 1 never trains the tower, so naive and detached fusion are the same run there
    rows = {row["projector"]: row for row in results["projectors"]}
    assert rows["mlp_multilayer"]["stage1"]["first_loss"] == rows["detached_mlp_multilayer"]["stage1"]["first_loss"]


def _textvqa_chance(out) -> float:
    """The most frequent answer's share: what the best image-blind constant answer scores in TextVQA format."""
    data = json.load(open(out / "assets" / "data" / "eval" / "textvqa" / "TextVQA_0.5.1_val.json"))["data"]
    counts = collections.Counter(entry["answers"][0] for entry in data)
    return 100.0 * counts.most_common(1)[0][1] / len(data)


def test_every_arm_reads_held_out_digit_strings(reduced_demo):
    """Far above what a model that ignores the image can score, computed from the eval files themselves."""
    out, _ = reduced_demo
    results = json.load(open(out / "results.json"))
    chance = _textvqa_chance(out)
    assert chance == pytest.approx(results["chance"]["textvqa"]["score"])
    ocr_chance = results["chance"]["ocrbench"]["points"]
    for row in results["projectors"]:
        textvqa, ocrbench = row["eval"]["textvqa"], row["eval"]["ocrbench"]
        assert textvqa["score"] >= max(15.0, 3 * chance), (row["projector"], textvqa, chance)
        assert ocrbench["score"] >= ocr_chance + 4, (row["projector"], ocrbench, ocr_chance)


def test_markdown_table_has_a_row_per_projector(reduced_demo):
    out, stdout = reduced_demo
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip(" `") for row in rows] == list(PROJECTORS)
    header = table.splitlines()[0]
    assert all(len(row.split("|")) == len(header.split("|")) for row in rows)
    for column in ("R-Probe MSE", "R-Probe PSNR", "steps to threshold", "TextVQA", "OCRBench", "train time"):
        assert column in header
    assert table.strip() in stdout  # the same table is printed


def test_every_figure_decodes(reduced_demo):
    out, _ = reduced_demo
    files = json.load(open(out / "results.json"))["files"]
    for name in FIGURES:
        assert os.path.dirname(files[name]) == str(out / "figures")
        with Image.open(files[name]) as image:
            image.load()
            assert image.format == "PNG" and image.width > 200 and image.height > 100
            low, high = image.convert("L").getextrema()
            assert high - low > 50  # not blank


def test_progress_and_logs(reduced_demo):
    out, stdout = reduced_demo
    assert "held-out recognition" in stdout and "a model that ignores the image scores at most" in stdout
    for header in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert header in stdout
    assert "stage2-detached_mlp_multilayer: 100%" in stdout
    logs = sorted(os.listdir(out / "logs"))
    assert "rprobe.log" in logs and "diagnostics-plot.log" in logs
    assert sum(name.startswith("stage") for name in logs) == 6
    assert sum(name.startswith("eval-") for name in logs) == 6


def test_a_failed_step_names_its_log(tmp_path):
    steps = Steps(str(tmp_path / "logs"))
    with pytest.raises(DemoError) as error:
        steps.run("broken", [sys.executable, "-c", "import sys; print('something broke'); sys.exit(3)"], 1,
                  lambda line: None)
    message = str(error.value)
    assert "exit code 3" in message and str(tmp_path / "logs" / "broken.log") in message
    assert "something broke" in message


def test_a_failed_arm_stops_the_arms_running_beside_it(tmp_path):
    """Arms train side by side (--jobs): when one fails, the demo ends at once with that arm's log named, and
    the other arm's process is killed rather than left running."""
    steps = Steps(str(tmp_path / "logs"))
    marker = tmp_path / "survived"
    slow = [sys.executable, "-c", f"import time; time.sleep(30); open({str(marker)!r}, 'w').write('x')"]
    broken = [sys.executable, "-c", "import time, sys; time.sleep(1); print('arm broke'); sys.exit(5)"]
    started = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(steps.run, "stage2-slow", slow, 1, lambda line: None, position=0)
        failing = pool.submit(steps.run, "stage2-broken", broken, 1, lambda line: None, position=1)
        with pytest.raises(DemoError, match="exit code 5") as error:
            failing.result()
        steps.stop_all()
        with pytest.raises(DemoError, match="stage2-slow"):
            running.result()
    assert "arm broke" in str(error.value) and str(tmp_path / "logs" / "stage2-broken.log") in str(error.value)
    assert time.time() - started < 20 and not marker.exists()


def test_plan_scales_and_rejects_bad_values():
    one, four = make_plan(1.0), make_plan(4.0)
    assert four.stage2_steps == 4 * one.stage2_steps and four.num_finetune == 4 * one.num_finetune
    assert four.grad_stats_every > one.grad_stats_every  # about the same number of measured steps
    with pytest.raises(DemoError, match="expected a positive number"):
        make_plan(0.0)
    with pytest.raises(DemoError, match="--steps=1"):
        make_plan(1.0, steps=1)


def test_a_foreign_output_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not empty and was not written by the demo"):
        clean(str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    clean(str(fresh))
    (fresh / "runs").mkdir()
    clean(str(fresh))  # its own folder: cleared again
    assert not (fresh / "runs").exists() and (fresh / MARKER).is_file()
