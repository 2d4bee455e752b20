"""Statistics over a set of gradient samples: tr(Cov), SNR, cosine, and the per-window accumulator that
keeps them without storing the samples. Plain torch."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.utils.checkpoint

STATS_FILE = "dsl_grad_stats.json"

LOG_PREFIX = "dsl_grad"

MAIN_KEYS = ("trcov_main", "snr_main", "norm_main")


def _rows(samples) -> torch.Tensor:
    x = torch.stack([torch.as_tensor(s).reshape(-1) for s in samples]) if isinstance(samples, (list, tuple)) \
        else torch.as_tensor(samples)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"expected n >= 1 gradient samples as rows of an (n, d) matrix, got shape {tuple(x.shape)}")
    return x.double()


def trace_covariance(samples) -> float:
    """tr(Cov) of the rows, population form (1/n): E||g - E g||^2 = E||g||^2 - ||E g||^2."""
    x = _rows(samples)
    return float(((x - x.mean(0)) ** 2).sum(1).mean())


def gradient_snr(samples) -> float:
    """Effective SNR ||E g||^2 / E||g||^2 (1 for a constant gradient, -> 0 for pure noise); 0 if all are zero."""
    x = _rows(samples)
    second = float((x ** 2).sum(1).mean())
    return float((x.mean(0) ** 2).sum()) / second if second > 0 else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); 0 when either is the zero vector (no direction to compare)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _sq_norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v, dtype=torch.float64) ** 2)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double())) if a.numel() else 0.0


class WindowAccumulator:
    """Streaming window statistics of (g_main, g_skip) pairs for one group: two running vector sums, scalars.

    Equal to ``trace_covariance`` / ``gradient_snr`` / ``cosine`` on the stacked samples, without keeping them.
    """

    def __init__(self):
        self.n = 0
        self.sum_main: Optional[torch.Tensor] = None
        self.sum_skip: Optional[torch.Tensor] = None
        self.sq_main = self.sq_skip = self.sq_full = 0.0
        self.cos_sum = self.norm_main_sum = self.norm_skip_sum = 0.0

    def add(self, main: torch.Tensor, skip: torch.Tensor) -> None:
        main, skip = main.float(), skip.float()
        if self.sum_main is None:
            self.sum_main, self.sum_skip = main.clone(), skip.clone()
        else:
            self.sum_main += main
            self.sum_skip += skip
        sq_main, sq_skip, dot = _sq_norm(main), _sq_norm(skip), _dot(main, skip)
        self.n += 1
        self.sq_main += sq_main
        self.sq_skip += sq_skip
        self.sq_full += sq_main + sq_skip + 2 * dot
        self.cos_sum += cosine(main, skip)
        self.norm_main_sum += math.sqrt(sq_main)
        self.norm_skip_sum += math.sqrt(sq_skip)

    def summary(self) -> Dict[str, float]:
        n = self.n
        mean_main, mean_skip = self.sum_main / n, self.sum_skip / n
        m2, s2 = _sq_norm(mean_main), _sq_norm(mean_skip)
        f2 = m2 + s2 + 2 * _dot(mean_main, mean_skip)
        e_main, e_skip, e_full = self.sq_main / n, self.sq_skip / n, self.sq_full / n
        trcov_main, trcov_skip = max(e_main - m2, 0.0), max(e_skip - s2, 0.0)
        return {
            "trcov_main": trcov_main,
            "trcov_skip": trcov_skip,
            "trcov_full": max(e_full - f2, 0.0),
            "trcov_ratio": trcov_skip / trcov_main if trcov_main > 0 else float("inf") if trcov_skip > 0 else 0.0,
            "cos_mean": self.cos_sum / n,
            "cos_of_means": cosine(mean_main, mean_skip),
            "snr_main": m2 / e_main if e_main > 0 else 0.0,
            "snr_full": f2 / e_full if e_full > 0 else 0.0,
            "norm_main": self.norm_main_sum / n,
            "norm_skip": self.norm_skip_sum / n,
        }
