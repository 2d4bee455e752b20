"""The study's statistics: each test fails if the rule it checks is wrong (fast, no models)."""
import math
import random

import pytest

from llava_dsl.study import stats


def test_sign_test_exact_binomial():
    # 5 of 5 positive: p = 2 * (1/2)^5
    assert stats.sign_test([1, 2, 3, 4, 5])["p"] == pytest.approx(2 / 32)
    # 3 positive, 1 negative: p = 2 * (C(4,0) + C(4,1)) / 16 = 10/16
    result = stats.sign_test([0.1, 0.2, -0.3, 0.4])
    assert (result["positive"], result["negative"]) == (3, 1)
    assert result["p"] == pytest.approx(10 / 16)
    # ties are dropped, balanced signs give p = 1, and p never exceeds 1
    result = stats.sign_test([0.0, 1.0, -1.0])
    assert result["ties"] == 1 and result["p"] == 1.0
    assert stats.sign_test([0, 0])["p"] == 1.0
    # 3 of 3 (the study's minimum seeds) can never reach p < 0.05: 2/8 = 0.25
    assert stats.sign_test([1, 1, 1])["p"] == pytest.approx(0.25)


def test_bootstrap_ci_covers_the_mean_and_matches_a_direct_resample():
    values = [0.5, 1.5, 2.0, -0.5, 1.0]
    ci = stats.bootstrap_ci(values, resamples=4000, seed=3)
    assert ci["low"] <= ci["mean"] <= ci["high"]
    assert ci["mean"] == pytest.approx(sum(values) / len(values))
    # the same percentile bootstrap written out independently
    rng = random.Random(3)
    means = sorted(sum(rng.choice(values) for _ in range(5)) / 5 for _ in range(4000))
    assert ci["low"] == means[100] and ci["high"] == means[3899]
    # the interval is within the range of the values and narrower than it
    assert min(values) <= ci["low"] and ci["high"] <= max(values)
    assert ci["high"] - ci["low"] < max(values) - min(values)


def test_bootstrap_ci_of_a_constant_is_a_point_and_of_a_shift_excludes_zero():
    ci = stats.bootstrap_ci([2.0, 2.0, 2.0])
    assert ci["low"] == ci["high"] == 2.0
    ci = stats.bootstrap_ci([1.0, 1.2, 0.9, 1.1, 1.05, 0.95])
    assert ci["low"] > 0
    with pytest.raises(ValueError, match="no values"):
        stats.bootstrap_ci([])


def test_spike_rule_flags_a_jump_and_not_noise_or_a_slow_rise():
    rng = random.Random(0)
    noisy = [2.0 + rng.uniform(-0.05, 0.05) for _ in range(200)]
    assert stats.loss_spikes(noisy) == []
    jumped = list(noisy)
    jumped[120] = 3.0
    assert stats.loss_spikes(jumped) == [120]
    # a steady decrease (training) has no spikes
    assert stats.loss_spikes([3.0 * math.exp(-t / 50) for t in range(200)]) == []
    # too small relative to the median: a 5 % jump on a flat series is not a spike even though its z is huge
    flat = [1.0] * 40
    flat[30] = 1.05
    assert stats.loss_spikes(flat) == []
    flat[30] = 1.2
    assert stats.loss_spikes(flat) == [30]
    # the first window never counts
    early = [1.0] * 40
    early[5] = 9.0
    assert stats.loss_spikes(early) == []


def test_paired_differences_keep_missing_seeds_visible():
    result = stats.paired([1.0, 2.0, None], [1.5, 1.0, 3.0])
    assert result["differences"] == [0.5, -1.0, None]
    assert result["missing"] == 1
    assert result["sign_test"]["positive"] == 1 and result["sign_test"]["negative"] == 1
    with pytest.raises(ValueError, match="one per seed"):
        stats.paired([1.0], [1.0, 2.0])


def test_coefficient_of_variation_and_std():
    assert stats.coefficient_of_variation([1.0, 1.0, 1.0]) == 0.0
    assert stats.coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)
    assert stats.std([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert stats.coefficient_of_variation([5.0]) is None


def test_verdicts_follow_the_ci_and_the_paper_side():
    from llava_dsl.study.analysis import verdict_all, verdict_paired

    # higher is better (accuracy): a CI above 0 reproduces, below 0 does not, across 0 is inconclusive
    assert verdict_paired({"mean": 2.0, "low": 0.5, "high": 3.0}, +1) == "reproduces in direction"
    assert verdict_paired({"mean": -2.0, "low": -3.0, "high": -0.5}, +1).startswith("does not")
    assert verdict_paired({"mean": 1.0, "low": -0.5, "high": 2.0}, +1).startswith("inconclusive")
    # lower is better (spikes, MSE): a CI below 0 reproduces
    assert verdict_paired({"mean": -1.0, "low": -2.0, "high": -0.1}, -1) == "reproduces in direction"
    assert verdict_all([3.0, 2.0, 1.5], lambda v: v > 1).startswith("reproduces")
    assert verdict_all([0.5, 0.2], lambda v: v > 1).startswith("does not")
    assert verdict_all([3.0, 0.5, None], lambda v: v > 1).startswith("inconclusive (1 of 2")


def test_answers_are_normalised_before_exact_match():
    from llava_dsl.study.analysis import char_accuracy, normalise_answer

    assert normalise_answer(" 1234.") == "1234" == normalise_answer("12 34")
    assert char_accuracy("1234", "1234") == 1.0
    assert char_accuracy("1235", "1234") == 0.75
    assert char_accuracy("12", "1234") == 0.5      # missing positions count wrong
    assert char_accuracy("123456", "1234") == 4 / 6  # extra positions count wrong


def test_bad_plan_flags_name_the_value():
    from llava_dsl.study.plan import PlanError, make_plan, parse_seeds

    assert parse_seeds("0,1,2") == (0, 1, 2)
    for text in ("a,b", "1,1", "-1", ""):
        with pytest.raises(PlanError, match="--seeds"):
            parse_seeds(text)
    with pytest.raises(PlanError, match=r"--scale -1"):
        make_plan(-1)
    with pytest.raises(PlanError, match="--device 'tpu'"):
        make_plan(1, device="tpu")
    # every arm gets one plan: the steps follow the scale, the regime is the searched one
    plan = make_plan(2)
    assert plan.stage2_steps == 2 * make_plan(1).stage2_steps and plan.fixed_theta_points == ("start", "mid", "end")
