"""The Ray engine's worker: an actor that scores whole parts and writes each as a part file.

Ray Data runs ``PartScorer`` as a pool of actors (``map_batches`` with a callable class). Each
actor builds the run's plan once, loading the model once, through the same ``prepare_run`` and
uncertainty method as the local engine, but with the files the driver discovered. For each part
(a list of image positions, in path order) it runs ``iter_sampled_batches`` and ``score_rows`` as
the local engine does, writes the rows as one part file named by the part's first image
(``compact.part_name_at``: a retried part replaces its file, never adds a second one) and returns
a one-row summary from which the driver counts, logs and shows progress.

This module imports no Ray: the actor is a plain class, and Ray Data makes it an actor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import tensorflow as tf

from batchuq.compact import part_name_at, write_part_file
from batchuq.defaults import STATUS_OK
from batchuq.discover import Discovery
from batchuq.jobs.score.batches import iter_sampled_batches
from batchuq.jobs.score.options import ScoreOptions
from batchuq.jobs.score.plan import RunPlan, prepare_run
from batchuq.jobs.score.rows import ScoreReport, checkpoint_fingerprint, score_rows
from batchuq.model_files import MODEL_ENV, import_user_modules
from batchuq.storage import is_url

# Fingerprint entries that spell paths, which a worker may see under other names (its own
# working directory, its own install of the bundled model): the model's sha256 covers the model.
PATH_KEYS = ("images", "images_root", "model_path", "members")

# What an actor returns for each part it scored: one row.
PART_SUMMARY = pa.schema(
    [
        pa.field("first", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("unclassified", pa.int64()),
        pa.field("error_positions", pa.list_(pa.int64())),
        pa.field("error_statuses", pa.list_(pa.string())),
        pa.field("node", pa.string()),
        pa.field("pid", pa.int64()),
    ]
)


@dataclass(frozen=True)
class PartJob:
    """What every actor of a run needs, sent once to each.

    Every path in it is absolute: a worker's working directory is not the driver's.

    Attributes:
        images: The images folder.
        options: What decides the rows (the model as a path, so that each actor loads it).
        discovery: The files the driver discovered, in path order (positions index them).
        schema: The output schema, the driver's metadata included: every part carries it.
        fingerprint: The driver's ``checkpoint_fingerprint``: an actor whose plan differs (another
            model file, library version or CPU precision on its node) refuses to score.
        folder: Where the part files go (a folder every node can write, on a cluster).
        threads: TensorFlow threads per actor (intra-op), ``ceil(cpus_per_worker)``.
        imports: Modules to import before loading the model (``--import``).
        cwd: The driver's working directory, where module names of ``imports`` are looked up.
    """

    images: str
    options: ScoreOptions
    discovery: Discovery
    schema: pa.Schema
    fingerprint: dict[str, Any]
    folder: str
    threads: int = 1
    imports: tuple[str, ...] = ()
    cwd: str = ""

    @classmethod
    def for_workers(
        cls,
        plan: RunPlan,
        options: ScoreOptions,
        schema: pa.Schema,
        fingerprint: dict[str, Any],
        folder: Path,
        *,
        threads: int = 1,
        imports: Sequence[str] = (),
    ) -> PartJob:
        """The job of a run, every path made absolute (the model, calibration, labels and
        images as the driver resolved them).

        Args:
            plan: The driver's plan.
            options: The run's options.
            schema: The output schema.
            fingerprint: The driver's checkpoint fingerprint (after a JSON round trip).
            folder: The parts folder.
            threads: TensorFlow threads per actor.
            imports: ``--import`` modules (names, or ``.py`` paths).

        Returns:
            The job.
        """
        files = [dataclasses.replace(f, path=_absolute(f.path)) for f in plan.discovery.files]
        discovery = dataclasses.replace(
            plan.discovery, root=_absolute(plan.discovery.root), files=files
        )
        model = options.model if options.model is not None else os.environ.get(MODEL_ENV)
        worker_options = dataclasses.replace(
            options,
            model=_absolute(model),
            calibration=_absolute(options.calibration),
            labels=_absolute(options.labels),
        )
        modules = tuple(
            os.path.abspath(m) if m.endswith(".py") or os.sep in m else m for m in imports
        )
        return cls(
            _absolute(plan.images), worker_options, discovery, schema, fingerprint,
            str(folder.resolve()), threads, modules, os.getcwd(),
        )  # fmt: skip


class PartScorer:
    """Scores parts of a run in a Ray actor: the model is loaded once, in ``__init__``.

    Args:
        job: The run, as the driver resolved it.

    Raises:
        RuntimeError: If this actor's plan differs from the driver's in what decides the rows.
    """

    def __init__(self, job: PartJob) -> None:
        limit_tensorflow_threads(job.threads)
        if job.cwd and job.cwd not in sys.path:
            sys.path.append(job.cwd)
        import_user_modules(job.imports)
        self.job = job
        # The driver gave the class-order notice already.
        self.plan = prepare_run(job.images, job.options, discovery=job.discovery, announce=False)
        mine = json.loads(json.dumps(checkpoint_fingerprint(self.plan), sort_keys=True))
        theirs = job.fingerprint
        keys = (mine.keys() | theirs.keys()) - set(PATH_KEYS)
        differing = sorted(k for k in keys if mine.get(k) != theirs.get(k))
        if differing:
            raise RuntimeError(
                "This Ray worker would score with other settings than the driver: "
                f"{', '.join(differing)} differ (same model file, batchuq and TensorFlow "
                "versions and CPU features on every node?)."
            )
        self.folder = Path(job.folder)
        self.node = node_name()

    def __call__(self, parts: pa.Table) -> pa.Table:
        """Score every part of a batch of parts (``positions``: ``list<int64>`` per part).

        Returns:
            One ``PART_SUMMARY`` row per part.
        """
        summaries = [self.score_part(p) for p in parts.column("positions").to_pylist()]
        return pa.Table.from_pylist(summaries, schema=PART_SUMMARY)

    def score_part(self, positions: list[int]) -> dict[str, Any]:
        """Score the images at ``positions`` and write them as the part named by the first.

        Args:
            positions: Indices into the discovered files, increasing.

        Returns:
            The part's ``PART_SUMMARY`` row.
        """
        counts = ScoreReport(output=self.folder)
        batches, errors = [], ([], [])
        for batch in iter_sampled_batches(self.plan, positions):
            columns, decisions = score_rows(self.plan, batch, self.job.schema)
            counts.count(batch.statuses, decisions)
            batches.append(columns)
            for position, status in zip(batch.positions, batch.statuses, strict=True):
                if status != STATUS_OK:
                    errors[0].append(position)
                    errors[1].append(status)
        table = pa.Table.from_batches(batches, schema=self.job.schema)
        write_part_file(self.folder, part_name_at(positions[0]), table)
        return {
            "first": positions[0],
            "rows": table.num_rows,
            "unclassified": counts.unclassified,
            "error_positions": errors[0],
            "error_statuses": errors[1],
            "node": self.node,
            "pid": os.getpid(),
        }


def _absolute(value: Any) -> Any:
    """``value`` with every local path in it (one, or a list) made absolute; URLs
    (``s3://``, ``gs://``) and other values as they are."""
    if isinstance(value, (list, tuple)):
        return type(value)(_absolute(v) for v in value)
    if isinstance(value, (str, os.PathLike)) and not is_url(str(value)):
        return os.path.abspath(value)
    return value


def limit_tensorflow_threads(threads: int) -> None:
    """Run TensorFlow's ops on ``threads`` threads (before its runtime starts; else no-op).

    Ray packs several actors on a node by their ``num_cpus``; TensorFlow would otherwise give
    each of them a thread per core of the node.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    except RuntimeError:  # the runtime is already running in this process
        pass


def node_name() -> str:
    """The Ray node this actor runs on (its id), or ``local`` outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker there is no node to name
        return "local"


def threads_for(cpus_per_worker: float) -> int:
    """TensorFlow threads for an actor that reserves ``cpus_per_worker`` CPUs: at least one."""
    return max(1, math.ceil(cpus_per_worker))
