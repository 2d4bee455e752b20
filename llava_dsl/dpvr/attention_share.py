"""``python -m llava_dsl.analyze attention``: where do the vision tokens saturate in a LLaVA checkpoint?

Text-to-image attention share of layer l (what DPVR-LF's routing layer is chosen from):

    share_l = mean over samples s of
              mean over text query positions q of sample s that follow its first image token of
              mean over heads h of
              sum over image key positions k of  A_l[s, h, q, k]

A_l is layer l's softmax attention (rows sum to 1), so share_l is in [0, 1]. Text before the image is left out
by default (``--queries after_image``): causal attention gives it no image keys to look at, so it would only
dilute the average; ``--queries all_text`` counts it too.

The suggested routing layer is the first layer R after which the share stays below ``--threshold``
(layers R .. L-2; the fusion layer L-1 sees the full sequence anyway); R = L-1 (nothing routed) when there is
none. ``--dpvr_route_layer auto --dpvr_attention_report OUT/attention_share.json`` reads it back.

    python -m llava_dsl.analyze attention --model-path ./checkpoints/llava-v1.5-7b \
        --data-path ./playground/data/llava_v1_5_mix665k.json --image-folder ./playground/data \
        --num-samples 64 --threshold 0.05 --out ./analysis/llava-v1.5-7b

Writes OUT/attention_share.json (shares, per-sample shares, threshold, suggestion, definition),
OUT/attention_share.md (table) and OUT/attention_share.png (plot); prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llava_dsl.checkpointing.atomic import atomic_write_text
from llava_dsl.dpvr.spec import suggest_route_layer
from llava_dsl.plots import plot_curves, save_png

QUERY_SETS = ("after_image", "all_text")

REPORT_NAME = "attention_share"


def query_positions(image_mask: torch.Tensor, valid: Optional[torch.Tensor] = None,
                    queries: str = "after_image") -> torch.Tensor:
    """(B, N) mask of the text query positions the share averages over."""
    if queries not in QUERY_SETS:
        raise ValueError(f"queries={queries!r}: expected one of {', '.join(QUERY_SETS)}")
    text = ~image_mask
    if valid is not None:
        text = text & valid.bool()
    if queries == "all_text":
        return text
    seen_image = image_mask.long().cumsum(dim=1) > 0  # at or after the first image token
    return text & seen_image


def text_to_image_share(attentions: Sequence[torch.Tensor], image_mask: torch.Tensor,
                        query_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-layer share (B, L) from per-layer attention weights (B, H, N, N)."""
    if not bool(image_mask.any(dim=1).all()):
        raise ValueError("a sample without image positions: its text-to-image share is undefined")
    counts = query_mask.sum(dim=1)
    if not bool((counts > 0).all()):
        raise ValueError("a sample without text query positions after its image (nothing follows the image)")
    shares = []
    for layer, weights in enumerate(attentions):
        if weights is None:
            raise ValueError(f"layer {layer}: no attention weights (run the model with output_attentions=True)")
        if weights.dim() != 4 or weights.shape[-1] != image_mask.shape[1] or weights.shape[-2] != image_mask.shape[1]:
            raise ValueError(f"layer {layer}: attention of shape {tuple(weights.shape)}; expected (B, H, N, N) with "
                             f"N = {image_mask.shape[1]} (a prefill without a cache)")
        mass = (weights.float() * image_mask[:, None, None, :].float()).sum(dim=-1).mean(dim=1)  # (B, N)
        shares.append((mass * query_mask.float()).sum(dim=1) / counts.float())
    return torch.stack(shares, dim=1)


def load_samples(data_path: Optional[str], image_folder: str, question: str, num_samples: int) -> List[Tuple[str, str]]:
    """(image path, question) pairs: from a LLaVA-format json (first human turn), or every image of the folder."""
    if not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder={image_folder}: no such folder")
    samples: List[Tuple[str, str]] = []
    if data_path:
        with open(data_path) as f:
            records = json.load(f)
        for record in records:
            if "image" not in record:
                continue  # text-only conversations have no image to measure
            turns = [t for t in record.get("conversations", []) if t.get("from") == "human"]
            text = turns[0]["value"].replace("<image>", "").strip() if turns else question
            samples.append((os.path.join(image_folder, record["image"]), text or question))
            if len(samples) == num_samples:
                break
        if not samples:
            raise ValueError(f"--data-path={data_path}: no record with an 'image' field")
    else:
        names = sorted(n for n in os.listdir(image_folder) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        if not names:
            raise ValueError(f"--image-folder={image_folder}: no .png/.jpg/.jpeg/.webp images")
        samples = [(os.path.join(image_folder, n), question) for n in names[:num_samples]]
    for path, _ in samples:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path} (from {data_path or image_folder}): no such file")
    return samples


@torch.no_grad()
def attention_shares(model, tokenizer, image_processor, samples: Sequence[Tuple[str, str]],
                     conv_mode: str = "vicuna_v1", queries: str = "after_image") -> torch.Tensor:
    """(S, L) shares of a loaded LLaVA model, one sample at a time (prompts differ in length)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    from llava_dsl.dpvr.llava_patches import prepare_inputs_with_image_mask

    if conv_mode not in conv_templates:
        raise ValueError(f"--conv-mode={conv_mode!r}: expected one of LLaVA's {sorted(conv_templates)}")
    device, dtype = model.device, model.dtype
    rows = []
    for path, question in samples:
        conv = conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}")
        conv.append_message(conv.roles[1], None)
        input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        input_ids = input_ids[None].to(device)
        image = Image.open(path).convert("RGB")
        pixels = process_images([image], image_processor, model.config).to(device=device, dtype=dtype)
        (_, position_ids, attention_mask, _, embeds, _, image_mask) = prepare_inputs_with_image_mask(
            model, input_ids, None, None, None, None, pixels, [image.size])
        out = model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                    output_attentions=True, use_cache=False, return_dict=True,
                    **({"dpvr_image_mask": image_mask} if getattr(model.config, "mm_routing", None) else {}))
        rows.append(text_to_image_share(out.attentions, image_mask, query_positions(image_mask, None, queries))[0])
    return torch.stack(rows)


def summarize(per_sample: torch.Tensor, threshold: float) -> Dict:
    shares = per_sample.mean(dim=0).tolist()
    spread = per_sample.std(dim=0, unbiased=False).tolist()
    return {"shares": shares, "std": spread, "threshold": threshold,
            "suggested_route_layer": suggest_route_layer(shares, threshold), "num_layers": len(shares),
            "num_samples": per_sample.shape[0], "per_sample": per_sample.tolist()}


def markdown_table(report: Dict) -> str:
    route = report["suggested_route_layer"]
    lines = ["| layer | text-to-image share | std over samples | |", "|---:|---:|---:|---|"]
    for layer, (share, std) in enumerate(zip(report["shares"], report["std"])):
        note = []
        if layer == route and route < report["num_layers"] - 1:
            note.append(f"suggested R (share < {report['threshold']} from here to L-2)")
        if layer == report["num_layers"] - 1:
            note.append("fusion layer")
        lines.append(f"| {layer} | {share:.4f} | {std:.4f} | {'; '.join(note)} |")
    return "\n".join(lines)


def share_plot(report: Dict):
    """The per-layer share against the threshold, the suggested R in the title."""
    shares = report["shares"]
    title = (f"text-to-image attention share per LLM layer; suggested R = {report['suggested_route_layer']} "
             f"(threshold {report['threshold']})")
    return plot_curves({"share": (list(range(len(shares))), shares)}, {"threshold": report["threshold"]},
                       title, "LLM layer", "share")


def write_report(out_dir: str, report: Dict) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{REPORT_NAME}.{ext}") for ext in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2))
    atomic_write_text(paths["md"], (f"# Text-to-image attention share: {report.get('model_path', '')}\n\n{report['definition']}\n\n"
                f"{markdown_table(report)}\n\nSuggested routing layer: R = {report['suggested_route_layer']} "
                f"(threshold {report['threshold']}, {report['num_samples']} samples).\n"))
    save_png(share_plot(report), paths["png"])
    return paths

DEFINITION = ("share_l = mean over samples of the mean over {queries} text query positions and over heads of the "
              "attention mass on image key positions, in layer l (softmax weights, rows sum to 1).")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def run_attention(args: argparse.Namespace) -> Dict:
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    import llava_dsl

    llava_dsl.register()  # includes the DPVR-LF model hooks
    if not 0.0 < args.threshold < 1.0:
        raise SystemExit(f"--threshold={args.threshold}: expected a share in (0, 1)")
    samples = load_samples(args.data_path, args.image_folder, args.question, args.num_samples)
    name = args.model_name or get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, name, device_map=args.device, device=args.device)
    model.to(dtype=_dtype(args.dtype)).eval()
    per_sample = attention_shares(model, tokenizer, image_processor, samples, args.conv_mode, args.queries)
    report = summarize(per_sample, args.threshold)
    report.update(model_path=args.model_path, queries=args.queries, conv_mode=args.conv_mode,
                  definition=DEFINITION.format(queries="the" if args.queries == "all_text" else "post-image"),
                  images=[path for path, _ in samples])
    paths = write_report(args.out, report)
    print(markdown_table(report))
    print(f"suggested routing layer R = {report['suggested_route_layer']} (threshold {args.threshold}); "
          f"wrote {', '.join(paths.values())}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.analyze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attention", help="per-layer text-to-image attention share; suggests the DPVR routing layer")
    att.add_argument("--model-path", required=True, help="LLaVA checkpoint folder (its name must contain 'llava')")
    att.add_argument("--model-base", default=None, help="base LLM for LoRA checkpoints, as LLaVA's loader")
    att.add_argument("--model-name", default=None, help="name given to LLaVA's loader (default: from the path)")
    att.add_argument("--image-folder", required=True)
    att.add_argument("--data-path", default=None,
                     help="LLaVA-format json; its first human turns are the questions (default: every image of the "
                          "folder with --question)")
    att.add_argument("--question", default="Describe the image.")
    att.add_argument("--num-samples", type=int, default=32)
    att.add_argument("--threshold", type=float, default=0.05)
    att.add_argument("--queries", choices=QUERY_SETS, default="after_image")
    att.add_argument("--conv-mode", default="vicuna_v1")
    att.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    att.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                     default="float16" if torch.cuda.is_available() else "float32")
    att.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: Optional[List[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise SystemExit(f"--num-samples={args.num_samples}: expected at least 1")
    return run_attention(args)
