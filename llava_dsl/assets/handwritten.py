"""A held-out set the package's renderer never drew: real handwritten digits composed into digit strings.

    python -m llava_dsl.assets.handwritten --out DIR [--count 400] [--seed 0] [--image-size 64]
    python -m llava_dsl.evaluate textvqa --protocol plain --data-dir DIR --model-path CKPT

The glyphs are scikit-learn's copy of the UCI handwritten digits (1,797 scans of 8x8 pixels, 16 grey levels,
written by 43 people; ``sklearn.datasets.load_digits``, shipped inside the wheel, nothing is downloaded). Each
image holds one string of ``min_digits``..``max_digits`` digits: each digit one scan drawn from the digit's own
pool, scaled up to a glyph height of ``GLYPH_SIZES`` pixels, written left to right with a one- or two-pixel gap
in a dark ink on a light solid or gradient background (the polarity and backgrounds of the digit-string data,
``ocr_data.digit_style``) at a random position. DIR is in the TextVQA layout the evaluation runner reads
(``ocr_data.write_textvqa_annotations``): ``TextVQA_0.5.1_val.json``, ``llava_textvqa_val_v051_ocr.jsonl`` and
``train_images/<image_id>.jpg``, plus ``HANDWRITTEN.json`` (the parameters and, per image, the scans used and each glyph's box).
Everything follows from ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from llava_dsl.assets.ocr_data import DIGIT_BACKGROUNDS, _background, _colours, write_textvqa_annotations

MARKER = "HANDWRITTEN.json"

FORMAT_VERSION = 1

GLYPH_SIZES = (10, 11, 12, 13, 14)  # glyph side in pixels (the 8x8 scan scaled), near the rendered font sizes


@dataclass(frozen=True)
class HandwrittenConfig:
    count: int = 400
    seed: int = 0
    image_size: int = 64
    min_digits: int = 2
    max_digits: int = 5


def digit_scans() -> Tuple["numpy.ndarray", List[int]]:
    """(scans [1797, 8, 8] in 0..16, labels) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the handwritten set needs scikit-learn (its bundled 8x8 digits): "
                           "pip install -c constraints.txt scikit-learn") from None
    digits = load_digits()
    return digits.images, [int(y) for y in digits.target]


def compose(text: str, scans, pools: Dict[int, List[int]], size: int, rng: random.Random):
    """One image of the digit string ``text`` from handwritten scans; returns (PIL image, [(scan index, glyph
    box x0, y0, x1, y1)] per character)."""
    import numpy as np
    from PIL import Image

    bg, bg2, fg = _colours(rng, dark_text=True)
    image = _background(rng.choice(DIGIT_BACKGROUNDS), size, bg, bg2, rng)
    margin = max(1, size // 16)
    gap = rng.randint(1, 2)
    glyph = rng.choice(GLYPH_SIZES)
    while glyph > 6 and len(text) * (glyph + gap) - gap > size - 2 * margin:
        glyph -= 1  # a long string at a large size: smaller, as the renderer steps its font down
    width = len(text) * (glyph + gap) - gap
    x0 = margin + rng.randint(0, max(0, size - 2 * margin - width))
    y0 = margin + rng.randint(0, max(0, size - 2 * margin - glyph))
    canvas = np.asarray(image, dtype=np.float32)
    used = []
    for k, char in enumerate(text):
        index = rng.choice(pools[int(char)])
        ink = Image.fromarray((scans[index] * (255.0 / 16.0)).astype(np.uint8)).resize((glyph, glyph),
                                                                                     Image.Resampling.BILINEAR)
        alpha = np.asarray(ink, dtype=np.float32)[..., None] / 255.0
        x = x0 + k * (glyph + gap)
        used.append((index, x, y0, x + glyph, y0 + glyph))
        patch = canvas[y0:y0 + glyph, x:x + glyph]
        canvas[y0:y0 + glyph, x:x + glyph] = patch * (1 - alpha) + np.asarray(fg, dtype=np.float32) * alpha
    return Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8)), used


def build(out_dir: str, cfg: HandwrittenConfig = HandwrittenConfig()) -> Dict[str, str]:
    """Write the set under ``out_dir`` (reused when ``HANDWRITTEN.json`` records the same parameters); returns
    ``textvqa_dir`` (= ``out_dir``) and ``image_folder``."""
    if not 1 <= cfg.min_digits <= cfg.max_digits:
        raise ValueError(f"min_digits={cfg.min_digits} max_digits={cfg.max_digits}: expected 1 <= min <= max")
    if cfg.count < 1:
        raise ValueError(f"count={cfg.count}: expected at least 1 image")
    out_dir = os.path.abspath(out_dir)
    paths = {"textvqa_dir": out_dir, "image_folder": os.path.join(out_dir, "train_images")}
    params = {"format_version": FORMAT_VERSION, **asdict(cfg)}
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f).get("params") == params:
                return paths
        os.remove(marker)
    shutil.rmtree(paths["image_folder"], ignore_errors=True)
    os.makedirs(paths["image_folder"])
    scans, labels = digit_scans()
    pools: Dict[int, List[int]] = {d: [i for i, y in enumerate(labels) if y == d] for d in range(10)}
    rng = random.Random(f"handwritten-{cfg.seed}")
    entries, records = [], []
    for i in range(cfg.count):
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(cfg.min_digits, cfg.max_digits)))
        image, used = compose(text, scans, pools, cfg.image_size, rng)
        image_id = f"hw{cfg.seed:04x}{i:010x}"
        image.save(os.path.join(paths["image_folder"], f"{image_id}.jpg"), format="JPEG", quality=95)
        entries.append((image_id, text, "number"))
        records.append({"image_id": image_id, "text": text, "scans": [u[0] for u in used],
                        "boxes": [list(u[1:]) for u in used]})
    write_textvqa_annotations(out_dir, entries, cfg.seed, cfg.image_size)
    from llava_dsl.checkpointing.atomic import atomic_write_text

    atomic_write_text(marker, json.dumps({"params": params, "source": "sklearn.datasets.load_digits",
                                          "images": records}, indent=1))
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    defaults = HandwrittenConfig()
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.assets.handwritten",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (TextVQA layout)")
    for name in ("count", "seed", "image_size", "min_digits", "max_digits"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    try:
        paths = build(args.out, HandwrittenConfig(args.count, args.seed, args.image_size, args.min_digits,
                                                  args.max_digits))
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"llava_dsl.assets.handwritten: {error}") from None
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
