"""The study's statistics, plain python (scipy is not part of the stack): Student's t and chi-square tails, the
pre-declared primary tests (a paired t over seeds, and a Cochran–Mantel–Haenszel test on per-question outcomes
stratified by seed with McNemar per seed), the smallest effect a run can detect at 80 % power, Holm's correction
for the secondary metrics, Wilson intervals, and the loss-spike rule.

Every rule here is fixed before the runs it judges (docs/study.md, "Pre-declared analysis").
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

# Loss spike: step t is a spike when its loss exceeds the median of the previous SPIKE_WINDOW step losses by more
# than SPIKE_ROBUST_Z robust standard deviations (1.4826 x the median absolute deviation) AND by more than
# SPIKE_MIN_RELATIVE of that median. The first SPIKE_WINDOW steps are never spikes (no history yet).
SPIKE_WINDOW = 20
SPIKE_ROBUST_Z = 5.0
SPIKE_MIN_RELATIVE = 0.10

ALPHA = 0.05   # two-sided, every test
POWER = 0.80   # for the smallest detectable effect


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


# ------------------------------------------------------------------------------------------ distributions

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t test: df={df}, expected > 0 (at least 2 paired seeds)")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the tail; |error| < 1e-10)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t quantile: q={q}, expected in (0, 1)")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    target = 2.0 * (1.0 - q)  # two-sided tail at the quantile
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_two_sided_p(mid, df) > target else (low, mid)
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


def chi2_1df_p(statistic: float) -> float:
    """P(X >= statistic) for chi-square with 1 degree of freedom."""
    return math.erfc(math.sqrt(max(statistic, 0.0) / 2.0))


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n trials at probability 1/2 (doubled smaller tail, at most 1)."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(low + 1)) / 2.0 ** n)


# ------------------------------------------------------------------------------------------ the tests

def detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t over ``n`` pairs with difference sd ``sd`` detects
    with probability ``power``: (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n) (the usual t-approximation
    of the noncentral t power)."""
    if n < 2:
        raise ValueError(f"detectable effect: {n} pairs, expected at least 2")
    df = n - 1
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def paired_t(differences: Sequence[Optional[float]], alpha: float = ALPHA) -> Dict[str, object]:
    """Two-sided one-sample t test of mean 0 on per-seed paired differences, its t-interval and the smallest
    effect it could have detected at 80 % power. Missing seeds (None) are counted, never dropped silently."""
    present = [float(d) for d in differences if d is not None]
    n = len(present)
    out: Dict[str, object] = {"differences": list(differences), "missing": len(differences) - n, "n": n,
                              "mean": mean(present), "sd": std(present)}
    if n < 2:
        out.update(t=None, df=None, p=None, ci=None, detectable=None)
        return out
    df, m, sd = n - 1, out["mean"], out["sd"]
    se = sd / math.sqrt(n)
    half = t_quantile(1 - alpha / 2, df) * se
    if se == 0:
        t, p = (0.0, 1.0) if m == 0 else (math.copysign(math.inf, m), 0.0)
    else:
        t = m / se
        p = t_two_sided_p(t, df)
    # no spread (e.g. every difference 0 because no model answers right) leaves the detectable effect undefined
    out.update(t=t, df=df, p=p, ci=[m - half, m + half], level=1 - alpha,
               detectable=detectable_effect(sd, n, alpha) if sd > 0 else None)
    return out


def mcnemar(b: int, c: int) -> Dict[str, object]:
    """Exact McNemar test on one seed's paired outcomes: ``b`` questions only the first arm got right, ``c`` only
    the second."""
    return {"b": b, "c": c, "discordant": b + c, "p": binomial_two_sided_p(c, b + c)}


def cmh_paired(strata: Sequence[Tuple[int, int]]) -> Dict[str, object]:
    """Cochran–Mantel–Haenszel test of no difference between two arms on matched binary outcomes, stratified by
    seed. Each question is a matched pair (one 2x2 table per question); only discordant pairs carry information,
    and the CMH statistic over the seeds' pairs is (sum_s (c_s - b_s))^2 / sum_s (b_s + c_s), chi-square with 1
    df, no continuity correction (``strata``: (b_s, c_s) per seed as in ``mcnemar``)."""
    b = sum(s[0] for s in strata)
    c = sum(s[1] for s in strata)
    if b + c == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p": 1.0, "per_stratum": [mcnemar(*s) for s in strata]}
    statistic = (c - b) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": statistic, "p": chi2_1df_p(statistic),
            "per_stratum": [mcnemar(*s) for s in strata]}


def discordant_counts(first: Dict[str, bool], second: Dict[str, bool], where: str) -> Tuple[int, int]:
    """(b, c) for two arms' per-question outcomes (question id -> correct) on the same questions."""
    if set(first) != set(second):
        only = sorted(set(first) ^ set(second))[:5]
        raise ValueError(f"{where}: the two arms answered different questions ({len(set(first) ^ set(second))} "
                         f"differ, e.g. {only}); expected the same held-out set for both")
    b = sum(1 for q in first if first[q] and not second[q])
    c = sum(1 for q in first if second[q] and not first[q])
    return b, c


def primary_verdict(t_result: Dict, cmh_result: Optional[Dict], alpha: float = ALPHA) -> str:
    """The pre-declared rule: "reproduces" when both the paired t over seeds and the CMH test reject at ``alpha``
    with a positive mean difference (detached better), "contradicts" when both reject with a negative one,
    "inconclusive" otherwise."""
    if t_result.get("p") is None or cmh_result is None:
        return "inconclusive"
    if t_result["p"] < alpha and cmh_result["p"] < alpha:
        agree = (t_result["mean"] > 0) == (cmh_result["c"] > cmh_result["b"])
        if agree:
            return "reproduces" if t_result["mean"] > 0 else "contradicts"
    return "inconclusive"


def holm(pvalues: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """Holm–Bonferroni adjusted p-values (None stays None and does not count as a test)."""
    present = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda item: item[0])
    m, running, out = len(present), 0.0, {k: None for k in pvalues}
    for i, (p, key) in enumerate(present):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return out


def wilson(successes: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval of a proportion (as fractions)."""
    if n <= 0:
        raise ValueError(f"wilson: n={n}, expected at least one question")
    z = _normal_quantile(1 - (1 - level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    low, high = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if 0.5 * math.erfc(-mid / math.sqrt(2)) < q else (low, mid)
    return 0.5 * (low + high)


# ------------------------------------------------------------------------------------------ planning

def difference_sd(sd_train: float, discordance: float, questions: int) -> float:
    """sd (points) of one seed's paired difference in exact match: the seed-to-seed spread of the true effect
    (``sd_train``, points) plus the evaluation noise of ``questions`` matched answers with a share
    ``discordance`` of discordant pairs (variance discordance / questions, in proportions)."""
    return math.sqrt(sd_train ** 2 + 1e4 * discordance / questions)


def seeds_needed(effect: float, sd_train: float, discordance: float, questions: int, most: int = 200) -> Optional[int]:
    """Fewest paired seeds whose paired t detects ``effect`` points at 80 % power (None beyond ``most``)."""
    sd = difference_sd(sd_train, discordance, questions)
    for n in range(2, most + 1):
        if detectable_effect(sd, n) <= effect:
            return n
    return None


def summary(values: Sequence[Optional[float]]) -> Dict[str, object]:
    present = [v for v in values if v is not None]
    return {"values": list(values), "mean": mean(present), "std": std(present), "n": len(present)}
