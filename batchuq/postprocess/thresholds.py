"""Validation thresholds: a per-class bar that a prediction's probability must reach.

``batchuq calibrate`` runs the *threshold predictor* (``--tta`` augmented copies, default 100,
``--passes`` MC passes per copy, default 1) over a labelled validation folder. Every copy gives
one probability vector (the mean of its passes); copies are grouped by the class they
*predict*, and per class the ``percentile`` (default 10) of their predicted-class probabilities
is that class's threshold (docs/methods.md, "Calibration"). A class that no copy predicts has
no threshold (``NaN``; ``null`` in the JSON): its predictions are accepted.

``score --rule threshold`` compares them with the confidence of its own MC mean
(``batchuq.postprocess.rules.threshold_decisions``).

``score --rule threshold --temperature`` compares the confidence of the *tempered* MC mean,
so its thresholds (``tempered_mean_thresholds``) are fitted on exactly that: the scoring
predictor's MC means of the validation images, tempered with the fitted temperature, one value
per image, grouped by the tempered mean's ``pred`` (the values ``score`` computes, bit for bit).

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import numpy as np

from batchuq import checks
from batchuq.defaults import DEFAULT_PERCENTILE
from batchuq.postprocess.temperature import apply_temperature
from batchuq.summarise import mean_statistics

__all__ = ["class_thresholds", "tempered_mean_thresholds", "thresholds_from_predictions"]


def thresholds_from_predictions(
    pred: np.ndarray, confidence: np.ndarray, classes: int, percentile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class percentile of ``confidence`` grouped by ``pred``, and the group sizes.

    Args:
        pred: ``(m,)`` predicted class indices in ``[0, classes)``, one per copy (flat).
        confidence: ``(m,)`` probability of each copy's predicted class.
        classes: Number of classes ``C``.
        percentile: Percentile in ``[0, 100]`` (``np.percentile``, linear interpolation).

    Returns:
        ``(thresholds, counts)``: ``(C,)`` float64 thresholds, ``NaN`` for a class that no copy
        predicts, and ``(C,)`` int64 copies per predicted class.
    """
    thresholds = np.full(classes, np.nan)
    counts = np.bincount(pred, minlength=classes)[:classes]
    for c in np.flatnonzero(counts):
        thresholds[c] = np.percentile(confidence[pred == c], percentile)
    return thresholds, counts


def class_thresholds(copy_probs: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> np.ndarray:
    """Per-class thresholds from the probabilities of augmented validation copies.

    Grouping: each copy counts for the class it **predicts** (argmax of its own probability
    vector, ties to the lowest index), and contributes its predicted-class (= maximum)
    probability. The threshold of class ``c`` is ``np.percentile`` (linear interpolation) of
    the values of the copies that predict ``c``. This matches how the thresholds are used: a
    test image predicted as ``c`` is compared with ``c``'s threshold. Copies are pooled over
    all images, whatever their label.

    Args:
        copy_probs: ``(n, K, C)``: ``n`` images, ``K`` augmented copies, ``C`` classes (one
            probability vector per copy, e.g. the mean of that copy's MC passes).
        percentile: Percentile in ``[0, 100]`` (docs/methods.md: 10).

    Returns:
        ``(C,)`` float64 thresholds in ``[0, 1]``; ``NaN`` for a class that no copy predicts
        (meaning "no threshold": its predictions are accepted).

    Raises:
        UsageError: If ``copy_probs`` is not 3-D probabilities or ``percentile`` is outside
            ``[0, 100]``.
    """
    probs = checks.probabilities(copy_probs, "copy_probs", axes=("n", "copies", "classes"))
    percentile = checks.in_range(percentile, "percentile", 0.0, 100.0)
    flat = probs.reshape(-1, probs.shape[-1])
    pred = flat.argmax(axis=1)
    confidence = flat[np.arange(len(flat)), pred]
    return thresholds_from_predictions(pred, confidence, probs.shape[-1], percentile)[0]


def tempered_mean_thresholds(
    mean_probs: np.ndarray, temperature: float, percentile: float = DEFAULT_PERCENTILE
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds of ``score --rule threshold --temperature``.

    Each validation image's MC mean (the scoring predictor's, as ``score`` writes it) is
    tempered as ``score --temperature`` does (``apply_temperature``, then the ``pred`` and
    float32 ``confidence`` of ``summarise.mean_statistics``); per predicted class, the
    ``percentile`` of those confidences is the threshold.

    Args:
        mean_probs: ``(n, C)`` MC means of the validation images (float32 values).
        temperature: The fitted temperature.
        percentile: Percentile in ``[0, 100]``.

    Returns:
        ``(thresholds, counts)`` as ``thresholds_from_predictions``: ``(C,)`` thresholds
        (``NaN`` for a class no image predicts) and images per predicted class.

    Raises:
        UsageError: If ``mean_probs`` are not probabilities, ``temperature`` not positive or
            ``percentile`` outside ``[0, 100]``.
    """
    percentile = checks.in_range(percentile, "percentile", 0.0, 100.0)
    tempered = mean_statistics(apply_temperature(np.asarray(mean_probs, np.float64), temperature))
    return thresholds_from_predictions(
        tempered["pred"],
        tempered["confidence"].astype(np.float64),
        np.shape(mean_probs)[-1],
        percentile,
    )
