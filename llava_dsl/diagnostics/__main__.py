"""Gradient-interference diagnostics: curves from ``dsl_grad_stats.json``, and training with the measurement on.

    python -m llava_dsl.diagnostics plot RUN_DIR [RUN_DIR ...] --out curves.png
    python -m llava_dsl.diagnostics train <llava_dsl.train flags> --dsl_grad_stats_every N \\
        [--dsl_grad_stats_dense_steps K] [--dsl_grad_stats_window W]

``plot`` draws one column per run (naive and detached side by side) and one row per statistic, a line per
block group, with shared axes along each row. It needs only Pillow (matplotlib is not part of the stack).
``train`` is ``python -m llava_dsl.train`` with the ``--dsl_grad_stats_*`` flags and the measuring trainer
(see docs/diagnostics.md); it also works under ``deepspeed --module llava_dsl.diagnostics train ...``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llava_dsl.diagnostics.plot import plot
from llava_dsl.diagnostics.stats import STATS_FILE


def train(argv: Sequence[str]) -> None:
    """``python -m llava_dsl.train argv``: the --dsl_grad_stats_* flags belong to the plugin's entry point."""
    from llava_dsl import train as train_entry

    train_entry.main(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N before the module's own arguments
    launcher_flags = [a for a in argv[:1] if a.startswith("--local_rank")]
    rest = argv[len(launcher_flags):]
    if rest and rest[0] == "train":
        train(launcher_flags + rest[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.diagnostics", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot_parser = commands.add_parser("plot", help="draw the grad-stats curves of one or more runs into one PNG")
    plot_parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                             help=f"a training output_dir holding {STATS_FILE} (or the json file itself)")
    plot_parser.add_argument("--out", required=True, help="PNG file to write")
    commands.add_parser("train", help="python -m llava_dsl.train with the --dsl_grad_stats_* flags")
    args = parser.parse_args(argv)
    try:
        print(plot(args.runs, args.out))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"llava_dsl.diagnostics plot: {error}") from None


if __name__ == "__main__":
    main()
