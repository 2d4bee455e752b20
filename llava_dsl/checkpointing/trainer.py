"""The trainer side of resumable, atomic saving for LLaVA's trainer: ``SafetyTrainerMixin`` (full trainer state
in every stage, staged checkpoint folders with a completion marker, resume from the newest complete one,
the masked-sample guard), adapter files for stage 1, and LLaVA's final save made atomic and CPU-safe."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import List, Optional

import llava.train.train as llava_train
import torch
from llava.constants import IGNORE_INDEX

from llava_dsl.checkpointing.atomic import atomic_directory, atomic_file, atomic_torch_save, atomic_write_text
from llava_dsl.checkpointing.completeness import (checkpoint_problem, latest_complete_checkpoint, move_aside,
                                                  read_completion_marker, set_aside_incomplete, write_completion_marker)
from llava_dsl.skip_links.adapter import load_adapter_checkpoint
from llava_dsl.compat.distributed import say, say_once
from llava_dsl.data_checks import (DATA_CHECKS_FILE, EXAMPLES_KEPT, SKIPPED_FILE, DataChecks, MaskedSamplesError,
                                   SampleTrackingCollator)

_UPSTREAM_SAFE_SAVE = llava_train.safe_save_model_for_hf_trainer


def safe_save_model_for_hf_trainer(trainer, output_dir: str):
    """LLaVA's final save, every file written atomically (``llava_dsl.checkpointing``), minus its
    ``torch.cuda.synchronize()`` on machines without CUDA."""
    if getattr(trainer.args, "tune_mm_mlp_adapter", False):
        save_adapter(trainer, output_dir)
        return
    if trainer.deepspeed and not torch.cuda.is_available():
        trainer.save_model(output_dir)
        return
    _UPSTREAM_SAFE_SAVE(trainer, output_dir)

_FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


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


def _resolve(qualified_name: str):
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _read_data_checks(checkpoint: str) -> DataChecks:
    """The counts of masked and skipped samples a checkpoint carries; an error naming the file if it is unreadable
    (it is written atomically before the completion marker: damage is not an interrupted save)."""
    path = os.path.join(checkpoint, DATA_CHECKS_FILE)
    if not os.path.exists(path):
        say_once(f"{checkpoint} holds no {DATA_CHECKS_FILE}; the counts of masked and skipped samples start at 0")
        return DataChecks()
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object of counts, found a {type(fields).__name__}")
        return DataChecks(**fields)
    except (OSError, ValueError, TypeError) as error:
        problem = f"not valid JSON ({error})" if isinstance(error, json.JSONDecodeError) else str(error)
        raise ValueError(f"{path}: {problem}; the resumed run cannot continue the counts of masked and skipped "
                         f"samples (restore the file, or move {checkpoint} aside to resume from the one "
                         f"before)") from None


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
            say(f"data checks at the end: {self.data_checks.summary(self._skipped_file)}")
        return result

    @property
    def _skipped_file(self) -> str:
        return os.path.join(self.args.output_dir, SKIPPED_FILE)

    def _resume_point(self, requested) -> Optional[str]:
        """LLaVA's train() asks for ``True`` whenever ``checkpoint-*`` exists; this picks the newest complete one."""
        output_dir = self.args.output_dir
        if self.args.should_save:
            for message in set_aside_incomplete(output_dir):
                say(message)
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
                say(f"no complete checkpoint in {output_dir}; training from step 0")
        step = 0
        if checkpoint is not None:
            marker = read_completion_marker(checkpoint)
            step = marker["global_step"]
            if self.is_deepspeed_enabled and marker.get("world_size") != self.args.world_size:
                raise ValueError(
                    f"{checkpoint} was written by {marker.get('world_size')} ranks, this run has "
                    f"{self.args.world_size}: its DeepSpeed ZeRO files hold one partition per rank; restart with "
                    f"{marker.get('world_size')} ranks")
            self.data_checks = _read_data_checks(checkpoint)
            for callback in self._checkpoint_state_callbacks():
                callback.load_checkpoint_state(checkpoint)
            if self.is_world_process_zero():
                say(f"resuming from {checkpoint} (step {step}): model, optimizer, scheduler, RNG and data position")
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
                    say(f"{path} exists from an earlier run; moved to {move_aside(run_dir, path)}")
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
            for callback in self._checkpoint_state_callbacks():
                callback.save_checkpoint_state(checkpoint)
            write_completion_marker(checkpoint, self.state.global_step, self.args.world_size,
                                    deepspeed=self.is_deepspeed_enabled)
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)  # only now may older ones go
        self.args.distributed_state.wait_for_everyone()

    def _checkpoint_state_callbacks(self) -> list:
        """Callbacks whose state must survive a resume (``save_checkpoint_state`` / ``load_checkpoint_state``):
        their files go into each checkpoint before its completion marker, so they are complete with it."""
        return [c for c in self.callback_handler.callbacks if hasattr(c, "save_checkpoint_state")]

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
            say(f"data checks at step {self.state.global_step}: {checks.summary(self._skipped_file)}")
        super().log({**logs, "masked_samples": checks.masked, "skipped_samples": checks.skipped})

PATCHES = (
    (llava_train, "safe_save_model_for_hf_trainer", safe_save_model_for_hf_trainer,
     "upstream writes mm_projector.bin in place (a crash truncates it) and calls torch.cuda.synchronize() on the "
     "DeepSpeed save, which fails without CUDA"),
)
