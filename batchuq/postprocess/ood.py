"""Out-of-distribution scores beyond the probabilities: the feature-space kNN and OOD metrics.

* ``KnnIndex`` (Sun et al., ICML 2022, "Out-of-distribution detection with deep nearest
  neighbors"; OpenOOD's ``KNNPostprocessor``): the L2-normalised penultimate features of the
  calibration images; an image's score is the Euclidean distance from its normalised features
  to the k-th nearest of them (higher = farther from the calibration data = more OOD). OpenOOD
  uses k = 50 for CIFAR-10/100 (its ``knn.yml``: 50 of 50,000 training images) and k = 1000
  for ImageNet-1k, with the *training* set's features. batchuq fits on the calibration folder,
  which is far smaller, so it keeps OpenOOD's CIFAR ratio instead of its k:
  ``k = round(images / 1000)``, at least 1 and at most 50 (``default_k``). A fixed k = 50 on
  the 269 bundled validation digits (27 per class) reaches into other classes, and the score
  degrades (``benchmarks/bench_ood.py`` sweeps k; docs/results.md shows it).
* ``ood_metrics``: the AUROC (``metrics.auroc``, average ranks) and the FPR at 95% TPR of a
  score that is higher for OOD images: the share of OOD images accepted at the threshold that
  keeps 95% of the in-distribution images: in-distribution as the positive class, as ODIN
  (Liang et al. 2018) and OpenOOD v1's ``fpr_recall`` define it. OpenOOD v1.5's evaluator
  (``auc_and_fpr_recall``) takes OOD as the positive class instead: the share of
  in-distribution images flagged at the threshold that flags 95% of the OOD ones, which is
  ``fpr_at_tpr(-scores, ~positives)``; its published FPR@95 figures are of that one.

The side file of a fitted index (``save_knn`` / ``load_knn``) is a compressed ``.npz`` next to
the calibration JSON, its features stored as float16 (a unit vector's entries to 3 decimal
digits: distances change by about 1e-3, far below the gaps the score is read at), with the
model's sha256; the JSON records its name and sha256, and loading checks both.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchuq import metrics
from batchuq.errors import CalibrationError, UsageError

#: OpenOOD's k for CIFAR-10 (Sun et al. 2022): the largest k ``default_k`` gives.
DEFAULT_KNN_K = 50
#: Calibration images per neighbour (OpenOOD on CIFAR-10: k = 50 of 50,000 training images).
KNN_IMAGES_PER_K = 1000
#: The TPR (share of in-distribution images kept) of the FPR@95.
FPR_TPR = 0.95
#: Per OOD score name as evaluate reports it: its column and sign (higher = more OOD).
OOD_COLUMN_SCORES = {
    "-max_logit": ("max_logit", -1.0),
    "energy": ("energy", 1.0),
    "knn_distance": ("knn_distance", 1.0),
    "gp_variance": ("gp_variance", 1.0),
}
_NORM_FLOOR = 1e-12


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), float32."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, _NORM_FLOOR)


@dataclass(frozen=True, eq=False)
class KnnIndex:
    """The normalised calibration features and k of the kNN score.

    Attributes:
        features: float32 ``(n, D)``, rows of unit norm (up to the float16 of the side file).
        k: Which nearest neighbour's distance is the score (1 = the nearest).
        model_sha256: The model the features came from.
    """

    features: np.ndarray
    k: int
    model_sha256: str

    def distances(self, features: np.ndarray) -> np.ndarray:
        """The distance of each row's normalised features to its k-th nearest calibration row.

        Args:
            features: ``(rows, D)`` penultimate features (any norm).

        Returns:
            float32 ``(rows,)``, in ``[0, 2]``.

        Raises:
            UsageError: If ``features`` does not have ``D`` columns.
        """
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise UsageError(
                f"`features` must be (rows, {self.features.shape[1]}). Received: "
                f"features.shape={features.shape}"
            )
        query = normalise(features).astype(np.float64)
        bank = self.features.astype(np.float64)
        squared = (
            (query**2).sum(axis=1)[:, None] + (bank**2).sum(axis=1)[None, :] - 2 * query @ bank.T
        )
        kth = np.partition(squared, self.k - 1, axis=1)[:, self.k - 1]
        return np.sqrt(np.maximum(kth, 0.0)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What the calibration JSON records of the index (besides its side file)."""
        return {
            "k": self.k,
            "images": int(self.features.shape[0]),
            "dim": int(self.features.shape[1]),
            "score": "distance to the k-th nearest L2-normalised calibration feature",
            "features": "input of the last Dense layer (SNGP: of the GP layer), mean over "
            "passes and TTA copies",
        }


def default_k(images: int) -> int:
    """k for a calibration set of ``images``: OpenOOD's CIFAR ratio (1 per 1000), in [1, 50]."""
    return max(1, min(DEFAULT_KNN_K, round(images / KNN_IMAGES_PER_K), images - 1))


def fit_knn(features: np.ndarray, model_sha256: str, k: int | None = None) -> KnnIndex:
    """Fit the kNN score on the calibration images' penultimate features.

    Args:
        features: ``(n, D)`` features of the calibration images (n >= 2).
        model_sha256: The model they came from.
        k: The neighbour; default ``default_k(n)``.

    Returns:
        The index.

    Raises:
        UsageError: If there are fewer than 2 rows, or ``k`` is not in ``[1, n]``.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UsageError(
            "The kNN score needs the features of at least 2 calibration images. "
            f"Received: features.shape={features.shape}"
        )
    n = features.shape[0]
    k = default_k(n) if k is None else int(k)
    if not 1 <= k <= n:
        raise UsageError(f"`k` must be in [1, {n}]. Received: k={k}")
    return KnnIndex(normalise(features), k, model_sha256)


def knn_side_path(json_path: str | os.PathLike[str]) -> Path:
    """The side file of a calibration JSON: ``cal.json`` -> ``cal.knn.npz``."""
    path = Path(json_path)
    return path.with_name(f"{path.stem}.knn.npz")


def save_knn(index: KnnIndex, json_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the index next to the calibration JSON (through a temporary file).

    Args:
        index: The fitted index.
        json_path: The calibration JSON it belongs to.

    Returns:
        The JSON's ``knn`` entry: ``describe()`` plus ``file`` (the side file's name, relative
        to the JSON) and its ``sha256``.
    """
    out = knn_side_path(json_path)
    handle, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".npz", dir=out.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez_compressed(
                stream,
                features=index.features.astype(np.float16),
                k=np.int64(index.k),
                model_sha256=np.str_(index.model_sha256),
            )
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return {**index.describe(), "file": out.name, "sha256": _sha256(out)}


def load_knn(
    entry: dict[str, Any], json_path: str | os.PathLike[str], model_sha256: str
) -> KnnIndex:
    """Read the index a calibration JSON's ``knn`` entry names, checked.

    Args:
        entry: The JSON's ``knn`` entry (``save_knn``).
        json_path: The calibration JSON (the side file is looked up next to it).
        model_sha256: The calibration's model.

    Returns:
        The index.

    Raises:
        CalibrationError: If the side file is missing, altered (sha256), or was made for
            another model or shape than the JSON says.
    """
    side = Path(json_path).with_name(str(entry["file"]))
    if not side.is_file():
        raise CalibrationError(
            f"The calibration's kNN features file is missing: it must sit next to the JSON. "
            f"Received: path={str(side)!r}"
        )
    if _sha256(side) != entry.get("sha256"):
        raise CalibrationError(
            "The calibration's kNN features file does not match its JSON (sha256 differs): "
            f"run `batchuq calibrate` again. Received: path={str(side)!r}"
        )
    with np.load(side, allow_pickle=False) as data:
        features = data["features"].astype(np.float32)
        k, owner = int(data["k"]), str(data["model_sha256"])
    shape = (int(entry["images"]), int(entry["dim"]))
    if owner != model_sha256 or features.shape != shape or k != int(entry["k"]):
        raise CalibrationError(
            "The calibration's kNN features file was made for another model or calibration. "
            f"Received: path={str(side)!r}, model_sha256={owner!r}, shape={features.shape}"
        )
    return KnnIndex(features, k, owner)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fpr_at_tpr(scores: np.ndarray, positives: np.ndarray, tpr: float = FPR_TPR) -> float:
    """The share of OOD images accepted at the threshold that keeps ``tpr`` of the others.

    An image is accepted (called in-distribution) when its score is at most the threshold;
    the threshold is the smallest score value at which at least ``tpr`` of the
    in-distribution images are accepted. Equal to ``fpr[argmax(tpr_curve >= tpr)]`` of
    ``sklearn.metrics.roc_curve(~positives, -scores)``.

    Args:
        scores: ``(n,)`` scores, higher = more OOD.
        positives: ``(n,)`` bool, True for the OOD images.
        tpr: The share of in-distribution images kept.

    Returns:
        The FPR, or NaN without images of both kinds.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    inside, outside = np.sort(scores[~positives]), scores[positives]
    if inside.size == 0 or outside.size == 0:
        return math.nan
    values = np.unique(inside)
    kept = np.searchsorted(inside, values, side="right") / inside.size
    threshold = values[np.argmax(kept >= tpr)]
    return float(np.mean(outside <= threshold))


def ood_metrics(scores: np.ndarray, positives: np.ndarray) -> dict[str, float | None]:
    """AUROC (OOD positive, average ranks) and FPR@95 of a score higher for OOD images.

    Args:
        scores: ``(n,)`` finite scores.
        positives: ``(n,)`` bool, True for the OOD images.

    Returns:
        ``{"auroc": ..., "fpr95": ...}``; ``None`` where undefined (one kind of image only, or
        a non-finite score).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if positives.all() or not positives.any() or not np.isfinite(scores).all():
        return {"auroc": None, "fpr95": None}
    return {
        "auroc": float(metrics.auroc(scores, positives)),
        "fpr95": fpr_at_tpr(scores, positives),
    }
