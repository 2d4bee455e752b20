"""``python -m llava_dsl.assets build|path``: the locally pretrained tiny tower and LM (``llava_dsl.assets.pretrained``).

    python -m llava_dsl.assets build                      # the demo's parts: tower 'slots' + LM, cached
    python -m llava_dsl.assets build --variant dense      # the tower that leaves the reading order to the LLM
    python -m llava_dsl.assets build --lm random          # with the untrained LM the demo uses
    python -m llava_dsl.assets build --quick              # the reduced build the tests use
    python -m llava_dsl.assets path --variant slots       # print the folders (building them if missing)
"""
from __future__ import annotations

import argparse
import json
import time
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    from llava_dsl.assets import pretrained

    parser = argparse.ArgumentParser(prog="python -m llava_dsl.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "path"))
    parser.add_argument("--variant", choices=sorted(pretrained.TOWER_VARIANTS), default="slots",
                        help="tower variant (default %(default)s)")
    parser.add_argument("--lm", choices=sorted(pretrained.LM_VARIANTS), default="pretrained",
                        help="LM variant: pretrained on the tokenizer's corpus, or random (the demo's; default "
                             "%(default)s)")
    parser.add_argument("--root", default=None,
                        help=f"cache folder (default ${pretrained.ENV_ROOT}, else ~/.cache/llava_dsl/assets)")
    parser.add_argument("--quick", action="store_true", help="the reduced build (half the steps) the tests use")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these matrices are tiny, and with two threads on cores that "
                             "other jobs share, a step took over ten times longer)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    started = time.time()
    try:
        paths = pretrained.build(args.variant, root=args.root, reduced=args.quick, lm_variant=args.lm,
                                 log=(lambda message: None) if args.command == "path" else pretrained._log)
    except pretrained.AssetError as error:
        raise SystemExit(f"llava_dsl.assets: {error}") from None
    if args.command == "path":
        print(json.dumps(paths, indent=1))
        return
    with open(paths["tower_report"], encoding="utf-8") as f:
        tower = json.load(f)
    with open(paths["lm_report"], encoding="utf-8") as f:
        lm = json.load(f)
    print(f"vision tower ({args.variant}): {paths['vision_tower']}\n"
          f"  held-out recognition: {tower['char_accuracy'] * 100:.1f}% characters, "
          f"{tower['string_accuracy'] * 100:.1f}% whole strings ({tower['heldout_head']} head, "
          f"{tower['settings']['eval_images']} images of unseen strings at unseen font sizes); "
          f"built in {tower['build_seconds']:.0f}s")
    print(f"language model: {paths['llm']}\n"
          f"  held-out perplexity {lm['heldout_perplexity']:.2f} (untrained {lm['heldout_perplexity_untrained']:.0f}; "
          f"{lm['settings']['steps']} training steps); "
          f"built in {lm['build_seconds']:.0f}s")
    print(f"use: --vision_tower {paths['vision_tower']} --model_name_or_path {paths['llm']}  "
          f"({time.time() - started:.0f}s now)")


if __name__ == "__main__":
    main()
