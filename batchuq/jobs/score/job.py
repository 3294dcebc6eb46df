"""The score job's entry point: ``score_directory`` hands the run to an engine.

``score_directory`` is the library entry point used by the CLI, notebooks and Airflow tasks:
discover -> decode/augment -> sample -> summarise -> decide -> write, in this process
(``local``) or, given ``RaySettings``, on a Ray cluster (``ray_engine``), with the same rows.
"""

from __future__ import annotations

import os

from batchuq.errors import UsageError
from batchuq.jobs.score.local import score_locally
from batchuq.jobs.score.options import RaySettings, RunControl, ScoreOptions
from batchuq.jobs.score.rows import ScoreReport
from batchuq.output.history import Partition


def score_directory(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: ScoreOptions | None = None,
    control: RunControl | None = None,
    ray: RaySettings | None = None,
    partition: str | Partition | None = None,
) -> ScoreReport:
    """Score every image in a folder and write one Parquet row per image.

    Example::

        from batchuq import ScoreOptions, TTAConfig, score_directory

        score_directory("imgs", "out.parquet", ScoreOptions(passes=50, tta=TTAConfig(copies=10)))
        score_directory("imgs", "history/", partition="date=2026-12-01")  # a night of history

    Args:
        images: Folder of images: class subfolders (labelled) or flat (unlabelled), or an
            ``s3://`` or ``gs://`` prefix holding them.
        output: Parquet file to write (replaced atomically when the run completes). With the
            Ray engine also a folder, given as a string ending in ``/``: a dataset of part
            files that pandas, pyarrow and DuckDB read as one table.
        options: What decides the rows (``ScoreOptions``; default: its defaults).
        control: How the run is driven: resume, stop requests, progress, settings provenance
            (``RunControl``; default: none of them).
        ray: Score on a Ray cluster with these settings (``RaySettings``; needs
            ``pip install "batchuq[ray]"``), with the same rows; ``None``: in this process.
        partition: ``KEY=VALUE`` (or a ``Partition``): ``output`` is a history folder and the
            rows go to ``output/KEY=VALUE/part-0.parquet``, replacing that partition
            atomically; pandas, polars and DuckDB read the folder as one table with a ``KEY``
            column (``batchuq.output.history``). Local engine only.

    Returns:
        A ``ScoreReport``.

    Raises:
        NoImagesFoundError: If the folder holds no image.
        UsageError: For unusable folders, models, outputs, partitions (or a partition with
            ``ray``) or options (``ImagesFolderError``, ``ModelError``, ``NoDropoutError``,
            ``OutputError``, ...: see ``batchuq.errors``).
        StopRequested: When ``control.should_stop`` asks.
    """
    options = options if options is not None else ScoreOptions()
    control = control if control is not None else RunControl()
    if isinstance(partition, str):
        partition = Partition.parse(partition)
    if ray is not None and partition is not None:
        raise UsageError(
            "A history partition is written by the local engine only: the Ray engine's parts "
            "folder would sit where readers of the history look. Score with the local engine, "
            "or write a file with Ray and move it to HISTORY/KEY=VALUE/part-0.parquet. "
            f"Received: partition={partition.folder_name!r}"
        )
    if ray is not None:
        from batchuq.jobs.score.ray_engine import score_with_ray

        return score_with_ray(images, output, options, control, ray)
    return score_locally(images, output, options, control, partition)
