"""Calibration maths and the calibration file (being split into thresholds, temperature,
conformal and calibration_file modules)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchuq._version import __version__
from batchuq.postprocess.rules import UNCLASSIFIED

CALIBRATION_FORMAT = "batchuq-calibration/2"
CONFORMAL_METHODS = ("lac", "class", "aps")
TEMPERATURE_BOUNDS = (0.05, 20.0)
# What decides the per-image MC-mean probabilities of `batchuq score` for a given model file and
# image, as recorded in its Parquet metadata (see ``predictor_from_metadata``). The seed is not
# one of them: another seed is another draw of the same random predictor (every image gets its
# own random stream either way). Batch size and memory budget do not change the results.
PREDICTOR_KEYS = (
    "passes",
    "tta",
    "augmentation",
    "rescale",
    "precision",
    "sampled_layers",
    "logits",
    "exif_transpose",
)
_EPS = 1e-12
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


# --------------------------------------------------------------------------------------------
# Checks shared by the pure functions.


def _probabilities(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(
            f"`{name}` must be a {ndim}-D array of probabilities. Received: {name}.shape="
            f"{array.shape}"
        )
    if array.ndim < 1 or array.shape[-1] == 0:
        raise ValueError(
            f"`{name}` must have at least one class on its last axis. Received: {name}.shape="
            f"{array.shape}"
        )
    if array.size and (not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1):
        raise ValueError(
            f"`{name}` must hold finite probabilities in [0, 1]. Received: {name} with range "
            f"[{np.nanmin(array):.4g}, {np.nanmax(array):.4g}]"
        )
    return array


def _labels(labels: Any, n: int, classes: int, name: str = "labels") -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (n,):
        raise ValueError(
            f"`{name}` must have shape ({n},), one class index per row. Received: "
            f"{name}.shape={array.shape}"
        )
    if (
        n
        and not np.issubdtype(array.dtype, np.integer)
        and (not np.all(np.isfinite(array)) or np.any(array != np.round(array)))
    ):
        raise ValueError(f"`{name}` must hold integer class indices. Received: {name}={array}")
    array = array.astype(np.int64)
    if n and (array.min() < 0 or array.max() >= classes):
        raise ValueError(
            f"`{name}` must be class indices in [0, {classes - 1}]. Received: {name} with range "
            f"[{array.min()}, {array.max()}]"
        )
    return array


def _check_fraction(value: float, name: str, low: float, high: float) -> float:
    value = float(value)
    if not low < value < high:
        raise ValueError(f"`{name}` must be in ({low}, {high}). Received: {name}={value}")
    return value


# --------------------------------------------------------------------------------------------
# 1. Validation thresholds.


def _thresholds_from_predictions(
    pred: np.ndarray, confidence: np.ndarray, classes: int, percentile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class percentile of ``confidence`` grouped by ``pred`` (both flat), and counts."""
    thresholds = np.full(classes, np.nan)
    counts = np.bincount(pred, minlength=classes)[:classes]
    for c in np.flatnonzero(counts):
        thresholds[c] = np.percentile(confidence[pred == c], percentile)
    return thresholds, counts


def class_thresholds(copy_probs: np.ndarray, percentile: float = 10.0) -> np.ndarray:
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
        ValueError: If ``copy_probs`` is not 3-D probabilities or ``percentile`` is outside
            ``[0, 100]``.
    """
    probs = _probabilities(copy_probs, "copy_probs", ndim=3)
    percentile = float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"`percentile` must be in [0, 100]. Received: percentile={percentile}")
    flat = probs.reshape(-1, probs.shape[-1])
    pred = flat.argmax(axis=1)
    confidence = flat[np.arange(len(flat)), pred]
    return _thresholds_from_predictions(pred, confidence, probs.shape[-1], percentile)[0]


def threshold_decisions(
    pred: np.ndarray, confidence_of_pred: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Apply validation thresholds: reject a prediction whose probability is below its class's.

    Args:
        pred: ``(b,)`` predicted class indices.
        confidence_of_pred: ``(b,)`` probability of the predicted class (e.g. ``confidence``).
        thresholds: ``(C,)`` per-class thresholds; ``NaN`` = no threshold (always accept).

    Returns:
        ``(b,)`` int64: ``pred``, or ``UNCLASSIFIED`` (-1) where
        ``confidence_of_pred < thresholds[pred]``.

    Raises:
        ValueError: If the shapes differ or ``pred`` holds indices outside ``[0, C)``.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError(
            f"`thresholds` must be a non-empty 1-D array. Received: thresholds.shape="
            f"{thresholds.shape}"
        )
    confidence = np.asarray(confidence_of_pred, dtype=np.float64)
    if confidence.ndim != 1:
        raise ValueError(
            "`confidence_of_pred` must be 1-D. Received: confidence_of_pred.shape="
            f"{confidence.shape}"
        )
    pred = _labels(pred, len(confidence), thresholds.size, name="pred")
    limit = thresholds[pred]
    reject = ~np.isnan(limit) & (confidence < limit)
    return np.where(reject, UNCLASSIFIED, pred).astype(np.int64)


# --------------------------------------------------------------------------------------------
# 2. Temperature scaling.


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities by a temperature: ``softmax(log(max(p, 1e-12)) / T)``.

    Args:
        probs: ``(..., C)`` probabilities (zeros are clipped to ``1e-12`` before the log).
        temperature: ``T > 0``; ``T > 1`` softens, ``T < 1`` sharpens, ``T = 1`` keeps
            ``probs`` (renormalised).

    Returns:
        ``(..., C)`` float64 probabilities summing to 1 on the last axis.

    Raises:
        ValueError: If ``temperature`` is not a finite positive number or ``probs`` are not
            probabilities.
    """
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"`temperature` must be a finite number > 0. Received: temperature={temperature}"
        )
    logits = np.log(np.clip(_probabilities(probs, "probs"), _EPS, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def _golden_section(f: Any, low: float, high: float, tol: float = 1e-7) -> float:
    """Minimiser of a unimodal ``f`` on ``[low, high]`` (compares the ends too)."""
    a, b = low, high
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    candidates = [(f(low), low), (fc, c), (fd, d), (f(high), high)]
    return min(candidates)[1]


def fit_temperature(
    mean_probs: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Temperature that minimises the NLL of ``apply_temperature(mean_probs, T)``.

    ``log mean_probs`` are treated as logits (``p_T ∝ exp(log p̄ / T)``). The NLL is convex in
    ``1/T``, so a golden-section search on ``log T`` over ``bounds`` finds the global minimum
    (or the bound it is pinned to, e.g. when every image is already right with probability 1).

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities of the validation images, ``n >= 1``.
        labels: ``(n,)`` true class indices.
        bounds: ``(low, high)`` range of ``T``, ``0 < low < high``.

    Returns:
        The fitted temperature ``T`` (float in ``bounds``).

    Raises:
        ValueError: For empty or mismatched inputs or bad bounds.
    """
    probs = _probabilities(mean_probs, "mean_probs", ndim=2)
    labels = _labels(labels, len(probs), probs.shape[1])
    if len(probs) == 0:
        raise ValueError(
            f"`mean_probs` must hold at least one image. Received: mean_probs.shape={probs.shape}"
        )
    low, high = (float(v) for v in bounds)
    if not 0 < low < high < math.inf:
        raise ValueError(f"`bounds` must satisfy 0 < low < high. Received: bounds={bounds}")
    logits = np.log(np.clip(probs, _EPS, None))
    logits -= logits.max(axis=1, keepdims=True)
    true_logit = logits[np.arange(len(logits)), labels]

    def objective(log_t: float) -> float:
        z = logits * math.exp(-log_t)
        top = z.max(axis=1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        return float(np.mean(lse - true_logit * math.exp(-log_t)))

    return float(math.exp(_golden_section(objective, math.log(low), math.log(high))))


# --------------------------------------------------------------------------------------------
# 3. Split conformal prediction: LAC (marginal), class-conditional, APS.


def conformal_level(n: int, alpha: float) -> float:
    """Finite-sample corrected quantile level ``⌈(n + 1)(1 - alpha)⌉ / n`` (``inf`` for n = 0).

    A level above 1 means the quantile is ``+inf``.
    """
    if n <= 0:
        return math.inf
    return _conformal_rank(n, alpha) / n


def _conformal_rank(n: int, alpha: float) -> int:
    # The small tolerance keeps e.g. (9 + 1) * 0.9 = 9.000000000000002 at 9.
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


def min_images_per_class(alpha: float) -> int:
    """Images per class below which ``--conformal class`` warns: ``⌈10 / alpha⌉``.

    With ``n_y`` images a class's coverage is Beta-distributed around ``1 - alpha`` with a
    spread of about ``sqrt(alpha (1 - alpha) / n_y)``; at ``10 / alpha`` images that is about
    ``alpha / 3``, and the quantile is no longer one of the few largest scores.
    """
    return math.ceil(10.0 / _check_fraction(alpha, "alpha", 0.0, 1.0) - 1e-9)


def _check_method(method: str) -> str:
    if method not in CONFORMAL_METHODS:
        raise ValueError(
            f"`method` must be one of {CONFORMAL_METHODS}. Received: method={method!r}"
        )
    return method


def _ranked(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes by decreasing probability (ties: lower class index first) and the running
    total of their probabilities, both ``(n, C)``."""
    order = np.argsort(-probs, axis=1, kind="stable")
    return order, np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)


def conformal_scores(mean_probs: np.ndarray, labels: np.ndarray, method: str = "lac") -> np.ndarray:
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
        ValueError: For mismatched inputs or an unknown method.
    """
    probs = _probabilities(mean_probs, "mean_probs", ndim=2)
    labels = _labels(labels, len(probs), probs.shape[1])
    if _check_method(method) != "aps":
        return 1.0 - probs[np.arange(len(probs)), labels]
    order, running = _ranked(probs)
    rank = np.argmax(order == labels[:, None], axis=1)
    return running[np.arange(len(probs)), rank]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``⌈(n + 1)(1 - alpha)⌉``-th smallest of ``n`` scores (``inf`` when that exceeds n).

    This is ``np.quantile(scores, ⌈(n + 1)(1 - alpha)⌉ / n, method="lower")``, as MAPIE's
    split conformal classifiers compute it.
    """
    alpha = _check_fraction(alpha, "alpha", 0.0, 1.0)
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    k = _conformal_rank(len(scores), alpha)
    if len(scores) == 0 or k > len(scores):
        return math.inf
    return float(scores[max(k, 1) - 1])


def conformal_quantiles(
    mean_probs: np.ndarray, labels: np.ndarray, alpha: float = 0.1, method: str = "lac"
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
        ValueError: For mismatched inputs, ``alpha`` outside ``(0, 1)`` or an unknown method.
    """
    probs = _probabilities(mean_probs, "mean_probs", ndim=2)
    labels = _labels(labels, len(probs), probs.shape[1])
    alpha = _check_fraction(alpha, "alpha", 0.0, 1.0)
    scores = conformal_scores(probs, labels, method)
    if method != "class":
        return np.array([conformal_quantile(scores, alpha)])
    return np.array([conformal_quantile(scores[labels == y], alpha) for y in range(probs.shape[1])])


def prediction_sets(
    mean_probs: np.ndarray, quantiles: np.ndarray | float, method: str = "lac"
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
        ValueError: If the number of quantiles does not fit the method.
    """
    probs = _probabilities(mean_probs, "mean_probs", ndim=2)
    quantiles = np.atleast_1d(np.asarray(quantiles, dtype=np.float64))
    expected = (probs.shape[1],) if _check_method(method) == "class" else (1,)
    if quantiles.shape != expected:
        raise ValueError(
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


# --------------------------------------------------------------------------------------------
# The predictor a calibration was fitted on.


def predictor_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``PREDICTOR_KEYS`` from a ``score`` run's Parquet metadata.

    ``augmentation`` is ``None`` with one TTA copy (the image is used as it is, so the
    augmentation settings change nothing), else the settings without ``copies``. A
    ``rescale`` given as ``{"value": ...}`` is reduced to its value. Keys that the metadata
    does not record are left out.
    """
    predictor = {key: metadata[key] for key in PREDICTOR_KEYS if key in metadata}
    rescale = predictor.get("rescale")
    if isinstance(rescale, dict):
        predictor["rescale"] = rescale.get("value")
    augmentation = predictor.get("augmentation")
    if predictor.get("tta") == 1 or not isinstance(augmentation, dict):
        predictor["augmentation"] = None
    else:
        predictor["augmentation"] = {k: v for k, v in augmentation.items() if k != "copies"}
    return predictor


# The score (and calibrate) option that sets each predictor setting, for messages.
_OPTION_OF = {
    "passes": "--passes",
    "tta": "--tta",
    "rescale": "--rescale",
    "precision": "--precision",
    "sampled_layers": "--sample-layers",
    "logits": "--logits",
    "exif_transpose": "--exif-transpose",
}
_NOT_RECORDED = "<not recorded>"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def predictor_differences(
    calibrated: dict[str, Any], run: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """The settings in which two predictors differ: ``(name, calibrated value, run value)``.

    Augmentation settings are compared one by one (``augmentation.rotation``, ...) when both
    predictors augment; when only one does, ``tta`` already differs.
    """
    differences = []
    for key in PREDICTOR_KEYS:
        if key not in calibrated and key not in run:
            continue
        a, b = calibrated.get(key, _NOT_RECORDED), run.get(key, _NOT_RECORDED)
        if key == "augmentation":
            if isinstance(a, dict) and isinstance(b, dict):
                for name in sorted(set(a) | set(b)):
                    x, y = a.get(name, _NOT_RECORDED), b.get(name, _NOT_RECORDED)
                    if not _same(x, y):
                        differences.append((f"augmentation.{name}", x, y))
            continue
        if not _same(a, b):
            differences.append((key, a, b))
    return differences


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _option(name: str) -> str:
    if name.startswith("augmentation."):
        return f"--tta-{name.split('.', 1)[1]}"
    if name in ("passes", "tta"):  # calibrate's --passes/--tta are the thresholds' predictor
        return f"score {_OPTION_OF[name]}, calibrate --score-{name}"
    return _OPTION_OF.get(name, name)


class CalibrationWarning(UserWarning):
    """Something weak in a calibration that the user should know (printed by the CLI)."""


class PredictorMismatchError(ValueError):
    """A calibration used with another predictor than the one it was fitted on."""


def predictor_mismatch_message(differences: list[tuple[str, Any, Any]]) -> str:
    """One sentence naming each differing setting, its option and both values."""
    listed = "; ".join(
        f"{name} ({_option(name)}): {_show(a)} in the calibration, {_show(b)} in this run"
        for name, a, b in differences
    )
    return (
        "The calibration was fitted on another predictor than this run's, so its conformal sets "
        f"and temperature do not apply here: {listed}"
    )


# --------------------------------------------------------------------------------------------
# The calibration file.


def _json_floats(values: np.ndarray) -> list[float | None]:
    # Full precision: rounding a quantile or threshold would move borderline decisions.
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values)]


def _array(values: list[float | None], missing: float) -> np.ndarray:
    return np.array([missing if v is None else float(v) for v in values], dtype=np.float64)


@dataclass
class Calibration:
    """Everything ``batchuq calibrate`` fits, with what it was fitted on.

    Attributes:
        class_names: The model's class names (``C``).
        thresholds: ``(C,)`` validation thresholds; ``NaN`` = no threshold (JSON ``null``).
        temperature: Fitted temperature ``T``.
        conformal_quantiles: Quantiles of ``conformal_scores`` of the MC mean (no
            temperature): shape ``(1,)`` for ``lac`` and ``aps``, ``(C,)`` for ``class``;
            ``inf`` = every class in the set (JSON ``null``).
        model_sha256: sha256 of the ``.keras`` file calibrated.
        conformal_method: ``lac``, ``class`` or ``aps`` (see ``prediction_sets``).
        predictor: The scoring predictor that the temperature and the conformal quantiles were
            fitted on, as ``predictor_from_metadata`` describes a ``score`` run (``passes``,
            ``tta``, ``augmentation``, ``rescale``, ``precision``, ``sampled_layers``,
            ``logits``). ``score`` refuses a run whose predictor differs.
        threshold_predictor: The same for the predictor the thresholds were fitted on.
        model_path: Where the model file was.
        settings: ``tta``, ``passes``, ``score_passes``, ``score_tta``, ``percentile``,
            ``alpha``, ``conformal``, ``seed``, ``augmentation``, ``rescale``,
            ``sample_layers``, the temperature bounds and, from the CLI, ``options``: every
            option's value and source.
        stats: Figures on the validation set: ``images``, ``skipped``, ``accuracy``,
            ``nll_before``, ``nll_after``, ``temperature_at_bound``, per-class
            ``copies_predicted`` and ``images_per_class``,
            ``threshold_coverage``/``threshold_accuracy`` (image level, scoring predictor's MC
            mean), ``conformal_coverage`` and ``mean_set_size`` (in-sample), ``runs`` (1 when
            one run served both predictors, else 2) and ``warnings``.
        created: ISO time of the run (UTC).
        batchuq_version: Version that wrote the file.
    """

    class_names: list[str]
    thresholds: np.ndarray
    temperature: float
    conformal_quantiles: np.ndarray
    model_sha256: str
    conformal_method: str = "lac"
    predictor: dict[str, Any] = field(default_factory=dict)
    threshold_predictor: dict[str, Any] = field(default_factory=dict)
    model_path: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    batchuq_version: str = __version__

    def __post_init__(self) -> None:
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        self.conformal_quantiles = np.atleast_1d(
            np.asarray(self.conformal_quantiles, dtype=np.float64)
        )
        _check_method(self.conformal_method)
        classes = len(self.class_names)
        if self.thresholds.shape != (classes,):
            raise ValueError(
                f"`thresholds` must have one value per class ({classes}). Received: "
                f"thresholds.shape={self.thresholds.shape}"
            )
        expected = (classes,) if self.conformal_method == "class" else (1,)
        if self.conformal_quantiles.shape != expected:
            raise ValueError(
                f"`conformal_quantiles` must have shape {expected} for conformal method "
                f"{self.conformal_method!r}. Received: conformal_quantiles.shape="
                f"{self.conformal_quantiles.shape}"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``NaN`` thresholds and ``inf`` quantiles become ``None``)."""
        data = asdict(self)
        data["thresholds"] = _json_floats(self.thresholds)
        data["conformal_quantiles"] = _json_floats(self.conformal_quantiles)
        return {"format": CALIBRATION_FORMAT, **data}

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration to ``path`` (through a temporary file renamed into place)."""
        out = Path(path)
        text = json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n"
        handle, temp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(temp, out)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a file written by ``to_json``.

        Raises:
            ValueError: If the file is not a batchuq calibration file of this format (a file of
                the first format, which recorded no predictor, is refused with a request to
                run ``batchuq calibrate`` again).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"Could not read the calibration file: {exc}. Received: path={str(path)!r}"
            ) from exc
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found == "batchuq-calibration/1":
            raise ValueError(
                "This calibration file was written by an older batchuq: it does not record the "
                "predictor its conformal sets were fitted on (and fitted them on 100 augmented "
                "copies, not on what `batchuq score` computes). Run `batchuq calibrate` again. "
                f"Received: path={str(path)!r}, format={found!r}"
            )
        if found != CALIBRATION_FORMAT:
            raise ValueError(
                f"Not a batchuq calibration file (expected format {CALIBRATION_FORMAT!r}). "
                f"Received: path={str(path)!r}, format={found!r}"
            )
        try:
            return cls(
                class_names=list(data["class_names"]),
                thresholds=_array(data["thresholds"], np.nan),
                temperature=float(data["temperature"]),
                conformal_quantiles=_array(data["conformal_quantiles"], np.inf),
                model_sha256=str(data["model_sha256"]),
                conformal_method=str(data["conformal_method"]),
                predictor=dict(data["predictor"]),
                threshold_predictor=dict(data.get("threshold_predictor") or {}),
                model_path=str(data.get("model_path", "")),
                settings=dict(data.get("settings", {})),
                stats=dict(data.get("stats", {})),
                created=str(data.get("created", "")),
                batchuq_version=str(data.get("batchuq_version", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"The calibration file is incomplete or malformed ({exc}). "
                f"Received: path={str(path)!r}"
            ) from exc

    @property
    def alpha(self) -> float | None:
        """The conformal miscoverage the quantiles were fitted for."""
        return self.settings.get("alpha")

    def prediction_sets(self, mean_probs: np.ndarray) -> np.ndarray:
        """Conformal sets (``(b, C)`` bool) for the scoring predictor's MC mean ``mean_probs``
        (without temperature)."""
        probs = np.clip(np.asarray(mean_probs, dtype=np.float64), 0.0, 1.0)  # as calibrated
        return prediction_sets(probs, self.conformal_quantiles, self.conformal_method)

    def check_model(self, sha256: str) -> None:
        """Refuse to use the calibration with a model other than the one it was fitted on.

        Raises:
            ValueError: If ``sha256`` differs from ``model_sha256``.
        """
        if sha256 != self.model_sha256:
            raise ValueError(
                "calibration.json was made for another model (sha256 "
                f"{self.model_sha256[:12] or '<unknown>'}...); run `batchuq calibrate` with this "
                f"model. Received: model_sha256={sha256!r}"
            )

    def check_predictor(
        self, run_metadata: dict[str, Any], allow: bool = False
    ) -> list[tuple[str, Any, Any]]:
        """Compare the calibration's predictor with a ``score`` run's.

        Args:
            run_metadata: The run's Parquet metadata (or a ``predictor_from_metadata`` dict).
            allow: Return the differences instead of raising (``--allow-predictor-mismatch``).

        Returns:
            The differences, ``(name, calibrated value, run value)``; empty when they agree.

        Raises:
            PredictorMismatchError: If they differ and ``allow`` is false.
        """
        differences = predictor_differences(self.predictor, predictor_from_metadata(run_metadata))
        if differences and not allow:
            raise PredictorMismatchError(
                f"{predictor_mismatch_message(differences)}. Run `batchuq calibrate` again with "
                "this run's settings (the options named; they default to the [score] table of "
                "the config file), score with the calibration's settings, or pass "
                "--allow-predictor-mismatch to score anyway. "
                f"Received: allow_predictor_mismatch={allow}"
            )
        return differences


def _conformal_warnings(
    method: str, alpha: float, per_class: np.ndarray, names: list[str], quantiles: np.ndarray
) -> list[str]:
    """What is weak about the conformal fit: small classes (``class``) or too few images."""
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


def _quantile_text(q: float) -> str:
    return "inf" if np.isinf(q) else f"{q:.4f}"


def format_summary(calibration: Calibration) -> str:
    """A short human-readable summary of a calibration."""
    stats = calibration.stats
    per_class = calibration.conformal_method == "class"
    width = max(len(name) for name in calibration.class_names)
    lines = [
        f"{'class':<{width}}  threshold"
        + ("  conformal q" if per_class else "")
        + "  copies  images",
    ]
    copies = stats.get("copies_predicted") or [None] * len(calibration.class_names)
    images = stats.get("images_per_class") or [None] * len(calibration.class_names)
    for i, name in enumerate(calibration.class_names):
        t = calibration.thresholds[i]
        t_text = "none" if np.isnan(t) else f"{t:.4f}"
        q_text = f"  {_quantile_text(calibration.conformal_quantiles[i]):>11}" if per_class else ""
        lines.append(f"{name:<{width}}  {t_text:>9}{q_text}  {copies[i]!s:>6}  {images[i]!s:>6}")
    lines.append(
        f"temperature {calibration.temperature:.4f}: NLL {stats.get('nll_before', math.nan):.4f}"
        f" -> {stats.get('nll_after', math.nan):.4f}"
        + (
            " (at the search bound: the validation set is too easy or too small)"
            if stats.get("temperature_at_bound")
            else ""
        )
    )
    p = calibration.predictor
    quantile = (
        "one quantile per class"
        if per_class
        else f"quantile {_quantile_text(calibration.conformal_quantiles[0])}"
    )
    lines.append(
        f"conformal {calibration.conformal_method} at alpha {calibration.alpha}: {quantile}; "
        f"fitted with the scoring predictor --passes {p.get('passes')} --tta {p.get('tta')}"
    )
    if "accuracy" in stats:
        coverage, sel = stats.get("threshold_coverage"), stats.get("threshold_accuracy")
        sel_text = "n/a" if sel is None else f"{sel:.4f}"
        lines.append(
            f"validation: {stats['images']} images ({stats['skipped']} skipped), accuracy "
            f"{stats['accuracy']:.4f}; thresholds accept {coverage:.1%} (accuracy {sel_text}); "
            f"conformal coverage {stats['conformal_coverage']:.1%}, mean set size "
            f"{stats['mean_set_size']:.2f}"
        )
    return "\n".join(lines)
