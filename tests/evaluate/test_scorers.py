"""Scorers on crafted cases for every rule, and TextVQA agreement with LLaVA's own evaluator."""
import random
import subprocess
import sys

import pytest
from support import ROOT

from llava_dsl.evaluate.scorers import (
    OCRBENCH_CATEGORIES,
    OCRBENCH_RECOGNITION,
    anls,
    levenshtein,
    normalize_vqa_answer,
    ocrbench_hit,
    ocrbench_totals,
    relaxed_correctness,
    vqa_soft_accuracy,
)


# --------------------------------------------------------------------------------------------------
# EvalAI normalisation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Hello, World!", "hello world"),          # commas dropped; "!" becomes a space; lower case
    ("coca-cola", "coca cola"),                # "-" inside a word becomes a space
    ("well - known", "well known"),            # "-" next to a space is removed
    ("the end.", "end"),                       # final period stripped, article dropped
    ("3.5", "3.5"),                            # a period between digits stays
    ("1,000", "1000"),                         # digit-grouping comma removed
    ("Two", "2"), ("ten", "10"), ("none", "0"),  # number words
    ("an apple", "apple"), ("A Cat", "cat"),   # articles
    ("dont", "don't"), ("isnt", "isn't"), ("youre", "you're"),  # contractions restored
    ("john's", "john 's"),                     # possessive split off
    ("what?", "what"),                         # question mark dropped
    ("  tab\there\n", "tab here"),             # whitespace
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_normalisation_matches_llava_processor_on_crafted_cases():
    from llava.eval.m4c_evaluator import EvalAIAnswerProcessor

    reference = EvalAIAnswerProcessor()
    cases = ["Hello, World!", "coca-cola", "well - known", "a.b.c.", "e.g. the 3.5 mm", "1,000,000 dollars",
             "it's two o'clock", "(the) [an] {a}", "x=y+z", "path/to\\file", "<b>@home`", "yall'll", "Im",
             "ow's'at", "Dr. Who?", "one two three four five six seven eight nine ten", "5 - 3", "a;b", "_x_",
             "." * 40 + "end", "1,2, 3", "somebody'd"]
    for case in cases:
        assert normalize_vqa_answer(case) == reference(case), case


# --------------------------------------------------------------------------------------------------
# VQA soft accuracy: leave-one-out average over the 10 answers
# --------------------------------------------------------------------------------------------------
def _leave_one_out(k: int) -> float:
    """k of 10 answers equal the prediction: k subsets see k-1 matches, 10-k subsets see k."""
    return (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10 if k else 0.0


@pytest.mark.parametrize("k", range(0, 11))
def test_vqa_soft_accuracy_leave_one_out(k):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_soft_accuracy("cat", answers) == pytest.approx(_leave_one_out(k))


def test_vqa_soft_accuracy_known_points():
    # The familiar values: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.
    assert [round(_leave_one_out(k), 10) for k in (1, 2, 3, 4)] == [0.3, 0.6, 0.9, 1.0]
    assert vqa_soft_accuracy("The Cat.", ["cat"] * 3 + ["x"] * 7) == pytest.approx(0.9)  # normalised both sides


def test_vqa_soft_accuracy_requires_ten_answers():
    with pytest.raises(ValueError, match="expected 10 ground-truth answers, got 9"):
        vqa_soft_accuracy("cat", ["cat"] * 9)
    assert vqa_soft_accuracy("cat", ["cat"] * 3, expected_answers=None) == pytest.approx(2 / 3)


def test_textvqa_accuracy_agrees_exactly_with_llava_evaluator():
    """Generated answers with punctuation/article/number/contraction variants, scored by both."""
    from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator

    rng = random.Random(0)
    stems = ["cat", "two", "2", "the dog", "a dog", "dont", "don't", "coca-cola", "coca cola", "3.5", "1,000",
             "1000", "new york", "New York.", "yes", "no", "john's", "johns", "e.g.", "stop!", "x - y"]
    entries = []
    for _ in range(400):
        pool = rng.sample(stems, rng.randint(1, 5))
        gt = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + stems[:3])
        entries.append({"pred_answer": pred, "gt_answers": gt})
    reference = TextVQAAccuracyEvaluator().eval_pred_list(entries)
    ours = [vqa_soft_accuracy(e["pred_answer"], e["gt_answers"]) for e in entries]
    assert sum(ours) / len(ours) == reference  # same arithmetic: bit-identical
    assert 0.1 < reference < 0.9  # the generated set exercises partial credit, not only 0 or 1


# --------------------------------------------------------------------------------------------------
# ANLS
# --------------------------------------------------------------------------------------------------
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_threshold_edge():
    # distance 2 over length 4: similarity exactly 0.5 is kept (the official script zeroes only below 0.5)
    assert anls("abxy", ["abcd"]) == 0.5
    # distance 3 over length 4: similarity 0.25 < 0.5 -> 0
    assert anls("axyz", ["abcd"]) == 0.0
    # just above: distance 1 over 4
    assert anls("abcx", ["abcd"]) == 0.75
    assert anls("abxy", ["abcd"], threshold=0.6) == 0.0


def test_anls_normalisation_best_answer_and_raw_lengths():
    assert anls("  Hello   WORLD ", ["hello world"]) == 1.0  # case and whitespace do not count
    assert anls("zzzz", ["abcd", "zzzy"]) == 0.75  # the best ground-truth answer counts
    # The normaliser is the longer raw length (as the official script): "  a  " has length 5, so the one
    # edit against "ab" costs 1/5, not 1/2.
    assert anls("  a  ", ["ab"]) == pytest.approx(1 - 1 / 5)
    assert anls("", [""]) == 1.0


# --------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, target, expected", [
    ("10.4", "10", True),     # 4% off
    ("10.5", "10", True),     # exactly 5% off
    ("10.6", "10", False),    # 6% off
    ("9.5", "10", True),
    ("50%", "0.5", True),     # a trailing % divides by 100
    ("50", "50%", False),     # 50 against 0.5
    ("12%", "12%", True),
    ("Yes", "yes", True),     # non-numeric: exact up to case
    ("yes.", "yes", False),
    ("0", "0", True),         # a zero target falls back to exact match
    ("0.0", "0", False),
    ("1e2", "100", True),     # anything float() parses is a number
])
def test_relaxed_correctness(prediction, target, expected):
    assert relaxed_correctness(prediction, target) is expected


# --------------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------------
def test_ocrbench_substring_rule():
    assert ocrbench_hit("The word is CENTRE.", "centre", "IIIT5K") == 1  # substring, case folded
    assert ocrbench_hit("centr", "CENTRE", "IIIT5K") == 0
    assert ocrbench_hit("line one line two", "line one\nline two", "FUNSD") == 1  # newline -> space
    assert ocrbench_hit("it says 42", ["41", "42"], "STVQA") == 1  # any of the answers
    assert ocrbench_hit("it says 43", ["41", "42"], "STVQA") == 0


def test_ocrbench_hme100k_space_rule():
    # spaces are removed on both sides, so LaTeX spacing does not matter ...
    assert ocrbench_hit("x^{2}+1", "x ^ { 2 }", "HME100k") == 1
    assert ocrbench_hit("x ^ {2} + 1", "x^{2}+1", "HME100k") == 1
    # ... but case does (x and X are different symbols); elsewhere case is folded
    assert ocrbench_hit("x^{2}", "X^{2}", "HME100k") == 0
    assert ocrbench_hit("x^{2}", "X^{2}", "IIIT5K") == 1
    # without the HME100k rule the spaced answer would not be found
    assert ocrbench_hit("x^{2}+1", "x ^ { 2 }", "IIIT5K") == 0


def test_ocrbench_totals():
    categories = list(OCRBENCH_CATEGORIES)
    totals = ocrbench_totals(categories + categories[:2], [1] * len(categories) + [1, 0])
    assert totals["categories"]["Regular Text Recognition"] == 2
    assert totals["categories"]["Irregular Text Recognition"] == 1
    assert totals["text_recognition"] == 6 + 1  # six recognition categories, one extra hit
    assert totals["final_score"] == len(categories) + 1
    assert sum(OCRBENCH_CATEGORIES.values()) == 1000
    assert sum(OCRBENCH_CATEGORIES[c] for c in OCRBENCH_RECOGNITION) == 300
    with pytest.raises(ValueError, match="unknown OCRBench category 'Poetry'"):
        ocrbench_totals(["Poetry"], [1])


def test_scorers_import_no_model_code():
    code = ("import sys, llava_dsl.evaluate.scorers; "
            "bad = [m for m in ('torch', 'transformers', 'llava') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
