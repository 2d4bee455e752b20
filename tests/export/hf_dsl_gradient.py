"""The stock Hugging Face side of tests/export's detach round trip (run in .venv-hf with PYTHONPATH at the repo root).

    .venv-hf/bin/python tests/export/hf_dsl_gradient.py REQUEST.pt RESULT.pt

REQUEST.pt: a list of dicts (model_dir, input_ids [1, L] with <image> expanded, pixel_values, targets [L - 1]: the
next-token labels, -100 at image positions, vocab: the checkpoint's vocabulary size). For each export: loaded with
from_pretrained, float32, ``llava_dsl.hf.apply_detached_skip_links(model)`` with no argument (the config's choice),
the loss below, backward. RESULT.pt: per case the config's dsl_detach_layers as loaded, the detach the hook applied,
the vision tower's gradients with the hook (``dsl``) and after ``remove_detached_skip_links`` (``naive``).
The loss is the cross-entropy over the checkpoint's vocabulary (the export adds <image>, whose logit would enter the
softmax otherwise), the same formula the LLaVA side uses.
"""
import sys

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from llava_dsl.hf import apply_detached_skip_links, dsl_state, remove_detached_skip_links

TOWER = "model.vision_tower."


def tower_gradients(model, case):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=case["input_ids"], pixel_values=case["pixel_values"]).logits
    loss = F.cross_entropy(logits[0, :-1, :case["vocab"]].float(), case["targets"], ignore_index=-100)
    loss.backward()
    return {n[len(TOWER):]: p.grad.detach().clone() for n, p in model.named_parameters()
            if n.startswith(TOWER) and p.grad is not None}, float(loss)


def main(request_path, result_path):
    results = []
    for case in torch.load(request_path, weights_only=False):
        model = LlavaForConditionalGeneration.from_pretrained(case["model_dir"], dtype=torch.float32).eval()
        loaded = getattr(model.config, "dsl_detach_layers", None)
        apply_detached_skip_links(model)
        applied = list(dsl_state(model).detach_layers)
        dsl, loss = tower_gradients(model, case)
        remove_detached_skip_links(model)
        naive, _ = tower_gradients(model, case)
        results.append({"loaded": loaded, "applied": applied, "dsl": dsl, "naive": naive, "loss": loss})
    torch.save(results, result_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
