"""Metrics against values computed by hand."""

import math

import pytest

from e2u_tasks.errors import E2UError
from e2u_tasks.metrics import (answer_probability, composite_share, hit_rate, item_metrics,
                               mean_reciprocal_rank, rouge1_recall)


def test_rouge1_recall_hand_values():
    assert rouge1_recall("William Shakespeare", "It was William Shakespeare.") == 1.0
    assert rouge1_recall("William Shakespeare", "Shakespeare, I think") == 0.5
    assert rouge1_recall("George R.R. Martin", "I don't know.") == 0.0
    # Porter stemming: "contracts" matches "contract"; case and punctuation are ignored.
    assert rouge1_recall("Contracts.", "the contract") == 1.0
    # Clipped counts: the reference has "the" twice, the prediction once -> 2 of 3 unigrams.
    assert rouge1_recall("the the cat", "the cat") == pytest.approx(2 / 3)


def test_token_metrics_hand_values():
    logprobs = [math.log(0.5), math.log(0.125)]
    assert answer_probability(logprobs) == pytest.approx(0.25)  # geometric mean of 0.5, 0.125
    ranks = [1, 4, 200]
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 0.25 + 0.005) / 3)
    assert hit_rate(ranks) == pytest.approx(2 / 3)  # m = 100
    assert hit_rate(ranks, top_m=1) == pytest.approx(1 / 3)
    assert hit_rate(ranks, top_m=200) == 1.0


def test_item_metrics_and_composite():
    values = item_metrics("Paris", "The capital is Paris.", [math.log(0.9)], [1])
    assert values == pytest.approx({"rouge1_recall": 1.0, "prob": 0.9, "mrr": 1.0, "hit_rate": 1.0})
    assert composite_share("forget", 0.25) == 1.5
    assert composite_share("retain", 0.75) == 1.5
    assert composite_share("rephrase", 0.75) is None
    # The unweighted mean of the two shares is 1 - R1@forget + R1@retain.
    assert (composite_share("forget", 0.2) + composite_share("retain", 0.9)) / 2 == pytest.approx(1.7)


def test_bad_statistics_are_one_line_errors():
    with pytest.raises(E2UError, match="one log-probability and one rank"):
        item_metrics("a", "a", [], [])
    with pytest.raises(E2UError, match="top_m=0"):
        hit_rate([1], top_m=0)
