"""Export a LLaVA-1.5 checkpoint (stock or Detached Skip-Links) to Hugging Face ``LlavaForConditionalGeneration``.

    python -m llava_dsl.export_hf --model-path checkpoints/llava-dsl-ft --output-dir exports/llava-dsl-hf

Detach only changes the backward pass, so at inference a ``detached_mlp_multilayer`` model *is* transformers'
multi-layer Llava: ``vision_feature_layer`` = [main layer, taps deep -> shallow] (the plugin's concat order),
``mm_projector.0/2`` -> ``multi_modal_projector.linear_1/linear_2``. The export is served by stock
transformers >= 4.49 (list ``vision_feature_layer``) with no plugin. A ``detached_*`` export also records the
detached taps as ``dsl_detach_layers`` (hidden-state indices; stock transformers ignores the key), so that
``llava_dsl.hf.apply_detached_skip_links(model)`` continues training it with the same taps detached.

This runs in the plugin's environment (transformers 4.37.2, which has no list ``vision_feature_layer``), so it
does not build a transformers Llava model: it writes the folder files directly, in the layout transformers
4.57 writes itself (``save_pretrained``): weight names ``language_model.model.*``, ``language_model.lm_head``,
``vision_tower.*``, ``multi_modal_projector.*`` (4.52+ map them onto their nested modules with
``_checkpoint_conversion_mapping``). Checked to load without missing keys or warnings, and to give the same
logits and token ids, with transformers 4.49.0, 4.57.6 and 5.23.0. It imports neither ``llava`` nor the
plugin (``llava_dsl.plugin``): it reads the checkpoint's files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Union

from llava_dsl.config_schema import BY_NAME, HF_DETACH_LAYERS, REFUSED
from llava_dsl.skip_links.layer_spec import LayerSpecError, absolute_layer, resolve_layer_spec
from llava_dsl.skip_links.projectors import KINDS, projector_type

if TYPE_CHECKING:  # torch and transformers are imported where used: --help and refusals stay fast
    import torch

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# llava.conversation.conv_vicuna_v1 (LLaVA-1.5's --version v1 and its eval scripts' conv_mode vicuna_v1).
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
LLAVA_PREFIX_TOWER = "model.vision_tower.vision_tower."
LLAVA_PREFIX_PROJECTOR = "model.mm_projector."
# Modules that exist only while training, dropped by the export with a line saying so: the R-Probe auxiliary-loss
# head (llava_dsl.rprobe.aux_loss registers it on the model as ``rprobe_head``); inference never runs it.
TRAINING_ONLY_PREFIXES = {"rprobe_head.": "the R-Probe auxiliary-loss head (--rprobe_aux_weight), used only by "
                                          "the training loss"}

_DTYPES = ("float32", "float16", "bfloat16")


class ExportError(ValueError):
    """A checkpoint that cannot be exported as it is (names the value, the expectation and the source)."""


# --------------------------------------------------------------------------------------------------
# What the checkpoint maps to: decided from config.json alone, before any weight is read.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorMapping:
    """How LLaVA's ``mm_projector`` becomes HF's two-Linear ``LlavaMultiModalProjector``."""

    kind: str                                  # "mlp2x" (Linear, GELU, Linear) or "linear" (one Linear)
    vision_feature_layer: Union[int, List[int]]  # one layer, or the multi-layer concat order
    num_layers: int
    detached_layers: Optional[List[int]] = None  # a detached type's stop-gradient taps (hidden-state indices)


def projector_mapping(config: dict, num_blocks: int, source: str = "config.json") -> ProjectorMapping:
    """Map ``mm_projector_type`` (+ the plugin's layer keys) onto HF Llava, or refuse with the reason.

    HF's projector is always ``linear_2(act(linear_1(x)))`` over the channel concat of ``vision_feature_layer``;
    what each type maps to is its entry in ``skip_links.projectors.KINDS``.
    Indices are written as non-negative hidden-state indices (0 = embeddings, i = block i), the convention the
    plugin persists its taps in; HF indexes ``hidden_states`` exactly as LLaVA does, so -2 == num_blocks - 1.
    """
    name = config.get("mm_projector_type", "linear")  # LLaVA's builder defaults to 'linear'
    select_layer = config.get("mm_vision_select_layer")
    if not isinstance(select_layer, int):
        raise ExportError(f"{source}: mm_vision_select_layer={select_layer!r}; expected an int (LLaVA-1.5 uses -2)")
    kind = projector_type(name)
    if kind is None:
        raise ExportError(f"{source}: mm_projector_type={name!r} is not a LLaVA-1.5 or llava_dsl projector type "
                          f"this exporter knows ({', '.join(k.name for k in KINDS)})")
    if kind.hf is None:
        raise ExportError(f"{source}: mm_projector_type={name!r}: {kind.hf_refusal}")
    if kind.hf == "mlp2x" and kind.depth != 2:
        raise ExportError(f"{source}: mm_projector_type={name!r} is a {kind.depth}-Linear MLP; Hugging Face "
                          f"LlavaMultiModalProjector has exactly two Linear layers (linear_1, GELU, linear_2)")
    taps = config.get("mm_vision_skip_layers")
    if not kind.multilayer:
        if taps:
            raise ExportError(f"{source}: mm_vision_skip_layers={taps!r} with mm_projector_type={name!r}, which "
                              f"reads one layer")
        try:
            main = absolute_layer(select_layer, num_blocks, "mm_vision_select_layer", select_layer)
        except LayerSpecError as error:
            raise ExportError(f"{source}: {error}") from None
        return ProjectorMapping(kind.hf, main, 1)
    if not taps:
        raise ExportError(f"{source}: mm_projector_type={name!r} but no mm_vision_skip_layers; a multilayer "
                          f"checkpoint records its tapped layers there (was it written without llava_dsl?)")
    try:
        spec = resolve_layer_spec(num_blocks, select_layer, list(taps), detach=False)
    except LayerSpecError as error:
        raise ExportError(f"{source}: {error}") from None
    if list(spec.taps) != [int(t) for t in taps]:
        raise ExportError(f"{source}: mm_vision_skip_layers={taps!r} are not the resolved taps {list(spec.taps)} "
                          f"(non-negative, deepest first) of a {num_blocks}-block tower; the projector's input "
                          f"columns follow the persisted order, so it cannot be reordered safely")
    detached = None
    if kind.detached:  # the persisted depth, or the default the LLaVA path resolves for a config without one
        try:
            detached = list(resolve_layer_spec(num_blocks, select_layer, list(taps),
                                               detach_depth=config.get("mm_vision_detach_depth")).detached_layers)
        except LayerSpecError as error:
            raise ExportError(f"{source}: {error}") from None
    return ProjectorMapping(kind.hf, list(spec.concat_order), spec.num_layers, detached)


def check_supported(config: dict, source: str = "config.json") -> None:
    """Refuse the LLaVA options HF ``LlavaForConditionalGeneration`` does not reproduce."""
    model_type = config.get("model_type")
    if model_type != "llava_llama":
        raise ExportError(f"{source}: model_type={model_type!r}; this exporter handles LLaVA-1.5 LLaMA/Vicuna "
                          f"checkpoints (model_type 'llava_llama')")
    if config.get("mm_use_im_start_end"):
        raise ExportError(f"{source}: mm_use_im_start_end=True wraps image features in <im_start>/<im_end> "
                          f"embeddings, which Hugging Face Llava does not insert; only LLaVA-1.5's default "
                          f"(False) exports")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ExportError(f"{source}: mm_patch_merge_type={config['mm_patch_merge_type']!r}; Hugging Face Llava "
                          f"implements LLaVA-1.5's 'flat' (LLaVA-NeXT's spatial merges map to LlavaNext)")
    aspect = config.get("image_aspect_ratio")
    if aspect not in (None, "square", "pad"):
        raise ExportError(f"{source}: image_aspect_ratio={aspect!r}; expected 'pad' or 'square' (LLaVA-1.5); "
                          f"'anyres' is LLaVA-NeXT (LlavaNextForConditionalGeneration)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ExportError(f"{source}: mm_vision_select_feature={feature!r}; expected 'patch' or 'cls_patch'")
    refused = {name: config[name] for name, key in BY_NAME.items()
               if key.export == REFUSED and config.get(name) not in (None, "none")}
    if refused:
        reasons = sorted({BY_NAME[name].reason for name in refused})
        raise ExportError(f"{source}: {', '.join(f'{k}={v!r}' for k, v in refused.items())}: {'; '.join(reasons)}, "
                          f"so the exported model would run differently from the checkpoint; this exporter refuses it "
                          f"(run it with llava_dsl itself: python -m llava_dsl.evaluate or llava_dsl.evaluate.generate)")


def select_strategy(config: dict) -> str:
    """LLaVA's ``patch`` (drop CLS) is HF's 'default'; ``cls_patch`` (keep it) is 'full'."""
    return "full" if config.get("mm_vision_select_feature", "patch") == "cls_patch" else "default"


def image_seq_length(vision_config: dict, strategy: str) -> int:
    patches = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    return patches + (1 if strategy == "full" else 0)


# Keys of a LLaVA config.json that are LLaVA's, not the language model's (besides its mm_* keys); the plugin's own
# keys come from its one table, llava_dsl.config_schema.
_LLAVA_KEYS = {"architectures", "_name_or_path", "transformers_version", "model_type", "freeze_mm_mlp_adapter",
               "tune_mm_mlp_adapter", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
               "tokenizer_padding_side", "use_mm_proj"}


def text_config_from(config: dict, vocab_size: int) -> dict:
    text = {k: v for k, v in config.items() if k not in _LLAVA_KEYS and k not in BY_NAME and not k.startswith("mm_")}
    text["model_type"] = "llama"
    text["vocab_size"] = vocab_size
    return dict(sorted(text.items()))


def vision_config_from(tower_config: dict) -> dict:
    """The export's ``vision_config`` from ``CLIPVisionConfig.from_pretrained(tower).to_diff_dict()`` (which also
    picks the vision part out of a full CLIP folder such as openai/clip-vit-large-patch14-336)."""
    vision = dict(tower_config)
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype"):
        vision.pop(key, None)  # the export's dtype is written at the top level
    vision["model_type"] = "clip_vision_model"
    return dict(sorted(vision.items()))


def build_hf_config(config: dict, vision_config: dict, vocab_size: int, image_token_index: int,
                    dtype: str, pad_token_id: Optional[int] = None, source: str = "config.json") -> dict:
    """The ``config.json`` of the export: LlavaConfig's fields (transformers >= 4.49)."""
    check_supported(config, source)
    mapping = projector_mapping(config, vision_config["num_hidden_layers"], source)
    strategy = select_strategy(config)
    text = text_config_from(config, vocab_size)
    text["torch_dtype"] = dtype
    if pad_token_id is not None:
        text["pad_token_id"] = pad_token_id
    detach = {} if mapping.detached_layers is None else {HF_DETACH_LAYERS: mapping.detached_layers}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_seq_length": image_seq_length(vision_config, strategy),
        "image_token_index": image_token_index,
        "multimodal_projector_bias": True,
        "projector_hidden_act": "gelu" if mapping.kind == "mlp2x" else "linear",
        "text_config": text,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "torch_dtype": dtype,
        "vision_config": vision_config,
        "vision_feature_layer": mapping.vision_feature_layer,
        "vision_feature_select_strategy": strategy,
        **detach,
    }


# --------------------------------------------------------------------------------------------------
# Chat template: LLaVA's conv_vicuna_v1, token for token.
# --------------------------------------------------------------------------------------------------
def chat_template(legacy_tokenizer: bool) -> str:
    """conv_vicuna_v1's prompt: "<system> USER: <image>\\n<question> ASSISTANT: <answer></s>USER: ... ASSISTANT:".

    LLaVA's ``tokenizer_image_token`` tokenizes the text after ``<image>`` as a fresh sequence, so it starts with
    SentencePiece's dummy-prefix piece; an HF tokenizer with ``legacy=False`` tokenizes it as a continuation and
    adds none. Rendering ``<image>`` as ``<image> `` gives back that piece, so the ids equal LLaVA's.
    """
    image = IMAGE_TOKEN if legacy_tokenizer else IMAGE_TOKEN + " "
    return (
        "{#- LLaVA-1.5 conv_vicuna_v1. '" + image + "' reproduces the SentencePiece piece LLaVA's tokenizer puts "
        "after the image. -#}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "  {%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}\n"
        "  {%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('\\n') -%}{%- endif -%}\n"
        "  {%- set messages = messages[1:] -%}\n"
        "{%- else -%}{%- set system = " + json.dumps(VICUNA_V1_SYSTEM) + " -%}{%- endif -%}\n"
        "{{- system + ' ' -}}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message['role'] == 'user' -%}{{- 'USER: ' -}}\n"
        "  {%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}\n"
        "  {%- else -%}{{- raise_exception('roles after an optional system message must be user or assistant') -}}"
        "{%- endif -%}\n"
        "  {%- if message['content'] is string -%}{{- message['content'] | replace('" + IMAGE_TOKEN + "', '" + image
        + "') -}}\n"
        "  {%- else -%}\n"
        "    {%- for item in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '" + image
        + "\\n' -}}{%- endfor -%}\n"
        "    {{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}\n"
        "  {%- endif -%}\n"
        "  {{- ' ' if message['role'] == 'user' else '</s>' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint.
# --------------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint_weights(model_path: str) -> Dict[str, "torch.Tensor"]:
    """All tensors of a saved model folder: safetensors or .bin, single file or sharded (index json)."""
    import torch
    from safetensors.torch import load_file

    def load(name):
        path = os.path.join(model_path, name)
        return load_file(path) if name.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                  weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(model_path, single)):
            return load(single)
        if os.path.isfile(os.path.join(model_path, index)):
            weights = {}
            for shard in sorted(set(_read_json(os.path.join(model_path, index))["weight_map"].values())):
                weights.update(load(shard))
            return weights
    present = sorted(os.listdir(model_path))
    if "mm_projector.bin" in present:
        raise ExportError(f"{model_path}: holds only mm_projector.bin (a stage-1 / --tune_mm_mlp_adapter output); "
                          f"export the stage-2 checkpoint, which has the full model")
    if any(name.startswith("adapter_model") for name in present):
        raise ExportError(f"{model_path}: is an unmerged LoRA checkpoint; merge it first "
                          f"(LLaVA's scripts/merge_lora_weights.py) and export the merged folder")
    raise ExportError(f"{model_path}: no model weights (model.safetensors, pytorch_model.bin or a sharded index); "
                      f"found {present}")


def resolve_tower(config: dict, override: Optional[str], source: str) -> str:
    tower = override or config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower:
        raise ExportError(f"{source}: no mm_vision_tower; is this a LLaVA checkpoint?")
    if os.path.isdir(tower):
        return tower
    try:  # a hub name LLaVA resolved at training time: use the local cache, never the network
        from huggingface_hub import snapshot_download
        return snapshot_download(tower, local_files_only=True)
    except (OSError, ValueError):  # not cached, or not a valid repo name
        raise ExportError(f"{source}: mm_vision_tower={tower!r} is neither a local folder nor in the local Hugging "
                          f"Face cache; pass --vision-tower /path/to/{os.path.basename(tower)}") from None


def tower_weights(tower_path: str) -> Dict[str, "torch.Tensor"]:
    """The original tower, exactly as LLaVA's CLIPVisionTower.load_model reads it (CLIPVisionModel)."""
    import torch
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(tower_path, torch_dtype=torch.float32).state_dict()


# --------------------------------------------------------------------------------------------------
# Weights: LLaVA names -> HF Llava names.
# --------------------------------------------------------------------------------------------------
def convert_weights(weights: Dict[str, "torch.Tensor"], mapping: ProjectorMapping, use_trained_tower: bool,
                    original_tower: Optional[Dict[str, "torch.Tensor"]], num_new_tokens: int,
                    vision_hidden: int, source: str) -> Dict[str, "torch.Tensor"]:
    """Rename every checkpoint tensor; anything not consumed is an error, never silently dropped (a training-only
    module, ``TRAINING_ONLY_PREFIXES``, is dropped with a line naming it)."""
    import torch

    out: Dict[str, torch.Tensor] = {}
    leftover = []
    dropped: Dict[str, int] = {}
    projector = {}
    tower = {}
    for key, value in weights.items():
        if key.startswith(LLAVA_PREFIX_PROJECTOR):
            projector[key[len(LLAVA_PREFIX_PROJECTOR):]] = value
        elif key.startswith(LLAVA_PREFIX_TOWER):
            tower[key[len(LLAVA_PREFIX_TOWER):]] = value
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
        elif key.startswith("model.") and not key.startswith(("model.vision_tower.", "model.image_newline")):
            out["language_model." + key] = value
        elif key.endswith(".inv_freq"):
            continue  # rotary buffers some older savers included; recomputed from the config
        elif key.startswith(tuple(TRAINING_ONLY_PREFIXES)):
            prefix = next(p for p in TRAINING_ONLY_PREFIXES if key.startswith(p))
            dropped[prefix] = dropped.get(prefix, 0) + 1
        else:
            leftover.append(key)
    if leftover:
        raise ExportError(f"{source}: tensors with no place in Hugging Face Llava: {sorted(leftover)[:8]}"
                          f"{' ...' if len(leftover) > 8 else ''}")
    for prefix, count in dropped.items():
        print(f"export_hf: dropped {count} {prefix}* tensors: {TRAINING_ONLY_PREFIXES[prefix]}; the exported model "
              f"runs as the checkpoint does without them", file=sys.stderr)

    if use_trained_tower:
        if not tower:
            raise ExportError(f"{source}: unfreeze_mm_vision_tower=True but the weights hold no "
                              f"{LLAVA_PREFIX_TOWER}* tensors (the trained tower)")
        chosen = tower
    else:
        chosen = original_tower  # LLaVA's loader re-reads the frozen tower from mm_vision_tower
    if original_tower is not None and set(chosen) != set(original_tower):
        missing, extra = set(original_tower) - set(chosen), set(chosen) - set(original_tower)
        raise ExportError(f"{source}: the checkpoint's tower tensors do not match a CLIPVisionModel: missing "
                          f"{sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")
    out.update({"vision_tower." + k: v for k, v in chosen.items()})

    expected_in = vision_hidden * mapping.num_layers
    if mapping.kind == "mlp2x":
        want = {"0.weight", "0.bias", "2.weight", "2.bias"}
        if set(projector) != want:
            raise ExportError(f"{source}: mm_projector tensors {sorted(projector)}; expected {sorted(want)}")
        linear_1, bias_1, linear_2, bias_2 = (projector[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    else:
        want = {"weight", "bias"}
        if set(projector) != want:
            raise ExportError(f"{source}: mm_projector tensors {sorted(projector)}; expected {sorted(want)}")
        linear_1, bias_1 = projector["weight"], projector["bias"]
        hidden = linear_1.shape[0]
        linear_2 = torch.eye(hidden, dtype=linear_1.dtype)
        bias_2 = torch.zeros(hidden, dtype=linear_1.dtype)
    if linear_1.shape[1] != expected_in:
        raise ExportError(f"{source}: mm_projector's first Linear takes {linear_1.shape[1]} inputs; the "
                          f"{mapping.num_layers} vision layer(s) {mapping.vision_feature_layer} of width "
                          f"{vision_hidden} give {expected_in}")
    out["multi_modal_projector.linear_1.weight"] = linear_1
    out["multi_modal_projector.linear_1.bias"] = bias_1
    out["multi_modal_projector.linear_2.weight"] = linear_2
    out["multi_modal_projector.linear_2.bias"] = bias_2

    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key not in out:
            raise ExportError(f"{source}: no {key.split('language_model.', 1)[1]} tensor")
        if num_new_tokens:
            # New rows = the mean row. For lm_head this makes the new tokens' logit the mean of all logits,
            # never above the largest, so greedy decoding cannot pick <image>/<pad> (convert_llava_weights_to_hf
            # samples around the same mean).
            matrix = out[key]
            mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
            out[key] = torch.cat([matrix, mean.expand(num_new_tokens, -1)], dim=0)
    return out


def save_weights(tensors: Dict[str, "torch.Tensor"], output_dir: str, max_shard_bytes: int) -> List[str]:
    """safetensors, split into shards of at most ``max_shard_bytes`` with an index (HF's naming)."""
    from safetensors.torch import save_file

    shards: List[Dict[str, "torch.Tensor"]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key].contiguous()
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(output_dir, name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in sorted(shard)}}
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return names


# --------------------------------------------------------------------------------------------------
# Tokenizer and processor files.
# --------------------------------------------------------------------------------------------------
def prepare_tokenizer(model_path: str):
    """The checkpoint's tokenizer plus ``<image>`` (and ``<pad>`` when it has no pad token), with the chat template.

    Returns (tokenizer, its size before the additions).
    """
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)  # what LLaVA's loader uses
    old_size = len(tokenizer)
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ExportError(f"{model_path}: the tokenizer already has {IMAGE_TOKEN!r} (id "
                          f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}); LLaVA-1.5 splices images at a "
                          f"sentinel id and never tokenizes it, so this is not a LLaVA-1.5 tokenizer")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:  # LLaVA v1 training pads with <unk> and saves it; keep what it trained with
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # batched generation; LLaVA saved 'right' for training
    legacy = bool(getattr(tokenizer, "legacy", True))
    if legacy:
        print(f"export_hf: note: {model_path}'s tokenizer has legacy=True; the chat template's ids were checked "
              f"against LLaVA only for legacy=False tokenizers (multi-turn prompts may differ after '</s>')",
              file=sys.stderr)
    tokenizer.chat_template = chat_template(legacy_tokenizer=legacy)
    return tokenizer, old_size


def write_fast_tokenizer(tokenizer, output_dir: str) -> None:
    """``tokenizer.json``, as transformers >= 4.40 converts this SentencePiece tokenizer.

    Servers read it directly, and transformers 5.x converts the slow files differently (no leading dummy prefix,
    user-defined pieces split), so it is written rather than left to each reader. The converter available here
    (transformers 4.37) gets two things wrong, patched below: it treats every tokenizer as ``legacy=True``
    (a dummy prefix after every special token) and drops SentencePiece's user-defined pieces.
    """
    from transformers import LlamaTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf  # the pb2 module transformers registered

    fast = LlamaTokenizerFast.from_pretrained(output_dir, from_slow=True)  # the slow files saved just before
    converted = json.loads(fast.backend_tokenizer.to_str())
    proto = import_protobuf().ModelProto()
    with open(tokenizer.vocab_file, "rb") as f:
        proto.ParseFromString(f.read())
    if not getattr(tokenizer, "legacy", True):
        # legacy=False: no per-segment prefix; Metaspace adds the dummy prefix to the first segment only.
        scheme = "first" if proto.normalizer_spec.add_dummy_prefix else "never"
        converted["normalizer"] = None
        converted["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme,
                                      "split": False}
    known = {entry["id"] for entry in converted["added_tokens"]}
    user_defined = [{"id": i, "content": piece.piece, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": False}
                    for i, piece in enumerate(proto.pieces) if piece.type == 4 and i not in known]  # USER_DEFINED
    converted["added_tokens"] = sorted(converted["added_tokens"] + user_defined, key=lambda entry: entry["id"])
    with open(os.path.join(output_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(converted, f, ensure_ascii=False, indent=2)


def export_processor(tower_path: str, output_dir: str, config: dict, vision_config: dict, strategy: str,
                     template: str) -> None:
    """preprocessor_config.json (the tower's CLIP processor; padded to square for image_aspect_ratio 'pad',
    like LLaVA's expand2square), processor_config.json and chat_template.json."""
    from transformers import CLIPImageProcessor

    image = {k: v for k, v in CLIPImageProcessor.from_pretrained(tower_path).to_dict().items()
             if not k.startswith("_")}  # private bookkeeping of 4.37 (e.g. "_processor_class": null)
    if config.get("image_aspect_ratio") == "pad":
        # LlavaImageProcessor = CLIPImageProcessor + do_pad (background int(mean * 255), image centred), the
        # same square LLaVA's expand2square makes.
        image["image_processor_type"] = "LlavaImageProcessor"
        image["do_pad"] = True
    else:
        image["image_processor_type"] = "CLIPImageProcessor"
    image["processor_class"] = "LlavaProcessor"
    with open(os.path.join(output_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(sorted(image.items())), f, indent=2)
    processor = {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,  # CLIP's CLS; dropped again by the 'default' strategy
        "patch_size": vision_config["patch_size"],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": strategy,
    }
    with open(os.path.join(output_dir, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump(processor, f, indent=2)
    with open(os.path.join(output_dir, "chat_template.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": template}, f, indent=2)


def export_generation_config(model_path: str, output_dir: str, pad_token_id: int) -> None:
    path = os.path.join(model_path, "generation_config.json")
    generation = _read_json(path) if os.path.isfile(path) else {}
    # "_from_model_config" would make newer transformers re-derive generation settings from config.json.
    generation = {k: v for k, v in generation.items() if k != "transformers_version" and not k.startswith("_")}
    generation["pad_token_id"] = pad_token_id
    with open(os.path.join(output_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(sorted(generation.items())), f, indent=2)


# --------------------------------------------------------------------------------------------------
# The whole export.
# --------------------------------------------------------------------------------------------------
def export(model_path: str, output_dir: str, vision_tower: Optional[str] = None, dtype: str = "auto",
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> dict:
    """Write the HF ``LlavaForConditionalGeneration`` folder; returns its config dict.

    Everything is read and checked before ``output_dir`` is touched, so a refused checkpoint writes nothing.
    """
    import torch
    from transformers import CLIPVisionConfig

    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"--model-path {model_path}: no config.json; expected a LLaVA checkpoint folder")
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(f"--output-dir {output_dir}: exists and is not empty; pass --overwrite to replace it")
    config = _read_json(config_path)
    check_supported(config, config_path)
    tower_path = resolve_tower(config, vision_tower, config_path)
    vision_config = vision_config_from(CLIPVisionConfig.from_pretrained(tower_path).to_diff_dict())
    mapping = projector_mapping(config, vision_config["num_hidden_layers"], config_path)
    if dtype == "auto":
        dtype = config.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of auto, {', '.join(_DTYPES)}")

    weights = load_checkpoint_weights(model_path)
    tokenizer, old_size = prepare_tokenizer(model_path)
    embed = weights.get("model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != old_size:
        raise ExportError(f"{model_path}: the tokenizer has {old_size} tokens but embed_tokens has "
                          f"{embed.shape[0]} rows; expected them equal (LLaVA resizes embeddings to the tokenizer)")
    tensors = convert_weights(weights, mapping, bool(config.get("unfreeze_mm_vision_tower", False)),
                              tower_weights(tower_path), len(tokenizer) - old_size, vision_config["hidden_size"],
                              model_path)
    target = getattr(torch, dtype)
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    hf_config = build_hf_config(config, vision_config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                dtype, tokenizer.pad_token_id, config_path)

    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(output_dir)
    save_weights(tensors, output_dir, max_shard_bytes)
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    tokenizer.save_pretrained(output_dir)
    write_fast_tokenizer(tokenizer, output_dir)
    export_processor(tower_path, output_dir, config, vision_config, hf_config["vision_feature_select_strategy"],
                     tokenizer.chat_template)
    export_generation_config(model_path, output_dir, tokenizer.pad_token_id)
    return hf_config


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB or 500MB")
    factor = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, None: 1}[match.group(2)]
    return int(float(match.group(1)) * factor)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llava_dsl.export_hf",
        description="Export a LLaVA-1.5 checkpoint (stock or llava_dsl multilayer) to a Hugging Face "
                    "LlavaForConditionalGeneration folder (needs transformers >= 4.49 to load).")
    parser.add_argument("--model-path", required=True, help="LLaVA checkpoint folder (stage 2, full weights)")
    parser.add_argument("--output-dir", required=True, help="folder to write the Hugging Face model into")
    parser.add_argument("--vision-tower", default=None,
                        help="local CLIP folder to use instead of config.mm_vision_tower (if that path moved)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's torch_dtype), float32, float16, "
                                                         "bfloat16")
    parser.add_argument("--max-shard-size", default="5GB", type=_parse_size, help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args(argv)
    try:
        config = export(args.model_path, args.output_dir, args.vision_tower, args.dtype, args.max_shard_size,
                        args.overwrite)
    except ExportError as error:
        raise SystemExit(f"export_hf: {error}") from None
    print(json.dumps({k: config[k] for k in ("vision_feature_layer", "vision_feature_select_strategy",
                                             "image_token_index", "image_seq_length", "projector_hidden_act",
                                             "torch_dtype")}))
    print(f"wrote {args.output_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
