"""LLaMA-Factory: `python -m llava_dsl.integrations.llamafactory cfg.yaml` (its Python entry run_exp with our callback)
on a tiny stock Llava. The first step's vision-tower gradient is compared with llava_dsl.hf's on the same batch
(framework_runs.py); llamafactory_capture.py is the launcher's main() with the gradient recorder added."""
import json
import os
import sys

import pytest
import yaml
from framework_runs import HERE, assert_first_step, images, run, saved_config, tiny_model

from llava_dsl.integrations.llamafactory import split_args

LAUNCHER = os.path.join(HERE, "llamafactory_capture.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamafactory")
    model = tiny_model(root / "model")
    rows = [{"messages": [{"role": "user", "content": "<image>what is written here"},
                          {"role": "assistant", "content": "the red cat"}], "images": [path]} for path in images(root)]
    (root / "data.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(json.dumps({"tiny": {
        "file_name": "data.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return root, model


def train(setup, name, model=None, expect_ok=True, overrides=(), **keys):
    root, base = setup
    config = {"model_name_or_path": str(model or base), "template": "llava", "stage": "sft", "do_train": True,
              "finetuning_type": "full", "freeze_vision_tower": False, "dataset": "tiny", "dataset_dir": str(root),
              "cutoff_len": 128, "output_dir": str(root / name), "overwrite_output_dir": True,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
              "learning_rate": 1.0e-3, "max_grad_norm": 0, "report_to": "none", "save_strategy": "no", **keys}
    config = {k: v for k, v in config.items() if v is not None}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    code, log = run([sys.executable, LAUNCHER, path, *overrides], env={"DSL_CAPTURE": str(root / f"{name}.pt")},
                    expect_ok=expect_ok)
    return root / name, root / f"{name}.pt", code, log


def test_detach_on_off_and_reload(setup):
    root, base = setup
    out, record, _, log = train(setup, "on", dsl_detach_layers=[1])
    assert "Detached Skip-Links applied" in log
    assert_first_step(record, base, detach_layers=[1])
    assert saved_config(out)["dsl_detach_layers"] == [1]  # LLaMA-Factory saves the final model at the end

    _, record, _, log = train(setup, "off")
    assert "Detached Skip-Links" not in log
    assert_first_step(record, base, detach_layers=None)

    # the saved model through the launcher again, no DSL key: its config's choice is re-applied
    _, record, _, log = train(setup, "reload", model=out)
    assert "re-applied from the checkpoint's config.dsl_detach_layers" in log
    assert_first_step(record, out, detach_layers=[1])

    # key=value overrides on the command line work as with llamafactory-cli (LLaMA-Factory's own reader)
    _, record, _, log = train(setup, "reload_off", model=out, overrides=["dsl_off=true"])
    assert_first_step(record, out, detach_layers=None)


def test_frozen_tower_is_refused(setup):
    # LLaMA-Factory's default freeze_vision_tower: true
    _, _, code, log = train(setup, "frozen", freeze_vision_tower=None, dsl_detach_depth=1, expect_ok=False)
    assert code != 0
    assert "the vision tower of LlavaForConditionalGeneration is frozen" in log
    assert "freeze_vision_tower: false" in log


def test_dsl_keys_leave_llamafactory_args():
    args, options = split_args({"stage": "sft", "dsl_detach_layers": "3,1", "dsl_off": False})
    assert args == {"stage": "sft"} and options.detach_layers == [3, 1] and not options.off
    with pytest.raises(ValueError, match="dsl_off='yes'"):
        split_args({"dsl_off": "yes"})
