"""LLaVA-format data for stock Hugging Face training: a json list of
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}`` and
an image folder, turned into chat messages and a collator that trains on the assistant turns only."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from PIL import Image


class DataError(ValueError):
    """Bad data: names the record (by id and position), the value, the expectation and the file."""


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def load_llava_json(data_path: str, image_folder: str) -> List[Dict]:
    """Read and check every record up front (the image files included); return plain dicts."""
    if not os.path.isfile(data_path):
        raise DataError(f"--data_path={data_path!r}: no such file (expected a LLaVA-format json list)")
    if not os.path.isdir(image_folder):
        raise DataError(f"--image_folder={image_folder!r}: no such folder (the images of {data_path})")
    try:
        with open(data_path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"--data_path={data_path!r}: not valid json ({e})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"--data_path={data_path!r}: expected a non-empty json list of records, got "
                        f"{type(records).__name__}{'' if records else ' (empty)'}")
    out = []
    for i, rec in enumerate(records):
        where = f"{data_path}, record {i} (id {rec.get('id', '?') if isinstance(rec, dict) else '?'!r})"
        if not isinstance(rec, dict) or "conversations" not in rec or "image" not in rec:
            raise DataError(f"{where}: expected a dict with 'id', 'image' and 'conversations'")
        conv = rec["conversations"]
        if not isinstance(conv, list) or len(conv) < 2:
            raise DataError(f"{where}: 'conversations' must be a list of at least two turns, got {conv!r:.200}")
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}, turn {j}: expected {{'from': 'human'|'gpt', 'value': str}}, got "
                                f"{turn!r:.200}")
            expected = "user" if j % 2 == 0 else "assistant"
            if ROLES[turn["from"]] != expected:
                raise DataError(f"{where}, turn {j}: 'from'={turn['from']!r}, expected "
                                f"{'human' if expected == 'user' else 'gpt'} (turns alternate, human first)")
        n_image = sum(t["value"].count("<image>") for t in conv)
        if n_image != 1 or "<image>" not in conv[0]["value"]:
            raise DataError(f"{where}: expected exactly one '<image>' placeholder, in the first human turn; found "
                            f"{n_image}")
        path = os.path.join(image_folder, rec["image"])
        if not os.path.isfile(path):
            raise DataError(f"{where}: image {rec['image']!r} not found in --image_folder={image_folder!r}")
        out.append({"id": str(rec.get("id", i)), "image": path, "conversations": conv})
    return out


def to_messages(conversations) -> List[Dict]:
    messages = []
    for j, turn in enumerate(conversations):
        role = ROLES[turn["from"]]
        text = turn["value"]
        if role == "user" and "<image>" in text:
            text = text.replace("<image>", "").strip()
            content = [{"type": "image"}, {"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


class LlavaChatCollator:
    """Processor-based collator: the processor's chat template and image processing; labels only on assistant turns
    (each turn's span found from the tokenized prefix lengths), padding and image tokens masked."""

    def __init__(self, processor, max_length=None):
        self.processor = processor
        self.max_length = max_length

    def _len(self, text, image):
        return len(self.processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0])

    def __call__(self, examples):
        texts, images, spans = [], [], []
        for ex in examples:
            try:
                image = Image.open(ex["image"]).convert("RGB")
            except Exception as e:  # noqa: BLE001 - named and re-raised
                raise DataError(f"sample id {ex['id']!r}: cannot read image {ex['image']!r} ({e})") from None
            messages = to_messages(ex["conversations"])
            apply = self.processor.apply_chat_template
            texts.append(apply(messages, tokenize=False))
            images.append(image)
            span = []
            for k, m in enumerate(messages):
                if m["role"] == "assistant":
                    start = self._len(apply(messages[:k], tokenize=False, add_generation_prompt=True), image)
                    end = self._len(apply(messages[:k + 1], tokenize=False), image)
                    span.append((start, end))
            spans.append(span)
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = torch.full_like(batch["input_ids"], -100)
        for i, span in enumerate(spans):
            for start, end in span:
                labels[i, start:end] = batch["input_ids"][i, start:end]
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch
