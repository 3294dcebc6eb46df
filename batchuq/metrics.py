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

The bootstrap of ``batchuq compare`` draws resamples of the images as counts (how often each
image is drawn) and computes the metrics of many resamples at once from them: the
``resampled_*`` functions give, for a ``(resamples, n)`` matrix of counts, what the functions
above give for each resample expanded into its images (``paired_bootstrap``,
``percentile_interval``).

Every metric validates its input with ``batchuq.checks`` (the checks the post-processing
shares) and raises ``UsageError``, a ``ValueError``, naming the argument in the Keras style
``... Received: name=...``. The ``resampled_*`` functions take arrays their caller has already
read through those checks (``batchuq.jobs.compare`` from evaluate's labelled rows) and check
nothing again, since they run once per chunk of resamples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from batchuq import checks
from batchuq.errors import UsageError

NLL_CLIP = 1e-12
DEFAULT_ECE_BINS = 15

__all__ = [
    "BOOTSTRAP_CHUNK_CELLS",
    "DEFAULT_ECE_BINS",
    "DEFAULT_RESAMPLES",
    "NLL_CLIP",
    "ReliabilityBins",
    "accuracy",
    "aurc",
    "auroc",
    "bootstrap_counts",
    "brier",
    "brier_terms",
    "coverage",
    "ece",
    "nll",
    "nll_terms",
    "paired_bootstrap",
    "percentile_interval",
    "reliability_bins",
    "resampled_aurc",
    "resampled_auroc",
    "resampled_ece",
    "resampled_mean",
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
    return float(np.mean(nll_terms(probs, labels)))


def nll_terms(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Each image's term of ``nll``: -ln p_i,y_i, clipped at 1e-12.

    Args:
        probs: Predictive (mean) class probabilities, shape ``(n, classes)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        The terms, float64 shape ``(n,)``; ``nll`` is their mean.

    Raises:
        UsageError: As ``nll``.
    """
    p, y = _probs_and_labels(probs, labels)
    return -np.log(np.clip(p[np.arange(len(y)), y], NLL_CLIP, None))


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
    return float(np.mean(brier_terms(probs, labels)))


def brier_terms(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Each image's term of ``brier``: sum_c (p_ic - 1[y_i = c])^2.

    Args:
        probs: Predictive (mean) class probabilities, shape ``(n, classes)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        The terms, float64 shape ``(n,)``; ``brier`` is their mean.

    Raises:
        UsageError: As ``brier``.
    """
    p, y = _probs_and_labels(probs, labels)
    one_hot = np.zeros_like(p)
    one_hot[np.arange(len(y)), y] = 1.0
    return np.sum((p - one_hot) ** 2, axis=1)


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
    index = _bin_index(conf, edges)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    hits = np.bincount(index, weights=ok.astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_b = np.where(counts > 0, hits / counts, np.nan)
        conf_b = np.where(counts > 0, conf_sum / counts, np.nan)
    return ReliabilityBins(edges=edges, counts=counts, accuracy=acc_b, confidence=conf_b)


def _bin_index(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each confidence: ``edges[b] <= c < edges[b + 1]``, 1.0 in the last bin."""
    n_bins = len(edges) - 1
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)


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


# --------------------------------------------------------------------------------------------
# Bootstrap: the metrics above over many resamples at once
# --------------------------------------------------------------------------------------------

# Cells of the (resamples, items) count matrices drawn at once: about 8 MB of float64 each, so
# that memory stays flat however many images and resamples there are.
BOOTSTRAP_CHUNK_CELLS = 1_000_000
# Resamples of the bootstrap unless told otherwise (`batchuq compare --bootstrap`).
DEFAULT_RESAMPLES = 1000


def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn, in each of ``resamples`` draws of ``n`` items
    with replacement.

    Args:
        n: The number of items (images).
        resamples: The number of resamples.
        rng: The generator the draws come from.

    Returns:
        Float64 counts, shape ``(resamples, n)``; each row sums to ``n``.
    """
    draws = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    counts = np.bincount(draws.ravel(), minlength=resamples * n)
    return counts.reshape(resamples, n).astype(np.float64)


def paired_bootstrap(
    statistic: Callable[..., np.ndarray],
    sizes: Sequence[int],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """Evaluate ``statistic`` on bootstrap resamples of one or more independent sets of items.

    Each set (the in-distribution images, the OOD images, ...) is resampled with replacement
    within itself, independently of the others, from its own stream of ``seed``. Whatever
    ``statistic`` computes from one resample (say, a metric of every run on the same images)
    sees the same resample: that is what pairs the runs. The resamples are drawn in chunks of
    about ``BOOTSTRAP_CHUNK_CELLS`` counts.

    Args:
        statistic: Called as ``statistic(*counts)`` with one float64 count matrix per set,
            ``counts[k]`` of shape ``(b, sizes[k])`` (``bootstrap_counts``); returns an array
            whose first axis has length ``b``, one entry per resample.
        sizes: The number of items of each set.
        resamples: The number of resamples B.
        seed: The seed of the draws; the same seed gives the same resamples.

    Returns:
        The statistic of every resample, stacked: shape ``(resamples, ...)``.

    Raises:
        UsageError: If ``sizes`` is empty or holds a size below 1, or ``resamples`` is not a
            positive integer.
    """
    resamples = checks.positive_int(resamples, "resamples")
    sizes = [checks.positive_int(size, "sizes") for size in sizes]
    if not sizes:
        raise UsageError("`sizes` must give at least one set's size. Received: sizes=[]")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(sizes))]
    step = max(1, BOOTSTRAP_CHUNK_CELLS // sum(sizes))
    parts = []
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        counts = [bootstrap_counts(n, b, rng) for n, rng in zip(sizes, streams, strict=True)]
        parts.append(np.asarray(statistic(*counts), dtype=np.float64))
    return np.concatenate(parts)


def percentile_interval(
    samples: ArrayLike, level: float = 0.95, min_defined: float = 0.99
) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of bootstrap samples, along their first axis.

    Resamples where the statistic is undefined (NaN: no error drawn for an AUROC, nothing
    accepted, ...) are left out; where fewer than ``min_defined`` of them define it, the
    interval is NaN.

    Args:
        samples: The statistic of each resample, shape ``(resamples, ...)``.
        level: The coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.
        min_defined: The smallest share of resamples that must define the statistic.

    Returns:
        ``(low, high)``, each of shape ``samples.shape[1:]``.

    Raises:
        UsageError: If ``level`` is not in (0, 1).
    """
    level = checks.in_range(level, "level", 0.0, 1.0)
    values = np.asarray(samples, dtype=np.float64)
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    defined = np.isfinite(values).mean(axis=0) >= min_defined
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN, as wanted
        low, high = np.nanpercentile(np.where(np.isfinite(values), values, np.nan), tails, axis=0)
    return np.where(defined, low, np.nan), np.where(defined, high, np.nan)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, NaN where the denominator is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan
        )


def resampled_mean(values: ArrayLike, weights: np.ndarray) -> np.ndarray:
    """The mean of ``values`` in each resample: accuracy, coverage, NLL or Brier from their
    per-image terms.

    Args:
        values: One value per item, shape ``(n,)`` (booleans count as 0 and 1).
        weights: How often each item is drawn in each resample, shape ``(b, n)``.

    Returns:
        ``sum_i w_i v_i / sum_i w_i`` per resample, shape ``(b,)``; NaN where nothing is drawn.
    """
    v = np.asarray(values, dtype=np.float64)
    return _divide(weights @ v, weights.sum(axis=1))


def resampled_ece(
    confidence: ArrayLike, correct: ArrayLike, weights: np.ndarray, n_bins: int = DEFAULT_ECE_BINS
) -> np.ndarray:
    """``ece`` of each resample: sum_b |sum_{i in b} w_i (correct_i - conf_i)| / sum_i w_i.

    Args:
        confidence: Confidence of each prediction, shape ``(n,)``, values in [0, 1].
        correct: Whether each prediction is right, boolean shape ``(n,)``.
        weights: How often each item is drawn in each resample, shape ``(b, n)``.
        n_bins: Number of bins, as in ``ece``.

    Returns:
        The ECE of each resample, shape ``(b,)``; NaN where nothing is drawn.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    gaps = np.asarray(correct, dtype=np.float64) - conf
    index = _bin_index(conf, np.linspace(0.0, 1.0, n_bins + 1))
    by_bin = np.zeros((len(conf), n_bins))
    by_bin[np.arange(len(conf)), index] = gaps
    return _divide(np.abs(weights @ by_bin).sum(axis=1), weights.sum(axis=1))


def resampled_aurc(confidence: ArrayLike, correct: ArrayLike, weights: np.ndarray) -> np.ndarray:
    """``aurc`` of each resample, without expanding it.

    The items are sorted once by confidence, descending (ties in input order, as ``aurc``).
    Item j, drawn w_j times after K items (K = the weights before it) of which E were wrong,
    holds positions k = K+1..K+w_j of the resample's curve, where the errors are
    E + err_j (k - K); its share of sum_k risk_k is E (H(K+w_j) - H(K)) + err_j (w_j - K
    (H(K+w_j) - H(K))) with H the harmonic numbers. The trapezoidal area over coverage k/N is
    then (sum_k risk_k - (risk_1 + risk_N) / 2) / N.

    Args:
        confidence: Confidence of each prediction, shape ``(n,)``.
        correct: Whether each prediction is right, boolean shape ``(n,)``.
        weights: How often each item is drawn in each resample, shape ``(b, n)``, integers.

    Returns:
        The AURC of each resample, shape ``(b,)``; NaN where nothing is drawn.
    """
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    wrong = 1.0 - np.asarray(correct, dtype=np.float64)[order]
    w = weights[:, order]
    after = np.cumsum(w, axis=1)
    errors_after = np.cumsum(w * wrong, axis=1)
    before, errors_before = after - w, errors_after - w * wrong
    total = after[:, -1] if w.shape[1] else np.zeros(len(w))
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(total.max(initial=0)) + 1))])
    steps = harmonic[after.astype(np.int64)] - harmonic[before.astype(np.int64)]
    risk_sum = (errors_before * steps + wrong * (w - before * steps)).sum(axis=1)
    first = wrong[np.argmax(w > 0, axis=1)]  # the risk at k = 1: the top item drawn
    last = _divide(errors_after[:, -1], total) if w.shape[1] else total
    return _divide(risk_sum - (first + last) / 2, total)


def resampled_auroc(scores: ArrayLike, positives: ArrayLike, weights: np.ndarray) -> np.ndarray:
    """``auroc`` of each resample: P(positive scores above negative) + P(tie) / 2, weighted.

    Args:
        scores: Scores where higher means "more likely positive", shape ``(n,)``.
        positives: Whether each item is a positive, boolean shape ``(n,)``.
        weights: How often each item is drawn in each resample, shape ``(b, n)``.

    Returns:
        The AUROC of each resample, shape ``(b,)``; NaN where a resample draws no positive or
        no negative.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    order = np.argsort(s[~pos], kind="stable")
    negatives = s[~pos][order]
    below = np.cumsum(weights[:, ~pos][:, order], axis=1)
    below = np.concatenate([np.zeros((len(weights), 1)), below], axis=1)
    lower = below[:, np.searchsorted(negatives, s[pos], side="left")]
    upper = below[:, np.searchsorted(negatives, s[pos], side="right")]
    w_pos = weights[:, pos]
    pairs = w_pos.sum(axis=1) * below[:, -1]
    return _divide((w_pos * (lower + upper) / 2).sum(axis=1), pairs)
