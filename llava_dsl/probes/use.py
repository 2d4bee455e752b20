"""Does the model use its taps? Tap ablation at evaluation.

    python -m llava_dsl.probes use --model-path CKPT --data-dir TEXTVQA_DIR --train-data DATA.json \\
        --image-folder IMAGES --output-dir OUT [--protocol plain] [--num-mean-images 64] [--max_new_tokens 8]

The projector reads ``[h_main ; h_tap ; ...]`` (one channel slice per layer, in the order of the checkpoint's
config). First, the mean of the projector input over ``num_mean_images`` training images is taken, per token
position and channel. Then the TextVQA-format benchmark in ``--data-dir`` is answered once per condition: ``none``
(the model as it is), ``tap<L>`` for each tap L (that tap's slice replaced by its training mean, every other
slice as computed) and ``all_taps``. Exact match is the share of questions whose normalised answer equals a
normalised ground-truth answer (the TextVQA normalisation); ``drop`` = exact match without ablation minus with it.
A tap the model does not use has a drop of 0; one it reads from has a positive drop.

A LLaVA-1.5 checkpoint answers through ``llava_dsl.evaluate`` (its question file, LLaVA's prompt template and
loader, its scoring); a Hugging Face Llava folder answers with ``model.generate`` on the processor's chat
template, scored by the same benchmark loader. Each condition's ``questions.jsonl``, ``answers.jsonl`` and
``scored.jsonl`` are written under ``OUT/<condition>/`` (answers resume after a kill), and the report to
``OUT/use.json``. Greedy decoding, float32 by default: the same command gives the same answers on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from llava_dsl.probes.towers import ProbeError, Tower, load_tower, read_config

REPORT = "use.json"


class TapAblation:
    """A forward pre-hook on the projector: records the mean of its input, or replaces chosen layers' slices of
    it by that mean. ``concat_order``: the layer of each ``width``-channel slice, in order."""

    def __init__(self, projector: nn.Module, width: int, concat_order: Sequence[int]):
        self.projector, self.width, self.order = projector, int(width), [int(x) for x in concat_order]
        self.sum: Optional[torch.Tensor] = None
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.ablate: List[int] = []
        self.recording = False
        self.handle = projector.register_forward_pre_hook(self._hook)

    def _slice(self, layer: int) -> slice:
        index = self.order.index(layer)
        return slice(index * self.width, (index + 1) * self.width)

    def _hook(self, module, args):
        x = args[0]
        if x.shape[-1] != self.width * len(self.order):
            raise ProbeError(f"the projector input has {x.shape[-1]} channels; expected {len(self.order)} layers "
                             f"{self.order} x {self.width}")
        if self.recording:
            flat = x.detach().double().reshape(-1, *x.shape[-2:])  # [images, tokens, channels]
            if self.sum is not None and self.sum.shape != flat.shape[1:]:
                raise ProbeError(f"projector inputs of {self.sum.shape[0]} and {flat.shape[1]} tokens: the per-position "
                                 f"mean needs one token count per image (LLaVA-NeXT's any-resolution tiling is not "
                                 f"supported)")
            self.sum = flat.sum(0) if self.sum is None else self.sum + flat.sum(0)
            self.count += flat.shape[0]
            return None
        if not self.ablate:
            return None
        if self.mean is None:
            raise ProbeError("tap ablation before the training mean was recorded")
        if x.shape[-2] != self.mean.shape[0]:
            raise ProbeError(f"projector input of {x.shape[-2]} tokens; the training mean has {self.mean.shape[0]}")
        x = x.clone()
        for layer in self.ablate:
            part = self._slice(layer)
            x[..., part] = self.mean[:, part].to(x.dtype).to(x.device)
        return (x,) + tuple(args[1:])

    def finish_recording(self) -> None:
        if not self.count:
            raise ProbeError("no training image reached the projector; cannot take the mean")
        self.mean = (self.sum / self.count).float()
        self.recording = False

    def remove(self) -> None:
        self.handle.remove()


def training_images(train_data: str, image_folder: str, count: int) -> List[str]:
    """The first ``count`` distinct image paths of a LLaVA-format json (records with an "image")."""
    try:
        with open(train_data, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ProbeError(f"--train-data {train_data}: {error}") from None
    paths: List[str] = []
    for record in records:
        image = record.get("image") if isinstance(record, dict) else None
        if image and os.path.join(image_folder, image) not in paths:
            paths.append(os.path.join(image_folder, image))
        if len(paths) == count:
            break
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise ProbeError(f"--train-data {train_data} with --image-folder {image_folder}: "
                         + (f"{len(missing)} images missing (first {missing[0]})" if missing else "no record has an image"))
    return paths


def exact_match(prediction: Optional[str], answers: Sequence[str]) -> bool:
    from llava_dsl.evaluate.scorers import normalize_vqa_answer

    return prediction is not None and normalize_vqa_answer(prediction) in {normalize_vqa_answer(a) for a in answers}


def _scored_rows(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------- LLaVA-1.5 checkpoints

class _LlavaRunner:
    """Answers through llava_dsl.evaluate with one loaded model."""

    def __init__(self, args):
        from llava_dsl.evaluate.generate import default_device, load_model

        self.args = args
        self.device = default_device(args.device)
        self.loaded = load_model(args.model_path, None, self.device, args.dtype)
        tokenizer, model, image_processor, _, self.dtype = self.loaded
        tower = model.get_model().get_vision_tower()
        spec = getattr(tower, "layer_spec", None)
        if spec is None:
            raise ProbeError(f"--model-path {args.model_path}: mm_projector_type "
                             f"{getattr(model.config, 'mm_projector_type', None)!r} reads one layer; there is no "
                             f"tap to ablate (use mlp_multilayer or detached_mlp_multilayer)")
        self.model, self.image_processor = model, image_processor
        self.order, self.taps, self.detached = list(spec.concat_order), list(spec.taps), list(spec.detached_layers)
        self.ablation = TapAblation(model.get_model().mm_projector, model.config.mm_hidden_size, self.order)

    @torch.no_grad()
    def record_mean(self, images: List[str]) -> None:
        from llava.mm_utils import process_images
        from PIL import Image

        self.ablation.recording = True
        for path in images:
            pixels = process_images([Image.open(path).convert("RGB")], self.image_processor, self.model.config)
            self.model.encode_images(pixels.to(device=self.model.device, dtype=self.dtype))
        self.ablation.finish_recording()

    def answer(self, folder: str) -> dict:
        from llava_dsl.evaluate.benchmarks import LOADERS
        from llava_dsl.evaluate.generate import check_images, generate_answers, read_questions
        from llava_dsl.evaluate.runner import score_answers, write_questions

        a = self.args
        bench = LOADERS["textvqa"](a.data_dir, protocol=a.protocol)
        os.makedirs(folder, exist_ok=True)
        question_file = os.path.join(folder, "questions.jsonl")
        write_questions(bench.questions, question_file)
        check_images(read_questions(question_file), bench.image_folder, question_file)
        answers_file = os.path.join(folder, "answers.jsonl")
        generate_answers(argparse.Namespace(
            model_path=a.model_path, model_base=None, question_file=question_file, image_folder=bench.image_folder,
            answers_file=answers_file, conv_mode=a.conv_mode, num_chunks=1, chunk_idx=0, temperature=0.0,
            top_p=None, num_beams=1, max_new_tokens=a.max_new_tokens, device=self.device, dtype=a.dtype),
            loaded=self.loaded)
        scored = score_answers(bench, question_file, answers_file, allow_partial=False)
        return {"score": scored["score"], "scored_file": scored["scored_file"]}


# --------------------------------------------------------------------------- stock Hugging Face Llava folders

class _HFRunner:
    """Answers with the stock model's generate on its processor's chat template."""

    def __init__(self, args, tower: Tower):
        from transformers import AutoProcessor

        from llava_dsl.hf import unwrap_model

        if not tower.taps:
            raise ProbeError(f"--model-path {args.model_path}: config.vision_feature_layer is one layer; there is no "
                             f"tap to ablate")
        self.args = args
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = tower.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(args.model_path)
        base = unwrap_model(self.model)
        inner = getattr(base, "model", base)
        projector = getattr(inner, "multi_modal_projector", None) or getattr(base, "multi_modal_projector", None)
        if projector is None:
            raise ProbeError(f"--model-path {args.model_path}: {type(base).__name__} has no multi_modal_projector")
        self.order, self.taps, self.detached = list(tower.concat_order), list(tower.taps), list(tower.detached)
        self.ablation = TapAblation(projector, tower.clip.config.hidden_size, self.order)

    def _inputs(self, image, question: str):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        inputs.pop("token_type_ids", None)  # some tokenizers return it; Llava's generate refuses unused kwargs
        return inputs.to(self.device)

    @torch.no_grad()
    def record_mean(self, images: List[str]) -> None:
        from PIL import Image

        self.ablation.recording = True
        for path in images:
            self.model(**self._inputs(Image.open(path).convert("RGB"), "describe"))
        self.ablation.finish_recording()

    @torch.no_grad()
    def answer(self, folder: str) -> dict:
        from PIL import Image

        from llava_dsl.evaluate.benchmarks import LOADERS

        bench = LOADERS["textvqa"](self.args.data_dir, protocol=self.args.protocol)
        os.makedirs(folder, exist_ok=True)
        predictions = []
        for q in bench.questions:
            inputs = self._inputs(Image.open(os.path.join(bench.image_folder, q["image"])).convert("RGB"), q["text"])
            out = self.model.generate(**inputs, max_new_tokens=self.args.max_new_tokens, do_sample=False)
            predictions.append(self.processor.decode(out[0, inputs["input_ids"].shape[1]:],
                                                     skip_special_tokens=True).strip())
        score, _, per = bench.score(predictions)
        scored_file = os.path.join(folder, "scored.jsonl")
        with open(scored_file, "w", encoding="utf-8") as f:
            for q, p, s, gt in zip(bench.questions, predictions, per, bench.ground_truth):
                f.write(json.dumps({"question_id": q["question_id"], "prediction": p, "ground_truth": gt,
                                    "score": s}) + "\n")
        return {"score": score, "scored_file": os.path.abspath(scored_file)}


def tap_ablation(args) -> dict:
    """Run the probe for the parsed flags (``add_use_flags``); returns the report, also written to
    ``OUTPUT_DIR/use.json``: per condition the benchmark score, exact match, the drop from ``none`` and which
    questions it turned from right to wrong (and back)."""
    config = read_config(os.path.abspath(os.path.expanduser(args.model_path)))
    if "mm_vision_tower" in config:
        runner = _LlavaRunner(args)
        kind = "llava"
    else:
        tower = load_tower(args.model_path, keep_model=True)
        if tower.kind != "hf":
            raise ProbeError(f"--model-path {args.model_path}: a {tower.kind} folder has no projector to ablate; "
                             f"expected a LLaVA-1.5 checkpoint or a Hugging Face Llava folder")
        runner = _HFRunner(args, tower)
        kind = "hf"
    try:
        runner.record_mean(training_images(args.train_data, args.image_folder, args.num_mean_images))
        conditions = [("none", [])] + [(f"tap{t}", [t]) for t in runner.taps] + [("all_taps", list(runner.taps))]
        results: Dict[str, dict] = {}
        for name, layers in conditions:
            runner.ablation.ablate = layers
            answered = runner.answer(os.path.join(args.output_dir, name))
            rows = _scored_rows(answered["scored_file"])
            correct = [exact_match(r["prediction"], r["ground_truth"]) for r in rows]
            results[name] = {"ablated_layers": layers, "score": answered["score"],
                             "exact_match": sum(correct) / len(correct), "n": len(correct),
                             "correct": correct, "scored_file": answered["scored_file"]}
    finally:
        runner.ablation.remove()
    base = results["none"]
    for name, entry in results.items():
        entry["drop"] = base["exact_match"] - entry["exact_match"]
        entry["lost"] = sum(a and not b for a, b in zip(base["correct"], entry["correct"]))
        entry["gained"] = sum(b and not a for a, b in zip(base["correct"], entry["correct"]))
    report = {"model_path": os.path.abspath(args.model_path), "kind": kind, "concat_order": runner.order,
              "taps": runner.taps, "detached": runner.detached, "data_dir": os.path.abspath(args.data_dir),
              "protocol": args.protocol, "train_data": os.path.abspath(args.train_data),
              "mean_images": runner.ablation.count, "max_new_tokens": args.max_new_tokens,
              "conditions": {k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in results.items()},
              "per_question_correct": {k: v["correct"] for k, v in results.items()}}
    from llava_dsl.checkpointing.atomic import atomic_write_text

    atomic_write_text(os.path.join(args.output_dir, REPORT), json.dumps(report, indent=1))
    return report


def add_use_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="a LLaVA-1.5 checkpoint or a Hugging Face Llava folder")
    parser.add_argument("--data-dir", required=True, help="a benchmark in the TextVQA layout (TextVQA_0.5.1_val.json, "
                                                          "train_images/)")
    parser.add_argument("--protocol", default="plain", help="plain (default) or llava-ocr (LLaVA's question jsonl)")
    parser.add_argument("--train-data", required=True, help="LLaVA-format json of training records (their images "
                                                            "give the mean)")
    parser.add_argument("--image-folder", required=True, help="the training images' folder")
    parser.add_argument("--num-mean-images", type=int, default=64)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=8)
    parser.add_argument("--conv-mode", default="vicuna_v1", help="LLaVA-1.5 checkpoints: the prompt template")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="LLaVA-1.5 checkpoints: float32, bfloat16, float16")


def use_from_args(args) -> dict:
    if args.num_mean_images < 1:
        raise ProbeError(f"--num-mean-images {args.num_mean_images}: expected at least 1")
    report = tap_ablation(args)
    width = max(len(k) for k in report["conditions"])
    for name, entry in report["conditions"].items():
        print(f"{name:<{width}}  exact match {100 * entry['exact_match']:6.2f} %  drop {100 * entry['drop']:+6.2f} "
              f"points  (lost {entry['lost']}, gained {entry['gained']} of {entry['n']})")
    print(f"llava_dsl.probes use: wrote {os.path.join(args.output_dir, REPORT)}")
    return report
