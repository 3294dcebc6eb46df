"""Step 5 of the data flow: turn statistics into a decision (a class or ``unclassified``).

Rules:

* ``median`` (default, docs/methods.md "Decision rules"): recommend the class whose median
  probability over the samples is strictly higher than every other class's median and at least
  ``min_median``; otherwise ``unclassified``.
* ``threshold`` (docs/methods.md "Calibration"): recommend ``pred`` unless its MC-mean
  probability is below the class's threshold from ``batchuq calibrate`` (needs a calibration).
* ``confidence``: recommend ``pred`` when the mean probability of ``pred`` is at least
  ``min_confidence``.
* ``none``: always recommend ``pred``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from batchuq.summarise import Summary

UNCLASSIFIED = -1
UNCLASSIFIED_NAME = "unclassified"  # what the Parquet `decision` column holds for UNCLASSIFIED
RULES = ("median", "threshold", "confidence", "none")


@dataclass(frozen=True)
class DecisionRule:
    """A decision rule and its parameters.

    Attributes:
        name: One of ``RULES``.
        min_median: Threshold of the median rule.
        min_confidence: Threshold of the confidence rule.
    """

    name: str = "median"
    min_median: float = 0.5
    min_confidence: float = 0.5
    thresholds: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"`rule` must be one of {RULES}. Received: rule={self.name!r}")
        for attr in ("min_median", "min_confidence"):
            value = getattr(self, attr)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{attr}` must be in [0, 1]. Received: {attr}={value}")

    def with_thresholds(self, thresholds: np.ndarray | None) -> DecisionRule:
        """This rule with calibration thresholds filled in where it has none of its own.

        Args:
            thresholds: Per-class thresholds ``(classes,)`` from a calibration, or ``None``.

        Returns:
            The rule, ready to ``decide``.

        Raises:
            ValueError: If the threshold rule ends up without thresholds.
        """
        rule = self
        if self.thresholds is None and thresholds is not None and self.name == "threshold":
            rule = dataclasses.replace(self, thresholds=np.asarray(thresholds, float))
        if rule.name == "threshold" and rule.thresholds is None:
            raise ValueError(
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
        from batchuq.postprocess.calibration import threshold_decisions

        return threshold_decisions(summary.pred, summary.confidence, rule.thresholds)
    if rule.name == "confidence":
        keep = summary.confidence >= rule.min_confidence
        return np.where(keep, summary.pred, UNCLASSIFIED).astype(np.int64)
    return summary.pred.astype(np.int64)
