"""Answer scores in [0, 1]: exact match, VQA accuracy, ANLS and yes/no accuracy; `sign_test` for
two modes' scores on the same items.

Each metric takes the model's answer and the ground truths of one item. `metric_for` picks one from
a dataset's name: ANLS for document sets (DocVQA, DUDE), yes/no for POPE, VQA accuracy for the
VQA sets (TextVQA, VQAv2, GQA, ...), exact match otherwise (captioning sets need the LLM judge).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

Metric = Callable[[str, Sequence[str]], float]

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")
_NOT_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile(r"[^\w\s.]")


def normalize_vqa(text: str) -> str:
    """The VQA evaluation's answer normalization: lower case; "1,000" -> "1000"; apostrophes
    dropped (so "dont" and "don't" agree); periods dropped except decimal points; other punctuation
    -> space; number words -> digits; articles dropped; whitespace collapsed."""
    text = _THOUSANDS.sub("", text.lower()).replace("'", "").replace("\u2019", "")
    text = _PUNCTUATION.sub(" ", _NOT_DECIMAL_POINT.sub("", text))
    words = (_NUMBERS.get(word, word) for word in text.split())
    return " ".join(word for word in words if word not in _ARTICLES)


def exact_match(answer: str, truths: Sequence[str]) -> float:
    """1 if the answer equals a ground truth, ignoring case, surrounding space and a final period."""
    return float(_plain(answer) in {_plain(t) for t in truths})


def vqa_accuracy(answer: str, truths: Sequence[str]) -> float:
    """VQA accuracy on normalized answers: with ten or more human answers, min(1, matches / 3)
    averaged over the subsets that leave one human answer out; with fewer, 1 if one matches."""
    answer = normalize_vqa(answer)
    truths = [normalize_vqa(t) for t in truths]
    if len(truths) < 10:
        return float(answer in truths)
    matches = sum(t == answer for t in truths)
    return sum(min(1.0, (matches - (t == answer)) / 3) for t in truths) / len(truths)


def anls(answer: str, truths: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer: the best over ground truths of
    1 - distance / longer length (case and whitespace runs ignored), 0 where that distance is
    ``threshold`` or more."""
    answer = " ".join(answer.lower().split())
    best = 0.0
    for truth in truths:
        truth = " ".join(truth.lower().split())
        longer = max(len(answer), len(truth))
        distance = levenshtein(answer, truth) / longer if longer else 0.0
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def yes_no(text: str) -> str | None:
    """"yes" or "no" from the first of "yes", "no", "not" (also as "n't") in the text; else None."""
    for word in re.findall(r"[a-z]+", text.lower().replace("n't", " not")):
        if word == "yes":
            return "yes"
        if word in ("no", "not"):
            return "no"
    return None


def yes_no_accuracy(answer: str, truths: Sequence[str]) -> float:
    """1 if the answer reads as the same yes / no as the first ground truth (POPE)."""
    label = yes_no(answer)
    return float(label is not None and label == yes_no(truths[0]))


def yes_no_stats(pairs: Sequence[tuple[str, str]]) -> dict[str, float | None]:
    """POPE's figures over (answer, ground truth) pairs, "yes" the positive class: precision,
    recall, F1 and the share of answers that read as yes."""
    labels = [(yes_no(answer), yes_no(truth)) for answer, truth in pairs]
    tp = sum(p == "yes" and t == "yes" for p, t in labels)
    said_yes = sum(p == "yes" for p, _ in labels)
    truly_yes = sum(t == "yes" for _, t in labels)
    precision = tp / said_yes if said_yes else None
    recall = tp / truly_yes if truly_yes else None
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "yes_ratio": said_yes / len(labels) if labels else None}


METRICS: Mapping[str, Metric] = MappingProxyType(
    {"exact": exact_match, "vqa": vqa_accuracy, "anls": anls, "yesno": yes_no_accuracy}
)


def metric_for(dataset_name: str) -> str:
    """The usual metric of a dataset, from its name (e.g. ``DocVQA_region_test_8cut`` -> anls)."""
    name = dataset_name.lower()
    if "docvqa" in name or "dude" in name:
        return "anls"
    if "pope" in name:
        return "yesno"
    if "vqa" in name or "gqa" in name:
        return "vqa"
    return "exact"


def metric_extras(metric: str, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Figures a metric reports beside the mean score (yes/no: `yes_no_stats`)."""
    return yes_no_stats(pairs) if metric == "yesno" else {}


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test of paired scores (McNemar's exact test when they are 0 / 1): given
    the items where one side scored higher (``wins``) and where the other did (``losses``), the chance,
    were both sides equally good, of a split at least this uneven."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).removesuffix(".").strip()
