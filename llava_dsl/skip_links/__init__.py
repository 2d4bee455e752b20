"""Detached Skip-Links, the idea itself: which tower layers are tapped (``layer_spec``), how they are fused
(``fusion``), the projector types (``projectors``), the partial CLIP forward that yields them (``clip_taps``), the
projector-adapter loader (``adapter``), and the swaps that teach LLaVA all of it (``llava_patches``). Only
``llava_patches`` imports ``llava``; nothing here imports a feature built on the idea (``llava_dsl.plugin``
composes them)."""
