"""The calibrate job: fit thresholds, a temperature and conformal sets on a labelled folder.

``batchuq calibrate VAL_IMAGES -o calibration.json`` samples the model over a labelled folder
with two predictors (docs/methods.md, "Calibration" and "Conformal prediction sets"):

* the **threshold predictor** (``tta`` copies, default 100, ``passes`` per copy, default 1)
  gives one probability vector per augmented copy, from which ``postprocess.thresholds`` takes
  each class's validation threshold;
* the **scoring predictor** (``score_passes``, ``score_tta``: what ``batchuq score`` computes)
  gives each image's MC mean, exactly the ``mean_*`` values ``score`` writes; the temperature
  (``postprocess.temperature``) and the conformal quantiles (``postprocess.conformal``) are fitted
  on it, because the coverage guarantee of conformal sets rests on calibration and test scores
  being exchangeable: scores of another predictor are not.

The scoring predictor is whatever ``score`` runs: any method (MC dropout's mean, a deep
ensemble's averaged probabilities, SNGP's mean-field probabilities: the temperature rescales
that mean), and with ``score_passes="auto"`` the adaptive predictor of ``score --passes auto``,
stopping as the rule ``score`` will use (``score_rule``, recorded in the predictor). The
thresholds of ``--rule threshold --temperature`` are fitted on the scoring predictor's tempered
means (``postprocess.thresholds.tempered_mean_thresholds``), the quantity that pair compares.

When both predictors are the same, one pass over the folder serves both. The samples come
straight from ``iter_sampled_batches``, the same step ``score`` uses; the result is written by
``postprocess.calibration_file``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchuq import checks
from batchuq.augment import TTAConfig
from batchuq.classes import DEFAULT_CLASS_ORDER
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIBRATION_PASSES,
    DEFAULT_CALIBRATION_TTA,
    DEFAULT_CONFORMAL,
    DEFAULT_DELTA,
    DEFAULT_MAX_PASSES,
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_MEDIAN,
    DEFAULT_MIN_PASSES,
    DEFAULT_PASSES,
    DEFAULT_PERCENTILE,
    DEFAULT_PRECISION,
    DEFAULT_RISK_SCORE,
    DEFAULT_RULE,
    DEFAULT_SEED,
    DEFAULT_TTA,
    UNCLASSIFIED,
)
from batchuq.errors import NoDropoutError, UsageError
from batchuq.jobs.score.batches import iter_sampled_batches
from batchuq.jobs.score.options import ModelsArg, ScoreOptions
from batchuq.jobs.score.plan import (
    RunPlan,
    discover,
    load_for_run,
    prepare_run,
)
from batchuq.jobs.score.rows import log_unreadable
from batchuq.metrics import nll
from batchuq.output.paths import check_output_path
from batchuq.postprocess.calibration_file import (
    Calibration,
    CalibrationWarning,
    predictor_from_metadata,
)
from batchuq.postprocess.conformal import (
    ConformalFit,
    check_method,
    conformal_level,
    conformal_warnings,
    fit_conformal,
)
from batchuq.postprocess.ood import KnnIndex, fit_knn
from batchuq.postprocess.rules import (
    RISK_SCORES,
    DecisionRule,
    SelectiveRule,
    check_adaptive_calibration,
    risk_scores,
    threshold_decisions,
)
from batchuq.postprocess.selective import fit_selective_threshold
from batchuq.postprocess.temperature import TEMPERATURE_BOUNDS, apply_temperature, fit_temperature
from batchuq.postprocess.thresholds import tempered_mean_thresholds, thresholds_from_predictions
from batchuq.summarise import summarise_images

logger = logging.getLogger("batchuq")

_CONFORMAL_SCORE = {
    "lac": "1 - p_y of the MC mean (one quantile for all classes)",
    "class": "1 - p_y of the MC mean (one quantile per true class)",
    "aps": "total MC-mean probability of the classes ranked at or above y (not randomised)",
    "aps-random": "total MC-mean probability of the classes ranked at or above y, minus U p_y "
    "(U uniform per image and seed)",
    "raps": "aps-random score plus lambda max(0, rank of y - k_reg) (settings.conformal_params)",
}


@dataclass(frozen=True)
class ValidationSamples:
    """What the fit needs from the runs over the validation folder.

    Attributes:
        keep: ``(images,)`` bool: readable, with a label among the model's classes.
        labels: ``(images,)`` float64 class index of each image's label (NaN: none).
        mean_probs: ``(images, classes)`` the scoring predictor's MC mean (float32, as written
            by ``score``, widened to float64).
        copy_pred, copy_conf: ``(images, copies)`` each augmented copy's predicted class and
            its probability, under the threshold predictor.
        unreadable: Relative paths of the images that could not be read (each logged once).
        pred: ``(images,)`` the scoring predictor's ``pred`` (argmax of the MC mean), as
            ``score`` writes it.
        risk_scores: Per name of ``RISK_SCORES``, ``(images,)`` that score of the scoring
            predictor (``rules.risk_scores``: the Parquet columns' float32 values).
        features: ``(images, D)`` the scoring predictor's penultimate features per image (the
            method's ``features`` extra), or ``None`` when the method gives none.
    """

    keep: np.ndarray
    labels: np.ndarray
    mean_probs: np.ndarray
    copy_pred: np.ndarray
    copy_conf: np.ndarray
    unreadable: list[str] = dataclasses.field(default_factory=list)
    pred: np.ndarray | None = None
    risk_scores: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    features: np.ndarray | None = None


@dataclass(frozen=True)
class CalibrateOptions:
    """What decides a calibration: its two predictors and the fit.

    The threshold predictor is ``tta`` (copies and augmentation) x ``passes``; the scoring
    predictor ``score_tta`` copies (same augmentation) x ``score_passes``, as ``batchuq score
    --tta score_tta --passes score_passes`` computes it. Both share the model, seed,
    augmentation, rescale, sampled layers, precision, logits and EXIF handling.

    Attributes:
        model: ``.keras`` path, Keras model, ``LoadedModel``, or ``None`` for
            ``$BATCHUQ_MODEL`` or the bundled demo model.
        tta: The threshold predictor's test-time augmentation: copies per image (default 100,
            as in docs/methods.md) and the augmentation of both predictors (the scoring
            predictor's only matters when ``score_tta > 1``); a number is just the copies.
        passes: MC dropout passes per copy for the thresholds (default 1: plain TTA).
        score_passes: MC passes of the scoring predictor (default: ``score``'s, 100), or
            ``"auto"``: the adaptive predictor of ``score --passes auto`` with ``min_passes``,
            ``max_passes``, ``adaptive_alpha`` and stopping by ``score_rule``.
        score_tta: TTA copies of the scoring predictor (default: ``score``'s, 1).
        conformal: ``lac`` (default), ``class`` or ``aps`` (see ``postprocess.conformal``).
        percentile: Percentile of the threshold (default 10).
        alpha: Miscoverage of the conformal sets (default 0.1).
        seed: Seed of augmentation and dropout.
        batch_size: Images per batch.
        class_names: As for ``ScoreOptions``.
        labels: As for ``ScoreOptions``.
        class_order: As for ``ScoreOptions``.
        allow_class_mismatch: As for ``ScoreOptions``.
        rescale: As for ``ScoreOptions``.
        sample_layers: As for ``ScoreOptions``.
        precision: As for ``ScoreOptions``.
        logits: As for ``ScoreOptions``.
        exif_transpose: As for ``ScoreOptions``.
        target_risk: Fit the selective threshold of ``score --rule risk`` for this selective
            risk (``fit_selective_threshold``; default ``None``: not fitted).
        delta: The certificate's failure probability (default 0.1).
        risk_score: The score the selective threshold is on, one of ``RISK_SCORES``.
        min_passes: With ``score_passes="auto"``: as ``score --min-passes``.
        max_passes: With ``score_passes="auto"``: as ``score --max-passes``.
        adaptive_alpha: With ``score_passes="auto"``: as ``score --adaptive-alpha``.
        score_rule: With ``score_passes="auto"``: the ``score --rule`` the calibration is for,
            which decides when the adaptive predictor stops (``rules.stopping_record``):
            ``median``, ``confidence``, ``none`` or ``risk`` (``none`` and ``risk`` stop
            alike, once ``pred`` is settled). Not ``threshold``: its stopping would need the
            thresholds this calibration fits on that predictor. Ignored with a number of
            passes (the predictor does not depend on the rule then).
        min_median: With ``score_rule="median"``: as ``score --min-median``.
        min_confidence: With ``score_rule="confidence"``: as ``score --min-confidence``.

    Raises:
        UsageError: For counts below 1, a percentile outside [0, 100], alpha, target_risk or
            delta outside (0, 1), an unknown conformal method or risk score, or adaptive
            settings that ``score --passes auto`` would refuse (or ``score_rule="threshold"``).
    """

    model: ModelsArg = None
    tta: TTAConfig = field(default_factory=lambda: TTAConfig(copies=DEFAULT_CALIBRATION_TTA))
    passes: int = DEFAULT_CALIBRATION_PASSES
    score_passes: int = DEFAULT_PASSES
    score_tta: int = DEFAULT_TTA
    conformal: str = DEFAULT_CONFORMAL
    percentile: float = DEFAULT_PERCENTILE
    alpha: float = DEFAULT_ALPHA
    seed: int = DEFAULT_SEED
    batch_size: int = DEFAULT_BATCH_SIZE
    class_names: list[str] | None = None
    labels: str | os.PathLike[str] | dict[str, str] | None = None
    class_order: str = DEFAULT_CLASS_ORDER
    allow_class_mismatch: bool = False
    rescale: float | None = None
    sample_layers: list[str] | None = None
    precision: str = DEFAULT_PRECISION
    logits: bool = False
    exif_transpose: bool | None = None
    target_risk: float | None = None
    delta: float = DEFAULT_DELTA
    risk_score: str = DEFAULT_RISK_SCORE
    min_passes: int = DEFAULT_MIN_PASSES
    max_passes: int = DEFAULT_MAX_PASSES
    adaptive_alpha: float = DEFAULT_ADAPTIVE_ALPHA
    score_rule: str = DEFAULT_RULE
    min_median: float = DEFAULT_MIN_MEDIAN
    min_confidence: float = DEFAULT_MIN_CONFIDENCE

    def __post_init__(self) -> None:
        if self.target_risk is not None:
            checks.fraction(self.target_risk, "target_risk")
        checks.fraction(self.delta, "delta")
        checks.one_of(self.risk_score, "risk_score", RISK_SCORES)
        if not isinstance(self.tta, TTAConfig):  # just the copies: the default augmentation
            _check_count("tta", self.tta)
            object.__setattr__(self, "tta", TTAConfig(copies=int(self.tta)))
        for name in ("passes", "score_tta", "batch_size"):
            _check_count(name, getattr(self, name))
        if self.score_passes == "auto":
            check_adaptive_calibration(self.score_rule)
        else:
            _check_count("score_passes", self.score_passes)
        if not 0.0 <= float(self.percentile) <= 100.0:
            raise UsageError(
                f"`percentile` must be in [0, 100]. Received: percentile={self.percentile}"
            )
        if not 0.0 < float(self.alpha) < 1.0:
            raise UsageError(f"`alpha` must be in (0.0, 1.0). Received: alpha={float(self.alpha)}")
        check_method(self.conformal)

    def predictors(self) -> tuple[ScoreOptions, ScoreOptions]:
        """The scoring and the threshold predictor, as score options."""
        shared = ScoreOptions(
            model=self.model,
            seed=self.seed,
            batch_size=self.batch_size,
            rule=DecisionRule("none"),
            class_names=self.class_names,
            labels=self.labels,
            class_order=self.class_order,
            allow_class_mismatch=self.allow_class_mismatch,
            rescale=self.rescale,
            sample_layers=self.sample_layers,
            precision=self.precision,
            logits=self.logits,
            exif_transpose=self.exif_transpose,
        )
        auto = self.score_passes == "auto"
        scoring = dataclasses.replace(
            shared,
            passes="auto" if auto else int(self.score_passes),
            tta=dataclasses.replace(self.tta, copies=int(self.score_tta)),
            min_passes=int(self.min_passes),
            max_passes=int(self.max_passes),
            adaptive_alpha=float(self.adaptive_alpha),
            # With auto, the rule decides when sampling stops: score's (risk stops as none).
            rule=DecisionRule(
                "none" if not auto or self.score_rule == "risk" else self.score_rule,
                self.min_median,
                self.min_confidence,
            ),
        )
        threshold = dataclasses.replace(shared, passes=int(self.passes), tta=self.tta)
        return scoring, threshold


def _check_count(name: str, value: Any) -> None:
    if int(value) != value or value < 1:
        raise UsageError(f"`{name}` must be an integer >= 1. Received: {name}={value}")


def calibrate_directory(
    val_images: str | os.PathLike[str],
    output_json: str | os.PathLike[str] | None,
    options: CalibrateOptions | None = None,
    *,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> Calibration:
    """Fit thresholds, a temperature and conformal quantiles on a labelled folder.

    Samples ``val_images`` (class subfolders) with two predictors (``CalibrateOptions``):

    * the threshold predictor, ``tta`` copies x ``passes`` MC passes per copy: the thresholds
      use one vector per copy (the mean of its passes);
    * the scoring predictor, ``score_tta`` copies x ``score_passes`` passes, as ``batchuq
      score --tta score_tta --passes score_passes`` computes it: the temperature and the
      conformal quantiles use its per-image MC mean, exactly the ``mean_*`` values ``score``
      writes (and builds ``pred_set`` from).

    When they are the same predictor one run serves both. Images that could not be read (each
    named in a warning, as ``score`` does) or have no label among the model's classes are
    skipped.

    Example::

        calibrate_directory("val", "cal.json", CalibrateOptions(tta=TTAConfig(copies=20)))

    Args:
        val_images: Labelled validation folder (one subfolder per class).
        output_json: Where to write the calibration JSON (``None``: do not write).
        options: The predictors and the fit (default: ``CalibrateOptions()``).
        progress: Show a progress bar.
        settings: Extra record stored as ``settings["options"]`` (the CLI passes each option's
            value and source).

    Returns:
        The ``Calibration`` (also written to ``output_json``).

    Raises:
        UsageError: For an unwritable output, an unusable model or folder, or no usable
            labelled images (see ``batchuq.errors``).
        NoImagesFoundError: If the folder holds no image.
    """
    started = time.perf_counter()
    options = options if options is not None else CalibrateOptions()
    if output_json is not None:
        check_output_path(output_json)
    scoring_plan, threshold_plan = _plans(val_images, *options.predictors())
    data = collect_samples(scoring_plan, threshold_plan, progress)
    record = _settings(scoring_plan, threshold_plan, options.sample_layers, settings)
    record |= {
        "percentile": float(options.percentile),
        "alpha": float(options.alpha),
        "conformal": options.conformal,
    }
    record["conformal_score"] = _CONFORMAL_SCORE[options.conformal]
    if options.target_risk is not None:
        record["target_risk"] = float(options.target_risk)
        record["delta"] = float(options.delta)
        record["risk_score"] = options.risk_score
    calibration = fit_calibration(data, scoring_plan, threshold_plan, record)
    calibration.knn = fit_ood_knn(data, calibration.model_sha256)
    calibration.stats["seconds"] = round(time.perf_counter() - started, 3)
    if output_json is not None:
        calibration.to_json(output_json)
    return calibration


def _plans(
    val_images: str | os.PathLike[str], scoring: ScoreOptions, threshold: ScoreOptions
) -> tuple[RunPlan, RunPlan]:
    """The two predictors' plans over one discovery and one loaded model (one plan if equal).

    The threshold plan resolves the model, class names, labels and rescale as the scoring plan
    does: what that says (e.g. "The model scales pixels itself") is said once.
    """
    discovery = discover(val_images, scoring)
    members = load_for_run(scoring.model)
    with _said_once():
        try:
            scoring_plan = prepare_run(val_images, scoring, discovery=discovery, models=members)
        except NoDropoutError as exc:
            raise NoDropoutError(
                f"{exc} (for calibrate: --score-passes, the scoring predictor's passes)"
            ) from None
        if (threshold.passes, threshold.tta) == (scoring.passes, scoring.tta):
            return scoring_plan, scoring_plan
        threshold_plan = prepare_run(
            val_images, threshold, discovery=discovery, models=members, announce=False
        )
    return scoring_plan, threshold_plan


class _Repeats(logging.Filter):
    """Drops a log record whose message was already logged while the filter was on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the record's message is new."""
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


@contextmanager
def _said_once() -> Iterator[None]:
    """Within the block, batchuq logs each message once (repeats are dropped)."""
    repeats = _Repeats()
    logger.addFilter(repeats)
    try:
        yield
    finally:
        logger.removeFilter(repeats)


def collect_samples(
    scoring_plan: RunPlan, threshold_plan: RunPlan, progress: bool = False
) -> ValidationSamples:
    """Run the predictors over the folder and keep what the fit needs (not the samples).

    Args:
        scoring_plan: The scoring predictor's run.
        threshold_plan: The threshold predictor's run (may be ``scoring_plan`` itself).
        progress: Show progress bars.

    Returns:
        Per image: usable or not, label, MC mean, and every copy's prediction and confidence.
    """
    n = len(scoring_plan.discovery.files)
    classes = len(scoring_plan.labels.class_names)
    copies, passes = threshold_plan.tta.copies, threshold_plan.method.samples_per_row
    ok = np.zeros(n, dtype=bool)
    mean_probs = np.zeros((n, classes), dtype=np.float64)
    mean_pred = np.zeros(n, dtype=np.int64)
    scores = {name: np.full(n, np.nan) for name in RISK_SCORES}
    copy_pred = np.zeros((n, copies), dtype=np.int64)
    copy_conf = np.zeros((n, copies), dtype=np.float64)
    unreadable: list[str] = []
    features: np.ndarray | None = None
    plans = [scoring_plan] if threshold_plan is scoring_plan else [scoring_plan, threshold_plan]
    for plan in plans:
        for batch in iter_sampled_batches(plan, progress=progress, desc="calibrating"):
            index = np.asarray(batch.positions)
            if plan is scoring_plan:  # the float32 means `score` writes and builds sets from
                summary = summarise_images(batch.samples)  # (adaptive: samples per image)
                mean_probs[index] = summary.mean
                mean_pred[index] = summary.pred
                for name in RISK_SCORES:
                    scores[name][index] = risk_scores(summary, name)
                ok[index] = batch.ok
                unreadable += log_unreadable(plan, batch.positions, batch.statuses)
                features = _keep_features(features, batch.extras.get("features"), index, n)
            if plan is threshold_plan:
                b = len(index)
                per_copy = batch.samples.reshape(b, copies, passes, classes)
                per_copy = per_copy.mean(axis=2, dtype=np.float64)  # (b, copies, classes)
                pred = per_copy.argmax(axis=2)
                copy_pred[index] = pred
                copy_conf[index] = np.take_along_axis(per_copy, pred[..., None], axis=2)[..., 0]
    label_index = np.array(
        [np.nan if i is None else i for i in scoring_plan.labels.indices], dtype=np.float64
    )
    keep = ok & ~np.isnan(label_index)
    return ValidationSamples(
        keep,
        label_index,
        np.clip(mean_probs, 0.0, 1.0),
        copy_pred,
        copy_conf,
        unreadable,
        pred=mean_pred,
        risk_scores=scores,
        features=features,
    )


def _keep_features(
    features: np.ndarray | None, batch: np.ndarray | None, index: np.ndarray, n: int
) -> np.ndarray | None:
    """Store a batch's per-image features (``(batch, D)``) at its rows of ``(n, D)``."""
    if batch is None:
        return features
    if features is None:
        features = np.zeros((n, batch.shape[1]), dtype=np.float32)
    features[index] = batch
    return features


def fit_ood_knn(data: ValidationSamples, model_sha256: str) -> KnnIndex | None:
    """The kNN OOD score fitted on the kept images' features (``postprocess.ood.fit_knn``).

    Args:
        data: What the scoring predictor gave on the validation images.
        model_sha256: The calibrated model.

    Returns:
        The index, or ``None`` when the method gives no features or fewer than 2 images
        were kept.
    """
    if data.features is None or int(data.keep.sum()) < 2:
        return None
    return fit_knn(data.features[data.keep], model_sha256)


def fit_calibration(
    data: ValidationSamples,
    scoring_plan: RunPlan,
    threshold_plan: RunPlan,
    settings: dict[str, Any],
) -> Calibration:
    """Fit thresholds, temperature and conformal quantiles on the collected samples.

    Args:
        data: What the predictors gave on the validation images.
        scoring_plan, threshold_plan: The two predictors' runs.
        settings: The calibration's settings record; its ``percentile``, ``alpha`` and
            ``conformal`` drive the fit, and ``target_risk`` (with ``delta`` and
            ``risk_score``), when present, the selective threshold.

    Returns:
        The calibration (its ``stats`` lack only ``seconds``).

    Raises:
        UsageError: If no readable image has a label among the model's classes, or the
            calibration images cannot certify ``target_risk`` (the message says how many
            accepted images it would need).
    """
    names = list(scoring_plan.labels.class_names)
    conformal, percentile, alpha = settings["conformal"], settings["percentile"], settings["alpha"]
    if not data.keep.any():
        raise UsageError(
            "No readable validation image has a label among the model's classes; calibrate "
            "needs a folder with one subfolder per class named like the model's classes "
            f"{names}. Received: val_images={scoring_plan.images!r}"
        )
    y = data.labels[data.keep].astype(np.int64)
    probs = data.mean_probs[data.keep]
    thresholds, copies_predicted = thresholds_from_predictions(
        data.copy_pred[data.keep].ravel(),
        np.clip(data.copy_conf[data.keep].ravel(), 0.0, 1.0),
        len(names),
        percentile,
    )
    temperature = fit_temperature(probs, y)
    # For --rule threshold --temperature: fitted on the tempered MC mean that pair compares.
    tempered_thresholds = tempered_mean_thresholds(probs, temperature, percentile)[0]
    paths = [scoring_plan.discovery.files[i].relative_path for i in np.flatnonzero(data.keep)]
    fitted = fit_conformal(probs, y, alpha, conformal, paths, scoring_plan.seed)
    quantiles = fitted.quantiles
    if fitted.params:
        settings["conformal_params"] = fitted.params
    selective = None
    if settings.get("target_risk") is not None:
        selective = fit_selective(data, y, settings)
    per_class = np.bincount(y, minlength=len(names))
    notes = conformal_warnings(conformal, alpha, per_class, names, quantiles)
    for note in notes:
        warnings.warn(note, CalibrationWarning, stacklevel=3)
    stats = {
        "images": int(data.keep.sum()),
        "skipped": int((~data.keep).sum()),
        "unreadable": len(data.unreadable),
        "images_per_class": per_class.tolist(),
        "copies_predicted": copies_predicted.tolist(),
        **_fit_stats(probs, y, thresholds, temperature, fitted, conformal, alpha, paths),
        "runs": 1 if scoring_plan is threshold_plan else 2,
        "warnings": notes,
    }
    predictor = predictor_from_metadata(_as_written(scoring_plan.metadata))
    return Calibration(
        class_names=names,
        thresholds=thresholds,
        temperature=temperature,
        conformal_quantiles=quantiles,
        model_sha256=scoring_plan.metadata["model_sha256"],
        conformal_method=conformal,
        predictor=predictor,
        threshold_predictor=predictor_from_metadata(_as_written(threshold_plan.metadata)),
        model_path=scoring_plan.metadata["model_path"],
        settings=settings,
        stats=stats,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        selective=selective,
        tempered_thresholds=tempered_thresholds,
    )


def fit_selective(
    data: ValidationSamples, y: np.ndarray, settings: dict[str, Any]
) -> SelectiveRule:
    """The selective threshold of ``score --rule risk``, on the scoring predictor's MC mean.

    Each kept image's ``settings["risk_score"]`` and whether its ``pred`` (argmax of the MC
    mean, as ``score`` writes it) equals its label go to ``fit_selective_threshold`` with
    ``target_risk`` and ``delta``. No temperature: ``score --rule risk`` compares the
    untempered scores (and refuses ``--temperature``).

    Args:
        data: What the scoring predictor gave on the validation images.
        y: The kept images' labels.
        settings: ``target_risk``, ``delta`` and ``risk_score``.

    Returns:
        The fitted rule, with its certificate and statement.

    Raises:
        UsageError: If the calibration images cannot certify ``target_risk``.
    """
    name = settings["risk_score"]
    correct = data.pred[data.keep] == y
    threshold, certificate = fit_selective_threshold(
        data.risk_scores[name][data.keep], correct, settings["target_risk"], settings["delta"]
    )
    return SelectiveRule(
        score=name,
        threshold=float(threshold),
        statement=certificate.statement(),
        certificate=dataclasses.asdict(certificate),
    )


def _as_written(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata as a Parquet file of the run would hold it (JSON types)."""
    return json.loads(json.dumps(metadata, sort_keys=True))


def _fit_stats(
    probs: np.ndarray,
    y: np.ndarray,
    thresholds: np.ndarray,
    temperature: float,
    fitted: ConformalFit,
    conformal: str,
    alpha: float,
    paths: list[str],
) -> dict[str, Any]:
    """How the fit did on the validation images themselves."""
    pred = probs.argmax(axis=1)
    accepted = threshold_decisions(pred, probs[np.arange(len(y)), pred], thresholds) != UNCLASSIFIED
    sets = fitted.sets(probs, paths)
    at_bound = min(abs(math.log(temperature / b)) for b in TEMPERATURE_BOUNDS) < 1e-4
    return {
        "accuracy": float(np.mean(pred == y)),
        "nll_before": nll(probs, y),
        "nll_after": nll(apply_temperature(probs, temperature), y),
        "temperature_at_bound": bool(at_bound),
        "threshold_coverage": float(accepted.mean()),
        "threshold_accuracy": float(np.mean(pred[accepted] == y[accepted]))
        if accepted.any()
        else None,
        "conformal_level": None if conformal == "class" else conformal_level(len(y), alpha),
        "conformal_coverage": float(sets[np.arange(len(y)), y].mean()),
        "mean_set_size": float(sets.sum(axis=1).mean()),
        "empty_sets": int((sets.sum(axis=1) == 0).sum()),
    }


def _settings(
    scoring_plan: RunPlan,
    threshold_plan: RunPlan,
    sample_layers: list[str] | None,
    options: dict[str, Any] | None,
) -> dict[str, Any]:
    """The calibration's settings record, in the order the file has always listed them."""
    fitted = dict(scoring_plan.metadata)
    return {
        "val_images": scoring_plan.images,
        "tta": threshold_plan.tta.copies,
        "passes": threshold_plan.method.samples_per_row,
        "score_passes": "auto"
        if scoring_plan.adaptive is not None
        else scoring_plan.method.samples_per_row,
        "score_tta": scoring_plan.tta.copies,
        "percentile": None,  # set by calibrate_directory; here to keep the file's order
        "alpha": None,
        "conformal": None,
        "seed": scoring_plan.seed,
        "augmentation": threshold_plan.tta.as_metadata(),
        "rescale": fitted.get("rescale"),
        "sample_layers": sample_layers,
        "sampled_layers": fitted.get("sampled_layers"),
        "precision": fitted.get("precision"),
        "logits": fitted.get("logits"),
        "threshold_grouping": "predicted class of each augmented copy",
        "temperature_bounds": list(TEMPERATURE_BOUNDS),
        "temperature_fitted_on": "MC mean of the scoring predictor",
        "tempered_thresholds_fitted_on": "tempered MC mean of the scoring predictor, per image",
        "conformal_score": None,
        "options": options,
    }
