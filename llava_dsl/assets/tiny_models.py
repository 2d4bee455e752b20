"""Tiny, random, fully local assets for exercising the LLaVA-1.5 training stack.

Everything here is built from configs on the local machine: a sentencepiece BPE
tokenizer trained on a generated English corpus, a randomly initialised Llama
language model, a randomly initialised CLIP vision tower with its image
processor, and a small image/text data set rendered with Pillow in the two
LLaVA json formats (``--version plain`` pretraining and ``--version v1``
instruction tuning).

The assets are laid out the way ``llava.train.train`` and
``llava.model.builder.load_pretrained_model`` expect real checkpoints:

    out_dir/
        tokenizer/        LlamaTokenizer (slow, legacy=False)
        llm/              LlamaForCausalLM + tokenizer files
        clip-vit-tiny/    CLIPVisionModel + CLIPImageProcessor
        data/images/*.png
        data/pretrain.json
        data/finetune.json
        ASSETS_OK         build parameters, written last

This module deliberately does not import ``llava``.

Usage::

    python -m llava_dsl.assets.tiny_models --out DIR [--seed N] [--num-samples N]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tempfile
from typing import List

from llava_dsl.assets.ocr_data import TEXT_QUESTIONS, WORDS, RenderStyle, render

# Bump when the content produced for a given set of parameters changes, so
# that build_all() does not reuse assets written by an older version.
ASSETS_FORMAT_VERSION = 1

MARKER_NAME = "ASSETS_OK"

# Same values as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]

CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# System prompt of LLaVA's vicuna_v1 conversation template. It is part of the
# tokenizer corpus so that the prompt compresses well with a small vocabulary
# and whole v1 conversations stay far below a model_max_length of 128.
_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_WORDS = """
the a an and or but of to in on at by for with from up down over under into out
is are was were be been has have had do does did can will would should could may
it this that these those there here what which who whom whose where when why how
i you he she we they me him her us them my your his its our their mine yours
cat dog bird fish cow horse sheep goat mouse rabbit fox bear lion tiger wolf duck
red blue green yellow black white orange purple pink brown gray gold silver
one two three four five six seven eight nine ten zero hundred thousand number
apple bread cake milk tea coffee water juice rice soup salt sugar egg cheese
house door window room table chair bed lamp wall floor roof garden street city
car bus train boat plane bike road bridge park river lake sea hill tree flower
sun moon star sky rain snow wind cloud storm light dark day night morning evening
book page word letter text sign note card map picture image photo paper pen
big small tall short long new old young hot cold warm cool fast slow happy sad
good bad nice kind bright clear simple quick easy hard soft loud quiet open close
go come see look read write say tell ask answer show give take make find keep
run walk jump sit stand sleep eat drink play sing draw paint build move stop
user assistant chat question questions answers helpful detailed polite curious
artificial intelligence gives between written shown contains printed visible
yes no not maybe please thanks hello goodbye sorry okay sure right left
""".split()

_QUESTIONS_NUMBER = ["Is it a number?", "Is the text a number?", "Does the image show a number?",
                     "Is this a number or a word?"]


def _random_number(rng: random.Random) -> str:
    n_digits = rng.choice([1, 2, 2, 3, 3, 4])
    if n_digits == 1:
        return str(rng.randint(0, 9))
    return str(rng.randint(10 ** (n_digits - 1), 10 ** n_digits - 1))


def _random_sentence(rng: random.Random, min_words: int = 3, max_words: int = 12) -> str:
    words = []
    for _ in range(rng.randint(min_words, max_words)):
        if rng.random() < 0.1:
            words.append(_random_number(rng))
        else:
            words.append(rng.choice(_WORDS))
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        # A comma somewhere in the middle.
        parts = text.split(" ")
        if len(parts) > 3:
            k = rng.randint(1, len(parts) - 2)
            parts[k] = parts[k] + ","
            text = " ".join(parts)
    return text + rng.choice([".", ".", ".", "?", "!"])


def build_corpus(seed: int, num_lines: int = 4000) -> List[str]:
    """Generated English corpus: plain sentences, numbers and chat turns."""
    rng = random.Random(seed)
    lines: List[str] = []
    for i in range(num_lines):
        kind = i % 8
        if kind == 0:
            lines.append(_V1_SYSTEM)
        elif kind in (1, 2):
            question = rng.choice(list(TEXT_QUESTIONS) + _QUESTIONS_NUMBER)
            answer = rng.choice([rng.choice(WORDS), _random_number(rng),
                                 "Yes.", "No.", _random_sentence(rng, 2, 6)])
            lines.append(f"USER: {question} ASSISTANT: {answer}")
        elif kind == 3:
            numbers = " ".join(_random_number(rng) for _ in range(rng.randint(1, 6)))
            lines.append(f"The numbers are {numbers}.")
        elif kind == 4:
            lines.append(f"USER: {_random_sentence(rng)} ASSISTANT: {_random_sentence(rng)}")
        else:
            lines.append(_random_sentence(rng))
    return lines


def build_tokenizer(out_dir: str, vocab_size: int = 512, seed: int = 0) -> str:
    """Train a small Llama-style sentencepiece BPE tokenizer and save it.

    Piece ids follow Llama: ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece.
    Byte fallback keeps every string encodable without ``<unk>`` (which LLaVA
    uses as its pad token, so a real ``<unk>`` in a prompt would shorten the
    counted length). ``USER`` is a user-defined symbol, i.e. always a single
    piece, which is what LLaVA's v1 target masking assumes for a non-legacy
    tokenizer (see ``preprocess_v1``: ``round_len -= 1`` for later rounds).
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    corpus = build_corpus(seed)
    # Train from memory and write through model_writer: the trainer spec stored
    # in the model then holds no temporary paths, so the file is byte-identical
    # for a given seed.
    model_buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model_buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, user_defined_symbols=["USER"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # Llama's normalisation settings: keep text as is.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    with tempfile.TemporaryDirectory(prefix="tiny_spm_") as tmp:
        model_path = os.path.join(tmp, "tokenizer.model")
        with open(model_path, "wb") as f:
            f.write(model_buf.getvalue())
        tokenizer = LlamaTokenizer(vocab_file=model_path, legacy=False)
        tokenizer.model_max_length = 2048
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _load_tokenizer(tokenizer_dir: str):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(tokenizer_dir, legacy=False)


def build_language_model(out_dir: str, tokenizer_dir: str, hidden_size: int = 64,
                         intermediate_size: int = 128, num_layers: int = 2,
                         num_heads: int = 4, seed: int = 0) -> str:
    """Randomly initialised LlamaForCausalLM saved together with its tokenizer.

    ``pad_token_id`` is the tokenizer's pad id, or its unk id when it has none:
    that is the token LLaVA pads with for every conversation version except v0.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_tokenizer(tokenizer_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id, tie_word_embeddings=False, torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_vision_tower(out_dir: str, image_size: int = 32, patch_size: int = 8,
                       hidden_size: int = 32, intermediate_size: int = 64,
                       num_layers: int = 8, num_heads: int = 4, seed: int = 0) -> str:
    """Randomly initialised CLIP vision encoder plus a matching CLIPImageProcessor."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, projection_dim=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_channels=3, image_size=image_size,
        patch_size=patch_size, torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    save_image_processor(out_dir, image_size)
    return out_dir


def save_image_processor(out_dir: str, image_size: int) -> None:
    """The CLIPImageProcessor of a tiny tower (CLIP's resize, crop and normalisation at ``image_size``)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size},
        resample=3,  # PIL.Image.BICUBIC, as in openai/clip-vit-large-patch14-336
        do_center_crop=True, crop_size={"height": image_size, "width": image_size}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True)
    processor.save_pretrained(out_dir)


def _sample_text(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return str(rng.randint(0, 999)) if rng.random() < 0.8 else str(rng.randint(0, 9))
    return rng.choice(WORDS)


def is_number(text: str) -> bool:
    return text.isdigit()


def render_text_images(out_dir: str, num_samples: int, seed: int = 0,
                       image_size: int = 32) -> List[dict]:
    """Render ``num_samples`` small RGB PNGs, each showing a short word or number, with the package's one text
    renderer (``llava_dsl.assets.ocr_data.render``) in ``TINY_STYLE``.

    Font size, colours and position vary per image; everything is derived from ``seed``. Files go to
    ``out_dir/images``. Returns ``[{"id": ..., "image": "<file name relative to out_dir/images>", "text": ...}]``.
    """
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = random.Random(f"tiny-images-{seed}")
    records: List[dict] = []
    for i in range(num_samples):
        text = _sample_text(rng)
        image, _ = render(text, "number" if is_number(text) else "word", image_size, rng, _tiny_style())
        sample_id = f"tiny-{seed}-{i:05d}"
        file_name = f"{sample_id}.png"
        image.save(os.path.join(image_dir, file_name), format="PNG")
        records.append({"id": sample_id, "image": file_name, "text": text})
    return records


def _tiny_style():
    """Plain backgrounds, large fonts for the 32 px images of the test data sets, either polarity."""
    return RenderStyle(font_fractions=(0.25, 0.35, 0.5), backgrounds=("solid",), stroke_probability=0.0)


def write_llava_datasets(out_dir: str, num_samples: int = 16, seed: int = 0,
                         image_size: int = 32) -> dict:
    """Render the images and write LLaVA's pretrain.json and finetune.json."""
    os.makedirs(out_dir, exist_ok=True)
    records = render_text_images(out_dir, num_samples, seed=seed, image_size=image_size)
    rng = random.Random(f"tiny-questions-{seed}")

    pretrain, finetune = [], []
    for rec in records:
        pretrain.append({"id": rec["id"], "image": rec["image"], "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": rec["text"]}]})
        finetune.append({"id": rec["id"], "image": rec["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(TEXT_QUESTIONS)},
            {"from": "gpt", "value": rec["text"]},
            {"from": "human", "value": rng.choice(_QUESTIONS_NUMBER)},
            {"from": "gpt", "value": "Yes." if is_number(rec["text"]) else "No."}]})

    pretrain_path = os.path.join(out_dir, "pretrain.json")
    finetune_path = os.path.join(out_dir, "finetune.json")
    with open(pretrain_path, "w", encoding="utf-8") as f:
        json.dump(pretrain, f, indent=1)
    with open(finetune_path, "w", encoding="utf-8") as f:
        json.dump(finetune, f, indent=1)
    return {"image_folder": os.path.join(out_dir, "images"), "pretrain": pretrain_path, "finetune": finetune_path}


def build_all(out_dir: str, seed: int = 0, num_samples: int = 16, vision_layers: int = 8) -> dict:
    """Build tokenizer, language model, vision tower and data under ``out_dir``.

    Returns ``{"llm", "vision_tower", "image_folder", "pretrain", "finetune"}``
    (absolute paths). When ``out_dir/ASSETS_OK`` records the same parameters
    and the files are present, the existing assets are reused.
    """
    out_dir = os.path.abspath(out_dir)
    data_dir = os.path.join(out_dir, "data")
    paths = {"llm": os.path.join(out_dir, "llm"), "vision_tower": os.path.join(out_dir, "clip-vit-tiny"),
             "image_folder": os.path.join(data_dir, "images"), "pretrain": os.path.join(data_dir, "pretrain.json"),
             "finetune": os.path.join(data_dir, "finetune.json")}
    params = {"format_version": ASSETS_FORMAT_VERSION, "seed": seed, "num_samples": num_samples,
              "vision_layers": vision_layers}
    marker = os.path.join(out_dir, MARKER_NAME)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded == params and all(os.path.exists(p) for p in paths.values()):
            return paths
        os.remove(marker)

    os.makedirs(out_dir, exist_ok=True)
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    for d in (tokenizer_dir, paths["llm"], paths["vision_tower"], data_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)

    build_tokenizer(tokenizer_dir, seed=seed)
    build_language_model(paths["llm"], tokenizer_dir, seed=seed)
    build_vision_tower(paths["vision_tower"], num_layers=vision_layers, seed=seed)
    write_llava_datasets(data_dir, num_samples=num_samples, seed=seed)

    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=1)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build tiny local LLaVA assets.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--vision-layers", type=int, default=8)
    args = parser.parse_args(argv)
    paths = build_all(args.out, seed=args.seed, num_samples=args.num_samples,
                      vision_layers=args.vision_layers)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
