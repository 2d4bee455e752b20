"""Runs the study's units through the package's own command lines, one subprocess each, skipping finished ones.

A *unit* is one command (a training stage, a fixed-theta measurement, an evaluation, an R-Probe comparison) for
one seed. When it exits 0 its record (command, seconds, time) is written to ``OUTPUT_DIR/units/<name>.json``;
a rerun of the same study skips every unit that has a record, so a crash or a kill loses at most the unit
that was running (the training stages also resume from their own checkpoints). The plan is written to
``OUTPUT_DIR/plan.json`` on the first run, and a rerun with a different plan is refused.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from llava_dsl.checkpointing.atomic import atomic_folder, atomic_write_text
from llava_dsl.demo.stage_flags import as_argv, child_env, log_tail, tiny_stage_flags
from llava_dsl.study.plan import ARMS, SHORT, Plan

MARKER = "LLAVA_DSL_STUDY"


class StudyError(RuntimeError):
    """A study step that failed or cannot run; the message names the step, its log or the value."""


_print_lock = threading.Lock()


def load_json(path: str) -> Optional[Dict]:
    """The JSON file at ``path``; None when there is none (a unit or study part not written yet)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def say(message: str) -> None:
    with _print_lock:
        print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Units:
    """Runs units as subprocesses with logs under ``logs/``; records finished ones under ``units/``."""

    def __init__(self, output_dir: str, device: str):
        self.output_dir = output_dir
        self.log_dir = os.path.join(output_dir, "logs")
        self.record_dir = os.path.join(output_dir, "units")
        self.env = child_env(device)
        os.makedirs(self.log_dir, exist_ok=True)
        os.makedirs(self.record_dir, exist_ok=True)

    def record(self, name: str) -> Optional[Dict]:
        return load_json(os.path.join(self.record_dir, f"{name}.json"))

    def run(self, name: str, argv: Sequence[str], clear: Sequence[str] = ()) -> Dict:
        """Run ``argv`` unless ``name`` already finished with the same command; ``clear``: folders to remove
        before a fresh (not resumed) start."""
        argv = [str(a) for a in argv]
        done = self.record(name)
        if done is not None:
            if done["argv"] != argv:
                raise StudyError(f"unit {name}: finished earlier with another command than this plan gives;\n"
                                 f"  recorded: {shlex.join(done['argv'])}\n  now:      {shlex.join(argv)}\n"
                                 f"use a new --output_dir, or delete {self.record_dir}/{name}.json to rerun it")
            return done
        for folder in clear:
            if os.path.isdir(folder):
                shutil.rmtree(folder)
        log_path = os.path.join(self.log_dir, f"{name}.log")
        say(f"{name}: start (log {log_path})")
        started = time.time()
        with open(log_path, "ab") as log:
            log.write((f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + shlex.join(argv) + "\n\n").encode())
            log.flush()
            code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        seconds = time.time() - started
        if code != 0:
            raise StudyError(f"unit {name} failed (exit code {code}) after {seconds:.0f}s; its output is in "
                             f"{log_path}\nlast lines:\n{log_tail(log_path)}")
        record = {"name": name, "argv": argv, "seconds": round(seconds, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_end": list(os.getloadavg())}
        atomic_write_text(os.path.join(self.record_dir, f"{name}.json"), json.dumps(record, indent=1))
        say(f"{name}: done in {seconds:.0f}s")
        return record


# ------------------------------------------------------------------------------------------ command lines

def finetune_images(paths: Dict[str, str]) -> str:
    """The image folder of the stage-2 json: the data mix's own with ``stage2_data`` "mix", else the rendered set's
    (a paths.json written before the option has no ``finetune_image_folder``)."""
    return paths.get("finetune_image_folder") or paths["image_folder"]


def train_flags(plan: Plan, paths: Dict[str, str], projector: str, stage: int, output_dir: str, seed: int,
                adapter: Optional[str] = None) -> List[str]:
    """LLaVA-1.5's train.py flags for one stage of one arm: the same for every arm except the projector."""
    values = tiny_stage_flags(
        llm=paths["llm"], vision_tower=paths["vision_tower"],
        data_path=paths["pretrain"] if stage == 1 else paths["finetune"],
        image_folder=paths["image_folder"] if stage == 1 else finetune_images(paths), projector=projector,
        stage=stage, steps=plan.stage1_steps if stage == 1 else plan.stage2_steps,
        batch_size=plan.batch_size, learning_rate=plan.stage1_lr if stage == 1 else plan.stage2_lr, seed=seed,
        output_dir=output_dir, skip_layers=plan.skip_layers, detach_depth=plan.detach_depth,
        tower_lr=plan.tower_lr, adapter=adapter)
    if stage == 1:
        values["save_strategy"] = "no"
    else:
        # a checkpoint in the middle: the fixed-theta measurement's second point, and where a killed run resumes
        values.update(save_strategy="steps", save_steps=plan.mid_step, save_total_limit=None)
        if projector != "mlp2x_gelu":  # a single-layer projector has no skip path to measure
            values.update(dsl_grad_stats_dense_steps=plan.grad_dense_steps, dsl_grad_stats_every=plan.grad_every,
                          dsl_grad_stats_window=plan.grad_window)
    return as_argv(values)


def fixed_theta_flags(plan: Plan, paths: Dict[str, str], projector: str, output_dir: str, seed: int,
                      model: Optional[str], adapter: Optional[str]) -> List[str]:
    """The stage-2 command at learning rate 0 (LLM, projector and tower): AdamW then leaves every weight where it
    is (p <- p - 0 * update, decay 0), so the splitter sees ``fixed_theta_steps`` minibatches at one theta.

    ``model``: a stage-2 checkpoint (its config loads the trained tower and projector), or None for the
    stage-2 start (the LLM, the pretrained tower and the stage-1 ``adapter``)."""
    values = tiny_stage_flags(
        llm=model or paths["llm"], vision_tower=paths["vision_tower"], data_path=paths["finetune"],
        image_folder=finetune_images(paths), projector=projector, stage=2, steps=plan.fixed_theta_steps,
        batch_size=plan.batch_size, learning_rate=0.0, seed=seed, output_dir=output_dir,
        skip_layers=plan.skip_layers, detach_depth=plan.detach_depth, tower_lr=0.0,
        adapter=adapter if model is None else None)
    values.update(lr_scheduler_type="constant", warmup_ratio=None, save_strategy="no",
                  dsl_grad_stats_dense_steps=plan.fixed_theta_steps, dsl_grad_stats_window=plan.fixed_theta_steps)
    return as_argv(values)


def stage_dir(output_dir: str, seed: int, projector: str, stage: int) -> str:
    # LLaVA's loader treats a folder as multimodal only if its name contains "llava"
    name = "multi" if stage == 1 and projector != "mlp2x_gelu" else SHORT[projector]
    return os.path.join(output_dir, "runs", f"seed{seed}", f"llava-{name}-stage{stage}")


def fixed_dir(output_dir: str, seed: int, point: str, projector: str) -> str:
    name = "start" if point == "start" else f"{point}-{SHORT[projector]}"
    return os.path.join(output_dir, "runs", f"seed{seed}", f"llava-fixed-{name}")


def seed_parts(units: Units, plan: Plan, paths: Dict[str, str], seed: int) -> Dict[str, str]:
    """The parts a seed changes: the LM's initial weights (the cached untrained LM re-initialised from the seed;
    its tokenizer and config kept) and the held-out samples (rendered with ``plan.eval_data_seed(seed)``, strings
    and font sizes the training split never contains; and real handwritten digits composed into strings, which
    the renderer never drew). Built once, in the study's folder."""
    from llava_dsl.assets.handwritten import HandwrittenConfig, build as build_handwritten
    from llava_dsl.assets.ocr_data import OcrDataConfig, build as build_data

    out = os.path.join(units.output_dir, "parts", f"seed{seed}")
    lm_dir = os.path.join(out, "lm")
    if not os.path.isdir(lm_dir):  # published whole or not at all
        reseed_lm(paths["llm"], seed, lm_dir)
    data = build_data(os.path.join(out, "heldout"),
                      OcrDataConfig(seed=plan.eval_data_seed(seed), image_size=plan.image_size, num_pretrain=16,
                                    num_finetune=16, num_heldout=16, num_textvqa=plan.eval_questions,
                                    num_ocrbench=8, content="digits", min_digits=plan.min_digits,
                                    max_digits=plan.max_digits))
    use = build_data(os.path.join(out, "use"), OcrDataConfig(
        seed=plan.eval_data_seed(seed) + 500, image_size=plan.image_size, num_pretrain=16, num_finetune=16,
        num_heldout=16, num_textvqa=plan.use_questions, num_ocrbench=8, content="digits",
        min_digits=plan.min_digits, max_digits=plan.max_digits))
    handwritten = build_handwritten(os.path.join(out, "handwritten"), HandwrittenConfig(
        count=plan.handwritten_questions, seed=plan.eval_data_seed(seed), image_size=plan.image_size,
        min_digits=plan.min_digits, max_digits=plan.max_digits))
    return {**paths, "llm": lm_dir, "textvqa_dir": data["textvqa_dir"], "handwritten_dir": handwritten["textvqa_dir"],
            "use_dir": use["textvqa_dir"]}


def eval_dir(output_dir: str, seed: int, projector: str, heldout: str = "rendered") -> str:
    """Where an arm's answers to one held-out set go (``rendered`` or ``handwritten``)."""
    name = SHORT[projector] if heldout == "rendered" else f"{SHORT[projector]}-{heldout}"
    return os.path.join(output_dir, "eval", f"seed{seed}", name)


def reseed_lm(source: str, seed: int, out_dir: str) -> None:
    """A copy of the LM folder ``source`` with fresh initial weights drawn from ``seed``: the study's arms start
    from an untrained LM, so its initialisation is one of the random parts a seed changes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    staging = out_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed study
    with atomic_folder(out_dir, staging):
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "BUILD.json"),
                        dirs_exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        model.save_pretrained(staging, safe_serialization=True)
        atomic_write_text(os.path.join(staging, "SEED"), f"initial weights of {source} redrawn with torch seed "
                                                         f"{seed}\n")


def run_seed(units: Units, plan: Plan, paths: Dict[str, str], seed: int) -> None:
    """Every unit of one seed, in order: stage 1, stage 2 per arm, fixed theta, answers, R-Probe, damage probe;
    ``paths`` holds the seed's own parts (``seed_parts``). A seed outside ``plan``'s full seeds runs the
    head-to-head only (naive and detached, the fixed-theta start, answers)."""
    python = sys.executable
    out = units.output_dir
    full = plan.is_full(seed)
    arms = ARMS if full else ("mlp_multilayer", "detached_mlp_multilayer")
    adapters = {}
    for kind, projector in (("single", "mlp2x_gelu"), ("multi", "mlp_multilayer")):
        if projector not in arms and kind == "single":
            continue
        folder = stage_dir(out, seed, projector, 1)
        units.run(f"seed{seed}-stage1-{kind}", [python, "-m", "llava_dsl.train"]
                  + train_flags(plan, paths, projector, 1, folder, seed), clear=[folder])
        adapters[kind] = os.path.join(folder, "mm_projector.bin")
        if not os.path.isfile(adapters[kind]):
            raise StudyError(f"{adapters[kind]}: stage 1 wrote no adapter; see {units.log_dir}")
    for projector in arms:
        folder = stage_dir(out, seed, projector, 2)
        adapter = adapters["single" if projector == "mlp2x_gelu" else "multi"]
        # not cleared: a killed stage 2 resumes from its mid checkpoint
        units.run(f"seed{seed}-stage2-{SHORT[projector]}", [python, "-m", "llava_dsl.train"]
                  + train_flags(plan, paths, projector, 2, folder, seed, adapter))
    for point in plan.fixed_theta_points if full else ("start",):
        multi = ("mlp_multilayer",) if point == "start" else ("mlp_multilayer", "detached_mlp_multilayer")
        for projector in multi:
            if point == "start":
                model, adapter = None, adapters["multi"]
            else:
                stage2 = stage_dir(out, seed, projector, 2)
                model = stage2 if point == "end" else os.path.join(stage2, f"checkpoint-{plan.mid_step}")
                adapter = None
            folder = fixed_dir(out, seed, point, projector)
            name = f"seed{seed}-fixed-{point}" + ("" if point == "start" else f"-{SHORT[projector]}")
            units.run(name, [python, "-m", "llava_dsl.train"]
                      + fixed_theta_flags(plan, paths, projector, folder, seed, model, adapter), clear=[folder])
    for heldout, data_dir in (("rendered", paths["textvqa_dir"]), ("handwritten", paths["handwritten_dir"])):
        for projector in arms:
            suffix = "" if heldout == "rendered" else f"-{heldout}"
            units.run(f"seed{seed}-eval-{SHORT[projector]}{suffix}",
                      [python, "-m", "llava_dsl.evaluate", "textvqa", "--model-path",
                       stage_dir(out, seed, projector, 2), "--data-dir", data_dir, "--output-dir",
                       eval_dir(out, seed, projector, heldout), "--device", plan.device, "--dtype", "float32",
                       "--max_new_tokens", str(plan.max_new_tokens), "--protocol", "plain"])
    if not full:
        return
    probe_dir = os.path.join(out, "rprobe", f"seed{seed}")
    units.run(f"seed{seed}-rprobe",
              [python, "-m", "llava_dsl.rprobe", "compare", "--checkpoints",
               *[stage_dir(out, seed, p, 2) for p in ARMS]] + as_argv({
                  "data-path": paths["pretrain"], "image-folder": paths["image_folder"],
                  "eval-data-path": paths["heldout"], "eval-image-folder": paths["heldout_images"],
                  "steps": plan.probe_steps, "batch-size": plan.probe_batch_size, "learning-rate": plan.probe_lr,
                  "warmup-steps": max(1, plan.probe_steps // 10), "eval-every": plan.probe_eval_every,
                  "threshold-fraction": plan.probe_threshold_fraction, "seed": seed, "device": plan.device,
                  "cache-images": True, "grid-images": 4, "output-dir": probe_dir}))
    mechanism_units(units, plan, paths, seed)


def mechanism_units(units: Units, plan: Plan, paths: Dict[str, str], seed: int,
                    arms: Sequence[str] = ("mlp_multilayer", "detached_mlp_multilayer", "mlp2x_gelu")) -> None:
    """The mechanism on this seed's checkpoints, through ``python -m llava_dsl.probes``: *damage*, linear probes
    (glyph identity, pixel R^2) on the frozen features of each tapped block of every arm's tower against the
    pretrained tower, on the same renders (the probe's seed = the study seed); *use*, each multi-layer arm's
    exact match with each tap's projector input replaced by its training mean, on the seed's ``use`` sample."""
    out = units.output_dir
    units.run(f"seed{seed}-damage",
              [sys.executable, "-m", "llava_dsl.probes", "damage",
               # the naive arm first: its main layer and taps are the layers probed in every tower
               *[stage_dir(out, seed, p, 2) for p in arms],
               "--reference", paths["vision_tower"], "--seed", str(seed), "--device", plan.device,
               "--output", damage_file(out, seed)])
    for projector in ("mlp_multilayer", "detached_mlp_multilayer"):
        units.run(f"seed{seed}-use-{SHORT[projector]}",
                  [sys.executable, "-m", "llava_dsl.probes", "use", "--model-path", stage_dir(out, seed, projector, 2),
                   "--data-dir", paths["use_dir"], "--train-data", paths["finetune"], "--image-folder",
                   finetune_images(paths), "--output-dir", use_dir(out, seed, projector), "--device", plan.device,
                   "--max_new_tokens", str(plan.max_new_tokens)])


def use_dir(output_dir: str, seed: int, projector: str) -> str:
    return os.path.join(output_dir, "probes", f"seed{seed}", f"use-{SHORT[projector]}")


def damage_file(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, "probes", f"seed{seed}", "damage.json")
