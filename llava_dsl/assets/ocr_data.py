"""The built-in synthetic OCR data set: rendered words, numbers and short phrases in LLaVA's formats.

    python -m llava_dsl.assets.ocr_data --out DIR [--seed 0] [--image-size 64] [--num-pretrain 2000] ...
    python playground/data/make_ocr_demo.py          (the same, writing playground/data/ocr_demo/)

Every image shows one text (a word, a number of 1-4 digits, or a two-word phrase) drawn with the TrueType
font that ships inside Pillow (``ImageFont.load_default(size=...)``, no system font) at several sizes, with
or without a bold stroke, in a colour that contrasts with one of four backgrounds (solid, gradient, stripes,
speckle), at a random position. Everything follows from ``--seed``: the same seed gives the same files.

Layout, the way LLaVA's scripts and ``eval_scripts/`` expect it::

    DIR/
        images/                          training images (PNG)
        pretrain.json                    stage 1, caption style ("the number 42"), for --version plain
        finetune.json                    stage 2, OCR questions ("What is written in the image?"), --version v1
        heldout/images/, heldout.json    held-out images in LLaVA's json (R-Probe --eval-data-path)
        eval/textvqa/                    TextVQA_0.5.1_val.json, llava_textvqa_val_v051_ocr.jsonl, train_images/
        eval/ocrbench/                   OCRBench.json, OCRBench_Images/
        OCR_DATA.json                    the parameters and counts, written last

With ``--content digits`` the images show digit strings of ``--min-digits``..``--max-digits`` digits instead
(the built-in demo's data): the training splits never contain a held-out string (one in ``HELDOUT_SHARE`` by a
stable hash) or a held-out font size (``HELDOUT_FONT_SIZES``, between the ``TRAIN_FONT_SIZES``); the held-out
and eval splits contain nothing else. ``render`` is the package's one text renderer; the tower pretraining in
``llava_dsl.assets.pretrained`` draws its images with it too.

Every record also carries the text's bounding box (``rprobe_crop``, for R-Probe's conditional variant).
This module imports neither ``llava`` nor, until it writes files, torch.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

# Bump when the files written for the same parameters change, so that an old folder is rebuilt.
FORMAT_VERSION = 1

MARKER = "OCR_DATA.json"

# Short words that fit a tiny canvas. They and the questions are part of the tiny tokenizer's corpus
# (llava_dsl.assets.tiny_models), so they are few pieces each.
WORDS = tuple("""
cat dog sun moon red blue map key box cup hat pen sky tree fish bird cake milk
tea egg car bus boat star rain snow wind book door lamp rose gold ink owl fox
bee ant cow pig hen yes no hi go up top mix jam zoo art fun sea ice fig oak
""".split())

TEXT_QUESTIONS = ("What is written in the image?", "What does the text in the image say?",
                  "Read the text in the image.", "What word or number is shown in the image?",
                  "Which text is written in this picture?")

NUMBER_QUESTIONS = ("What number is shown?", "What number is shown in the image?",
                    "Which number is written in the image?")

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix

KINDS = (("word", 0.45), ("number", 0.35), ("phrase", 0.20))

BACKGROUNDS = ("solid", "gradient", "stripes", "speckle")

# OCRBench's recognition categories that fit each kind (the scorer counts points per category).
OCRBENCH_TYPES = {"word": ("ocr_demo_words", "Regular Text Recognition"),
                  "number": ("ocr_demo_numbers", "Digit String Recognition"),
                  "phrase": ("ocr_demo_phrases", "Non-Semantic Text Recognition")}

OCRBENCH_QUESTIONS = {"word": "what is written in the image?", "number": "what is the number in the image?",
                      "phrase": "what is written in the image?"}

TEXTVQA_QUESTIONS = {"word": "what is written in the image?", "number": "what number is shown?",
                     "phrase": "what is written in the image?"}


# Digit strings (content="digits"): font sizes in pixels, one set for training and one between them held out.
TRAIN_FONT_SIZES = (10, 12, 14, 16, 18, 20)

HELDOUT_FONT_SIZES = (11, 13, 15, 17, 19)

HELDOUT_SHARE = 5  # one digit string in HELDOUT_SHARE (by a stable hash) is held out


@dataclass(frozen=True)
class RenderStyle:
    """How ``render`` draws: font sizes (explicit pixel sizes, else ``font_fractions`` of the image side),
    backgrounds and the chance of a bold stroke. The default is the mixed data set's style."""
    font_sizes: Tuple[int, ...] = ()
    font_fractions: Tuple[float, ...] = (0.18, 0.24, 0.30, 0.38)
    backgrounds: Tuple[str, ...] = BACKGROUNDS
    stroke_probability: float = 0.25
    dark_text: bool = False  # True: the text is always darker than its background (one polarity)


DEFAULT_STYLE = RenderStyle()


@dataclass(frozen=True)
class OcrDataConfig:
    seed: int = 0
    image_size: int = 64
    num_pretrain: int = 2000
    num_finetune: int = 2000
    num_heldout: int = 64
    num_textvqa: int = 60
    num_ocrbench: int = 60
    # "mixed": words, numbers of 1-4 digits and two-word phrases. "digits": digit strings of min_digits to
    # max_digits digits; the training splits (pretrain, finetune) then never contain a held-out string
    # (``is_heldout_text``) or a held-out font size, and the held-out splits (heldout, textvqa, ocrbench)
    # contain nothing else.
    content: str = "mixed"
    min_digits: int = 2
    max_digits: int = 5


@dataclass
class Rendered:
    text: str
    kind: str
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 of the drawn text, pixels
    style: Dict[str, object]
    # the centre (x, y) of each character, pixels: where a per-patch glyph target goes
    centres: Tuple[Tuple[float, float], ...] = field(default=())


def is_heldout_text(text: str) -> bool:
    """Whether a digit string belongs to the held-out strings: a stable hash, the same on every machine."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % HELDOUT_SHARE == 0


def sample_digits(rng: random.Random, min_digits: int, max_digits: int, heldout: Optional[bool] = None) -> str:
    """A digit string of ``min_digits``..``max_digits`` digits (leading zeros allowed), drawn until it is on
    the asked side of the held-out split (``heldout=None``: either side)."""
    while True:
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
        if heldout is None or is_heldout_text(text) == heldout:
            return text


# The digit-string data's look: dark text on a solid or gradient background of any colour, no bold stroke.
DIGIT_BACKGROUNDS = ("solid", "gradient")


def digit_style(heldout: bool) -> RenderStyle:
    """The style of the digit-string data: training or held-out font sizes, one polarity (dark text), plain
    backgrounds. The tiny tower learns this within the demo's budget; the mixed set's stripes, speckle and light
    text on dark slow its pretraining several-fold."""
    return RenderStyle(font_sizes=HELDOUT_FONT_SIZES if heldout else TRAIN_FONT_SIZES, backgrounds=DIGIT_BACKGROUNDS,
                       stroke_probability=0.0, dark_text=True)


@functools.lru_cache(maxsize=64)
def _font(size: int):
    from PIL import ImageFont, features

    if not features.check("freetype2"):
        raise RuntimeError("this Pillow build has no FreeType support, so its bundled TrueType font cannot be "
                           "drawn at different sizes; install a Pillow wheel from PyPI (they include FreeType)")
    return ImageFont.load_default(size=size)


def _luminance(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _colours(rng: random.Random, dark_text: bool = False
             ) -> Tuple[Tuple[int, int, int], Tuple[int, int, int], Tuple[int, int, int]]:
    """Background, second background tone (close to the first) and a text colour that contrasts with both
    (and is darker than both with ``dark_text``)."""
    while True:
        bg = tuple(rng.randint(0, 255) for _ in range(3))
        bg2 = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in bg)
        fg = tuple(rng.randint(0, 255) for _ in range(3))
        if dark_text and _luminance(fg) > min(_luminance(bg), _luminance(bg2)):
            continue
        if min(abs(_luminance(fg) - _luminance(bg)), abs(_luminance(fg) - _luminance(bg2))) >= 110:
            return bg, bg2, fg  # type: ignore[return-value]


def _background(kind: str, size: int, bg, bg2, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    if kind == "gradient":
        mask = Image.linear_gradient("L").resize((size, size))
        if rng.random() < 0.5:
            mask = mask.transpose(Image.Transpose.ROTATE_90)
        image = Image.composite(Image.new("RGB", (size, size), bg2), image, mask)
    elif kind == "stripes":
        width = rng.randint(2, max(2, size // 8))
        vertical = rng.random() < 0.5
        for start in range(0, size, 2 * width):
            box = [start, 0, start + width - 1, size] if vertical else [0, start, size, start + width - 1]
            draw.rectangle(box, fill=bg2)
    elif kind == "speckle":
        # Python's RNG, not Image.effect_noise: Pillow's noise is not seeded, the data must be.
        for _ in range(size * size // 6):
            draw.point((rng.randrange(size), rng.randrange(size)), fill=bg2)
    return image


def _sample_text(rng: random.Random) -> Tuple[str, str]:
    roll, kind = rng.random(), KINDS[-1][0]
    for name, share in KINDS:
        if roll < share:
            kind = name
            break
        roll -= share
    if kind == "number":
        digits = rng.choice((1, 2, 2, 3, 3, 4))
        return (str(rng.randint(0, 9)) if digits == 1 else str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))), kind
    if kind == "phrase":
        first, second = rng.sample(WORDS, 2)
        return f"{first} {second}", kind
    return rng.choice(WORDS), kind


def render(text: str, kind: str, size: int, rng: random.Random, style: RenderStyle = DEFAULT_STYLE):
    """One image of ``text``; returns (PIL image, Rendered). The package's one text renderer.

    The font size is drawn from the style; when the text does not fit it steps down to the next smaller size
    of the style (explicit ``font_sizes``), or by one pixel (``font_fractions``), until it fits."""
    from PIL import ImageDraw

    bg, bg2, fg = _colours(rng, style.dark_text)
    background = rng.choice(style.backgrounds)
    image = _background(background, size, bg, bg2, rng)
    draw = ImageDraw.Draw(image)
    margin = max(1, size // 16)
    if style.font_sizes:
        sizes = sorted(style.font_sizes)
        font_size = rng.choice(sizes)
    else:
        sizes = []
        font_size = rng.choice([max(7, round(size * f)) for f in style.font_fractions])
    stroke = 1 if rng.random() < style.stroke_probability and font_size >= 14 else 0  # bold: an outline
    while True:
        font = _font(font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        w, h = right - left, bottom - top
        if (w <= size - 2 * margin and h <= size - 2 * margin) or font_size <= 6:
            break
        smaller = [s for s in sizes if s < font_size]
        font_size = smaller[-1] if smaller else font_size - 1
    x = margin + rng.randint(0, max(0, size - 2 * margin - w))
    y = margin + rng.randint(0, max(0, size - 2 * margin - h))
    draw.text((x - left, y - top), text, fill=fg, font=font, stroke_width=stroke, stroke_fill=fg)
    box = (x, y, min(size, x + w), min(size, y + h))
    # each character's centre: its advance span along the line, the box's vertical middle
    pen = x - left
    centres = tuple((pen + (font.getlength(text[:k]) + font.getlength(text[:k + 1])) / 2, (y + y + h) / 2)
                    for k in range(len(text)))
    style_record = {"font_size": font_size, "stroke": stroke, "background": background, "fg": list(fg),
                    "bg": list(bg)}
    return image, Rendered(text, kind, box, style_record, centres)


TRAINING_SPLITS = ("pretrain", "finetune")


def render_split(folder: str, prefix: str, count: int, cfg: OcrDataConfig, extension: str = "png"
                 ) -> List[Tuple[str, Rendered]]:
    """``count`` images ``<prefix>-<i>.<extension>`` in ``folder``; their own random stream per split.

    With ``cfg.content == "digits"``, the training splits (``TRAINING_SPLITS``) get training strings and font
    sizes, every other split held-out ones."""
    if cfg.content not in ("mixed", "digits"):
        raise ValueError(f"OcrDataConfig.content={cfg.content!r}: expected 'mixed' or 'digits'")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(f"ocr-data-{cfg.seed}-{prefix}")
    heldout = prefix not in TRAINING_SPLITS
    out = []
    for i in range(count):
        if cfg.content == "digits":
            text, kind = sample_digits(rng, cfg.min_digits, cfg.max_digits, heldout), "number"
            image, rendered = render(text, kind, cfg.image_size, rng, digit_style(heldout))
        else:
            text, kind = _sample_text(rng)
            image, rendered = render(text, kind, cfg.image_size, rng)
        name = f"{prefix}-{i:05d}.{extension}"
        if extension == "jpg":
            image.save(os.path.join(folder, name), format="JPEG", quality=95)
        else:
            image.save(os.path.join(folder, name), format="PNG")
        out.append((name, rendered))
    return out


def caption(rendered: Rendered) -> str:
    noun = {"word": "the word", "number": "the number", "phrase": "the text"}[rendered.kind]
    return f"{noun} {rendered.text}"


def ocr_question(rendered: Rendered, rng: random.Random) -> str:
    pool = NUMBER_QUESTIONS + TEXT_QUESTIONS[:1] if rendered.kind == "number" else TEXT_QUESTIONS
    question = rng.choice(pool)
    return question + SHORT_ANSWER if rng.random() < 0.5 else question


def _record(name: str, rendered: Rendered, human: str, answer: str, sample_id: str) -> dict:
    return {"id": sample_id, "image": name,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
            "rprobe_crop": list(rendered.box), "rprobe_text": rendered.text}


def _write_json(path: str, obj) -> None:
    from llava_dsl.checkpointing.atomic import atomic_write_text  # imports torch: only when writing

    atomic_write_text(path, json.dumps(obj, indent=1))


def write_textvqa(folder: str, cfg: OcrDataConfig) -> int:
    """TextVQA 0.5.1 val annotations + LLaVA's question jsonl + train_images/<image_id>.jpg."""
    rendered = render_split(os.path.join(folder, "train_images"), "textvqa", cfg.num_textvqa, cfg, "jpg")
    entries = []
    for i, (name, r) in enumerate(rendered):
        image_id = f"{cfg.seed:04x}{i:012x}"
        os.replace(os.path.join(folder, "train_images", name), os.path.join(folder, "train_images", f"{image_id}.jpg"))
        entries.append((image_id, r.text, r.kind))
    return write_textvqa_annotations(folder, entries, cfg.seed, cfg.image_size)


def write_textvqa_annotations(folder: str, entries: List[Tuple[str, str, str]], seed: int, image_size: int) -> int:
    """The TextVQA files for images already at ``folder/train_images/<image_id>.jpg``: ``entries`` are
    (image_id, text, kind) with kind one of ``TEXTVQA_QUESTIONS``; every answer is the text."""
    data, lines = [], []
    for i, (image_id, text, kind) in enumerate(entries):
        question = TEXTVQA_QUESTIONS[kind]
        data.append({"question": question, "image_id": image_id, "image_classes": [], "flickr_original_url": "",
                     "flickr_300k_url": "", "image_width": image_size, "image_height": image_size,
                     "answers": [text] * 10, "question_tokens": question.rstrip("?").split(),
                     "question_id": i, "set_name": "val"})
        # LLaVA's llava-ocr protocol adds OCR tokens; here the true text and a distractor, in random order.
        token_rng = random.Random(f"ocr-data-{seed}-ocr-tokens-{i}")
        tokens = list(dict.fromkeys([text, token_rng.choice(WORDS)]))
        token_rng.shuffle(tokens)
        lines.append({"question_id": image_id, "image": f"{image_id}.jpg",
                      "text": f"{question.capitalize()}\nReference OCR token: {', '.join(tokens)}{SHORT_ANSWER}"})
    _write_json(os.path.join(folder, "TextVQA_0.5.1_val.json"),
                {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": 0.5, "data": data})
    from llava_dsl.checkpointing.atomic import atomic_write_text

    atomic_write_text(os.path.join(folder, "llava_textvqa_val_v051_ocr.jsonl"),
                      "".join(json.dumps(line) + "\n" for line in lines))
    return len(data)


def write_ocrbench(folder: str, cfg: OcrDataConfig) -> int:
    """OCRBench.json (OCRBench's own list format) + OCRBench_Images/<dataset>/<i>.png."""
    rendered = render_split(os.path.join(folder, "OCRBench_Images"), "ocrbench", cfg.num_ocrbench, cfg)
    rows = []
    for i, (name, r) in enumerate(rendered):
        dataset, category = OCRBENCH_TYPES[r.kind]
        path = f"{dataset}/{name}"
        os.makedirs(os.path.join(folder, "OCRBench_Images", dataset), exist_ok=True)
        os.replace(os.path.join(folder, "OCRBench_Images", name), os.path.join(folder, "OCRBench_Images", path))
        rows.append({"dataset_name": dataset, "id": i, "image_path": path, "question": OCRBENCH_QUESTIONS[r.kind],
                     "answers": [r.text], "type": category})
    _write_json(os.path.join(folder, "OCRBench.json"), rows)
    return len(rows)


def build(out_dir: str, cfg: OcrDataConfig = OcrDataConfig()) -> Dict[str, str]:
    """Write the data set under ``out_dir`` (reused when ``OCR_DATA.json`` records the same parameters).

    Returns the paths: image_folder, pretrain, finetune, heldout, heldout_images, textvqa_dir, ocrbench_dir.
    """
    out_dir = os.path.abspath(out_dir)
    paths = {"image_folder": os.path.join(out_dir, "images"), "pretrain": os.path.join(out_dir, "pretrain.json"),
             "finetune": os.path.join(out_dir, "finetune.json"), "heldout": os.path.join(out_dir, "heldout.json"),
             "heldout_images": os.path.join(out_dir, "heldout", "images"),
             "textvqa_dir": os.path.join(out_dir, "eval", "textvqa"),
             "ocrbench_dir": os.path.join(out_dir, "eval", "ocrbench")}
    params = {"format_version": FORMAT_VERSION, **asdict(cfg)}
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f)
        if recorded.get("params") == params and all(os.path.exists(p) for p in paths.values()):
            return paths
        os.remove(marker)
    for sub in ("images", "heldout", "eval"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)

    question_rng = random.Random(f"ocr-data-{cfg.seed}-questions")
    pretrain = [_record(name, r, "<image>", caption(r), f"pretrain-{i:05d}")
                for i, (name, r) in enumerate(render_split(paths["image_folder"], "pretrain", cfg.num_pretrain, cfg))]
    finetune = [_record(name, r, "<image>\n" + ocr_question(r, question_rng), r.text, f"finetune-{i:05d}")
                for i, (name, r) in enumerate(render_split(paths["image_folder"], "finetune", cfg.num_finetune, cfg))]
    heldout = [_record(name, r, "<image>\n" + TEXT_QUESTIONS[0], r.text, f"heldout-{i:05d}")
               for i, (name, r) in enumerate(render_split(paths["heldout_images"], "heldout", cfg.num_heldout, cfg))]
    _write_json(paths["pretrain"], pretrain)
    _write_json(paths["finetune"], finetune)
    _write_json(paths["heldout"], heldout)
    counts = {"pretrain": len(pretrain), "finetune": len(finetune), "heldout": len(heldout),
              "textvqa": write_textvqa(paths["textvqa_dir"], cfg),
              "ocrbench": write_ocrbench(paths["ocrbench_dir"], cfg)}
    _write_json(marker, {"params": params, "counts": counts})
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    defaults = OcrDataConfig()
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.assets.ocr_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="square side, pixels")
    for split in ("pretrain", "finetune", "heldout", "textvqa", "ocrbench"):
        parser.add_argument(f"--num-{split}", type=int, default=getattr(defaults, f"num_{split}"))
    parser.add_argument("--content", choices=("mixed", "digits"), default=defaults.content,
                        help="mixed: words, numbers, phrases; digits: digit strings with held-out strings and sizes")
    for bound in ("min", "max"):
        parser.add_argument(f"--{bound}-digits", type=int, default=getattr(defaults, f"{bound}_digits"))
    args = parser.parse_args(argv)
    cfg = OcrDataConfig(**{name: getattr(args, name) for name in asdict(defaults)})  # one flag per field
    if not 1 <= cfg.min_digits <= cfg.max_digits:
        raise SystemExit(f"--min-digits={cfg.min_digits} --max-digits={cfg.max_digits}: expected "
                         f"1 <= min <= max")
    for field_name, value in asdict(cfg).items():
        if field_name.startswith("num_") and value < 1:
            raise SystemExit(f"--{field_name.replace('_', '-')}={value}: expected at least 1")
    if cfg.image_size < 16:
        raise SystemExit(f"--image-size={cfg.image_size}: expected at least 16 pixels")
    print(json.dumps(build(args.out, cfg), indent=1))


if __name__ == "__main__":
    main()
