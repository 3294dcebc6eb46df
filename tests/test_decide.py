"""The MC median rule and the other decision rules on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from batchuq.postprocess.rules import UNCLASSIFIED, DecisionRule, decide, median_rule
from batchuq.summarise import summarise


@pytest.mark.parametrize(
    ("median", "expected"),
    [
        ([0.7, 0.2, 0.1], 0),  # clear winner above 0.5
        ([0.2, 0.5, 0.3], 1),  # exactly 0.5 is accepted ("at least 0.5")
        ([0.45, 0.35, 0.2], UNCLASSIFIED),  # winner below 0.5
        ([0.5, 0.5, 0.0], UNCLASSIFIED),  # a tie does not beat every other median
        ([0.1, 0.1, 0.8], 2),
    ],
)
def test_median_rule(median: list[float], expected: int) -> None:
    assert median_rule(np.array([median]), 0.5)[0] == expected


def test_median_rule_threshold_is_a_parameter() -> None:
    assert median_rule(np.array([[0.45, 0.35, 0.2]]), 0.4)[0] == 0


def test_median_rule_can_disagree_with_the_mean() -> None:
    # Class 0 wins on the mean thanks to a few confident passes; class 1 wins most passes.
    samples = np.array([[[0.98, 0.02]] * 4 + [[0.45, 0.55]] * 6], np.float32)
    summary = summarise(samples)
    assert summary.pred[0] == 0
    assert decide(summary, DecisionRule("median"))[0] == 1  # median of class 1 is 0.55


def test_confidence_and_none_rules() -> None:
    samples = np.array([[[0.6, 0.4]] * 3, [[0.9, 0.1]] * 3], np.float32)
    summary = summarise(samples)
    assert list(decide(summary, DecisionRule("confidence", min_confidence=0.7))) == [
        UNCLASSIFIED,
        0,
    ]
    assert list(decide(summary, DecisionRule("none"))) == [0, 0]


def test_invalid_rule_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Received: rule='mode'"):
        DecisionRule("mode")
    with pytest.raises(ValueError, match="Received: min_median=1.5"):
        DecisionRule("median", min_median=1.5)
