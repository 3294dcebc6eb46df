"""The decision rules of ``batchuq.postprocess.rules`` on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from batchuq.errors import UsageError
from batchuq.postprocess.rules import (
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
    DecisionRule,
    decide,
    median_rule,
)
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


def test_threshold_rule_uses_the_calibration_thresholds() -> None:
    samples = np.array([[[0.6, 0.4]] * 3, [[0.9, 0.1]] * 3, [[0.2, 0.8]] * 3], np.float32)
    summary = summarise(samples)
    rule = DecisionRule("threshold").with_thresholds(np.array([0.7, np.nan]))
    # Class 0 needs 0.7 (0.6 is rejected, 0.9 kept); class 1 has no threshold.
    assert list(decide(summary, rule)) == [UNCLASSIFIED, 0, 1]
    assert rule.as_metadata() == {"rule": "threshold", "thresholds": [0.7, None]}
    with pytest.raises(UsageError, match="needs per-class thresholds.*Received: calibration=None"):
        DecisionRule("threshold").with_thresholds(None)


def test_defaults_and_unclassified_come_from_defaults() -> None:
    from batchuq import defaults

    rule = DecisionRule()
    assert (rule.name, rule.min_median, rule.min_confidence) == (
        defaults.DEFAULT_RULE,
        defaults.DEFAULT_MIN_MEDIAN,
        defaults.DEFAULT_MIN_CONFIDENCE,
    )
    assert (UNCLASSIFIED, UNCLASSIFIED_NAME) == (defaults.UNCLASSIFIED, defaults.UNCLASSIFIED_NAME)


def test_invalid_rule_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="Received: rule='mode'"):
        DecisionRule("mode")
    with pytest.raises(UsageError, match="Received: min_median=1.5"):
        DecisionRule("median", min_median=1.5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]. Received: min_confidence=-0.1"):
        DecisionRule("confidence", min_confidence=-0.1)
