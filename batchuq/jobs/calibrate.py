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
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchuq.defaults import DEFAULT_PASSES
from batchuq.metrics import nll
from batchuq.postprocess.calibration import *  # noqa: F403 (being split)
from batchuq.postprocess.calibration import (
    _check_fraction,
    _conformal_warnings,
    _check_method,
    _thresholds_from_predictions,
)
from batchuq.postprocess.rules import UNCLASSIFIED

if TYPE_CHECKING:
    import keras

    from batchuq.models import LoadedModel


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
    from batchuq.postprocess.rules import DecisionRule
    from batchuq.models import as_loaded_model
    from batchuq.sample import NoDropoutError
    from batchuq.jobs.score import score_directory
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
