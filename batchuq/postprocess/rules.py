"""Every decision rule: turn a batch's statistics into a decision (a class or ``unclassified``).

Rules (docs/methods.md, "Decision rules"):

* ``median`` (default): recommend the class whose median
  probability over the samples is strictly higher than every other class's median and at least
  ``min_median``; otherwise ``unclassified``.
* ``threshold``: recommend ``pred`` unless its MC-mean probability is below the class's
  validation threshold from ``batchuq calibrate`` (docs/methods.md, "Calibration"; needs a
  calibration). ``threshold_decisions`` applies them.
* ``confidence``: recommend ``pred`` when the mean probability of ``pred`` is at least
  ``min_confidence``.
* ``none``: always recommend ``pred``.

``UNCLASSIFIED`` (-1, written as ``UNCLASSIFIED_NAME``) is defined in ``batchuq.defaults`` and
re-exported here. NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from batchuq import checks
from batchuq.defaults import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_MEDIAN,
    DEFAULT_RULE,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
)
from batchuq.errors import UsageError
from batchuq.summarise import Summary

__all__ = [
    "RULES",
    "UNCLASSIFIED",
    "UNCLASSIFIED_NAME",
    "DecisionRule",
    "decide",
    "median_rule",
    "threshold_decisions",
]

RULES = ("median", "threshold", "confidence", "none")


@dataclass(frozen=True)
class DecisionRule:
    """A decision rule and its parameters.

    Attributes:
        name: One of ``RULES``.
        min_median: Threshold of the median rule.
        min_confidence: Threshold of the confidence rule.
        thresholds: ``(classes,)`` per-class thresholds of the threshold rule (``NaN`` = none),
            usually filled in from a calibration by ``with_thresholds``.
        extra: More entries for the Parquet metadata.

    Raises:
        UsageError: If ``name`` is not one of ``RULES`` or a threshold is outside ``[0, 1]``.
    """

    name: str = DEFAULT_RULE
    min_median: float = DEFAULT_MIN_MEDIAN
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    thresholds: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.one_of(self.name, "rule", RULES)
        # Checked, not converted: the metadata records the values as the caller gave them.
        checks.in_range(self.min_median, "min_median", 0.0, 1.0)
        checks.in_range(self.min_confidence, "min_confidence", 0.0, 1.0)

    def with_thresholds(self, thresholds: np.ndarray | None) -> DecisionRule:
        """This rule with calibration thresholds filled in where it has none of its own.

        Args:
            thresholds: Per-class thresholds ``(classes,)`` from a calibration, or ``None``.

        Returns:
            The rule, ready to ``decide``.

        Raises:
            UsageError: If the threshold rule ends up without thresholds.
        """
        rule = self
        if self.thresholds is None and thresholds is not None and self.name == "threshold":
            rule = dataclasses.replace(self, thresholds=np.asarray(thresholds, float))
        if rule.name == "threshold" and rule.thresholds is None:
            raise UsageError(
                "The threshold rule needs per-class thresholds: pass --calibration "
                "calibration.json (made by `batchuq calibrate`). Received: calibration=None"
            )
        return rule

    def as_metadata(self) -> dict:
        """The rule and the parameters it uses, for the Parquet metadata."""
        thresholds = None
        if self.thresholds is not None:
            thresholds = [None if np.isnan(t) else float(t) for t in self.thresholds]
        params = {
            "median": {"min_median": self.min_median},
            "threshold": {"thresholds": thresholds},
            "confidence": {"min_confidence": self.min_confidence},
            "none": {},
        }[self.name]
        return {"rule": self.name, **params, **self.extra}


def median_rule(median: np.ndarray, min_median: float) -> np.ndarray:
    """Apply the MC median rule.

    Args:
        median: Per-class median probabilities, shape ``(batch, classes)``.
        min_median: The top median must be at least this.

    Returns:
        ``(batch,)`` int64: the recommended class index, or ``UNCLASSIFIED`` (-1).
    """
    median = np.asarray(median)
    top = median.argmax(axis=1)
    top_value = median[np.arange(len(median)), top]
    others = median.copy()
    others[np.arange(len(median)), top] = -np.inf
    beats_all = top_value > others.max(axis=1) if median.shape[1] > 1 else np.ones(len(top), bool)
    return np.where(beats_all & (top_value >= min_median), top, UNCLASSIFIED).astype(np.int64)


def threshold_decisions(
    pred: np.ndarray, confidence_of_pred: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Apply validation thresholds: reject a prediction whose probability is below its class's.

    The thresholds come from ``batchuq.postprocess.thresholds.class_thresholds`` (docs/methods.md,
    "Calibration").

    Args:
        pred: ``(b,)`` predicted class indices.
        confidence_of_pred: ``(b,)`` probability of the predicted class (e.g. ``confidence``).
        thresholds: ``(C,)`` per-class thresholds; ``NaN`` = no threshold (always accept).

    Returns:
        ``(b,)`` int64: ``pred``, or ``UNCLASSIFIED`` (-1) where
        ``confidence_of_pred < thresholds[pred]``.

    Raises:
        UsageError: If the shapes differ or ``pred`` holds indices outside ``[0, C)``.
    """
    thresholds = checks.float_vector(thresholds, "thresholds", allow_nan=True)
    confidence = checks.vector(confidence_of_pred, "confidence_of_pred", allow_empty=True)
    # NaN confidences are kept as they are (NaN < limit is false: such a prediction stands).
    confidence = confidence.astype(np.float64)
    pred = checks.labels(
        pred,
        thresholds.size,
        "pred",
        rows=len(confidence),
        rows_of="confidence_of_pred",
        allow_empty=True,
    )
    limit = thresholds[pred]
    reject = ~np.isnan(limit) & (confidence < limit)
    return np.where(reject, UNCLASSIFIED, pred).astype(np.int64)


def decide(summary: Summary, rule: DecisionRule) -> np.ndarray:
    """Decide every image of a batch.

    Args:
        summary: Statistics of the batch.
        rule: The decision rule.

    Returns:
        ``(batch,)`` int64 class indices, ``UNCLASSIFIED`` (-1) where the rule abstains.
    """
    if rule.name == "median":
        return median_rule(summary.median, rule.min_median)
    if rule.name == "threshold":
        return threshold_decisions(summary.pred, summary.confidence, rule.thresholds)
    if rule.name == "confidence":
        keep = summary.confidence >= rule.min_confidence
        return np.where(keep, summary.pred, UNCLASSIFIED).astype(np.int64)
    return summary.pred.astype(np.int64)
