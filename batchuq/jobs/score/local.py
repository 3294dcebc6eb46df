"""The score job: discover -> decode/augment -> sample -> summarise -> decide -> write.

``score_directory`` is the library entry point used by the CLI, notebooks and Airflow tasks. It
composes named steps: ``prepare_run`` (``plan``) resolves the settings, then
``iter_sampled_batches`` (``batches``) yields samples, ``score_rows`` (``rows``) turns
them into columns, and a ``ParquetSink`` writes them atomically (or resumably, with a
checkpoint). That is the local engine; ``engine="ray"`` runs the same steps on a Ray cluster
(``ray_engine``), with the same rows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras

from batchuq.augment import TTAConfig
from batchuq.classes import DEFAULT_CLASS_ORDER
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_ROWS,
    DEFAULT_CPUS_PER_WORKER,
    DEFAULT_MAX_PASSES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_MIN_PASSES,
    DEFAULT_PASSES,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_TTA,
)
from batchuq.errors import OutputError, UsageError
from batchuq.jobs.score.batches import iter_sampled_batches
from batchuq.jobs.score.plan import RunPlan, ScoreOptions, prepare_run
from batchuq.jobs.score.rows import (
    RunControl,
    ScoreReport,
    checkpoint_fingerprint,
    log_image_errors,
    log_resuming,
    log_start,
    log_summary,
    row_group_rows,
    run_schema,
    score_rows,
)
from batchuq.methods.base import MethodFactory, UncertaintyMethod
from batchuq.models import LoadedModel
from batchuq.postprocess.calibration_file import Calibration
from batchuq.postprocess.rules import DecisionRule
from batchuq.write import Checkpoint, ParquetSink, check_output_path, is_folder_output


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
    class_order: str = DEFAULT_CLASS_ORDER,
    allow_class_mismatch: bool = False,
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
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER,
    worker_imports: Sequence[str] = (),
) -> ScoreReport:
    """Score every image in a folder and write one Parquet row per image.

    Args:
        images: Folder of images: class subfolders (labelled) or flat (unlabelled).
        output: Parquet file to write (replaced atomically when the run completes). With
            ``engine="ray"`` also a folder, given as a string ending in ``/``: a dataset of
            part files that pandas, pyarrow and DuckDB read as one table.
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
            warning). Precedence: ``class_names``, the sidecar, the class folders when as many
            as outputs (numbered in ``class_order``), ``0 .. C-1`` (``batchuq.classes``).
        labels: A ``monkey_labels.txt``-style file (or dict) mapping folder ids to names; it
            renames classes and fixes no order.
        class_order: How class folders are numbered when they give the class names: ``keras``
            (``sorted()``, as ``keras.utils.image_dataset_from_directory``) or ``natural``
            (``n2`` before ``n10``). A notice says which when the two differ.
        allow_class_mismatch: Score labelled class folders that nothing maps onto the model's
            outputs (a folder of other classes, for OOD); by default that is a
            ``ClassMismatchError``.
        rescale: Factor applied to pixel values ``0..255``; ``None`` takes the value stored
            by ``batchuq train``, else 1 when the model starts with its own ``Rescaling`` or
            ``Normalization`` layer, else ``1/255`` (the metadata's ``rescale_source`` says).
        sample_layers: Name patterns of the dropout layers to sample (default: all).
        memory_budget_mb: Memory budget for one chunk of rows (images x TTA copies) and its tiled
            passes; peak memory grows with neither T nor K.
        max_pixels: Images with more pixels are refused (error row) before decoding.
        precision: ``float32``, or ``bfloat16`` for the sampled part of the network. Where
            bfloat16 is not native (the CPU's flags, oneDNN's ``ONEDNN_MAX_CPU_ISA`` cap) or a
            bfloat16 probe fails, it falls back to ``float32`` with a warning (the metadata
            keeps both ``precision`` and ``precision_requested``).
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
            ``memory_budget_mb``, ``precision`` and ``logits``. With ``engine="ray"``, a
            factory (each worker builds its own method), not a built method.
        min_passes: With ``passes="auto"``, passes every image gets and the size of a round.
        max_passes: With ``passes="auto"``, the most passes an image gets.
        adaptive_alpha: With ``passes="auto"``, the bound on the share of decisions that
            differ from those of unlimited passes.
        engine: ``local`` scores in this process; ``ray`` on a Ray cluster, with the same rows
            (see ``batchuq.jobs.score.ray_engine``; needs ``pip install "batchuq[ray]"``).
        ray_address: With ``ray``: the cluster to connect to; default ``$RAY_ADDRESS``, else a
            Ray started on this machine for the run. A Ray already initialised in this process
            is used as it is.
        workers: With ``ray``: how many actors score, each loading the model once; default
            one per CPU of the cluster.
        cpus_per_worker: With ``ray``: the CPUs Ray books for each actor (TensorFlow runs on
            that many threads, rounded up). Below 1, actors never book every CPU, which keeps
            CPUs for Ray's own tasks and other jobs on the cluster.
        worker_imports: With ``ray``: modules (names or ``.py`` paths) each worker imports
            before loading the model, so that custom layers registered there load (the CLI
            passes its ``--import``).

    Returns:
        A ``ScoreReport``.

    Raises:
        NoImagesFoundError: If the folder holds no image.
        UsageError: For unusable folders, models, outputs or arguments (``ImagesFolderError``,
            ``ModelError``, ``NoDropoutError``, ``OutputError``, ...: see ``batchuq.errors``).
        StopRequested: When ``should_stop`` asks.
    """
    arguments = locals()  # the keywords, ScoreOptions' fields among them
    control = RunControl(resume, checkpoint_rows, should_stop, progress)
    options = ScoreOptions(**{f.name: arguments[f.name] for f in dataclasses.fields(ScoreOptions)})
    if engine == "ray":
        from batchuq.jobs.score.ray_engine import RaySettings, score_with_ray

        ray_settings = RaySettings(ray_address, workers, cpus_per_worker, tuple(worker_imports))
        return score_with_ray(images, output, options, control, ray_settings)
    if engine != "local":
        raise UsageError(f"`engine` must be local or ray. Received: engine={engine!r}")
    return score_locally(images, output, options, control)


def score_locally(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: ScoreOptions,
    control: RunControl,
) -> ScoreReport:
    """The local engine: score the images in this process, a batch at a time, in path order.

    Args:
        images: The images folder.
        output: The Parquet file to write.
        options: What decides the rows.
        control: Resume, stop requests, progress and the start time.

    Returns:
        A ``ScoreReport``.

    Raises:
        OutputError: If ``output`` is a folder (ending in ``/``): only the Ray engine writes one.
    """
    if is_folder_output(output):
        raise OutputError(
            "A folder OUTPUT (ending in /) is written by the Ray engine only (--engine ray); "
            f"the local engine writes one .parquet file. Received: output={str(output)!r}"
        )
    out_path = check_output_path(output, suffix=".parquet")
    plan = prepare_run(images, options)
    report = ScoreReport(
        output=out_path,
        images=len(plan.discovery.files),
        demo_model=plan.loaded.bundled,
        skipped=len(plan.discovery.skipped),
    )
    log_start(plan, out_path)
    with open_sink(plan, out_path, control.resume, control.checkpoint_rows) as sink:
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


def open_sink(plan: RunPlan, out_path: Path, resume: bool, checkpoint_rows: int) -> ParquetSink:
    """The sink of a run: atomic, and with ``resume`` backed by a checkpoint of finished rows."""
    group_rows = row_group_rows(plan)
    checkpoint = None
    if resume:
        fingerprint = checkpoint_fingerprint(plan)
        rows = min(checkpoint_rows, group_rows)
        checkpoint = Checkpoint(out_path, fingerprint, rows, order=plan.relative_paths)
    return ParquetSink(out_path, run_schema(plan), row_group_size=group_rows, checkpoint=checkpoint)
