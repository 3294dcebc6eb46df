"""Step 6 of the data flow: write the rows to Parquet atomically, resumably with a checkpoint.

``ParquetSink`` writes record batches (``batchuq.output.schema``) in row groups to a hidden
temporary file beside the output and renames it into place only when the run completes, so a
reader never sees a truncated ``out.parquet`` and an interrupted run leaves the previous output
untouched. With a ``Checkpoint`` (``--resume``) finished rows are kept as part files instead,
and a later run with the same settings skips them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from batchuq.compact import COMPRESSION, PART_GLOB, SortedParts, write_part_file
from batchuq.defaults import (
    DEFAULT_CHECKPOINT_ROWS,
    DEFAULT_ROW_GROUP_SIZE,
)
from batchuq.errors import CheckpointError
from batchuq.output.schema import RUN_METADATA_KEY


@dataclass
class DoneRows:
    """The rows a checkpoint already holds.

    Attributes:
        paths: Relative paths of the images already scored.
        statuses: The ``status`` of each row, in part order.
        decisions: The ``decision`` of each row (``None`` for error rows), in the same order.
    """

    paths: set[str] = field(default_factory=set)
    statuses: list[str] = field(default_factory=list)
    decisions: list[str | None] = field(default_factory=list)

    def add(self, table: pa.Table) -> None:
        """Add the rows of a part (it needs the ``path``, ``status``, ``decision`` columns)."""
        self.paths.update(table.column("path").to_pylist())
        self.statuses.extend(table.column("status").to_pylist())
        self.decisions.extend(table.column("decision").to_pylist())


class Checkpoint:
    """The resume state of one output: finished rows kept as part files in a folder.

    The folder is ``OUTPUT.checkpoint/``: ``run.json`` holds the fingerprint of the run that
    made it, and part files hold finished rows: ``part-NNNNNN.parquet``, numbered as the local
    engine writes them, and ``part-at-NNNNNNNNNN.parquet``, named by their first image, as the
    Ray engine writes them (``batchuq.compact``). Either engine resumes the other's checkpoint.
    Each part is written to a hidden temporary name and renamed, so a kill never leaves half a
    part.

    Args:
        output_path: The final output file.
        fingerprint: JSON-serialisable description of the run (settings and file list); a
            checkpoint made by another run is refused.
        rows_per_part: Rows buffered before a part is written.
        order: The run's relative paths in output order: the merge sorts the rows by it,
            keeps one row per path and refuses to finish without a row for each. ``None``
            merges the parts as they are, in name order.
        folder: Where the parts go; default ``OUTPUT.checkpoint/`` beside the output (the Ray
            engine, without ``--resume``, keeps its parts in a temporary folder instead).
    """

    def __init__(
        self,
        output_path: str | os.PathLike[str],
        fingerprint: dict,
        rows_per_part: int = DEFAULT_CHECKPOINT_ROWS,
        order: Sequence[str] | None = None,
        folder: str | os.PathLike[str] | None = None,
    ) -> None:
        self.output_path = Path(output_path)
        # Compared after a JSON round trip: that is what run.json gives back.
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.rows_per_part = rows_per_part
        self.position_of = None if order is None else {p: i for i, p in enumerate(order)}
        default = self.output_path.with_name(self.output_path.name + ".checkpoint")
        self.folder = default if folder is None else Path(folder)
        self.done = DoneRows()
        self._next_part = 0

    @property
    def run_file(self) -> Path:
        """The ``run.json`` holding the fingerprint."""
        return self.folder / "run.json"

    def open(self) -> DoneRows:
        """Load the rows of a checkpoint made by this run, or create an empty one.

        Returns:
            What the checkpoint already holds (also kept as ``self.done``).

        Raises:
            CheckpointError: If the folder was made by a run with other settings or files.
        """
        self.done = DoneRows()
        if self.folder.is_dir() and self.run_file.is_file():
            if json.loads(self.run_file.read_text()) != self.fingerprint:
                raise CheckpointError(
                    f"The checkpoint {str(self.folder)!r} was made by a run with other "
                    "settings or other files; delete it or run without --resume."
                )
            for part in self.parts():
                self.done.add(pq.read_table(part, columns=["path", "status", "decision"]))
        else:
            self.folder.mkdir(exist_ok=True)
            self.run_file.write_text(json.dumps(self.fingerprint, sort_keys=True))
        for stray in self.folder.glob(".part-*"):  # a part a kill interrupted
            stray.unlink(missing_ok=True)
        numbered = sorted(self.folder.glob("part-[0-9]*.parquet"))
        self._next_part = int(numbered[-1].name[5:11]) + 1 if numbered else 0
        return self.done

    def parts(self) -> list[Path]:
        """The finished part files: the numbered ones in the order they were written, then
        those named by their first image."""
        return sorted(self.folder.glob(PART_GLOB))

    def sorted_parts(self) -> SortedParts:
        """The finished rows in output order, one per image (see ``order``).

        Raises:
            RuntimeError: If ``order`` was given and an image has no row in the parts (a run
                that has not scored every image must not write its output).
        """
        rows = SortedParts(self.parts(), self.position_of)
        if self.position_of is not None and len(rows) != len(self.position_of):
            raise RuntimeError(
                f"The parts in {str(self.folder)!r} hold rows for {len(rows)} of "
                f"{len(self.position_of)} images: the output is not written."
            )
        return rows

    def write_part(self, table: pa.Table) -> Path:
        """Write ``table`` as the next numbered part file, atomically.

        Returns:
            The part's path.
        """
        path = write_part_file(self.folder, f"part-{self._next_part:06d}.parquet", table)
        self._next_part += 1
        return path

    def remove(self) -> None:
        """Delete the folder and everything in it (after a successful merge)."""
        for item in self.folder.iterdir():
            item.unlink()
        self.folder.rmdir()


def write_file_from_parts(
    rows: SortedParts,
    path: Path,
    schema: pa.Schema,
    *,
    group_rows: int,
    run_record: dict | None = None,
) -> None:
    """Stream the parts' rows, in order, into the Parquet file ``path``, atomically.

    The rows go, a row group at a time, to a hidden temporary file beside ``path``, renamed
    into place when complete; on any exception it is removed and ``path`` left as it was.

    Args:
        rows: The parts' rows in output order (``compact.SortedParts``).
        path: The output file.
        schema: Its schema and metadata.
        group_rows: Rows per row group.
        run_record: Stored in the footer as the metadata's ``run``.
    """
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with pq.ParquetWriter(temp, schema, compression=COMPRESSION) as writer:
            for group in rows.row_groups(schema, group_rows):
                writer.write_table(group)
            if run_record is not None:
                writer.add_key_value_metadata({RUN_METADATA_KEY: json.dumps(run_record)})
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_folder_from_parts(
    rows: SortedParts,
    folder: Path,
    schema: pa.Schema,
    *,
    rows_per_file: int,
    group_rows: int,
    run_record: dict | None = None,
) -> list[Path]:
    """Stream the parts' rows, in order, into a folder dataset that readers see as one table.

    The files are ``part-000000.parquet``, ``part-000001.parquet`` ...: their names sort as
    their rows do, so pandas, pyarrow and DuckDB read the folder in path order. Each file
    holds ``rows_per_file`` rows (the last fewer), the schema's metadata and the run record.
    They are written to a hidden temporary folder beside ``folder``, which then takes its
    place: an existing ``folder`` is moved aside, the new one renamed in, the old one deleted
    (two renames: a reader in between finds no folder, never a mixed one).

    Args:
        rows: The parts' rows in output order (``compact.SortedParts``).
        folder: The output folder.
        schema: The schema and metadata of every file.
        rows_per_file: Rows per file.
        group_rows: Rows per row group within a file.
        run_record: Stored in each file's footer as the metadata's ``run``.

    Returns:
        The files written, in order.
    """
    temp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        width = max(6, len(str(max(0, -(-len(rows) // rows_per_file) - 1))))
        tables = rows.row_groups(schema, rows_per_file)
        names = []
        for index, table in enumerate(tables):
            names.append(f"part-{index:0{width}d}.parquet")
            _write_one_file(temp / names[-1], table, group_rows, run_record)
        if not names:  # no rows: one empty file keeps the schema
            names.append(f"part-{0:0{width}d}.parquet")
            _write_one_file(temp / names[-1], schema.empty_table(), group_rows, run_record)
        _replace_folder(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return [folder / name for name in names]


def _write_one_file(path: Path, table: pa.Table, group_rows: int, run_record: dict | None) -> None:
    with pq.ParquetWriter(path, table.schema, compression=COMPRESSION) as writer:
        writer.write_table(table, row_group_size=group_rows)
        if run_record is not None:
            writer.add_key_value_metadata({RUN_METADATA_KEY: json.dumps(run_record)})


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the folder ``new`` in place of ``folder`` (deleting an existing one)."""
    if not folder.exists():
        os.rename(new, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)


class ParquetSink:
    """Write record batches to ``path`` atomically, resumably with a ``Checkpoint``.

    Use as a context manager. Batches are buffered and written a row group at a time (a group
    holds the batches buffered when ``row_group_size`` rows are reached) to the hidden file
    ``.NAME.tmp-PID`` beside ``path``, renamed into place on success. With a checkpoint, the
    buffered rows become a part every ``min(row_group_size, rows_per_part)`` rows, and on
    success the parts are merged one at a time into the temporary file, renamed into place and
    the checkpoint removed. On any exception (``KeyboardInterrupt`` and other
    ``BaseException`` too) the temporary file is removed and ``path`` is left as it was; with a
    checkpoint, the rows buffered so far are first kept as a part.

    Args:
        path: Final output file.
        schema: Arrow schema of the rows (see ``output_schema``).
        row_group_size: Rows buffered before a row group is written.
        checkpoint: Keep finished rows there (``--resume``).

    Attributes:
        done: What the checkpoint already held when the sink was entered (empty without one).
        rows_written: Rows this sink has written (to the file or to parts).

    Raises:
        CheckpointError: On entering, if the checkpoint belongs to another run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: pa.Schema,
        *,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.path = Path(path)
        self.schema = schema
        self.checkpoint = checkpoint
        self.row_group_size = row_group_size
        if checkpoint is not None:
            self.row_group_size = min(row_group_size, checkpoint.rows_per_part)
        self.temp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.done = DoneRows()
        self.rows_written = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self.run_record: dict | None = None

    def record_run(self, record: dict) -> None:
        """Store ``record`` (JSON-serialisable) in the footer, as the metadata's ``run``."""
        self.run_record = record

    def __enter__(self) -> ParquetSink:
        if self.checkpoint is not None:
            self.done = self.checkpoint.open()
        else:
            self._writer = self._open_temp()
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        """Queue a record batch with the sink's schema; full row groups are written at once."""
        self._buffer.append(batch)
        self._buffered_rows += batch.num_rows
        if self._buffered_rows >= self.row_group_size:
            self._flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._flush()
            if self.checkpoint is not None:
                self._merge_parts()
            else:
                self._add_run_record(self._writer)
                self._close_writer()
            os.replace(self.temp_path, self.path)
        except BaseException:
            self._close_writer()
            self.temp_path.unlink(missing_ok=True)
            raise
        if self.checkpoint is not None:
            self.checkpoint.remove()

    def _open_temp(self) -> pq.ParquetWriter:
        return pq.ParquetWriter(self.temp_path, self.schema, compression=COMPRESSION)

    def _flush(self) -> None:
        """Write the buffered batches as one row group, or as one checkpoint part."""
        if not self._buffer:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        if self.checkpoint is not None:
            self.checkpoint.write_part(table)
        else:
            assert self._writer is not None, "write() outside the `with` block"
            # One row group: write_table splits only above 1Mi rows, far above a group's size.
            self._writer.write_table(table)
        self.rows_written += self._buffered_rows
        self._buffer = []
        self._buffered_rows = 0

    def _merge_parts(self) -> None:
        """Stream the parts' rows into the temporary file, a row group at a time, in order."""
        assert self.checkpoint is not None
        rows = self.checkpoint.sorted_parts()
        with self._open_temp() as writer:
            for group in rows.row_groups(self.schema, self.row_group_size):
                writer.write_table(group)
            self._add_run_record(writer)

    def _add_run_record(self, writer: pq.ParquetWriter | None) -> None:
        if writer is not None and self.run_record is not None:
            writer.add_key_value_metadata({RUN_METADATA_KEY: json.dumps(self.run_record)})

    def _close_writer(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None

    def _abort(self) -> None:
        """Remove the temporary file; with a checkpoint, first keep the buffered rows."""
        try:
            if self.checkpoint is not None:
                self._flush()  # finished rows are kept, whatever stopped the run
        finally:
            self._close_writer()
            self.temp_path.unlink(missing_ok=True)
