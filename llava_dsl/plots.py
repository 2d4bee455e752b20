"""The package's figures: line plots and interval plots on matplotlib (Agg, no display), returned as PIL images so
every caller saves them the same way (``save_png``); the reconstruction grid tiles PIL images with Pillow."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

DPI = 100


def figure(size: Tuple[int, int], rows: int = 1, columns: int = 1, **kwargs):
    """A matplotlib figure of ``size`` pixels with a grid of axes (always a 2-d array), off-screen."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, **kwargs)
    return fig, axes


def log_y(ax) -> None:
    """A log y axis with plain tick labels (0.5, 2, 10 rather than 5 x 10^-1)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def to_image(fig):
    """The figure rendered to an RGB PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1
                            ).convert("RGB")


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
                title: str, xlabel: str, ylabel: str, size: Tuple[int, int] = (720, 440), log: bool = False):
    """One line per series (dots at the points), dashed horizontal reference lines, the legend beside the plot."""
    fig, axes = figure(size)
    ax = axes[0, 0]
    finite = [float(y) for _, ys in series.values() for y in ys if math.isfinite(float(y))]
    if not finite and not hlines:
        raise ValueError("nothing to plot")
    for k, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, color=f"C{k}", linewidth=1.8, marker="o" if len(xs) <= 60 else None, markersize=3,
                label=label)
    for k, (label, value) in enumerate(hlines.items()):
        ax.axhline(value, color=("0.45" if k == 0 else (0.78, 0.24, 0.24)), linestyle="--", linewidth=1, label=label)
    if log:
        log_y(ax)
    elif min(finite + list(hlines.values())) >= 0:
        ax.set_ylim(bottom=0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return to_image(fig)


def interval_plot(rows: Sequence[Tuple[str, float, Optional[Sequence[float]]]], title: str, xlabel: str,
                  reference: Optional[float] = 0.0, size: Tuple[int, int] = (720, 0)):
    """One row per estimate: a dot at the value and a horizontal bar over its interval ((low, high) or None);
    a vertical line at ``reference``."""
    height = size[1] or 70 + 26 * len(rows)
    fig, axes = figure((size[0], height))
    ax = axes[0, 0]
    for i, (label, value, interval) in enumerate(rows):
        y = len(rows) - 1 - i
        if interval is not None:
            ax.errorbar(value, y, xerr=[[value - interval[0]], [interval[1] - value]], fmt="o", color=f"C{i}",
                        capsize=4, markersize=5)
        else:
            ax.plot([value], [y], "o", color=f"C{i}", markersize=5)
    if reference is not None:
        ax.axvline(reference, color="0.4", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set(title=title, xlabel=xlabel)
    ax.title.set_fontsize(9)
    ax.grid(axis="x", alpha=0.3)
    return to_image(fig)
