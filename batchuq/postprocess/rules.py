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
* ``risk`` (needs a calibration fitted with ``--target-risk``): recommend ``pred`` when the
  image's risk score (``risk_scores``; higher = more confident) is at or above the selective
  threshold that ``batchuq.fit_selective_threshold`` certified; otherwise ``unclassified``.
* ``none``: always recommend ``pred``.

With ``--passes auto`` the rule also decides when sampling stops (``batchuq.sampling.stopping``);
``stopping_record`` says how, for the calibration file's predictor.

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
    "RISK_RULE_NEEDS",
    "RISK_SCORES",
    "SelectiveRule",
    "check_adaptive_calibration",
    "check_risk_options",
    "decide",
    "median_rule",
    "risk_scores",
    "selective_decisions",
    "stopping_record",
    "stopping_temperature",
    "threshold_decisions",
]

RISK_RULE_NEEDS = (
    "The risk rule needs a selective threshold: pass --calibration calibration.json made by "
    "`batchuq calibrate --target-risk R` (a calibration fitted without --target-risk has none)."
)
RULES = ("median", "threshold", "confidence", "risk", "none")
# Scores a selective threshold can be fitted on, each higher = more confident, from the same
# Summary fields that `score` writes as Parquet columns (batchuq.summarise).
RISK_SCORES = ("confidence", "margin", "entropy", "mutual_information")


def risk_scores(summary: Summary, name: str) -> np.ndarray:
    """The risk score ``name`` of each image, higher = more confident.

    ``confidence`` (max of the MC mean) and ``margin`` (top-1 minus top-2 of the mean) as
    they are; ``entropy`` (of the mean) and ``mutual_information`` (``mutual_info``, BALD)
    negated. They are the float32 values of the Parquet columns, widened exactly to float64,
    so a threshold fitted by ``calibrate`` compares with ``score``'s values bit for bit.

    Args:
        summary: The images' statistics (``batchuq.summarise``).
        name: One of ``RISK_SCORES``.

    Returns:
        ``(batch,)`` float64.

    Raises:
        UsageError: If ``name`` is not one of ``RISK_SCORES``.
    """
    checks.one_of(name, "risk_score", RISK_SCORES)
    if name == "confidence":
        return np.asarray(summary.confidence, np.float64)
    if name == "margin":
        return np.asarray(summary.margin, np.float64)
    if name == "entropy":
        return -np.asarray(summary.entropy, np.float64)
    return -np.asarray(summary.mutual_info, np.float64)


def check_risk_options(*, calibration: bool, temperature: bool) -> None:
    """Refuse the options the ``risk`` rule cannot honour.

    Its threshold was fitted on the untempered MC mean of the calibration's predictor, so the
    scores it compares must be those too: ``--temperature`` would move them (and can reorder
    images). ``--passes auto`` is not refused here: a calibration fitted with ``calibrate
    --score-passes auto`` holds for it, and any other is refused by the predictor check.

    Args:
        calibration: Whether a calibration was given.
        temperature: Whether ``--temperature`` was asked for.

    Raises:
        UsageError: Naming the option to drop.
    """
    if not calibration:
        raise UsageError(f"{RISK_RULE_NEEDS} Received: calibration=None")
    if temperature:
        raise UsageError(
            "--rule risk compares the untempered MC mean's score with a threshold fitted on "
            "it; a temperature would change the scores (and their order). Drop --temperature. "
            "Received: rule='risk', temperature=True"
        )


def check_adaptive_calibration(score_rule: str) -> None:
    """Refuse a rule that ``calibrate --score-passes auto`` cannot fit the adaptive predictor of.

    The adaptive predictor stops by the rule ``score`` will use (``stopping_record``). The
    threshold rule's stopping reads the thresholds, and those of ``--rule threshold
    --temperature`` are fitted on this very predictor: the predictor would depend on its own fit.

    Args:
        score_rule: The ``score --rule`` the calibration is for.

    Raises:
        UsageError: For ``threshold`` or a name not in ``RULES``.
    """
    checks.one_of(score_rule, "score_rule", RULES)
    if score_rule == "threshold":
        raise UsageError(
            "calibrate --score-passes auto fits the adaptive predictor of one decision rule, "
            "and the threshold rule's stopping reads the thresholds this calibration fits: use "
            "--score-rule median, confidence, none or risk, or a number of --score-passes. "
            "Received: score_passes='auto', score_rule='threshold'"
        )


# The rules whose adaptive stopping reads the (tempered) mean against a limit: the temperature
# changes when they stop. The median rule reads the samples' medians, `none` and `risk` stop
# once `pred` is settled, and a temperature never moves the argmax.
_TEMPERED_STOPPING = ("threshold", "confidence")


def stopping_temperature(rule_name: str, temperature: float | None) -> float | None:
    """The temperature ``--passes auto`` stops on under rule ``rule_name``: ``temperature``
    for the ``threshold`` and ``confidence`` rules, else ``None`` (it would change nothing
    their stopping reads)."""
    return temperature if rule_name in _TEMPERED_STOPPING else None


def stopping_record(
    rule_name: str,
    min_median: float = DEFAULT_MIN_MEDIAN,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    temperature: float | None = None,
) -> dict:
    """What decides when ``--passes auto`` stops sampling an image, as a calibration records it.

    Adaptive stopping reads the run's decision rule (``sampling.stopping.settled``), so the
    adaptive predictor is the rule's as much as the passes': the median rule with its
    ``min_median``; the confidence rule with its ``min_confidence`` and the temperature it
    stops on; the threshold rule with the temperature (its thresholds are the calibration's);
    ``none`` and ``risk`` alike, once ``pred`` is settled (the risk rule's threshold is fitted
    on this predictor's output, so it cannot steer its sampling).

    Args:
        rule_name: One of ``RULES``.
        min_median: The median rule's threshold.
        min_confidence: The confidence rule's threshold.
        temperature: The temperature of the run's mean (``--temperature``), if any.

    Returns:
        ``{"rule": ..., ...}``, JSON-ready; equal for runs that stop alike.
    """
    checks.one_of(rule_name, "rule", RULES)
    if rule_name == "median":
        return {"rule": "median", "min_median": float(min_median)}
    tempered = stopping_temperature(rule_name, temperature)
    tempered = None if tempered is None else float(tempered)
    if rule_name == "confidence":
        return {
            "rule": "confidence",
            "min_confidence": float(min_confidence),
            "temperature": tempered,
        }
    if rule_name == "threshold":
        return {"rule": "threshold", "temperature": tempered}
    return {"rule": "pred settled (none, risk)"}


@dataclass(frozen=True)
class SelectiveRule:
    """The fitted selective threshold of the ``risk`` rule, as a calibration file holds it.

    Attributes:
        score: The risk score, one of ``RISK_SCORES``.
        threshold: Accept an image when its score is at or above it.
        statement: The certificate's guarantee in one sentence (``SelectiveCertificate``).
        certificate: The certificate's fields (target risk, delta, n, accepted, errors, bound,
            method).
    """

    score: str
    threshold: float
    statement: str
    certificate: dict = field(default_factory=dict)

    def as_metadata(self) -> dict:
        """The entries the Parquet metadata records for the ``risk`` rule."""
        return {
            "risk_score": self.score,
            "risk_threshold": float(self.threshold),
            "certificate": dict(self.certificate),
            "statement": self.statement,
        }


@dataclass(frozen=True)
class DecisionRule:
    """A decision rule and its parameters.

    Attributes:
        name: One of ``RULES``.
        min_median: Threshold of the median rule.
        min_confidence: Threshold of the confidence rule.
        thresholds: ``(classes,)`` per-class thresholds of the threshold rule (``NaN`` = none),
            usually filled in from a calibration by ``with_thresholds``.
        selective: The ``risk`` rule's fitted threshold, filled in from a calibration by
            ``with_thresholds``.
        extra: More entries for the Parquet metadata.

    Raises:
        UsageError: If ``name`` is not one of ``RULES`` or a threshold is outside ``[0, 1]``.
    """

    name: str = DEFAULT_RULE
    min_median: float = DEFAULT_MIN_MEDIAN
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    thresholds: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    selective: SelectiveRule | None = None

    def __post_init__(self) -> None:
        checks.one_of(self.name, "rule", RULES)
        # Checked, not converted: the metadata records the values as the caller gave them.
        checks.in_range(self.min_median, "min_median", 0.0, 1.0)
        checks.in_range(self.min_confidence, "min_confidence", 0.0, 1.0)

    def with_thresholds(
        self, thresholds: np.ndarray | None, selective: SelectiveRule | None = None
    ) -> DecisionRule:
        """This rule with calibration thresholds filled in where it has none of its own.

        Args:
            thresholds: Per-class thresholds ``(classes,)`` from a calibration, or ``None``.
            selective: The calibration's selective threshold, or ``None``.

        Returns:
            The rule, ready to ``decide``.

        Raises:
            UsageError: If the threshold rule ends up without thresholds, or the risk rule
                without a selective threshold.
        """
        rule = self
        if self.thresholds is None and thresholds is not None and self.name == "threshold":
            rule = dataclasses.replace(self, thresholds=np.asarray(thresholds, float))
        if self.selective is None and selective is not None and self.name == "risk":
            rule = dataclasses.replace(self, selective=selective)
        if rule.name == "risk" and rule.selective is None:
            raise UsageError(f"{RISK_RULE_NEEDS} Received: selective=None")
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
            "risk": self.selective.as_metadata() if self.selective is not None else {},
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
    if rule.name == "risk":
        return selective_decisions(summary, rule.selective)
    return summary.pred.astype(np.int64)


def selective_decisions(summary: Summary, selective: SelectiveRule) -> np.ndarray:
    """Apply the ``risk`` rule: accept ``pred`` where the risk score is ``>= threshold``.

    Args:
        summary: The images' statistics (the untempered MC mean, as fitted).
        selective: The fitted selective threshold.

    Returns:
        ``(batch,)`` int64: ``pred``, or ``UNCLASSIFIED`` (-1) below the threshold (a NaN
        score is below it).
    """
    keep = risk_scores(summary, selective.score) >= selective.threshold
    return np.where(keep, summary.pred, UNCLASSIFIED).astype(np.int64)
