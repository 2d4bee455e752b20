"""python -m llava_dsl.probes damage|use ... (see llava_dsl/probes/__init__.py and docs/diagnostics.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from llava_dsl.probes.towers import ProbeError


def _layers(text: Optional[str]):
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ProbeError(f"--layers {text!r}: expected comma-separated hidden-state indices such as 1,2,3") from None


def _write(path: str, report: dict) -> None:
    from llava_dsl.checkpointing.atomic import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1))


def damage(argv: List[str]) -> dict:
    from llava_dsl.probes.damage import DamageSettings, _check_finite, damage_probe, table

    defaults = DamageSettings()
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.probes damage",
                                     description="Linear probes (glyph identity, pixel R^2) on the frozen features "
                                                 "of each tapped block, against the pretrained tower.")
    parser.add_argument("checkpoints", nargs="+", help="LLaVA-1.5 checkpoints, Hugging Face Llava folders or CLIP "
                                                       "vision folders")
    parser.add_argument("--reference", default=None, help="the tower to compare with (default: the first LLaVA-1.5 "
                                                          "checkpoint's mm_vision_tower)")
    parser.add_argument("--layers", default=None, help="hidden-state indices (default: the first checkpoint's main "
                                                       "layer and taps)")
    parser.add_argument("--output", required=True, help="JSON report to write")
    for name in ("num_train", "num_test", "seed", "batch_size", "min_digits", "max_digits"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--ridge", type=float, default=defaults.ridge)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    settings = DamageSettings(num_train=args.num_train, num_test=args.num_test, seed=args.seed, ridge=args.ridge,
                              batch_size=args.batch_size, min_digits=args.min_digits, max_digits=args.max_digits)
    report = damage_probe(args.checkpoints, args.reference, _layers(args.layers), settings, args.device)
    _check_finite(report)
    _write(args.output, report)
    print(table(report))
    print(f"llava_dsl.probes damage: wrote {args.output}")
    return report


def use(argv: List[str]) -> dict:
    from llava_dsl.probes.use import add_use_flags, use_from_args

    parser = argparse.ArgumentParser(prog="python -m llava_dsl.probes use",
                                     description="Tap ablation: each tap's slice of the projector input replaced "
                                                 "by its training mean; the exact-match drop per tap.")
    add_use_flags(parser)
    return use_from_args(parser.parse_args(argv))


COMMANDS = {"damage": damage, "use": use}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m llava_dsl.probes {{{'|'.join(COMMANDS)}}} ... (got {argv[:1] or 'nothing'})")
    from llava_dsl.evaluate.generate import EvalInputError

    try:
        COMMANDS[argv[0]](argv[1:])
    except (ProbeError, EvalInputError) as error:
        raise SystemExit(f"llava_dsl.probes {argv[0]}: {error}") from None


if __name__ == "__main__":
    main()
