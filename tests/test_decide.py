"""The decision rules of ``batchuq.postprocess.rules`` on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from batchuq.errors import UsageError
from batchuq.postprocess.rules import (
    RISK_SCORES,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
    DecisionRule,
    SelectiveRule,
    check_risk_options,
    decide,
    median_rule,
    risk_scores,
    stopping_record,
    stopping_temperature,
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


# --- the risk rule: a certified selective threshold on one score of the MC mean --------------


def _risk_summary() -> object:
    # Three images, two passes each: confident, torn between two classes, and unsure overall.
    samples = np.array(
        [
            [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]],
            [[0.5, 0.45, 0.05], [0.4, 0.55, 0.05]],
            [[0.4, 0.3, 0.3], [0.2, 0.3, 0.5]],
        ],
        np.float32,
    )
    return summarise(samples)


def test_risk_scores_are_the_summary_columns_higher_more_confident() -> None:
    summary = _risk_summary()
    mean = summary.mean.astype(np.float64)
    top2 = np.sort(mean, axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(risk_scores(summary, "confidence"), top2[:, 0], atol=1e-6)
    np.testing.assert_allclose(risk_scores(summary, "margin"), top2[:, 0] - top2[:, 1], atol=1e-6)
    entropy = -(mean * np.log(mean)).sum(axis=1)
    np.testing.assert_allclose(risk_scores(summary, "entropy"), -entropy, atol=1e-6)
    # The float32 columns, widened exactly: calibrate and score compare the same numbers.
    assert (
        risk_scores(summary, "mutual_information").tolist()
        == (-summary.mutual_info.astype(np.float64)).tolist()
    )
    for name in ("confidence", "margin", "entropy"):  # the confident image ranks first
        assert risk_scores(summary, name).argmax() == 0
    # Mutual information ranks by disagreement between passes: the torn image's passes agree
    # most with each other here, so it ranks first.
    assert risk_scores(summary, "mutual_information").argmax() == 1
    with pytest.raises(UsageError, match="risk_score"):
        risk_scores(summary, "variance")


@pytest.mark.parametrize("score", RISK_SCORES)
def test_risk_rule_accepts_at_or_above_the_threshold(score: str) -> None:
    summary = _risk_summary()
    values = risk_scores(summary, score)
    middle = float(np.sort(values)[1])
    selective = SelectiveRule(score=score, threshold=middle, statement="s", certificate={})
    rule = DecisionRule("risk").with_thresholds(None, selective)
    decisions = decide(summary, rule)
    expected = np.where(values >= middle, summary.pred, UNCLASSIFIED)
    assert decisions.tolist() == expected.tolist()
    assert (decisions == UNCLASSIFIED).sum() == 1  # exactly at the threshold is accepted
    nudged = SelectiveRule(score, float(np.nextafter(middle, np.inf)), "s", {})
    assert (decide(summary, DecisionRule("risk", selective=nudged)) == UNCLASSIFIED).sum() == 2


def test_risk_rule_metadata_and_refusals() -> None:
    selective = SelectiveRule("margin", 0.25, "the statement", {"target_risk": 0.02})
    rule = DecisionRule("risk").with_thresholds(np.array([0.5, 0.5, 0.5]), selective)
    assert rule.thresholds is None  # per-class thresholds are the threshold rule's
    assert rule.as_metadata() == {
        "rule": "risk",
        "risk_score": "margin",
        "risk_threshold": 0.25,
        "certificate": {"target_risk": 0.02},
        "statement": "the statement",
    }
    # Another rule ignores a calibration's selective threshold.
    assert DecisionRule("median").with_thresholds(None, selective).selective is None
    with pytest.raises(UsageError, match="--target-risk"):
        DecisionRule("risk").with_thresholds(np.array([0.5]), None)
    with pytest.raises(UsageError, match="calibration=None"):
        check_risk_options(calibration=False, temperature=False)
    with pytest.raises(UsageError, match="Drop --temperature"):
        check_risk_options(calibration=True, temperature=True)
    check_risk_options(calibration=True, temperature=False)


def test_stopping_record_says_what_adaptive_stopping_reads() -> None:
    """The temperature is part of the stopping only where the stopping reads the tempered
    mean against a limit; `none` and `risk` stop alike (once pred is settled)."""
    assert stopping_record("median", 0.6, 0.9, temperature=0.5) == {
        "rule": "median",
        "min_median": 0.6,
    }
    assert stopping_record("confidence", 0.6, 0.9, temperature=0.5) == {
        "rule": "confidence",
        "min_confidence": 0.9,
        "temperature": 0.5,
    }
    assert stopping_record("threshold", temperature=None)["temperature"] is None
    assert stopping_record("risk") == stopping_record("none", temperature=2.0)
    assert stopping_temperature("none", 2.0) is None
    assert stopping_temperature("confidence", 2.0) == 2.0
