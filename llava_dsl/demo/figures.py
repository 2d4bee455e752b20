"""The demo's figures and results table."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple


def _save(image, out: str) -> None:
    from llava_dsl.plots import save_png

    save_png(image, out)


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

    from llava_dsl.plots import PALETTE
    from llava_dsl.plots import Axis as _Axis
    from llava_dsl.plots import font as _font
    from llava_dsl.plots import nice_ticks as _nice_ticks
    from llava_dsl.plots import tick_label

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
            draw.text((left - 6, y), tick_label(tick), fill="black", font=small, anchor="rm")
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

    from llava_dsl.plots import font as _font

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
    _save(tile(panels, 2), out)
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
    spec = naive["layer_spec"]
    taps = ", ".join(str(layer) for layer in sorted(spec["taps"], reverse=True) if layer != spec["main"]) or "none"
    detached_taps = ", ".join(str(layer) for layer in sorted(detached["layer_spec"]["detached_layers"], reverse=True))
    _save(tile(panels, 3, f"Vision-tower gradient norm per block group in stage 2 (taps {taps}; "
                          f"detached run: {detached_taps or 'none'} detached)"), out)
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Dict], probe: Dict, chance: Optional[Dict] = None) -> str:
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
    if chance is not None:
        lines.append(f"| image ignored | best constant answer | | | | | | {_fmt(chance['textvqa']['score'], 1)} | "
                     f"{chance['ocrbench']['points']} / {chance['ocrbench']['n']} | |")
    lines.append("")
    lines.append(f"R-Probe: held-out pixel MSE in the image processor's normalised units after "
                 f"{probe['steps']} probe steps; a mean-image predictor scores MSE {probe['trivial_mse']:.4f} / "
                 f"PSNR {probe['trivial_psnr']:.2f} dB; threshold {probe['threshold']:.4f} (half of that MSE), "
                 f"checked every {probe['eval_every']} steps. Stage losses: first logged step → mean of the last "
                 f"10% of steps.")
    return "\n".join(lines) + "\n"
