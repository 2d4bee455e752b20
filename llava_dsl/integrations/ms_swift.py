"""Detached Skip-Links in ms-swift: an external plugin file that registers the callback ``dsl``.

    DSL_DETACH_LAYERS=3,1 swift sft --model ... --freeze_vit false \\
        --external_plugins "$(python -m llava_dsl.integrations.ms_swift)" --callbacks dsl

ms-swift imports the file given to ``--external_plugins`` (by path, as a module of its own) before it builds the
trainer; ``--callbacks dsl`` makes the trainer construct ``DSLCallback(args, trainer)``, and its ``on_init_end``
applies the hook to the model the trainer will train (after ms-swift's LoRA / freezing, before accelerate wraps it).
ms-swift has no flag for a layer list, so the choice comes from the environment:

* ``DSL_DETACH_LAYERS=3,1``: the hidden-state indices to detach (taps of ``config.vision_feature_layer``);
* ``DSL_DETACH_DEPTH=1``: or detach that many of the shallowest taps;
* ``DSL_OFF=1``: train naive fusion, also from a checkpoint whose config carries ``dsl_detach_layers``;
* none of them: re-apply a checkpoint's ``dsl_detach_layers``; a model without it is left alone.

ms-swift freezes the vision tower by default (``--freeze_vit true``): asking for the detach then fails, naming
``--freeze_vit false``. ``python -m llava_dsl.integrations.ms_swift`` prints this file's path.
"""
import os

from llava_dsl.integrations import DSLOptions, configure, parse_depth, parse_layers


def options_from_env(environ=os.environ) -> DSLOptions:
    off = environ.get("DSL_OFF", "").strip().lower()
    if off not in ("", "0", "1", "true", "false"):
        raise ValueError(f"DSL_OFF={environ['DSL_OFF']!r}: expected 1/true or 0/false")
    return DSLOptions(detach_layers=parse_layers(environ.get("DSL_DETACH_LAYERS"), "DSL_DETACH_LAYERS"),
                      detach_depth=parse_depth(environ.get("DSL_DETACH_DEPTH"), "DSL_DETACH_DEPTH"),
                      off=off in ("1", "true"),
                      source="ms-swift --callbacks dsl (DSL_DETACH_LAYERS / DSL_DETACH_DEPTH)",
                      unfreeze_hint="pass --freeze_vit false (ms-swift freezes the vision tower by default)")


def _register():
    from swift.callbacks import TrainerCallback, callbacks_map

    class DSLCallback(TrainerCallback):
        """Applies Detached Skip-Links when the trainer is built (``callbacks_map['dsl']``)."""

        def __init__(self, args, trainer):
            super().__init__(args, trainer)
            self.options = options_from_env()  # bad values fail here, before any training

        def on_init_end(self, args, state, control, model=None, **kwargs):
            configure(model if model is not None else self.trainer.model, self.options)

    callbacks_map["dsl"] = DSLCallback
    return DSLCallback


if __name__ == "__main__":
    print(os.path.abspath(__file__))
else:
    DSLCallback = _register()
