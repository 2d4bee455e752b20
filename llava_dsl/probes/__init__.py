"""Is my shallow tower damaged? Does my model use its taps? Two probes a user runs on their own checkpoints, before
and after a fine-tune (docs/diagnostics.md):

    python -m llava_dsl.probes damage CKPT [CKPT ...] [--reference TOWER] --output damage.json
    python -m llava_dsl.probes use --model-path CKPT --data-dir TEXTVQA_DIR --train-data DATA.json \\
        --image-folder IMAGES --output-dir OUT

``damage`` (``llava_dsl.probes.damage``): linear probes on the frozen features of each tapped block of a checkpoint's
vision tower (per-patch glyph identity, pixel reconstruction R^2), the same renders for every tower, against the
pretrained tower. ``use`` (``llava_dsl.probes.use``): tap ablation at evaluation; each tap's slice of the projector
input is replaced by its mean over training images, and the drop in exact match is measured per tap.

Both take a LLaVA-1.5 checkpoint folder (the plugin's config keys; the tower's weights are in the checkpoint when
it was trained with ``--unfreeze_mm_vision_tower True``) or a stock Hugging Face Llava folder (read through
``llava_dsl.hf``'s public API); ``towers.load_tower`` tells them apart.
"""
