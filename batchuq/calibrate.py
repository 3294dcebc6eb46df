"""Calibrate on a labelled validation folder: class thresholds, a temperature, conformal sets.

``batchuq calibrate VAL_IMAGES -o calibration.json`` runs the model over a labelled folder (by
default 100 TTA copies per image, 1 pass per copy: the recipe of METHODS.md, method 3) and
fits three things, stored in one JSON file together with the model's sha256:

1. **Validation thresholds** (METHODS.md "Validation thresholds"): every augmented copy of
   every validation image gives one probability vector (the mean of its ``passes`` MC samples;
   with the default ``passes=1`` simply the TTA prediction). Copies are grouped by the class
   they *predict* (argmax of the copy's vector) and, per class, the ``percentile`` (default 10)
   of their predicted-class probabilities is that class's threshold. A class that no copy
   predicts has no threshold (``NaN`` here, ``null`` in the JSON): its predictions are accepted.
2. **Temperature** ``T``: minimises the negative log-likelihood (NLL) of the MC mean
   probabilities ``p̄`` of the validation images, read as logits: ``p_T ∝ exp(log p̄ / T)``.
   The search is a golden-section search on ``log T`` over ``[0.05, 20]`` (the NLL is convex in
   ``1/T``, hence unimodal in ``log T``), so no SciPy is needed.
3. **Class-conditional split conformal** quantiles: nonconformity ``s = 1 - p_y(x)`` with ``p``
   the MC mean after temperature scaling; for a true class ``y`` with ``n_y`` validation images
   the quantile is the ``⌈(n_y + 1)(1 - alpha)⌉``-th smallest score, i.e. the empirical
   quantile at level ``⌈(n_y + 1)(1 - alpha)⌉ / n_y``. When that level exceeds 1 (too few
   images) the quantile is ``+inf`` (``null`` in the JSON): the class is always in the set.
   Prediction sets ``{c : 1 - p_c <= q_c}`` then contain the true class with probability at
   least ``1 - alpha`` for each class, for exchangeable data.

The pure functions (``class_thresholds``, ``fit_temperature``, ``apply_temperature``,
``conformal_quantiles``, ``prediction_sets``, ``threshold_decisions``) only need NumPy.
TensorFlow is imported only by ``calibrate_directory``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from batchuq import __version__
from batchuq.config import config_option
from batchuq.decide import UNCLASSIFIED
from batchuq.metrics import nll
from batchuq.options import (
    augmentation_options,
    batch_size_option,
    class_names_options,
    model_option,
    progress_option,
    seed_option,
    split_csv,
)

if TYPE_CHECKING:
    import keras

    from batchuq.models import LoadedModel

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "apply_temperature",
    "calibrate_command",
    "calibrate_directory",
    "class_thresholds",
    "conformal_quantiles",
    "fit_temperature",
    "nll",
    "prediction_sets",
    "threshold_decisions",
]

CALIBRATION_FORMAT = "batchuq-calibration/1"
TEMPERATURE_BOUNDS = (0.05, 20.0)
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
        percentile: Percentile in ``[0, 100]`` (METHODS.md: 10).

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
# 3. Class-conditional split conformal prediction.


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


def conformal_quantiles(
    mean_probs: np.ndarray, labels: np.ndarray, alpha: float = 0.1
) -> np.ndarray:
    """Class-conditional split-conformal quantiles of the score ``s = 1 - p_y``.

    For each class ``y`` with ``n_y`` calibration images, ``q_y`` is the ``k``-th smallest of
    their scores with ``k = ⌈(n_y + 1)(1 - alpha)⌉``, i.e. the empirical quantile at level
    ``k / n_y``. If ``k > n_y`` (level > 1, including ``n_y = 0``) ``q_y = +inf``.

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities (after temperature scaling, if used; the
            same transform must be applied before ``prediction_sets``).
        labels: ``(n,)`` true class indices.
        alpha: Miscoverage in ``(0, 1)``; sets cover the true class with probability
            ``>= 1 - alpha`` per class.

    Returns:
        ``(C,)`` float64 quantiles in ``[0, 1]``, or ``inf``.

    Raises:
        ValueError: For mismatched inputs or ``alpha`` outside ``(0, 1)``.
    """
    probs = _probabilities(mean_probs, "mean_probs", ndim=2)
    labels = _labels(labels, len(probs), probs.shape[1])
    alpha = _check_fraction(alpha, "alpha", 0.0, 1.0)
    scores = 1.0 - probs[np.arange(len(probs)), labels]
    quantiles = np.full(probs.shape[1], np.inf)
    for y in range(probs.shape[1]):
        class_scores = np.sort(scores[labels == y])
        k = _conformal_rank(len(class_scores), alpha)
        if len(class_scores) and k <= len(class_scores):
            quantiles[y] = class_scores[max(k, 1) - 1]
    return quantiles


def prediction_sets(mean_probs: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Conformal prediction sets: class ``c`` is in the set iff ``1 - p_c <= q_c``.

    Args:
        mean_probs: ``(b, C)`` probabilities, transformed as for ``conformal_quantiles``.
        quantiles: ``(C,)`` quantiles; ``inf`` (or ``NaN``, read as "no quantile") puts the
            class in every set.

    Returns:
        ``(b, C)`` bool mask of set membership (a set may be empty).

    Raises:
        ValueError: If the number of classes differs.
    """
    probs = _probabilities(mean_probs, "mean_probs", ndim=2)
    quantiles = np.asarray(quantiles, dtype=np.float64)
    if quantiles.shape != (probs.shape[1],):
        raise ValueError(
            f"`quantiles` must have shape ({probs.shape[1]},), one per class of mean_probs. "
            f"Received: quantiles.shape={quantiles.shape}"
        )
    quantiles = np.where(np.isnan(quantiles), np.inf, quantiles)
    return (1.0 - probs) <= quantiles[None, :]


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
        conformal_quantiles: ``(C,)`` quantiles of ``1 - p_y`` after temperature scaling;
            ``inf`` = class always in the set (JSON ``null``).
        model_sha256: sha256 of the ``.keras`` file calibrated.
        model_path: Where that file was.
        settings: ``tta``, ``passes``, ``percentile``, ``alpha``, ``seed``, ``augmentation``,
            ``rescale``, ``sample_layers`` and the temperature bounds.
        stats: Figures on the validation set: ``images``, ``skipped``, ``accuracy``,
            ``nll_before``, ``nll_after``, ``temperature_at_bound``, per-class
            ``copies_predicted`` and ``images_per_class``,
            ``threshold_coverage``/``threshold_accuracy`` (image level, MC mean),
            ``conformal_coverage`` and ``mean_set_size`` (in-sample).
        created: ISO time of the run (UTC).
        batchuq_version: Version that wrote the file.
    """

    class_names: list[str]
    thresholds: np.ndarray
    temperature: float
    conformal_quantiles: np.ndarray
    model_sha256: str
    model_path: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    batchuq_version: str = __version__

    def __post_init__(self) -> None:
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        self.conformal_quantiles = np.asarray(self.conformal_quantiles, dtype=np.float64)
        classes = len(self.class_names)
        for name in ("thresholds", "conformal_quantiles"):
            shape = getattr(self, name).shape
            if shape != (classes,):
                raise ValueError(
                    f"`{name}` must have one value per class ({classes}). Received: "
                    f"{name}.shape={shape}"
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
            ValueError: If the file is not a batchuq calibration file.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"Could not read the calibration file: {exc}. Received: path={str(path)!r}"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
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


# --------------------------------------------------------------------------------------------
# Running the model over a validation folder.


def calibrate_directory(
    val_images: str | os.PathLike[str],
    output_json: str | os.PathLike[str] | None,
    *,
    model: str | os.PathLike[str] | keras.Model | LoadedModel | None = None,
    tta: int = 100,
    passes: int = 1,
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
) -> Calibration:
    """Fit thresholds, a temperature and conformal quantiles on a labelled folder.

    Runs ``score_directory`` over ``val_images`` (class subfolders) with ``tta`` copies and
    ``passes`` MC passes per copy, collecting the raw samples ``(batch, passes * tta, C)``.
    Thresholds use one vector per copy (mean of its passes); the temperature and the conformal
    quantiles use the MC mean over all samples of each image. Rows that could not be read or
    have no label among the model's classes are skipped.

    Args:
        val_images: Labelled validation folder (one subfolder per class).
        output_json: Where to write the calibration JSON (``None``: do not write).
        model: ``.keras`` path, Keras model, ``LoadedModel``, or ``None`` for
            ``$BATCHUQ_MODEL`` or the bundled demo model.
        tta: Augmented copies per image ``K`` (default 100, as in METHODS.md).
        passes: MC dropout passes per copy (default 1: plain TTA).
        percentile: Percentile of the threshold (default 10).
        alpha: Miscoverage of the conformal sets (default 0.1).
        seed: Seed of augmentation and dropout.
        batch_size: Images per batch.
        progress: Show a progress bar.
        tta_rotation, tta_zoom, tta_shift, tta_contrast, tta_flip: Augmentation settings
            (use the same ones when scoring).
        class_names, labels, rescale, sample_layers: As for ``score_directory``.

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
    from batchuq.score import score_directory
    from batchuq.write import check_output_path, read_metadata

    started = time.perf_counter()
    for name, value in (("tta", tta), ("passes", passes), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value}")
    percentile = float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"`percentile` must be in [0, 100]. Received: percentile={percentile}")
    alpha = _check_fraction(alpha, "alpha", 0.0, 1.0)
    if output_json is not None:
        check_output_path(output_json)
    tta_config = TTAConfig(int(tta), tta_rotation, tta_zoom, tta_shift, tta_contrast, tta_flip)
    loaded = as_loaded_model(model)
    copies, passes = int(tta), int(passes)

    positions: list[int] = []
    copy_pred: list[np.ndarray] = []
    copy_conf: list[np.ndarray] = []
    means: list[np.ndarray] = []

    def on_samples(batch_positions: list[int], samples: np.ndarray) -> None:
        b, _, classes = samples.shape
        per_copy = samples.reshape(b, copies, passes, classes).mean(axis=2, dtype=np.float64)
        pred = per_copy.argmax(axis=2)
        positions.extend(int(p) for p in batch_positions)
        copy_pred.append(pred.astype(np.int32))
        copy_conf.append(np.take_along_axis(per_copy, pred[..., None], axis=2)[..., 0])
        means.append(samples.mean(axis=1, dtype=np.float64))

    with tempfile.TemporaryDirectory(prefix="batchuq-calibrate-") as tmp:
        parquet = Path(tmp) / "validation.parquet"
        score_directory(
            val_images,
            parquet,
            model=loaded,
            passes=passes,
            tta=tta_config,
            seed=seed,
            batch_size=batch_size,
            rule=DecisionRule("none"),
            class_names=class_names,
            labels=labels,
            rescale=rescale,
            sample_layers=sample_layers,
            on_samples=on_samples,
            progress=progress,
        )
        frame = pd.read_parquet(parquet, columns=["status", "label_index"])
        metadata = read_metadata(parquet)

    names = list(metadata["class_names"])
    n_classes = len(names)
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    if len(order) != len(frame):
        raise RuntimeError(
            f"Got samples for {len(order)} images but {len(frame)} rows; this is a bug. "
            f"Received: val_images={str(val_images)!r}"
        )
    copy_pred_all = np.concatenate(copy_pred)[order]
    copy_conf_all = np.concatenate(copy_conf)[order]
    mean_all = np.concatenate(means)[order]
    label_index = pd.to_numeric(frame["label_index"]).to_numpy(dtype=np.float64, na_value=np.nan)
    keep = (frame["status"].to_numpy() == "ok") & ~np.isnan(label_index)
    if not keep.any():
        raise ValueError(
            "No readable validation image has a label among the model's classes; calibrate "
            "needs a folder with one subfolder per class named like the model's classes "
            f"{names}. Received: val_images={str(val_images)!r}"
        )
    y = label_index[keep].astype(np.int64)
    mean_probs = np.clip(mean_all[keep], 0.0, 1.0)

    thresholds, copies_predicted = _thresholds_from_predictions(
        copy_pred_all[keep].ravel(),
        np.clip(copy_conf_all[keep].ravel(), 0.0, 1.0),
        n_classes,
        percentile,
    )
    temperature = fit_temperature(mean_probs, y)
    scaled = apply_temperature(mean_probs, temperature)
    quantiles = conformal_quantiles(scaled, y, alpha)

    pred = mean_probs.argmax(axis=1)
    decisions = threshold_decisions(pred, mean_probs[np.arange(len(y)), pred], thresholds)
    accepted = decisions != UNCLASSIFIED
    sets = prediction_sets(scaled, quantiles)
    stats = {
        "images": int(keep.sum()),
        "skipped": int((~keep).sum()),
        "images_per_class": np.bincount(y, minlength=n_classes).tolist(),
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
        "conformal_coverage": float(sets[np.arange(len(y)), y].mean()),
        "mean_set_size": float(sets.sum(axis=1).mean()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    calibration = Calibration(
        class_names=names,
        thresholds=thresholds,
        temperature=temperature,
        conformal_quantiles=quantiles,
        model_sha256=loaded.sha256,
        model_path=str(loaded.path),
        settings={
            "val_images": str(val_images),
            "tta": copies,
            "passes": passes,
            "percentile": percentile,
            "alpha": alpha,
            "seed": seed,
            "augmentation": tta_config.as_metadata(),
            "rescale": metadata.get("rescale"),
            "sample_layers": sample_layers,
            "sampled_layers": metadata.get("sampled_layers"),
            "threshold_grouping": "predicted class of each augmented copy",
            "temperature_bounds": list(TEMPERATURE_BOUNDS),
            "conformal_score": "1 - p_y of the temperature-scaled MC mean",
        },
        stats=stats,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if output_json is not None:
        calibration.to_json(output_json)
    return calibration


def format_summary(calibration: Calibration) -> str:
    """A short human-readable summary of a calibration."""
    stats = calibration.stats
    width = max(len(name) for name in calibration.class_names)
    lines = [
        f"{'class':<{width}}  threshold  conformal q  copies  images",
    ]
    copies = stats.get("copies_predicted") or [None] * len(calibration.class_names)
    images = stats.get("images_per_class") or [None] * len(calibration.class_names)
    for i, name in enumerate(calibration.class_names):
        t, q = calibration.thresholds[i], calibration.conformal_quantiles[i]
        t_text = "none" if np.isnan(t) else f"{t:.4f}"
        q_text = "inf" if np.isinf(q) else f"{q:.4f}"
        lines.append(
            f"{name:<{width}}  {t_text:>9}  {q_text:>11}  {copies[i]!s:>6}  {images[i]!s:>6}"
        )
    lines.append(
        f"temperature {calibration.temperature:.4f}: NLL {stats.get('nll_before', math.nan):.4f}"
        f" -> {stats.get('nll_after', math.nan):.4f}"
        + (
            " (at the search bound: the validation set is too easy or too small)"
            if stats.get("temperature_at_bound")
            else ""
        )
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
@click.option(
    "--tta",
    "-K",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Augmented copies per validation image.",
)
@click.option(
    "--passes",
    "-T",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="MC dropout passes per copy (thresholds use the mean of a copy's passes).",
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
@augmentation_options
@class_names_options
@seed_option
@batch_size_option
@progress_option
@config_option
def calibrate_command(
    val_images: Path,
    output: Path,
    model: Path | None,
    tta: int,
    passes: int,
    percentile: float,
    alpha: float,
    tta_rotation: float,
    tta_zoom: float,
    tta_shift: float,
    tta_contrast: float,
    tta_flip: bool,
    class_names: str | None,
    labels: Path | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Fit validation thresholds, a temperature and conformal sets on VAL_IMAGES.

    VAL_IMAGES is a labelled folder with one subfolder per class. Each image is augmented
    --tta times (each copy run --passes times with dropout on). Per class, the --percentile of
    the predicted-class probabilities of the copies that predict it becomes its threshold; a
    temperature is fitted to the MC mean probabilities by minimising the NLL; and per class a
    split-conformal quantile of 1 - p(true class) at level --alpha is computed. The result,
    with the model's sha256 and all settings, is written to --output as JSON.

    Example:

        batchuq calibrate sample_data/digits/val -o calibration.json
    """
    from batchuq.cli import EXIT_USAGE, import_tensorflow_quietly
    from batchuq.discover import NoImagesFoundError

    import_tensorflow_quietly()
    from batchuq.models import ModelError

    try:
        calibration = calibrate_directory(
            val_images,
            output,
            model=model,
            tta=tta,
            passes=passes,
            percentile=percentile,
            alpha=alpha,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            tta_rotation=tta_rotation,
            tta_zoom=tta_zoom,
            tta_shift=tta_shift,
            tta_contrast=tta_contrast,
            tta_flip=tta_flip,
            class_names=split_csv(class_names),
            labels=labels,
        )
    except (NoImagesFoundError, NotADirectoryError, ModelError, ValueError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(format_summary(calibration))
    click.echo(f"-> {output}", err=True)
