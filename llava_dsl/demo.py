"""The built-in end-to-end demo: ``make demo`` or ``python -m llava_dsl.demo``.

On a CPU and with no downloads, it compares LLaVA-1.5's single-layer projector (``mlp2x_gelu``), naive
multi-layer fusion (``mlp_multilayer``) and Detached Skip-Links (``detached_mlp_multilayer``) on rendered text:

1. builds a tiny LLaMA-style LM, an 8-block CLIP-style tower and a tokenizer trained on the spot
   (``llava_dsl.tiny_assets``), and the synthetic OCR data set (``llava_dsl.ocr_data``);
2. trains stage 1 (projector only) and stage 2 (joint: LLM, projector and vision tower) for each projector,
   with the same seed and data, through ``python -m llava_dsl.train``; the two multi-layer stage-2 runs
   measure the gradient on each group of tower blocks (``--dsl_grad_stats_*``);
3. trains an R-Probe on each stage-2 checkpoint (``python -m llava_dsl.rprobe_stage compare``);
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
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PROJECTORS = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")
LABELS = {"mlp2x_gelu": "single layer", "mlp_multilayer": "naive fusion",
          "detached_mlp_multilayer": "Detached Skip-Links"}
# 8-block tower, main layer -2 = block 7: taps 6 (deep) and 4, 2 (shallow, detached in the DSL run).
SKIP_LAYERS = "2,4,6"
DETACH_DEPTH = 2
BENCHMARKS = ("textvqa", "ocrbench")
# Steps and data at --scale 1: about 5-7 minutes on 2 shared CPU cores.
BASE = {"stage1_steps": 40, "stage2_steps": 150, "probe_steps": 100, "eval_questions": 40}
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
    # the tiny models
    image_size: int = 64
    patch_size: int = 8
    tower_width: int = 32
    tower_blocks: int = 8
    llm_width: int = 64
    llm_layers: int = 2

    @property
    def num_pretrain(self) -> int:
        return max(16, self.stage1_steps * self.batch_size)  # one epoch

    @property
    def num_finetune(self) -> int:
        return max(16, self.stage2_steps * self.batch_size)


def make_plan(scale: float = 1.0, steps: Optional[int] = None, seed: int = 0) -> Plan:
    """Steps and data for ``scale``; ``steps`` instead gives a smoke run of ``steps`` steps per stage."""
    if steps is not None:
        if steps < 2:
            raise DemoError(f"--steps={steps}: expected at least 2 (a gradient-statistics window needs 2 steps)")
        return Plan(scale=0.0, seed=seed, batch_size=4, stage1_steps=steps, stage2_steps=steps, stage1_lr=1e-3,
                    stage2_lr=3e-3, tower_lr=3e-4, grad_stats_every=1, grad_stats_window=2, probe_steps=steps,
                    probe_batch_size=4, probe_eval_every=max(1, steps // 2), probe_lr=1e-3, eval_questions=4,
                    max_new_tokens=4, num_heldout=8)
    if not (scale > 0 and math.isfinite(scale)):
        raise DemoError(f"--scale / DEMO_SCALE={scale}: expected a positive number")
    stage2 = max(2, round(BASE["stage2_steps"] * scale))
    probe = max(2, round(BASE["probe_steps"] * scale))
    # about 75 measured steps whatever the length: a measured step costs about 1.5 plain ones
    every = max(1, stage2 // 75)
    return Plan(scale=scale, seed=seed, batch_size=16, stage1_steps=max(2, round(BASE["stage1_steps"] * scale)),
                stage2_steps=stage2, stage1_lr=1e-3, stage2_lr=3e-3, tower_lr=3e-4, grad_stats_every=every,
                grad_stats_window=max(2, min(10, stage2 // (every * 4))), probe_steps=probe, probe_batch_size=16,
                probe_eval_every=max(1, probe // 10), probe_lr=1e-3,
                eval_questions=max(8, min(1000, round(BASE["eval_questions"] * scale))), max_new_tokens=10,
                num_heldout=32 if scale <= 1 else 64)


# --------------------------------------------------------------------------------------------------
# Models and data.
# --------------------------------------------------------------------------------------------------
def build_models(folder: str, plan: Plan) -> Dict[str, str]:
    """Tokenizer, LM and tower under ``folder``; reused when MODELS.json records the same sizes and seed."""
    from . import tiny_assets

    folder = os.path.abspath(folder)
    paths = {"tokenizer": os.path.join(folder, "tokenizer"), "llm": os.path.join(folder, "llm"),
             "vision_tower": os.path.join(folder, "clip-vit-tiny")}
    params = {"format_version": tiny_assets.ASSETS_FORMAT_VERSION, "seed": plan.seed,
              **{k: getattr(plan, k) for k in ("image_size", "patch_size", "tower_width", "tower_blocks",
                                               "llm_width", "llm_layers")}}
    marker = os.path.join(folder, "MODELS.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params and all(os.path.isdir(p) for p in paths.values()):
                return paths
        os.remove(marker)
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    tiny_assets.build_tokenizer(paths["tokenizer"], seed=plan.seed)
    tiny_assets.build_language_model(paths["llm"], paths["tokenizer"], hidden_size=plan.llm_width,
                                     intermediate_size=2 * plan.llm_width, num_layers=plan.llm_layers,
                                     num_heads=4, seed=plan.seed)
    tiny_assets.build_vision_tower(paths["vision_tower"], image_size=plan.image_size, patch_size=plan.patch_size,
                                   hidden_size=plan.tower_width, intermediate_size=2 * plan.tower_width,
                                   num_layers=plan.tower_blocks, num_heads=4, seed=plan.seed)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=1)
    return paths


def build_data(folder: str, plan: Plan) -> Dict[str, str]:
    from .ocr_data import OcrDataConfig, build

    return build(folder, OcrDataConfig(seed=plan.seed, image_size=plan.image_size, num_pretrain=plan.num_pretrain,
                                       num_finetune=plan.num_finetune, num_heldout=plan.num_heldout,
                                       num_textvqa=plan.eval_questions, num_ocrbench=plan.eval_questions))


# --------------------------------------------------------------------------------------------------
# Running the package's command lines.
# --------------------------------------------------------------------------------------------------
def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    # the steps import this package: found from any working directory, installed or not
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: a second thread only adds contention
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               # everything is local: a stray hub name fails at once instead of waiting on the network
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # CPU everywhere, so the numbers compare across machines (tiny models gain nothing from a GPU)
               CUDA_VISIBLE_DEVICES="")
    return env


class Steps:
    """Runs each step as a subprocess, its output into ``logs/<name>.log``, with a progress bar."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.env = child_env()
        os.makedirs(log_dir, exist_ok=True)

    def run(self, name: str, argv: Sequence[str], total: int, progress: Callable[[str], Optional[int]],
            unit: str = "step") -> float:
        """Run ``argv``; ``progress`` maps an output line to the count done so far (or None). Returns seconds."""
        from tqdm import tqdm

        log_path = os.path.join(self.log_dir, f"{name}.log")
        started = time.time()
        with open(log_path, "wb") as log, tqdm(total=total, desc=f"  {name}", unit=unit, file=sys.stdout,
                                               mininterval=0.5, dynamic_ncols=True, leave=True) as bar:
            log.write((shlex.join(argv) + "\n\n").encode())
            process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
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
        if code != 0:
            raise DemoError(f"step {name!r} failed (exit code {code}); its full output is in {log_path}\n"
                            f"last lines:\n{_tail(log_path)}")
        return time.time() - started


def _tail(path: str, lines: int = 15) -> str:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    last = [line for line in re.split(r"[\r\n]", text) if line.strip()][-lines:]
    return "\n".join("  " + line for line in last)


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


def _flags(values: Dict[str, object]) -> List[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def train_flags(plan: Plan, models: Dict[str, str], data: Dict[str, str], projector: str, stage: int,
                output_dir: str, adapter: Optional[str] = None) -> List[str]:
    """LLaVA-1.5's train.py flags (as in its scripts/v1_5/*.sh) for one tiny CPU stage."""
    flags = {
        "model_name_or_path": models["llm"], "vision_tower": models["vision_tower"],
        "version": "plain" if stage == 1 else "v1",
        "data_path": data["pretrain"] if stage == 1 else data["finetune"], "image_folder": data["image_folder"],
        "mm_projector_type": projector, "mm_vision_select_layer": -2,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "group_by_modality_length": False, "max_steps": plan.stage1_steps if stage == 1 else plan.stage2_steps,
        "per_device_train_batch_size": plan.batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": plan.stage1_lr if stage == 1 else plan.stage2_lr, "weight_decay": 0.0,
        "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "logging_steps": 1, "save_strategy": "no",
        "model_max_length": 256, "bf16": False, "tf32": False, "dataloader_num_workers": 0,
        "lazy_preprocess": True, "report_to": "none", "seed": plan.seed, "output_dir": output_dir,
    }
    if projector != "mlp2x_gelu":
        flags["mm_vision_skip_layers"] = SKIP_LAYERS
    if projector.startswith("detached_"):
        flags["mm_vision_detach_depth"] = DETACH_DEPTH
    if stage == 1:
        flags["tune_mm_mlp_adapter"] = True
    else:
        flags.update(pretrain_mm_mlp_adapter=adapter, unfreeze_mm_vision_tower=True,
                     mm_vision_tower_lr=plan.tower_lr)
        if projector != "mlp2x_gelu":  # a single-layer projector has no skip path to measure
            flags.update(dsl_grad_stats_every=plan.grad_stats_every, dsl_grad_stats_window=plan.grad_stats_window)
    return _flags(flags)


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


# --------------------------------------------------------------------------------------------------
# Figures (Pillow only, like the rest of the package).
# --------------------------------------------------------------------------------------------------
def _smooth(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_panel(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
               size: Tuple[int, int] = (560, 330), log: bool = False):
    """One line plot: a line per series, axes fitted to the data (not to 0), the legend under the title."""
    from PIL import Image, ImageDraw

    from .diagnostics import PALETTE, _Axis, _fmt, _font, _nice_ticks

    width, height = size
    small, medium = _font(11), _font(13)
    legend_rows = math.ceil(len(series) / 2)
    left, right, top, bottom = 62, 16, 30 + 16 * legend_rows, 44
    points = {k: [(float(x), float(y)) for x, y in zip(*v) if math.isfinite(float(y)) and (not log or y > 0)]
              for k, v in series.items()}
    xs = [x for p in points.values() for x, _ in p] or [0.0, 1.0]
    ys = [y for p in points.values() for _, y in p] or [1.0]
    x_axis, y_axis = _Axis(min(xs), max(xs), log=False), _Axis(min(ys), max(ys), log=log)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x: float, y: float) -> Tuple[float, float]:
        return left + x_axis.fraction(x) * plot_w, top + plot_h - y_axis.fraction(y) * plot_h

    draw.text((left, 6), title + ("  (log)" if log else ""), fill="black", font=medium)
    for i, label in enumerate(series):
        x, y = left + (i % 2) * (plot_w // 2), 26 + 16 * (i // 2)
        draw.line([(x, y + 6), (x + 20, y + 6)], fill=PALETTE[i % len(PALETTE)], width=3)
        draw.text((x + 26, y), label, fill="black", font=small)
    for tick in y_axis.ticks():
        if 0 <= y_axis.fraction(tick) <= 1:
            y = to_px(x_axis.low, tick)[1]
            draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
            draw.text((left - 6, y), _fmt(tick), fill="black", font=small, anchor="rm")
    for tick in _nice_ticks(x_axis.low, x_axis.high):
        if 0 <= x_axis.fraction(tick) <= 1 and tick == int(tick):
            x = to_px(tick, 1.0)[0]
            draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
            draw.text((x, top + plot_h + 6), str(int(tick)), fill="black", font=small, anchor="mt")
    draw.text((left + plot_w / 2, height - 16), xlabel, fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for i, pts in enumerate(points.values()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        if len(pixels) <= 30:  # dots only where they stay readable
            for x, y in pixels:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
    return image


def tile(panels: Sequence, columns: int, title: Optional[str] = None):
    """Panels (PIL images of one size) in a grid under an optional title line."""
    from PIL import Image, ImageDraw

    from .diagnostics import _font

    width, height = panels[0].size
    rows = math.ceil(len(panels) / columns)
    top = 30 if title else 0
    canvas = Image.new("RGB", (columns * width, top + rows * height), "white")
    if title:
        ImageDraw.Draw(canvas).text((12, 8), title, fill="black", font=_font(15))
    for i, panel in enumerate(panels):
        canvas.paste(panel, ((i % columns) * width, top + (i // columns) * height))
    return canvas


def draw_loss_curves(losses: Dict[str, Dict[int, List[Tuple[int, float]]]], out: str) -> str:
    panels = []
    for stage, name in ((1, "stage 1 (projector only)"), (2, "stage 2 (joint: LLM + projector + tower)")):
        runs = {p: losses[p][stage] for p in losses}
        window = max(1, max(len(v) for v in runs.values()) // 15)
        series = {p: ([s for s, _ in v], _smooth([l for _, l in v], window)) for p, v in runs.items()}
        title = f"{name}: training loss" + (f", moving mean of {window}" if window > 1 else "")
        panels.append(line_panel(series, title, "optimizer step", size=(600, 360)))
    tile(panels, 2).save(out)
    return out


def grad_norm_series(stats: Dict, group: str, key: str) -> Tuple[List[int], List[float]]:
    points = [(s["step"], s["groups"][group][key]) for s in stats["steps"] if group in s["groups"]]
    return [p[0] for p in points], [float(p[1]) for p in points]


def draw_grad_norms(naive: Dict, detached: Dict, out: str) -> str:
    """Per group of tower blocks: the gradient norm training applied (naive vs detached), and the naive run's
    main-path part, at every measured step."""
    panels = []
    for group in naive["groups"]:
        name = group["name"]
        reached = [layer for layer in group["reached_by"] if layer != naive["layer_spec"]["main"]]
        series = {"naive: applied (main + skip)": grad_norm_series(naive, name, "norm_applied"),
                  "naive: main path only": grad_norm_series(naive, name, "norm_main"),
                  "detached: applied": grad_norm_series(detached, name, "norm_applied")}
        title = f"{name}: ||grad||, reached by taps {reached}" if reached else f"{name}: ||grad||, no tap"
        panels.append(line_panel(series, title, "optimizer step"))
    tile(panels, 3, "Vision-tower gradient norm per block group in stage 2 (taps 6, 4, 2; "
                    "detached run: 4 and 2 detached)").save(out)
    return out


# --------------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Dict], probe: Dict) -> str:
    header = ("| projector | | stage 1 loss (first → final) | stage 2 loss (first → final) | R-Probe MSE ↓ | "
              "R-Probe PSNR dB ↑ | R-Probe steps to threshold ↓ | TextVQA-format acc. % | OCRBench-format points | "
              "train time s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s1, s2, rp, ev = row["stage1"], row["stage2"], row["rprobe"], row["eval"]
        lines.append(
            f"| `{row['projector']}` | {row['label']} | {_fmt(s1['first_loss'])} → {_fmt(s1['final_loss'])} | "
            f"{_fmt(s2['first_loss'])} → {_fmt(s2['final_loss'])} | {_fmt(rp['final_mse'], 4)} | "
            f"{_fmt(rp['final_psnr'], 2)} | {'not reached' if rp['steps_to_threshold'] is None else rp['steps_to_threshold']} | "
            f"{_fmt(ev['textvqa']['score'], 1)} | "
            f"{int(ev['ocrbench']['score'])} / {ev['ocrbench']['n']} | "
            f"{s1['wall_seconds'] + s2['wall_seconds']:.0f} |")
    lines.append("")
    lines.append(f"R-Probe: held-out pixel MSE in the image processor's normalised units after "
                 f"{probe['steps']} probe steps; a mean-image predictor scores MSE {probe['trivial_mse']:.4f} / "
                 f"PSNR {probe['trivial_psnr']:.2f} dB; threshold {probe['threshold']:.4f} (half of that MSE), "
                 f"checked every {probe['eval_every']} steps. Stage losses: first logged step → mean of the last "
                 f"10% of steps.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The whole demo.
# --------------------------------------------------------------------------------------------------
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
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(os.path.join(output_dir, MARKER)):
        raise DemoError(f"--output_dir {output_dir} is not empty and was not written by the demo; "
                        f"choose a new or empty folder")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, MARKER), "w", encoding="utf-8") as f:
        f.write("written by python -m llava_dsl.demo; a rerun replaces everything here except assets/\n")
    for part in OUTPUT_PARTS:
        path = os.path.join(output_dir, part)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def run_demo(output_dir: str, plan: Plan) -> Dict:
    started = time.time()
    load_start = os.getloadavg()
    output_dir = os.path.abspath(output_dir)
    clean(output_dir)
    figures = os.path.join(output_dir, "figures")
    os.makedirs(figures)
    steps = Steps(os.path.join(output_dir, "logs"))
    python = sys.executable
    total = 5

    _header(1, total, f"tiny models and data -> {os.path.join(output_dir, 'assets')}")
    t0 = time.time()
    models = build_models(os.path.join(output_dir, "assets", "models"), plan)
    data = build_data(os.path.join(output_dir, "assets", "data"), plan)
    data_counts = _load_json(os.path.join(output_dir, "assets", "data", "OCR_DATA.json"), "data manifest")["counts"]
    print(f"  LM: LLaMA {plan.llm_layers} layers x {plan.llm_width}; tower: CLIP {plan.tower_blocks} blocks x "
          f"{plan.tower_width}, {plan.image_size}px / {plan.patch_size}px patches "
          f"({(plan.image_size // plan.patch_size) ** 2} visual tokens); data: {data_counts} "
          f"({time.time() - t0:.0f}s)", flush=True)

    _header(2, total, f"training: stage 1 ({plan.stage1_steps} steps) + joint stage 2 ({plan.stage2_steps} steps), "
                      f"batch {plan.batch_size}, seed {plan.seed}, for {', '.join(PROJECTORS)}")
    runs_dir = os.path.join(output_dir, "runs")
    rows, losses = [], {}
    for projector in PROJECTORS:
        row = {"projector": projector, "label": LABELS[projector]}
        losses[projector] = {}
        adapter = None
        for stage in (1, 2):
            out = os.path.join(runs_dir, f"llava-{projector}-stage{stage}")
            name = f"stage{stage}-{projector}"
            n_steps = plan.stage1_steps if stage == 1 else plan.stage2_steps
            seconds = steps.run(name, [python, "-m", "llava_dsl.train"]
                                + train_flags(plan, models, data, projector, stage, out, adapter),
                                n_steps, _trainer_progress)
            losses[projector][stage] = read_losses(out)
            row[f"stage{stage}"] = {"steps": n_steps, **loss_summary(losses[projector][stage]),
                                    "wall_seconds": seconds, "output_dir": out}
            if stage == 1:
                adapter = os.path.join(out, "mm_projector.bin")
                if not os.path.isfile(adapter):
                    raise DemoError(f"{adapter}: stage 1 wrote no adapter; see {steps.log_dir}/{name}.log")
        grad_file = os.path.join(row["stage2"]["output_dir"], "dsl_grad_stats.json")
        row["stage2"]["grad_stats"] = grad_file if os.path.isfile(grad_file) else None
        rows.append(row)

    _header(3, total, f"R-Probe: {plan.probe_steps} probe steps on each stage-2 checkpoint (frozen MLLM)")
    checkpoints = [row["stage2"]["output_dir"] for row in rows]
    probe_dir = os.path.join(output_dir, "rprobe")
    probe_argv = [python, "-m", "llava_dsl.rprobe_stage", "compare", "--checkpoints", *checkpoints] + _flags({
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
        shutil.copyfile(source, files[name])

    table = markdown_table(rows, probe)
    results = {
        "what": "llava-dsl built-in demo: tiny random models on rendered text, CPU; the numbers show the pipeline "
                "and the measurements, not what the method does at LLaVA-1.5 scale",
        "plan": {**asdict(plan), "num_pretrain": plan.num_pretrain, "num_finetune": plan.num_finetune,
                 "skip_layers": SKIP_LAYERS, "detach_depth": DETACH_DEPTH},
        "data": data_counts,
        "machine": {"cpu_count": os.cpu_count(), "load_average_start": list(load_start),
                    "load_average_end": list(os.getloadavg()), "python": platform.python_version(),
                    "omp_num_threads": steps.env.get("OMP_NUM_THREADS")},
        "wall_seconds": time.time() - started,
        "rprobe": probe,
        "projectors": rows,
        "files": files,
    }
    with open(files["table_markdown"], "w", encoding="utf-8") as f:
        f.write(table)
    with open(files["table_json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)

    print("\n" + table)
    for row in rows:
        shown = ", ".join(f"{e['prediction']!r} ({e['ground_truth'][0]!r})" for e in row["eval"]["textvqa"]["examples"])
        print(f"  {row['projector']}: answers (truth): {shown}")
    print(f"\nDone in {results['wall_seconds']:.0f}s (load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores).")
    print(f"Table: {files['table_markdown']} and {files['table_json']}")
    print(f"Figures: {figures}/ ({', '.join(sorted(os.path.basename(p) for k, p in files.items() if k not in ('table_markdown', 'table_json')))})")
    print(f"Logs of every step: {steps.log_dir}/")
    print("Tiny random models and minutes of CPU: the curves show the pipeline and the measurements; OCR accuracy "
          "this short is near chance. DEMO_SCALE=N trains N times longer (docs/demo.md).")
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="demo_output",
                        help="where models, data, checkpoints, logs, the table and the figures go (default %(default)s)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiply steps and data (default: $DEMO_SCALE, else 1; 1 takes about 5-7 minutes "
                             "on 2 CPU cores)")
    parser.add_argument("--steps", type=int, default=None,
                        help="smoke run: N steps per stage, tiny batches and a few questions (ignores --scale)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scale = args.scale
    if scale is None:
        raw = os.environ.get("DEMO_SCALE", "1")
        try:
            scale = float(raw)
        except ValueError:
            raise SystemExit(f"DEMO_SCALE={raw!r}: expected a number, e.g. DEMO_SCALE=4") from None
    try:
        plan = make_plan(scale, args.steps, args.seed)
        print(f"llava-dsl demo: {'--steps ' + str(args.steps) if args.steps else f'scale {scale:g}'}, "
              f"output in {os.path.abspath(args.output_dir)}", flush=True)
        run_demo(args.output_dir, plan)
    except DemoError as error:
        raise SystemExit(f"llava_dsl.demo: {error}") from None


if __name__ == "__main__":
    main()
