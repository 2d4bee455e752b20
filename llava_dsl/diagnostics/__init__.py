"""Skip-path vs main-path gradient on the vision tower's block groups: the paper's Proposition 4.3, measured.

A multi-layer projector reads ``[h_main ; h_tap ; ...]`` (concat order: main, then taps deep to shallow). The
gradient that reaches a group of ViT blocks is the sum of what arrives through each slice of that input:

    g_full = g_main + g_skip,    g_skip = sum of the parts sent by the taps at or above the group

At a measured step, ``GradientSplitter`` keeps references to the tower's hidden states during the forward,
captures d loss / d(projector input) during the normal backward, cuts it into its per-layer slices and pushes
each slice back through the tower on its own with ``torch.autograd.grad``, so the parts are exact and add up to
the full gradient. A detached tap's slice is pushed back through the tower's own (un-detached) hidden state,
so a detached run reports the gradient its skip *would* send (the counterfactual) and naive and detached runs
report the same quantities. Nothing in ``.grad`` is touched: the update is the one training would make anyway.

Statistics over a window of W measured steps, per group (population moments over the W step gradients):
    tr(Cov) = E||g||^2 - ||E g||^2,   SNR = ||E g||^2 / E||g||^2,   mean cos(g_main, g_skip), mean norms.

Plain torch + transformers; the trainer side is a ``TrainerCallback`` that any ``transformers.Trainer`` takes.
"""
