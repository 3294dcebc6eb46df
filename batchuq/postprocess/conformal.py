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
* ``aps-random`` (Romano et al. 2020, randomised; MAPIE's APS with
  ``include_last_label="randomized"``): score = the total probability of the classes ranked
  strictly above ``y`` plus ``U · p̄_y``, with ``U`` uniform on ``[0, 1)``; set = every class
  whose own such value is at most ``q̂`` (the same ``U`` for all classes of an image). Exact
  ``1 - alpha`` coverage in expectation (at most ``1 - alpha + 1 / (n + 1)``); may be empty.
* ``raps`` (Angelopoulos et al. 2021, randomised; MAPIE's RAPS): the ``aps-random`` score plus
  ``lambda · max(0, o(y) - k_reg)``, ``o(y)`` the 1-based rank of ``y``, which keeps sets small
  when the tail of the ranking is noise. ``k_reg`` and ``lambda`` are tuned on a held-out share
  of the calibration images (``raps_parameters``), the quantile on the rest.

``U`` is a pure function of the run seed and the image's relative path (``set_uniforms``), so a
set never depends on batch size, order or resumption.

For exchangeable calibration and test images, a set holds the true class with probability at
least ``1 - alpha`` (per class for ``class``; on average over calibration sets) and, for ``lac``
with continuous scores, at most ``1 - alpha + 1 / (n + 1)``. ``aps`` without randomisation
covers more: its set also holds the class that crosses ``q̂``.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchuq import checks
from batchuq.defaults import DEFAULT_ALPHA, DEFAULT_CONFORMAL
from batchuq.errors import UsageError

__all__ = [
    "CONFORMAL_METHODS",
    "RANDOMISED_METHODS",
    "RAPS_LAMBDAS",
    "RAPS_TUNING_SHARE",
    "ConformalFit",
    "check_method",
    "fit_conformal",
    "raps_parameters",
    "set_uniforms",
    "conformal_level",
    "conformal_quantile",
    "conformal_quantiles",
    "conformal_scores",
    "conformal_warnings",
    "min_images_per_class",
    "prediction_sets",
]

CONFORMAL_METHODS = ("lac", "class", "aps", "aps-random", "raps")
RANDOMISED_METHODS = ("aps-random", "raps")
RAPS_LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)  # the grid of Angelopoulos et al. and MAPIE
RAPS_TUNING_SHARE = 0.2  # MAPIE's default size_raps


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


def set_uniforms(seed: int, relative_paths: list[str], purpose: str = "set") -> np.ndarray:
    """One uniform number in ``[0, 1)`` per image, a pure function of seed, path and purpose.

    The randomised sets (``aps-random``, ``raps``) draw their ``U`` here with ``purpose="set"``;
    ``fit_conformal`` draws the RAPS tuning split with ``purpose="raps-tuning"``. Nothing depends
    on batch size, order or which other images are scored.

    Args:
        seed: The run seed (``--seed``).
        relative_paths: Image paths relative to the folder, ``/`` separators.
        purpose: Keeps the draws of different uses independent.

    Returns:
        ``(n,)`` float64 uniforms (64-bit BLAKE2b digests over ``2**64``).
    """
    out = np.empty(len(relative_paths), dtype=np.float64)
    for i, path in enumerate(relative_paths):
        digest = hashlib.blake2b(f"{purpose}\0{seed}\0{path}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def _uniforms(uniforms: np.ndarray | None, rows: int, method: str) -> np.ndarray:
    """``uniforms`` as ``(rows,)`` float64 in ``[0, 1]``, required by the randomised methods."""
    if uniforms is None:
        raise UsageError(
            f"Method {method!r} is randomised and needs one uniform number per image. "
            "Received: uniforms=None"
        )
    u = np.asarray(uniforms, dtype=np.float64).ravel()
    if u.shape != (rows,) or not np.all((u >= 0.0) & (u <= 1.0)):
        raise UsageError(
            f"`uniforms` must hold {rows} numbers in [0, 1]. Received: uniforms.shape={u.shape}"
        )
    return u


def _penalty(method: str, raps: tuple[int, float] | None, classes: int) -> np.ndarray:
    """RAPS's ``lambda · max(0, o - k_reg)`` for 1-based ranks ``o = 1..C`` (zeros otherwise)."""
    if method != "raps":
        return np.zeros(classes)
    if raps is None:
        raise UsageError("Method 'raps' needs (k_reg, lambda). Received: raps=None")
    k_reg, lam = raps
    if k_reg < 0 or not lam >= 0:
        raise UsageError(f"RAPS needs k_reg >= 0 and lambda >= 0. Received: raps={raps!r}")
    return float(lam) * np.maximum(0.0, np.arange(1, classes + 1) - float(k_reg))


def conformal_scores(
    mean_probs: np.ndarray,
    labels: np.ndarray,
    method: str = DEFAULT_CONFORMAL,
    uniforms: np.ndarray | None = None,
    raps: tuple[int, float] | None = None,
) -> np.ndarray:
    """Nonconformity score of each calibration image's true class (larger = stranger).

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities of the scoring predictor.
        labels: ``(n,)`` true class indices.
        method: ``lac`` or ``class``: ``1 - p_y``. ``aps``: the total probability of the
            classes ranked at or above ``y`` when the classes are sorted by decreasing
            probability (ties by class index), i.e. the running total up to and including
            ``y`` (no randomisation). ``aps-random``: that total minus ``U · p_y`` (MAPIE's
            randomised APS score). ``raps``: the ``aps-random`` score plus
            ``lambda · max(0, o(y) - k_reg)``, ``o(y)`` the 1-based rank of ``y``.
        uniforms: ``(n,)`` the images' ``U`` (``set_uniforms``); randomised methods only.
        raps: ``(k_reg, lambda)`` for ``raps`` (``raps_parameters``).

    Returns:
        ``(n,)`` float64 scores.

    Raises:
        UsageError: For mismatched inputs, an unknown method, or missing ``uniforms``/``raps``.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"))
    labels = checks.labels(
        labels, probs.shape[1], rows=len(probs), rows_of="mean_probs", allow_empty=True
    )
    method = check_method(method)
    if method in ("lac", "class"):
        return 1.0 - probs[np.arange(len(probs)), labels]
    order, running = _ranked(probs)
    rows = np.arange(len(probs))
    rank = np.argmax(order == labels[:, None], axis=1)
    total = running[rows, rank]
    if method == "aps":
        return total
    u = _uniforms(uniforms, len(probs), method)
    return total - u * probs[rows, labels] + _penalty(method, raps, probs.shape[1])[rank]


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
    uniforms: np.ndarray | None = None,
    raps: tuple[int, float] | None = None,
) -> np.ndarray:
    """Split-conformal quantiles of ``conformal_scores``.

    For ``class`` one quantile per true class ``y``, from its ``n_y`` images; otherwise one
    over all ``n`` images. Each is the ``k``-th smallest score with ``k = ⌈(n + 1)(1 - alpha)⌉``
    (the empirical quantile at level ``k / n``); ``k > n`` (level above 1, including ``n = 0``)
    gives ``+inf``: that quantile puts every class in the set.

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities (the same transform, if any, must be
            applied before ``prediction_sets``).
        labels: ``(n,)`` true class indices.
        alpha: Miscoverage in ``(0, 1)``: sets cover the true class with probability
            ``>= 1 - alpha`` (per class for ``class``).
        method: One of ``CONFORMAL_METHODS`` (default ``lac``).
        uniforms: ``(n,)`` the images' ``U``, for ``aps-random`` and ``raps``.
        raps: ``(k_reg, lambda)``, for ``raps``.

    Returns:
        float64 quantiles, shape ``(C,)`` for ``class``, ``(1,)`` otherwise.

    Raises:
        UsageError: For mismatched inputs, ``alpha`` outside ``(0, 1)``, an unknown method or
            missing ``uniforms``/``raps``.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"))
    labels = checks.labels(
        labels, probs.shape[1], rows=len(probs), rows_of="mean_probs", allow_empty=True
    )
    alpha = checks.fraction(alpha, "alpha")
    scores = conformal_scores(probs, labels, method, uniforms, raps)
    if method != "class":
        return np.array([conformal_quantile(scores, alpha)])
    return np.array([conformal_quantile(scores[labels == y], alpha) for y in range(probs.shape[1])])


def prediction_sets(
    mean_probs: np.ndarray,
    quantiles: np.ndarray | float,
    method: str = DEFAULT_CONFORMAL,
    uniforms: np.ndarray | None = None,
    raps: tuple[int, float] | None = None,
) -> np.ndarray:
    """Conformal prediction sets from ``conformal_quantiles``.

    * ``lac``: ``{c : 1 - p_c <= q}``; ``class``: ``{c : 1 - p_c <= q_c}``. May be empty.
    * ``aps``: classes by decreasing probability (ties by class index) up to and including the
      first whose running total reaches ``q``: class ``c`` is in the set when the total of the
      classes ranked above it is below ``q`` (or the total including it is at most ``q``, which
      only matters for zero probabilities). The top class is always in the set. The true class
      is in the set whenever its ``conformal_scores`` value is at most ``q``.
    * ``aps-random`` and ``raps``: class ``c`` is in the set exactly when the score it would
      have as the true class (``conformal_scores``, with the image's ``U``) is at most ``q``.
      That value grows with the rank, so the set is a prefix of the ranking: the classes
      whose running total reaches ``q`` are in, and the last one is kept with probability
      ``(q - total above it - penalty) / p_c``, as MAPIE's ``include_last_label="randomized"``.
      May be empty.

    Args:
        mean_probs: ``(b, C)`` probabilities, transformed as for ``conformal_quantiles``.
        quantiles: A number or shape ``(1,)``, ``(C,)`` for ``class``; ``inf`` (or ``NaN``,
            read as "no quantile") puts every class (of that quantile) in the set.
        method: One of ``CONFORMAL_METHODS`` (default ``lac``).
        uniforms: ``(b,)`` the images' ``U``, for ``aps-random`` and ``raps``.
        raps: ``(k_reg, lambda)``, for ``raps``.

    Returns:
        ``(b, C)`` bool mask of set membership.

    Raises:
        UsageError: If the number of quantiles does not fit the method, or ``uniforms``/``raps``
            are missing.
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
    if method in ("lac", "class"):
        return (1.0 - probs) <= quantiles[None, :]
    q = quantiles[0]
    order, running = _ranked(probs)
    if method == "aps":
        above = np.concatenate([np.zeros((len(probs), 1)), running[:, :-1]], axis=1)
        keep = (above < q) | (running <= q)
        keep[:, 0] = True
    else:
        u = _uniforms(uniforms, len(probs), method)
        ranked = np.take_along_axis(probs, order, axis=1)
        value = running - u[:, None] * ranked + _penalty(method, raps, probs.shape[1])[None, :]
        keep = value <= q
    members = np.zeros_like(keep)
    np.put_along_axis(members, order, keep, axis=1)
    return members


def raps_parameters(
    mean_probs: np.ndarray,
    labels: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    lambdas: tuple[float, ...] = RAPS_LAMBDAS,
) -> tuple[int, float]:
    """RAPS's ``k_reg`` and ``lambda``, tuned on images kept out of the quantile.

    ``k_reg`` is Angelopoulos et al.'s (and MAPIE's): the conformal quantile of the 0-based
    rank of the true class, plus one (``C`` when the quantile is ``inf``). ``lambda`` is the
    first of ``lambdas`` whose non-randomised RAPS sets (quantile and sets both on these images)
    have the smallest mean size, the paper's "size" criterion.

    Args:
        mean_probs: ``(n, C)`` the tuning images' MC means.
        labels: ``(n,)`` their true classes.
        alpha: The miscoverage the sets will be fitted for.
        lambdas: The grid of penalties.

    Returns:
        ``(k_reg, lambda)``.

    Raises:
        UsageError: For mismatched inputs or ``alpha`` outside ``(0, 1)``.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"))
    labels = checks.labels(labels, probs.shape[1], rows=len(probs), rows_of="mean_probs")
    classes, rows = probs.shape[1], np.arange(len(probs))
    order, running = _ranked(probs)
    rank = np.argmax(order == labels[:, None], axis=1)
    k_q = conformal_quantile(rank, alpha)
    k_reg = classes if math.isinf(k_q) else int(k_q) + 1
    best_size, best = math.inf, float(lambdas[0])
    for lam in lambdas:
        total = running + _penalty("raps", (k_reg, lam), classes)[None, :]
        q = conformal_quantile(total[rows, rank], alpha)
        above = np.concatenate([np.zeros((len(probs), 1)), total[:, :-1]], axis=1)
        size = float(np.maximum((above < q).sum(axis=1), 1).mean())
        if size < best_size - 1e-12:
            best_size, best = size, float(lam)
    return k_reg, best


@dataclass(frozen=True)
class ConformalFit:
    """Fitted conformal quantiles and what else their sets need.

    Attributes:
        quantiles: As ``conformal_quantiles`` returns them.
        method: The conformal method.
        seed: The seed the images' ``U`` are drawn with (``set_uniforms``).
        params: ``raps``: ``k_reg``, ``lambda``, ``tuning_images``, ``quantile_images`` and
            ``tuned_on_quantile_images`` (true only when the split left one side empty, a
            handful of images: then both use every image, and the quantile is no longer
            independent of the tuning); empty otherwise.
    """

    quantiles: np.ndarray
    method: str = DEFAULT_CONFORMAL
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def sets(self, mean_probs: np.ndarray, relative_paths: list[str]) -> np.ndarray:
        """``prediction_sets`` of these images, each with its own ``U`` under ``seed``.

        Args:
            mean_probs: ``(b, C)`` MC means.
            relative_paths: The ``b`` images' relative paths.

        Returns:
            ``(b, C)`` bool set membership.
        """
        uniforms = None
        if self.method in RANDOMISED_METHODS:
            uniforms = set_uniforms(self.seed, relative_paths)
        return prediction_sets(mean_probs, self.quantiles, self.method, uniforms, self.raps)

    @property
    def raps(self) -> tuple[int, float] | None:
        """``(k_reg, lambda)`` for ``raps``, else ``None``."""
        if "k_reg" not in self.params:
            return None
        return int(self.params["k_reg"]), float(self.params["lambda"])


def fit_conformal(
    mean_probs: np.ndarray,
    labels: np.ndarray,
    alpha: float,
    method: str,
    relative_paths: list[str],
    seed: int,
) -> ConformalFit:
    """Fit a conformal method on labelled images, drawing ``U`` and the RAPS split per image.

    For ``raps`` a share ``RAPS_TUNING_SHARE`` of the images (``set_uniforms`` with purpose
    ``raps-tuning`` below that share, so the split is a function of seed and path) tunes
    ``k_reg`` and ``lambda``; the quantile is fitted on the others, so it stays a valid split
    conformal quantile. Every other method uses every image.

    Args:
        mean_probs: ``(n, C)`` MC means.
        labels: ``(n,)`` true classes.
        alpha: Miscoverage in ``(0, 1)``.
        method: One of ``CONFORMAL_METHODS``.
        relative_paths: The ``n`` images' relative paths.
        seed: The run seed.

    Returns:
        The quantiles and the RAPS parameters.

    Raises:
        UsageError: For mismatched inputs, ``alpha`` outside ``(0, 1)`` or an unknown method.
    """
    method = check_method(method)
    if len(relative_paths) != len(mean_probs):
        raise UsageError(
            f"`relative_paths` must name the {len(mean_probs)} images. "
            f"Received: len(relative_paths)={len(relative_paths)}"
        )
    uniforms = set_uniforms(seed, relative_paths) if method in RANDOMISED_METHODS else None
    if method != "raps":
        quantiles = conformal_quantiles(mean_probs, labels, alpha, method, uniforms)
        return ConformalFit(quantiles, method, seed)
    probs, labels = np.asarray(mean_probs), np.asarray(labels)
    tune = set_uniforms(seed, relative_paths, purpose="raps-tuning") < RAPS_TUNING_SHARE
    overlap = bool(not tune.any() or tune.all())
    if overlap:  # a handful of images: tune on all of them too, and say so in ``params``
        tune = np.ones(len(probs), dtype=bool)
        fit = tune
    else:
        fit = ~tune
    k_reg, lam = raps_parameters(probs[tune], labels[tune], alpha)
    quantiles = conformal_quantiles(
        probs[fit], labels[fit], alpha, "raps", uniforms[fit], (k_reg, lam)
    )
    params = {
        "k_reg": int(k_reg),
        "lambda": float(lam),
        "tuning_images": int(tune.sum()),
        "quantile_images": int(fit.sum()),
        "tuned_on_quantile_images": overlap,
    }
    return ConformalFit(quantiles, method, seed, params)


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
