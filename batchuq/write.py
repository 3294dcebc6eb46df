"""Step 6 of the data flow: write one Parquet row per image, atomically.

Rows are buffered and written in row groups to a hidden temporary file beside the output; the
file is renamed into place only when the run completes, so a reader never sees a truncated
``out.parquet`` and an interrupted run leaves the previous output untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"batchuq"
SCORE_COLUMNS = ("confidence", "margin", "entropy", "mutual_info", "variation_ratio")


def output_schema(
    class_names: list[str],
    metadata: dict | None = None,
    pred_set: bool = False,
    samples_per_image: int | None = None,
) -> pa.Schema:
    """The Parquet schema for ``class_names`` (class order = model output order).

    Args:
        class_names: The model's class names.
        metadata: JSON-serialisable run metadata, stored under the ``batchuq`` key.
        pred_set: Add the ``pred_set`` column (conformal prediction set, list of class names).
        samples_per_image: Add the ``samples`` column holding every image's raw samples,
            shape ``(samples_per_image, classes)``, as a fixed-size list of fixed-size lists.

    Returns:
        The Arrow schema.
    """
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_index", pa.int64()),
        pa.field("pred", pa.string()),
        pa.field("pred_index", pa.int64()),
        pa.field("decision", pa.string()),
        *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
        pa.field("status", pa.string(), nullable=False),
    ]
    if pred_set:
        fields.append(pa.field("pred_set", pa.list_(pa.string())))
    for stat in ("mean", "median", "std"):
        fields.extend(pa.field(f"{stat}_{name}", pa.float32()) for name in class_names)
    if samples_per_image:
        per_sample = pa.list_(pa.float32(), len(class_names))
        fields.append(pa.field("samples", pa.list_(per_sample, samples_per_image)))
    encoded = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=encoded)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` can be written before any work is done.

    Raises:
        ValueError: If the parent folder does not exist or the path is a folder.
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"The output path is a folder, not a file. Received: output={str(path)!r}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(
            f"The output folder {str(parent)!r} does not exist. Received: output={str(path)!r}"
        )
    if not os.access(parent, os.W_OK):
        raise ValueError(
            f"The output folder {str(parent)!r} is not writable. Received: output={str(path)!r}"
        )
    return out


class AtomicParquetWriter:
    """Write rows to ``path`` through a temporary file that is renamed into place on success.

    Use as a context manager; on an exception (including ``KeyboardInterrupt``) the temporary
    file is removed and ``path`` is left as it was.

    Args:
        path: Final output file.
        schema: Arrow schema of the rows (see ``output_schema``).
        row_group_size: Rows buffered before a row group is written.
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema, row_group_size: int = 4096):
        self.path = Path(path)
        self.schema = schema
        self.row_group_size = row_group_size
        self.temp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self.rows_written = 0

    def __enter__(self) -> AtomicParquetWriter:
        self._writer = pq.ParquetWriter(self.temp_path, self.schema, compression="zstd")
        return self

    def write_rows(self, rows: list[dict]) -> None:
        """Queue rows (dicts keyed by column name); full row groups are written at once."""
        self._buffer.extend(rows)
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer and self._writer is not None:
            table = pa.Table.from_pylist(self._buffer, schema=self.schema)
            self._writer.write_table(table)
            self.rows_written += len(self._buffer)
            self._buffer = []

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
        self.temp_path.unlink(missing_ok=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self._flush()
            assert self._writer is not None
            self._writer.close()
            self._writer = None
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.abort()
            raise


def read_metadata(path: str | os.PathLike[str]) -> dict:
    """Return the batchuq run metadata stored in a Parquet file written by ``score``."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"The file has no batchuq metadata. Received: path={str(path)!r}")
    return json.loads(raw)


class CheckpointedParquetWriter(AtomicParquetWriter):
    """An ``AtomicParquetWriter`` that keeps finished rows in a checkpoint folder for ``--resume``.

    Rows are written every ``checkpoint_rows`` rows as complete Parquet part files in
    ``OUTPUT.checkpoint/`` (each part renamed into place, so a kill never leaves half a part).
    A later run with the same fingerprint skips the images already there; on success the parts
    are merged into ``OUTPUT`` and the checkpoint folder is removed.

    Args:
        path: Final output file.
        schema: Arrow schema of the rows.
        fingerprint: JSON-serialisable description of the run (settings and file list); a
            checkpoint made by a different run is refused.
        checkpoint_rows: Rows per part file.

    Raises:
        ValueError: On entering, if the checkpoint belongs to a different run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: pa.Schema,
        fingerprint: dict,
        checkpoint_rows: int = 1024,
    ):
        super().__init__(path, schema, row_group_size=checkpoint_rows)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.checkpoint = self.path.with_name(self.path.name + ".checkpoint")
        self.done_paths: set[str] = set()
        self.done_statuses: list[str] = []  # status of each row already in the checkpoint
        self.done_decisions: list[str | None] = []  # and its decision
        self._parts = 0

    def __enter__(self) -> CheckpointedParquetWriter:
        run_file = self.checkpoint / "run.json"
        if self.checkpoint.is_dir() and run_file.is_file():
            if json.loads(run_file.read_text()) != self.fingerprint:
                raise ValueError(
                    f"The checkpoint {str(self.checkpoint)!r} was made by a run with other "
                    "settings or other files; delete it or run without --resume."
                )
            for part in sorted(self.checkpoint.glob("part-*.parquet")):
                done = pq.read_table(part, columns=["path", "status", "decision"])
                self.done_paths.update(done.column("path").to_pylist())
                self.done_statuses.extend(done.column("status").to_pylist())
                self.done_decisions.extend(done.column("decision").to_pylist())
                self._parts += 1
        else:
            self.checkpoint.mkdir(exist_ok=True)
            run_file.write_text(json.dumps(self.fingerprint, sort_keys=True))
        for stray in self.checkpoint.glob(".part-*"):
            stray.unlink()
        return self

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        name = f"part-{self._parts:06d}.parquet"
        temp = self.checkpoint / f".{name}.tmp-{os.getpid()}"
        pq.write_table(table, temp, compression="zstd")
        os.replace(temp, self.checkpoint / name)
        self._parts += 1
        self.rows_written += len(self._buffer)
        self._buffer = []

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            try:
                self._flush()  # finished rows are kept, whatever stopped the run
            finally:
                self.temp_path.unlink(missing_ok=True)
            return
        self._flush()
        try:
            with pq.ParquetWriter(self.temp_path, self.schema, compression="zstd") as writer:
                for part in sorted(self.checkpoint.glob("part-*.parquet")):
                    writer.write_table(pq.read_table(part, schema=self.schema))
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.temp_path.unlink(missing_ok=True)
            raise
        for item in self.checkpoint.iterdir():
            item.unlink()
        self.checkpoint.rmdir()
