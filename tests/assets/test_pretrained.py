"""The locally pretrained tiny parts (llava_dsl.assets.pretrained): cache key, rebuild on a settings change,
no complete-looking folder from a killed or failed build, LLaVA's loaders read the folders unchanged, and the
reduced build's tower reads held-out digit strings."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
from support import ROOT, run_module, subprocess_env

from llava_dsl.assets import pretrained
from llava_dsl.assets.pretrained import (
    MANIFEST,
    AssetError,
    LMSettings,
    cache_key,
    ensure,
    folder_name,
    remove_stale_partials,
    tower_settings,
)

# Settings that build in seconds: the cache mechanics do not need a tower that reads.
TINY_TOWER = tower_settings("slots", steps=2, batch_size=4, eval_images=8, blocks=2, width=16, mlp_width=32,
                            dense_layers=(1,))
TINY_LM = LMSettings(steps=2, batch_size=2, seq_len=16, width=16, layers=1, mlp_width=32, heldout_lines=20)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_parts"))
    return root, ensure(TINY_TOWER, root, log=lambda m: None), ensure(TINY_LM, root, log=lambda m: None)


def test_cache_key_is_a_pure_function_of_the_settings():
    assert cache_key(TINY_TOWER) == cache_key(replace(TINY_TOWER))
    code = ("from llava_dsl.assets.pretrained import cache_key, tower_settings; "
            "print(cache_key(tower_settings('slots')))")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env=subprocess_env({"PYTHONHASHSEED": "123"}), cwd=ROOT).stdout.strip()
    assert other_process == cache_key(tower_settings("slots"))
    assert cache_key(tower_settings("slots")) != cache_key(tower_settings("dense"))
    assert cache_key(TINY_TOWER) != cache_key(replace(TINY_TOWER, lr=TINY_TOWER.lr * 2))
    assert folder_name(tower_settings("dense")).startswith("tower-dense-")
    assert folder_name(LMSettings()).startswith("lm-")
    with pytest.raises(AssetError, match="expected one of"):
        tower_settings("words")


def test_cached_folder_is_reused_and_a_settings_change_builds_a_new_one(tiny_parts):
    root, tower, lm = tiny_parts
    manifest = json.load(open(os.path.join(tower, MANIFEST)))
    assert manifest["key"] == cache_key(TINY_TOWER) and manifest["settings"]["steps"] == 2
    assert {"char_accuracy", "string_accuracy", "heldout", "build_seconds"} <= set(manifest)
    assert "heldout_perplexity" in json.load(open(os.path.join(lm, MANIFEST)))
    stamp = os.path.getmtime(os.path.join(tower, MANIFEST))
    assert ensure(TINY_TOWER, root, log=lambda m: None) == tower
    assert os.path.getmtime(os.path.join(tower, MANIFEST)) == stamp  # not rebuilt
    changed = ensure(replace(TINY_TOWER, seed=1), root, log=lambda m: None)
    assert changed != tower and os.path.isfile(os.path.join(changed, MANIFEST))
    assert os.path.isfile(os.path.join(tower, MANIFEST))  # the old one is left alone


def test_a_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    def broken(settings, out_dir, log):
        open(os.path.join(out_dir, "config.json"), "w").write("{}")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(pretrained, "train_tower", broken)
    with pytest.raises(RuntimeError, match="killed half-way"):
        ensure(TINY_TOWER, str(tmp_path), log=lambda m: None)
    assert [name for name in os.listdir(tmp_path) if not name.endswith(".lock")] == []


def test_a_killed_build_leaves_only_a_staging_folder_that_the_next_build_removes(tmp_path):
    slow = replace(TINY_TOWER, steps=100_000)
    code = ("from llava_dsl.assets.pretrained import TowerSettings, ensure; "
            f"ensure(TowerSettings(**{asdict(slow)!r}), {str(tmp_path)!r})")
    process = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging = f".partial-{folder_name(slow)}-{process.pid}"
    deadline = time.time() + 120
    while not os.path.isdir(tmp_path / staging) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.isdir(tmp_path / staging)
    assert not os.path.exists(tmp_path / folder_name(slow))  # nothing that looks complete
    assert pretrained.cached(slow, str(tmp_path)) is None
    assert remove_stale_partials(str(tmp_path), folder_name(slow)) == [staging]
    assert not os.path.exists(tmp_path / staging)


def test_a_final_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / folder_name(TINY_TOWER)).mkdir()
    (tmp_path / folder_name(TINY_TOWER) / "config.json").write_text("{}")
    with pytest.raises(AssetError, match="has no valid BUILD.json"):
        ensure(TINY_TOWER, str(tmp_path), log=lambda m: None)


def test_llava_loads_the_folders_unchanged(tiny_parts):
    import torch
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from PIL import Image
    from transformers import AutoTokenizer

    _, tower_dir, lm_dir = tiny_parts

    class Args:
        mm_vision_select_layer = -2
        mm_vision_select_feature = "patch"

    tower = CLIPVisionTower(tower_dir, Args())
    pixels = tower.image_processor(Image.new("RGB", (TINY_TOWER.image_size,) * 2, "white"),
                                   return_tensors="pt")["pixel_values"]
    features = tower(pixels)
    grid = TINY_TOWER.image_size // TINY_TOWER.patch_size
    assert tuple(features.shape) == (1, grid * grid, TINY_TOWER.width)
    model = LlavaLlamaForCausalLM.from_pretrained(lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, use_fast=False)
    ids = tokenizer("USER: What number is shown? ASSISTANT: 42", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_the_build_reads_held_out_digit_strings(pretrained_assets):
    """The demo's parts as ``python -m llava_dsl.assets build`` makes them (the session's own cache): the tower reads
    strings and font sizes it never saw far above chance, and the LM beats its untrained self by far."""
    root, printed = pretrained_assets
    assert "held-out recognition" in printed["pretrained"]
    paths = json.loads(run_module("llava_dsl.assets", ["path", "--root", root]).stdout)
    tower = json.load(open(paths["tower_report"]))
    lm = json.load(open(paths["lm_report"]))
    assert tower["settings"] == json.loads(json.dumps(asdict(tower_settings("slots"))))  # the full build
    # chance is 10% per character and 0.1% or less per 2-5 digit string; measured: 88.8% / 68.2%
    assert tower["char_accuracy"] >= 0.75, tower["heldout"]
    assert tower["string_accuracy"] >= 0.45, tower["heldout"]
    assert lm["heldout_perplexity"] < lm["heldout_perplexity_untrained"] / 10
    untrained = json.loads(run_module("llava_dsl.assets", ["path", "--root", root, "--lm", "random"]).stdout)
    assert untrained["vision_tower"] == paths["vision_tower"] and untrained["llm"] != paths["llm"]
    assert json.load(open(untrained["lm_report"]))["settings"]["steps"] == 0


def test_the_reduced_build_is_a_different_cache_entry():
    """``--quick`` (half the steps; smoke runs) never answers for the full build, or the reverse."""
    for settings in (tower_settings("slots"), LMSettings()):
        assert pretrained.quick(settings).steps == settings.steps // 2
        assert folder_name(pretrained.quick(settings)) != folder_name(settings)
