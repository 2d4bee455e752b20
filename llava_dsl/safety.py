"""Nothing lost: resumable checkpoints in every stage, atomic saves, and no sample dropped silently.

Three ways a LLaVA run loses work, and what this module does about each:

* **Resume.** A checkpoint holds the full trainer state in every stage (upstream's stage-1 checkpoints hold only
  ``mm_projector.bin``), is written under a temporary name and renamed, and gets a completion marker
  (``checkpoint_complete.json``: step, world size, every file with its size) as its last file. A restart with the
  same command resumes from the newest *complete* checkpoint; interrupted ones are moved to
  ``OUTPUT_DIR/incomplete-checkpoints/`` with a message. Older checkpoints are rotated away only after the new
  one is complete.
* **Atomic files.** ``mm_projector.bin``, the final model folder's files and ``trainer_state.json`` are written
  to a temporary name and renamed, so a crash leaves the previous good file or nothing, never a truncated one.
* **Data.** A sample whose labels are all masked (LLaVA's ``tokenization mismatch ... (ignored)``) is counted
  across ranks and dataloader workers and reported at every logging step; the run stops once more than
  ``--max_masked_sample_fraction`` of its samples are masked (default 0: at the first one). Malformed records
  and missing or unreadable images raise an error naming the sample id, the json file and the image, or, with
  ``--skip_bad_samples True``, are skipped and listed in ``OUTPUT_DIR/skipped_samples.jsonl``.

The trainer behaviour is ``SafetyTrainerMixin`` (a base class of the plugin's trainer); the data side swaps the
``llava`` names listed in ``PATCHES``, applied by ``llava_dsl.register()`` (``integration.ALL_PATCHES``).
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch

import llava.train.train as llava_train
from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX

_UPSTREAM_DATA_ARGUMENTS = llava_train.DataArguments
_UPSTREAM_DATASET = llava_train.LazySupervisedDataset
_UPSTREAM_COLLATOR = llava_train.DataCollatorForSupervisedDataset

COMPLETION_MARKER = "checkpoint_complete.json"
DATA_CHECKS_FILE = "data_checks.json"
SKIPPED_FILE = "skipped_samples.jsonl"
INCOMPLETE_DIR = "incomplete-checkpoints"
EXAMPLES_KEPT = 5  # sample ids quoted in messages; the counts are exact
MAX_CONSECUTIVE_BAD = 32  # with --skip_bad_samples, this many unloadable samples in a row is an error

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STAGING = re.compile(r"^tmp-checkpoint-(\d+)$")  # transformers' staging name for a checkpoint being written
_PARTIAL_SAVE = re.compile(r"^\.saving-")  # atomic_directory's staging folder
_PARTIAL_FILE = re.compile(r"^\..+\.tmp-\d+$")  # atomic_file's temporary file


def _print(message: str) -> None:
    print(f"llava_dsl: {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Atomic files and folders.
# --------------------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; once the block returns, the file replaces ``path`` in one rename.

    The temporary name (``.NAME.tmp-PID``) is hidden and never the name a loader is given, so a crash leaves
    the previous ``path`` (or none) and at worst a stray temporary file.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync(folder)


def atomic_torch_save(obj, path: str) -> None:
    with atomic_file(path) as temporary:
        torch.save(obj, temporary)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)


def _publish_order(relative: str) -> tuple:
    name = os.path.basename(relative)
    return (name == "config.json", name.endswith(".index.json"), relative)


@contextlib.contextmanager
def atomic_directory(output_dir: str) -> Iterator[str]:
    """Yield a staging folder inside ``output_dir``; its files then move into ``output_dir`` one rename each.

    Every file appears whole. The old ``config.json`` goes first and the new one comes last (after the weights
    and shard indexes), so a folder whose save was cut short has no ``config.json``: loading it fails plainly
    instead of pairing new weights with a stale config.
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
    try:
        yield staging
        files = sorted((os.path.relpath(os.path.join(root, name), staging)
                        for root, _, names in os.walk(staging) for name in names), key=_publish_order)
        if "config.json" in files and os.path.exists(os.path.join(output_dir, "config.json")):
            os.remove(os.path.join(output_dir, "config.json"))
            _fsync(output_dir)
        for relative in files:
            source, target = os.path.join(staging, relative), os.path.join(output_dir, relative)
            _fsync(source)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        _fsync(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Checkpoint completeness.
# --------------------------------------------------------------------------------------------------
def _files_with_sizes(folder: str) -> Dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETION_MARKER:
                sizes[relative] = os.path.getsize(path)
    return sizes


def write_completion_marker(checkpoint: str, global_step: int, world_size: int, deepspeed: bool) -> None:
    """The last file of a checkpoint: what it holds, so a later run can tell a whole checkpoint from a cut one."""
    marker = {"global_step": global_step, "world_size": world_size, "deepspeed": deepspeed,
              "files": _files_with_sizes(checkpoint)}
    atomic_write_text(os.path.join(checkpoint, COMPLETION_MARKER), json.dumps(marker, indent=1, sort_keys=True))


def read_completion_marker(checkpoint: str) -> Optional[dict]:
    try:
        with open(os.path.join(checkpoint, COMPLETION_MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_problem(checkpoint: str) -> Optional[str]:
    """None for a complete checkpoint, else why it cannot be resumed from."""
    marker = read_completion_marker(checkpoint)
    if marker is None:
        return (f"no readable {COMPLETION_MARKER} (a save that was interrupted, or a checkpoint not written by "
                f"llava_dsl, e.g. upstream LLaVA's stage-1 checkpoints, which hold only mm_projector.bin)")
    for relative, size in sorted(marker.get("files", {}).items()):
        path = os.path.join(checkpoint, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        if os.path.getsize(path) != size:
            return f"{relative} has {os.path.getsize(path)} bytes, {size} when the checkpoint was completed"
    return None


def _step(name: str) -> int:
    return int((_CHECKPOINT.match(name) or _STAGING.match(name)).group(1))


def set_aside_incomplete(output_dir: str) -> List[str]:
    """Move incomplete checkpoints out of the way of resuming and rotation; return one message per move."""
    messages = []
    if not os.path.isdir(output_dir):
        return messages
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _PARTIAL_SAVE.match(name) and os.path.isdir(path):
            shutil.rmtree(path)
            messages.append(f"removed {path}: files of a final save that was interrupted (the files it would have "
                            f"replaced are untouched)")
            continue
        if _PARTIAL_FILE.match(name) and os.path.isfile(path):
            os.remove(path)
            messages.append(f"removed {path}: a temporary file of an interrupted save")
            continue
        if _STAGING.match(name) and os.path.isdir(path):
            problem = "its save was interrupted before it was renamed to " + name[len("tmp-"):]
        elif _CHECKPOINT.match(name) and os.path.isdir(path):
            problem = checkpoint_problem(path)
        else:
            continue
        if problem is None:
            continue
        target = move_aside(output_dir, path)
        messages.append(f"{path} is incomplete ({problem}); moved to {target}, not resumed from")
    return messages


def move_aside(output_dir: str, path: str) -> str:
    folder = os.path.join(output_dir, INCOMPLETE_DIR)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def latest_complete_checkpoint(output_dir: str) -> Optional[str]:
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((_step(name), name) for name in os.listdir(output_dir)
                   if _CHECKPOINT.match(name) and os.path.isdir(os.path.join(output_dir, name)))
    for _, name in reversed(steps):
        if checkpoint_problem(os.path.join(output_dir, name)) is None:
            return os.path.join(output_dir, name)
    return None


# --------------------------------------------------------------------------------------------------
# Flags.
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Data: named errors, opt-in skipping, sample ids for the trainer.
# --------------------------------------------------------------------------------------------------
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
        if int(os.environ.get("RANK", "0")) == 0:
            _print(f"skipping {len(bad)} malformed record(s) of {data_path} (--skip_bad_samples True), e.g. "
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
            reason = (image_problem(path) if path else None) or f"{type(error).__name__}: {error}"
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
                f"trainer cannot report them: it does not include llava_dsl.safety.SafetyTrainerMixin")
        return batch


# --------------------------------------------------------------------------------------------------
# Trainer.
# --------------------------------------------------------------------------------------------------
_FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


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


def _adapter_keys(args, checkpoint: bool) -> List[str]:
    keys = ["mm_projector"] + (["vision_resampler"] if checkpoint else [])  # upstream's choices, stage by stage
    if getattr(args, "use_im_start_end", False):
        keys += ["embed_tokens", "embed_in"]
    return keys


def _write_adapter(trainer, output_dir: str, file_name: str, checkpoint: bool) -> None:
    """Gather the stage-1 weights (a collective under ZeRO-3: every rank calls this) and write them on one rank."""
    weights = llava_train.get_mm_adapter_state_maybe_zero_3(trainer.model.named_parameters(),
                                                             _adapter_keys(trainer.args, checkpoint))
    if trainer.args.should_save:
        atomic_write_text(os.path.join(output_dir, "config.json"), trainer.model.config.to_json_string())
        atomic_torch_save(weights, os.path.join(output_dir, file_name))


def save_adapter(trainer, output_dir: str) -> None:
    """LLaVA's final stage-1 save (``mm_projector.bin`` and ``config.json``), each file written atomically.

    Same layout as upstream ``safe_save_model_for_hf_trainer``: a folder named ``checkpoint-*`` gets
    ``../mm_projector/checkpoint-*.bin``.
    """
    name = os.path.basename(os.path.normpath(output_dir))
    if name.startswith("checkpoint-"):
        _write_adapter(trainer, os.path.join(os.path.dirname(os.path.normpath(output_dir)), "mm_projector"),
                       f"{name}.bin", checkpoint=False)
        if trainer.args.should_save:
            atomic_write_text(os.path.join(output_dir, "config.json"), trainer.model.config.to_json_string())
        return
    _write_adapter(trainer, output_dir, "mm_projector.bin", checkpoint=False)


def load_adapter_checkpoint(model, path: str) -> None:
    """Load a stage-1 checkpoint's ``mm_projector.bin`` by parameter name (single process; ZeRO-3 resumes from
    DeepSpeed's own files instead)."""
    try:
        saved = torch.load(path, map_location="cpu")
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a torch state dict ({error})") from error
    params = dict(model.named_parameters())
    unknown = sorted(k for k in saved if k not in params)
    trained = sorted(k for k, p in params.items() if p.requires_grad and k not in saved)
    if unknown or trained:
        raise ValueError(f"{path} does not fit the model being trained: weights it holds that the model lacks "
                         f"{unknown}, trainable parameters it lacks {trained}")
    with torch.no_grad():
        for key, value in saved.items():
            if tuple(params[key].shape) != tuple(value.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(params[key].shape)}")
            params[key].copy_(value)


def _resolve(qualified_name: str):
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


class SafetyTrainerMixin:
    """Resumable checkpoints in every stage, atomic saves and data checks; a base class before LLaVATrainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_checks = DataChecks()
        self._checkpoint_save = False  # inside _save_checkpoint: files go to transformers' staging folder
        self._adapter_checkpoint = False  # ... and the model part is the stage-1 adapter
        self._rotation_deferred = False
        if isinstance(self.data_collator, SampleTrackingCollator):
            self.data_collator.carry_sample_info = True

    # ---- resume -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        checkpoint = self._resume_point(resume_from_checkpoint)
        result = super().train(resume_from_checkpoint=checkpoint, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if self.is_world_process_zero():
            _print(f"data checks at the end: {self.data_checks.summary(self._skipped_file)}")
        return result

    @property
    def _skipped_file(self) -> str:
        return os.path.join(self.args.output_dir, SKIPPED_FILE)

    def _resume_point(self, requested) -> Optional[str]:
        """LLaVA's train() asks for ``True`` whenever ``checkpoint-*`` exists; this picks the newest complete one."""
        output_dir = self.args.output_dir
        if self.args.should_save:
            for message in set_aside_incomplete(output_dir):
                _print(message)
        self.args.distributed_state.wait_for_everyone()  # every rank sees the same folder from here on
        checkpoint = None
        if isinstance(requested, str):
            problem = checkpoint_problem(requested)
            if problem:
                raise ValueError(f"resume_from_checkpoint={requested}: cannot resume from it: {problem}")
            checkpoint = requested
        elif requested:
            checkpoint = latest_complete_checkpoint(output_dir)
            if checkpoint is None and self.is_world_process_zero():
                _print(f"no complete checkpoint in {output_dir}; training from step 0")
        step = 0
        if checkpoint is not None:
            marker = read_completion_marker(checkpoint)
            step = marker["global_step"]
            if self.is_deepspeed_enabled and marker.get("world_size") != self.args.world_size:
                raise ValueError(
                    f"{checkpoint} was written by {marker.get('world_size')} ranks, this run has "
                    f"{self.args.world_size}: its DeepSpeed ZeRO files hold one partition per rank; restart with "
                    f"{marker.get('world_size')} ranks")
            with contextlib.suppress(OSError, ValueError, TypeError):
                with open(os.path.join(checkpoint, DATA_CHECKS_FILE), encoding="utf-8") as f:
                    self.data_checks = DataChecks(**json.load(f))
            if self.is_world_process_zero():
                _print(f"resuming from {checkpoint} (step {step}): model, optimizer, scheduler, RNG and data position")
        refused = getattr(self.train_dataset, "skipped_records", [])
        if checkpoint is None and refused:  # a resumed run's counts already hold them
            self.data_checks.add(0, [], refused)
        if self.args.should_save:
            self._restart_skipped_file(step, refused)
        return checkpoint

    def _restart_skipped_file(self, resumed_step: int, refused: List[dict]) -> None:
        """Keep what the checkpoint's steps skipped (later entries will be found again), then this start's refusals."""
        kept = []
        with contextlib.suppress(OSError):
            with open(self._skipped_file, encoding="utf-8") as f:
                for line in f:
                    try:
                        step = json.loads(line).get("step", 0)
                    except ValueError:  # the last line of a run killed while appending
                        continue
                    if 0 < step <= resumed_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        if not kept and not refused and not os.path.exists(self._skipped_file):
            return
        lines = kept + [json.dumps({**entry, "step": 0}) + "\n" for entry in refused]
        atomic_write_text(self._skipped_file, "".join(lines))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        adapter = os.path.join(resume_from_checkpoint, "mm_projector.bin")
        has_full_weights = any(os.path.exists(os.path.join(resume_from_checkpoint, f)) for f in _FULL_WEIGHT_FILES)
        if os.path.isfile(adapter) and not has_full_weights:  # a stage-1 checkpoint
            load_adapter_checkpoint(model if model is not None else self.model, adapter)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_rng_state(self, checkpoint):
        # transformers 4.37 reads rng_state*.pth with torch.load's default, which torch >= 2.6 made
        # weights_only=True; the numpy generator state in it then fails to load and so does every resume.
        # Allow exactly the numpy names the files use (anything else still fails).
        allowed = []
        listing = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if checkpoint is not None and listing is not None:
            for name in sorted(os.listdir(checkpoint)):
                if name.startswith("rng_state") and name.endswith(".pth"):
                    allowed += [_resolve(g) for g in listing(os.path.join(checkpoint, name)) if g.startswith("numpy.")]
        if not allowed:
            super()._load_rng_state(checkpoint)
            return
        import numpy

        dtypes = getattr(numpy, "dtypes", None)  # the array's dtype class is rebuilt without being listed
        allowed += [getattr(dtypes, name) for name in getattr(dtypes, "__all__", ())]
        with torch.serialization.safe_globals(allowed):
            super()._load_rng_state(checkpoint)

    # ---- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial, metrics=None):
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            # transformers writes in place (not atomically) into an existing folder; a stale staging folder
            # would be mixed into the new checkpoint
            for path in (os.path.join(run_dir, name), os.path.join(run_dir, f"tmp-{name}")):
                if os.path.exists(path):
                    _print(f"{path} exists from an earlier run; moved to {move_aside(run_dir, path)}")
        self.args.distributed_state.wait_for_everyone()
        adapter_only = bool(getattr(self.args, "tune_mm_mlp_adapter", False))
        self._checkpoint_save, self._adapter_checkpoint, self._rotation_deferred = True, adapter_only, True
        if adapter_only:
            # LLaVA's stage-1 override writes only mm_projector.bin; with the flag lowered for this call its
            # parent writes transformers' full checkpoint (optimizer, scheduler, RNG, trainer state), and
            # save_model() below puts the adapter in place of the full model
            self.args.tune_mm_mlp_adapter = False
        try:
            super()._save_checkpoint(model, trial, metrics=metrics)
        finally:
            if adapter_only:
                self.args.tune_mm_mlp_adapter = True
            self._checkpoint_save = self._adapter_checkpoint = self._rotation_deferred = False
        checkpoint = os.path.join(run_dir, name)
        if self.args.should_save:
            atomic_write_text(os.path.join(checkpoint, DATA_CHECKS_FILE), json.dumps(self.data_checks.__dict__))
            write_completion_marker(checkpoint, self.state.global_step, self.args.world_size,
                                    deepspeed=self.is_deepspeed_enabled)
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)  # only now may older ones go
        self.args.distributed_state.wait_for_everyone()

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        if not self._rotation_deferred:
            super()._rotate_checkpoints(use_mtime=use_mtime, output_dir=output_dir)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        if self._adapter_checkpoint:
            _write_adapter(self, output_dir, "mm_projector.bin", checkpoint=True)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._checkpoint_save:  # the whole checkpoint folder is renamed into place already
            super()._save(output_dir, state_dict=state_dict)
            return
        with atomic_directory(output_dir) as staging:
            super()._save(staging, state_dict=state_dict)

    def save_state(self):
        if self.is_world_process_zero():
            with atomic_file(os.path.join(self.args.output_dir, "trainer_state.json")) as temporary:
                self.state.save_to_json(temporary)

    # ---- data checks ------------------------------------------------------------------------------
    def training_step(self, model, inputs):
        sample_ids = inputs.pop("sample_ids", None)
        skipped = inputs.pop("skipped_samples", None) or []
        if sample_ids is not None:
            self._check_batch(inputs, sample_ids, skipped)
        return super().training_step(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False):
        inputs.pop("sample_ids", None)  # for callers other than training_step
        inputs.pop("skipped_samples", None)
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    def _max_masked_fraction(self) -> float:
        return float(getattr(getattr(self.train_dataset, "data_args", None), "max_masked_sample_fraction", 0.0))

    def _check_batch(self, inputs, sample_ids: List[str], skipped: List[dict]) -> None:
        """Count fully masked samples and skips of this batch over all ranks; stop when past the threshold.

        Runs before the forward pass, so a stopped run never trains on the sample that stopped it. Every rank
        takes the same decision from the reduced counts (one rank stopping alone would hang the others).
        """
        labels = inputs["labels"]
        lengths = inputs["attention_mask"].sum(-1) if "attention_mask" in inputs else None
        max_length = getattr(self.tokenizer, "model_max_length", None)
        masked = []
        for row in (labels != IGNORE_INDEX).sum(-1).eq(0).nonzero().flatten().tolist():
            cut = lengths is not None and max_length and int(lengths[row]) >= max_length
            masked.append(f"{sample_ids[row]} ({'cut at --model_max_length' if cut else 'tokenization mismatch'})")
        everywhere = self._gather(len(sample_ids), masked, skipped)
        seen = sum(part[0] for part in everywhere)
        all_masked = [m for part in everywhere for m in part[1]]
        all_skipped = [s for part in everywhere for s in part[2]]
        new_skips = self.data_checks.add(seen, all_masked, all_skipped)
        if new_skips and self.args.should_save:
            with open(self._skipped_file, "a", encoding="utf-8") as f:
                for entry in new_skips:
                    f.write(json.dumps({**entry, "step": self.state.global_step + 1}) + "\n")
        fraction = self._max_masked_fraction()
        planned = (self.state.max_steps * self.args.gradient_accumulation_steps * self.args.world_size
                   * self._train_batch_size)
        if all_masked and self.data_checks.masked > fraction * planned:
            raise MaskedSamplesError(self._masked_message(all_masked, fraction, planned))

    def _gather(self, seen: int, masked: List[str], skipped: List[dict]) -> List[tuple]:
        import torch.distributed as dist

        local = (seen, masked, skipped)
        if self.args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return [local]
        counts = torch.tensor([seen, len(masked), len(skipped)], dtype=torch.long, device=self.args.device)
        dist.all_reduce(counts)
        total_seen, total_masked, total_skipped = counts.tolist()
        if not (total_masked or total_skipped):
            return [(total_seen, [], [])]
        everywhere = [None] * self.args.world_size
        dist.all_gather_object(everywhere, local)
        return everywhere

    def _masked_message(self, new: List[str], fraction: float, planned: int) -> str:
        from llava import conversation as conversation_lib

        version = getattr(conversation_lib.default_conversation, "version", None)
        tokenizer = getattr(self.tokenizer, "name_or_path", None)
        checks = self.data_checks
        return (
            f"stopping: {checks.masked} of {checks.seen} samples so far had every label masked, more than "
            f"--max_masked_sample_fraction={fraction} of this run's {planned} samples allows. This batch: "
            f"{', '.join(new[:EXAMPLES_KEPT])}{' ...' if len(new) > EXAMPLES_KEPT else ''}. A fully masked sample "
            f"trains nothing (LLaVA printed 'WARNING: tokenization mismatch: X vs. Y. (ignored)' for it). Likely "
            f"cause: the conversation template (--version, here {version!r}) does not match the tokenizer of "
            f"--model_name_or_path ({tokenizer}): e.g. vicuna_v1/v1 needs a tokenizer that keeps 'USER' in one "
            f"piece, stage-1 pretraining uses --version plain. A sample marked 'cut at --model_max_length' lost "
            f"all its answers to truncation instead. To train anyway, raise --max_masked_sample_fraction.")

    def log(self, logs):
        checks = self.data_checks
        if (checks.masked or checks.skipped) and self.is_world_process_zero():
            _print(f"data checks at step {self.state.global_step}: {checks.summary(self._skipped_file)}")
        super().log({**logs, "masked_samples": checks.masked, "skipped_samples": checks.skipped})


# --------------------------------------------------------------------------------------------------
# ZeRO-3 on CPU.
# --------------------------------------------------------------------------------------------------
def cpu_safe_deepspeed_argv(argv: List[str], cuda: bool) -> List[str]:
    """``argv`` with ``stage3_allgather_sequential`` switched on in a ZeRO-3 ``--deepspeed`` config on CPU.

    DeepSpeed's coalesced all-gather waits only for its last handle, which orders everything on one CUDA
    stream but not under gloo, whose worker threads can finish an earlier gather after the parameter is in
    use: pretrained weights loaded inside GatheredParameters (from_pretrained, the adapter) are then silently
    overwritten with stale partitions, differently in every run. The sequential gather waits for each one.
    The config is passed on base64-encoded (transformers accepts that for --deepspeed), the file is untouched.
    """
    if cuda:
        return list(argv)
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--deepspeed" and i + 1 < len(argv):
            index, path = i + 1, argv[i + 1]
        elif arg.startswith("--deepspeed="):
            index, path = i, arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path):
            return argv  # a dict or an already encoded config
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        zero = config.get("zero_optimization", {})
        if zero.get("stage") != 3 or zero.get("stage3_allgather_sequential"):
            return argv
        config["zero_optimization"] = {**zero, "stage3_allgather_sequential": True}
        encoded = base64.urlsafe_b64encode(json.dumps(config).encode("utf-8")).decode("ascii")
        argv[index] = encoded if index == i + 1 else f"--deepspeed={encoded}"
        if int(os.environ.get("RANK", "0")) == 0:
            _print(f"ZeRO-3 on CPU: {path} with stage3_allgather_sequential=true (DeepSpeed's coalesced "
                   f"all-gather races under gloo and can leave loaded weights stale)")
        return argv
    return argv


CPU_ALLREDUCE_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def init_deepspeed_distributed(cuda: bool, timeout_s: Optional[float] = None) -> Optional[str]:
    """``deepspeed.init_distributed()``; on CPU, then take the name of this rank's shared all-reduce buffer away.

    DeepSpeed's CPU backend gives every rank a 66 MB buffer in /dev/shm (named as ``CPU_ALLREDUCE_BUFFER`` from the
    environment at init) and never unlinks it, so each CPU run leaves its buffers behind until the tmpfs is full.
    Once every rank has returned from init, every rank has mapped every other rank's buffer: after a barrier the
    names are no longer needed, and the memory goes back when the last process exits, even a killed one.
    Returns the path it unlinked, if any.
    """
    import datetime

    import deepspeed
    import torch.distributed as dist

    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(**kwargs)
    if cuda:
        return None
    path = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                       port=os.environ.get("MASTER_PORT", ""), rank=dist.get_rank())
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # an accelerator without the shared-memory all-reduce (e.g. oneCCL)
        return None
    return path


# --------------------------------------------------------------------------------------------------
# Registration.
# --------------------------------------------------------------------------------------------------
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


