"""A stage-2 data mix where reading is a minority, as in LLaVA's own instruction data, with OCR evaluated held out.

    python -m llava_dsl.assets.data_mix --out DIR [--read-fraction 0.2] [--confusable] [--num-finetune 2000] ...

Every image is a digit string drawn by the package's renderer (``ocr_data.render``, the digit-string style),
plus a small filled shape beside it. Each training record asks one question about it; exactly
``round(read_fraction * num_finetune)`` are reading questions (the answer is the string) and the rest are split
as evenly as counts allow (largest remainder, in ``OTHER_KINDS`` order) over questions that need no reading:

    background   "What colour is the background?"        a colour name of the background (``colour_name``)
    text_colour  "What colour is the text?"              a colour name of the ink
    position     "Where is the text?"                    top left ... bottom right, by the text's centre
    count        "How many characters are written?"      the string's length, in digits
    shape        "Which shape is drawn?"                 circle, square or triangle

With ``confusable`` the strings mix digits with letters whose glyphs they are confused with (O/0, l/1/I, S/5,
B/8); reading then needs the fine detail of each glyph. Training strings are never held-out strings
(``ocr_data.is_heldout_text``) and use the training font sizes; the held-out OCR evaluation (``eval/textvqa``,
the TextVQA layout the evaluation runner reads) uses held-out strings at held-out sizes, with the same shapes.

    DIR/images/, DIR/finetune.json       LLaVA's stage-2 json (--data_path / --image_folder)
    DIR/eval/textvqa/                    held-out reading questions (python -m llava_dsl.evaluate textvqa ...)
    DIR/DATA_MIX.json                    the parameters and the exact count of each question kind
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from llava_dsl.assets.ocr_data import (SHORT_ANSWER, Rendered, digit_style, is_heldout_text, render,
                                       write_textvqa_annotations)

MARKER = "DATA_MIX.json"

FORMAT_VERSION = 1

OTHER_KINDS = ("background", "text_colour", "position", "count", "shape")

KINDS = ("read",) + OTHER_KINDS

QUESTIONS = {
    "read": "What is written in the image?",
    "background": "What colour is the background?",
    "text_colour": "What colour is the text?",
    "position": "Where is the text?",
    "count": "How many characters are written?",
    "shape": "Which shape is drawn?",
}

SHAPES = ("circle", "square", "triangle")

DIGITS = "0123456789"

CONFUSABLE = "0O1lI5S8B"  # O/0, l/1/I, S/5, B/8


@dataclass(frozen=True)
class MixConfig:
    seed: int = 0
    image_size: int = 64
    num_finetune: int = 2000
    num_eval: int = 200
    read_fraction: float = 0.2
    other_kinds: Tuple[str, ...] = OTHER_KINDS
    confusable: bool = False
    min_chars: int = 2
    max_chars: int = 5


def kind_counts(total: int, read_fraction: float, other_kinds: Sequence[str] = OTHER_KINDS) -> Dict[str, int]:
    """Exact counts: ``round(read_fraction * total)`` reading questions, the rest over ``other_kinds`` as evenly
    as possible (the first kinds get the remainder)."""
    if not 0.0 <= read_fraction <= 1.0:
        raise ValueError(f"read_fraction={read_fraction}: expected a share between 0 and 1")
    unknown = [k for k in other_kinds if k not in OTHER_KINDS]
    if unknown or len(set(other_kinds)) != len(other_kinds):
        raise ValueError(f"other_kinds={list(other_kinds)}: expected distinct kinds from {list(OTHER_KINDS)}")
    read = round(read_fraction * total)
    if read < total and not other_kinds:
        raise ValueError(f"read_fraction={read_fraction} leaves {total - read} questions but other_kinds is empty")
    counts = {"read": read}
    rest = total - read
    for i, kind in enumerate(other_kinds):
        counts[kind] = rest // len(other_kinds) + (1 if i < rest % len(other_kinds) else 0)
    return counts


def colour_name(rgb: Sequence[int]) -> str:
    """A plain colour word for an RGB colour, by its hue, saturation and value."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    if v < 0.25:
        return "black"
    if s < 0.25:
        return "white" if v > 0.8 else "gray"
    hue = h * 360
    for bound, name in ((15, "red"), (45, "orange"), (70, "yellow"), (170, "green"), (260, "blue"),
                        (300, "purple"), (345, "pink"), (361, "red")):
        if hue < bound:
            return name
    return "red"


def position_name(box: Sequence[int], size: int) -> str:
    """Where the text's centre lies in a 3 x 3 grid of the image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    column = ("left", "", "right")[min(2, int(3 * cx / size))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / size))]
    return " ".join(p for p in (row, column) if p) or "middle"


def sample_string(rng: random.Random, cfg: MixConfig, heldout: bool) -> str:
    alphabet = DIGITS + CONFUSABLE if cfg.confusable else DIGITS
    while True:
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(cfg.min_chars, cfg.max_chars)))
        if is_heldout_text(text) == heldout:
            return text


def _draw_shape(image, box: Sequence[int], colour, rng: random.Random) -> str:
    """A filled circle, square or triangle in the ink colour, where it does not cover the text (when there is
    room); returns its name."""
    from PIL import ImageDraw

    size = image.size[0]
    side = max(6, size // 6)
    shape = rng.choice(SHAPES)
    x = y = 0
    for _ in range(50):
        x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
        if x + side < box[0] - 1 or x > box[2] + 1 or y + side < box[1] - 1 or y > box[3] + 1:
            break
    draw = ImageDraw.Draw(image)
    corners = [x, y, x + side - 1, y + side - 1]
    if shape == "circle":
        draw.ellipse(corners, fill=tuple(colour))
    elif shape == "square":
        draw.rectangle(corners, fill=tuple(colour))
    else:
        draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=tuple(colour))
    return shape


def draw_sample(rng: random.Random, cfg: MixConfig, heldout: bool):
    """(PIL image, Rendered, the answer of every kind) of one image."""
    text = sample_string(rng, cfg, heldout)
    image, rendered = render(text, "number", cfg.image_size, rng, digit_style(heldout))
    shape = _draw_shape(image, rendered.box, rendered.style["fg"], rng)
    answers = {"read": text, "background": colour_name(rendered.style["bg"]),
               "text_colour": colour_name(rendered.style["fg"]), "position": position_name(rendered.box, cfg.image_size),
               "count": str(len(text)), "shape": shape}
    return image, rendered, answers


def _record(name: str, rendered: Rendered, kind: str, answer: str, sample_id: str, short: bool) -> dict:
    question = QUESTIONS[kind] + (SHORT_ANSWER if short else "")
    return {"id": sample_id, "image": name, "question_kind": kind,
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
            "rprobe_crop": list(rendered.box), "rprobe_text": rendered.text}


def build(out_dir: str, cfg: MixConfig = MixConfig()) -> Dict[str, str]:
    """Write the mix under ``out_dir`` (reused when ``DATA_MIX.json`` records the same parameters).

    Returns the paths: image_folder, finetune, textvqa_dir, marker."""
    if not 1 <= cfg.min_chars <= cfg.max_chars:
        raise ValueError(f"min_chars={cfg.min_chars} max_chars={cfg.max_chars}: expected 1 <= min <= max")
    counts = kind_counts(cfg.num_finetune, cfg.read_fraction, cfg.other_kinds)
    out_dir = os.path.abspath(out_dir)
    paths = {"image_folder": os.path.join(out_dir, "images"), "finetune": os.path.join(out_dir, "finetune.json"),
             "textvqa_dir": os.path.join(out_dir, "eval", "textvqa"), "marker": os.path.join(out_dir, MARKER)}
    params = {"format_version": FORMAT_VERSION, **asdict(cfg), "other_kinds": list(cfg.other_kinds)}
    if os.path.isfile(paths["marker"]):
        with open(paths["marker"], encoding="utf-8") as f:
            if json.load(f).get("params") == params:
                return paths
        os.remove(paths["marker"])
    for sub in ("images", "eval"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    os.makedirs(paths["image_folder"])
    os.makedirs(os.path.join(paths["textvqa_dir"], "train_images"))

    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    random.Random(f"data-mix-{cfg.seed}-kinds").shuffle(kinds)
    rng = random.Random(f"data-mix-{cfg.seed}-finetune")
    records = []
    for i, kind in enumerate(kinds):
        image, rendered, answers = draw_sample(rng, cfg, heldout=False)
        name = f"mix-{i:05d}.png"
        image.save(os.path.join(paths["image_folder"], name), format="PNG")
        records.append(_record(name, rendered, kind, answers[kind], f"mix-{i:05d}", rng.random() < 0.5))
    from llava_dsl.checkpointing.atomic import atomic_write_text

    atomic_write_text(paths["finetune"], json.dumps(records, indent=1))
    rng = random.Random(f"data-mix-{cfg.seed}-eval")
    entries = []
    for i in range(cfg.num_eval):
        image, rendered, _ = draw_sample(rng, cfg, heldout=True)
        image_id = f"mix{cfg.seed:04x}{i:010x}"
        image.save(os.path.join(paths["textvqa_dir"], "train_images", f"{image_id}.jpg"), format="JPEG", quality=95)
        entries.append((image_id, rendered.text, "number" if rendered.text.isdigit() else "word"))
    write_textvqa_annotations(paths["textvqa_dir"], entries, cfg.seed, cfg.image_size)
    atomic_write_text(paths["marker"], json.dumps({"params": params, "counts": counts,
                                                   "num_eval": cfg.num_eval}, indent=1))
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    defaults = MixConfig()
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.assets.data_mix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    for name in ("seed", "image_size", "num_finetune", "num_eval", "min_chars", "max_chars"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--read-fraction", type=float, default=defaults.read_fraction,
                        help="share of the training questions that ask to read the text (default 0.2)")
    parser.add_argument("--other-kinds", default=",".join(OTHER_KINDS),
                        help=f"comma-separated question kinds besides reading (default all: {','.join(OTHER_KINDS)})")
    parser.add_argument("--confusable", action="store_true", help="strings mix digits with O, l, I, S, B")
    args = parser.parse_args(argv)
    cfg = MixConfig(seed=args.seed, image_size=args.image_size, num_finetune=args.num_finetune,
                    num_eval=args.num_eval, read_fraction=args.read_fraction,
                    other_kinds=tuple(k for k in args.other_kinds.split(",") if k), confusable=args.confusable,
                    min_chars=args.min_chars, max_chars=args.max_chars)
    try:
        paths = build(args.out, cfg)
    except ValueError as error:
        raise SystemExit(f"llava_dsl.assets.data_mix: {error}") from None
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
