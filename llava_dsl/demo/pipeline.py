"""The built-in end-to-end demo: ``make demo`` or ``python -m llava_dsl.demo``.

On a CPU and with no downloads, it compares LLaVA-1.5's single-layer projector (``mlp2x_gelu``), naive
multi-layer fusion (``mlp_multilayer``) and Detached Skip-Links (``detached_mlp_multilayer``) on rendered text:

1. takes the locally pretrained tiny parts from the asset cache, building them on first use
   (``python -m llava_dsl.assets build --lm random``: a 6-block CLIP tower pretrained on rendered digit strings,
   a 4-layer LLaMA-style LM, untrained, with its tokenizer), and writes the OCR data set of digit strings
   (``llava_dsl.assets.ocr_data``, ``content="digits"``: held-out strings and font sizes never trained on);
2. trains stage 1 (projector only) and stage 2 (joint: LLM, projector and vision tower) for each projector,
   with the same seed and data, through ``python -m llava_dsl.train``; the two multi-layer stage-2 runs
   measure the gradient on each group of tower blocks (``--dsl_grad_stats_*``);
3. trains an R-Probe on each stage-2 checkpoint (``python -m llava_dsl.rprobe compare``);
4. answers the held-out questions in the TextVQA and OCRBench formats (``python -m llava_dsl.evaluate``);
5. writes the results table (markdown and JSON) and the figures to the output folder and prints the table.

Every step is the package's own command line run as a subprocess; its output goes to ``logs/<step>.log``.
``--scale`` (or ``DEMO_SCALE``) multiplies the steps and the data for a longer, more telling run;
``--steps N`` is a smoke run with N steps per stage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from llava_dsl.assets.pretrained import default_root
from llava_dsl.checkpointing.atomic import atomic_file, atomic_write_text
from llava_dsl.demo.figures import draw_grad_norms, draw_loss_curves, markdown_table
from llava_dsl.demo.stage_flags import as_argv, child_env, claim_output_dir, log_tail, tiny_stage_flags

PROJECTORS = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")

LABELS = {"mlp2x_gelu": "single layer", "mlp_multilayer": "naive fusion",
          "detached_mlp_multilayer": "Detached Skip-Links"}

# 6-block tower, main layer -2 = block 5: taps 4 (deep) and 3, 2 (shallow, detached in the DSL run).
SKIP_LAYERS = "2,3,4"

DETACH_DEPTH = 2

BENCHMARKS = ("textvqa", "ocrbench")

# Steps and data at --scale 1: about 5-7 minutes on 2 shared CPU cores once the parts are cached.
BASE = {"stage1_steps": 40, "stage2_steps": 150, "probe_steps": 100, "eval_questions": 40}

# The default --scale (300 joint steps): every arm reads above 70 % of held-out strings, where scale 1 stops at
# 40-42.5 % (docs/demo.md); about 7 minutes on 2 CPU cores with the parts cached.
DEFAULT_SCALE = 2.0

OUTPUT_PARTS = ("logs", "runs", "rprobe", "eval", "figures", "results.md", "results.json")

MARKER = "LLAVA_DSL_DEMO"  # marks a folder the demo wrote, so a rerun may clear it


class DemoError(RuntimeError):
    """A demo step that failed; the message names the step's log file."""


@dataclass(frozen=True)
class Plan:
    scale: float
    seed: int
    batch_size: int
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float
    stage2_lr: float
    tower_lr: float
    grad_stats_every: int
    grad_stats_window: int
    probe_steps: int
    probe_batch_size: int
    probe_eval_every: int
    probe_lr: float
    eval_questions: int
    max_new_tokens: int
    num_heldout: int
    tower_variant: str = "slots"     # llava_dsl.assets.pretrained.TOWER_VARIANTS
    lm_variant: str = "random"       # llava_dsl.assets.pretrained.LM_VARIANTS (why random: LM_VARIANTS' comment)
    quick_assets: bool = False       # the reduced asset build (tests)
    # the data: digit strings, the lengths the tower was pretrained on
    image_size: int = 64
    min_digits: int = 2
    max_digits: int = 5

    @property
    def num_pretrain(self) -> int:
        return max(16, self.stage1_steps * self.batch_size)  # one epoch

    @property
    def num_finetune(self) -> int:
        return max(16, self.stage2_steps * self.batch_size)


def make_plan(scale: float = DEFAULT_SCALE, steps: Optional[int] = None, seed: int = 0,
              quick_assets: bool = False) -> Plan:
    """Steps and data for ``scale``; ``steps`` instead gives a smoke run of ``steps`` steps per stage."""
    if steps is not None:
        if steps < 2:
            raise DemoError(f"--steps={steps}: expected at least 2 (a gradient-statistics window needs 2 steps)")
        return Plan(scale=0.0, seed=seed, batch_size=4, stage1_steps=steps, stage2_steps=steps, stage1_lr=1e-3,
                    stage2_lr=1e-3, tower_lr=1e-4, grad_stats_every=1, grad_stats_window=2, probe_steps=steps,
                    probe_batch_size=4, probe_eval_every=max(1, steps // 2), probe_lr=1e-3, eval_questions=4,
                    max_new_tokens=8, num_heldout=8, quick_assets=quick_assets)
    if not (scale > 0 and math.isfinite(scale)):
        raise DemoError(f"--scale / DEMO_SCALE={scale}: expected a positive number")
    stage2 = max(2, round(BASE["stage2_steps"] * scale))
    probe = max(2, round(BASE["probe_steps"] * scale))
    # about 75 measured steps whatever the length: a measured step costs about 1.5 plain ones
    every = max(1, stage2 // 75)
    return Plan(scale=scale, seed=seed, batch_size=16, stage1_steps=max(2, round(BASE["stage1_steps"] * scale)),
                stage2_steps=stage2, stage1_lr=1e-3, stage2_lr=1e-3, tower_lr=1e-4, grad_stats_every=every,
                grad_stats_window=max(2, min(10, stage2 // (every * 4))), probe_steps=probe, probe_batch_size=16,
                probe_eval_every=max(1, probe // 10), probe_lr=1e-3,
                eval_questions=max(8, min(1000, round(BASE["eval_questions"] * scale))), max_new_tokens=8,
                num_heldout=32 if scale <= 1 else 64, quick_assets=quick_assets)


def build_models(plan: Plan, root: Optional[str] = None) -> Dict[str, str]:
    """The pretrained tower (``plan.tower_variant``) and LM from the asset cache, built there on first use."""
    import torch

    from llava_dsl.assets.pretrained import build

    torch.set_num_threads(1)  # tiny matrices on shared cores: two threads made a pretraining step over ten times slower
    return build(plan.tower_variant, root=root, reduced=plan.quick_assets, lm_variant=plan.lm_variant,
                 log=lambda message: print(f"  {message}", flush=True))


def build_data(folder: str, plan: Plan) -> Dict[str, str]:
    from llava_dsl.assets.ocr_data import OcrDataConfig, build

    return build(folder, OcrDataConfig(seed=plan.seed, image_size=plan.image_size, num_pretrain=plan.num_pretrain,
                                       num_finetune=plan.num_finetune, num_heldout=plan.num_heldout,
                                       num_textvqa=plan.eval_questions, num_ocrbench=plan.eval_questions,
                                       content="digits", min_digits=plan.min_digits, max_digits=plan.max_digits))


def chance_levels(data: Dict[str, str], max_chars: int) -> Dict[str, Dict[str, float]]:
    """What a model that ignores the image can score on the eval files: the best constant answer.

    TextVQA format (exact match after normalisation): the most frequent answer's share. OCRBench format (a hit
    when an answer occurs in the prediction): the best of every answer and every concatenation of two answers
    that fits in ``max_chars`` characters (the demo's answers are digits, one token each)."""
    from llava_dsl.evaluate.benchmarks import load_ocrbench, load_textvqa

    textvqa = [answers[0] for answers in load_textvqa(data["textvqa_dir"], protocol="plain").ground_truth]
    ocrbench = [answers[0] for answers, _ in load_ocrbench(data["ocrbench_dir"]).ground_truth]
    most = max(textvqa.count(a) for a in set(textvqa))
    answers = sorted(set(ocrbench))
    candidates = set(answers) | {a + b for a in answers for b in answers if len(a + b) <= max_chars}
    best_hits, best = max((sum(a in c for a in ocrbench), c) for c in candidates)
    return {"textvqa": {"score": 100.0 * most / len(textvqa), "n": len(textvqa)},
            "ocrbench": {"points": best_hits, "n": len(ocrbench), "constant": best}}


def tower_report(paths: Dict[str, str]) -> Dict:
    return {"tower": _load_json(paths["tower_report"], "tower build report"),
            "lm": _load_json(paths["lm_report"], "LM build report")}


class Steps:
    """Runs each step as a subprocess, its output into ``logs/<name>.log``, with a progress bar."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.env = child_env()  # CPU everywhere, so the numbers compare across machines
        self._live: set = set()  # running children, so that a failed step can stop the others
        self._lock = threading.Lock()
        os.makedirs(log_dir, exist_ok=True)

    def stop_all(self) -> None:
        with self._lock:
            for process in self._live:
                process.kill()

    def run(self, name: str, argv: Sequence[str], total: int, progress: Callable[[str], Optional[int]],
            unit: str = "step", position: Optional[int] = None) -> float:
        """Run ``argv``; ``progress`` maps an output line to the count done so far (or None). Returns seconds.
        Steps that run side by side (threads) pass distinct ``position``s: one progress-bar line each."""
        from tqdm import tqdm

        log_path = os.path.join(self.log_dir, f"{name}.log")
        started = time.time()
        with open(log_path, "wb") as log, tqdm(total=total, desc=f"  {name}", unit=unit, file=sys.stdout,
                                               mininterval=0.5, dynamic_ncols=True, leave=True,
                                               position=position) as bar:
            log.write((shlex.join(argv) + "\n\n").encode())
            process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
            with self._lock:
                self._live.add(process)
            pending = b""
            for chunk in iter(lambda: process.stdout.read1(65536), b""):
                log.write(chunk)
                # progress bars end their updates with \r, log lines with \n
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                for line in lines:
                    done = progress(line.decode("utf-8", errors="replace"))
                    if done is not None and done > bar.n:
                        bar.update(min(done, total) - bar.n)
            code = process.wait()
            with self._lock:
                self._live.discard(process)
        if code != 0:
            raise DemoError(f"step {name!r} failed (exit code {code}); its full output is in {log_path}\n"
                            f"last lines:\n{log_tail(log_path)}")
        return time.time() - started


def _trainer_progress(line: str) -> Optional[int]:
    match = re.search(r"\|\s*(\d+)/(\d+) \[", line)  # the Trainer's tqdm bar
    return int(match.group(1)) if match else None


def _answer_progress(line: str) -> Optional[int]:
    match = re.search(r"llava_dsl\.answer: (\d+)/(\d+) answered", line)
    return int(match.group(1)) if match else None


def _probe_progress() -> Callable[[str], Optional[int]]:
    latest: Dict[str, int] = {}

    def progress(line: str) -> Optional[int]:
        match = re.search(r"\[rprobe\] (\S+) step (\d+):", line)
        if not match:
            return None
        latest[match.group(1)] = int(match.group(2))
        return sum(latest.values())
    return progress


def train_flags(plan: Plan, models: Dict[str, str], data: Dict[str, str], projector: str, stage: int,
                output_dir: str, adapter: Optional[str] = None) -> List[str]:
    """LLaVA-1.5's train.py flags for one tiny CPU stage of one arm; no checkpoints in between."""
    values = tiny_stage_flags(
        llm=models["llm"], vision_tower=models["vision_tower"],
        data_path=data["pretrain"] if stage == 1 else data["finetune"], image_folder=data["image_folder"],
        projector=projector, stage=stage, steps=plan.stage1_steps if stage == 1 else plan.stage2_steps,
        batch_size=plan.batch_size, learning_rate=plan.stage1_lr if stage == 1 else plan.stage2_lr, seed=plan.seed,
        output_dir=output_dir, skip_layers=SKIP_LAYERS, detach_depth=DETACH_DEPTH, tower_lr=plan.tower_lr,
        adapter=adapter)
    values["save_strategy"] = "no"
    if stage == 2 and projector != "mlp2x_gelu":  # a single-layer projector has no skip path to measure
        values.update(dsl_grad_stats_every=plan.grad_stats_every, dsl_grad_stats_window=plan.grad_stats_window)
    return as_argv(values)


def read_losses(output_dir: str) -> List[Tuple[int, float]]:
    path = os.path.join(output_dir, "trainer_state.json")
    if not os.path.isfile(path):
        raise DemoError(f"{path}: missing; the training run did not finish")
    with open(path, encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    losses = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e]
    if not losses:
        raise DemoError(f"{path}: no training loss was logged")
    return losses


def loss_summary(losses: Sequence[Tuple[int, float]]) -> Dict[str, float]:
    values = [loss for _, loss in losses]
    tail = values[-max(1, len(values) // 10):]
    return {"first_loss": values[0], "final_loss": sum(tail) / len(tail), "final_loss_steps": len(tail)}


def _header(index: int, total: int, text: str) -> None:
    print(f"\n[{index}/{total}] {text}", flush=True)


def _load_json(path: str, what: str) -> Dict:
    if not os.path.isfile(path):
        raise DemoError(f"{what} {path}: missing")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def clean(output_dir: str) -> None:
    """Remove what an earlier demo wrote (models and data are kept: they are cached by their parameters).

    A folder that holds other files and no demo marker is refused, so a mistyped --output_dir loses nothing."""
    claim_output_dir(output_dir, MARKER, "the demo",
                     "python -m llava_dsl.demo; a rerun replaces everything here except assets/", DemoError)
    for part in OUTPUT_PARTS:
        path = os.path.join(output_dir, part)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def train_arm(plan: Plan, models: Dict[str, str], data: Dict[str, str], runs_dir: str, steps: Steps,
              projector: str, position: Optional[int] = None) -> Tuple[Dict, Dict[int, List[Tuple[int, float]]]]:
    """Stage 1, then stage 2 from its adapter, for one projector; returns its table row and its losses."""
    row: Dict = {"projector": projector, "label": LABELS[projector]}
    losses: Dict[int, List[Tuple[int, float]]] = {}
    adapter = None
    for stage in (1, 2):
        out = os.path.join(runs_dir, f"llava-{projector}-stage{stage}")
        name = f"stage{stage}-{projector}"
        n_steps = plan.stage1_steps if stage == 1 else plan.stage2_steps
        seconds = steps.run(name, [sys.executable, "-m", "llava_dsl.train"]
                            + train_flags(plan, models, data, projector, stage, out, adapter),
                            n_steps, _trainer_progress, position=position)
        losses[stage] = read_losses(out)
        row[f"stage{stage}"] = {"steps": n_steps, **loss_summary(losses[stage]), "wall_seconds": seconds,
                                "output_dir": out}
        if stage == 1:
            adapter = os.path.join(out, "mm_projector.bin")
            if not os.path.isfile(adapter):
                raise DemoError(f"{adapter}: stage 1 wrote no adapter; see {steps.log_dir}/{name}.log")
    grad_file = os.path.join(row["stage2"]["output_dir"], "dsl_grad_stats.json")
    row["stage2"]["grad_stats"] = grad_file if os.path.isfile(grad_file) else None
    return row, losses


def train_arms(plan: Plan, models: Dict[str, str], data: Dict[str, str], runs_dir: str, steps: Steps,
               jobs: int = 1) -> Tuple[List[Dict], Dict[str, Dict[int, List[Tuple[int, float]]]]]:
    """Every projector's two stages, ``jobs`` projectors at a time. Each run is its own process with one torch
    thread and its own seed, so running them side by side changes their wall time, not their numbers."""
    if jobs <= 1:
        arms = [train_arm(plan, models, data, runs_dir, steps, projector) for projector in PROJECTORS]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(train_arm, plan, models, data, runs_dir, steps, projector, position)
                       for position, projector in enumerate(PROJECTORS)]
            try:
                arms = [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                steps.stop_all()  # the other arms' runs: a failed demo leaves nothing running
                raise
    return [row for row, _ in arms], {row["projector"]: arm_losses for row, arm_losses in arms}


def run_demo(output_dir: str, plan: Plan, assets_root: Optional[str] = None, jobs: int = 1) -> Dict:
    started = time.time()
    load_start = os.getloadavg()
    output_dir = os.path.abspath(output_dir)
    clean(output_dir)
    figures = os.path.join(output_dir, "figures")
    os.makedirs(figures)
    steps = Steps(os.path.join(output_dir, "logs"))
    python = sys.executable
    total = 5

    _header(1, total, f"pretrained tiny parts (cache: {assets_root or default_root()}) and data -> "
                      f"{os.path.join(output_dir, 'assets')}")
    t0 = time.time()
    models = build_models(plan, assets_root)
    models_seconds = time.time() - t0
    parts = tower_report(models)
    tower, lm = parts["tower"], parts["lm"]
    data = build_data(os.path.join(output_dir, "assets", "data"), plan)
    data_counts = _load_json(os.path.join(output_dir, "assets", "data", "OCR_DATA.json"), "data manifest")["counts"]
    chance = chance_levels(data, plan.max_new_tokens)
    ts = tower["settings"]
    print(f"  tower: CLIP {ts['blocks']} blocks x {ts['width']}, {ts['image_size']}px / {ts['patch_size']}px patches "
          f"({(ts['image_size'] // ts['patch_size']) ** 2} visual tokens), variant '{ts['variant']}', held-out "
          f"recognition {tower['char_accuracy'] * 100:.1f}% characters / {tower['string_accuracy'] * 100:.1f}% "
          f"strings\n  LM: LLaMA {lm['settings']['layers']} layers x {lm['settings']['width']}, "
          f"{lm['settings']['steps']} pretraining steps, held-out perplexity {lm['heldout_perplexity']:.2f}\n  data: {data_counts}; a model that ignores the image scores at most "
          f"{chance['textvqa']['score']:.1f}% (TextVQA format) and {chance['ocrbench']['points']} / "
          f"{chance['ocrbench']['n']} (OCRBench format) ({time.time() - t0:.0f}s)", flush=True)

    _header(2, total, f"training: stage 1 ({plan.stage1_steps} steps) + joint stage 2 ({plan.stage2_steps} steps), "
                      f"batch {plan.batch_size}, seed {plan.seed}, for {', '.join(PROJECTORS)}; "
                      f"{min(jobs, len(PROJECTORS))} at a time")
    rows, losses = train_arms(plan, models, data, os.path.join(output_dir, "runs"), steps, jobs)

    _header(3, total, f"R-Probe: {plan.probe_steps} probe steps on each stage-2 checkpoint (frozen MLLM)")
    checkpoints = [row["stage2"]["output_dir"] for row in rows]
    probe_dir = os.path.join(output_dir, "rprobe")
    probe_argv = [python, "-m", "llava_dsl.rprobe", "compare", "--checkpoints", *checkpoints] + as_argv({
        "data-path": data["pretrain"], "image-folder": data["image_folder"], "eval-data-path": data["heldout"],
        "eval-image-folder": data["heldout_images"], "steps": plan.probe_steps, "batch-size": plan.probe_batch_size,
        "learning-rate": plan.probe_lr, "warmup-steps": max(1, plan.probe_steps // 10),
        "eval-every": plan.probe_eval_every, "seed": plan.seed, "device": "cpu", "cache-images": True,
        "grid-images": 6, "output-dir": probe_dir})
    probe_seconds = steps.run("rprobe", probe_argv, plan.probe_steps * len(checkpoints), _probe_progress())
    report = _load_json(os.path.join(probe_dir, "report.json"), "R-Probe report")
    by_path = {os.path.abspath(c["checkpoint"]): c for c in report["checkpoints"]}
    for row in rows:
        result = by_path[os.path.abspath(row["stage2"]["output_dir"])]
        row["rprobe"] = {"final_mse": result["final"]["mse"], "final_psnr": result["final"]["psnr"],
                         "steps_to_threshold": result["steps_to_threshold"],
                         "history": [{"step": h["step"], "mse": h["mse"]} for h in result["history"]],
                         "train_seconds": result["train_seconds"]}
    probe = {"steps": plan.probe_steps, "eval_every": plan.probe_eval_every, "trivial_mse": report["trivial"]["mse"],
             "trivial_psnr": report["trivial"]["psnr"], "threshold": report["threshold"]["mse"],
             "wall_seconds": probe_seconds, "report": os.path.join(probe_dir, "report.json")}

    _header(4, total, f"OCR evaluation: {plan.eval_questions} held-out questions each in the TextVQA and OCRBench "
                      f"formats, greedy decoding")
    for row in rows:
        row["eval"] = {}
        for bench in BENCHMARKS:
            out = os.path.join(output_dir, "eval", row["projector"], bench)
            argv = [python, "-m", "llava_dsl.evaluate", bench, "--model-path", row["stage2"]["output_dir"],
                    "--data-dir", data[f"{bench}_dir"], "--output-dir", out, "--device", "cpu",
                    "--dtype", "float32", "--max_new_tokens", str(plan.max_new_tokens)]
            if bench == "textvqa":
                argv += ["--protocol", "plain"]  # the question only: reading, no OCR tokens to copy from
            seconds = steps.run(f"eval-{bench}-{row['projector']}", argv, plan.eval_questions, _answer_progress,
                                unit="question")
            result = _load_json(os.path.join(out, "results.json"), f"{bench} results")
            with open(result["scored_file"], encoding="utf-8") as f:
                examples = [json.loads(line) for line in f][:4]
            row["eval"][bench] = {"score": float(result["score"]), "unit": result["unit"], "metric": result["metric"],
                                  "n": result["n"], "answered": result["answered"], "wall_seconds": seconds,
                                  "results_file": os.path.join(out, "results.json"),
                                  "examples": [{"prediction": e["prediction"], "ground_truth": e["ground_truth"]}
                                               for e in examples]}

    _header(5, total, f"figures and table -> {output_dir}")
    files = {"table_markdown": os.path.join(output_dir, "results.md"),
             "table_json": os.path.join(output_dir, "results.json"),
             "loss_curves": draw_loss_curves(losses, os.path.join(figures, "loss_curves.png"))}
    by_projector = {row["projector"]: row for row in rows}
    naive, detached = by_projector["mlp_multilayer"], by_projector["detached_mlp_multilayer"]
    files["tower_grad_norms"] = draw_grad_norms(_load_json(naive["stage2"]["grad_stats"], "gradient statistics"),
                                                _load_json(detached["stage2"]["grad_stats"], "gradient statistics"),
                                                os.path.join(figures, "tower_grad_norms.png"))
    files["grad_stats"] = os.path.join(figures, "grad_stats.png")
    steps.run("diagnostics-plot", [python, "-m", "llava_dsl.diagnostics", "plot", naive["stage2"]["output_dir"],
                                   detached["stage2"]["output_dir"], "--out", files["grad_stats"]], 1,
              lambda line: 1 if line.strip().endswith(".png") else None, unit="figure")
    for name, picture in (("rprobe_mse", "curves"), ("rprobe_reconstructions", "reconstructions")):
        source = report.get("pictures", {}).get(picture)
        if not source or not os.path.isfile(source):
            raise DemoError(f"R-Probe report {probe['report']} names no {picture} picture")
        files[name] = os.path.join(figures, f"{name}.png")
        with atomic_file(files[name]) as temporary:
            shutil.copyfile(source, temporary)

    table = markdown_table(rows, probe, chance)
    results = {
        "what": "llava-dsl built-in demo: a tiny CLIP tower pretrained on rendered digit strings and a tiny LM, "
                "trained through LLaVA's two stages on CPU and asked to read held-out digit strings; the numbers "
                "show the pipeline and the measurements, not what the method does at LLaVA-1.5 scale",
        "plan": {**asdict(plan), "num_pretrain": plan.num_pretrain, "num_finetune": plan.num_finetune,
                 "skip_layers": SKIP_LAYERS, "detach_depth": DETACH_DEPTH},
        "assets": {"vision_tower": models["vision_tower"], "llm": models["llm"], "seconds": models_seconds,
                   "tower_settings": tower["settings"], "tower_heldout": tower["heldout"],
                   "tower_char_accuracy": tower["char_accuracy"], "tower_string_accuracy": tower["string_accuracy"],
                   "tower_build_seconds": tower["build_seconds"], "lm_settings": lm["settings"],
                   "lm_heldout_perplexity": lm["heldout_perplexity"], "lm_build_seconds": lm["build_seconds"]},
        "chance": chance,
        "data": data_counts,
        "machine": {"cpu_count": os.cpu_count(), "load_average_start": list(load_start),
                    "load_average_end": list(os.getloadavg()), "python": platform.python_version(),
                    "omp_num_threads": steps.env.get("OMP_NUM_THREADS")},
        "wall_seconds": time.time() - started,
        "rprobe": probe,
        "projectors": rows,
        "files": files,
    }
    atomic_write_text(files["table_json"], json.dumps(results, indent=1))
    atomic_write_text(files["table_markdown"], table)

    print("\n" + table)
    for row in rows:
        shown = ", ".join(f"{e['prediction']!r} ({e['ground_truth'][0]!r})" for e in row["eval"]["textvqa"]["examples"])
        print(f"  {row['projector']}: answers (truth): {shown}")
    print(f"\nDone in {results['wall_seconds']:.0f}s (load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores).")
    print(f"Table: {files['table_markdown']} and {files['table_json']}")
    print(f"Figures: {figures}/ ({', '.join(sorted(os.path.basename(p) for k, p in files.items() if k not in ('table_markdown', 'table_json')))})")
    print(f"Logs of every step: {steps.log_dir}/")
    print(f"Chance (a model that ignores the image): {chance['textvqa']['score']:.1f}% TextVQA format, "
          f"{chance['ocrbench']['points']} / {chance['ocrbench']['n']} OCRBench format. Tiny models and minutes of "
          f"CPU: DEMO_SCALE=N trains N times as long as scale 1 (this run: {plan.scale:g}; docs/demo.md).")
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="demo_output",
                        help="where models, data, checkpoints, logs, the table and the figures go (default %(default)s)")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"multiply steps and data (default: $DEMO_SCALE, else {DEFAULT_SCALE:g}, about 7 minutes "
                             f"on 2 CPU cores with the parts cached; 1 takes about 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="smoke run: N steps per stage, tiny batches and a few questions (ignores --scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets_root", "--assets-root", default=None,
                        help="cache of the pretrained tiny parts (default $LLAVA_DSL_ASSETS, else "
                             "~/.cache/llava_dsl/assets)")
    parser.add_argument("--quick_assets", "--quick-assets", action="store_true",
                        help="use the reduced asset build (python -m llava_dsl.assets build --quick), as the tests do")
    parser.add_argument("--jobs", type=int, default=None,
                        help="how many projectors train at the same time, one CPU core each (default: the number of "
                             "cores, at most 3); the numbers do not depend on it, the wall time does")
    args = parser.parse_args(argv)
    jobs = args.jobs if args.jobs is not None else min(len(PROJECTORS), os.cpu_count() or 1)
    if jobs < 1:
        raise SystemExit(f"llava_dsl.demo: --jobs {jobs}: expected 1 or more")
    scale = args.scale
    if scale is None:
        raw = os.environ.get("DEMO_SCALE", str(DEFAULT_SCALE))
        try:
            scale = float(raw)
        except ValueError:
            raise SystemExit(f"DEMO_SCALE={raw!r}: expected a number, e.g. DEMO_SCALE=4") from None
    try:
        plan = make_plan(scale, args.steps, args.seed, args.quick_assets)
        print(f"llava-dsl demo: {'--steps ' + str(args.steps) if args.steps else f'scale {scale:g}'}, "
              f"output in {os.path.abspath(args.output_dir)}", flush=True)
        run_demo(args.output_dir, plan, args.assets_root, jobs)
    except DemoError as error:
        raise SystemExit(f"llava_dsl.demo: {error}") from None
