"""Scorers for the OCR-centric benchmarks, in plain Python (no torch, no model, no ``llava`` import).

Each scorer reproduces the reference implementation the community's numbers come from:

- TextVQA: VQA soft accuracy with the EvalAI answer normalisation, as in LLaVA's
  ``llava/eval/m4c_evaluator.py`` (``TextVQAAccuracyEvaluator``, itself MMF's) and lmms-eval's textvqa task:
  per question, the mean over the 10 leave-one-out subsets of the ground truth of
  ``min(1, #matches among the other 9 / 3)``.
- DocVQA / InfographicVQA: ANLS with threshold 0.5, as in the official RRC evaluation script (also used by
  Qwen-VL and lmms-eval's ``anls`` metric): both strings lowercased, stripped and whitespace-collapsed for the
  edit distance, the normaliser is the longer *raw* length, the best answer counts, and a similarity below
  0.5 scores 0 (exactly 0.5 is kept).
- ChartQA: relaxed accuracy (Pix2Struct / Qwen-VL, lmms-eval): numeric answers (``%`` divides by 100) are
  right within 5% relative error of a non-zero target; anything else needs a case-insensitive exact match.
- OCRBench: the benchmark's own rule (Yuliang-Liu/MultimodalOCR ``OCRBench/example.py``): a hit when a
  ground-truth answer is a substring of the prediction, both lowercased and stripped with newlines made
  spaces; for HME100k (handwritten math) all spaces are removed and case is kept. Totals per category, the
  recognition subtotal (300) and the final score out of 1000.

The answer-normalisation tables below are those of the official VQA evaluation, as carried by EvalAI and
MMF; their quirks (the lookbehind-less period regex, ``re.UNICODE`` landing in ``count``) are kept on
purpose, since changing them changes scores.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Sequence, Union

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

ARTICLES = ("a", "an", "the")

PUNCTUATIONS = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")

# The reference pattern: "(?!<=" is a negative lookahead for the literal "<=", not a lookbehind.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")

_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The reference passes re.UNICODE where sub() takes ``count``: at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's answer processing: lowercase, punctuation, number words, articles, contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, gt_answers: Sequence[str], expected_answers: Optional[int] = 10) -> float:
    """VQA accuracy of one prediction: the mean over the leave-one-out subsets of ``min(1, matches / 3)``.

    ``expected_answers``: TextVQA has exactly 10 human answers per question (the reference asserts it);
    pass None to accept any number.
    """
    if expected_answers is not None and len(gt_answers) != expected_answers:
        raise ValueError(f"expected {expected_answers} ground-truth answers, got {len(gt_answers)}: {list(gt_answers)!r}")
    if not gt_answers:
        raise ValueError("no ground-truth answers")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    # Same arithmetic, in the same order, as the reference, so that scores agree to the last bit.
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        accs.append(min(1, float(matches) / 3))
    return sum(accs) / len(accs)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for i, cb in enumerate(b, start=1):
        current = [i]
        for j, ca in enumerate(a, start=1):
            current.append(previous[j - 1] if ca == cb else 1 + min(previous[j - 1], previous[j], current[-1]))
        previous = current
    return previous[-1]


def anls(prediction: str, gt_answers: Sequence[str], threshold: float = 0.5) -> float:
    """Normalised Levenshtein similarity of the best ground-truth answer; below ``threshold`` it is 0."""
    if not gt_answers:
        raise ValueError("no ground-truth answers")
    det = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in gt_answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))  # raw lengths, as the official script
        distances.append(0.0 if length == 0 else float(levenshtein(gt, det)) / float(length))
    similarity = 1 - min(distances)
    return 0.0 if similarity < threshold else similarity


def _to_float(text: str) -> Optional[float]:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """Right if both parse as numbers within ``max_relative_change`` of a non-zero target, else exact match
    ignoring case."""
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()

# OCRBench
OCRBENCH_CATEGORIES: Dict[str, int] = {
    "Regular Text Recognition": 50,
    "Irregular Text Recognition": 50,
    "Artistic Text Recognition": 50,
    "Handwriting Recognition": 50,
    "Digit String Recognition": 50,
    "Non-Semantic Text Recognition": 50,
    "Scene Text-centric VQA": 200,
    "Doc-oriented VQA": 200,
    "Key Information Extraction": 200,
    "Handwritten Mathematical Expression Recognition": 100,
}

OCRBENCH_RECOGNITION = tuple(list(OCRBENCH_CATEGORIES)[:6])

OCRBENCH_HME_DATASET = "HME100k"


def ocrbench_hit(prediction: str, answers: Union[str, Sequence[str]], dataset_name: str) -> int:
    """1 if a ground-truth answer occurs in the prediction under OCRBench's rule, else 0."""
    candidates = [answers] if isinstance(answers, str) else list(answers)
    if dataset_name == OCRBENCH_HME_DATASET:  # LaTeX: spacing is arbitrary, case is meaningful
        predict = prediction.strip().replace("\n", " ").replace(" ", "")
        return int(any(a.strip().replace("\n", " ").replace(" ", "") in predict for a in candidates))
    predict = prediction.lower().strip().replace("\n", " ")
    return int(any(a.lower().strip().replace("\n", " ") in predict for a in candidates))


def ocrbench_totals(categories: Iterable[str], hits: Iterable[int]) -> Dict[str, object]:
    """Per-category points, the text-recognition subtotal and the final score (out of 1000 on the full set)."""
    per_category = {name: 0 for name in OCRBENCH_CATEGORIES}
    counts = {name: 0 for name in OCRBENCH_CATEGORIES}
    for category, hit in zip(categories, hits):
        if category not in per_category:
            raise ValueError(f"unknown OCRBench category {category!r}; expected one of {list(OCRBENCH_CATEGORIES)}")
        per_category[category] += int(hit)
        counts[category] += 1
    recognition = sum(per_category[name] for name in OCRBENCH_RECOGNITION)
    return {
        "final_score": sum(per_category.values()),
        "text_recognition": recognition,
        "categories": per_category,
        "questions_per_category": counts,
    }


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)
