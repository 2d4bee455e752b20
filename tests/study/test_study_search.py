"""The study's regime search by the mechanism and its stage-2 data option: each test fails if the rule it checks
is wrong (fast, no models, no training)."""
import json
import os

import pytest

from llava_dsl.study import search
from llava_dsl.study.__main__ import check_output_dir
from llava_dsl.study.plan import REGIME, PlanError, make_plan
from llava_dsl.study.report import plan_from_json

NAIVE, DETACHED = "/runs/llava-naive-stage2", "/runs/llava-detached-stage2"


def damage_report(naive_r2=0.68, naive_glyph=0.90, pretrained_r2=0.68, pretrained_glyph=0.90):
    """The damage probe's report layout: hidden states 2 (the shallowest tap), 3 and 5 (main)."""
    def layers(r2, glyph):
        return {str(k): {"pixel_r2": r2 - 0.1 * (k - 2), "glyph_accuracy": glyph} for k in (2, 3, 5)}

    tower = {"main": 5, "taps": [3, 2], "detached": [2]}
    return {"layers": [2, 3, 5], "reference": {**tower, "layers": layers(pretrained_r2, pretrained_glyph)},
            "checkpoints": {NAIVE: {**tower, "layers": layers(naive_r2, naive_glyph)},
                            DETACHED: {**tower, "layers": layers(pretrained_r2, pretrained_glyph)}}}


def use_report(none=0.60, all_taps=0.60):
    return {"conditions": {"none": {"exact_match": none, "drop": 0.0},
                           "all_taps": {"exact_match": all_taps, "drop": none - all_taps}}}


def test_criterion_needs_both_use_and_damage():
    damaged = damage_report(naive_r2=0.63)          # 0.05 below pretrained at the shallowest tap (state 2)
    used = use_report(0.60, 0.50)                   # 10 points lost without the taps
    v = search.mechanism_verdict(damaged, used, NAIVE, use_report(0.62, 0.61), DETACHED)
    assert (v["use_met"], v["damage_met"], v["meets"]) == (True, True, True)
    assert v["shallowest_tap"] == 2
    assert v["naive_loss_vs_pretrained"]["pixel_r2"] == pytest.approx(0.05)
    assert v["all_taps_drop"] == pytest.approx({"naive": 0.10, "detached": 0.01})
    # use half fails: 4 points is below the 5-point bar (damage alone is not enough)
    v = search.mechanism_verdict(damaged, use_report(0.60, 0.56), NAIVE)
    assert (v["use_met"], v["damage_met"], v["meets"]) == (False, True, False)
    # damage half fails: 0.02 below pretrained is within the margin, and glyph accuracy is unchanged
    v = search.mechanism_verdict(damage_report(naive_r2=0.66), used, NAIVE)
    assert (v["use_met"], v["damage_met"], v["meets"]) == (True, False, False)
    # glyph accuracy alone can carry the damage half; a naive tower BETTER than pretrained never does
    assert search.mechanism_verdict(damage_report(naive_glyph=0.86), used, NAIVE)["damage_met"]
    assert not search.mechanism_verdict(damage_report(naive_r2=0.78, naive_glyph=0.95), used, NAIVE)["damage_met"]


def test_criterion_refuses_a_report_without_the_pretrained_tower_or_the_arm():
    no_reference = {**damage_report(), "reference": None}
    with pytest.raises(ValueError, match="reference"):
        search.mechanism_verdict(no_reference, use_report(), NAIVE)
    with pytest.raises(ValueError, match="/elsewhere"):
        search.mechanism_verdict(damage_report(), use_report(), "/elsewhere")


def verdict(use_met, damage_met, drop=0.0, r2_loss=0.0):
    return {"use_met": use_met, "damage_met": damage_met, "meets": use_met and damage_met,
            "all_taps_drop": {"naive": drop}, "naive_loss_vs_pretrained": {"pixel_r2": r2_loss}}


def test_choice_is_the_first_that_meets_else_the_stated_fallback():
    assert search.choose([verdict(True, False), verdict(True, True), verdict(True, True, 0.9)]) == \
        {"index": 1, "met": True}
    # none meets: most halves met first, then the larger naive all-taps drop, then the larger R^2 loss, then earlier
    assert search.choose([verdict(False, False, 0.3), verdict(True, False, 0.06), verdict(False, True, 0.02)]) == \
        {"index": 1, "met": False}
    assert search.choose([verdict(True, False, 0.06), verdict(True, False, 0.08)])["index"] == 1
    assert search.choose([verdict(False, False, 0.0, 0.01), verdict(False, False, 0.0, 0.02)])["index"] == 1
    assert search.choose([verdict(False, False), verdict(False, False)])["index"] == 0


def test_table_shows_every_candidate_and_says_when_none_met():
    v = search.mechanism_verdict(damage_report(naive_r2=0.66), use_report(0.6, 0.5), NAIVE, use_report(), DETACHED)
    report = {"candidates": [{"name": "reading", "why": "w", "verdict": v}, {"name": "mix0.2", "why": "w",
                                                                             "verdict": v}],
              "chosen": "reading", "criterion_met": False}
    text = search.mechanism_table(report)
    assert text.count("\n| reading |") == 1 and "| mix0.2 |" in text
    assert "| 60.0 / 10.0 | 60.0 / 0.0 | 2 | 0.680 / 0.660 / 0.680 |" in text
    assert "no candidate met the criterion" in text


def test_candidates_change_one_lever_at_a_time_data_mix_first():
    c = search.MECHANISM_CANDIDATES
    names = [x["name"] for x in c]
    assert len(set(names)) == len(names)
    assert [(x["stage2_data"], x["read_fraction"]) for x in c[:3]] == [("reading", 0.2), ("mix", 0.2), ("mix", 0.1)]
    levers = ("stage2_data", "read_fraction", "confusable", "tower_lr")
    # each later candidate differs from mix0.2 (or, for mix0.2, from reading) in exactly one lever
    for x, base in ((c[1], c[0]), (c[2], c[1]), (c[3], c[1]), (c[4], c[1])):
        assert sum(x[k] != base[k] for k in levers if not (k == "read_fraction" and base["stage2_data"] == "reading")) \
            == 1, x["name"]
    assert c[0]["tower_lr"] == REGIME["tower_lr"] and c[3]["confusable"] and c[4]["tower_lr"] > REGIME["tower_lr"]
    for x in c:  # every candidate makes a valid plan
        make_plan(1.0, (0,), stage2_data=x["stage2_data"], read_fraction=x["read_fraction"],
                  confusable=x["confusable"])


def test_stage2_data_round_trips_through_plan_json(tmp_path):
    plan = make_plan(1.0, (0, 1), stage2_data="mix", read_fraction=0.1, confusable=True)
    out = str(tmp_path / "study")
    check_output_dir(out, plan)
    with open(os.path.join(out, "plan.json"), encoding="utf-8") as f:
        raw = json.load(f)
    assert (raw["stage2_data"], raw["read_fraction"], raw["confusable"]) == ("mix", 0.1, True)
    assert plan_from_json(raw) == plan
    # the same folder with another mix is refused, naming the field
    with pytest.raises(Exception, match="read_fraction: 0.1 -> 0.2"):
        check_output_dir(out, make_plan(1.0, (0, 1), stage2_data="mix", read_fraction=0.2, confusable=True))


def test_a_plan_json_from_before_the_option_resumes_as_reading(tmp_path):
    plan = make_plan(1.0, (0,))
    out = str(tmp_path / "old")
    check_output_dir(out, plan)
    path = os.path.join(out, "plan.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    for key in ("stage2_data", "read_fraction", "confusable"):
        del raw[key]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f)
    assert check_output_dir(out, plan) == plan
    with pytest.raises(Exception, match="stage2_data: 'reading' -> 'mix'"):
        check_output_dir(out, make_plan(1.0, (0,), stage2_data="mix"))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_read_fraction_is_refused_by_name(value):
    with pytest.raises(PlanError, match=r"--read_fraction .*strictly between 0 and 1"):
        make_plan(1.0, (0,), stage2_data="mix", read_fraction=value)


def test_bad_stage2_data_is_refused_by_name():
    with pytest.raises(PlanError, match="--stage2_data 'ocr': expected one of reading, mix"):
        make_plan(1.0, (0,), stage2_data="ocr")
