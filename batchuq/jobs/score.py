"""The score job: discover -> decode/augment -> sample -> summarise -> decide -> write.

``score_directory`` is the library entry point used by the CLI, notebooks and Airflow tasks. It
composes named steps: ``prepare_run`` (jobs/run.py) resolves the settings, then
``iter_sampled_batches`` (jobs/batches.py) yields samples, ``score_rows`` turns them into
columns, and a ``ParquetSink`` writes them atomically (or resumably, with a checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pyarrow as pa

from batchuq.augment import TTAConfig
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_ROWS,
    DEFAULT_MAX_PASSES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_MIN_PASSES,
    DEFAULT_PASSES,
    DEFAULT_PRECISION,
    DEFAULT_ROW_GROUP_SIZE,
    DEFAULT_SEED,
    DEFAULT_TTA,
    STATUS_OK,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
)
from batchuq.jobs.batches import SampledBatch, iter_sampled_batches
from batchuq.jobs.run import RunPlan, ScoreOptions, prepare_run
from batchuq.methods.base import MethodFactory, UncertaintyMethod
from batchuq.models import LoadedModel
from batchuq.postprocess.calibration_file import Calibration
from batchuq.postprocess.rules import DecisionRule, decide
from batchuq.postprocess.temperature import apply_temperature
from batchuq.summarise import Summary, mean_statistics, summarise_images
from batchuq.write import (
    CLASS_STATISTICS,
    SCORE_COLUMNS,
    Checkpoint,
    ParquetSink,
    check_output_path,
    output_schema,
    score_record_batch,
)

logger = logging.getLogger("batchuq")


@dataclass
class ScoreReport:
    """What a scoring run did.

    Attributes:
        output: The Parquet file written.
        images: Images found (= rows written).
        errors: Rows whose image could not be read (``status`` starts with ``error``).
        unclassified: Readable images the decision rule left unclassified.
        seconds: Wall time of the run.
        error_paths: Relative paths of the images that failed (first 1000).
        demo_model: Whether the run used the bundled demo model because none was given.
        skipped: Files left out because their extension is not an image's (see
            ``include_all``).
    """

    output: Path
    images: int = 0
    errors: int = 0
    unclassified: int = 0
    seconds: float = 0.0
    error_paths: list[str] = field(default_factory=list)
    demo_model: bool = False
    skipped: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput of the run."""
        return self.images / self.seconds if self.seconds > 0 else math.inf

    @property
    def error_rate(self) -> float:
        """Share of images that could not be read."""
        return self.errors / self.images if self.images else 0.0

    def summary_line(self) -> str:
        """One line for the end of a run; says so when the bundled demo model was used."""
        demo = " (bundled demo model)" if self.demo_model else ""
        return (
            f"{self.images} images, {self.unclassified} unclassified, {self.errors} errors, "
            f"{self.skipped} skipped, {self.seconds:.1f} s, {self.images_per_second:.1f} "
            f"images/s -> {self.output}{demo}"
        )

    def count(self, statuses: list[str], decisions: list[str | None] | np.ndarray) -> None:
        """Add rows to the error and unclassified counts (decisions: names or indices)."""
        self.errors += sum(1 for status in statuses if status != STATUS_OK)
        self.unclassified += sum(
            1
            for status, decision in zip(statuses, decisions, strict=True)
            if status == STATUS_OK and decision in (UNCLASSIFIED, UNCLASSIFIED_NAME)
        )


def score_directory(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | keras.Model | LoadedModel | None = None,
    passes: int | str = DEFAULT_PASSES,
    tta: TTAConfig | int = DEFAULT_TTA,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rule: DecisionRule | None = None,
    class_names: list[str] | None = None,
    labels: str | os.PathLike[str] | dict[str, str] | None = None,
    rescale: float | None = None,
    sample_layers: list[str] | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    precision: str = DEFAULT_PRECISION,
    logits: bool = False,
    resume: bool = False,
    checkpoint_rows: int = DEFAULT_CHECKPOINT_ROWS,
    follow_symlinks: bool = False,
    should_stop: Callable[[], bool] | None = None,
    save_samples: bool = False,
    calibration: str | os.PathLike[str] | Calibration | None = None,
    temperature: bool = False,
    allow_predictor_mismatch: bool = False,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
    include_all: bool = False,
    exif_transpose: bool | None = None,
    method: UncertaintyMethod | MethodFactory | None = None,
    min_passes: int = DEFAULT_MIN_PASSES,
    max_passes: int = DEFAULT_MAX_PASSES,
    adaptive_alpha: float = DEFAULT_ADAPTIVE_ALPHA,
) -> ScoreReport:
    """Score every image in a folder and write one Parquet row per image.

    Args:
        images: Folder of images: class subfolders (labelled) or flat (unlabelled).
        output: Parquet file to write (replaced atomically when the run completes).
        model: ``.keras`` path, a Keras model, or ``None`` for ``$BATCHUQ_MODEL`` or the
            bundled demo model.
        passes: MC dropout passes T per augmented copy (1 = deterministic), or ``"auto"``:
            rounds of ``min_passes`` per image until its decision is settled, at most
            ``max_passes`` (docs/methods.md, "Adaptive passes"); the ``passes`` column says
            how many each image got.
        tta: Test-time augmentation settings, or just the number of copies K.
        seed: Seed of all randomness; the same seed gives the same output.
        batch_size: Images per batch (results do not depend on it).
        rule: Decision rule (default: the MC median rule with ``min_median=0.5``).
        class_names: Names of the model outputs; they override the model's sidecar (with a
            warning).
        labels: A ``monkey_labels.txt``-style file (or dict) mapping folder ids to names.
        rescale: Factor applied to pixel values ``0..255``; ``None`` takes the value stored
            by ``batchuq train``, else 1 when the model starts with its own ``Rescaling`` or
            ``Normalization`` layer, else ``1/255`` (the metadata's ``rescale_source`` says).
        sample_layers: Name patterns of the dropout layers to sample (default: all).
        memory_budget_mb: Memory budget for one chunk of rows (images x TTA copies) and its tiled
            passes; peak memory grows with neither T nor K.
        max_pixels: Images with more pixels are refused (error row) before decoding.
        precision: ``float32``, or ``bfloat16`` for the sampled part of the network. On a
            CPU whose flags show no native bfloat16, ``bfloat16`` falls back to ``float32``
            with a warning (the metadata keeps both ``precision`` and ``precision_requested``).
        logits: The model outputs logits; apply a softmax to each pass.
        resume: Keep finished rows in ``OUTPUT.checkpoint/`` and, when it exists from an
            interrupted run with the same settings, skip the images already scored there.
        checkpoint_rows: With ``resume``, rows per checkpoint part.
        follow_symlinks: Follow symlinked folders and files that point outside ``images``
            (by default such files become error rows).
        should_stop: Polled before and after each batch's sampling; when it returns True the
            run raises ``StopRequested`` there, leaving no output (with ``resume``, finished
            rows stay in the checkpoint). The CLI's SIGTERM/SIGINT handlers use it, because
            an exception raised from a signal handler inside TensorFlow's C++ code can crash
            the process.
        save_samples: Add a ``samples`` column with each image's raw samples, shape
            ``(passes * tta, classes)`` in the same copy-major order (null for error rows);
            ``batchuq evaluate --report`` then draws their distribution per class. About
            ``4 * passes * tta * classes`` bytes per image before compression.
        calibration: A ``batchuq calibrate`` JSON (or ``Calibration``) made for this model:
            gives the ``threshold`` rule its thresholds and adds the conformal ``pred_set``.
        temperature: Rescale the MC mean with the calibration's temperature (``mean_*``,
            ``pred``, ``confidence``, ``margin``, ``entropy``); median, std, mutual information
            and variation ratio always describe the raw samples.
        allow_predictor_mismatch: Use a calibration fitted on another predictor (passes, TTA,
            augmentation, rescale, precision, sampled layers, logits, EXIF) than this run's,
            with a warning; by default that is a ``PredictorMismatchError`` (a ValueError).
        progress: Show a tqdm progress bar on stderr.
        settings: Where each setting came from, stored as the metadata's ``settings`` (the CLI
            passes ``{option: {"value": ..., "source": ...}}``; see ``config.settings_provenance``).
        include_all: Try every file, not only those with an image extension; files that are
            not images become error rows. Otherwise such files are counted as skipped.
        exif_transpose: Turn images upright by their EXIF orientation; ``None`` follows the
            model's sidecar (``batchuq train`` records its choice), else off, as Keras's loader.
        method: The uncertainty method (``batchuq.methods``), or a factory building it from
            the loaded model; default: MC dropout with ``passes``, ``sample_layers``,
            ``memory_budget_mb``, ``precision`` and ``logits``.
        min_passes: With ``passes="auto"``, passes every image gets and the size of a round.
        max_passes: With ``passes="auto"``, the most passes an image gets.
        adaptive_alpha: With ``passes="auto"``, the bound on the share of decisions that
            differ from those of unlimited passes.

    Returns:
        A ``ScoreReport``.

    Raises:
        NoImagesFoundError: If the folder holds no image.
        UsageError: For unusable folders, models, outputs or arguments (``ImagesFolderError``,
            ``ModelError``, ``NoDropoutError``, ``OutputError``, ...: see ``batchuq.errors``).
        StopRequested: When ``should_stop`` asks.
    """
    arguments = locals()  # the keywords, ScoreOptions' fields among them
    started = time.perf_counter()
    out_path = check_output_path(output, suffix=".parquet")
    options = ScoreOptions(**{f.name: arguments[f.name] for f in dataclasses.fields(ScoreOptions)})
    plan = prepare_run(images, options)
    report = ScoreReport(
        output=out_path,
        images=len(plan.discovery.files),
        demo_model=plan.loaded.bundled,
        skipped=len(plan.discovery.skipped),
    )
    _log_start(plan, out_path)
    with open_sink(plan, out_path, resume, checkpoint_rows) as sink:
        report.count(sink.done.statuses, sink.done.decisions)  # rows kept from a previous run
        todo = [i for i, path in enumerate(plan.relative_paths) if path not in sink.done.paths]
        if sink.done.paths:
            logger.info(
                "resuming: %d of %d images already scored", len(sink.done.paths), report.images
            )
        for batch in iter_sampled_batches(plan, todo, should_stop=should_stop, progress=progress):
            columns, decisions = score_rows(plan, batch, sink.schema)
            report.count(batch.statuses, decisions)
            _log_errors(report, plan, batch)
            sink.write(columns)
        report.seconds = time.perf_counter() - started
        sink.record_run(
            {
                "seconds": round(report.seconds, 3),
                "images_per_second": round(report.images_per_second, 3),
                "images": report.images,
                "errors": report.errors,
            }
        )
    _log_summary(report)
    return report


def score_rows(
    plan: RunPlan, batch: SampledBatch, schema: pa.Schema
) -> tuple[pa.RecordBatch, np.ndarray]:
    """Summarise, post-process and decide a batch: its Parquet columns and its decisions.

    Args:
        plan: The run.
        batch: A batch and its samples ``(batch, K * S, classes)``.
        schema: The run's Parquet schema (``run_schema``).

    Returns:
        The record batch to write and the ``(batch,)`` decisions (``UNCLASSIFIED`` = -1).
    """
    summary = summarise_images(batch.samples)
    calibration = plan.calibration
    # Conformal sets from the MC mean before any temperature, as calibrated.
    sets = calibration.prediction_sets(summary.mean) if calibration is not None else None
    if plan.temperature:
        summary = with_temperature(summary, calibration.temperature)
    decisions = decide(summary, plan.rule)
    files = [plan.discovery.files[i] for i in batch.positions]
    columns = score_record_batch(
        schema,
        plan.labels.class_names,
        paths=[f.relative_path for f in files],
        labels=[plan.labels.texts[i] for i in batch.positions],
        label_indices=[plan.labels.indices[i] for i in batch.positions],
        statuses=batch.statuses,
        pred_index=summary.pred,
        decision_index=decisions,
        stats={name: getattr(summary, name) for name in _STAT_FIELDS},
        pred_sets=sets,
        samples=batch.samples if plan.save_samples else None,
        passes=batch.passes,
    )
    return columns, decisions


_STAT_FIELDS = CLASS_STATISTICS + SCORE_COLUMNS  # the Summary fields written


def with_temperature(summary: Summary, temperature: float) -> Summary:
    """The summary with its mean-based fields recomputed from the temperature-scaled mean."""
    mean = apply_temperature(summary.mean.astype(np.float64), temperature)
    return dataclasses.replace(summary, mean=mean.astype(np.float32), **mean_statistics(mean))


def run_schema(plan: RunPlan) -> pa.Schema:
    """The Parquet schema of a run: its class names, optional columns and metadata."""
    return output_schema(
        plan.labels.class_names,
        plan.metadata,
        pred_set=plan.calibration is not None,
        samples_per_image=plan.samples_per_image if plan.save_samples else None,
        variable_samples=plan.adaptive is not None,
    )


def open_sink(plan: RunPlan, out_path: Path, resume: bool, checkpoint_rows: int) -> ParquetSink:
    """The sink of a run: atomic, and with ``resume`` backed by a checkpoint of finished rows."""
    # Rows wait in memory until a row group is full; with raw samples, cap a group at ~64 MiB.
    row_bytes = 4 * plan.samples_per_image * len(plan.labels.class_names)
    group_rows = DEFAULT_ROW_GROUP_SIZE
    if plan.save_samples:
        group_rows = max(16, min(group_rows, (64 << 20) // row_bytes))
    checkpoint = None
    if resume:
        # What decides the rows; not when the run started or where each setting came from.
        fingerprint = {k: v for k, v in plan.metadata.items() if k not in ("created", "settings")}
        files = "\0".join(plan.relative_paths).encode()
        fingerprint["files"] = hashlib.sha256(files).hexdigest()
        checkpoint = Checkpoint(out_path, fingerprint, min(checkpoint_rows, group_rows))
    return ParquetSink(out_path, run_schema(plan), row_group_size=group_rows, checkpoint=checkpoint)


def _log_start(plan: RunPlan, out_path: Path) -> None:
    count = len(plan.discovery.files)
    logger.info(
        "scoring %d images from %s",
        count,
        plan.images,
        extra={
            "event": "start",
            "data": {
                "images": count,
                "output": str(out_path),
                "model": str(plan.loaded.path),
                "passes": plan.metadata.get("passes"),
                "tta": plan.tta.copies,
                "seed": plan.seed,
            },
        },
    )


def _log_errors(report: ScoreReport, plan: RunPlan, batch: SampledBatch) -> None:
    """Log every unreadable image of a batch and keep the first 1000 paths in the report."""
    for position, status in zip(batch.positions, batch.statuses, strict=True):
        if status == STATUS_OK:
            continue
        path = plan.discovery.files[position].relative_path
        if len(report.error_paths) < 1000:
            report.error_paths.append(path)
        logger.warning(
            "%s: %s",
            path,
            status,
            extra={"event": "image_error", "data": {"path": path, "status": status}},
        )


def _log_summary(report: ScoreReport) -> None:
    logger.info(
        report.summary_line(),
        extra={
            "event": "summary",
            "data": {
                "images": report.images,
                "errors": report.errors,
                "unclassified": report.unclassified,
                "seconds": round(report.seconds, 3),
                "images_per_second": round(report.images_per_second, 3),
                "output": str(report.output),
                "demo_model": report.demo_model,
                "skipped": report.skipped,
            },
        },
    )
