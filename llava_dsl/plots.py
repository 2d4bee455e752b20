"""One Pillow plotting toolkit for the whole package (matplotlib is not part of the stack): fonts, ticks, the
palette, line panels, tiling, image grids."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Sequence, Tuple

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.0e}"
    return f"{value:.3g}"


class Axis:
    """A linear or log axis fitted to [low, high] with a little padding; ``fraction`` maps a value to [0, 1]."""

    def __init__(self, low: float, high: float, log: bool):
        if log:
            low, high = math.log10(low), math.log10(high)
        if high - low < 1e-12:
            spread = 0.5 if log else max(abs(low) * 0.1, 0.05)
            low, high = low - spread, high + spread
        pad = (high - low) * 0.06
        self.low, self.high, self.log = low - pad, high + pad, log

    def fraction(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return (v - self.low) / (self.high - self.low)

    def ticks(self) -> List[float]:
        if not self.log:
            return nice_ticks(self.low, self.high)
        decades = range(math.floor(self.low), math.ceil(self.high) + 1)
        for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 5, 7)):
            ticks = [m * 10.0 ** d for d in decades for m in mantissas if 0 <= self.fraction(m * 10.0 ** d) <= 1]
            if len(ticks) >= 3:
                return ticks
        return ticks


def save_png(image, out: str) -> str:
    """Write a PIL image atomically (a crash leaves the old picture or none)."""
    from llava_dsl.checkpointing.atomic import atomic_file

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_file(out) as temporary:
        image.save(temporary, format="PNG")
    return out


def _wrap(text: str, width: float, length) -> List[str]:
    """``text`` cut into lines no wider than ``width`` (measured by ``length``), after '-', '_', '/' or ' ' where
    possible, else between characters."""
    lines, line = [], ""
    for piece in [p for p in re.split(r"(?<=[-_/ ])", text) if p]:
        if line and length(line + piece) > width:
            lines.append(line)
            line = ""
        for char in piece:
            if line and length(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    return lines + ([line] if line else [])


def reconstruction_grid(rows: Sequence[Sequence], titles: Sequence[str], min_cell: int = 96):
    """A table of PIL images (rows x columns; None leaves a cell blank) under a row of column titles."""
    from PIL import Image, ImageDraw, ImageFont

    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("no images to draw")
    side = max(max(c.size) for c in cells)
    scale = max(1, math.ceil(min_cell / side))
    cell, pad = side * scale, 4
    cols = len(titles)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(str(title), cell, lambda text: measure.textlength(text, font=font)) for title in titles]
    title_h = 12 + 12 * max([len(lines) for lines in wrapped] + [1])  # whole titles: checkpoint names differ late
    canvas = Image.new("RGB", (cols * (cell + pad) + pad, title_h + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(wrapped):
        x = pad + j * (cell + pad)
        for k, line in enumerate(lines):
            draw.text((x, 6 + 12 * k), line, fill="black", font=font)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            if image is not None:
                canvas.paste(image.resize((cell, cell), resample=Image.NEAREST),
                             (pad + j * (cell + pad), title_h + i * (cell + pad)))
    return canvas


def plot_curves(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], hlines: Dict[str, float],
                title: str, xlabel: str, ylabel: str, size: Tuple[int, int] = (720, 440)):
    """Line plot drawn with ImageDraw: one polyline per series, dashed horizontal reference lines, a legend."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    labels = list(series) + list(hlines)
    legend = max([ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(label), font=font) for label in labels] + [0])
    left, right, top, bottom = 70, max(190, int(legend) + 46), 34, 50
    size = (size[0] + right - 190, size[1])  # the plot keeps its width; the legend gets the room its labels need
    width, height = size
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    xs = [float(x) for xs_, _ in series.values() for x in xs_]
    ys = [float(y) for _, ys_ in series.values() for y in ys_] + [float(v) for v in hlines.values()]
    ys = [y for y in ys if math.isfinite(y)]
    if not xs or not ys:
        raise ValueError("nothing to plot")
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = 0.0, max(ys) * 1.05 if max(ys) > 0 else 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h)

    draw.text((left, 4), title, fill="black", font=font)
    for t in nice_ticks(y_lo, y_hi):
        _, y = px(x_lo, t)
        draw.line([(left, y), (left + plot_w, y)], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{t:.3g}", fill="black", font=font)
    for t in nice_ticks(x_lo, x_hi):
        x, _ = px(t, y_lo)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.text((x - 10, top + plot_h + 8), f"{t:g}", fill="black", font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w // 2 - 20, height - 18), xlabel, fill="black", font=font)
    draw.text((8, top - 14), ylabel, fill="black", font=font)

    legend_y = top
    for k, (label, value) in enumerate(hlines.items()):
        colour = (110, 110, 110) if k == 0 else (200, 60, 60)
        _, y = px(x_lo, value)
        for x0 in range(left, left + plot_w, 12):
            draw.line([(x0, y), (min(x0 + 6, left + plot_w), y)], fill=colour, width=1)
        draw.line([(left + plot_w + 10, legend_y + 6), (left + plot_w + 30, legend_y + 6)], fill=colour)
        draw.text((left + plot_w + 36, legend_y), label, fill="black", font=font)
        legend_y += 16
    for k, (label, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = [px(float(x), float(y)) for x, y in zip(sx, sy) if math.isfinite(float(y))]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([(left + plot_w + 10, legend_y + 6), (left + plot_w + 30, legend_y + 6)], fill=colour, width=2)
        draw.text((left + plot_w + 36, legend_y), label, fill="black", font=font)
        legend_y += 16
    return canvas
