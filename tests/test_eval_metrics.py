"""Evaluation metrics against values computed by hand."""
from __future__ import annotations

import math

import pytest

from vpt_agent.evaluation.metrics import (
    METRICS,
    anls,
    exact_match,
    levenshtein,
    metric_for,
    normalize_vqa,
    sign_test,
    vqa_accuracy,
    yes_no,
    yes_no_accuracy,
    yes_no_stats,
)


def test_exact_match_ignores_case_space_and_a_final_period():
    assert exact_match("  Red. ", ["red"]) == 1.0
    assert exact_match("dark red", ["red", "Dark  Red"]) == 1.0
    assert exact_match("a red", ["red"]) == 0.0
    assert exact_match("red", []) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),
        ("The Dog's bowl!", "dogs bowl"),
        ("don't", "dont"),
        ("1,000 people", "1000 people"),
        ("3.5 m.", "3.5 m"),
        ("t-shirt", "t shirt"),
        ("  A   ten\tyear old ", "10 year old"),
        ("none", "0"),
    ],
)
def test_vqa_normalization(text, expected):
    assert normalize_vqa(text) == expected


def test_vqa_accuracy_with_ten_human_answers():
    # k of 10 humans agree: each leave-one-out subset scores min(1, matches / 3); averaged over the 10
    humans = ["2"] * 1 + ["3"] * 9
    assert vqa_accuracy("two", humans) == pytest.approx((1 * 0 / 3 + 9 * 1 / 3) / 10)  # 0.3
    humans = ["2"] * 2 + ["3"] * 8
    assert vqa_accuracy("2", humans) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("2", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    humans = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("The two.", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0


def test_vqa_accuracy_with_fewer_answers_is_a_normalized_match():
    assert vqa_accuracy("A Dog", ["dog"]) == 1.0
    assert vqa_accuracy("dogs", ["dog", "puppy"]) == 0.0
    assert vqa_accuracy("puppy!", ["dog", "puppy"]) == 1.0


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_anls_by_hand():
    assert anls("Kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # distance 3 over 7 characters < 0.5
    assert anls("flaw", ["lawn"]) == 0.0  # 2 / 4 = 0.5 is not under the threshold
    assert anls("flaw", ["lawn", "FLAWS"]) == pytest.approx(1 - 1 / 5)  # the best ground truth counts
    assert anls("  New   York ", ["new york"]) == 1.0
    assert anls("", [""]) == 1.0
    assert anls("abc", []) == 0.0


def test_yes_no_reading():
    assert yes_no("Yes, there is a dog.") == "yes"
    assert yes_no("No.") == "no"
    assert yes_no("There is no dog in the image.") == "no"
    assert yes_no("I don't see one") == "no"
    assert yes_no("Nope") is None
    assert yes_no("yesterday") is None


def test_yes_no_accuracy_and_pope_figures():
    assert yes_no_accuracy("Yes.", ["yes"]) == 1.0
    assert yes_no_accuracy("maybe", ["no"]) == 0.0
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("yes", "yes"), ("hmm", "no")]
    # yes said 3 times, 2 right: precision 2/3; 3 true yes, 2 found: recall 2/3; F1 2/3
    stats = yes_no_stats(pairs)
    assert stats["precision"] == pytest.approx(2 / 3)
    assert stats["recall"] == pytest.approx(2 / 3)
    assert stats["f1"] == pytest.approx(2 / 3)
    assert stats["yes_ratio"] == pytest.approx(3 / 6)
    assert yes_no_stats([("no", "yes")]) == {"precision": None, "recall": 0.0, "f1": None, "yes_ratio": 0.0}
    assert yes_no_stats([("yes", "no")])["f1"] is None  # no true yes: no recall


def test_metric_chosen_by_dataset_name():
    assert metric_for("DocVQA_region_test_8cut") == "anls"
    assert metric_for("DUDE_region_test") == "anls"
    assert metric_for("POPE_action_test") == "yesno"
    assert metric_for("TextVQA_region_test_8cut") == "vqa"
    assert metric_for("GQA_region_test") == "vqa"
    assert metric_for("Flickr30k_action_test") == "exact"
    assert set(METRICS) == {"exact", "vqa", "anls", "yesno"}


def test_sign_test_by_hand():
    # two-sided: 2 * P(X <= min) for X ~ Binomial(wins + losses, 1/2), capped at 1
    assert sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(9, 12) == pytest.approx(2 * sum(math.comb(21, k) for k in range(10)) / 2**21)
    assert sign_test(12, 9) == sign_test(9, 12)
    assert sign_test(3, 3) == sign_test(0, 0) == sign_test(0, 1) == 1.0
    assert sign_test(237, 6) < 1e-60  # big counts stay exact integers until the one division
