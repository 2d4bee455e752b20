"""Loaded into a framework's training process by the tests (through the framework's own plugin / callback
mechanism): records what the first optimizer step saw, for the test to recompute in-process.

Written to $DSL_CAPTURE (torch.save): the pixel values the vision tower received, d loss / d(projector output)
(whatever loss scaling the framework applied is inside it), and every vision-tower parameter's gradient just before
the first optimizer step. The tower's gradient is a function of those two tensors alone, so the test can compare it
with llava_dsl.hf's (applied or not) on the same model and batch without rebuilding the framework's batch or loss.
"""
import os

import torch
from transformers import TrainerCallback

from llava_dsl.hf import unwrap_model, vision_tower


class GradCapture(TrainerCallback):
    def __init__(self, path=None):
        self.path = path or os.environ["DSL_CAPTURE"]
        self.record = {}
        self.handles = []
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = unwrap_model(model)
        tower = vision_tower(self.model)
        projector = self.model.model.multi_modal_projector

        def tower_input(module, args_, kwargs_):
            if module.training and "pixel_values" not in self.record:
                pixels = kwargs_.get("pixel_values", args_[0] if args_ else None)
                self.record["pixel_values"] = pixels.detach().clone()

        def projector_output(module, args_, output):
            if module.training and "projector_grad" not in self.record and output.requires_grad:
                output.register_hook(lambda grad: self.record.setdefault("projector_grad", grad.detach().clone()))

        self.handles = [tower.register_forward_pre_hook(tower_input, with_kwargs=True),
                        projector.register_forward_hook(projector_output)]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if "tower_grads" in self.record:
            return
        names = {id(p): n for n, p in vision_tower(self.model).named_parameters()}
        self.record["tower_grads"] = {names[id(p)]: p.grad.detach().clone()
                                      for p in vision_tower(self.model).parameters() if p.grad is not None}
        self.record["max_grad_norm"] = args.max_grad_norm
        self.record["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        torch.save(self.record, self.path)
        for handle in self.handles:
            handle.remove()
