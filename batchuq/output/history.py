"""A history of runs as one dataset: a Hive-partitioned folder, one partition per night.

``batchuq score IMAGES HISTORY/ --partition date=2026-12-01`` writes the night's rows to
``HISTORY/date=2026-12-01/part-0.parquet``. pandas (``pd.read_parquet("HISTORY")``), polars and
DuckDB read every night of the folder as one table with a ``date`` column taken from the
folder names (Hive partitioning); each file is the single-file output of a run, with the same
columns and metadata (plus the metadata's ``partition``).

A rerun replaces the partition's file atomically: the rows go to a hidden temporary file in the
partition's folder (``.part-0.parquet.tmp-PID``: not ``*.parquet``, so no reader's glob takes
it) and are renamed onto ``part-0.parquet`` when the run completes. With ``--resume`` the
checkpoint lives beside ``HISTORY``, not in it (``.HISTORY.date=2026-12-01.checkpoint/``),
because polars' and DuckDB's globs would read its part files, hidden folders included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from batchuq.errors import OutputError, UsageError
from batchuq.storage import is_url

PARTITION_FILE = "part-0.parquet"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
_MAX_VALUE = 200
# Columns every scored file may hold: a partition key must not shadow one of them.
RESERVED_COLUMNS = frozenset(
    {
        "path",
        "label",
        "label_index",
        "pred",
        "pred_index",
        "decision",
        "confidence",
        "margin",
        "entropy",
        "mutual_info",
        "variation_ratio",
        "status",
        "passes",
        "pred_set",
        "samples",
    }
)
_RESERVED_PREFIXES = ("mean_", "median_", "std_")


@dataclass(frozen=True)
class Partition:
    """One partition of a history folder: ``KEY=VALUE``, a folder ``HISTORY/KEY=VALUE/``.

    Attributes:
        key: The column readers get (an identifier, e.g. ``date``).
        value: Its value for this partition (letters, digits, ``. _ + -``; e.g. ``2026-12-01``).
    """

    key: str
    value: str

    @classmethod
    def parse(cls, text: str, name: str = "partition") -> Partition:
        """Read ``KEY=VALUE`` (as ``--partition`` takes it).

        Args:
            text: The partition, e.g. ``date=2026-12-01``.
            name: The argument's name, for the error message.

        Returns:
            The partition.

        Raises:
            UsageError: If ``text`` is not ``KEY=VALUE`` with ``KEY`` an identifier that is
                not a column of the output and ``VALUE`` safe as part of a folder name.
        """
        key, sep, value = str(text).partition("=")
        received = f"Received: {name}={text!r}"
        if not sep or not _KEY.match(key):
            raise UsageError(
                f"`{name}` must be KEY=VALUE with KEY an identifier (letters, digits, _), "
                f"e.g. date=2026-12-01. {received}"
            )
        if key in RESERVED_COLUMNS or key.startswith(_RESERVED_PREFIXES):
            raise UsageError(
                f"The partition key {key!r} is a column of batchuq's output; readers would "
                f"see two columns of that name. Choose another key, e.g. date. {received}"
            )
        if not _VALUE.match(value) or len(value) > _MAX_VALUE:
            raise UsageError(
                f"The partition value must be 1 to {_MAX_VALUE} letters, digits, '.', '_', "
                f"'+' or '-', starting with a letter or digit (it names a folder). {received}"
            )
        return cls(key, value)

    @property
    def folder_name(self) -> str:
        """``KEY=VALUE``, the partition's folder in the history folder."""
        return f"{self.key}={self.value}"

    def as_metadata(self) -> dict[str, str]:
        """``{KEY: VALUE}``, stored as the metadata's ``partition``."""
        return {self.key: self.value}


def partition_file(history: str | os.PathLike[str], partition: Partition) -> Path:
    """``HISTORY/KEY=VALUE/part-0.parquet``, the file holding a partition's rows."""
    return Path(history) / partition.folder_name / PARTITION_FILE


def partition_checkpoint(history: str | os.PathLike[str], partition: Partition) -> Path:
    """The ``--resume`` checkpoint folder of a partition: hidden, beside ``HISTORY``, not in it.

    Readers' globs (``HISTORY/**/*.parquet``) would take a checkpoint's part files inside it.
    """
    root = Path(os.path.normpath(history))
    return root.with_name(f".{root.name}.{partition.folder_name}.checkpoint")


def check_partition_output(history: str | os.PathLike[str], partition: Partition) -> Path:
    """Check, before any work, that a partition of the history folder ``history`` can be written.

    ``history`` need not exist (it is created, as is the partition's folder), but its parent
    must. An existing partition folder must hold nothing visible but its ``part-0.parquet``
    (which the run replaces): another Parquet file there would be read as part of the night.

    Args:
        history: The history folder (``HISTORY/``).
        partition: The partition to write.

    Returns:
        The partition's file, ``HISTORY/KEY=VALUE/part-0.parquet``.

    Raises:
        OutputError: If ``history`` is a URL, a file or ends in ``.parquet``, its parent folder
            is missing or read-only, or the partition's folder holds other files.
    """
    given = f"Received: output={str(history)!r}"
    if is_url(history):
        raise OutputError(
            "A history folder must be local: each partition is written to a temporary file and "
            f"renamed into place, which object storage cannot do atomically. {given}"
        )
    root = Path(history)
    if root.suffix.lower() == ".parquet" or (root.exists() and not root.is_dir()):
        raise OutputError(
            "With --partition, OUTPUT is the history folder (e.g. history/), whose partitions "
            f"are KEY=VALUE/part-0.parquet; not a file. {given}"
        )
    _check_writable(root if root.is_dir() else root.parent, given)
    folder = root / partition.folder_name
    if folder.exists():
        if not folder.is_dir():
            raise OutputError(f"The partition {str(folder)!r} is a file, not a folder. {given}")
        _check_writable(folder, given)
        foreign = sorted(
            p.name for p in folder.iterdir() if p.name != PARTITION_FILE and p.name[:1] != "."
        )
        if foreign:
            raise OutputError(
                f"The partition folder {str(folder)!r} holds other files than its "
                f"{PARTITION_FILE} (e.g. {foreign[0]!r}); readers would take them for rows of "
                f"the night, and batchuq replaces only its own file. {given}"
            )
    return folder / PARTITION_FILE


def _check_writable(folder: Path, given: str) -> None:
    parent = folder if str(folder) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"The folder {str(parent)!r} does not exist. {given}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"The folder {str(parent)!r} is not writable. {given}")


@contextmanager
def partition_folders(path: Path) -> Iterator[None]:
    """Create the folders of a partition's file for a run, and remove them if the run fails.

    Only the folders this creates are removed, and only when empty: a failed first night
    leaves no empty partition behind, a failed rerun leaves the previous night's file.

    Args:
        path: The partition's file (``HISTORY/KEY=VALUE/part-0.parquet``).
    """
    created = [folder for folder in (path.parent.parent, path.parent) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        raise
