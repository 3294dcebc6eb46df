"""Split conformal prediction sets: LAC (marginal), class-conditional and APS.

``batchuq calibrate`` fits the quantiles on the *scoring predictor's* MC means ``p̄`` of a
labelled validation folder, *without* temperature: the coverage guarantee rests on the
calibration and test scores being exchangeable, so they must come from the very predictor that
``batchuq score`` runs (same passes, copies, augmentation, rescale, precision, sampled layers;
``batchuq.postprocess.calibration_file`` records it), and from no score function fitted on the
same images.

With ``n`` calibration scores, the quantile ``q̂`` is the ``k``-th smallest,
``k = ⌈(n + 1)(1 - alpha)⌉`` (the empirical quantile at level ``k / n``, as MAPIE computes
it); ``k > n`` gives ``+inf`` (``null`` in the JSON): every class is in every set. The methods
(docs/methods.md, "Conformal prediction sets"):

* ``lac`` (default; Sadinle et al. 2019, MAPIE's ``lac``): score ``1 - p̄_y``, set
  ``{c : 1 - p̄_c <= q̂}``; may be empty where the model is sure of no class.
* ``class``: the same score with one quantile per true class (class-conditional coverage); it
  needs about ``10 / alpha`` images per class, and ``conformal_warnings`` says so.
* ``aps`` (Romano et al. 2020, without randomisation): score = the total probability of the
  classes ranked at or above the true class; set = the shortest prefix of that ranking whose
  total reaches ``q̂``, so it always holds the top class.

For exchangeable calibration and test images, a set holds the true class with probability at
least ``1 - alpha`` (per class for ``class``; on average over calibration sets) and, for ``lac``
with continuous scores, at most ``1 - alpha + 1 / (n + 1)``. ``aps`` without randomisation
covers more: its set also holds the class that crosses ``q̂``.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

from batchuq import checks
from batchuq.defaults import DEFAULT_ALPHA, DEFAULT_CONFORMAL
from batchuq.errors import UsageError

__all__ = [
    "CONFORMAL_METHODS",
    "check_method",
    "conformal_level",
    "conformal_quantile",
    "conformal_quantiles",
    "conformal_scores",
    "conformal_warnings",
    "min_images_per_class",
    "prediction_sets",
]

CONFORMAL_METHODS = ("lac", "class", "aps")


def check_method(method: str) -> str:
    """``method`` if it is one of ``CONFORMAL_METHODS``.

    Raises:
        UsageError: If it is not.
    """
    return checks.one_of(method, "method", CONFORMAL_METHODS)


def _conformal_rank(n: int, alpha: float) -> int:
    """``⌈(n + 1)(1 - alpha)⌉``, the rank of the conformal quantile among ``n`` scores."""
    # The small tolerance keeps e.g. (9 + 1) * 0.9 = 9.000000000000002 at 9.
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


def conformal_level(n: int, alpha: float) -> float:
    """Finite-sample corrected quantile level ``⌈(n + 1)(1 - alpha)⌉ / n`` (``inf`` for n = 0).

    A level above 1 means the quantile is ``+inf``.

    Args:
        n: Number of calibration scores.
        alpha: Miscoverage in ``(0, 1)``.

    Returns:
        The level.
    """
    if n <= 0:
        return math.inf
    return _conformal_rank(n, alpha) / n


def min_images_per_class(alpha: float) -> int:
    """Images per class below which ``--conformal class`` warns: ``⌈10 / alpha⌉``.

    With ``n_y`` images a class's coverage is Beta-distributed around ``1 - alpha`` with a
    spread of about ``sqrt(alpha (1 - alpha) / n_y)``; at ``10 / alpha`` images that is about
    ``alpha / 3``, and the quantile is no longer one of the few largest scores.

    Raises:
        UsageError: If ``alpha`` is not in ``(0, 1)``.
    """
    return math.ceil(10.0 / checks.fraction(alpha, "alpha") - 1e-9)


def _ranked(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes by decreasing probability (ties: lower class index first) and the running
    total of their probabilities, both ``(n, C)``."""
    order = np.argsort(-probs, axis=1, kind="stable")
    return order, np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)


def conformal_scores(
    mean_probs: np.ndarray, labels: np.ndarray, method: str = DEFAULT_CONFORMAL
) -> np.ndarray:
    """Nonconformity score of each calibration image's true class (larger = stranger).

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities of the scoring predictor.
        labels: ``(n,)`` true class indices.
        method: ``lac`` or ``class``: ``1 - p_y``. ``aps``: the total probability of the
            classes ranked at or above ``y`` when the classes are sorted by decreasing
            probability (ties by class index), i.e. the running total up to and including
            ``y`` (no randomisation).

    Returns:
        ``(n,)`` float64 scores.

    Raises:
        UsageError: For mismatched inputs or an unknown method.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"))
    labels = checks.labels(
        labels, probs.shape[1], rows=len(probs), rows_of="mean_probs", allow_empty=True
    )
    if check_method(method) != "aps":
        return 1.0 - probs[np.arange(len(probs)), labels]
    order, running = _ranked(probs)
    rank = np.argmax(order == labels[:, None], axis=1)
    return running[np.arange(len(probs)), rank]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``⌈(n + 1)(1 - alpha)⌉``-th smallest of ``n`` scores (``inf`` when that exceeds n).

    This is ``np.quantile(scores, ⌈(n + 1)(1 - alpha)⌉ / n, method="lower")``, as MAPIE's
    split conformal classifiers compute it.

    Args:
        scores: The ``n`` scores, any shape (flattened).
        alpha: Miscoverage in ``(0, 1)``.

    Returns:
        The quantile, ``inf`` for too few scores.

    Raises:
        UsageError: If ``alpha`` is not in ``(0, 1)``.
    """
    alpha = checks.fraction(alpha, "alpha")
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    k = _conformal_rank(len(scores), alpha)
    if len(scores) == 0 or k > len(scores):
        return math.inf
    return float(scores[max(k, 1) - 1])


def conformal_quantiles(
    mean_probs: np.ndarray,
    labels: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    method: str = DEFAULT_CONFORMAL,
) -> np.ndarray:
    """Split-conformal quantiles of ``conformal_scores``.

    For ``lac`` and ``aps`` one quantile over all ``n`` images; for ``class`` one per true class
    ``y``, from its ``n_y`` images. Each is the ``k``-th smallest score with
    ``k = ⌈(n + 1)(1 - alpha)⌉`` (the empirical quantile at level ``k / n``); ``k > n`` (level
    above 1, including ``n = 0``) gives ``+inf``: that quantile puts every class in the set.

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities (the same transform, if any, must be
            applied before ``prediction_sets``).
        labels: ``(n,)`` true class indices.
        alpha: Miscoverage in ``(0, 1)``: sets cover the true class with probability
            ``>= 1 - alpha`` (per class for ``class``).
        method: ``lac`` (default), ``class`` or ``aps``.

    Returns:
        float64 quantiles, shape ``(1,)`` for ``lac`` and ``aps``, ``(C,)`` for ``class``.

    Raises:
        UsageError: For mismatched inputs, ``alpha`` outside ``(0, 1)`` or an unknown method.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"))
    labels = checks.labels(
        labels, probs.shape[1], rows=len(probs), rows_of="mean_probs", allow_empty=True
    )
    alpha = checks.fraction(alpha, "alpha")
    scores = conformal_scores(probs, labels, method)
    if method != "class":
        return np.array([conformal_quantile(scores, alpha)])
    return np.array([conformal_quantile(scores[labels == y], alpha) for y in range(probs.shape[1])])


def prediction_sets(
    mean_probs: np.ndarray, quantiles: np.ndarray | float, method: str = DEFAULT_CONFORMAL
) -> np.ndarray:
    """Conformal prediction sets from ``conformal_quantiles``.

    * ``lac``: ``{c : 1 - p_c <= q}``; ``class``: ``{c : 1 - p_c <= q_c}``. May be empty.
    * ``aps``: classes by decreasing probability (ties by class index) up to and including the
      first whose running total reaches ``q``: class ``c`` is in the set when the total of the
      classes ranked above it is below ``q`` (or the total including it is at most ``q``, which
      only matters for zero probabilities). The top class is always in the set. The true class
      is in the set whenever its ``conformal_scores`` value is at most ``q``.

    Args:
        mean_probs: ``(b, C)`` probabilities, transformed as for ``conformal_quantiles``.
        quantiles: A number or shape ``(1,)`` for ``lac``/``aps``, ``(C,)`` for ``class``;
            ``inf`` (or ``NaN``, read as "no quantile") puts every class (of that quantile) in
            the set.
        method: ``lac`` (default), ``class`` or ``aps``.

    Returns:
        ``(b, C)`` bool mask of set membership.

    Raises:
        UsageError: If the number of quantiles does not fit the method.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"))
    quantiles = np.atleast_1d(np.asarray(quantiles, dtype=np.float64))
    expected = (probs.shape[1],) if check_method(method) == "class" else (1,)
    if quantiles.shape != expected:
        raise UsageError(
            f"`quantiles` must have shape {expected} for method {method!r}. "
            f"Received: quantiles.shape={quantiles.shape}"
        )
    quantiles = np.where(np.isnan(quantiles), np.inf, quantiles)
    if method != "aps":
        return (1.0 - probs) <= quantiles[None, :]
    q = quantiles[0]
    order, running = _ranked(probs)
    above = np.concatenate([np.zeros((len(probs), 1)), running[:, :-1]], axis=1)
    keep = (above < q) | (running <= q)
    keep[:, 0] = True
    members = np.zeros_like(keep)
    np.put_along_axis(members, order, keep, axis=1)
    return members


def conformal_warnings(
    method: str, alpha: float, per_class: np.ndarray, names: list[str], quantiles: np.ndarray
) -> list[str]:
    """What is weak about a conformal fit: small classes (``class``) or too few images.

    Args:
        method: The conformal method.
        alpha: Its miscoverage.
        per_class: ``(C,)`` validation images per true class.
        names: The ``C`` class names.
        quantiles: The fitted quantiles, ``(1,)`` or ``(C,)`` for ``class``.

    Returns:
        Sentences for the user (``batchuq calibrate`` issues each as a ``CalibrationWarning``);
        empty when nothing is weak.
    """
    if method == "class":
        need = min_images_per_class(alpha)
        small = [f"{names[c]} ({int(n)})" for c, n in enumerate(per_class) if n < need]
        if not small:
            return []
        always = [names[c] for c in range(len(names)) if math.isinf(quantiles[c])]
        return [
            f"--conformal class: {len(small)} of {len(names)} classes have fewer than {need} "
            f"validation images (about 10/alpha at alpha {alpha:g}): {', '.join(small)}. "
            "Their coverage varies widely from class to class and their quantiles are among "
            "the few largest scores"
            + (f"; {', '.join(always)} get no quantile (in every set)" if always else "")
            + ". Use --conformal lac or aps, or more validation images."
        ]
    if math.isinf(quantiles[0]):
        n = int(per_class.sum())
        return [
            f"Only {n} validation images: at alpha {alpha:g} the conformal quantile needs at "
            f"least {math.ceil(1 / alpha - 1 - 1e-9)}, so every set holds every class. Use more "
            "validation images or a larger --alpha."
        ]
    return []
