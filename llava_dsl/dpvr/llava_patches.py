"""Every touch of the ``llava`` package for DPVR-LF (dual-path vision token routing, late-layer fusion).

``llava_dsl.register()`` applies ``PATCHES`` (part of ``plugin.ALL_PATCHES``): the model builds its side branch
from the config, and LLaVA's forward and generate run the routed decoder (``llava_dsl.dpvr``) for a routed config;
any other config takes LLaVA's own code path, call for call. ``llava_dsl.plugin`` composes the rest into the
training entry point: ``DPVRArguments`` into its ``ModelArguments``, ``configure_routing`` at the end of its
``initialize_vision_modules``, ``prepare_routed_training`` in ``DSLTrainer.__init__`` after the joint-training setup.

Config keys written (a checkpoint reloads into the same architecture from them alone): ``CONFIG_KEYS``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Tuple

import llava.model.llava_arch as llava_arch
import torch
import torch.nn as nn
from llava.constants import IGNORE_INDEX
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_dsl.compat.deepspeed import full_numel, gathered
from llava_dsl.compat.distributed import print_once
from llava_dsl.config_schema import keys_of
from llava_dsl.dpvr.decoder import VisionSideBranch, routed_forward
from llava_dsl.dpvr.spec import (ROUTING_MODES, SIDE_ATTENTION, RoutingError, RoutingSpec, resolve_routing,
                                 suggest_route_layer)

_UPSTREAM_META_INIT = llava_arch.LlavaMetaModel.__init__

_UPSTREAM_FORWARD = LlavaLlamaForCausalLM.forward

_UPSTREAM_GENERATE = LlavaLlamaForCausalLM.generate

_UPSTREAM_PREPARE_FOR_GENERATION = LlavaLlamaForCausalLM.prepare_inputs_for_generation

CONFIG_KEYS = keys_of("dpvr")

SIDE_BRANCH = "dpvr_side_branch"  # attribute of LlavaLlamaModel; state-dict keys model.dpvr_side_branch.layer.*


@dataclass
class DPVRArguments:
    mm_routing: Optional[str] = field(default=None, metadata={
        "help": "'dpvr_lf': vision tokens leave the LLM at --dpvr_route_layer into a one-layer side branch, text goes "
                "on text-only, both re-fuse at the last layer; only the side branch trains (docs/dpvr.md)."})
    dpvr_route_layer: Optional[str] = field(default=None, metadata={
        "help": "Routing layer R (layers [0,R) joint, [R,L-1) text-only, L-1 fused), or 'auto': the layer suggested "
                "by --dpvr_attention_report."})
    dpvr_attention_report: Optional[str] = field(default=None, metadata={
        "help": "attention_share.json of `python -m llava_dsl.analyze attention`, for --dpvr_route_layer auto."})
    dpvr_attention_threshold: Optional[float] = field(default=None, metadata={
        "help": "With auto: re-suggest R from the report's shares with this threshold (default: the report's)."})
    dpvr_side_init_layer: Optional[int] = field(default=None, metadata={
        "help": "LLM layer the side branch is copied from (default: R, the first layer the vision tokens skip)."})
    dpvr_side_attention: str = field(default="vision", metadata={
        "help": "Keys of the side branch: 'vision' (vision tokens only, causal) or 'prefix' (also the text before)."})
    dpvr_tune_fusion_layer: bool = field(default=False, metadata={
        "help": "Also train the last (fusion) LLM layer, beside the side branch."})


def routing_spec_from_config(config) -> Optional[RoutingSpec]:
    """The routing a model config records; None for an unrouted (stock) config."""
    mode = getattr(config, "mm_routing", None)
    if mode is None or mode == "none":
        return None
    if mode not in ROUTING_MODES:
        raise RoutingError(f"config mm_routing={mode!r}: expected one of {', '.join(ROUTING_MODES)} (or none)")
    return resolve_routing(config.num_hidden_layers, getattr(config, "dpvr_route_layer", None),
                           getattr(config, "dpvr_side_init_layer", None),
                           getattr(config, "dpvr_side_attention", "vision"), source="config dpvr_route_layer")


def route_layer_from_report(path: str, num_layers: int, threshold: Optional[float] = None) -> Tuple[int, str]:
    """R suggested by an attention-share report, and a line saying where it came from."""
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise RoutingError(f"--dpvr_attention_report={path}: no such file (write it with "
                           f"`python -m llava_dsl.analyze attention --out DIR`)") from None
    except json.JSONDecodeError as error:
        raise RoutingError(f"--dpvr_attention_report={path}: not JSON ({error})") from error
    shares = report.get("shares")
    if not isinstance(shares, list) or len(shares) != num_layers:
        raise RoutingError(f"--dpvr_attention_report={path}: has {len(shares) if isinstance(shares, list) else 'no'} "
                           f"per-layer shares; the language model being trained has {num_layers} layers")
    threshold = report["threshold"] if threshold is None else threshold
    route = suggest_route_layer(shares, threshold)
    return route, f"auto: {path}, threshold {threshold}"


def _parse_route_layer(value, model_args, num_layers: int) -> Tuple[int, str]:
    if value is None:
        raise RoutingError("--mm_routing dpvr_lf needs --dpvr_route_layer R (an integer, or 'auto' with "
                           "--dpvr_attention_report)")
    if isinstance(value, str) and value.strip().lower() == "auto":
        report = getattr(model_args, "dpvr_attention_report", None)
        if not report:
            raise RoutingError("--dpvr_route_layer auto needs --dpvr_attention_report (the attention_share.json of "
                               "`python -m llava_dsl.analyze attention`)")
        return route_layer_from_report(report, num_layers, getattr(model_args, "dpvr_attention_threshold", None))
    try:
        return int(value), "flag"
    except (TypeError, ValueError):
        raise RoutingError(f"--dpvr_route_layer={value!r}: expected an integer layer index or 'auto'") from None


def _copy_layer(side: VisionSideBranch, source: nn.Module) -> None:
    with gathered(source.parameters()):  # ZeRO-3: the source layer is partitioned across ranks
        side.copy_from(source)


def configure_routing(meta_model: nn.Module, model_args) -> Optional[RoutingSpec]:
    """Resolve the DPVR flags, build + initialise the side branch, persist the routing into the config.

    Called at the end of ``initialize_vision_modules`` (``meta_model`` is the ``LlavaLlamaModel``). A checkpoint
    that is already routed keeps its side branch when the flags ask for the same routing (or for none).
    """
    config = meta_model.config
    mode = getattr(model_args, "mm_routing", None)
    existing = routing_spec_from_config(config)
    if mode is None or mode == "none":
        given = {name: getattr(model_args, name, None) for name in
                 ("dpvr_route_layer", "dpvr_attention_report", "dpvr_side_init_layer", "dpvr_attention_threshold")}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            raise RoutingError(f"{', '.join(f'--{k}={v!r}' for k, v in given.items())} given without "
                               f"--mm_routing dpvr_lf")
        if existing is not None:
            print_once(f"llava_dsl: DPVR-LF routing from the checkpoint: {existing.describe()}")
        return existing
    if mode not in ROUTING_MODES:
        raise RoutingError(f"--mm_routing={mode!r}: expected one of {', '.join(ROUTING_MODES)} (or none)")
    num_layers = len(meta_model.layers)
    route, source = _parse_route_layer(getattr(model_args, "dpvr_route_layer", None), model_args, num_layers)
    spec = resolve_routing(num_layers, route, getattr(model_args, "dpvr_side_init_layer", None),
                           getattr(model_args, "dpvr_side_attention", "vision") or "vision")
    if existing is not None and existing != spec:
        raise RoutingError(f"{getattr(model_args, 'model_name_or_path', 'the checkpoint')} is routed as {existing}, "
                           f"but the flags ask for {spec}; its side branch was trained for the former")
    if spec.routes and getattr(meta_model, SIDE_BRANCH, None) is None:
        source_layer = meta_model.layers[spec.side_init_layer]
        reference = next(source_layer.parameters())
        side = VisionSideBranch(config, spec.side_init_layer).to(device=reference.device, dtype=reference.dtype)
        _copy_layer(side, source_layer)
        setattr(meta_model, SIDE_BRANCH, side)
    config.mm_routing = mode
    config.dpvr_route_layer = spec.route_layer
    config.dpvr_side_init_layer = spec.side_init_layer
    config.dpvr_side_attention = spec.side_attention
    config.dpvr_tune_fusion_layer = bool(getattr(model_args, "dpvr_tune_fusion_layer", False))
    config.dpvr_route_source = source
    print_once(f"llava_dsl: DPVR-LF routing ({source}): {spec.describe()}")
    return spec


def meta_model_init(self, config):
    """LlavaMetaModel.__init__, plus the side branch of a routed config (its weights come from the checkpoint)."""
    _UPSTREAM_META_INIT(self, config)
    spec = routing_spec_from_config(config)
    if spec is not None and spec.routes:
        setattr(self, SIDE_BRANCH, VisionSideBranch(config, spec.side_init_layer))


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(full_numel(p) for p in params if p.requires_grad), sum(full_numel(p) for p in params)


def routed_parameter_names(model: nn.Module) -> Tuple[str, ...]:
    """Names of the parameters a DPVR stage trains for this model's config."""
    spec = routing_spec_from_config(model.config)
    if spec is None or not spec.routes:
        return ()
    prefixes = [f"model.{SIDE_BRANCH}."]
    if getattr(model.config, "dpvr_tune_fusion_layer", False):
        prefixes.append(f"model.layers.{spec.fusion_layer}.")
    return tuple(name for name, _ in model.named_parameters() if name.startswith(tuple(prefixes)))


def prepare_routed_training(model: nn.Module, args) -> None:
    """Freeze everything but the side branch (and the fusion layer with --dpvr_tune_fusion_layer).

    Called when the Trainer is built: train() has finished setting requires_grad by then.
    """
    spec = routing_spec_from_config(model.config)
    if spec is None:
        return
    if not spec.routes:
        raise RoutingError(f"dpvr_route_layer={spec.route_layer} = L-1 routes nothing, so a DPVR stage has nothing to "
                           f"train; choose R < {spec.num_layers - 1}")
    conflicts = {
        "--lora_enable True": getattr(args, "lora_enable", False),
        "--tune_mm_mlp_adapter True": getattr(args, "tune_mm_mlp_adapter", False),
        "--unfreeze_mm_vision_tower True": getattr(model.config, "unfreeze_mm_vision_tower", False),
    }
    for flag, on in conflicts.items():
        if on:
            raise RoutingError(f"{flag} with --mm_routing dpvr_lf: the DPVR stage trains only the routed parts "
                               f"(side branch{', fusion layer' if model.config.dpvr_tune_fusion_layer else ''}) "
                               f"and starts from a trained LLaVA checkpoint; drop {flag.split()[0]}")
    names = set(routed_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    trainable, total = parameter_counts(model)
    parts = "side branch" + (f" + fusion layer {spec.fusion_layer}" if model.config.dpvr_tune_fusion_layer else "")
    print_once(f"llava_dsl: DPVR-LF trains the {parts}: {trainable:,} of {total:,} parameters "
                f"({100.0 * trainable / max(total, 1):.2f}%)")

_TEXT_IGNORED = -2  # stands for IGNORE_INDEX on text positions while LLaVA splices the image features in


def prepare_inputs_with_image_mask(model, input_ids, position_ids, attention_mask, past_key_values, labels,
                                   images, image_sizes=None):
    """LLaVA's ``prepare_inputs_labels_for_multimodal``, plus the (B, N) mask of the image positions it created.

    LLaVA gives image positions (and padding) the label IGNORE_INDEX and copies every other label. Text positions
    that are ignored anyway get a stand-in value on the way in, so that afterwards IGNORE_INDEX on a non-padding
    position means "image"; the stand-in is turned back into IGNORE_INDEX. One call, LLaVA's own splicing,
    truncation and padding side. The mask is None when LLaVA splices nothing (no images, or a decode step).
    """
    if labels is not None:
        odd = labels[(labels < 0) & (labels != IGNORE_INDEX)]
        if odd.numel():
            raise ValueError(f"labels contain {odd.unique().tolist()}: expected token ids or "
                             f"IGNORE_INDEX={IGNORE_INDEX}")
        marker = labels.masked_fill(labels == IGNORE_INDEX, _TEXT_IGNORED)
    elif input_ids is not None:
        marker = torch.zeros_like(input_ids)
    else:
        marker = None
    padding = attention_mask
    if attention_mask is None and input_ids is not None:
        padding = torch.ones_like(input_ids, dtype=torch.bool)  # to tell LLaVA's batch padding from images
    ids, pos, mask, past, embeds, marker = model.prepare_inputs_labels_for_multimodal(
        input_ids, position_ids, padding, past_key_values, marker, images, image_sizes)
    if embeds is None:  # nothing spliced; LLaVA returned its inputs
        return ids, pos, attention_mask, past, None, labels, None
    image_mask = (marker == IGNORE_INDEX) & mask.bool()
    new_labels = None if labels is None else marker.masked_fill(marker == _TEXT_IGNORED, IGNORE_INDEX)
    return ids, pos, (mask if attention_mask is not None else None), past, embeds, new_labels, image_mask


def _trunk_requires_grad(meta_model: nn.Module, spec: RoutingSpec) -> bool:
    """Whether anything upstream of the side branch and the fusion layer trains (embeddings, tower, projector...)."""
    skip = (f"{SIDE_BRANCH}.", f"layers.{spec.fusion_layer}.", "norm.")
    return any(p.requires_grad for name, p in meta_model.named_parameters() if not name.startswith(skip))


def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
            labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, images=None,
            image_sizes=None, return_dict=None, dpvr_image_mask=None):
    """LlavaLlamaForCausalLM.forward; the routed decoder for a routed config, LLaVA's own forward otherwise."""
    spec = routing_spec_from_config(self.config)
    if spec is None:
        if dpvr_image_mask is not None:
            raise ValueError("dpvr_image_mask given to a model whose config has no mm_routing")
        return _UPSTREAM_FORWARD(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                 use_cache=use_cache, output_attentions=output_attentions,
                                 output_hidden_states=output_hidden_states, images=images, image_sizes=image_sizes,
                                 return_dict=return_dict)
    config = self.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = config.use_return_dict if return_dict is None else return_dict
    use_cache = config.use_cache if use_cache is None else use_cache
    meta_model = self.get_model()
    if meta_model.gradient_checkpointing and self.training:
        use_cache = False  # as LlamaModel
    image_mask = dpvr_image_mask
    if inputs_embeds is None:
        (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels,
         image_mask) = prepare_inputs_with_image_mask(self, input_ids, position_ids, attention_mask, past_key_values,
                                                      labels, images, image_sizes)
        if inputs_embeds is None:
            inputs_embeds = meta_model.embed_tokens(input_ids)
    outputs = routed_forward(
        meta_model, getattr(meta_model, SIDE_BRANCH, None), spec, inputs_embeds, image_mask=image_mask,
        attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
        use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        trunk_requires_grad=_trunk_requires_grad(meta_model, spec))
    logits = self.lm_head(outputs.last_hidden_state).float()
    loss = None
    if labels is not None:
        shift_logits = logits[..., :-1, :].contiguous().view(-1, config.vocab_size)
        shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
        loss = nn.functional.cross_entropy(shift_logits, shift_labels)
    if not return_dict:
        rest = tuple(v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions) if v is not None)
        return ((loss,) if loss is not None else ()) + (logits,) + rest
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


@torch.no_grad()
def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
    """LlavaLlamaForCausalLM.generate; for a routed config it also hands the image mask to the prompt step."""
    if routing_spec_from_config(self.config) is None:
        return _UPSTREAM_GENERATE(self, inputs, images=images, image_sizes=image_sizes, **kwargs)
    position_ids = kwargs.pop("position_ids", None)
    attention_mask = kwargs.pop("attention_mask", None)
    if "inputs_embeds" in kwargs:
        raise NotImplementedError("`inputs_embeds` is not supported")  # as LLaVA's generate
    image_mask = None
    inputs_embeds = None
    if images is not None:
        (inputs, position_ids, attention_mask, _, inputs_embeds, _,
         image_mask) = prepare_inputs_with_image_mask(self, inputs, position_ids, attention_mask, None, None, images,
                                                      image_sizes)
    if inputs_embeds is None:
        inputs_embeds = self.get_model().embed_tokens(inputs)
    return super(LlavaLlamaForCausalLM, self).generate(position_ids=position_ids, attention_mask=attention_mask,
                                                       inputs_embeds=inputs_embeds, dpvr_image_mask=image_mask,
                                                       **kwargs)


def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, dpvr_image_mask=None,
                                  **kwargs):
    """LLaVA's, plus the image mask on the prompt step (the one that consumes ``inputs_embeds``)."""
    inputs = _UPSTREAM_PREPARE_FOR_GENERATION(self, input_ids, past_key_values=past_key_values,
                                              inputs_embeds=inputs_embeds, **kwargs)
    if dpvr_image_mask is not None and "inputs_embeds" in inputs:
        inputs["dpvr_image_mask"] = dpvr_image_mask
    return inputs

PATCHES = (
    (llava_arch.LlavaMetaModel, "__init__", meta_model_init,
     "a routed config must build its side branch before from_pretrained fills the weights"),
    (LlavaLlamaForCausalLM, "forward", forward,
     "the routed decoder needs the image positions, which LLaVA's forward computes and then drops"),
    (LlavaLlamaForCausalLM, "generate", generate,
     "LLaVA's generate also drops the image positions before calling transformers' generate"),
    (LlavaLlamaForCausalLM, "prepare_inputs_for_generation", prepare_inputs_for_generation,
     "hands the image mask to the prompt step only; decode steps read the routed KV cache"),
)

__all__ = ["DPVRArguments", "CONFIG_KEYS", "PATCHES", "configure_routing",
           "prepare_routed_training", "routing_spec_from_config", "prepare_inputs_with_image_mask",
           "parameter_counts", "routed_parameter_names", "route_layer_from_report", "SIDE_ATTENTION"]
