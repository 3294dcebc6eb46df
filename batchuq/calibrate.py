"""Calibrate on a labelled validation folder: class thresholds, a temperature, conformal sets.

``batchuq calibrate VAL_IMAGES -o calibration.json`` runs the model over a labelled folder with
two predictors and fits three things, stored in one JSON file with the model's sha256:

* the **threshold predictor** (``--tta`` copies, default 100, ``--passes`` per copy, default 1:
  the recipe in docs/methods.md, "Validation thresholds") gives the validation thresholds;
* the **scoring predictor** (``--score-passes``, default 100, ``--score-tta``, default 1: what
  ``batchuq score`` computes by default, or what the ``[score]`` table of the same config file
  says) gives the temperature and the conformal quantiles. They are fitted on exactly the
  per-image MC-mean probabilities ``p̄`` that ``score`` computes, because the coverage guarantee
  of conformal sets rests on the calibration and test scores being exchangeable: scores of
  another predictor (e.g. 100 augmented copies instead of 100 dropout passes) are not.
  When both predictors are the same, one run over the folder serves both.

1. **Validation thresholds** (docs/methods.md, "Calibration"): every augmented copy of
   every validation image gives one probability vector (the mean of its ``passes`` MC samples;
   with the default ``passes=1`` simply the TTA prediction). Copies are grouped by the class
   they *predict* (argmax of the copy's vector) and, per class, the ``percentile`` (default 10)
   of their predicted-class probabilities is that class's threshold. A class that no copy
   predicts has no threshold (``NaN`` here, ``null`` in the JSON): its predictions are accepted.
   ``score --rule threshold`` compares them with the confidence of its own MC mean, as in the
   blog post (thresholds from augmented copies, applied to the test-time prediction).
2. **Temperature** ``T``: minimises the negative log-likelihood (NLL) of the scoring
   predictor's MC mean ``p̄`` of the validation images, read as logits: ``p_T ∝ exp(log p̄ / T)``.
   The search is a golden-section search on ``log T`` over ``[0.05, 20]`` (the NLL is convex in
   ``1/T``, hence unimodal in ``log T``), so no SciPy is needed.
3. **Split conformal** quantiles (``--conformal``), on the scoring predictor's MC mean ``p̄``
   *without* temperature (the temperature is fitted on the same images; a score function fitted
   on the calibration images would void the finite-sample guarantee). With ``n`` calibration
   scores, the quantile ``q̂`` is the ``k``-th smallest, ``k = ⌈(n + 1)(1 - alpha)⌉`` (the
   empirical quantile at level ``k / n``, as MAPIE computes it); ``k > n`` gives ``+inf``
   (``null`` in the JSON): every class is in every set.

   * ``lac`` (default; Sadinle et al. 2019, MAPIE's ``lac``): marginal, score ``1 - p̄_y``, set
     ``{c : 1 - p̄_c <= q̂}``. Sets may be empty where the model is sure of no class.
   * ``class``: the same score with one quantile per true class (class-conditional coverage);
     needs many images per class, and warns below about ``10 / alpha``.
   * ``aps`` (Romano et al. 2020, without randomisation): score = the total probability of the
     classes ranked at or above the true class (classes sorted by ``p̄``, descending; ties by
     class index); set = the smallest prefix of that ranking whose total probability reaches
     ``q̂``. It always holds the top class, so it is never empty.

   For exchangeable calibration and test images, a set holds the true class with probability
   at least ``1 - alpha`` (per class for ``class``; on average over calibration sets) and, for
   ``lac`` with continuous scores, at most ``1 - alpha + 1 / (n + 1)``. ``aps`` without
   randomisation covers more: its set also holds the class that crosses ``q̂``.

The JSON records both predictors (``predictor``, ``threshold_predictor``: see
``PREDICTOR_KEYS``); ``score --calibration`` refuses a run whose predictor differs from
``predictor`` unless it is told to allow it.

The pure functions (``class_thresholds``, ``fit_temperature``, ``apply_temperature``,
``conformal_scores``, ``conformal_quantiles``, ``prediction_sets``, ``threshold_decisions``) only
need NumPy. TensorFlow is imported only by ``calibrate_directory``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from batchuq import __version__
from batchuq.config import config_option, section_defaults, settings_provenance
from batchuq.decide import UNCLASSIFIED
from batchuq.defaults import DEFAULT_PASSES
from batchuq.metrics import nll
from batchuq.options import (
    augmentation_options,
    batch_size_option,
    class_names_options,
    exif_transpose_option,
    import_option,
    logits_option,
    model_option,
    precision_option,
    progress_option,
    rescale_option,
    sample_layers_option,
    seed_option,
    split_csv,
)

if TYPE_CHECKING:
    import keras

    from batchuq.models import LoadedModel

__all__ = [
    "CALIBRATION_FORMAT",
    "CONFORMAL_METHODS",
    "PREDICTOR_KEYS",
    "Calibration",
    "CalibrationWarning",
    "PredictorMismatchError",
    "apply_temperature",
    "calibrate_command",
    "calibrate_directory",
    "class_thresholds",
    "conformal_quantiles",
    "conformal_scores",
    "fit_temperature",
    "nll",
    "prediction_sets",
    "predictor_differences",
    "predictor_from_metadata",
    "threshold_decisions",
]

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


# --------------------------------------------------------------------------------------------
# Running the model over a validation folder.


_CONFORMAL_SCORE = {
    "lac": "1 - p_y of the MC mean (one quantile for all classes)",
    "class": "1 - p_y of the MC mean (one quantile per true class)",
    "aps": "total MC-mean probability of the classes ranked at or above y (not randomised)",
}


def calibrate_directory(
    val_images: str | os.PathLike[str],
    output_json: str | os.PathLike[str] | None,
    *,
    model: str | os.PathLike[str] | keras.Model | LoadedModel | None = None,
    tta: int = 100,
    passes: int = 1,
    score_passes: int = DEFAULT_PASSES,
    score_tta: int = 1,
    conformal: str = "lac",
    percentile: float = 10.0,
    alpha: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    tta_rotation: float = 15.0,
    tta_zoom: float = 0.1,
    tta_shift: float = 0.1,
    tta_contrast: float = 0.1,
    tta_flip: bool = False,
    class_names: list[str] | None = None,
    labels: str | os.PathLike[str] | dict[str, str] | None = None,
    rescale: float | None = None,
    sample_layers: list[str] | None = None,
    precision: str = "float32",
    logits: bool = False,
    exif_transpose: bool | None = None,
    settings: dict[str, Any] | None = None,
) -> Calibration:
    """Fit thresholds, a temperature and conformal quantiles on a labelled folder.

    Runs ``score_directory`` over ``val_images`` (class subfolders) with two predictors:

    * the threshold predictor, ``tta`` copies x ``passes`` MC passes per copy: the thresholds
      use one vector per copy (the mean of its passes);
    * the scoring predictor, ``score_tta`` copies x ``score_passes`` passes, as ``batchuq
      score --tta score_tta --passes score_passes`` computes it: the temperature and the
      conformal quantiles use its per-image MC mean, exactly the ``mean_*`` values ``score``
      writes (and builds ``pred_set`` from).

    Both share the model, seed, augmentation settings, rescale, sampled layers, precision,
    logits and EXIF handling. When they are the same predictor one run serves both. Rows that
    could not be read or have no label among the model's classes are skipped.

    Args:
        val_images: Labelled validation folder (one subfolder per class).
        output_json: Where to write the calibration JSON (``None``: do not write).
        model: ``.keras`` path, Keras model, ``LoadedModel``, or ``None`` for
            ``$BATCHUQ_MODEL`` or the bundled demo model.
        tta: Augmented copies per image for the thresholds (default 100, as in docs/methods.md).
        passes: MC dropout passes per copy for the thresholds (default 1: plain TTA).
        score_passes: MC passes of the scoring predictor (default: ``score``'s, 100).
        score_tta: TTA copies of the scoring predictor (default: ``score``'s, 1).
        conformal: ``lac`` (default), ``class`` or ``aps`` (see ``prediction_sets``).
        percentile: Percentile of the threshold (default 10).
        alpha: Miscoverage of the conformal sets (default 0.1).
        seed: Seed of augmentation and dropout.
        batch_size: Images per batch.
        progress: Show a progress bar.
        tta_rotation, tta_zoom, tta_shift, tta_contrast, tta_flip: Augmentation settings of
            both predictors (the scoring predictor's only matter when ``score_tta > 1``).
        class_names, labels, rescale, sample_layers, precision, logits, exif_transpose: As
            for ``score_directory``.
        settings: Extra record stored as ``settings["options"]`` (the CLI passes each option's
            value and source).

    Returns:
        The ``Calibration`` (also written to ``output_json``).

    Raises:
        ValueError: For bad arguments, an unwritable output, or no usable labelled images
            (``ModelError`` and ``NoImagesFoundError`` are ``ValueError`` subclasses).
        NotADirectoryError: If ``val_images`` is not a folder.
    """
    import pandas as pd

    from batchuq.augment import TTAConfig
    from batchuq.decide import DecisionRule
    from batchuq.models import as_loaded_model
    from batchuq.sample import NoDropoutError
    from batchuq.score import score_directory
    from batchuq.write import check_output_path, read_metadata

    started = time.perf_counter()
    for name, value in (
        ("tta", tta),
        ("passes", passes),
        ("score_tta", score_tta),
        ("score_passes", score_passes),
        ("batch_size", batch_size),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value}")
    percentile = float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"`percentile` must be in [0, 100]. Received: percentile={percentile}")
    alpha = _check_fraction(alpha, "alpha", 0.0, 1.0)
    _check_method(conformal)
    if output_json is not None:
        check_output_path(output_json)
    augmentation = (tta_rotation, tta_zoom, tta_shift, tta_contrast, tta_flip)
    threshold_tta = TTAConfig(int(tta), *augmentation)
    scoring_tta = TTAConfig(int(score_tta), *augmentation)
    loaded = as_loaded_model(model)
    copies, passes = int(tta), int(passes)
    score_passes = int(score_passes)
    one_run = (copies, passes) == (scoring_tta.copies, score_passes)
    shared = {
        "model": loaded,
        "seed": seed,
        "batch_size": batch_size,
        "rule": DecisionRule("none"),
        "class_names": class_names,
        "labels": labels,
        "rescale": rescale,
        "sample_layers": sample_layers,
        "precision": precision,
        "logits": logits,
        "exif_transpose": exif_transpose,
        "progress": progress,
    }

    positions: list[int] = []
    copy_pred: list[np.ndarray] = []
    copy_conf: list[np.ndarray] = []

    def on_samples(batch_positions: list[int], samples: np.ndarray) -> None:
        b, _, classes = samples.shape
        per_copy = samples.reshape(b, copies, passes, classes).mean(axis=2, dtype=np.float64)
        pred = per_copy.argmax(axis=2)
        positions.extend(int(p) for p in batch_positions)
        copy_pred.append(pred.astype(np.int32))
        copy_conf.append(np.take_along_axis(per_copy, pred[..., None], axis=2)[..., 0])

    with tempfile.TemporaryDirectory(prefix="batchuq-calibrate-") as tmp:
        scoring = Path(tmp) / "scoring.parquet"
        threshold_run = scoring if one_run else Path(tmp) / "thresholds.parquet"
        if not one_run:
            try:
                score_directory(val_images, scoring, passes=score_passes, tta=scoring_tta, **shared)
            except NoDropoutError as exc:
                raise NoDropoutError(
                    f"{exc} (for calibrate: --score-passes, the scoring predictor's passes)"
                ) from None
        score_directory(
            val_images,
            threshold_run,
            passes=passes,
            tta=threshold_tta,
            on_samples=on_samples,
            **shared,
        )
        metadata = read_metadata(scoring)
        names = list(metadata["class_names"])
        frame = pd.read_parquet(
            scoring, columns=["path", "status", "label_index", *(f"mean_{n}" for n in names)]
        )
        threshold_frame = pd.read_parquet(threshold_run, columns=["path", "status", "label_index"])
        threshold_metadata = read_metadata(threshold_run)

    n_classes = len(names)
    if list(threshold_frame["path"]) != list(frame["path"]) or len(positions) != len(frame):
        raise RuntimeError(
            f"The two runs over the folder saw different images ({len(frame)} and "
            f"{len(threshold_frame)} rows, samples for {len(positions)}); did the folder change "
            f"while calibrate ran? Received: val_images={str(val_images)!r}"
        )

    def usable(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        index = pd.to_numeric(rows["label_index"]).to_numpy(dtype=np.float64, na_value=np.nan)
        return (rows["status"].to_numpy() == "ok") & ~np.isnan(index), index

    keep, label_index = usable(frame)
    keep_copies, _ = usable(threshold_frame)
    if not keep.any():
        raise ValueError(
            "No readable validation image has a label among the model's classes; calibrate "
            "needs a folder with one subfolder per class named like the model's classes "
            f"{names}. Received: val_images={str(val_images)!r}"
        )
    y = label_index[keep].astype(np.int64)
    mean_columns = frame[[f"mean_{n}" for n in names]].to_numpy(dtype=np.float64)
    # Exactly the float32 means that `score` writes and builds its sets from.
    mean_probs = np.clip(mean_columns[keep], 0.0, 1.0)

    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    thresholds, copies_predicted = _thresholds_from_predictions(
        np.concatenate(copy_pred)[order][keep_copies].ravel(),
        np.clip(np.concatenate(copy_conf)[order][keep_copies].ravel(), 0.0, 1.0),
        n_classes,
        percentile,
    )
    temperature = fit_temperature(mean_probs, y)
    scaled = apply_temperature(mean_probs, temperature)
    quantiles = conformal_quantiles(mean_probs, y, alpha, conformal)
    sets = prediction_sets(mean_probs, quantiles, conformal)
    per_class = np.bincount(y, minlength=n_classes)
    notes = _conformal_warnings(conformal, alpha, per_class, names, quantiles)
    for note in notes:
        warnings.warn(note, CalibrationWarning, stacklevel=2)

    pred = mean_probs.argmax(axis=1)
    decisions = threshold_decisions(pred, mean_probs[np.arange(len(y)), pred], thresholds)
    accepted = decisions != UNCLASSIFIED
    stats = {
        "images": int(keep.sum()),
        "skipped": int((~keep).sum()),
        "images_per_class": per_class.tolist(),
        "copies_predicted": copies_predicted.tolist(),
        "accuracy": float(np.mean(pred == y)),
        "nll_before": nll(mean_probs, y),
        "nll_after": nll(scaled, y),
        "temperature_at_bound": bool(
            min(abs(math.log(temperature / b)) for b in TEMPERATURE_BOUNDS) < 1e-4
        ),
        "threshold_coverage": float(accepted.mean()),
        "threshold_accuracy": float(np.mean(pred[accepted] == y[accepted]))
        if accepted.any()
        else None,
        "conformal_level": None if conformal == "class" else conformal_level(len(y), alpha),
        "conformal_coverage": float(sets[np.arange(len(y)), y].mean()),
        "mean_set_size": float(sets.sum(axis=1).mean()),
        "empty_sets": int((sets.sum(axis=1) == 0).sum()),
        "runs": 1 if one_run else 2,
        "warnings": notes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    predictor = predictor_from_metadata(metadata)
    calibration = Calibration(
        class_names=names,
        thresholds=thresholds,
        temperature=temperature,
        conformal_quantiles=quantiles,
        model_sha256=loaded.sha256,
        conformal_method=conformal,
        predictor=predictor,
        threshold_predictor=predictor_from_metadata(threshold_metadata),
        model_path=str(loaded.path),
        settings={
            "val_images": str(val_images),
            "tta": copies,
            "passes": passes,
            "score_passes": score_passes,
            "score_tta": scoring_tta.copies,
            "percentile": percentile,
            "alpha": alpha,
            "conformal": conformal,
            "seed": seed,
            "augmentation": threshold_tta.as_metadata(),
            "rescale": predictor.get("rescale"),
            "sample_layers": sample_layers,
            "sampled_layers": metadata.get("sampled_layers"),
            "precision": predictor.get("precision"),
            "logits": logits,
            "threshold_grouping": "predicted class of each augmented copy",
            "temperature_bounds": list(TEMPERATURE_BOUNDS),
            "temperature_fitted_on": "MC mean of the scoring predictor",
            "conformal_score": _CONFORMAL_SCORE[conformal],
            "options": settings,
        },
        stats=stats,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if output_json is not None:
        calibration.to_json(output_json)
    return calibration


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


# --------------------------------------------------------------------------------------------
# Command line.

# calibrate option -> score option whose value in the config's [score] table becomes its
# default: the scoring predictor (and the model) follow the scoring settings.
_FROM_SCORE_TABLE = {
    "model": "model",
    "score_passes": "passes",
    "score_tta": "tta",
    "tta_rotation": "tta_rotation",
    "tta_zoom": "tta_zoom",
    "tta_shift": "tta_shift",
    "tta_contrast": "tta_contrast",
    "tta_flip": "tta_flip",
    "rescale": "rescale",
    "sample_layers": "sample_layers",
    "precision": "precision",
    "logits": "logits",
    "exif_transpose": "exif_transpose",
    "imports": "imports",
}


@click.command("calibrate")
@click.argument(
    "val_images",
    metavar="VAL_IMAGES",
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Calibration JSON file to write.",
)
@model_option
@import_option
@click.option(
    "--tta",
    "-K",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Thresholds: augmented copies per validation image.",
)
@click.option(
    "--passes",
    "-T",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Thresholds: MC dropout passes per copy (a copy's vector is the mean of its passes).",
)
@click.option(
    "--score-passes",
    type=click.IntRange(min=1),
    default=DEFAULT_PASSES,
    show_default=True,
    help="Scoring predictor (temperature, conformal sets): MC passes, as score's --passes. "
    "Default: passes in the config's [score] table, else score's default.",
)
@click.option(
    "--score-tta",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Scoring predictor: TTA copies, as score's --tta. Default: tta in the config's "
    "[score] table, else score's default.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(0, 100),
    default=10.0,
    show_default=True,
    help="Percentile of the predicted-class probabilities taken as each class's threshold.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Conformal miscoverage: sets hold the true class with probability >= 1 - alpha.",
)
@click.option(
    "--conformal",
    type=click.Choice(CONFORMAL_METHODS),
    default="lac",
    show_default=True,
    help="Conformal sets: lac = marginal, {c : 1 - p_c <= q}; class = one quantile per class "
    "(needs about 10/alpha images per class); aps = adaptive sets, never empty.",
)
@augmentation_options
# The predictor options, shared with score; defaults come from the config's [score] table
# when it has them (see _FROM_SCORE_TABLE), else they are score's defaults.
@rescale_option
@sample_layers_option
@precision_option
@logits_option
@exif_transpose_option
@class_names_options
@seed_option
@batch_size_option
@progress_option
@config_option
@click.pass_context
def calibrate_command(
    ctx: click.Context,
    val_images: Path,
    output: Path,
    model: Path | None,
    imports: tuple[str, ...],
    tta: int,
    passes: int,
    score_passes: int,
    score_tta: int,
    percentile: float,
    alpha: float,
    conformal: str,
    tta_rotation: float,
    tta_zoom: float,
    tta_shift: float,
    tta_contrast: float,
    tta_flip: bool,
    rescale: float | None,
    sample_layers: str | None,
    precision: str,
    logits: bool,
    exif_transpose: bool | None,
    class_names: str | None,
    labels: Path | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Fit validation thresholds, a temperature and conformal sets on VAL_IMAGES.

    VAL_IMAGES is a labelled folder with one subfolder per class. Thresholds: each image is
    augmented --tta times (each copy run --passes times with dropout on), and per class the
    --percentile of the predicted-class probabilities of the copies that predict it becomes its
    threshold. Temperature and conformal sets: fitted on the MC mean of the scoring predictor
    (--score-passes, --score-tta and the shared options, which default to the [score] table of
    the config file, else to score's defaults), exactly as `batchuq score` computes it; score
    refuses the calibration for a run with another predictor. The temperature minimises the
    NLL; the conformal quantile (--conformal, at level --alpha) makes sets that hold the true
    class with probability >= 1 - alpha. The result, with the model's sha256, both predictors
    and all settings, is written to --output as JSON.

    Example:

        batchuq calibrate sample_data/digits/val -o calibration.json
    """
    from click.core import ParameterSource

    from batchuq.cli import EXIT_USAGE, import_tensorflow_quietly
    from batchuq.discover import NoImagesFoundError

    values = dict(ctx.params)
    options = settings_provenance(ctx)
    score_table = section_defaults(ctx, "score")
    for name, key in _FROM_SCORE_TABLE.items():
        if key in score_table and ctx.get_parameter_source(name) == ParameterSource.DEFAULT:
            values[name] = score_table[key]
            options[name] = {
                "value": score_table[key],
                "source": f"config file [score] ({options['config']['value']})",
            }
    model = None if values["model"] is None else Path(values["model"])

    import_tensorflow_quietly()
    from batchuq.model_files import import_user_modules
    from batchuq.models import ModelError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        try:
            import_user_modules(values["imports"])
            calibration = calibrate_directory(
                val_images,
                output,
                model=model,
                tta=tta,
                passes=passes,
                score_passes=values["score_passes"],
                score_tta=values["score_tta"],
                conformal=conformal,
                percentile=percentile,
                alpha=alpha,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
                tta_rotation=values["tta_rotation"],
                tta_zoom=values["tta_zoom"],
                tta_shift=values["tta_shift"],
                tta_contrast=values["tta_contrast"],
                tta_flip=values["tta_flip"],
                class_names=split_csv(class_names),
                labels=labels,
                rescale=values["rescale"],
                sample_layers=split_csv(values["sample_layers"]),
                precision=values["precision"],
                logits=values["logits"],
                exif_transpose=values["exif_transpose"],
                settings=options,
            )
        except (NoImagesFoundError, NotADirectoryError, ModelError, ValueError) as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        finally:
            for warning in caught:
                if issubclass(warning.category, CalibrationWarning):
                    click.echo(f"Warning: {warning.message}", err=True)
                else:
                    warnings.showwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
    click.echo(format_summary(calibration))
    click.echo(f"-> {output}", err=True)
