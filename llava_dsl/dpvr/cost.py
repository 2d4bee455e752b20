"""DPVR-LF cost accounting at any LLaMA shape: prefill FLOPs, KV-cache size, side-branch parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "LlamaShape":
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, kv_heads, config.vocab_size)

LLAVA_15_7B = LlamaShape(num_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)


def _layer_flops(shape: LlamaShape, queries: int, kv_tokens: int, pairs: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one decoder layer: projections, attention, MLP."""
    d, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    projections = 2 * queries * d * d * 2 + 2 * kv_tokens * d * kv * 2  # q, o ; k, v
    attention = 2 * pairs * d * 2  # scores and weighted sum, over every (query, visible key) pair and head
    mlp = 2 * queries * d * shape.intermediate * 3
    return float(projections + attention + mlp)


def prefill_flops(shape: LlamaShape, text_before: int, image: int, text_after: int,
                  route_layer: Optional[int] = None, side_attention: str = "vision",
                  lm_head: bool = True, causal: bool = True) -> Dict[str, float]:
    """Analytic prefill FLOPs of the stock model (``route_layer=None``) or DPVR-LF, for one sequence laid out as
    ``text_before`` + ``image`` + ``text_after`` tokens (LLaVA: system prompt, image, question).

    ``causal`` counts the (query, key) pairs attention needs; ``causal=False`` counts the full rectangle that a
    dense kernel computes (what a FLOP counter reports for eager attention).
    """
    n = text_before + image + text_after
    t = text_before + text_after

    def pairs(queries: int, keys: int, causal_pairs: int) -> int:
        return causal_pairs if causal else queries * keys

    full = _layer_flops(shape, n, n, pairs(n, n, n * (n + 1) // 2))
    parts = {"lm_head": 2.0 * n * shape.hidden * shape.vocab if lm_head else 0.0}
    if route_layer is None or route_layer >= shape.num_layers - 1:
        parts["full_layers"] = full * shape.num_layers
        parts["text_only_layers"] = parts["side_branch"] = 0.0
    else:
        parts["full_layers"] = full * (route_layer + 1)
        parts["text_only_layers"] = (_layer_flops(shape, t, t, pairs(t, t, t * (t + 1) // 2))
                                     * (shape.num_layers - 1 - route_layer))
        if side_attention == "vision":
            parts["side_branch"] = _layer_flops(shape, image, image, pairs(image, image, image * (image + 1) // 2))
        else:  # keys and values of the whole chunk are projected; the text after the image is masked out
            parts["side_branch"] = _layer_flops(shape, image, n,
                                                pairs(image, n, image * text_before + image * (image + 1) // 2))
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_elements(shape: LlamaShape, text: int, image: int, route_layer: Optional[int] = None) -> int:
    """Cached K and V elements after the prompt (per sequence)."""
    kv = shape.hidden // shape.heads * shape.kv_heads
    if route_layer is None or route_layer >= shape.num_layers - 1:
        return 2 * shape.num_layers * (text + image) * kv
    full_layers = route_layer + 1
    return 2 * kv * (full_layers * (text + image) + (shape.num_layers - full_layers) * text)


def side_branch_parameters(shape: LlamaShape) -> int:
    d, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    return 2 * d * d + 2 * d * kv + 3 * d * shape.intermediate + 2 * d
