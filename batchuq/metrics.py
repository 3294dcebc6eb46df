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

Every function validates its input and raises ``ValueError`` naming the argument, in the Keras
style ``... Received: name=...``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

NLL_CLIP = 1e-12
DEFAULT_ECE_BINS = 15
# Float32 probabilities may overshoot [0, 1] by rounding; values this close are clipped, not
# rejected.
_PROB_TOLERANCE = 1e-6

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


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A short repr of ``value`` for error messages."""
    if isinstance(value, np.ndarray):
        with np.printoptions(threshold=8, edgeitems=3, precision=6):
            text = np.array2string(value, separator=", ")
        return f"array({text}, shape={value.shape}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _as_array(value: ArrayLike, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"`{name}` must be array-like ({exc}). Received: {name}={_show(value)}"
        ) from None


def _vector(value: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``value`` as a 1-D array, non-empty unless ``allow_empty``."""
    array = _as_array(value, name)
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of shape (n,). Received: {name}={_show(array)}"
        )
    if not allow_empty and array.size == 0:
        raise ValueError(f"`{name}` must not be empty. Received: {name}={_show(array)}")
    return array


def _float_vector(value: ArrayLike, name: str, *, unit_interval: bool = False) -> np.ndarray:
    """A non-empty 1-D float64 array of finite values (in [0, 1] if ``unit_interval``)."""
    array = _vector(value, name)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"`{name}` must hold real numbers. Received: {name}={_show(array)}")
    if np.iscomplexobj(array):
        raise ValueError(f"`{name}` must hold real numbers. Received: {name}={_show(array)}")
    out = array.astype(np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"`{name}` must hold finite numbers, but {name}[{i}] = {out[i]}. "
            f"Received: {name}={_show(array)}"
        )
    if unit_interval:
        outside = (out < -_PROB_TOLERANCE) | (out > 1.0 + _PROB_TOLERANCE)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"`{name}` must hold values in [0, 1], but {name}[{i}] = {out[i]}. "
                f"Received: {name}={_show(array)}"
            )
        out = np.clip(out, 0.0, 1.0)
    return out


def _bool_vector(value: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """A 1-D bool array from booleans or the numbers 0 and 1."""
    array = _vector(value, name, allow_empty=allow_empty)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(
            f"`{name}` must hold booleans (or 0 and 1). Received: {name}={_show(array)}"
        )
    not_binary = ~np.isin(array, (0, 1))
    if not_binary.any():
        i = int(np.flatnonzero(not_binary)[0])
        raise ValueError(
            f"`{name}` must hold booleans (or 0 and 1), but {name}[{i}] = {array[i]}. "
            f"Received: {name}={_show(array)}"
        )
    return array.astype(bool)


def _int_vector(value: ArrayLike, name: str) -> np.ndarray:
    """A non-empty 1-D int64 array (floats are accepted when they hold whole numbers)."""
    array = _vector(value, name)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        whole = np.isfinite(array) & (np.floor(array) == array)
        if whole.all():
            return array.astype(np.int64)
        i = int(np.flatnonzero(~whole)[0])
        raise ValueError(
            f"`{name}` must hold integer class indices, but {name}[{i}] = {array[i]}. "
            f"Received: {name}={_show(array)}"
        )
    raise ValueError(f"`{name}` must hold integer class indices. Received: {name}={_show(array)}")


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        names = ", ".join(lengths)
        shown = ", ".join(f"{name}.shape={array.shape}" for name, array in arrays.items())
        raise ValueError(f"{names} must have the same length. Received: {shown}")


def _probs_and_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _as_array(probs, "probs")
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(
            "`probs` must be a 2-D array of shape (n, classes) with at least one row and "
            f"class. Received: probs={_show(p)}"
        )
    if p.dtype == bool or not np.issubdtype(p.dtype, np.number) or np.iscomplexobj(p):
        raise ValueError(f"`probs` must hold real numbers. Received: probs={_show(p)}")
    p = p.astype(np.float64)
    bad = ~np.isfinite(p) | (p < -_PROB_TOLERANCE) | (p > 1.0 + _PROB_TOLERANCE)
    if bad.any():
        i, c = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"`probs` must hold probabilities in [0, 1], but probs[{i}, {c}] = {p[i, c]}. "
            f"Received: probs={_show(p)}"
        )
    y = _int_vector(labels, "labels")
    _same_length(probs=p, labels=y)
    outside = (y < 0) | (y >= p.shape[1])
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"`labels` must be class indices in [0, {p.shape[1]}), but labels[{i}] = {y[i]}. "
            f"Received: labels={_show(y)}"
        )
    return np.clip(p, 0.0, 1.0), y


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer. Received: n_bins={n_bins!r}")
    return int(n_bins)


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
        ValueError: If an argument is empty, not 1-D, not integer, or the lengths differ.
    """
    p = _int_vector(pred, "pred")
    y = _int_vector(labels, "labels")
    _same_length(pred=p, labels=y)
    return float(np.mean(p == y))


def coverage(accepted: ArrayLike) -> float:
    """Share of images the decision rule accepted (did not leave ``unclassified``).

    Args:
        accepted: Boolean mask, shape ``(n,)``.

    Returns:
        accepted / n, in [0, 1].

    Raises:
        ValueError: If ``accepted`` is empty, not 1-D or not boolean.
    """
    mask = _bool_vector(accepted, "accepted")
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
        ValueError: If an argument is empty, not 1-D, not boolean, or the lengths differ.
    """
    ok = _bool_vector(correct, "correct")
    mask = _bool_vector(accepted, "accepted")
    _same_length(correct=ok, accepted=mask)
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
        ValueError: If ``probs`` is not a 2-D array of probabilities, ``labels`` are not class
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
        ValueError: If ``probs`` is not a 2-D array of probabilities, ``labels`` are not class
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
        ValueError: If ``confidence`` is empty, not 1-D, non-finite or outside [0, 1],
            ``correct`` is not boolean, the lengths differ, or ``n_bins`` is not positive.
    """
    n_bins = _check_n_bins(n_bins)
    conf = _float_vector(confidence, "confidence", unit_interval=True)
    ok = _bool_vector(correct, "correct")
    _same_length(confidence=conf, correct=ok)
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
        ValueError: As ``reliability_bins``.
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
        ValueError: If ``confidence`` is empty, not 1-D or non-finite, ``correct`` is not
            boolean, or the lengths differ.
    """
    conf = _float_vector(confidence, "confidence")
    ok = _bool_vector(correct, "correct")
    _same_length(confidence=conf, correct=ok)
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
        ValueError: As ``risk_coverage_curve``.
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
        ValueError: If ``scores`` is empty, not 1-D or non-finite, ``positives`` is not
            boolean, the lengths differ, or ``positives`` holds only one class.
    """
    s = _float_vector(scores, "scores")
    pos = _bool_vector(positives, "positives")
    _same_length(scores=s, positives=pos)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "`positives` must contain both positives and negatives for the AUROC to be "
            f"defined. Received: positives={_show(pos)}"
        )
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each group of tied scores.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
