"""Curves from ``dsl_grad_stats.json``: one column per run, one row per statistic, a line per block group."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from llava_dsl.diagnostics.stats import STATS_FILE
from llava_dsl.plots import PALETTE, Axis, font, nice_ticks, save_png, tick_label

# (key in a window's group summary, row title, log scale)
ROWS = (
    ("trcov_ratio", "tr(Cov skip) / tr(Cov main)", True),
    ("cos_mean", "mean cos(g_main, g_skip)", False),
    ("snr_main", "SNR without skip: main part", False),
    ("snr_full", "SNR with skip: main + skip", False),
    ("norm_skip", "mean ||g_skip|| / mean ||g_main||", True),
)

PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, MARGIN_T, GAP = 420, 230, 70, 34, 26, 18


def load_run(run_dir: str) -> Dict:
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, STATS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no {STATS_FILE} (was the run trained with --dsl_grad_stats_every or "
                                f"--dsl_grad_stats_dense_steps?)")
    with open(path) as f:
        stats = json.load(f)
    if not stats.get("windows"):
        raise ValueError(f"{path}: no closed window yet ({len(stats.get('steps', []))} measured steps; a window "
                         f"closes every {stats.get('schedule', {}).get('window')} measured steps)")
    stats["label"] = run_label(run_dir, stats)
    return stats


def run_label(run_dir: str, stats: Dict) -> str:
    spec = stats["layer_spec"]
    kind = f"detached {spec['detached_layers']}" if spec["detached_layers"] else "naive"
    name = os.path.basename(os.path.normpath(os.path.dirname(run_dir) if run_dir.endswith(".json") else run_dir))
    return f"{name} ({kind})"

SKIP_KEYS = ("trcov_ratio", "cos_mean", "norm_skip")  # undefined for a group no tap reaches (g_skip = 0)


def series(stats: Dict, key: str) -> Dict[str, List[Tuple[float, float]]]:
    """Per group: (window's last step, value) points; the skip/main norm ratio is derived from the norms."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    main_only = {g["name"] for g in stats["groups"] if len(g["reached_by"]) == 1}
    for window in stats["windows"]:
        for group, values in window["groups"].items():
            if key in SKIP_KEYS and group in main_only:
                continue
            if key == "norm_skip":
                value = values["norm_skip"] / values["norm_main"] if values["norm_main"] > 0 else None
            else:
                value = values.get(key)
            if value is not None and math.isfinite(value):
                out.setdefault(group, []).append((window["last_step"], value))
    return out


def _row_range(runs: Sequence[Dict], key: str, log: bool) -> Tuple[float, float]:
    values = [v for stats in runs for points in series(stats, key).values() for _, v in points if not log or v > 0]
    if not values:
        return (0.1, 10.0) if log else (0.0, 1.0)
    return min(values), max(values)


def plot(run_dirs: Sequence[str], out: str) -> str:
    runs = [load_run(d) for d in run_dirs]
    groups: List[str] = []
    for stats in runs:
        for g in stats["groups"]:
            if g["name"] not in groups:
                groups.append(g["name"])
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    steps = [w["last_step"] for stats in runs for w in stats["windows"]]
    x_axis = Axis(min(steps), max(steps), log=False)

    cell_w, cell_h = MARGIN_L + PANEL_W + GAP, MARGIN_T + PANEL_H + MARGIN_B
    title_h, legend_h = 34, 30
    width, height = cell_w * len(runs) + GAP, title_h + cell_h * len(ROWS) + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, medium = font(11), font(14)

    for column, stats in enumerate(runs):
        x0 = column * cell_w + MARGIN_L
        draw.text((x0, 8), stats["label"], fill="black", font=medium)
    for row, (key, title, log) in enumerate(ROWS):
        low, high = _row_range(runs, key, log)
        y_axis = Axis(low, high, log)
        for column, stats in enumerate(runs):
            left = column * cell_w + MARGIN_L
            top = title_h + row * cell_h + MARGIN_T
            right, bottom = left + PANEL_W, top + PANEL_H
            to_px = lambda x, y: (left + x_axis.fraction(x) * PANEL_W, bottom - y_axis.fraction(y) * PANEL_H)
            draw.text((left, top - 18), title + ("  (log)" if log else ""), fill="black", font=small)
            for tick in y_axis.ticks():
                if not 0 <= y_axis.fraction(tick) <= 1:
                    continue
                y = to_px(x_axis.low, tick)[1]
                draw.line([(left, y), (right, y)], fill=(225, 225, 225))
                draw.text((left - 6, y), tick_label(tick), fill="black", font=small, anchor="rm")
            for tick in nice_ticks(x_axis.low, x_axis.high):
                if not 0 <= x_axis.fraction(tick) <= 1 or tick != int(tick):
                    continue
                x = to_px(tick, low)[0]
                draw.line([(x, bottom), (x, bottom + 4)], fill="black")
                draw.text((x, bottom + 6), str(int(tick)), fill="black", font=small, anchor="mt")
            if not log and y_axis.low < 0 < y_axis.high:
                y = to_px(x_axis.low, 0.0)[1]
                draw.line([(left, y), (right, y)], fill=(150, 150, 150))
            draw.rectangle([left, top, right, bottom], outline="black")
            for group, points in series(stats, key).items():
                pixels = [to_px(x, y) for x, y in points if not log or y > 0]
                if len(pixels) > 1:
                    draw.line(pixels, fill=colors[group], width=2)
                for x, y in pixels:
                    draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colors[group])
            if row == len(ROWS) - 1:
                draw.text(((left + right) / 2, bottom + 20), "optimizer step (window end)", fill="black",
                          font=small, anchor="mt")
    x = MARGIN_L
    y = height - legend_h + 8
    for group in groups:
        draw.line([(x, y + 6), (x + 22, y + 6)], fill=colors[group], width=3)
        draw.text((x + 28, y), group, fill="black", font=small)
        x += 40 + int(draw.textlength(group, font=small))
    return save_png(image, out)
