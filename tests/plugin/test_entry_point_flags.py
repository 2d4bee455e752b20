"""Every plugin flag is parsed by ``python -m llava_dsl.train`` and listed by its ``--help`` with its help text."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
from support import ROOT

from llava_dsl.checkpointing.trainer import SafetyTrainerMixin  # noqa: F401  (imports llava: the stack is present)
from llava_dsl.data_checks import SafetyDataArguments
from llava_dsl.diagnostics.callback import GradStatsArguments
from llava_dsl.dpvr.llava_patches import DPVRArguments
from llava_dsl.plugin import LaunchArguments
from llava_dsl.rprobe.aux_loss import RProbeAuxArguments
from llava_dsl.skip_links.llava_patches import JointTrainingArguments, SkipLinkModelArguments

PLUGIN_FLAG_GROUPS = (SkipLinkModelArguments, JointTrainingArguments, DPVRArguments, GradStatsArguments,
                      RProbeAuxArguments, SafetyDataArguments, LaunchArguments)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text)  # argparse wraps lines, also after hyphens


def test_help_lists_every_plugin_flag_with_its_help():
    result = subprocess.run([sys.executable, "-m", "llava_dsl.train", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = _normalise(result.stdout)
    for group in PLUGIN_FLAG_GROUPS:
        for flag in dataclasses.fields(group):
            assert f"--{flag.name}" in text, f"--{flag.name} ({group.__name__}) missing from --help"
            assert _normalise(flag.metadata["help"])[:60] in text, f"--{flag.name}: help text missing"


def test_the_parser_takes_every_plugin_flag():
    import llava.train.train as llava_train
    import transformers

    import llava_dsl

    llava_dsl.register()
    parser = transformers.HfArgumentParser(
        (llava_train.ModelArguments, llava_train.DataArguments, llava_train.TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--rprobe_bidirectional", "True", "--rprobe_aux_weight", "0.5",
         "--attn_implementation", "sdpa", "--mm_vision_skip_stride", "2", "--dsl_grad_stats_every", "3",
         "--skip_bad_samples", "True", "--mm_routing", "dpvr_lf", "--mm_vision_tower_lr", "1e-5"])
    assert training_args.rprobe_bidirectional is True and training_args.rprobe_aux_weight == 0.5
    assert model_args.attn_implementation == "sdpa" and model_args.mm_vision_skip_stride == 2
    assert training_args.dsl_grad_stats_every == 3 and training_args.mm_vision_tower_lr == 1e-5
    assert data_args.skip_bad_samples is True and model_args.mm_routing == "dpvr_lf"


@pytest.mark.parametrize("flags, message", [
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--deepspeed", os.path.join(ROOT, "scripts", "zero3", "zero3.json"), "--ddp_timeout=soon"],
     "argument --ddp_timeout: invalid int value: 'soon'"),
    (["--fp16", "maybe"], "argument --fp16: Truthy value expected: got maybe"),
])
def test_a_bad_value_of_a_flag_read_at_startup_names_the_flag_and_the_value(flags, message, capsys, monkeypatch):
    """The flags the entry point reads itself (seed, DeepSpeed's timeout, the hardware checks') are parsed as
    LLaVA's parser would: a bad value stops at once naming flag and value, never a traceback."""
    from llava_dsl import train

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # what main() passes on to LLaVA's train()
    with pytest.raises(SystemExit) as stopped:
        train.main(["--output_dir", "out", "--model_name_or_path", "none"] + flags)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
