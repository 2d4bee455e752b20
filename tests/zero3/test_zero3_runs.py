"""Real 2-rank ZeRO-3 runs of scripts/zero3/ on CPU: the scripts unchanged, the real `deepspeed` launcher, gloo.

pretrain.sh -> finetune.sh -> finetune_lora.sh on tiny assets, in fp32 and in bf16, plus the same fp32 stage-2 steps
in one process without DeepSpeed as a reference. All runs happen once, in a module-scoped fixture. The bf16 runs use
the scripts' defaults where a cluster would (gradient checkpointing on) and accumulate gradients over two
micro-batches per rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from support import free_port
from test_zero3_scripts import SCRIPTS, STAGES, script_env

REPO = Path(__file__).resolve().parents[2]

# A one-process run iterates its sampler with torch's global RNG, while accelerate gives the sampler of a multi-process
# run a fresh torch.Generator() (accelerate/data_loader.py, prepare_data_loader). The reference run does the same, so
# both runs see the same batches in the same steps.
REFERENCE_MODULE = '''
import torch
import llava.train.llava_trainer as llava_trainer
from llava_dsl import train

_get_train_sampler = llava_trainer.LLaVATrainer._get_train_sampler


def _sampler_with_multiprocess_order(self):
    sampler = _get_train_sampler(self)
    if sampler is not None and getattr(sampler, "generator", False) is None:
        sampler.generator = torch.Generator()
    return sampler


llava_trainer.LLaVATrainer._get_train_sampler = _sampler_with_multiprocess_order
train.main()
'''


def checked_run(script: str, env: Dict[str, str], log: Path, *extra: str) -> None:
    with open(log, "w") as out:
        result = subprocess.run(["bash", str(SCRIPTS / script), *extra], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, timeout=600)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{script} exited {result.returncode}; last lines of {log}:\n{tail}")


def load_weights(directory: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors weights in {directory}: {sorted(p.name for p in directory.iterdir())}"
    weights = {}
    for path in files:
        weights.update(load_file(str(path)))
    return weights


TOWER_PREFIX = "model.vision_tower.vision_tower."
# The test config differs from zero3.json only where a tiny CPU run needs it: no communication overlap (on the CPU
# accelerator it made repeated runs differ) and every parameter partitioned (see the fixture).
CPU_ZERO_OVERRIDES = {"overlap_comm": False}
# fp32 reference comparison: plain SGD, so an update is proportional to its gradient (Adam turns reduction-order noise
# in a zero gradient, e.g. CLIP's k_proj bias, into a full learning-rate step).
SGD_ARGS = ("--optim", "sgd")
SGD_LR = 0.1
# fp32 sums in another order (gloo all-reduce vs one process) differ by ~1e-7 relative; times SGD_LR, times 2 steps
EQUALITY_ATOL = 1e-5
# Each finetune.sh run records, after its last step and before its final save, the logits that the ZeRO-3 engine
# computes for one fixed prompt and image and every gathered parameter (all ranks take part, rank 0 writes them);
# the reload test compares.
LOGITS_MODULE = '''
import os

import torch
from PIL import Image

from llava_dsl import plugin, train

_train = plugin.DSLTrainer.train


def train_then_record_logits(self, *args, **kwargs):
    output = _train(self, *args, **kwargs)
    from llava.mm_utils import process_images, tokenizer_image_token
    model = self.model
    image = Image.open(os.environ["PROBE_IMAGE"]).convert("RGB")
    pixels = process_images([image], model.get_vision_tower().image_processor, model.config).to(model.dtype)
    input_ids = tokenizer_image_token(PROMPT, self.tokenizer, return_tensors="pt").unsqueeze(0)
    self.model_wrapped.eval()
    with torch.no_grad():
        logits = self.model_wrapped(input_ids=input_ids, images=pixels).logits
    import deepspeed
    weights = {}
    for name, param in model.named_parameters():  # collective: every rank gathers, rank 0 keeps
        with deepspeed.zero.GatheredParameters([param]):
            weights[name] = param.detach().clone()
    if self.is_world_process_zero():
        torch.save({"logits": logits, "weights": weights}, os.environ["PROBE_LOGITS"])
    return output


PROMPT = "USER: <image>\\nWhat is written in the image? ASSISTANT:"
plugin.DSLTrainer.train = train_then_record_logits
train.main()
'''
PROMPT = "USER: <image>\nWhat is written in the image? ASSISTANT:"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from llava_dsl.assets.tiny_models import build_all

    root = tmp_path_factory.mktemp("zero3")
    assets = build_all(str(root / "assets"))
    # LLaVA casts the tower to fp16 when bf16 is off; ZeRO-3 keeps its fp32 partitions, a plain run rounds them.
    # A tower whose weights are fp16 numbers starts both runs from identical weights.
    tower = root / "clip-fp16-exact"
    CLIPVisionModel.from_pretrained(assets["vision_tower"]).half().float().save_pretrained(str(tower))
    CLIPImageProcessor.from_pretrained(assets["vision_tower"]).save_pretrained(str(tower))
    # Tiny parameters would all stay whole under the persistence threshold; 0 partitions every one of them.
    config = json.loads((SCRIPTS / "zero3.json").read_text())
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, **CPU_ZERO_OVERRIDES)
    ds_config = root / "zero3_test.json"
    ds_config.write_text(json.dumps(config, indent=1))
    (root / "reference_order.py").write_text(REFERENCE_MODULE)
    (root / "record_logits.py").write_text(LOGITS_MODULE)
    probe_image = Path(assets["image_folder"]) / sorted(os.listdir(assets["image_folder"]))[0]

    base = dict(
        DEVICE="cpu", NUM_GPUS=2, DEEPSPEED_CONFIG=ds_config, PYTHON=sys.executable,
        DEEPSPEED_LAUNCHER=str(Path(sys.executable).with_name("deepspeed")),
        MODEL_NAME_OR_PATH=assets["llm"], VISION_TOWER=tower, RUN_NAME="llava-tiny",
        PRETRAIN_DATA_PATH=assets["pretrain"], PRETRAIN_IMAGE_FOLDER=assets["image_folder"],
        FINETUNE_DATA_PATH=assets["finetune"], FINETUNE_IMAGE_FOLDER=assets["image_folder"],
        PRETRAIN_GLOBAL_BATCH_SIZE=8, FINETUNE_GLOBAL_BATCH_SIZE=8, PER_DEVICE_TRAIN_BATCH_SIZE=4,
        MODEL_MAX_LENGTH=128, SAVE_STRATEGY="no", GRADIENT_CHECKPOINTING="False", WARMUP_RATIO=0,
        PRETRAIN_LEARNING_RATE=1e-2, FINETUNE_LEARNING_RATE=1e-3, VISION_TOWER_LR=1e-3,
        LORA_LEARNING_RATE=1e-3, LORA_R=8, LORA_ALPHA=16,
        # projector frozen at learning rate 0 in the LoRA run: what it saves must be exactly what stage 2 loaded
        MM_PROJECTOR_LR=0,
    )
    runs = {"assets": assets, "tower": tower, "root": root, "ports": []}
    for precision, bf16 in (("fp32", "False"), ("bf16", "True")):
        out = root / precision
        out.mkdir()
        env = script_env(**base, BF16=bf16, CHECKPOINT_ROOT=out)
        if precision == "bf16":  # the scripts' cluster defaults, and two micro-batches per rank and step
            env.update(GRADIENT_CHECKPOINTING="True", PER_DEVICE_TRAIN_BATCH_SIZE="2")
        for script in STAGES:
            run_env, extra = {**env, "MASTER_PORT": str(free_port())}, ()
            runs["ports"].append(run_env["MASTER_PORT"])
            if script == "finetune.sh":
                run_env.update(TRAIN_MODULE="record_logits", PYTHONPATH=os.pathsep.join([str(root), str(REPO)]),
                               PROBE_IMAGE=str(probe_image), PROBE_LOGITS=str(out / "rank0_logits.pt"))
            if precision == "fp32" and script == "finetune.sh":
                run_env.update(FINETUNE_LEARNING_RATE=str(SGD_LR), VISION_TOWER_LR=str(SGD_LR))
                extra = SGD_ARGS
            checked_run(script, run_env, out / f"{script}.log", *extra)
        runs[precision] = {"pretrain": out / "llava-tiny-pretrain", "finetune": out / "llava-tiny",
                           "lora": out / "llava-tiny-lora", "logits": out / "rank0_logits.pt"}
    # the same fp32 stage-2 steps in one process without DeepSpeed
    single = root / "fp32" / "llava-tiny-one-process"
    env = script_env(**{**base, "BF16": "False", "CHECKPOINT_ROOT": root / "fp32", "LAUNCHER": "python", "NUM_GPUS": 1,
                        "TRAIN_MODULE": "reference_order", "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]),
                        "FINETUNE_OUTPUT_DIR": single, "FINETUNE_LEARNING_RATE": SGD_LR, "VISION_TOWER_LR": SGD_LR})
    checked_run("finetune.sh", env, root / "fp32" / "one-process.log", *SGD_ARGS)
    runs["fp32"]["one_process"] = single
    runs["probe_image"] = probe_image
    return runs


def test_cpu_runs_leave_no_shared_memory_behind(trained):
    # DeepSpeed's CPU backend maps a 66 MB /dev/shm buffer per rank and never unlinks it; the entry point removes
    # the names once every rank has mapped them (safety.init_deepspeed_distributed)
    from llava_dsl.compat.deepspeed import CPU_ALLREDUCE_BUFFER

    names = [CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr="127.0.0.1", port=port, rank=rank)
             for port in trained["ports"] for rank in (0, 1)]
    assert len(names) == 12 and [name for name in names if os.path.exists(name)] == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage1_adapter_is_whole(trained, precision):
    directory = trained[precision]["pretrain"]
    adapter = torch.load(directory / "mm_projector.bin", map_location="cpu")
    config = json.loads((directory / "config.json").read_text())
    fused = config["mm_hidden_size"] * (1 + len(config["mm_vision_skip_layers"]))  # main layer + taps, concatenated
    hidden = config["hidden_size"]
    expected = {"model.mm_projector.0.weight": (hidden, fused), "model.mm_projector.0.bias": (hidden,),
                "model.mm_projector.2.weight": (hidden, hidden), "model.mm_projector.2.bias": (hidden,)}
    assert {k: tuple(v.shape) for k, v in adapter.items()} == expected  # not ZeRO-3 partitions (shape (0,))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage2_starts_from_the_stage1_adapter(trained, precision):
    # the LoRA run trains its projector at MM_PROJECTOR_LR=0, so it must save exactly what it loaded under ZeRO-3
    adapter = torch.load(trained[precision]["pretrain"] / "mm_projector.bin", map_location="cpu")
    saved = torch.load(trained[precision]["lora"] / "non_lora_trainables.bin", map_location="cpu")
    projector = {k.split("model.mm_projector.", 1)[1]: v for k, v in saved.items() if "mm_projector." in k}
    assert set(projector) == {k.split("model.mm_projector.", 1)[1] for k in adapter}
    for key, value in adapter.items():
        name = key.split("model.mm_projector.", 1)[1]
        assert torch.equal(projector[name].to(value.dtype), value), f"{name} differs from the stage-1 adapter"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_joint_stage_trains_the_vision_tower(trained, precision):
    from safetensors.torch import load_file
    original = load_file(str(trained["tower"] / "model.safetensors"))
    saved = load_weights(trained[precision]["finetune"])
    lora = torch.load(trained[precision]["lora"] / "non_lora_trainables.bin", map_location="cpu")
    lora_tower = {k.split("vision_tower.vision_tower.", 1)[1]: v for k, v in lora.items() if "vision_tower." in k}
    for name, tower in (("finetune", {k[len(TOWER_PREFIX):]: v for k, v in saved.items() if k.startswith(TOWER_PREFIX)}),
                        ("lora", lora_tower)):
        assert set(tower) == set(original), f"{name}: saved tower keys differ from the original tower's"
        assert all(torch.isfinite(v.float()).all() for v in tower.values()), f"{name}: non-finite tower weights"
        changed = [k for k in original if not torch.equal(tower[k].float(), original[k].float())]
        assert changed, f"{name}: no vision-tower weight changed in the joint stage"
    assert json.loads((trained[precision]["finetune"] / "config.json").read_text())["unfreeze_mm_vision_tower"] is True


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetuned_checkpoint_reloads_on_one_cpu_process(trained, precision):
    import llava_dsl
    llava_dsl.register()
    from llava.model.builder import load_pretrained_model

    directory = trained[precision]["finetune"]
    saved = load_weights(directory)
    _, model, _, _ = load_pretrained_model(str(directory), None, "llava-tiny", device_map="cpu", device="cpu")
    state = model.state_dict()
    assert set(saved) <= set(state), f"not loaded: {sorted(set(saved) - set(state))[:5]}"
    for key, value in saved.items():  # the loader always casts to fp16
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reloaded_checkpoint_gives_the_logits_rank0_computed_before_saving(trained, precision):
    import llava_dsl
    llava_dsl.register()
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model import LlavaLlamaForCausalLM
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor

    directory = trained[precision]["finetune"]
    recorded = torch.load(trained[precision]["logits"], map_location="cpu")
    expected = recorded["logits"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # what load_pretrained_model does inside, minus its fixed fp16 cast (which would round an fp32 or bf16 model)
    model = LlavaLlamaForCausalLM.from_pretrained(str(directory), torch_dtype=dtype, low_cpu_mem_usage=True).eval()
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=False)
    processor = CLIPImageProcessor.from_pretrained(str(trained["tower"]))
    image = Image.open(trained["probe_image"]).convert("RGB")
    pixels = process_images([image], processor, model.config).to(dtype)
    input_ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt").unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, images=pixels).logits
    state = model.state_dict()
    assert set(recorded["weights"]) <= set(state)
    changed = [name for name, value in recorded["weights"].items() if not torch.equal(state[name], value)]
    assert changed == [], f"reloaded weights differ from rank 0's before the save: {changed[:5]}"
    assert logits.dtype == expected.dtype and logits.shape == expected.shape
    assert torch.isfinite(expected.float()).all()
    if precision == "fp32":
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    else:
        # Same weights, bit for bit (above), but ZeRO-3 swaps F.linear for its memory-efficient linear, which in bf16
        # rounds the matmul and then the bias addition; a stock Linear rounds once (with memory_efficient_linear
        # off the logits are bit-identical). Bounded by a few bf16 ulps.
        torch.testing.assert_close(logits, expected, rtol=2 ** -6, atol=2 ** -6)


def test_bf16_runs_accumulated_two_micro_batches_per_rank(trained):
    for script in ("finetune.sh", "finetune_lora.sh"):
        log = (trained["root"] / "bf16" / f"{script}.log").read_text()
        assert "global batch 8 = 2 per device x 2 accumulation x 2 ranks" in log, log[:2000]
    state = json.loads((trained["bf16"]["finetune"] / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # 16 samples, 8 per optimizer step
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses and all(loss == loss and 0 < loss < 100 for loss in losses), losses


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_checkpoint_reloads_and_merges_on_one_cpu_process(trained, precision):
    import llava_dsl
    llava_dsl.register()
    from llava.model.builder import load_pretrained_model

    directory = trained[precision]["lora"]
    extra = torch.load(directory / "non_lora_trainables.bin", map_location="cpu")
    _, model, _, _ = load_pretrained_model(str(directory), trained["assets"]["llm"], "llava-tiny-lora",
                                           device_map="cpu", device="cpu")
    state = model.state_dict()
    assert extra, "non_lora_trainables.bin is empty"
    for key, value in extra.items():  # 'base_model.model.' is what the loader strips
        name = key[len("base_model.model."):]
        torch.testing.assert_close(state[name], value.to(state[name].dtype), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # one LoRA-adapted weight: merged == base + (alpha / r) * B @ A
    from safetensors.torch import load_file
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    config = json.loads((directory / "adapter_config.json").read_text())
    a_key = next(k for k in sorted(adapter) if k.endswith("q_proj.lora_A.weight"))
    module = a_key[len("base_model.model."):-len(".lora_A.weight")]
    base = load_file(str(Path(trained["assets"]["llm"]) / "model.safetensors"))[module + ".weight"]
    delta = adapter[a_key.replace("lora_A", "lora_B")].float() @ adapter[a_key].float()
    expected = base.float() + config["lora_alpha"] / config["r"] * delta
    torch.testing.assert_close(state[module + ".weight"].float(), expected.half().float(), rtol=0, atol=1e-3,
                               equal_nan=True)


def test_zero3_two_ranks_equal_one_process_without_deepspeed(trained):
    zero3 = load_weights(trained["fp32"]["finetune"])
    single = load_weights(trained["fp32"]["one_process"])
    assert set(zero3) == set(single)
    worst = max(((k, (zero3[k].double() - single[k].double()).abs().max().item()) for k in single),
                key=lambda kv: kv[1])
    assert worst[1] <= EQUALITY_ATOL, f"largest difference {worst[1]:.3g} in {worst[0]} (tolerance {EQUALITY_ATOL})"
    # and the comparison is not vacuous: training moved the weights far more than the tolerance
    from safetensors.torch import load_file
    start = {TOWER_PREFIX + k: v for k, v in load_file(str(trained["tower"] / "model.safetensors")).items()}
    start.update(load_file(str(Path(trained["assets"]["llm"]) / "model.safetensors")))
    moved = max((single[k].double() - v.double()).abs().max().item() for k, v in start.items() if k in single)
    assert moved > 100 * EQUALITY_ATOL, f"training moved the weights by only {moved:.3g}"
