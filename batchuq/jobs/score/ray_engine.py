"""The Ray engine (``batchuq score --engine ray``): the score job on Ray Data, same rows.

Steps, on the driver:

1. ``prepare_run`` as for the local engine: discovery, the model (for the metadata: its sha256,
   class names, the method's settings), the schema with ``engine: ray``.
2. The parts folder: ``OUTPUT.checkpoint/`` with ``--resume`` (the local engine's checkpoint,
   either engine resumes the other's), else a hidden temporary folder beside the output. The
   images not yet in it are cut, in path order, into parts of ``checkpoint_rows`` images.
3. A Ray Dataset of those parts (``from_items``, one block per part) goes through
   ``map_batches`` with ``ray_worker.PartScorer``, a callable class: an actor pool of
   ``workers`` actors reserving ``cpus_per_worker`` CPUs each, every actor loading the model
   once. Actors decode with batchuq's own decoder (bad files become error rows; Ray's
   ``read_images`` would abort the job on one) and write each part as a part file. Ray restarts
   a killed actor and retries its part (``TASK_RETRIES`` times), which rewrites the same file.
4. The driver counts the parts' summaries as they finish: progress bar, ``image_error`` events,
   ``should_stop`` polled between parts.
5. The parts are compacted on the driver, streaming, sorted by path position with one row per
   image, into ``OUTPUT`` (one file) or ``OUTPUT/`` (a folder dataset), atomically.

Ray is imported only here, and only when a run asks for this engine.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
from tqdm.auto import tqdm

from batchuq.errors import StopRequested, UsageError
from batchuq.jobs.score.estimate import count_parts, run_estimate
from batchuq.jobs.score.options import RaySettings, RunControl, ScoreOptions
from batchuq.jobs.score.plan import RunPlan, prepare_run
from batchuq.jobs.score.ray_session import ray_session
from batchuq.jobs.score.ray_worker import PartJob, PartScorer, threads_for
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
)
from batchuq.methods.base import UncertaintyMethod
from batchuq.models import LoadedModel
from batchuq.output.paths import check_output_folder, check_output_path, is_folder_output
from batchuq.output.sink import Checkpoint, write_file_from_parts, write_folder_from_parts

logger = logging.getLogger("batchuq")

# Retries of a part whose actor died (Ray restarts dead actors without limit). A part that
# kills its worker this many times over fails the run rather than looping forever.
TASK_RETRIES = 3
INSTALL_HINT = 'pip install "batchuq[ray]"'


@dataclass(frozen=True)
class OutputTarget:
    """Where a Ray run's rows end up.

    Attributes:
        path: The Parquet file, or the folder dataset (``folder``).
        folder: Whether the output is a folder of part files (``OUT/``).
    """

    path: Path
    folder: bool

    @classmethod
    def check(cls, output: str | os.PathLike[str]) -> OutputTarget:
        """Check ``output`` before any work (a string ending in ``/`` is a folder).

        Raises:
            OutputError: If it cannot be written.
        """
        if is_folder_output(output):
            return cls(check_output_folder(output), folder=True)
        return cls(check_output_path(output, suffix=".parquet"), folder=False)


def import_ray() -> ModuleType:
    """Import Ray (and Ray Data), or say how to install it.

    Raises:
        UsageError: If the ``ray`` extra is not installed.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"The Ray engine needs Ray: {INSTALL_HINT} ({exc}). Received: engine='ray'"
        ) from None
    return ray


def score_with_ray(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: ScoreOptions,
    control: RunControl,
    settings: RaySettings,
) -> ScoreReport:
    """Score every image in ``images`` on Ray and write the local engine's rows to ``output``.

    Args:
        images: The images folder (every Ray node must see it at the same path).
        output: The Parquet file, or a folder dataset as a string ending in ``/``; the parts
            folder beside it must be writable from every node.
        options: What decides the rows; the model given as a path (or ``None``).
        control: Resume, stop requests, progress and the start time.
        settings: Cluster address, workers and CPUs per worker.

    Returns:
        A ``ScoreReport``, as the local engine's.

    Raises:
        UsageError: If Ray is not installed, for unusable options or outputs, or a model or
            method given as an object (each worker loads its own).
        StopRequested: When ``control.should_stop`` asks (between parts).
    """
    ray = import_ray()
    target = OutputTarget.check(output)
    check_shippable(options)
    plan = prepare_run(images, options, settings=control.settings)
    schema = run_schema(plan, "ray")
    report = ScoreReport(
        output=target.path,
        images=len(plan.discovery.files),
        demo_model=plan.loaded.bundled,
        skipped=len(plan.discovery.skipped),
        certificate=rule_certificate(plan),
    )
    log_start(plan, target.path)
    checkpoint = open_parts_folder(plan, target.path, control)
    try:
        report.count(checkpoint.done.statuses, checkpoint.done.decisions)
        done = checkpoint.done.paths
        todo = [i for i, path in enumerate(plan.relative_paths) if path not in done]
        log_resuming(len(done), report.images)
        job = PartJob.for_workers(
            plan, options, schema, checkpoint.fingerprint, checkpoint.folder,
            threads=threads_for(settings.cpus_per_worker), imports=settings.imports,
        )  # fmt: skip
        ray_record = run_parts(ray, job, plan, todo, settings, control, report)
        report.seconds = time.perf_counter() - control.started
        estimate = run_estimate(plan)  # from the parts, each image once (sorted_parts' rule)
        count_parts(estimate, plan, checkpoint.parts())
        report.estimated_accuracy = None if estimate is None else estimate.as_metadata()
        finalise(target, checkpoint, plan, schema, run_record(report, ray_record))
    finally:
        if not control.resume:
            shutil.rmtree(checkpoint.folder, ignore_errors=True)
    if control.resume:
        checkpoint.remove()
    log_summary(report)
    return report


def check_shippable(options: ScoreOptions) -> None:
    """Refuse what cannot be sent to Ray workers: models and methods as live objects.

    Raises:
        UsageError: If ``options.model`` holds a Keras model or ``options.method`` a built
            method (each worker loads the model itself, from its path).
    """
    models = options.model if isinstance(options.model, (list, tuple)) else [options.model]
    if any(isinstance(m, (keras.Model, LoadedModel)) for m in models):
        raise UsageError(
            "The Ray engine loads the model in each worker: give it as a path, not a loaded "
            "model. Received: model=<keras.Model>"
        )
    if isinstance(options.method, UncertaintyMethod):
        raise UsageError(
            "The Ray engine builds the method in each worker: give a factory (e.g. the class), "
            f"not a built method. Received: method={type(options.method).__name__}(...)"
        )


def open_parts_folder(plan: RunPlan, out_path: Path, control: RunControl) -> Checkpoint:
    """The folder the workers write parts to, opened, with the rows it already holds.

    With ``resume`` it is the local engine's checkpoint ``OUTPUT.checkpoint/``; otherwise a
    hidden temporary folder beside the output, removed when the run ends.

    Raises:
        CheckpointError: If the checkpoint was made by a run with other settings or files.
    """
    folder = None if control.resume else out_path.with_name(f".{out_path.name}.parts-{os.getpid()}")
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    checkpoint = Checkpoint(
        out_path,
        checkpoint_fingerprint(plan),
        control.checkpoint_rows,
        order=plan.relative_paths,
        folder=folder,
    )
    checkpoint.open()
    return checkpoint


def run_parts(
    ray: ModuleType,
    job: PartJob,
    plan: RunPlan,
    todo: list[int],
    settings: RaySettings,
    control: RunControl,
    report: ScoreReport,
) -> dict[str, Any]:
    """Score the images at ``todo`` on Ray, part by part, counting into ``report``.

    Returns:
        What the run record keeps of the Ray run: version, workers, CPUs per worker, parts
        scored and how many of them each node scored.
    """
    record: dict[str, Any] = {"ray_version": ray.__version__, "parts": 0}
    if not todo:
        return record
    with ray_session(ray, settings.address):
        workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = part_size(len(todo), workers, control.checkpoint_rows, plan.batch_size)
        parts = [todo[start : start + rows] for start in range(0, len(todo), rows)]
        workers = min(workers, len(parts))
        record["parts"] = len(parts)
        dataset = parts_dataset(ray, job, parts, workers, settings.cpus_per_worker)
        nodes, processes = collect_parts(dataset, plan, len(todo), control, report)
    record |= {"workers": workers, "cpus_per_worker": settings.cpus_per_worker}
    record["actor_processes"] = processes  # above workers when Ray restarted an actor
    record["parts_per_node"] = dict(sorted(nodes.items()))
    return record


def part_size(images: int, workers: int, most: int, batch_size: int) -> int:
    """Images per part: ``most`` (``--checkpoint-rows``), or fewer when that would leave workers
    without a part, in whole batches so that batches are cut as the local engine cuts them.

    Args:
        images: Images to score.
        workers: Actors in the pool.
        most: The largest part.
        batch_size: Images per batch.

    Returns:
        The part size, at least 1.
    """
    share = -(-images // workers)  # every worker gets a part
    share = -(-share // batch_size) * batch_size
    return max(1, min(most, share))


def parts_dataset(
    ray: ModuleType, job: PartJob, parts: list[list[int]], workers: int, cpus: float
) -> Any:
    """The Ray Dataset of part summaries: one block per part, mapped by a pool of actors."""
    items = [{"positions": part} for part in parts]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # Ray 2.60 warns that the retry options will become named parameters in 2.64.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return dataset.map_batches(
            PartScorer,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            batch_format="pyarrow",
            # One part at a time per actor: a part is seconds to minutes of work, and Ray
            # Data's default queue of several would hand every part to the first actor ready.
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=cpus,
            max_restarts=-1,
            max_task_retries=TASK_RETRIES,
        )


def collect_parts(
    dataset: Any, plan: RunPlan, todo: int, control: RunControl, report: ScoreReport
) -> tuple[Counter[str], int]:
    """Run the dataset, counting each finished part once into ``report``.

    Returns:
        Parts scored per Ray node id, and how many actor processes scored them.

    Raises:
        StopRequested: When ``control.should_stop`` asks (checked between parts).
    """
    files = len(plan.discovery.files)
    nodes: Counter[str] = Counter()
    seen: set[int] = set()
    pids: set[tuple[str, int]] = set()
    bar = tqdm(
        total=files, initial=files - todo, unit="img", disable=not control.progress,
        desc="scoring", leave=False,
    )  # fmt: skip
    _stop_if_asked(control)
    summaries = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        with bar:
            for summary in summaries:
                for part in summary.to_pylist():
                    if part["first"] in seen:  # a part returned twice: counted once
                        continue
                    seen.add(part["first"])
                    report.errors += len(part["error_positions"])
                    report.unclassified += part["unclassified"]
                    log_image_errors(report, plan, part["error_positions"], part["error_statuses"])
                    nodes[part["node"]] += 1
                    pids.add((part["node"], part["pid"]))
                    bar.update(part["rows"])
                _stop_if_asked(control)
    finally:
        summaries.close()  # stops the pipeline and its actors now, also after a stop request
    return nodes, len(pids)


def _stop_if_asked(control: RunControl) -> None:
    if control.should_stop is not None and control.should_stop():
        raise StopRequested()


def run_record(report: ScoreReport, ray_record: dict[str, Any]) -> dict[str, Any]:
    """The footer's run record: the local engine's fields, and the Ray run's as ``ray``."""
    return {
        "seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 3),
        "images": report.images,
        "errors": report.errors,
        "ray": ray_record,
    } | (
        {}
        if report.estimated_accuracy is None
        else {"estimated_accuracy": report.estimated_accuracy}
    )


def finalise(
    target: OutputTarget,
    checkpoint: Checkpoint,
    plan: RunPlan,
    schema: Any,
    record: dict[str, Any],
) -> None:
    """Compact the parts, sorted and one row per image, into the output, atomically.

    Raises:
        RuntimeError: If an image has no row in the parts.
    """
    rows = checkpoint.sorted_parts()
    group_rows = row_group_rows(plan)
    if target.folder:
        per_file = min(checkpoint.rows_per_part, group_rows)
        write_folder_from_parts(
            rows, target.path, schema, rows_per_file=per_file, group_rows=group_rows,
            run_record=record,
        )  # fmt: skip
    else:
        write_file_from_parts(rows, target.path, schema, group_rows=group_rows, run_record=record)
