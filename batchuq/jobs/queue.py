"""A labelling queue: tonight's most informative images, spread over the predicted classes.

``queue_images`` reads a file scored by ``batchuq score`` (or a history partition), ranks its
readable images by an uncertainty score (``BY``), leaves out every image queued on an earlier
night (the queue folder remembers them), and picks ``n`` of them **round-robin over the
predicted classes**: each class's images are ranked by the score, most informative first; the
first round takes the top image of every class, the second round the next of every class, and
so on, and within a round the more informative image comes first. A class with fewer
candidates drops out when they run out, so the ``n`` images span as many predicted classes as
there are, and a class the model predicts often cannot crowd out the others.

``write_label_studio`` writes the picks as a Label Studio import file (a JSON list of tasks, each
``{"data": {"image": ...}, "predictions": [...]}`` with the predicted class as a pre-annotated
``choices`` result: https://labelstud.io/guide/predictions), ``write_csv`` as CSV, and
``remember`` adds them to the queue folder: ``QUEUE_DIR/KEY=VALUE/part-0.parquet``, one Hive
partition per night (a dataset ``pd.read_parquet("QUEUE_DIR")`` reads), written atomically. A
rerun for the same night replaces that night's partition, so it excludes only other nights.

Images are identified by their location: the scored file's ``images_root`` (a local folder,
made absolute, or an object-store URL) joined with the row's ``path``; ``url_prefix`` maps the
row's ``path`` to a served location for Label Studio instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchuq.defaults import STATUS_OK
from batchuq.errors import NoImagesFoundError, UsageError
from batchuq.output.history import PARTITION_FILE, Partition
from batchuq.output.schema import read_metadata
from batchuq.storage import is_url

logger = logging.getLogger("batchuq")

# --by NAME -> (column, higher is more informative)
RANKINGS: dict[str, tuple[str, bool]] = {
    "mutual_information": ("mutual_info", True),
    "margin": ("margin", False),
    "entropy": ("entropy", True),
    "ood": ("knn_distance", True),
}
OOD_FALLBACK = "entropy"
QUEUE_COLUMNS = ("image", "path", "pred", "confidence", "by", "score", "round", "rank")


@dataclass(frozen=True)
class LabelStudioNames:
    """Where the pre-annotation goes in a Label Studio labelling configuration.

    Attributes:
        from_name: The ``name`` of the ``<Choices>`` tag.
        to_name: The ``name`` of the ``<Image>`` tag (the task's data key is ``image``).
        model_version: Shown in Label Studio beside each prediction; ``None``: the model file's
            name and the first 12 hex digits of its sha256.
    """

    from_name: str = "choice"
    to_name: str = "image"
    model_version: str | None = None


@dataclass
class Queue:
    """The images picked for labelling tonight and how they were chosen.

    Attributes:
        tasks: One row per image, in queue order: ``QUEUE_COLUMNS``.
        night: Tonight's partition in the queue folder.
        by: The ``--by`` asked for.
        column: The column the images were ranked by (``ood`` falls back to ``entropy``).
        rows: Rows in the scored file.
        errors: Error rows (never queued).
        already_queued: Readable images left out because an earlier night queued them.
        model_version: The prediction's ``model_version`` for Label Studio.
    """

    tasks: pd.DataFrame
    night: Partition
    by: str
    column: str
    rows: int
    errors: int
    already_queued: int
    model_version: str


def queue_images(
    tonight: str | os.PathLike[str],
    n: int,
    *,
    by: str = "mutual_information",
    queue_dir: str | os.PathLike[str] | None = None,
    night: str | Partition | None = None,
    url_prefix: str | None = None,
    images_root: str | None = None,
    model_version: str | None = None,
) -> Queue:
    """Pick tonight's ``n`` most informative images, spread over the predicted classes.

    Args:
        tonight: A Parquet file written by ``batchuq score``, or a folder of them (a history
            partition such as ``history/date=2026-12-01``).
        n: How many images to queue (fewer when fewer are left).
        by: ``mutual_information`` (highest first), ``margin`` (smallest first), ``entropy``
            (highest first) or ``ood`` (``knn_distance``, highest first; ``entropy`` with a
            warning when the file has no ``knn_distance``).
        queue_dir: The queue folder: images queued there on other nights are left out.
        night: Tonight's partition of the queue folder, ``KEY=VALUE``; default: the folder
            holding ``tonight`` when it is named ``KEY=VALUE``, else ``night=<file stem>``.
        url_prefix: Give Label Studio ``url_prefix`` + the row's ``path`` (URL-quoted) instead
            of the image's location, e.g. ``https://files.example/2026-12-01/``.
        images_root: Where the scored images are, if not the file's ``images_root``.
        model_version: The predictions' ``model_version``; default: model file and sha256.

    Returns:
        A ``Queue``.

    Raises:
        UsageError: For an unknown ``by``, ``n`` below 1, a file that lacks the ranking column
            (the message names it), or a night name that is not ``KEY=VALUE``.
        NoImagesFoundError: If the scored file holds no rows.
    """
    if by not in RANKINGS:
        raise UsageError(f"`by` must be one of {tuple(RANKINGS)}. Received: by={by!r}")
    if n < 1:
        raise UsageError(f"`n` must be at least 1. Received: n={n}")
    if Path(tonight).is_dir() and not any(Path(tonight).glob("*.parquet")):
        # An empty partition folder is an empty night, as for `batchuq monitor`.
        raise NoImagesFoundError(f"{str(tonight)!r} holds no Parquet file: no rows.")
    frame, metadata = read_scored(tonight)
    if frame.empty:
        raise NoImagesFoundError(f"{str(tonight)!r} holds no rows.")
    column, ascending = ranking_column(by, frame.columns)
    night = resolve_night(tonight, night)
    root = images_root if images_root is not None else metadata.get("images_root")
    if root is not None and not is_url(root) and not Path(root).is_dir():
        logger.warning(
            "The images folder %r (the scored file's images_root, made absolute here) is not "
            "a folder: pass --images-root if the images have moved.",
            os.path.abspath(root),
        )
    frame["image"] = [image_location(root, path) for path in frame["path"]]
    ok = (frame["status"] == STATUS_OK) & frame["pred"].notna() & frame[column].notna()
    earlier = queued_before(queue_dir, night) if queue_dir is not None else set()
    fresh = ok & ~frame["image"].isin(earlier)
    tasks = round_robin(frame[fresh], column, ascending, n)
    if url_prefix is not None:
        tasks["image"] = [url_prefix + quote(path, safe="/") for path in tasks["path"]]
    return Queue(
        tasks=tasks,
        night=night,
        by=by,
        column=column,
        rows=len(frame),
        errors=int((frame["status"] != STATUS_OK).sum()),
        already_queued=int((ok & ~fresh).sum()),
        model_version=model_version or default_model_version(metadata),
    )


def read_scored(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows (without the raw ``samples``) and the batchuq metadata of a scored file or folder.

    Raises:
        UsageError: If it is not a file written by ``batchuq score`` (no batchuq metadata).
    """
    metadata = read_metadata(path)
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    names = [name for name in pq.read_schema(files[0]).names if name != "samples"]
    table = pa.concat_tables([pq.read_table(f, columns=names) for f in files])
    return table.to_pandas(), metadata


def ranking_column(by: str, columns: Any) -> tuple[str, bool]:
    """The column ``by`` ranks on and whether it sorts ascending (most informative first).

    Raises:
        UsageError: If the file lacks the column.
    """
    column, higher = RANKINGS[by]
    if by == "ood" and column not in columns:
        logger.warning(
            "--by ood: the file has no %s column (score with a method that writes it); "
            "ranking by %s instead.",
            column,
            OOD_FALLBACK,
        )
        column, higher = RANKINGS[OOD_FALLBACK]
    if column not in columns:
        raise UsageError(
            f"--by {by} ranks on the column {column!r}, which the scored file does not have. "
            f"Received: by={by!r}"
        )
    return column, not higher


def resolve_night(tonight: str | os.PathLike[str], night: str | Partition | None) -> Partition:
    """Tonight's partition of the queue folder (see ``queue_images``)."""
    if isinstance(night, Partition):
        return night
    if night is not None:
        return Partition.parse(night, "night")
    path = Path(os.path.abspath(tonight))
    folder = path if path.is_dir() else path.parent
    if "=" in folder.name:
        return Partition.parse(folder.name, "night")
    return Partition.parse(f"night={path.stem}", "night")


def image_location(root: str | None, path: str) -> str:
    """Where an image is: ``root`` (made absolute, or a URL) joined with its relative ``path``."""
    if root is None:
        return path
    if is_url(root):
        return f"{root.rstrip('/')}/{path}"
    return str(Path(os.path.abspath(root)) / path)


def round_robin(rows: pd.DataFrame, column: str, ascending: bool, n: int) -> pd.DataFrame:
    """The first ``n`` rows of a round-robin over the predicted classes (see the module).

    Ties are broken by ``path``, so the pick does not depend on the file's row order.
    """
    ranked = rows.sort_values([column, "path"], ascending=[ascending, True], kind="stable")
    ranked = ranked.assign(round=ranked.groupby("pred", sort=False).cumcount())
    picked = ranked.sort_values(
        ["round", column, "path"], ascending=[True, ascending, True], kind="stable"
    ).head(n)
    tasks = pd.DataFrame(
        {
            "image": picked["image"].astype(str),
            "path": picked["path"].astype(str),
            "pred": picked["pred"].astype(str),
            "confidence": picked["confidence"].astype(float),
            "by": column,
            "score": picked[column].astype(float),
            "round": picked["round"].astype("int64"),
        }
    ).reset_index(drop=True)
    tasks["rank"] = range(1, len(tasks) + 1)
    return tasks


def default_model_version(metadata: Mapping[str, Any]) -> str:
    """``<model file name>@<first 12 hex digits of its sha256>`` from the run's metadata."""
    name = Path(str(metadata.get("model_path") or "model")).name
    digest = str(metadata.get("model_sha256") or "")[:12]
    return f"{name}@{digest}" if digest else name


def queued_before(queue_dir: str | os.PathLike[str], night: Partition) -> set[str]:
    """The images queued on every night of ``queue_dir`` but ``night`` (none if it is missing).

    Raises:
        UsageError: If ``queue_dir`` is a file.
    """
    root = Path(queue_dir)
    if root.exists() and not root.is_dir():
        raise UsageError(f"The queue folder is a file. Received: history={str(queue_dir)!r}")
    images: set[str] = set()
    for log in sorted(root.glob(f"*=*/{PARTITION_FILE}")):
        if log.parent.name != night.folder_name:
            images.update(pq.read_table(log, columns=["image"]).column("image").to_pylist())
    return images


def label_studio_tasks(queue: Queue, names: LabelStudioNames | None = None) -> list[dict]:
    """The queue as Label Studio tasks with the predicted class as a pre-annotation.

    Each task is ``{"data": {"image": ..., "path": ..., <by column>: ...}, "predictions":
    [{"model_version": ..., "score": <confidence>, "result": [{"id", "from_name", "to_name",
    "type": "choices", "value": {"choices": [<predicted class>]}}]}]}``
    (https://labelstud.io/guide/predictions). A result's ``id`` is derived from the image's
    location, so it is unique across tasks and nights.

    Args:
        queue: The picks.
        names: The labelling configuration's tag names and the model version.

    Returns:
        The tasks, JSON-serialisable.
    """
    names = names or LabelStudioNames()
    version = names.model_version or queue.model_version
    tasks = []
    for row in queue.tasks.itertuples(index=False):
        result = {
            "id": hashlib.sha1(row.image.encode()).hexdigest()[:10],
            "from_name": names.from_name,
            "to_name": names.to_name,
            "type": "choices",
            "value": {"choices": [row.pred]},
        }
        prediction = {"model_version": version, "score": row.confidence, "result": [result]}
        data = {"image": row.image, "path": row.path, queue.column: row.score}
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


def write_label_studio(
    queue: Queue, path: str | os.PathLike[str], names: LabelStudioNames | None = None
) -> Path:
    """Write the Label Studio import file (``label_studio_tasks``) to ``path``, atomically."""
    text = json.dumps(label_studio_tasks(queue, names), indent=2, allow_nan=False)
    return _replace(Path(path), lambda temp: temp.write_text(text + "\n", encoding="utf-8"))


def write_csv(queue: Queue, path: str | os.PathLike[str]) -> Path:
    """Write the queue as CSV (``QUEUE_COLUMNS``, one row per image) to ``path``, atomically."""
    return _replace(Path(path), lambda temp: queue.tasks.to_csv(temp, index=False))


def remember(queue: Queue, queue_dir: str | os.PathLike[str]) -> Path:
    """Record tonight's picks in ``queue_dir/KEY=VALUE/part-0.parquet``, replacing tonight's.

    Returns:
        The night's file.
    """
    folder = Path(queue_dir) / queue.night.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(queue.tasks, preserve_index=False)
    return _replace(folder / PARTITION_FILE, lambda temp: pq.write_table(table, temp))


def _replace(path: Path, write: Any) -> Path:
    """Write ``path`` through a hidden temporary file beside it, renamed into place."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path
