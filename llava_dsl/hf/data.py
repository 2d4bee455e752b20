"""LLaVA-format data for stock Hugging Face training: a json list of
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}`` and
an image folder, turned into chat messages and a collator that trains on the assistant turns only."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence


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
    """Processor-based collator: the processor's chat template and image processing; labels only on the assistant
    turns, never on padding or image tokens, right under either ``tokenizer.padding_side``.

    The batch goes through the processor once (the image processor runs once per batch). Each assistant turn's span
    is measured on the sample's own unpadded ids: the chat-template prefixes are tokenized with the tokenizer alone,
    the image placeholder expanded to the run of image tokens the processor produced for that image (so anyres
    LLaVA-NeXT counts come out right), and each prefix must be the start of the processed ids. Then every sample is
    truncated to ``max_length`` (None: no truncation; the start is kept, as TRL does) and padded again on the
    tokenizer's side. A sample whose image would be cut, or whose every answer token would be cut, is refused by id.
    """

    def __init__(self, processor, max_length=None):
        self.processor = processor
        self.max_length = max_length
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)

    def _prefix_ids(self, text, n_image):
        # the processor expands the placeholder in the text to one image token per feature, then tokenizes
        expanded = text.replace(self.image_token, self.image_token * n_image)
        return self.tokenizer(expanded)["input_ids"]

    def _spans(self, sample_id, messages, ids):
        """[(start, end)] of each assistant turn in ``ids`` (the sample's processed ids, unpadded)."""
        apply = self.processor.apply_chat_template
        n_image = sum(1 for t in ids if t == self.image_token_id)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            bounds = []
            for prefix, gen in ((messages[:k], True), (messages[:k + 1], False)):
                part = self._prefix_ids(apply(prefix, tokenize=False, add_generation_prompt=gen), n_image)
                if part != ids[:len(part)]:
                    at = next((i for i, (a, b) in enumerate(zip(part, ids)) if a != b), min(len(part), len(ids)))
                    raise DataError(
                        f"sample id {sample_id!r}, turn {k}: the chat template's text up to this turn tokenizes to "
                        f"{len(part)} tokens that are not a prefix of the sample's {len(ids)} processed tokens "
                        f"(first difference at position {at}); this processor's template is not prefix-stable, so "
                        f"the assistant span cannot be found")
                bounds.append(len(part))
            spans.append(tuple(bounds))
        return spans

    def _truncate(self, sample_id, ids, spans):
        if self.max_length is None or len(ids) <= self.max_length:
            return len(ids)
        m = self.max_length
        image_at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if image_at and image_at[-1] >= m:
            raise DataError(f"sample id {sample_id!r}: its {len(image_at)} image tokens end at position "
                            f"{image_at[-1] + 1} of {len(ids)} tokens, beyond max_length={m}; truncation would cut "
                            f"the image. Raise --max_length")
        if not any(start < m for start, end in spans if end > start):
            raise DataError(f"sample id {sample_id!r}: {len(ids)} tokens, and max_length={m} cuts every assistant "
                            f"token (the first answer starts at position {spans[0][0] if spans else '?'}); it "
                            f"would train on nothing. Raise --max_length")
        return m

    def __call__(self, examples):
        texts, images, all_messages = [], [], []
        for ex in examples:
            try:
                image = Image.open(ex["image"]).convert("RGB")
            except Exception as e:  # noqa: BLE001 - named and re-raised
                raise DataError(f"sample id {ex['id']!r}: cannot read image {ex['image']!r} ({e})") from None
            messages = to_messages(ex["conversations"])
            texts.append(self.processor.apply_chat_template(messages, tokenize=False))
            images.append(image)
            all_messages.append(messages)
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        input_ids = batch["input_ids"]
        if "attention_mask" not in batch:
            raise DataError(f"processor {type(self.processor).__name__} returned no attention_mask: the collator "
                            f"needs it to find each sample's tokens under padding")
        keep = batch["attention_mask"].bool()
        # every per-token tensor (attention_mask, Qwen3-VL's mm_token_type_ids, ...) is cut and padded alike
        per_token = [k for k, v in batch.items() if torch.is_tensor(v) and v.shape == input_ids.shape]
        rows, labels = [], []
        for i, (ex, messages) in enumerate(zip(examples, all_messages)):
            ids = input_ids[i][keep[i]].tolist()
            spans = self._spans(ex["id"], messages, ids)
            n = self._truncate(ex["id"], ids, spans)
            row = {k: batch[k][i][keep[i]][:n] for k in per_token}
            label = torch.full((n,), -100, dtype=input_ids.dtype)
            for start, end in spans:
                label[start:end] = row["input_ids"][start:end]
            rows.append(row)
            labels.append(label)
        side = self.tokenizer.padding_side
        for k in per_token:
            fill = self.tokenizer.pad_token_id if k == "input_ids" else 0
            batch[k] = pad_sequence([r[k] for r in rows], batch_first=True, padding_value=fill, padding_side=side)
        labels = pad_sequence(labels, batch_first=True, padding_value=-100, padding_side=side)
        labels[batch["input_ids"] == self.image_token_id] = -100
        batch["labels"] = labels
        return batch
