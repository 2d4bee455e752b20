"""What the study runs: one frozen ``Plan`` for every arm and seed, derived from ``--scale``.

The regime (tower variant, taps, detach depth, tower learning rate) is the one the regime search chose from the
gradient statistics of short naive runs (``python -m llava_dsl.study search``, docs/study.md); it is a constant
here, not a flag per arm. Every arm gets the same plan. A seed changes every random part that differs between
two runs of the method: the data order, the projector's and the LM's initial weights, and the held-out sample;
the tower is fixed and named. The naive and detached arms share the stage-1 adapter (stage 1 trains only the
projector over a frozen tower, where the two are the same computation), so they start stage 2 from identical
weights.

The default size comes from a power calculation on the 3-seed run (docs/study.md, "Pre-declared analysis"):
8 paired seeds x 1,000 held-out questions detect +-3 points of exact match at 80 % power as long as the
seed-to-seed spread of the true difference is at most 2 points.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

ARMS = ("mlp2x_gelu", "mlp_multilayer", "detached_mlp_multilayer")

LABELS = {"mlp2x_gelu": "single layer", "mlp_multilayer": "naive multi-layer",
          "detached_mlp_multilayer": "Detached Skip-Links"}

SHORT = {"mlp2x_gelu": "single", "mlp_multilayer": "naive", "detached_mlp_multilayer": "detached"}

# The regime chosen by the search (docs/study.md, "Regime search"): the dense tower (no slot head: the LLM must
# find the characters and their order), taps on every block below the main one, every tap but the deepest
# detached, and the tower learning rate the search settled on.
REGIME = {"tower_variant": "dense", "skip_layers": "1,2,3,4", "detach_depth": 3, "tower_lr": 1e-3}

DEFAULT_SEEDS = tuple(range(8))

# The first FULL_SEEDS seeds of a plan also run the single layer, the fixed-theta middle and end points and
# R-Probe; every seed runs the head-to-head (naive, detached), the fixed-theta start and the answers.
FULL_SEEDS = 3

# The default --scale: 480 joint steps, where every arm reads (scale 1 stays on the loss plateau).
DEFAULT_SCALE = 4.0

# --quick: the whole pipeline on 2 seeds at scale 1 (its models have not learned to read yet), minutes on 2 cores.
QUICK = {"scale": 1.0, "seeds": (0, 1), "full_seeds": 1}

# Steps and data at --scale 1; held-out questions per seed are 250 x scale (1,000 at the default).
BASE = {"stage1_steps": 30, "stage2_steps": 120, "fixed_theta_steps": 16, "probe_steps": 80, "eval_questions": 250}


STAGE2_DATA = ("reading", "mix")


class PlanError(ValueError):
    """A flag value the study cannot run with; the message names it and what was expected."""


@dataclass(frozen=True)
class Plan:
    scale: float
    seeds: Tuple[int, ...]
    device: str
    tower_variant: str
    skip_layers: str
    detach_depth: int
    tower_lr: float
    # the LM the arms start from (llava_dsl.assets.pretrained.LM_VARIANTS). "random", as the demo: with the LM
    # pretrained on text, every arm's stage 2 sat on a loss plateau and nothing learned to read (docs/study.md)
    lm_variant: str = "random"
    batch_size: int = 16
    stage1_steps: int = 40
    stage2_steps: int = 200
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    # gradient statistics across training: every one of the first `grad_dense_steps` steps, then every
    # `grad_every`-th, in windows of `grad_window` measured steps
    grad_dense_steps: int = 40
    grad_every: int = 4
    grad_window: int = 10
    # at fixed theta: `fixed_theta_steps` minibatches with learning rate 0, one window over all of them, at the
    # stage-2 start (shared by naive and detached), the middle and the end of stage 2
    fixed_theta_steps: int = 24
    fixed_theta_points: Tuple[str, ...] = ("start", "mid", "end")
    probe_steps: int = 120
    probe_batch_size: int = 16
    probe_eval_every: int = 10
    probe_lr: float = 1e-3
    probe_threshold_fraction: float = 0.5
    eval_questions: int = 100   # per seed, a sample of its own (eval_data_seed)
    handwritten_questions: int = 400  # per seed: real handwritten digits composed into strings (assets.handwritten)
    use_questions: int = 200  # per full seed: the tap-ablation probe answers them once per tap and once with all
    full_seeds: int = FULL_SEEDS
    max_new_tokens: int = 8
    num_heldout: int = 64
    image_size: int = 64
    min_digits: int = 2
    max_digits: int = 5
    data_seed: int = 0
    # the stage-2 supervision, the same for every arm: "reading" (every question asks for the string) or "mix"
    # (assets.data_mix: a `read_fraction` of reading questions, the rest about colour, position, count, shape;
    # `confusable` mixes letters into the strings). The held-out OCR evaluation is the rendered reading set either way.
    stage2_data: str = "reading"
    read_fraction: float = 0.2
    confusable: bool = False

    @property
    def num_pretrain(self) -> int:
        return max(16, self.stage1_steps * self.batch_size)

    @property
    def num_finetune(self) -> int:
        return max(16, self.stage2_steps * self.batch_size)

    @property
    def mid_step(self) -> int:
        return max(1, self.stage2_steps // 2)

    def is_full(self, seed: int) -> bool:
        """Whether ``seed`` also runs the single layer, the later fixed-theta points and R-Probe."""
        return seed in sorted(self.seeds)[:self.full_seeds]

    @staticmethod
    def eval_data_seed(seed: int) -> int:
        """The held-out sample of a seed: rendered with its own stream (the training data keep data_seed)."""
        return 1000 + seed

    def to_json(self) -> Dict:
        return {**asdict(self), "seeds": list(self.seeds), "fixed_theta_points": list(self.fixed_theta_points),
                "num_pretrain": self.num_pretrain, "num_finetune": self.num_finetune, "mid_step": self.mid_step}


def parse_seeds(text: str) -> Tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip() != "")
    except ValueError:
        raise PlanError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(seeds) < 1 or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise PlanError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def make_plan(scale: float = DEFAULT_SCALE, seeds: Tuple[int, ...] = DEFAULT_SEEDS, device: str = "cpu",
              regime: Dict = None, full_seeds: int = FULL_SEEDS, stage2_data: str = "reading",
              read_fraction: float = 0.2, confusable: bool = False) -> Plan:
    if stage2_data not in STAGE2_DATA:
        raise PlanError(f"--stage2_data {stage2_data!r}: expected one of {', '.join(STAGE2_DATA)}")
    if not (isinstance(read_fraction, (int, float)) and 0.0 < read_fraction < 1.0):
        raise PlanError(f"--read_fraction {read_fraction!r}: expected a share strictly between 0 and 1 (e.g. 0.2: "
                        f"a fifth of the stage-2 questions ask for the string)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise PlanError(f"--scale {scale!r}: expected a positive number (1 = the CPU default)")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"--device {device!r}: expected cpu or cuda")
    regime = dict(REGIME if regime is None else regime)
    stage2 = max(4, round(BASE["stage2_steps"] * scale))
    dense = max(2, min(stage2 // 3, round(40 * scale)))
    return Plan(scale=float(scale), seeds=tuple(seeds), device=device, **regime, full_seeds=full_seeds,
                stage1_steps=max(2, round(BASE["stage1_steps"] * scale)), stage2_steps=stage2,
                grad_dense_steps=dense, grad_every=4, grad_window=10 if stage2 >= 40 else 2,
                fixed_theta_steps=max(2, round(BASE["fixed_theta_steps"] * min(scale, 4))),
                # the middle of stage 2 as a third fixed-theta point from scale 2 up (CPU time at scale 1)
                fixed_theta_points=("start", "mid", "end") if scale >= 2 else ("start", "end"),
                probe_steps=max(2, round(BASE["probe_steps"] * scale)),
                probe_eval_every=max(1, round(10 * min(scale, 4))),
                eval_questions=max(8, min(2000, round(BASE["eval_questions"] * scale))),
                handwritten_questions=max(8, min(800, round(100 * scale))),
                use_questions=max(8, min(400, round(50 * scale))),
                num_heldout=64 if scale <= 2 else 128, stage2_data=stage2_data,
                read_fraction=float(read_fraction), confusable=bool(confusable))
