"""Label-free accuracy: Average Thresholded Confidence (ATC, Garg et al., ICLR 2022).

On labelled validation images, ``fit_atc`` finds the threshold ``t`` on a confidence score such
that the share of images scoring above ``t`` equals the validation accuracy. On unlabelled
images, ``estimate_accuracy`` is the share scoring above ``t``: the estimated accuracy of the
predictor's argmax. ``batchuq calibrate`` fits it on two scores of the scoring predictor's
temperature-scaled MC mean (``tempered_probabilities``): ``mc``, its largest probability, and
``ne``, its negative entropy (``ATC_SCORES``); ``batchuq score --calibration`` counts the
images above each threshold, batch by batch (``AccuracyEstimate``), next to the naive estimate,
the average confidence (the mean largest tempered probability).

The tempered probabilities are ``apply_temperature`` of the float32 MC mean, rounded to
float32: what ``score --temperature`` writes as its ``mean_*`` columns. So the estimate is
the same with or without ``--temperature`` (the argmax, whose accuracy it estimates, does not
depend on the temperature), and recomputes exactly from the Parquet file.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from batchuq import checks
from batchuq.postprocess.temperature import apply_temperature

__all__ = [
    "ATC_SCORES",
    "ESTIMATE_KEYS",
    "AccuracyEstimate",
    "atc_scores",
    "estimate_accuracy",
    "fit_atc",
    "tempered_probabilities",
]

#: The confidence scores ATC is fitted on: ``mc`` the largest mean probability, ``ne`` the
#: negative entropy (nats) of the mean.
ATC_SCORES = ("mc", "ne")
#: The estimates of a run's ``estimated_accuracy`` (``AccuracyEstimate.as_metadata``), each the
#: estimated share of scored images whose ``pred`` is right.
ESTIMATE_KEYS = ("atc_mc", "atc_ne", "average_confidence")


def tempered_probabilities(mean_probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """The probabilities ATC scores: the MC mean with the temperature, rounded to float32.

    Args:
        mean_probs: ``(n, C)`` MC means (as ``score`` writes them: float32).
        temperature: The calibration's temperature; ``None`` keeps ``mean_probs`` as they are
            (they are already tempered, or no temperature was fitted).

    Returns:
        ``(n, C)`` float32 probabilities.
    """
    probs = np.asarray(mean_probs, dtype=np.float32)
    if temperature is None:
        return probs
    return apply_temperature(probs.astype(np.float64), temperature).astype(np.float32)


def atc_scores(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Each image's ATC scores (``ATC_SCORES``), in float64.

    Args:
        probs: ``(n, C)`` probabilities (``tempered_probabilities``).

    Returns:
        ``{"mc": (n,), "ne": (n,)}``: the largest probability and ``sum p log p`` (0 log 0 = 0).
    """
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return {"mc": p.max(axis=1), "ne": plogp.sum(axis=1)}


def fit_atc(scores: np.ndarray, correct: np.ndarray) -> float:
    """The ATC threshold: as many validation scores lie strictly above it as are correct.

    With ``k`` of ``n`` images correct, ``t`` is the ``(n - k)``-th smallest score, so that the
    ``k`` largest lie above it (fewer where scores tie at ``t``); ``-inf`` when every image is
    correct.

    Args:
        scores: ``(n,)`` confidence scores of the validation images, ``n >= 1``.
        correct: ``(n,)`` bool: whether each image's predicted class is its label.

    Returns:
        The threshold ``t``.

    Raises:
        UsageError: For empty, non-finite or mismatched inputs.
    """
    s = checks.float_vector(scores, "scores")
    ok = checks.bool_vector(correct, "correct")
    checks.same_length(scores=s, correct=ok)
    k = int(ok.sum())
    if k == len(s):
        return -math.inf
    return float(np.sort(s)[len(s) - k - 1])


def estimate_accuracy(scores: np.ndarray, threshold: float) -> float:
    """The ATC estimate: the share of ``scores`` strictly above ``threshold``.

    Args:
        scores: ``(n,)`` the images' scores, of the kind the threshold was fitted on.
        threshold: ``fit_atc``'s threshold.

    Returns:
        The estimated accuracy in ``[0, 1]``; NaN for no image.
    """
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s > threshold)) if s.size else math.nan


@dataclass
class AccuracyEstimate:
    """Running counts of the ATC estimates over a run's scored images (memory flat).

    Args:
        thresholds: ``{score: t}`` for the names of ``ATC_SCORES`` fitted.
        temperature: Applied to the means given to ``add`` (``tempered_probabilities``);
            ``None`` when they are tempered already.

    Attributes:
        images: Images counted.
        above: Per score, the images above its threshold.
        confidence_sum: Sum of the images' largest tempered probability.
    """

    thresholds: dict[str, float]
    temperature: float | None = None
    images: int = 0
    above: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0

    def add(self, mean_probs: np.ndarray) -> None:
        """Count scored images.

        Args:
            mean_probs: ``(n, C)`` the images' MC means (no row of an unreadable image).
        """
        probs = tempered_probabilities(mean_probs, self.temperature)
        scores = atc_scores(probs)
        self.images += len(probs)
        self.confidence_sum += float(scores["mc"].sum())
        for name, threshold in self.thresholds.items():
            self.above[name] = self.above.get(name, 0) + int((scores[name] > threshold).sum())

    def as_metadata(self) -> dict[str, float | int | bool | None]:
        """The run's ``estimated_accuracy``: ``atc_mc``, ``atc_ne``, ``average_confidence``
        (``None`` with no image), ``tempered`` (always true: a temperature was applied) and
        ``images``."""
        n = self.images
        out: dict[str, float | int | bool | None] = {
            f"atc_{name}": (self.above.get(name, 0) / n if n else None) for name in self.thresholds
        }
        out["average_confidence"] = self.confidence_sum / n if n else None
        out["tempered"] = True
        out["images"] = n
        return out
