"""llava-dsl: Detached Skip-Links and multi-layer vision fusion for the LLaVA-1.5 codebase.

    import llava_dsl
    llava_dsl.register()   # teaches the installed `llava` package the plugin's projector types and flags

The core (``layer_spec``, ``fusion``, ``rprobe``, ``dpvr``) is plain torch and does not import ``llava``. Every
name swapped inside LLaVA is listed, with its reason, in ``llava_dsl.integration.ALL_PATCHES`` (the core's own,
plus those of ``safety`` and ``dpvr_integration``), and applied only by ``register()``.
"""
from .layer_spec import LayerSpec, LayerSpecError, resolve_layer_spec

__version__ = "0.1.0"
__all__ = ["register", "LayerSpec", "LayerSpecError", "resolve_layer_spec", "__version__"]


def register() -> None:
    """Register the plugin into the installed ``llava`` package. Idempotent."""
    from . import integration

    integration.register()  # applies integration.ALL_PATCHES
