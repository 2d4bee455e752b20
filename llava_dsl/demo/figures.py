"""The demo's figures and results table."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple


def _smooth(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _panels(count: int, columns: int, panel: Tuple[int, int], title: Optional[str] = None):
    from llava_dsl.plots import figure

    rows = math.ceil(count / columns)
    fig, axes = figure((panel[0] * columns, panel[1] * rows + (30 if title else 0)), rows=rows, columns=columns)
    if title:
        fig.suptitle(title, fontsize=11)
    for ax in axes.flat[count:]:
        ax.set_axis_off()
    return fig, list(axes.flat)


def _lines(ax, series: Dict[str, Tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str) -> None:
    """One line per series, dots where they stay readable, axes fitted to the data, the legend inside."""
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, color=f"C{i}", linewidth=1.8, marker="o" if len(xs) <= 30 else None, markersize=3,
                label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, frameon=False)


def draw_loss_curves(losses: Dict[str, Dict[int, List[Tuple[int, float]]]], out: str) -> str:
    from llava_dsl.plots import save_png, to_image

    fig, axes = _panels(2, 2, (600, 360))
    for ax, (stage, name) in zip(axes, ((1, "stage 1 (projector only)"),
                                        (2, "stage 2 (joint: LLM + projector + tower)"))):
        runs = {p: losses[p][stage] for p in losses}
        window = max(1, max(len(v) for v in runs.values()) // 15)
        series = {p: ([s for s, _ in v], _smooth([l for _, l in v], window)) for p, v in runs.items()}
        _lines(ax, series, f"{name}: training loss" + (f", moving mean of {window}" if window > 1 else ""),
               "optimizer step")
    return save_png(to_image(fig), out)


def grad_norm_series(stats: Dict, group: str, key: str) -> Tuple[List[int], List[float]]:
    points = [(s["step"], s["groups"][group][key]) for s in stats["steps"] if group in s["groups"]]
    return [p[0] for p in points], [float(p[1]) for p in points]


def draw_grad_norms(naive: Dict, detached: Dict, out: str) -> str:
    """Per group of tower blocks: the gradient norm training applied (naive vs detached), and the naive run's
    main-path part, at every measured step."""
    from llava_dsl.plots import save_png, to_image

    spec = naive["layer_spec"]
    taps = ", ".join(str(layer) for layer in sorted(spec["taps"], reverse=True) if layer != spec["main"]) or "none"
    detached_taps = ", ".join(str(layer) for layer in sorted(detached["layer_spec"]["detached_layers"], reverse=True))
    fig, axes = _panels(len(naive["groups"]), 3, (560, 330),
                        f"Vision-tower gradient norm per block group in stage 2 (taps {taps}; "
                        f"detached run: {detached_taps or 'none'} detached)")
    for ax, group in zip(axes, naive["groups"]):
        name = group["name"]
        reached = [layer for layer in group["reached_by"] if layer != naive["layer_spec"]["main"]]
        series = {"naive: applied (main + skip)": grad_norm_series(naive, name, "norm_applied"),
                  "naive: main path only": grad_norm_series(naive, name, "norm_main"),
                  "detached: applied": grad_norm_series(detached, name, "norm_applied")}
        title = f"{name}: ||grad||, reached by taps {reached}" if reached else f"{name}: ||grad||, no tap"
        _lines(ax, series, title, "optimizer step")
    return save_png(to_image(fig), out)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(correct: float, n: int, percent: bool) -> str:
    """A count of right answers out of ``n`` with its 95 % Wilson interval: how far one arm's number can move
    with another sample of ``n`` questions."""
    from llava_dsl.study.stats import wilson

    low, high = wilson(int(round(correct)), n)
    if percent:
        return f"{100 * correct / n:.1f} [{100 * low:.0f}, {100 * high:.0f}]"
    return f"{int(round(correct))} / {n} [{n * low:.0f}, {n * high:.0f}]"


def markdown_table(rows: Sequence[Dict], probe: Dict, chance: Optional[Dict] = None) -> str:
    header = ("| projector | | stage 1 loss (first → final) | stage 2 loss (first → final) | R-Probe MSE ↓ | "
              "R-Probe PSNR dB ↑ | R-Probe steps to threshold ↓ | TextVQA-format acc. % [95 % interval] | "
              "OCRBench-format points [95 % interval] | train time s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s1, s2, rp, ev = row["stage1"], row["stage2"], row["rprobe"], row["eval"]
        lines.append(
            f"| `{row['projector']}` | {row['label']} | {_fmt(s1['first_loss'])} → {_fmt(s1['final_loss'])} | "
            f"{_fmt(s2['first_loss'])} → {_fmt(s2['final_loss'])} | {_fmt(rp['final_mse'], 4)} | "
            f"{_fmt(rp['final_psnr'], 2)} | {'not reached' if rp['steps_to_threshold'] is None else rp['steps_to_threshold']} | "
            f"{with_interval(ev['textvqa']['score'] * ev['textvqa']['n'] / 100, ev['textvqa']['n'], True)} | "
            f"{with_interval(ev['ocrbench']['score'], ev['ocrbench']['n'], False)} | "
            f"{s1['wall_seconds'] + s2['wall_seconds']:.0f} |")
    if chance is not None:
        lines.append(f"| image ignored | best constant answer | | | | | | {_fmt(chance['textvqa']['score'], 1)} | "
                     f"{chance['ocrbench']['points']} / {chance['ocrbench']['n']} | |")
    lines.append("")
    lines.append(f"R-Probe: held-out pixel MSE in the image processor's normalised units after "
                 f"{probe['steps']} probe steps; a mean-image predictor scores MSE {probe['trivial_mse']:.4f} / "
                 f"PSNR {probe['trivial_psnr']:.2f} dB; threshold {probe['threshold']:.4f} (half of that MSE), "
                 f"checked every {probe['eval_every']} steps. Stage losses: first logged step → mean of the last "
                 f"10% of steps. Intervals: 95 % Wilson intervals of one arm's share of right answers. The "
                 f"table shows that every arm reads; it does not rank the arms (docs/study.md compares them with a "
                 f"paired test over seeds).")
    return "\n".join(lines) + "\n"
