"""Curves from ``dsl_grad_stats.json``: one column per run, one row per statistic, a line per block group."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence, Tuple

from llava_dsl.diagnostics.stats import STATS_FILE
from llava_dsl.plots import figure, log_y, save_png, to_image

# (key in a window's group summary, row title, log scale)
ROWS = (
    ("trcov_ratio", "tr(Cov skip) / tr(Cov main)", True),
    ("cos_mean", "mean cos(g_main, g_skip)", False),
    ("snr_main", "SNR without skip: main part", False),
    ("snr_full", "SNR with skip: main + skip", False),
    ("norm_skip", "mean ||g_skip|| / mean ||g_main||", True),
)

PANEL_W, PANEL_H = 500, 270  # pixels per panel


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


def plot(run_dirs: Sequence[str], out: str) -> str:
    from matplotlib.lines import Line2D

    runs = [load_run(d) for d in run_dirs]
    groups: List[str] = []
    for stats in runs:
        for g in stats["groups"]:
            if g["name"] not in groups:
                groups.append(g["name"])
    fig, axes = figure((PANEL_W * len(runs), PANEL_H * len(ROWS) + 40), rows=len(ROWS), columns=len(runs),
                       sharex=True, sharey="row")
    for row, (key, title, log) in enumerate(ROWS):
        for column, stats in enumerate(runs):
            ax = axes[row, column]
            for group, points in series(stats, key).items():
                points = [(x, y) for x, y in points if not log or y > 0]
                ax.plot([x for x, _ in points], [y for _, y in points], color=f"C{groups.index(group)}",
                        linewidth=1.8, marker="o", markersize=4, label=group)
            if log:
                log_y(ax)
            elif key == "cos_mean":
                ax.axhline(0.0, color="0.6", linewidth=0.8)
            ax.set_title((f"{stats['label']}\n" if row == 0 else "") + title + ("  (log)" if log else ""),
                         fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(ROWS) - 1:
                ax.set_xlabel("optimizer step (window end)", fontsize=8)
    handles = [Line2D([], [], color=f"C{i}", linewidth=3) for i in range(len(groups))]
    fig.legend(handles, groups, loc="outside lower center", ncol=len(groups), fontsize=8, frameon=False)
    return save_png(to_image(fig), out)
