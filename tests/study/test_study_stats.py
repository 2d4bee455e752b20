"""The study's statistics: each test fails if the rule it checks is wrong (fast, no models)."""
import math
import os
import random

import pytest

from llava_dsl.study import stats


def test_t_distribution_matches_textbook_tables():
    # two-sided 95 % critical values (any t table) and the 80 % one used for power
    for df, critical in ((1, 12.706), (2, 4.303), (7, 2.365), (10, 2.228), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(critical, abs=5e-4)
        assert stats.t_two_sided_p(critical, df) == pytest.approx(0.05, abs=2e-4)
    assert stats.t_quantile(0.80, 7) == pytest.approx(0.896, abs=5e-4)
    assert stats.t_quantile(0.025, 7) == pytest.approx(-2.365, abs=5e-4)
    # df = 1 is Cauchy: P(|T| >= 1) = 1/2 exactly; large df tends to the normal
    assert stats.t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    assert stats.t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_chi_square_binomial_and_wilson_match_known_values():
    assert stats.chi2_1df_p(3.841459) == pytest.approx(0.05, abs=1e-6)
    assert stats.chi2_1df_p(6.634897) == pytest.approx(0.01, abs=1e-6)
    # exact McNemar: 1 vs 9 discordant pairs, p = 2 * (C(10,0) + C(10,1)) / 2^10
    assert stats.mcnemar(1, 9)["p"] == pytest.approx(2 * 11 / 1024)
    assert stats.binomial_two_sided_p(5, 10) == 1.0
    # Wilson 95 % for 8 of 10 (Newcombe 1998, table I): 0.4902-0.9433
    low, high = stats.wilson(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert stats.wilson(0, 20)[0] == 0.0


def test_paired_t_on_the_three_seed_run_gives_the_t_interval_not_the_range():
    # the committed 3-seed run: detached - naive exact match -2.08, -6.25, -1.04 points
    result = stats.paired_t([-2.0833, -6.25, -1.0417])
    assert result["t"] == pytest.approx(-1.964, abs=1e-3) and result["df"] == 2
    assert result["p"] == pytest.approx(0.1885, abs=1e-3)
    # mean -3.125, sd 2.756: half-width 4.303 * 2.756 / sqrt(3) = 6.85; the bootstrap "CI" was [-6.25, -1.04]
    assert result["ci"] == [pytest.approx(-9.971, abs=2e-3), pytest.approx(3.721, abs=2e-3)]
    # smallest effect detectable at 80 % power: (4.303 + 1.061) * 2.756 / sqrt(3)
    assert result["detectable"] == pytest.approx((4.3027 + 1.0607) * 2.7560 / 3 ** 0.5, rel=1e-3)
    assert stats.paired_t([1.0, None, 2.0])["missing"] == 1
    assert stats.paired_t([1.0])["p"] is None
    assert stats.paired_t([0.0, 0.0, 0.0])["detectable"] is None  # no spread: nothing to size an effect against


def test_cmh_over_seeds_pools_the_discordant_pairs():
    # one stratum: the CMH statistic is McNemar's chi-square (c - b)^2 / (b + c)
    one = stats.cmh_paired([(10, 20)])
    assert one["statistic"] == pytest.approx(100 / 30) and one["p"] == pytest.approx(stats.chi2_1df_p(100 / 30))
    # stratified: the differences add before squaring, so opposite seeds cancel
    assert stats.cmh_paired([(10, 20), (20, 10)])["statistic"] == 0.0
    both = stats.cmh_paired([(10, 20), (12, 22)])
    assert both["statistic"] == pytest.approx(20 ** 2 / 64) and len(both["per_stratum"]) == 2
    assert stats.discordant_counts({"a": True, "b": False, "c": True}, {"a": False, "b": True, "c": True},
                                   "seed 0") == (1, 1)
    with pytest.raises(ValueError, match="seed 3: the two arms answered different questions"):
        stats.discordant_counts({"a": True}, {"b": True}, "seed 3")


def test_primary_verdict_needs_both_tests():
    significant_t = {"p": 0.01, "mean": 2.0}
    assert stats.primary_verdict(significant_t, {"p": 0.001, "b": 10, "c": 40}) == "reproduces"
    assert stats.primary_verdict({"p": 0.01, "mean": -2.0}, {"p": 0.001, "b": 40, "c": 10}) == "contradicts"
    # one test alone, or the two disagreeing in sign, decides nothing
    assert stats.primary_verdict(significant_t, {"p": 0.2, "b": 10, "c": 14}) == "inconclusive"
    assert stats.primary_verdict({"p": 0.19, "mean": -3.1}, {"p": 0.001, "b": 40, "c": 10}) == "inconclusive"
    assert stats.primary_verdict(significant_t, {"p": 0.001, "b": 40, "c": 10}) == "inconclusive"
    assert stats.primary_verdict({"p": None, "mean": None}, None) == "inconclusive"


def test_holm_adjusts_in_order_and_keeps_missing():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adjusted == {"a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06), "d": None}
    assert stats.holm({"a": 0.6, "b": 0.9})["b"] == 1.0


def test_power_plan_from_the_committed_run():
    # discordance 0.266 (the 3-seed run's rates, independence), 1000 questions: evaluation sd 1.63 points
    assert stats.difference_sd(0.0, 0.266, 1000) == pytest.approx(1.631, abs=1e-3)
    assert stats.seeds_needed(3.0, 0.0, 0.266, 1000) == 5
    assert stats.seeds_needed(3.0, 2.0, 0.266, 1000) == 8
    assert stats.seeds_needed(3.0, 2.756, 0.266, 1000) == 12
    assert stats.seeds_needed(3.0, 50.0, 0.266, 1000, most=20) is None
    # more seeds can only shrink the detectable effect
    effects = [stats.detectable_effect(3.0, n) for n in range(2, 20)]
    assert effects == sorted(effects, reverse=True)


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


def test_coefficient_of_variation_and_std():
    assert stats.coefficient_of_variation([1.0, 1.0, 1.0]) == 0.0
    assert stats.coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)
    assert stats.std([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert stats.coefficient_of_variation([5.0]) is None


def test_gradient_statistics_are_described_per_seed_not_judged():
    from llava_dsl.study.analysis import describe_sides

    assert describe_sides([3.0, 2.0, 1.5], lambda v: v > 1) == "paper's side in 3 of 3 seeds"
    assert describe_sides([0.5, 0.2], lambda v: v > 1) == "paper's side in 0 of 2 seeds"
    assert describe_sides([3.0, 0.5, None], lambda v: v > 1) == "paper's side in 1 of 2 seeds"


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


def test_primary_analysis_pairs_questions_within_each_seed(tmp_path):
    """Per-question answers of two arms as the evaluation runner writes them: the discordant counts, the CMH
    test, the paired t and the verdict come out of the study's own reader (no models)."""
    import json

    from llava_dsl.study.analysis import collect_seed, summarise
    from llava_dsl.study.plan import make_plan
    from llava_dsl.study.runner import eval_dir

    plan = make_plan(1, seeds=(0, 1, 2))
    # per seed: (questions only naive reads, only detached reads, both read, neither); 100 questions each
    design = {0: (2, 14, 30, 54), 1: (3, 15, 20, 62), 2: (1, 12, 25, 62)}
    for seed, (b, c, both, neither) in design.items():
        outcomes = [(True, False)] * b + [(False, True)] * c + [(True, True)] * both + [(False, False)] * neither
        for arm, index in (("mlp_multilayer", 0), ("detached_mlp_multilayer", 1)):
            folder = os.path.join(eval_dir(str(tmp_path), seed, arm), "textvqa")
            os.makedirs(folder)
            with open(os.path.join(folder, "scored.jsonl"), "w") as f:
                for q, pair in enumerate(outcomes):
                    truth = f"{q:04d}"
                    # a reversed question order in one arm: pairing must go by question id, not by line
                    row = {"question_id": q, "ground_truth": [truth] * 10,
                           "prediction": f"{truth}." if pair[index] else "0"}
                    f.write(json.dumps(row) + "\n")
            if arm == "detached_mlp_multilayer":
                with open(os.path.join(folder, "scored.jsonl")) as f:
                    lines = f.readlines()
                with open(os.path.join(folder, "scored.jsonl"), "w") as f:
                    f.writelines(reversed(lines))
    seeds = [collect_seed(str(tmp_path), plan, seed, {}) for seed in plan.seeds]
    assert [s["discordant_naive_detached"] for s in seeds] == [{"b": b, "c": c} for b, c, _, _ in design.values()]
    primary = summarise(seeds, plan)["primary"]
    assert primary["differences"] == [pytest.approx(12.0), pytest.approx(12.0), pytest.approx(11.0)]
    assert primary["cmh"]["statistic"] == pytest.approx((41 - 6) ** 2 / 47)
    assert primary["p"] < 0.05 and primary["cmh"]["p"] < 0.05 and primary["verdict"] == "reproduces"
    assert seeds[0]["arms"]["mlp_multilayer"]["answers"]["exact_match_wilson95"][0] < 32.0 < \
        seeds[0]["arms"]["mlp_multilayer"]["answers"]["exact_match_wilson95"][1]


def test_default_plan_is_the_powered_one_and_quick_is_small():
    from llava_dsl.study import stats
    from llava_dsl.study.plan import DEFAULT_SCALE, DEFAULT_SEEDS, QUICK, make_plan

    plan = make_plan(DEFAULT_SCALE, DEFAULT_SEEDS)
    assert len(plan.seeds) == 8 and plan.eval_questions == 1000 and plan.stage2_steps == 480
    # the power calculation in docs/study.md: 8 seeds x 1,000 questions reach +-3 points when sd_train <= 2
    assert stats.seeds_needed(3.0, 2.0, 0.266, plan.eval_questions) <= len(plan.seeds)
    assert [s for s in plan.seeds if plan.is_full(s)] == [0, 1, 2]
    assert plan.eval_data_seed(0) != plan.data_seed  # the held-out sample is the seed's own
    quick = make_plan(QUICK["scale"], QUICK["seeds"], full_seeds=QUICK["full_seeds"])
    assert len(quick.seeds) >= 2 and [s for s in quick.seeds if quick.is_full(s)] == [0]


def test_a_seed_redraws_the_lm_initialisation_and_keeps_its_tokenizer(tmp_path):
    from safetensors.torch import load_file

    from llava_dsl.assets.tiny_models import build_language_model, build_tokenizer
    from llava_dsl.study.runner import reseed_lm

    tokenizer = build_tokenizer(str(tmp_path / "tokenizer"))
    source = tmp_path / "lm"
    build_language_model(str(source), tokenizer, hidden_size=32)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        reseed_lm(str(source), seed, str(tmp_path / name))
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert set(a) == set(load_file(str(source / "model.safetensors")))
    assert all((a[k] == b[k]).all() for k in a)  # the same seed, the same weights
    assert any(not (a[k] == c[k]).all() for k in a)  # another seed, other weights
    assert (tmp_path / "c" / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    assert not (tmp_path / "c.partial").exists()
