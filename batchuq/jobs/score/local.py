"""The local engine of the score job: every step in this process, a batch at a time.

``score_locally`` composes named steps: ``prepare_run`` (``plan``) resolves the settings, then
``iter_sampled_batches`` (``batches``) yields samples, ``score_rows`` (``rows``) turns them into
columns, and a ``ParquetSink`` writes them atomically (or resumably, with a checkpoint). The Ray
engine (``ray_engine``) runs the same steps on a cluster, with the same rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from batchuq.errors import OutputError
from batchuq.jobs.score.batches import iter_sampled_batches
from batchuq.jobs.score.options import RunControl, ScoreOptions
from batchuq.jobs.score.plan import RunPlan, prepare_run
from batchuq.jobs.score.rows import (
    ScoreReport,
    checkpoint_fingerprint,
    log_image_errors,
    log_resuming,
    log_start,
    log_summary,
    row_group_rows,
    rule_certificate,
    run_schema,
    score_rows,
)
from batchuq.output.history import (
    Partition,
    check_partition_output,
    partition_checkpoint,
    partition_folders,
)
from batchuq.output.paths import check_output_path, is_folder_output
from batchuq.output.sink import Checkpoint, ParquetSink


def score_locally(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: ScoreOptions,
    control: RunControl,
    partition: Partition | None = None,
) -> ScoreReport:
    """The local engine: score the images in this process, a batch at a time, in path order.

    Args:
        images: The images folder.
        output: The Parquet file to write, or with ``partition`` the history folder.
        options: What decides the rows.
        control: Resume, stop requests, progress and the start time.
        partition: Write the rows to this partition of the history folder ``output``
            (``output/KEY=VALUE/part-0.parquet``, ``batchuq.output.history``).

    Returns:
        A ``ScoreReport``.

    Raises:
        OutputError: If ``output`` is a folder (ending in ``/``) without ``partition``: only
            the Ray engine writes a folder dataset.
    """
    if partition is not None:
        out_path = check_partition_output(output, partition)
    elif is_folder_output(output):
        raise OutputError(
            "A folder OUTPUT (ending in /) is written by the Ray engine only (--engine ray), "
            "or is a history folder with --partition KEY=VALUE; the local engine writes one "
            f".parquet file. Received: output={str(output)!r}"
        )
    else:
        out_path = check_output_path(output, suffix=".parquet")
    plan = prepare_run(images, options, settings=control.settings)
    if partition is not None:
        plan.metadata["partition"] = partition.as_metadata()
        with partition_folders(out_path):
            return _score_plan(plan, out_path, control, partition_checkpoint(output, partition))
    return _score_plan(plan, out_path, control, None)


def _score_plan(
    plan: RunPlan, out_path: Path, control: RunControl, checkpoint: Path | None
) -> ScoreReport:
    """Score ``plan``'s images into ``out_path`` (``checkpoint``: where ``--resume`` keeps rows)."""
    report = ScoreReport(
        output=out_path,
        images=len(plan.discovery.files),
        demo_model=plan.loaded.bundled,
        skipped=len(plan.discovery.skipped),
        certificate=rule_certificate(plan),
    )
    log_start(plan, out_path)
    with open_sink(plan, out_path, control, checkpoint) as sink:
        report.count(sink.done.statuses, sink.done.decisions)  # rows kept from a previous run
        todo = [i for i, path in enumerate(plan.relative_paths) if path not in sink.done.paths]
        log_resuming(len(sink.done.paths), report.images)
        batches = iter_sampled_batches(
            plan, todo, should_stop=control.should_stop, progress=control.progress
        )
        for batch in batches:
            columns, decisions = score_rows(plan, batch, sink.schema)
            report.count(batch.statuses, decisions)
            log_image_errors(report, plan, batch.positions, batch.statuses)
            sink.write(columns)
        report.seconds = time.perf_counter() - control.started
        sink.record_run(
            {
                "seconds": round(report.seconds, 3),
                "images_per_second": round(report.images_per_second, 3),
                "images": report.images,
                "errors": report.errors,
            }
        )
    log_summary(report)
    return report


def open_sink(
    plan: RunPlan, out_path: Path, control: RunControl, folder: Path | None = None
) -> ParquetSink:
    """The sink of a run: atomic, and with ``control.resume`` backed by a checkpoint of finished
    rows, kept in ``folder`` (default: ``OUTPUT.checkpoint/``)."""
    group_rows = row_group_rows(plan)
    checkpoint = None
    if control.resume:
        fingerprint = checkpoint_fingerprint(plan)
        rows = min(control.checkpoint_rows, group_rows)
        order = plan.relative_paths
        checkpoint = Checkpoint(out_path, fingerprint, rows, order=order, folder=folder)
    return ParquetSink(out_path, run_schema(plan), row_group_size=group_rows, checkpoint=checkpoint)
