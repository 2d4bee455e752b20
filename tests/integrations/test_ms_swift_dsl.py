"""ms-swift: `swift sft --external_plugins <llava_dsl/integrations/ms_swift.py> --callbacks dsl` on a tiny stock Llava.
The first step's vision-tower gradient is compared with llava_dsl.hf's on the same batch (framework_runs.py)."""
import glob
import os
import sys

import pytest
from framework_runs import HERE, assert_first_step, images, run, saved_config, tiny_model, write_jsonl

import llava_dsl.integrations.ms_swift as plugin

SWIFT = os.path.join(os.path.dirname(sys.executable), "swift")
PLUGIN = plugin.__file__
CAPTURE = os.path.join(HERE, "capture_swift.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("swift")
    model = tiny_model(root / "model")
    rows = [{"messages": [{"role": "user", "content": "<image>what is written here"},
                          {"role": "assistant", "content": "the red cat"}], "images": [path]}
            for path in images(root)]
    return root, model, write_jsonl(root / "data.jsonl", rows)


def sft(setup, name, model=None, env=None, extra=(), callbacks=("dsl", "dsl_capture"), expect_ok=True):
    root, base, data = setup
    out = root / name
    command = [SWIFT, "sft", "--model", model or base, "--model_type", "llava1_5_hf", "--use_hf", "true",
               "--dataset", data, "--tuner_type", "full", "--torch_dtype", "float32",
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
               "--max_grad_norm", "0", "--learning_rate", "1e-3", "--gradient_checkpointing", "false",
               "--dataloader_num_workers", "0", "--report_to", "none", "--save_strategy", "steps", "--save_steps", "2",
               "--check_model", "false",  # else each run asks the ModelScope hub whether the local model is current
               "--save_only_model", "true", "--output_dir", out,
               "--external_plugins", PLUGIN, CAPTURE, "--callbacks", *callbacks, *extra]
    code, log = run(command, env={"DSL_CAPTURE": str(root / f"{name}.pt"), **(env or {})}, expect_ok=expect_ok)
    return out, root / f"{name}.pt", code, log


def checkpoint(out):
    found = glob.glob(os.path.join(str(out), "*", "checkpoint-2"))
    assert len(found) == 1, found
    return found[0]


def test_detach_on_off_and_reload(setup):
    root, base, _ = setup
    out, record, _, log = sft(setup, "on", env={"DSL_DETACH_LAYERS": "1"}, extra=["--freeze_vit", "false"])
    assert "Detached Skip-Links applied" in log
    assert_first_step(record, base, detach_layers=[1])
    saved = checkpoint(out)
    assert saved_config(saved)["dsl_detach_layers"] == [1]

    _, record, _, log = sft(setup, "off", extra=["--freeze_vit", "false"])
    assert "Detached Skip-Links" not in log  # no variable, no config key: the plugin does nothing
    assert_first_step(record, base, detach_layers=None)

    # reloading the saved checkpoint through ms-swift re-applies its config's choice without any variable
    _, record, _, log = sft(setup, "reload", model=saved, extra=["--freeze_vit", "false"])
    assert "re-applied from the checkpoint's config.dsl_detach_layers" in log
    assert_first_step(record, saved, detach_layers=[1])

    # DSL_OFF=1 trains the same checkpoint naive, on purpose
    _, record, _, log = sft(setup, "reload_off", model=saved, env={"DSL_OFF": "1"}, extra=["--freeze_vit", "false"])
    assert_first_step(record, saved, detach_layers=None)


def test_frozen_tower_is_refused(setup):
    # ms-swift's default --freeze_vit true: the detach would change nothing
    _, _, code, log = sft(setup, "frozen", env={"DSL_DETACH_DEPTH": "1"}, callbacks=("dsl",), expect_ok=False)
    assert code != 0
    assert "the vision tower of LlavaForConditionalGeneration is frozen" in log and "--freeze_vit false" in log


def test_bad_variable_names_itself():
    with pytest.raises(ValueError, match="DSL_DETACH_LAYERS='3,x'"):
        plugin.options_from_env({"DSL_DETACH_LAYERS": "3,x"})
    with pytest.raises(ValueError, match="DSL_DETACH_DEPTH='0'"):
        plugin.options_from_env({"DSL_DETACH_DEPTH": "0"})
