"""Detached Skip-Links in LLaMA-Factory: a launcher that takes LLaMA-Factory's own YAML plus the DSL keys.

    python -m llava_dsl.integrations.llamafactory cfg.yaml [key=value ...]          # = llamafactory-cli train
    torchrun --nproc_per_node 8 -m llava_dsl.integrations.llamafactory cfg.yaml     # several GPUs

In the YAML, beside LLaMA-Factory's keys (``freeze_vision_tower: false`` is needed: it defaults to true):

    dsl_detach_layers: [3, 1]     # hidden-state indices of the taps to detach (or: dsl_detach_depth: 1)
    dsl_off: false                # true: naive fusion, also from a checkpoint whose config carries the choice

LLaMA-Factory's ``load_model`` has no hook a YAML can reach, and its argument parser rejects unknown keys, so the
launcher reads the YAML with LLaMA-Factory's own reader (``key=value`` overrides included), removes the ``dsl_*``
keys, and calls its Python entry ``llamafactory.train.tuner.run_exp(args, callbacks=[...])``; the callback applies
the hook in ``on_init_end``, to the model the trainer will train (after LLaMA-Factory's freezing and adapters).
With no ``dsl_*`` key, a checkpoint's ``dsl_detach_layers`` is re-applied and any other model is left alone.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from llava_dsl.integrations import DSLOptions, configure, parse_depth, parse_layers

KEYS = ("dsl_detach_layers", "dsl_detach_depth", "dsl_off")
SOURCE = "LLaMA-Factory YAML (dsl_detach_layers / dsl_detach_depth)"


def split_args(args: dict) -> tuple:
    """(LLaMA-Factory's arguments without the DSL keys, ``DSLOptions``)."""
    args = dict(args)
    values = {key: args.pop(key, None) for key in KEYS}
    off = values["dsl_off"]
    if off not in (None, True, False):
        raise ValueError(f"{SOURCE}: dsl_off={off!r}; expected true or false")
    options = DSLOptions(detach_layers=parse_layers(values["dsl_detach_layers"], "dsl_detach_layers"),
                         detach_depth=parse_depth(values["dsl_detach_depth"], "dsl_detach_depth"), off=bool(off),
                         source=SOURCE,
                         unfreeze_hint="set freeze_vision_tower: false in the YAML (LLaMA-Factory freezes the vision "
                                       "tower by default)")
    return args, options


def callback(options: DSLOptions):
    from transformers import TrainerCallback

    class DSLCallback(TrainerCallback):
        def on_init_end(self, args, state, control, model=None, **kwargs):
            configure(model, options)

    return DSLCallback()


def main(argv: Optional[List[str]] = None, extra_callbacks=()) -> None:
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        raise SystemExit(f"usage: python -m llava_dsl.integrations.llamafactory CONFIG.yaml [key=value ...] "
                         f"(got {argv!r})")
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        args = read_args()  # LLaMA-Factory's reader: the file, merged with key=value overrides
    finally:
        sys.argv = saved
    args, options = split_args(args)
    run_exp(args=args, callbacks=[callback(options), *extra_callbacks])


if __name__ == "__main__":
    main()
