"""patches/llava-v1.5: they apply in order to the installed llava, reverse to it byte for byte, are what
patches/regenerate.py builds from patches/llava-v1.5/src, and make LLaVA behave exactly like the plugin.

The equivalence checks run LLaVA twice in subprocesses: a patched copy of the package (first on PYTHONPATH, no
plugin) and the pristine package with ``llava_dsl.register()``. Run as a script, this file is that subprocess.
"""
import difflib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERIES = ROOT / "patches" / "llava-v1.5"
PATCHES = [SERIES / "0001-multilayer-fusion.patch", SERIES / "0002-detached-skip-links.patch"]
CONFIG_KEYS = ("mm_projector_type", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_skip_layers",
               "mm_vision_detach_depth", "unfreeze_mm_vision_tower")
# (projector type, extra flags): defaults (8 blocks, main -2 = block 7 -> taps 6, 4, 2; detached: 4, 2),
# an explicit list with a negative index, and a stride with an explicit detach depth.
VARIANTS = {
    "naive": ("mlp_multilayer", {}),
    "detached": ("detached_mlp_multilayer", {}),
    "naive_list": ("mlp_multilayer", {"mm_vision_skip_layers": "2,-4"}),
    "detached_stride": ("detached_mlp_multilayer", {"mm_vision_skip_stride": 3, "mm_vision_detach_depth": 1}),
}


# ------------------------------------------------------------------------------------------------------
# Subprocess side: build the model through LLaVA's own classes and dump what the comparison needs.
# ------------------------------------------------------------------------------------------------------
def dump(mode, llm, vision_tower, out):
    import torch
    import transformers

    torch.set_num_threads(1)
    if mode == "plugin":
        import llava_dsl

        llava_dsl.register()
        from llava_dsl.plugin import ModelArguments
    else:
        from llava.train.train import ModelArguments
    import llava
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model import LlavaLlamaForCausalLM

    results = {"llava_file": llava.__file__, "plugin_loaded": "llava_dsl.plugin" in sys.modules}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 40, 41, 42, 43, 2], [1, 50, IMAGE_TOKEN_INDEX, 51, 52, 53, 2]])
    for name, (projector_type, flags) in VARIANTS.items():
        transformers.set_seed(0)
        model = LlavaLlamaForCausalLM.from_pretrained(llm)
        model_args = ModelArguments(model_name_or_path=llm, vision_tower=vision_tower, mm_vision_select_layer=-2,
                                    mm_projector_type=projector_type, unfreeze_mm_vision_tower=True, **flags)
        model.get_model().initialize_vision_modules(model_args=model_args)
        model.get_vision_tower().vision_tower.requires_grad_(True)  # what both train paths do when unfrozen
        features = model.encode_images(images)
        loss = model(input_ids=input_ids, labels=input_ids, images=images).loss
        loss.backward()
        results[name] = {
            "features": features.detach(),
            "loss": loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "projector": model.get_model().mm_projector.state_dict(),
            "config": {k: getattr(model.config, k, None) for k in CONFIG_KEYS},
        }
    torch.save(results, out)


def train(mode, flags):
    """A real LLaVA train() run: the patched package seeded the way ``python -m llava_dsl.train`` seeds
    (before LLaVA builds the projector), or the plugin's own entry point."""
    if mode == "plugin":
        import llava_dsl.train

        llava_dsl.train.main(flags)
    else:
        import transformers

        transformers.set_seed(42)
        import llava.train.train

        sys.argv = [sys.argv[0]] + flags
        llava.train.train.train()


if __name__ == "__main__":  # MODE LLM VISION_TOWER DUMP_FILE -- TRAIN_FLAGS...
    split = sys.argv.index("--")
    dump(*sys.argv[1:split])
    train(sys.argv[1], sys.argv[split + 1:])
    sys.exit(0)


# ------------------------------------------------------------------------------------------------------
# Test side.
# ------------------------------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402


def pristine_llava():
    spec = importlib.util.find_spec("llava")
    path = Path(spec.origin).parent
    assert "site-packages" in str(path), f"expected the installed llava package, found {path}"
    return path


def copy_llava(dest):
    """A fresh copy of the installed package as dest/llava (what a fork checkout looks like)."""
    shutil.copytree(pristine_llava(), dest / "llava", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tool(*command, cwd):
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True)


def apply(tree, patch, *options):
    result = tool("git", "apply", *options, str(patch), cwd=tree)
    assert result.returncode == 0, f"git apply {' '.join(options)} {patch.name}:\n{result.stderr}"


def load_regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "patches" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def patched_llava(tmp_path_factory):
    tree = copy_llava(tmp_path_factory.mktemp("patched"))
    for patch in PATCHES:
        apply(tree, patch)
    return tree


def test_patches_apply_in_order_and_reverse_to_the_pristine_package(tmp_path):
    pristine = tree_bytes(copy_llava(tmp_path / "pristine"))
    with_git = copy_llava(tmp_path / "git")
    for patch in PATCHES:
        apply(with_git, patch)
    with_patch = copy_llava(tmp_path / "patch")
    for patch in PATCHES:
        result = tool("patch", "-p1", "--batch", "--no-backup-if-mismatch", "-i", str(patch), cwd=with_patch)
        assert result.returncode == 0 and "offset" not in result.stdout and "fuzz" not in result.stdout, result.stdout
    patched = tree_bytes(with_git)
    assert patched == tree_bytes(with_patch)
    changed = sorted(k for k in pristine if patched[k] != pristine[k])
    assert changed == ["llava/model/llava_arch.py", "llava/model/multimodal_encoder/clip_encoder.py",
                       "llava/model/multimodal_projector/builder.py", "llava/train/llava_trainer.py",
                       "llava/train/train.py"]
    final_sources = SERIES / "src" / "0002-detached-skip-links"
    for rel in ("llava/model/multimodal_encoder/clip_encoder.py", "llava/model/multimodal_projector/builder.py"):
        assert patched[rel] == (final_sources / rel).read_bytes()

    for patch in reversed(PATCHES):
        apply(with_git, patch, "-R")
    assert tree_bytes(with_git) == pristine


def test_detached_patch_does_not_apply_without_the_fusion_patch(tmp_path):
    tree = copy_llava(tmp_path)
    assert tool("git", "apply", "--check", str(PATCHES[1]), cwd=tree).returncode != 0
    assert tool("patch", "-p1", "--dry-run", "--batch", "-i", str(PATCHES[1]), cwd=tree).returncode != 0
    assert tool("git", "apply", "--check", str(PATCHES[0]), cwd=tree).returncode == 0


def test_patch_files_are_what_regenerate_builds_from_src():
    regenerate = load_regenerate()
    built = regenerate.build_series(str(pristine_llava().parent))
    assert sorted(built) == sorted(p.name for p in SERIES.glob("*.patch")) == [p.name for p in PATCHES]
    for patch in PATCHES:
        committed = patch.read_text()
        assert committed == built[patch.name], "run `python patches/regenerate.py`:\n" + "".join(
            difflib.unified_diff(committed.splitlines(True), built[patch.name].splitlines(True), "committed", "built"))
    # The diff reviewers read stays small: only the fusion's two files, at most 40 changed lines.
    detached = built[PATCHES[1].name]
    touched = [line.split()[-1] for line in detached.splitlines() if line.startswith("diff --git")]
    assert touched == ["b/llava/model/multimodal_encoder/clip_encoder.py", "b/llava/model/multimodal_projector/builder.py"]
    body = detached[detached.index("diff --git"):].splitlines()
    changed = [l for l in body if l[:1] in "+-" and not l.startswith(("+++ ", "--- "))]
    assert 0 < len(changed) <= 40


def test_patched_builder_builds_every_registered_type_as_the_plugin(patched_llava):
    """patches/ follow the projector registry: every entry (at several depths where its name carries one) builds
    the same modules through patched LLaVA's builder as through the plugin's, and the equivalence runs below
    cover every multi-layer entry. A new entry fails here until patches/ (and this list) know it."""
    from types import SimpleNamespace

    from llava_dsl.skip_links.llava_patches import build_vision_projector
    from llava_dsl.skip_links.projectors import KINDS, projector_type

    spec = importlib.util.spec_from_file_location(
        "patched_builder", patched_llava / "llava" / "model" / "multimodal_projector" / "builder.py")
    patched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patched)
    names = ["linear", "identity", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "mlp_multilayer",
             "mlp1x_gelu_multilayer", "mlp3x_gelu_multilayer", "detached_mlp_multilayer",
             "detached_mlp2x_gelu_multilayer", "detached_mlp3x_gelu_multilayer"]
    assert {projector_type(name).name for name in names} == {kind.name for kind in KINDS}, "a registered type is missing here"
    for name in names:
        config = SimpleNamespace(mm_projector_type=name, mm_hidden_size=8, hidden_size=16,
                                 mm_vision_skip_layers=[6, 4, 2] if projector_type(name).multilayer else None)
        assert str(build_vision_projector(config)) == str(patched.build_vision_projector(config)), name
    tested = {VARIANTS[name][0] for name in VARIANTS}
    assert tested == {kind.name for kind in KINDS if kind.multilayer}


def train_flags(assets, output_dir):
    """A joint (stage-2) run with Detached Skip-Links: unfrozen tower at its own learning rate, 4 steps."""
    values = {
        "model_name_or_path": assets["llm"], "version": "v1", "data_path": assets["finetune"],
        "image_folder": assets["image_folder"], "vision_tower": assets["vision_tower"],
        "mm_vision_select_layer": -2, "mm_projector_type": "detached_mlp_multilayer",
        "unfreeze_mm_vision_tower": True, "mm_vision_tower_lr": 2e-4, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "num_train_epochs": 1,
        "per_device_train_batch_size": 4, "save_strategy": "no", "report_to": "none", "model_max_length": 128,
        "bf16": False, "tf32": False, "logging_steps": 1, "dataloader_num_workers": 0, "lazy_preprocess": True,
        "learning_rate": 1e-3, "output_dir": output_dir,
    }
    return [str(item) for key, value in values.items() for item in (f"--{key}", value)]


@pytest.fixture(scope="module")
def runs(patched_llava, tiny_assets, tmp_path_factory):
    """Both sides, in parallel: the patched copy (alone on PYTHONPATH) and pristine llava with the plugin."""
    out = tmp_path_factory.mktemp("equivalence")
    processes = {}
    for mode, path in (("patched", patched_llava), ("plugin", ROOT)):
        command = [sys.executable, __file__, mode, tiny_assets["llm"], tiny_assets["vision_tower"],
                   str(out / f"{mode}.pt"), "--", *train_flags(tiny_assets, str(out / f"llava-{mode}"))]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(path)}
        processes[mode] = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    for mode, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{mode} run failed ({process.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return {mode: {"dump": torch.load(out / f"{mode}.pt"), "output_dir": out / f"llava-{mode}"} for mode in processes}


def test_patched_llava_builds_the_same_model_as_the_plugin(runs, patched_llava):
    patched, plugin = runs["patched"]["dump"], runs["plugin"]["dump"]
    assert patched["llava_file"].startswith(str(patched_llava)) and not patched["plugin_loaded"]
    assert "site-packages" in plugin["llava_file"] and plugin["plugin_loaded"]

    for name in VARIANTS:
        a, b = patched[name], plugin[name]
        assert a["config"] == b["config"], name
        assert a["projector"].keys() == b["projector"].keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert all(torch.equal(a["projector"][k], b["projector"][k]) for k in a["projector"]), name
        assert torch.equal(a["features"], b["features"]), name
        assert torch.equal(a["loss"], b["loss"]), name
        assert a["grads"].keys() == b["grads"].keys(), name
        different = [k for k in a["grads"] if not torch.equal(a["grads"][k], b["grads"][k])]
        assert different == [], (name, different)

    configs = {name: patched[name]["config"] for name in VARIANTS}
    assert [configs[n]["mm_vision_skip_layers"] for n in VARIANTS] == [[6, 4, 2], [6, 4, 2], [5, 2], [6, 3]]
    assert [configs[n]["mm_vision_detach_depth"] for n in VARIANTS] == [0, 2, 0, 1]
    assert patched["naive"]["projector"]["0.weight"].shape == (64, 4 * 32)

    # The stop-gradient is the only difference between the two fusions: same forward, and the tower's
    # gradients differ exactly in the blocks that feed the detached taps (blocks 1-4) and the embeddings.
    naive, detached = patched["naive"], patched["detached"]
    assert torch.equal(naive["features"], detached["features"]) and torch.equal(naive["loss"], detached["loss"])
    tower = "model.vision_tower.vision_tower.vision_model."
    differs = {k[len(tower):].split(".")[0] + ("." + k.split("layers.")[1].split(".")[0] if "layers." in k else "")
               for k in naive["grads"] if k.startswith(tower) and not torch.equal(naive["grads"][k], detached["grads"][k])}
    assert differs == {"embeddings", "pre_layrnorm", "encoder.0", "encoder.1", "encoder.2", "encoder.3"}


def test_patched_llava_trains_like_the_plugin(runs, tiny_assets):
    """A real joint run of LLaVA's train() from the patched copy vs ``python -m llava_dsl.train``, same flags."""
    outs = {mode: runs[mode]["output_dir"] for mode in ("patched", "plugin")}

    def logged(out):
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [(e["step"], e["loss"], e["learning_rate"]) for e in history if "loss" in e]

    assert logged(outs["patched"]) == logged(outs["plugin"])
    assert [step for step, _, _ in logged(outs["patched"])] == [1, 2, 3, 4]
    configs = [json.loads((out / "config.json").read_text()) for out in outs.values()]
    configs = [{k: v for k, v in c.items() if k != "_name_or_path"} for c in configs]
    assert configs[0] == configs[1]
    assert configs[0]["mm_vision_skip_layers"] == [6, 4, 2] and configs[0]["mm_vision_tower_lr"] == 2e-4

    from safetensors.torch import load_file

    weights = [load_file(out / "model.safetensors") for out in outs.values()]
    assert weights[0].keys() == weights[1].keys()
    assert [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])] == []
    # ...and the run did train the tower (block 1 feeds a detached tap, so it learns through the main layer)
    original = load_file(os.path.join(tiny_assets["vision_tower"], "model.safetensors"))
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    trained = weights[0]["model.vision_tower.vision_tower." + key]
    assert trained.dtype == torch.float32 and not torch.equal(trained, original[key])
