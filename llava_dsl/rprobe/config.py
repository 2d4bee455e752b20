"""The R-Probe stage's settings: one dataclass, filled from the command line or by a caller."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llava_dsl.rprobe.model import NORM_INITS


@dataclass
class ProbeConfig:
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0
    depth: Optional[int] = None  # default ceil(L / 4)
    head_hidden: Optional[int] = None  # default: the LLM's hidden size
    bidirectional: bool = False
    norm_init: str = "llm"
    conditional: bool = False
    use_text: bool = True
    max_text_tokens: int = 64
    crop_fraction: float = 0.5
    eval_max_images: Optional[int] = None
    baseline_max_images: int = 512
    grid_images: int = 6
    num_workers: int = 0
    cache_images: bool = False
    save_every: int = 500  # training checkpoints (when run_probe gets a checkpoint_dir); 0 = none
    save_total_limit: int = 1  # newest checkpoints kept; 0 = all

    def validate(self) -> None:
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--eval-every": self.eval_every,
                    "--rprobe_max_text_tokens": self.max_text_tokens,
                    "--baseline-max-images": self.baseline_max_images}
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag}={value}: expected a positive integer")
        if self.save_every < 0:
            raise ValueError(f"--save-every={self.save_every}: expected an integer >= 0 (0: no checkpoints)")
        if self.save_total_limit < 0:
            raise ValueError(f"--save-total-limit={self.save_total_limit}: expected an integer >= 0 (0: keep all)")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate={self.learning_rate}: expected > 0")
        if self.norm_init not in NORM_INITS:
            raise ValueError(f"--rprobe_norm_init={self.norm_init!r}: expected one of {NORM_INITS}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"--rprobe_crop_fraction={self.crop_fraction}: expected a value in (0, 1]")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"--rprobe_depth={self.depth}: expected >= 1")
