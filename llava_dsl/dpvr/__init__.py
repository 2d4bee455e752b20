"""DPVR-LF: dual-path vision token routing with late-layer fusion, over a Hugging Face ``LlamaModel``.

For a decoder of L layers and a routing layer R (arXiv 2606.09131; see docs/dpvr.md for every choice the
paper leaves open):

    layers [0, R)       joint: the full sequence, exactly as in the stock model
    side branch         the vision tokens only: one trainable decoder layer (a copy of LLM layer R by default)
    layers [R, L-1)     text only: image positions are dropped from the sequence, from attention and from the
                        KV cache; every token keeps its original position id, so RoPE sees the true positions
    layer L-1           fused: both streams back in their original order, full sequence

R = L-1 routes nothing: there are no text-only layers, the side branch is not used, and the forward is the
stock model's, operation for operation.

The layers are the model's own modules (projections, norms, MLP, rotary embedding); only the loop over them
and the attention arithmetic are written here, because per-layer key sets of different lengths do not fit
transformers 4.37's attention modules (their RoPE table is cut at the cache length, which is shorter than the
largest position id once image positions are gone). The arithmetic follows transformers' eager and SDPA paths
line for line, so an unrouted forward is bitwise the stock one.

Plain torch + transformers; no ``llava`` import.
"""
