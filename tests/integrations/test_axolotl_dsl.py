"""axolotl: `python -m axolotl.cli.train cfg.yml` with `plugins: [llava_dsl.integrations.axolotl.DSLPlugin]` on a tiny
stock Llava. The first step's vision-tower gradient is compared with llava_dsl.hf's on the same batch
(framework_runs.py); capture_axolotl.py is a second plugin that adds the gradient recorder."""
import sys

import pytest
import yaml
from framework_runs import assert_first_step, images, run, saved_config, tiny_model, write_jsonl

PLUGIN = "llava_dsl.integrations.axolotl.DSLPlugin"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl")
    model = tiny_model(root / "model")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "what is written here"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "the red cat"}]}],
             "images": [path]} for path in images(root)]
    return root, model, write_jsonl(root / "data.jsonl", rows)


def train(setup, name, model=None, plugins=(PLUGIN,), expect_ok=True, **keys):
    root, base, data = setup
    config = {"base_model": str(model or base), "processor_type": "AutoProcessor",
              "chat_template": "tokenizer_default", "skip_prepare_dataset": True, "remove_unused_columns": False,
              "sample_packing": False, "datasets": [{"path": str(data), "type": "chat_template", "ds_type": "json"}],
              "output_dir": str(root / name), "micro_batch_size": 2, "gradient_accumulation_steps": 1,
              "max_steps": 2, "num_epochs": 1, "learning_rate": 1.0e-3, "optimizer": "adamw_torch",
              "lr_scheduler": "constant", "max_grad_norm": 0, "bf16": False, "fp16": False, "tf32": False,
              "sequence_len": 128, "save_first_step": False, "dataset_prepared_path": str(root / f"{name}_prepared"),
              "plugins": [*plugins, "capture_axolotl.CapturePlugin"], **keys}
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    code, log = run([sys.executable, "-m", "axolotl.cli.train", path],
                    env={"DSL_CAPTURE": str(root / f"{name}.pt"), "AXOLOTL_DO_NOT_TRACK": "1"}, expect_ok=expect_ok)
    return root / name, root / f"{name}.pt", code, log


def test_detach_on_off_and_reload(setup):
    root, base, _ = setup
    out, record, _, log = train(setup, "on", dsl_detach_layers=[1])
    assert "Detached Skip-Links applied" in log
    assert_first_step(record, base, detach_layers=[1])
    assert saved_config(out)["dsl_detach_layers"] == [1]

    _, record, _, log = train(setup, "off")
    assert "Detached Skip-Links" not in log  # the plugin listed, no key: nothing happens
    assert_first_step(record, base, detach_layers=None)

    _, record, _, log = train(setup, "reload", model=out)
    assert "re-applied from the checkpoint's config.dsl_detach_layers" in log
    assert_first_step(record, out, detach_layers=[1])

    _, record, _, log = train(setup, "reload_off", model=out, dsl_off=True)
    assert_first_step(record, out, detach_layers=None)


def test_frozen_tower_is_refused(setup):
    _, _, code, log = train(setup, "frozen", dsl_detach_depth=1, freeze_mm_modules=True, expect_ok=False)
    assert code != 0
    assert "freeze_mm_modules: true freezes the vision tower" in log and "freeze_mm_modules: false" in log
