"""Bad data is named, never silently dropped: records and images that cannot be used fail with the sample id,
the json file and the image (or, with ``--skip_bad_samples True``, are skipped and listed); every sample carries
its id to the trainer, which counts fully masked samples (LLaVA's silent ``tokenization mismatch``) across ranks.
``PATCHES`` lists the three swaps."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import llava.train.train as llava_train
import torch
from llava.constants import DEFAULT_IMAGE_TOKEN

from llava_dsl.compat.distributed import say_once

_UPSTREAM_DATA_ARGUMENTS = llava_train.DataArguments

_UPSTREAM_DATASET = llava_train.LazySupervisedDataset

_UPSTREAM_COLLATOR = llava_train.DataCollatorForSupervisedDataset

DATA_CHECKS_FILE = "data_checks.json"

SKIPPED_FILE = "skipped_samples.jsonl"

EXAMPLES_KEPT = 5  # sample ids quoted in messages; the counts are exact

MAX_CONSECUTIVE_BAD = 32  # with --skip_bad_samples, this many unloadable samples in a row is an error


@dataclass
class SafetyDataArguments:
    """The data flags of this module, as a mixin for LLaVA's DataArguments."""

    skip_bad_samples: bool = field(default=False, metadata={
        "help": "Skip malformed records and missing/unreadable images instead of stopping; each skip is listed "
                "with its reason in OUTPUT_DIR/skipped_samples.jsonl and counted in the logs."})
    max_masked_sample_fraction: float = field(default=0.0, metadata={
        "help": "Stop once more than this fraction of the run's samples had every label masked (LLaVA's "
                "'tokenization mismatch (ignored)', or answers cut off by --model_max_length). 0 stops at the "
                "first such sample; 1 never stops (the count is still reported)."})


@dataclass
class DataArguments(_UPSTREAM_DATA_ARGUMENTS, SafetyDataArguments):
    pass


class BadSampleError(ValueError):
    """A sample that cannot be trained on; ``record`` describes it for skipped_samples.jsonl."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def record_problem(record) -> Optional[str]:
    """Why LLaVA's preprocessing would crash on (or silently mistrain) this json record; None if it is sound."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, expected an object with 'conversations'"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "has no 'conversations' list"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"conversations[{k}] has no text 'value'"
        if turn.get("from") not in ("human", "gpt"):
            return f"conversations[{k}]['from'] is {turn.get('from')!r}; expected 'human' or 'gpt'"
    first = 1 if turns[0]["from"] != "human" else 0  # LLaVA drops a leading non-human turn
    for k in range(first, len(turns)):
        expected = ("human", "gpt")[(k - first) % 2]
        if turns[k]["from"] != expected:
            return f"conversations[{k}] is from {turns[k]['from']!r} where {expected!r} was expected (turns alternate)"
    if not any(turn["from"] == "gpt" for turn in turns[first:]):
        return "has no 'gpt' turn to learn from"
    if "image" in record:
        if not isinstance(record["image"], str) or not record["image"]:
            return f"'image' is {record['image']!r}, expected a file name"
        count = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns)
        if count != 1:
            return (f"has an image but {count} '{DEFAULT_IMAGE_TOKEN}' tokens in its conversation; expected one "
                    f"(with none LLaVA trains without the image, with more it fails)")
    return None


def image_problem(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return "image not found"
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.convert("RGB")  # decodes every pixel: a truncated file fails here, not in a worker later
    except Exception as error:
        return f"image cannot be read ({type(error).__name__}: {error})"
    return None


class CheckedLazySupervisedDataset(_UPSTREAM_DATASET):
    """LLaVA's dataset, with named errors for bad samples (or skipping them) and each sample's id attached."""

    def __init__(self, data_path: str, tokenizer, data_args):
        # upstream's __init__, which cannot run here: it calls super(LazySupervisedDataset, self).__init__()
        # by the module global name, which now names this class
        torch.utils.data.Dataset.__init__(self)
        try:
            with open(data_path, encoding="utf-8") as f:
                self.list_data_dict = json.load(f)
        except ValueError as error:  # json.JSONDecodeError
            raise ValueError(f"--data_path={data_path}: not valid JSON ({error})") from None
        self.tokenizer, self.data_args = tokenizer, data_args
        if not isinstance(self.list_data_dict, list):
            raise ValueError(f"--data_path={data_path}: expected a JSON list of records, "
                             f"found a {type(self.list_data_dict).__name__}")
        self.data_path = data_path
        self.skip_bad_samples = bool(getattr(data_args, "skip_bad_samples", False))
        self.source_index = list(range(len(self.list_data_dict)))  # position in the json file
        self.skipped_records: List[dict] = []  # records refused before training
        bad = [(i, problem) for i, problem in enumerate(map(record_problem, self.list_data_dict)) if problem]
        if not bad:
            return
        records = self.list_data_dict
        described = [self._describe(i, problem, records[i]) for i, problem in bad]
        if not self.skip_bad_samples:
            shown = "\n  ".join(described[:EXAMPLES_KEPT])
            more = f"\n  ... and {len(bad) - EXAMPLES_KEPT} more" if len(bad) > EXAMPLES_KEPT else ""
            raise BadSampleError(
                f"{len(bad)} malformed record(s) in --data_path={data_path}:\n  {shown}{more}\n"
                f"Fix them, or pass --skip_bad_samples True to train without them (they are then listed in "
                f"OUTPUT_DIR/{SKIPPED_FILE}).", self._record(bad[0][0], bad[0][1], records[bad[0][0]]))
        self.skipped_records = [self._record(i, problem, records[i]) for i, problem in bad]
        refused = {i for i, _ in bad}
        self.source_index = [i for i in self.source_index if i not in refused]
        self.list_data_dict = [records[i] for i in self.source_index]
        say_once(f"skipping {len(bad)} malformed record(s) of {data_path} (--skip_bad_samples True), e.g. "
                 + "; ".join(described[:EXAMPLES_KEPT]))

    def sample_id(self, index: int) -> str:
        record = self.list_data_dict[index]
        found = record.get("id") if isinstance(record, dict) else None
        return str(found) if found is not None else f"#{self.source_index[index]}"

    def _image_path(self, record) -> Optional[str]:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            return None
        return os.path.join(getattr(self.data_args, "image_folder", None) or "", record["image"])

    def _record(self, position: int, reason: str, record) -> dict:
        """One line of skipped_samples.jsonl; ``position`` is the record's index in the json file."""
        found = record.get("id") if isinstance(record, dict) else None
        return {"id": str(found) if found is not None else f"#{position}", "index": position,
                "data_path": self.data_path, "image": self._image_path(record), "reason": reason}

    def _describe(self, position: int, reason: str, record) -> str:
        entry = self._record(position, reason, record)
        image = f", image {entry['image']}" if entry["image"] else ""
        return f"sample id {entry['id']!r} (record {position} of {self.data_path}{image}): {reason}"

    def _load(self, index: int) -> Dict:
        try:
            return super().__getitem__(index)
        except Exception as error:
            record, position = self.list_data_dict[index], self.source_index[index]
            path = self._image_path(record)
            reason = image_problem(path) if path else None
            if reason is None:  # not a data problem this module can name: a bug is never skipped as bad data
                error.add_note(f"while loading {self._describe(position, 'record and image look sound', record)}")
                raise
            raise BadSampleError(self._describe(position, reason, record),
                                 self._record(position, reason, record)) from error

    def __getitem__(self, i) -> Dict:
        skipped: List[dict] = []
        for attempt in range(min(len(self), MAX_CONSECUTIVE_BAD)):
            index = (i + attempt) % len(self)
            try:
                item = self._load(index)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise BadSampleError(f"{error}\n(--skip_bad_samples True skips such samples and lists them in "
                                         f"OUTPUT_DIR/{SKIPPED_FILE})", error.record) from error
                skipped.append(error.record)  # the next sample of the file takes its place in the batch
                continue
            item["sample_id"] = self.sample_id(index)
            item["skipped"] = skipped
            return item
        raise BadSampleError(
            f"{len(skipped)} consecutive samples of {self.data_path} from index {i} could not be loaded (is "
            f"--image_folder={getattr(self.data_args, 'image_folder', None)!r} right?); first: "
            f"{skipped[0]['id']!r}, {skipped[0]['image']}: {skipped[0]['reason']}", skipped[0])


@dataclass
class SampleTrackingCollator(_UPSTREAM_COLLATOR):
    """LLaVA's collator; once a SafetyTrainerMixin trainer sets ``carry_sample_info``, each batch also carries
    ``sample_ids`` and ``skipped_samples``, which the trainer removes before the model sees the batch."""

    carry_sample_info: bool = False

    def __call__(self, instances: Sequence[Dict]) -> Dict:
        batch = super().__call__(instances)
        skipped = [entry for instance in instances for entry in instance.get("skipped", ())]
        if self.carry_sample_info:
            batch["sample_ids"] = [instance.get("sample_id") for instance in instances]
            batch["skipped_samples"] = skipped
        elif skipped:
            raise RuntimeError(
                f"samples {[entry['id'] for entry in skipped]} were skipped (--skip_bad_samples True) but this "
                f"trainer cannot report them: it does not include llava_dsl.checkpointing.SafetyTrainerMixin")
        return batch


class MaskedSamplesError(RuntimeError):
    """More samples had every label masked than --max_masked_sample_fraction allows."""


@dataclass
class DataChecks:
    """What the trainer saw of the data so far, over all ranks; saved in every checkpoint."""

    seen: int = 0  # samples trained on (a sample seen in two epochs counts twice)
    masked: int = 0  # of those, fully masked
    masked_examples: List[str] = field(default_factory=list)
    skipped_indices: List[int] = field(default_factory=list)  # json positions of the distinct samples skipped
    skipped_examples: List[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.skipped_indices)

    def add(self, seen: int, masked: Sequence[str], skipped: Sequence[dict]) -> List[dict]:
        """Count a batch; return the skipped samples not seen before (a bad sample is skipped every epoch)."""
        self.seen += seen
        self.masked += len(masked)
        known, new = set(self.skipped_indices), []
        for entry in skipped:
            if entry["index"] not in known:
                known.add(entry["index"])
                new.append(entry)
        self.skipped_indices += [entry["index"] for entry in new]
        for pool, ids in ((self.masked_examples, masked), (self.skipped_examples, [s["id"] for s in new])):
            pool.extend(x for x in ids if x not in pool and len(pool) < EXAMPLES_KEPT)
        return new

    def summary(self, skipped_file: str) -> str:
        parts = [f"{self.masked} of {self.seen} samples had every label masked"
                 + (f" (e.g. {', '.join(self.masked_examples)})" if self.masked else "")]
        if self.skipped:
            parts.append(f"{self.skipped} bad samples skipped (e.g. {', '.join(self.skipped_examples)}; "
                         f"details in {skipped_file})")
        return "; ".join(parts)

PATCHES = (
    (llava_train, "DataArguments", DataArguments,
     "adds --skip_bad_samples and --max_masked_sample_fraction; train() parses flags from this module global"),
    (llava_train, "LazySupervisedDataset", CheckedLazySupervisedDataset,
     "bad records and images fail naming sample id, json file and image (or are skipped and listed); every "
     "sample carries its id"),
    (llava_train, "DataCollatorForSupervisedDataset", SampleTrackingCollator,
     "brings each batch's sample ids and skips to the trainer, which counts fully masked samples over all "
     "ranks (dataloader workers are separate processes)"),
)
