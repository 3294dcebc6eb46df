"""Metrics over a labelled set of scored images, in plain NumPy.

Formulas follow ``docs/methods.md`` ("Metrics over a labelled set") exactly, so that the numbers can
be compared with other tools:

* ``accuracy``, ``coverage`` (accepted / N) and ``selective_accuracy`` (accuracy on accepted).
* ``nll`` = -(1/N) sum_i ln p_i,y_i with probabilities clipped at 1e-12.
* ``brier`` = (1/N) sum_i sum_c (p_ic - 1[y_i = c])^2 (summed over classes, averaged over images).
* ``ece``: 15 equal-width bins over [0, 1] on the confidence, left-closed ``[b/15, (b+1)/15)``
  with 1.0 in the last bin; ECE = sum over non-empty bins of (n_b / N) |acc_b - conf_b|.
* ``aurc``: sort by confidence descending (ties keep their input order), risk_k = errors among
  the top k / k, trapezoidal area of risk over coverage k/N for k = 1..N.
* ``auroc``: rank-based (Mann-Whitney) area under the ROC curve, ties get average ranks; equal to
  ``sklearn.metrics.roc_auc_score`` (scikit-learn is not needed at run time).

Every function validates its input with ``batchuq.checks`` (the checks the post-processing
shares) and raises ``UsageError``, a ``ValueError``, naming the argument in the Keras style
``... Received: name=...``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from batchuq import checks
from batchuq.errors import UsageError

NLL_CLIP = 1e-12
DEFAULT_ECE_BINS = 15

__all__ = [
    "DEFAULT_ECE_BINS",
    "NLL_CLIP",
    "ReliabilityBins",
    "accuracy",
    "aurc",
    "auroc",
    "brier",
    "coverage",
    "ece",
    "nll",
    "reliability_bins",
    "risk_coverage_curve",
    "selective_accuracy",
]


class ReliabilityBins(NamedTuple):
    """Equal-width confidence bins of a reliability diagram.

    Attributes:
        edges: Bin edges, shape ``(n_bins + 1,)``, ``np.linspace(0, 1, n_bins + 1)``.
        counts: Images per bin, shape ``(n_bins,)`` int64.
        accuracy: Share of correct predictions per bin, shape ``(n_bins,)``; NaN for empty bins.
        confidence: Mean confidence per bin, shape ``(n_bins,)``; NaN for empty bins.
    """

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray


def _probs_and_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(n, classes)`` probabilities (``n >= 1``) and ``(n,)`` class indices of them."""
    p = checks.probabilities(probs, "probs", axes=("n", "classes"), allow_empty=False)
    return p, checks.labels(labels, p.shape[1], "labels", rows=len(p), rows_of="probs")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def accuracy(pred: ArrayLike, labels: ArrayLike) -> float:
    """Share of images whose predicted class is the label.

    Args:
        pred: Predicted class indices, shape ``(n,)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        The accuracy in [0, 1].

    Raises:
        UsageError: If an argument is empty, not 1-D, not integer, or the lengths differ.
    """
    p = checks.int_vector(pred, "pred")
    y = checks.int_vector(labels, "labels")
    checks.same_length(pred=p, labels=y)
    return float(np.mean(p == y))


def coverage(accepted: ArrayLike) -> float:
    """Share of images the decision rule accepted (did not leave ``unclassified``).

    Args:
        accepted: Boolean mask, shape ``(n,)``.

    Returns:
        accepted / n, in [0, 1].

    Raises:
        UsageError: If ``accepted`` is empty, not 1-D or not boolean.
    """
    mask = checks.bool_vector(accepted, "accepted")
    return float(np.mean(mask))


def selective_accuracy(correct: ArrayLike, accepted: ArrayLike) -> float:
    """Accuracy on the accepted images only.

    Args:
        correct: Whether each image's decision is right, boolean shape ``(n,)``. Only the
            entries of accepted images are read.
        accepted: Boolean mask of the accepted images, shape ``(n,)``.

    Returns:
        Correct accepted / accepted, or NaN when no image is accepted.

    Raises:
        UsageError: If an argument is empty, not 1-D, not boolean, or the lengths differ.
    """
    ok = checks.bool_vector(correct, "correct")
    mask = checks.bool_vector(accepted, "accepted")
    checks.same_length(correct=ok, accepted=mask)
    if not mask.any():
        return float("nan")
    return float(np.mean(ok[mask]))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Negative log-likelihood of the labels, -(1/N) sum ln p_i,y_i, clipped at 1e-12.

    Args:
        probs: Predictive (mean) class probabilities, shape ``(n, classes)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        The mean NLL in nats (at most -ln 1e-12 ~ 27.6).

    Raises:
        UsageError: If ``probs`` is not a 2-D array of probabilities, ``labels`` are not class
            indices of it, or the lengths differ.
    """
    p, y = _probs_and_labels(probs, labels)
    p_true = p[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p_true, NLL_CLIP, None))))


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Brier score, (1/N) sum_i sum_c (p_ic - 1[y_i = c])^2, summed over classes.

    Args:
        probs: Predictive (mean) class probabilities, shape ``(n, classes)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        The Brier score in [0, 2].

    Raises:
        UsageError: If ``probs`` is not a 2-D array of probabilities, ``labels`` are not class
            indices of it, or the lengths differ.
    """
    p, y = _probs_and_labels(probs, labels)
    one_hot = np.zeros_like(p)
    one_hot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - one_hot) ** 2, axis=1)))


def reliability_bins(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_ECE_BINS
) -> ReliabilityBins:
    """Group images into equal-width confidence bins (left-closed, 1.0 in the last bin).

    Bin ``b`` holds the confidences ``edges[b] <= c < edges[b + 1]`` with
    ``edges = np.linspace(0, 1, n_bins + 1)``; ``c = 1.0`` goes into the last bin.

    Args:
        confidence: Confidence of each prediction (max mean probability), shape ``(n,)``,
            values in [0, 1].
        correct: Whether each prediction is right, boolean shape ``(n,)``.
        n_bins: Number of bins.

    Returns:
        A ``ReliabilityBins`` with edges, counts, per-bin accuracy and mean confidence.

    Raises:
        UsageError: If ``confidence`` is empty, not 1-D, non-finite or outside [0, 1],
            ``correct`` is not boolean, the lengths differ, or ``n_bins`` is not positive.
    """
    n_bins = checks.positive_int(n_bins, "n_bins")
    conf = checks.float_vector(confidence, "confidence", unit_interval=True)
    ok = checks.bool_vector(correct, "correct")
    checks.same_length(confidence=conf, correct=ok)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    hits = np.bincount(index, weights=ok.astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_b = np.where(counts > 0, hits / counts, np.nan)
        conf_b = np.where(counts > 0, conf_sum / counts, np.nan)
    return ReliabilityBins(edges=edges, counts=counts, accuracy=acc_b, confidence=conf_b)


def ece(confidence: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins.

    ECE = sum over non-empty bins b of (n_b / N) |acc_b - conf_b|, bins as in
    ``reliability_bins`` (left-closed, 1.0 in the last bin).

    Args:
        confidence: Confidence of each prediction, shape ``(n,)``, values in [0, 1].
        correct: Whether each prediction is right, boolean shape ``(n,)``.
        n_bins: Number of bins (docs/methods.md: 15).

    Returns:
        The ECE in [0, 1].

    Raises:
        UsageError: As ``reliability_bins``.
    """
    bins = reliability_bins(confidence, correct, n_bins)
    filled = bins.counts > 0
    weights = bins.counts[filled] / bins.counts.sum()
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(weights * gaps))


def risk_coverage_curve(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk when only the k most confident images are kept, for k = 1..N.

    Images are sorted by confidence, descending; ties keep their input order (stable sort).

    Args:
        confidence: Confidence of each prediction, shape ``(n,)`` (any finite score where
            higher means more confident).
        correct: Whether each prediction is right, boolean shape ``(n,)``.

    Returns:
        ``(coverage, risk)``, both shape ``(n,)``: coverage k/N and risk_k = errors among the
        top k / k.

    Raises:
        UsageError: If ``confidence`` is empty, not 1-D or non-finite, ``correct`` is not
            boolean, or the lengths differ.
    """
    conf = checks.float_vector(confidence, "confidence")
    ok = checks.bool_vector(correct, "correct")
    checks.same_length(confidence=conf, correct=ok)
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(~ok[order])
    k = np.arange(1, len(conf) + 1)
    return k / len(conf), errors / k


def aurc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (trapezoidal, over coverage k/N for k = 1..N).

    With a single image the curve is one point and the area is 0.

    Args:
        confidence: Confidence of each prediction, shape ``(n,)``.
        correct: Whether each prediction is right, boolean shape ``(n,)``.

    Returns:
        The AURC in [0, 1]; lower is better.

    Raises:
        UsageError: As ``risk_coverage_curve``.
    """
    cov, risk = risk_coverage_curve(confidence, correct)
    return float(np.trapezoid(risk, cov))


def auroc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for telling positives from negatives.

    Rank-based (Mann-Whitney U / (n_pos n_neg)) with average ranks for tied scores, which
    equals ``sklearn.metrics.roc_auc_score(positives, scores)``.

    Args:
        scores: Scores where higher means "more likely positive", shape ``(n,)``.
        positives: Whether each item is a positive, boolean shape ``(n,)``.

    Returns:
        The AUROC in [0, 1]; 0.5 is chance.

    Raises:
        UsageError: If ``scores`` is empty, not 1-D or non-finite, ``positives`` is not
            boolean, the lengths differ, or ``positives`` holds only one class.
    """
    s = checks.float_vector(scores, "scores")
    pos = checks.bool_vector(positives, "positives")
    checks.same_length(scores=s, positives=pos)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UsageError(
            "`positives` must contain both positives and negatives for the AUROC to be "
            f"defined. Received: positives={checks.show(pos)}"
        )
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each group of tied scores.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
