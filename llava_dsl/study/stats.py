"""The study's statistics, plain python: mean and std, paired differences with a bootstrap confidence interval,
an exact two-sided sign test, the loss-spike rule and the coefficient of variation.

Every rule here is fixed before any arm is compared (docs/study.md): the spike rule's window and thresholds,
the bootstrap's resample count and seed, and what counts as a tie in the sign test.
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

# Loss spike: step t is a spike when its loss exceeds the median of the previous SPIKE_WINDOW step losses by more
# than SPIKE_ROBUST_Z robust standard deviations (1.4826 x the median absolute deviation) AND by more than
# SPIKE_MIN_RELATIVE of that median. The first SPIKE_WINDOW steps are never spikes (no history yet).
SPIKE_WINDOW = 20
SPIKE_ROBUST_Z = 5.0
SPIKE_MIN_RELATIVE = 0.10

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0


def mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def std(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (n - 1); 0 for a single value, None for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if len(values) == 1:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        raise ValueError("median of no values")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def coefficient_of_variation(values: Sequence[float]) -> Optional[float]:
    """Population std / mean; None when there are fewer than 2 values or the mean is 0."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    if m == 0:
        return None
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values)) / abs(m)


def loss_spikes(losses: Sequence[float], window: int = SPIKE_WINDOW, robust_z: float = SPIKE_ROBUST_Z,
                min_relative: float = SPIKE_MIN_RELATIVE) -> List[int]:
    """0-based indices of the spikes in a per-step loss series (the rule in this module's constants)."""
    if window < 2:
        raise ValueError(f"window={window}: expected at least 2 previous steps")
    spikes = []
    for t in range(window, len(losses)):
        history = losses[t - window:t]
        centre = median(history)
        spread = 1.4826 * median([abs(v - centre) for v in history])
        excess = losses[t] - centre
        if excess > robust_z * spread and excess > min_relative * abs(centre):
            spikes.append(t)
    return spikes


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Dict[str, float]:
    """Percentile bootstrap CI of the mean of ``values`` (e.g. per-seed paired differences).

    Returns mean, low, high, n. With n = 1 the interval is the value itself (no spread to resample); with few
    values the percentile interval is narrow-biased, which the report says next to it."""
    values = [float(v) for v in values if v is not None]
    if not values:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: expected a number in (0, 1)")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    alpha = (1 - level) / 2
    low = means[min(resamples - 1, max(0, int(math.floor(alpha * resamples))))]
    high = means[min(resamples - 1, max(0, int(math.ceil((1 - alpha) * resamples)) - 1))]
    return {"mean": sum(values) / n, "low": low, "high": high, "n": n, "level": level}


def sign_test(differences: Sequence[float]) -> Dict[str, float]:
    """Exact two-sided sign test of median difference 0; zero differences (ties) are dropped.

    p = min(1, 2 * P(X <= min(positives, negatives))) for X ~ Binomial(n_nonzero, 1/2)."""
    values = [d for d in differences if d is not None]
    positive = sum(1 for d in values if d > 0)
    negative = sum(1 for d in values if d < 0)
    n = positive + negative
    if n == 0:
        p = 1.0
    else:
        k = min(positive, negative)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"positive": positive, "negative": negative, "ties": len(values) - n, "p": p}


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Dict[str, object]:
    """Per-seed differences b - a (seeds where either is missing are listed as None, never dropped silently),
    their bootstrap CI and sign test."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}; expected one per seed on both sides")
    diffs = [None if x is None or y is None else y - x for x, y in zip(a, b)]
    present = [d for d in diffs if d is not None]
    return {"differences": diffs, "missing": len(diffs) - len(present),
            "ci": bootstrap_ci(present) if present else None, "sign_test": sign_test(present)}


def summary(values: Sequence[Optional[float]]) -> Dict[str, object]:
    present = [v for v in values if v is not None]
    return {"values": list(values), "mean": mean(present), "std": std(present), "n": len(present)}
