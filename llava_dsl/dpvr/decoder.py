"""The routed decoder: one LLaMA layer on any query and key set, the vision side branch, the KV cache with
per-layer key sets, and ``routed_forward`` (kept together: they are one algorithm)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb, repeat_kv

from llava_dsl.dpvr.spec import RoutingError, RoutingSpec


def decoder_layer_forward(layer: LlamaDecoderLayer, hidden: torch.Tensor, position_ids: torch.Tensor, rope_len: int,
                          bias: Optional[torch.Tensor], is_causal: bool, eager: bool,
                          past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                          kv_hidden: Optional[torch.Tensor] = None, kv_position_ids: Optional[torch.Tensor] = None,
                          want_weights: bool = False,
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """``LlamaDecoderLayer.forward`` with the attention written out (transformers 4.37.2, eager and SDPA paths).

    Queries come from ``hidden``; keys/values from ``kv_hidden`` (default ``hidden``) appended to ``past_kv``.
    ``bias`` is an additive (B, 1, q, k) mask or None; RoPE uses ``rope_len`` for its table (the timeline length,
    what the stock model passes) and the given position ids. Returns (output, attention weights or None, (K, V)).
    """
    attn = layer.self_attn
    if attn.config.pretraining_tp > 1:
        raise RoutingError(f"pretraining_tp={attn.config.pretraining_tp}: the routed forward supports only 1")
    residual = hidden
    normed = layer.input_layernorm(hidden)
    kv_in = normed if kv_hidden is None else layer.input_layernorm(kv_hidden)
    kv_pos = position_ids if kv_position_ids is None else kv_position_ids
    bsz, q_len, _ = normed.shape
    k_len = kv_in.shape[1]

    query = attn.q_proj(normed).view(bsz, q_len, attn.num_heads, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(kv_in).view(bsz, k_len, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    value = attn.v_proj(kv_in).view(bsz, k_len, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    cos, sin = attn.rotary_emb(value, seq_len=rope_len)
    if kv_hidden is None:
        query, key = apply_rotary_pos_emb(query, key, cos, sin, position_ids)
    else:
        query, _ = apply_rotary_pos_emb(query, query, cos, sin, position_ids)
        key, _ = apply_rotary_pos_emb(key, key, cos, sin, kv_pos)
    if past_kv is not None:
        key = torch.cat([past_kv[0], key], dim=-2)
        value = torch.cat([past_kv[1], value], dim=-2)
    present = (key, value)
    key = repeat_kv(key, attn.num_key_value_groups)
    value = repeat_kv(value, attn.num_key_value_groups)

    weights = None
    if eager:
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(attn.head_dim)
        if bias is not None:
            scores = scores + bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=attn.attention_dropout, training=attn.training)
        out = torch.matmul(probs, value)
        weights = probs if want_weights else None
    else:
        if query.device.type == "cuda" and bias is not None:  # as transformers: SDPA bug with strided inputs
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                             dropout_p=attn.attention_dropout if attn.training else 0.0,
                                             is_causal=is_causal)
    out = out.transpose(1, 2).contiguous().reshape(bsz, q_len, attn.hidden_size)
    hidden = residual + attn.o_proj(out)
    residual = hidden
    hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, weights, present


def attention_bias(q_index: torch.Tensor, key_index: torch.Tensor, key_valid: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, q, k) mask: a key is visible if it is valid and not later than the query (timeline index)."""
    allowed = key_valid[:, None, :] & (key_index[:, None, :] <= q_index[:, :, None])
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_index.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class _Group:
    """The attention context shared by the layers of one group (joint/fused, text-only or side branch)."""
    bias: Optional[torch.Tensor]
    is_causal: bool


def _group_context(q_index, key_index, key_valid, dtype, self_attention_prefill: bool, eager: bool) -> _Group:
    """Masks for one group, as transformers builds them: eager always adds its 4D mask (zeros where allowed);
    SDPA gets no mask when causality alone or nothing at all has to be masked (so it can use a fused kernel)."""
    if eager:
        return _Group(attention_bias(q_index, key_index, key_valid, dtype), False)
    all_valid = bool(key_valid.all())
    if self_attention_prefill and all_valid:
        return _Group(None, q_index.shape[1] > 1)  # keys == queries, nothing padded: plain causal
    if q_index.shape[1] == 1 and all_valid and bool((key_index <= q_index).all()):
        return _Group(None, False)  # one query that sees every key
    return _Group(attention_bias(q_index, key_index, key_valid, dtype), False)


class VisionSideBranch(nn.Module):
    """One LLaMA decoder layer that the vision tokens pass through instead of layers [R, L-1).

    Initialised as a copy of LLM layer ``source_layer`` (``copy_from``); trained in the DPVR stage.
    """

    def __init__(self, config, source_layer: int):
        super().__init__()
        self.source_layer = source_layer
        self.layer = LlamaDecoderLayer(config, layer_idx=source_layer)

    @torch.no_grad()
    def copy_from(self, source: LlamaDecoderLayer) -> None:
        self.layer.load_state_dict(source.state_dict())

    def forward(self, vision_states: torch.Tensor, position_ids: torch.Tensor, rope_len: int,
                bias: Optional[torch.Tensor] = None, is_causal: bool = False, eager: bool = False,
                context_states: Optional[torch.Tensor] = None,
                context_position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vision states (B, V, D) at the routing layer -> the vision states the fusion layer receives."""
        out, _, _ = decoder_layer_forward(self.layer, vision_states, position_ids, rope_len, bias, is_causal, eager,
                                          kv_hidden=context_states, kv_position_ids=context_position_ids)
        return out


class RoutedCache(Cache):
    """Keys/values per layer; text-only layers hold only the text positions.

    Layers < R and the fusion layer cache every position of the timeline; layers [R, L-1) cache the text
    positions only, and remember which timeline index each of their slots holds (``text_index``) and whether
    the slot is real (``text_slot_valid``: rows of a batch can have different numbers of image tokens).
    ``seen_tokens`` is the timeline length, which is what ``generate`` slices its inputs by.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.text_index: Optional[torch.Tensor] = None
        self.text_slot_valid: Optional[torch.Tensor] = None
        self.seen_tokens = 0

    def layer_kv(self, layer: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return None if self.keys[layer] is None else (self.keys[layer], self.values[layer])

    def store(self, layer: int, kv: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.keys[layer], self.values[layer] = kv

    def layer_lengths(self) -> List[int]:
        return [0 if k is None else k.shape[-2] for k in self.keys]

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    # transformers' Cache interface, as far as generate() and prepare_inputs_for_generation use it
    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return self.seen_tokens

    def get_max_length(self) -> Optional[int]:
        return None

    def __len__(self) -> int:
        return sum(k is not None for k in self.keys)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        raise NotImplementedError("RoutedCache is filled by llava_dsl.dpvr.routed_forward; the model's own attention "
                                  "modules cannot use it (their key sets differ per layer)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i, key in enumerate(self.keys):
            if key is not None:
                self.keys[i] = key.index_select(0, beam_idx.to(key.device))
                self.values[i] = self.values[i].index_select(0, beam_idx.to(key.device))
        if self.text_index is not None:
            self.text_index = self.text_index.index_select(0, beam_idx.to(self.text_index.device))
            self.text_slot_valid = self.text_slot_valid.index_select(0, beam_idx.to(self.text_index.device))


@dataclass
class _Streams:
    text_local: torch.Tensor  # (B, Tt) chunk index of each text slot, in original order
    text_valid: torch.Tensor  # (B, Tt)
    vision_local: torch.Tensor  # (B, Tv)
    vision_valid: torch.Tensor  # (B, Tv)
    merge_slot: torch.Tensor  # (B, N): where position n sits in cat([text slots, vision slots])


def _split(image_mask: torch.Tensor) -> _Streams:
    n = image_mask.shape[1]
    n_image = image_mask.sum(1)
    n_text = n - n_image
    t_len, v_len = int(n_text.max()), int(n_image.max())
    arange_n = torch.arange(n, device=image_mask.device)
    # stable sorts keep each stream in its original order; padding slots (rows with fewer tokens) are invalid
    text_local = torch.sort(image_mask.to(torch.uint8), dim=1, stable=True).indices[:, :t_len]
    vision_local = torch.sort((~image_mask).to(torch.uint8), dim=1, stable=True).indices[:, :v_len]
    text_valid = arange_n[:t_len][None] < n_text[:, None]
    vision_valid = arange_n[:v_len][None] < n_image[:, None]
    merge_slot = torch.where(image_mask, t_len + image_mask.cumsum(1) - 1, (~image_mask).cumsum(1) - 1)
    return _Streams(text_local, text_valid, vision_local, vision_valid, merge_slot)


def _take(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, N, ...) at chunk indices ``local`` (B, T)."""
    index = local.reshape(*local.shape, *([1] * (x.dim() - 2))).expand(*local.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def _merge(text: torch.Tensor, vision: torch.Tensor, streams: _Streams) -> torch.Tensor:
    return _take(torch.cat([text, vision], dim=1), streams.merge_slot)


def _grid(weights: torch.Tensor, rows: torch.Tensor, row_valid: torch.Tensor, cols: torch.Tensor,
          col_valid: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """Scatter compact attention weights (B, H, q, k) into the full (B, H, n_rows, n_cols) grid, zeros elsewhere."""
    grid = weights.new_zeros(weights.shape[0], weights.shape[1], n_rows, n_cols)
    for b in range(weights.shape[0]):
        w = weights[b][:, row_valid[b]][:, :, col_valid[b]]
        grid[b][:, rows[b][row_valid[b]][:, None], cols[b][col_valid[b]][None, :]] = w
    return grid


def routed_forward(model, side_branch: Optional[VisionSideBranch], spec: RoutingSpec, inputs_embeds: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[RoutedCache] = None,
                   use_cache: bool = False, output_attentions: bool = False, output_hidden_states: bool = False,
                   trunk_requires_grad: bool = True) -> BaseModelOutputWithPast:
    """DPVR-LF over ``model`` (a transformers ``LlamaModel``: ``layers``, ``norm``, ``config``).

    ``image_mask`` (B, N) marks the image positions of this chunk (None: none). ``attention_mask`` is the usual
    2D (B, past + N) padding mask. With ``trunk_requires_grad=False`` the joint and text-only layers run without
    autograd (nothing upstream of them trains), so a DPVR training step keeps activations for the side branch
    and the fusion layer only. Returns ``last_hidden_state`` after the final norm, a ``RoutedCache`` when
    ``use_cache``, and, on request, per-layer hidden states and attention weights on the full (N, past + N) grid
    (zeros where a layer does not attend: image rows and columns of the text-only layers).
    Hidden-state entry l is the input of layer l; from R+1 on its image positions hold the side-branch output.
    """
    if spec.num_layers != len(model.layers):
        raise RoutingError(f"routing spec is for {spec.num_layers} layers, the model has {len(model.layers)}")
    if spec.routes and side_branch is None:
        raise RoutingError(f"route layer {spec.route_layer} < {spec.num_layers - 1} needs a side branch; none is built")
    if past_key_values is not None and not isinstance(past_key_values, RoutedCache):
        if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
            past_key_values = None
        elif isinstance(past_key_values, (tuple, list)) and len(past_key_values) == 0:
            past_key_values = None
        else:
            raise RoutingError(f"past_key_values of type {type(past_key_values).__name__}: a routed model continues "
                               f"only its own RoutedCache")
    bsz, n, _ = inputs_embeds.shape
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    past = past_key_values
    past_len = past.seen_tokens if past is not None else 0
    total = past_len + n

    if image_mask is not None:
        if tuple(image_mask.shape) != (bsz, n):
            raise RoutingError(f"image_mask of shape {tuple(image_mask.shape)}; expected {(bsz, n)} (the input chunk)")
        image_mask = image_mask.to(device=device, dtype=torch.bool)
        if not bool(image_mask.any()):
            image_mask = None
    if image_mask is not None and past_len:
        raise RoutingError(f"image positions in a chunk that continues a cache of {past_len} tokens: the routed cache "
                           f"holds images only from the first forward (the prompt)")
    if attention_mask is None:
        key_valid = torch.ones(bsz, total, dtype=torch.bool, device=device)
    else:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (bsz, total):
            raise RoutingError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected the 2D padding mask "
                               f"{(bsz, total)} (past {past_len} + chunk {n})")
        key_valid = attention_mask.to(device=device, dtype=torch.bool)
    if position_ids is None:
        position_ids = torch.arange(past_len, total, dtype=torch.long, device=device)[None]
    position_ids = position_ids.expand(bsz, n) if position_ids.shape[0] == 1 else position_ids

    use_cache = bool(use_cache)
    cache = (past if past is not None else RoutedCache(spec.num_layers)) if use_cache else None
    eager = output_attentions or getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    checkpointing = bool(getattr(model, "gradient_checkpointing", False)) and model.training
    q_index = torch.arange(past_len, total, device=device)[None].expand(bsz, n)
    full_index = torch.arange(total, device=device)[None].expand(bsz, total)
    full = _group_context(q_index, full_index, key_valid, dtype, past_len == 0, eager)

    hidden_states: List[torch.Tensor] = []
    attentions: List[torch.Tensor] = []

    def run(layer_idx, x, group, pos):
        layer = model.layers[layer_idx]
        past_kv = past.layer_kv(layer_idx) if past is not None else None
        if checkpointing and torch.is_grad_enabled() and x.requires_grad and cache is None:
            out = model._gradient_checkpointing_func(
                lambda h: decoder_layer_forward(layer, h, pos, total, group.bias, group.is_causal, eager)[0], x)
            return out, None
        out, weights, present = decoder_layer_forward(layer, x, pos, total, group.bias, group.is_causal, eager,
                                                      past_kv=past_kv, want_weights=output_attentions)
        if cache is not None:
            cache.store(layer_idx, present)
        return out, weights

    x = inputs_embeds
    with torch.set_grad_enabled(torch.is_grad_enabled() and trunk_requires_grad):
        for layer_idx in spec.joint_layers:
            if output_hidden_states:
                hidden_states.append(x)
            x, weights = run(layer_idx, x, full, position_ids)
            if output_attentions:
                attentions.append(weights)

    if spec.routes:
        if output_hidden_states:
            hidden_states.append(x)
        # streams of this chunk; without images the text stream is the whole chunk, in place
        streams = _split(image_mask) if image_mask is not None else None
        if streams is not None:
            text_x, text_pos = _take(x, streams.text_local), _take(position_ids, streams.text_local)
            new_text_index = _take(q_index, streams.text_local)
            new_text_valid = streams.text_valid
        else:
            text_x, text_pos, new_text_index = x, position_ids, q_index
            new_text_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
        text_index = new_text_index if past is None else torch.cat([past.text_index, new_text_index], 1)
        text_slot_valid = new_text_valid if past is None else torch.cat([past.text_slot_valid, new_text_valid], 1)
        text_key_valid = text_slot_valid & torch.gather(key_valid, 1, text_index)
        text_group = _group_context(new_text_index, text_index, text_key_valid, dtype, past is None, eager)

        vision_out = None
        if streams is not None and streams.vision_local.shape[1]:
            vision_x = _take(x, streams.vision_local)
            vision_pos = _take(position_ids, streams.vision_local)
            vision_q = _take(q_index, streams.vision_local)
            if spec.side_attention == "vision":
                ctx_states = ctx_pos = None
                vision_key_valid = streams.vision_valid & torch.gather(key_valid, 1, vision_q)
                side = _group_context(vision_q, vision_q, vision_key_valid, dtype, True, eager)
            else:  # the text prefix as well: every key of the chunk up to the vision token, at the routing input
                ctx_states, ctx_pos = x, position_ids
                side = _group_context(vision_q, full_index, key_valid, dtype, False, eager)
            vision_out = side_branch(vision_x, vision_pos, total, side.bias, side.is_causal, eager, ctx_states, ctx_pos)

        with torch.set_grad_enabled(torch.is_grad_enabled() and trunk_requires_grad):
            for layer_idx in spec.text_only_layers:
                if output_hidden_states and layer_idx > spec.route_layer:
                    hidden_states.append(x if streams is None else _merge(text_x, vision_out, streams))
                text_x, weights = run(layer_idx, text_x, text_group, text_pos)
                if output_attentions:
                    rows = (streams.text_local if streams is not None
                            else torch.arange(n, device=device)[None].expand(bsz, n))
                    attentions.append(_grid(weights, rows, new_text_valid, text_index, text_key_valid, n, total))
                if streams is None:
                    x = text_x
        if cache is not None:
            cache.text_index, cache.text_slot_valid = text_index, text_slot_valid
        x = text_x if streams is None else _merge(text_x, vision_out, streams)

    if output_hidden_states:
        hidden_states.append(x)
    x, weights = run(spec.fusion_layer, x, full, position_ids)
    if output_attentions:
        attentions.append(weights)
    x = model.norm(x)
    if output_hidden_states:
        hidden_states.append(x)
    if cache is not None:
        cache.seen_tokens = total
    return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache,
                                   hidden_states=tuple(hidden_states) if output_hidden_states else None,
                                   attentions=tuple(attentions) if output_attentions else None)
