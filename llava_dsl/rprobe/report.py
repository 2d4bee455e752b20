"""R-Probe reports: reconstruction pictures, curve plots and the comparison table."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from llava_dsl.plots import plot_curves, reconstruction_grid, save_png
from llava_dsl.rprobe.model import unnormalise


def to_pil(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """A normalised [3, H, W] tensor -> an RGB PIL image (un-normalised, clamped to [0, 1])."""
    from PIL import Image

    pixels = unnormalise(image.detach().float().cpu().unsqueeze(0), mean, std)[0].clamp(0, 1)
    array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


def _short_names(paths: Sequence[str]) -> List[str]:
    names, seen = [], {}
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(path))) or "checkpoint"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _threshold(args, trivial_mse: float) -> Tuple[float, str]:
    if args.threshold is not None:
        return float(args.threshold), "--threshold"
    return args.threshold_fraction * trivial_mse, f"{args.threshold_fraction} x trivial (mean-image) held-out MSE"


def write_pictures(output_dir: str, names: Sequence[str], results: Sequence[Dict[str, Any]],
                   mean: Sequence[float], std: Sequence[float], threshold: Optional[float],
                   trivial_mse: float) -> Dict[str, str]:
    rows = []
    for k, (original, _) in enumerate(results[0]["samples"]):
        row = [to_pil(original, mean, std)]
        for result in results:
            samples = result["samples"]
            row.append(to_pil(samples[k][1], mean, std) if k < len(samples) else None)
        rows.append(row)
    files = {}
    if rows:
        grid = reconstruction_grid(rows, ["original"] + list(names))
        files["reconstructions"] = os.path.join(output_dir, "reconstructions.png")
        save_png(grid, files["reconstructions"])
    series = {name: ([r["step"] for r in res["history"]], [r["mse"] for r in res["history"]])
              for name, res in zip(names, results)}
    lines = {"trivial (mean image)": trivial_mse}
    if threshold is not None:
        lines = {f"threshold {threshold:.3g}": threshold, **lines}
    plot = plot_curves(series, lines, "R-Probe held-out MSE", "probe training step", "MSE (normalised)")
    files["curves"] = os.path.join(output_dir, "mse_curve.png")
    save_png(plot, files["curves"])
    return files


def _public(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("state_dict", "samples", "probe", "meta")}
