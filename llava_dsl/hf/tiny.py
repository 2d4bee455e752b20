"""Tiny random stock models, a word-level tokenizer and a processor, built locally (no hub): for tests and docs.

    python -m llava_dsl.hf.tiny OUT_DIR [--vision_feature_layer 4,3,1] [--num_blocks 4]   # a from_pretrained folder
"""
from __future__ import annotations

import argparse
import os

import torch
import transformers
from packaging.version import Version

V5 = Version(transformers.__version__) >= Version("5.0.0.dev0")
WORDS = ("the a is what written here in image text number cat dog red blue green yes no one two three four five six "
         "seven eight nine zero describe read say word letter color shape of it this there see").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    " </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(WORDS) + [str(d) for d in range(10)] + list("?.,!:"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.add_special_tokens(SPECIALS)  # matched whole, before the pre-tokenizer splits "USER:" at the colon
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]} if not V5 else {"extra_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _clip_config(num_blocks=4, image_size=32, patch_size=8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=num_blocks, num_attention_heads=4, projection_dim=32)


def _llama_config(vocab):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2)


def tiny_llava(vision_feature_layer=(4, 3, 1), family="llava", num_blocks=4, seed=0, strategy="default"):
    """A random ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` (fp32, eager attention)."""
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    vocab = len(tiny_tokenizer())
    image_token = SPECIALS.index("<image>")
    common = dict(vision_config=_clip_config(num_blocks), text_config=_llama_config(vocab),
                  vision_feature_layer=list(vision_feature_layer), vision_feature_select_strategy=strategy,
                  image_token_index=image_token, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    if family == "llava":
        config = LlavaConfig(image_seq_length=16, **common)
        cls = LlavaForConditionalGeneration
    elif family == "llava_next":
        config = LlavaNextConfig(image_grid_pinpoints=[[32, 32]], image_seq_length=16, **common)
        cls = LlavaNextForConditionalGeneration
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    return cls(config).eval()


def tiny_vipllava(vision_feature_layers=(1, 4, 3), num_blocks=4, seed=0):
    """A random ``VipLlavaForConditionalGeneration`` (fp32, eager attention). The default list does not start with
    its deepest layer: VipLlava's main layer is the deepest listed one, wherever it stands."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    config = VipLlavaConfig(vision_config=_clip_config(num_blocks), text_config=_llama_config(len(tiny_tokenizer())),
                            vision_feature_layers=list(vision_feature_layers), image_seq_length=16,
                            image_token_index=SPECIALS.index("<image>"), projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return VipLlavaForConditionalGeneration(config).eval()


def tiny_qwen3_vl(deepstack=(0, 1, 2), depth=4, seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vocab = len(tiny_tokenizer()) + 3
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    if V5:
        text.update(rope_parameters={**rope, "rope_theta": 10000.0})
    else:
        text.update(rope_scaling=rope, rope_theta=10000.0)
    vision = dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack))
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                           vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 3, video_token_id=vocab - 3)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def llava_inputs(model, batch=2, seq_text=6, seed=1):
    """input_ids with <image> expanded, pixel_values, labels (for a forward/backward test)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img = 16 if getattr(cfg, "vision_feature_select_strategy", "default") == "default" else 17  # VipLlava crops CLS
    image = torch.full((batch, n_img), cfg.image_token_index)
    text = torch.randint(7, cfg.text_config.vocab_size, (batch, seq_text), generator=g)
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    pixel = torch.randn(batch, 3, 32, 32, generator=g)
    labels = ids.clone()
    labels[ids == cfg.image_token_index] = -100
    out = dict(input_ids=ids, pixel_values=pixel, labels=labels, attention_mask=torch.ones_like(ids))
    if type(model).__name__.startswith("LlavaNext"):
        # LLaVA-NeXT: pixel_values [B, patches, 3, H, W] (base + one 32x32 tile) and the image sizes; the number of
        # image tokens follows the anyres packing: base 16 + tile 4x(4+1 newline) = 36
        out["pixel_values"] = torch.randn(batch, 2, 3, 32, 32, generator=g)
        out["image_sizes"] = torch.tensor([[32, 32]] * batch)
        n = 16 + 4 * 5
        image = torch.full((batch, n), cfg.image_token_index)
        ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
        labels = ids.clone()
        labels[ids == cfg.image_token_index] = -100
        out.update(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    return out


def qwen3_vl_inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    grid = torch.tensor([[1, 4, 4]] * batch)
    pixel = torch.randn(batch * 16, 3 * 2 * 8 * 8, generator=g)
    n_tok = 16 // 4
    rows = []
    for _ in range(batch):
        text = torch.randint(7, cfg.text_config.vocab_size - 3, (6,), generator=g)
        rows.append(torch.cat([text[:2], torch.tensor([cfg.vision_start_token_id]),
                               torch.full((n_tok,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                               text[2:]]))
    ids = torch.stack(rows)
    labels = ids.clone()
    labels[ids == cfg.image_token_id] = -100
    out = dict(input_ids=ids, pixel_values=pixel, image_grid_thw=grid, labels=labels,
               attention_mask=torch.ones_like(ids))
    if V5:  # 5.x computes M-RoPE from the processor's token types (1 = image)
        out["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
    return out


def tiny_processor(model):
    """A LlavaProcessor for ``tiny_llava`` (CLIP image processor at 32 px, the word-level tokenizer)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(),
                          patch_size=model.config.vision_config.patch_size,
                          vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>")


def save_tiny_llava(out_dir, **kwargs):
    model = tiny_llava(**kwargs)
    model.save_pretrained(out_dir)
    tiny_processor(model).save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--vision_feature_layer", default="4,3,1")
    parser.add_argument("--num_blocks", type=int, default=4)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    save_tiny_llava(args.out_dir, vision_feature_layer=[int(v) for v in args.vision_feature_layer.split(",")],
                    num_blocks=args.num_blocks)
    print(args.out_dir)


if __name__ == "__main__":
    main()
