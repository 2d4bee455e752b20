"""llava-dsl: Detached Skip-Links and multi-layer vision fusion for the LLaVA-1.5 codebase.

    import llava_dsl
    llava_dsl.register()   # teaches the installed `llava` package the plugin's projector types and flags

The idea itself (``skip_links``: layer choice, fusion, partial CLIP forward) is plain torch and does not import
``llava``; neither do the cores of ``rprobe`` and ``dpvr``. Every name swapped inside LLaVA is listed with its
reason in its feature's ``PATCHES`` table, collected in ``llava_dsl.plugin.ALL_PATCHES``, and applied only by
``register()``. ``llava_dsl.hf`` is the same feature for stock Hugging Face models.
"""
from llava_dsl.skip_links.layer_spec import LayerSpec, LayerSpecError, resolve_layer_spec

__version__ = "0.1.0"
__all__ = ["register", "LayerSpec", "LayerSpecError", "resolve_layer_spec", "fuse_layers", "build_multilayer_mlp",
           "__version__"]


def register() -> None:
    """Register the plugin into the installed ``llava`` package (applies ``plugin.ALL_PATCHES``). Idempotent."""
    from llava_dsl import plugin

    plugin.register()


def __getattr__(name: str):
    # fuse_layers / build_multilayer_mlp need torch; importing the package (e.g. for the scorers) does not
    if name in ("fuse_layers", "build_multilayer_mlp"):
        from llava_dsl.skip_links import fusion

        return getattr(fusion, name)
    raise AttributeError(f"module 'llava_dsl' has no attribute {name!r}")
