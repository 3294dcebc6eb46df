"""Rows of a scoring run, shared by its engines (local and Ray): from samples to Parquet.

``score_rows`` turns a sampled batch into its Parquet columns and decisions; ``run_schema`` is
the file's schema, metadata included, with the ``engine`` that wrote it; ``checkpoint_fingerprint``
is what a ``--resume`` checkpoint must match, whichever engine made it; ``ScoreReport`` and the
``log_*`` functions give the same summary line and JSON events (``start``, ``image_error``,
``summary``) whichever engine ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchuq.defaults import (
    DEFAULT_ROW_GROUP_SIZE,
    STATUS_OK,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
)
from batchuq.jobs.score.batches import SampledBatch
from batchuq.jobs.score.plan import RunPlan
from batchuq.output.schema import (
    CLASS_STATISTICS,
    OOD_COLUMNS,
    SCORE_COLUMNS,
    output_schema,
    score_record_batch,
)
from batchuq.postprocess.rules import decide
from batchuq.postprocess.temperature import apply_temperature
from batchuq.summarise import Summary, mean_statistics, summarise_images

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
        certificate: With ``--rule risk``, the guarantee of its selective threshold
            (``SelectiveCertificate.statement``), stated at the end of the summary line.
    """

    output: Path
    images: int = 0
    errors: int = 0
    unclassified: int = 0
    seconds: float = 0.0
    error_paths: list[str] = field(default_factory=list)
    demo_model: bool = False
    skipped: int = 0
    certificate: str | None = None

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
            + (f"; risk rule: {self.certificate}" if self.certificate else "")
        )

    def count(self, statuses: list[str], decisions: list[str | None] | np.ndarray) -> None:
        """Add rows to the error and unclassified counts (decisions: names or indices)."""
        self.errors += sum(1 for status in statuses if status != STATUS_OK)
        self.unclassified += sum(
            1
            for status, decision in zip(statuses, decisions, strict=True)
            if status == STATUS_OK and decision in (UNCLASSIFIED, UNCLASSIFIED_NAME)
        )


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
    files = [plan.discovery.files[i] for i in batch.positions]
    paths = [f.relative_path for f in files]  # randomised sets: U per (seed, path)
    sets = (
        None if calibration is None else calibration.prediction_sets(summary.mean, paths, plan.seed)
    )
    if plan.temperature:
        summary = with_temperature(summary, calibration.temperature)
    decisions = decide(summary, plan.rule)
    columns = score_record_batch(
        schema,
        plan.labels.class_names,
        paths=paths,
        labels=[plan.labels.texts[i] for i in batch.positions],
        label_indices=[plan.labels.indices[i] for i in batch.positions],
        statuses=batch.statuses,
        pred_index=summary.pred,
        decision_index=decisions,
        stats={name: getattr(summary, name) for name in _STAT_FIELDS} | ood_scores(plan, batch),
        pred_sets=sets,
        samples=batch.samples if plan.save_samples else None,
        passes=batch.passes,
    )
    return columns, decisions


def ood_columns(plan: RunPlan) -> list[str]:
    """The OOD columns of a run: the method's scalar extras among ``OOD_COLUMNS``, and
    ``knn_distance`` when the calibration has a kNN index and the method gives features."""
    extras = set(plan.method.extras)
    knn = plan.calibration is not None and plan.calibration.knn is not None
    if knn and "features" in extras:
        extras.add("knn_distance")
    return [name for name in OOD_COLUMNS if name in extras]


def ood_scores(plan: RunPlan, batch: SampledBatch) -> dict[str, np.ndarray]:
    """A batch's OOD columns (``ood_columns``): the extras averaged per image, and the kNN
    distance of each image's features (``postprocess.ood.KnnIndex.distances``)."""
    scores = {name: batch.extras[name] for name in OOD_COLUMNS if name in batch.extras}
    if "knn_distance" in ood_columns(plan):
        scores["knn_distance"] = plan.calibration.knn.distances(batch.extras["features"])
    return scores


_STAT_FIELDS = CLASS_STATISTICS + SCORE_COLUMNS  # the Summary fields written


def with_temperature(summary: Summary, temperature: float) -> Summary:
    """The summary with its mean-based fields recomputed from the temperature-scaled mean."""
    mean = apply_temperature(summary.mean.astype(np.float64), temperature)
    return dataclasses.replace(summary, mean=mean.astype(np.float32), **mean_statistics(mean))


def run_schema(plan: RunPlan, engine: str = "local") -> pa.Schema:
    """The Parquet schema of a run: its class names, optional columns and metadata.

    Args:
        plan: The run.
        engine: ``local`` or ``ray``: recorded as the metadata's ``engine``, the one field in
            which the two engines' files differ (besides the creation time and the run record).

    Returns:
        The schema, its ``batchuq`` metadata being ``plan.metadata`` plus ``engine``.
    """
    return output_schema(
        plan.labels.class_names,
        {**plan.metadata, "engine": engine},
        pred_set=plan.calibration is not None,
        samples_per_image=plan.samples_per_image if plan.save_samples else None,
        variable_samples=plan.adaptive is not None,
        ood_columns=ood_columns(plan),
    )


def row_group_rows(plan: RunPlan) -> int:
    """Rows per Parquet row group: ``DEFAULT_ROW_GROUP_SIZE``, or ~64 MiB with raw samples."""
    # Rows wait in memory until a row group is full; with raw samples, cap a group at ~64 MiB.
    row_bytes = 4 * plan.samples_per_image * len(plan.labels.class_names)
    group_rows = DEFAULT_ROW_GROUP_SIZE
    if plan.save_samples:
        group_rows = max(16, min(group_rows, (64 << 20) // row_bytes))
    return group_rows


def checkpoint_fingerprint(plan: RunPlan) -> dict[str, Any]:
    """What a ``--resume`` checkpoint must have been made with: what decides the rows.

    Not when the run started, where each setting came from, nor which engine wrote the rows
    (the engine is not in ``plan.metadata``), so that a run resumes the other engine's parts.
    """
    fingerprint = {k: v for k, v in plan.metadata.items() if k not in ("created", "settings")}
    files = "\0".join(plan.relative_paths).encode()
    fingerprint["files"] = hashlib.sha256(files).hexdigest()
    return fingerprint


def rule_certificate(plan: RunPlan) -> str | None:
    """The run's ``--rule risk`` certificate statement, or ``None`` for another rule."""
    selective = plan.rule.selective if plan.rule.name == "risk" else None
    return None if selective is None else selective.statement


def log_start(plan: RunPlan, out_path: Path) -> None:
    """Say how many images are scored from which folder: the one discovery scored (inside a
    Kaggle-style wrapper, not the wrapper given on the command line)."""
    count = len(plan.discovery.files)
    logger.info(
        "scoring %d images from %s",
        count,
        plan.discovery.root,
        extra={
            "event": "start",
            "data": {
                "images": count,
                "folder": plan.discovery.root,
                "output": str(out_path),
                "model": str(plan.loaded.path),
                "passes": plan.metadata.get("passes"),
                "tta": plan.tta.copies,
                "seed": plan.seed,
            },
        },
    )


def log_resuming(done: int, images: int) -> None:
    """Say how many of the images a checkpoint already holds (nothing when none)."""
    if done:
        logger.info("resuming: %d of %d images already scored", done, images)


def log_unreadable(plan: RunPlan, positions: Sequence[int], statuses: Sequence[str]) -> list[str]:
    """Log every unreadable image of a batch, one warning each: ``<path>: error: <reason>``.

    Shared by ``score`` and ``calibrate``, so that both name each file the same way (JSON
    event ``image_error`` with ``path`` and ``status``).

    Args:
        plan: The run.
        positions: ``(batch,)`` indices of the images in ``plan.discovery.files``.
        statuses: ``(batch,)`` ``ok`` or ``error: ...`` per image.

    Returns:
        The relative paths of the unreadable images, in batch order.
    """
    unreadable = []
    for position, status in zip(positions, statuses, strict=True):
        if status == STATUS_OK:
            continue
        path = plan.discovery.files[position].relative_path
        unreadable.append(path)
        logger.warning(
            "%s: %s",
            path,
            status,
            extra={"event": "image_error", "data": {"path": path, "status": status}},
        )
    return unreadable


def log_image_errors(
    report: ScoreReport, plan: RunPlan, positions: Sequence[int], statuses: Sequence[str]
) -> None:
    """Log every unreadable image of a batch and keep the first 1000 paths in the report.

    Args:
        report: The run's report.
        plan: The run.
        positions: ``(batch,)`` indices of the images in ``plan.discovery.files``.
        statuses: ``(batch,)`` ``ok`` or ``error: ...`` per image.
    """
    for path in log_unreadable(plan, positions, statuses):
        if len(report.error_paths) < 1000:
            report.error_paths.append(path)


def log_summary(report: ScoreReport) -> None:
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
