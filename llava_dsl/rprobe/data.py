"""R-Probe data: LLaVA's json + image folder, each image processed exactly as the model sees it, and the
deterministic, rank-aware batch order."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from llava_dsl.rprobe.checkpoint import CheckpointError


def batch_indices(num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
                  ) -> Iterator[List[int]]:
    """Endless batches: epochs of seeded permutations laid end to end; step t uses the t-th global batch
    (``batch_size * world_size`` items) and this rank its slice. Same seed -> same order for every checkpoint."""
    if num_items < 1:
        raise ValueError("no items to draw batches from")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    stream: List[int] = []
    epoch = 0
    global_batch = batch_size * world_size
    while True:
        while len(stream) < global_batch:
            generator = torch.Generator().manual_seed(seed + epoch)
            stream.extend(torch.randperm(num_items, generator=generator).tolist())
            epoch += 1
        batch, stream = stream[:global_batch], stream[global_batch:]
        yield batch[rank * batch_size:(rank + 1) * batch_size]


class ProbeDataError(ValueError):
    """Probe data that cannot be used (missing/unreadable image, malformed entry)."""


def _entry_name(entry: Dict, index: int, data_path: str) -> str:
    return f"entry {index} (id {entry.get('id')!r}) of {data_path}"


def _first_answer(entry: Dict) -> str:
    for turn in entry.get("conversations") or []:
        if turn.get("from") == "gpt":
            return str(turn.get("value", ""))
    return ""


class ProbeImageSet(torch.utils.data.Dataset):
    """Images of a LLaVA json (entries without an image are counted, not used).

    Whole-image mode: ``pixels`` [3, S, S]. Conditional mode adds the target crop ``target`` [3, S, S]
    (box from the entry's ``rprobe_crop`` [x0, y0, x1, y1] in original pixels, else a centred box of
    ``crop_fraction`` of each side) and ``text_ids`` (the entry's ``rprobe_text``, else its first answer).
    """

    def __init__(self, data_path: str, image_folder: str, processor, model_config, tokenizer=None,
                 conditional: bool = False, use_text: bool = True, max_text_tokens: int = 64,
                 crop_fraction: float = 0.5, entries: Optional[List[Tuple[int, Dict]]] = None,
                 cache: bool = False):
        self.cache: Optional[Dict[int, Dict[str, torch.Tensor]]] = {} if cache else None
        self.data_path, self.image_folder = data_path, image_folder
        self.processor, self.model_config, self.tokenizer = processor, model_config, tokenizer
        self.conditional, self.use_text = conditional, use_text
        self.max_text_tokens, self.crop_fraction = max_text_tokens, crop_fraction
        aspect = getattr(model_config, "image_aspect_ratio", None)
        if aspect == "anyres":
            raise CheckpointError("image_aspect_ratio='anyres' tiles an image into several grids; the probe maps "
                                  "tokens onto one grid (use a 'pad' or 'square' checkpoint)")
        if conditional and use_text and tokenizer is None:
            raise ValueError("the conditional variant with text needs the checkpoint's tokenizer")
        if entries is None:
            entries = list(enumerate(read_entries(data_path)))
        self.skipped_without_image = sum(1 for _, e in entries if "image" not in e)
        self.items = [(i, e) for i, e in entries if "image" in e]
        if not self.items:
            raise ProbeDataError(f"{data_path}: no entry has an 'image' field")
        missing = []
        for index, entry in self.items:
            if not isinstance(entry["image"], str):
                raise ProbeDataError(f"{_entry_name(entry, index, data_path)}: 'image' is "
                                     f"{type(entry['image']).__name__}, expected one file name")
            path = os.path.join(image_folder, entry["image"])
            if not os.path.isfile(path):
                missing.append(f"{path} ({_entry_name(entry, index, data_path)})")
        if missing:
            raise ProbeDataError(f"{len(missing)} image(s) not found under --image-folder={image_folder}: "
                                 + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, index: int, entry: Dict):
        from PIL import Image

        path = os.path.join(self.image_folder, entry["image"])
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:
            raise ProbeDataError(f"{path} ({_entry_name(entry, index, self.data_path)}): cannot be read as an "
                                 f"image ({error})") from error

    def _process(self, image) -> torch.Tensor:
        from llava.mm_utils import process_images

        return process_images([image], self.processor, self.model_config)[0].float()

    def crop_box(self, index: int, entry: Dict, size: Tuple[int, int]) -> Tuple[int, int, int, int]:
        width, height = size
        box = entry.get("rprobe_crop")
        if box is None:
            cw, ch = max(1, round(width * self.crop_fraction)), max(1, round(height * self.crop_fraction))
            x0, y0 = (width - cw) // 2, (height - ch) // 2
            return x0, y0, x0 + cw, y0 + ch
        ok = (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box))
        if not ok or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise ProbeDataError(f"{_entry_name(entry, index, self.data_path)}: rprobe_crop={box!r}; expected "
                                 f"[x0, y0, x1, y1] with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
        return tuple(int(round(v)) for v in box)  # type: ignore[return-value]

    def text_of(self, entry: Dict) -> str:
        return str(entry["rprobe_text"]) if "rprobe_text" in entry else _first_answer(entry)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        index, entry = self.items[i]
        image = self._open(index, entry)
        item = {"pixels": self._process(image), "index": torch.tensor(index)}
        if self.conditional:
            item["target"] = self._process(image.crop(self.crop_box(index, entry, image.size)))
            ids: List[int] = []
            if self.use_text:
                ids = self.tokenizer(self.text_of(entry), add_special_tokens=False).input_ids[: self.max_text_tokens]
            item["text_ids"] = torch.tensor(ids, dtype=torch.long)
        if self.cache is not None:
            self.cache[i] = item
        return item

    def subset(self, count: Optional[int]) -> "ProbeImageSet":
        if count is None or count >= len(self.items):
            return self
        clone = object.__new__(ProbeImageSet)
        clone.__dict__.update(self.__dict__)
        clone.items = self.items[:count]
        return clone


def read_entries(data_path: str) -> List[Dict]:
    try:
        with open(data_path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise ProbeDataError(f"--data-path={data_path}: no such file") from None
    except ValueError as error:
        raise ProbeDataError(f"{data_path}: not valid json ({error})") from error
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProbeDataError(f"{data_path}: expected a json list of LLaVA entries (objects)")
    return entries


def collate(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    batch = {"pixels": torch.stack([x["pixels"] for x in items]), "index": torch.stack([x["index"] for x in items])}
    if "target" in items[0]:
        batch["target"] = torch.stack([x["target"] for x in items])
        lengths = torch.tensor([len(x["text_ids"]) for x in items], dtype=torch.long)
        ids = torch.zeros(len(items), int(lengths.max()) if len(items) else 0, dtype=torch.long)
        for k, x in enumerate(items):
            ids[k, : len(x["text_ids"])] = x["text_ids"]
        batch["text_ids"], batch["text_lengths"] = ids, lengths
    return batch
