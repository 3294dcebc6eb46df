"""Step 6 of the data flow: write one Parquet row per image, by columns and atomically.

Rows reach Arrow as record batches built from the NumPy arrays of a whole batch
(``score_record_batch``), never as one Python dict per image. ``ParquetSink`` writes them in
row groups to a hidden temporary file beside the output and renames it into place only when the
run completes, so a reader never sees a truncated ``out.parquet`` and an interrupted run leaves
the previous output untouched. With a ``Checkpoint`` (``--resume``) finished rows are kept as
part files instead, and a later run with the same settings skips them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchuq.compact import COMPRESSION, PART_GLOB, SortedParts, write_part_file
from batchuq.defaults import (
    DEFAULT_CHECKPOINT_ROWS,
    DEFAULT_ROW_GROUP_SIZE,
    STATUS_OK,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
)
from batchuq.errors import CheckpointError, OutputError, UsageError
from batchuq.storage import is_url

METADATA_KEY = b"batchuq"
# How the run went (wall time, images/s), known only at its end: a key of the file's footer
# added when the file is closed, read back by ``read_metadata`` as the metadata's ``run``.
RUN_METADATA_KEY = b"batchuq.run"
# How pandas restores its dtypes (see ``pandas_metadata``); written by pyarrow's pandas support.
PANDAS_METADATA_KEY = b"pandas"
SCORE_COLUMNS = ("confidence", "margin", "entropy", "mutual_info", "variation_ratio")
CLASS_STATISTICS = ("mean", "median", "std")
_COMPRESSION = COMPRESSION


def output_schema(
    class_names: list[str],
    metadata: dict | None = None,
    pred_set: bool = False,
    samples_per_image: int | None = None,
    variable_samples: bool = False,
) -> pa.Schema:
    """The Parquet schema for ``class_names`` (class order = model output order).

    Args:
        class_names: The model's class names.
        metadata: JSON-serialisable run metadata, stored under the ``batchuq`` key.
        pred_set: Add the ``pred_set`` column (conformal prediction set, list of class names).
        samples_per_image: Add the ``samples`` column holding every image's raw samples,
            shape ``(samples_per_image, classes)``, as a fixed-size list of fixed-size lists.
        variable_samples: Images have different numbers of samples (adaptive passes), at
            most ``samples_per_image``: the ``samples`` column is a list of fixed-size lists.

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
        pa.field("passes", pa.int64()),
    ]
    if pred_set:
        fields.append(pa.field("pred_set", pa.list_(pa.string())))
    for stat in CLASS_STATISTICS:
        fields.extend(pa.field(f"{stat}_{name}", pa.float32()) for name in class_names)
    if samples_per_image:
        per_sample = pa.list_(pa.float32(), len(class_names))
        outer = (
            pa.list_(per_sample) if variable_samples else pa.list_(per_sample, samples_per_image)
        )
        fields.append(pa.field("samples", outer))
    encoded = {
        METADATA_KEY: json.dumps(metadata or {}, sort_keys=True).encode(),
        PANDAS_METADATA_KEY: pandas_metadata(pa.schema(fields)),
    }
    return pa.schema(fields, metadata=encoded)


def pandas_metadata(schema: pa.Schema) -> bytes:
    """The ``pandas`` metadata pyarrow writes for a DataFrame of ``schema``'s columns, every
    integer column a nullable ``Int64`` (``Int32`` ...).

    Without it pandas reads an integer column with a null (an error row has no ``pred_index``,
    ``passes`` or ``label_index``) as float64; with it ``pd.read_parquet`` gives ``Int64``,
    nulls as ``pd.NA``, whether or not a file has nulls. The Arrow types stay integers, and
    polars and DuckDB, which do not read this key, read them as such.

    Args:
        schema: The columns (their metadata is not used).

    Returns:
        The JSON bytes of the ``pandas`` key, as ``pa.Table.from_pandas`` makes them.
    """
    bare = pa.schema(list(schema))
    frame = bare.empty_table().to_pandas()  # imports pandas now, not when the CLI starts
    for item in bare:
        if pa.types.is_integer(item.type):
            unsigned = "U" if pa.types.is_unsigned_integer(item.type) else ""
            frame[item.name] = frame[item.name].astype(f"{unsigned}Int{item.type.bit_width}")
    table = pa.Table.from_pandas(frame, schema=bare, preserve_index=False)
    return table.schema.metadata[PANDAS_METADATA_KEY]


# --------------------------------------------------------------------------------------------
# Record batches, by columns
# --------------------------------------------------------------------------------------------


def score_record_batch(
    schema: pa.Schema,
    class_names: Sequence[str],
    *,
    paths: Sequence[str],
    labels: Sequence[str | None],
    label_indices: Sequence[int | None],
    statuses: Sequence[str],
    pred_index: np.ndarray,
    decision_index: np.ndarray,
    stats: Mapping[str, np.ndarray],
    pred_sets: np.ndarray | None = None,
    samples: np.ndarray | list[np.ndarray] | None = None,
    passes: np.ndarray | None = None,
) -> pa.RecordBatch:
    """Build the output rows of one batch of images as an Arrow record batch.

    Rows whose status is not ``STATUS_OK`` hold nulls in every column computed from the model
    (``pred``, ``pred_index``, ``decision``, the float columns, ``pred_set``, ``samples``):
    their array values are whatever the model made of an unreadable image, and are dropped.

    Args:
        schema: The output schema (``output_schema``); it says which optional columns exist.
        class_names: Output names of the classes, in model output order (``classes`` of them).
        paths: Relative path of each image, ``batch`` of them.
        labels: Readable label of each image, or ``None`` when unlabelled.
        label_indices: Class index of each label, or ``None``.
        statuses: ``STATUS_OK`` or ``"error: ..."`` per image.
        pred_index: Predicted class index, int ``(batch,)``.
        decision_index: Decided class index, int ``(batch,)``; ``UNCLASSIFIED`` (-1) is
            written as ``UNCLASSIFIED_NAME``.
        stats: float arrays: each of ``SCORE_COLUMNS`` ``(batch,)`` and ``mean``, ``median``,
            ``std`` ``(batch, classes)`` (other keys are ignored). float64 values are rounded
            to float32, as Arrow rounds Python floats.
        pred_sets: Conformal set membership, bool ``(batch, classes)``; required when the
            schema has ``pred_set``.
        samples: Raw samples, float32 ``(batch, S, classes)``, or with adaptive passes a list
            of ``(S_i, classes)`` arrays; required when the schema has ``samples``.
        passes: ``(batch,)`` passes drawn per TTA copy for each image (null if not given).

    Returns:
        A record batch with ``schema``, one row per image.

    Raises:
        ValueError: If the optional arrays do not match the schema's optional columns (a bug
            of the caller, not of its user).
    """
    _check_optional_columns(schema, pred_sets, samples)
    names = np.asarray(list(class_names), dtype=object)
    ok = np.asarray([status == STATUS_OK for status in statuses], dtype=bool)
    null = ~ok
    pred_index = np.where(ok, np.asarray(pred_index, dtype=np.int64), 0)
    decision_index = np.where(ok, np.asarray(decision_index, dtype=np.int64), 0)
    decisions = np.where(
        decision_index == UNCLASSIFIED, UNCLASSIFIED_NAME, names[np.maximum(decision_index, 0)]
    )
    columns = [
        pa.array(list(paths), pa.string()),
        pa.array(list(labels), pa.string()),
        pa.array(list(label_indices), pa.int64()),
        pa.array(names[pred_index], pa.string(), mask=null),
        pa.array(pred_index, pa.int64(), mask=null),
        pa.array(decisions, pa.string(), mask=null),
        *[_float_column(stats[name], ok) for name in SCORE_COLUMNS],
        pa.array(list(statuses), pa.string()),
        _passes_column(passes, ok),
    ]
    if pred_sets is not None:
        columns.append(_pred_set_column(pred_sets, ok, names))
    for stat in CLASS_STATISTICS:
        per_class = _zero_where_not_ok(stats[stat], ok).T  # (classes, batch)
        columns.extend(pa.array(np.ascontiguousarray(v), mask=null) for v in per_class)
    if samples is not None:
        columns.append(_samples_column(samples, ok))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _check_optional_columns(
    schema: pa.Schema, pred_sets: np.ndarray | None, samples: np.ndarray | None
) -> None:
    """Refuse optional arrays that the schema has no column for, and missing ones it has."""
    for column, values in (("pred_set", pred_sets), ("samples", samples)):
        in_schema = schema.get_field_index(column) >= 0
        if in_schema and values is None:
            raise ValueError(f"The schema has a `{column}` column: pass its values.")
        if values is not None and not in_schema:
            raise ValueError(f"The schema has no `{column}` column for the values passed.")


def _zero_where_not_ok(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """float32 copy of ``values`` (``(batch, ...)``) with the rows that are not ok zeroed.

    Always a fresh array, so that a buffered record batch never shares memory with the
    caller's arrays (Arrow wraps NumPy buffers without copying).
    """
    values = np.asarray(values)
    ok = ok.reshape(ok.shape + (1,) * (values.ndim - 1))
    return np.where(ok, values, 0).astype(np.float32)


def _float_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """A float32 column from ``(batch,)`` values, null where the row is not ok."""
    return pa.array(_zero_where_not_ok(values, ok), pa.float32(), mask=~ok)


def _pred_set_column(pred_sets: np.ndarray, ok: np.ndarray, names: np.ndarray) -> pa.Array:
    """``list<string>`` of the member class names per row, in class order; null if not ok.

    An ok row with an empty set holds an empty list, not a null.
    """
    members = np.asarray(pred_sets, dtype=bool) & ok[:, None]
    offsets = np.concatenate([[0], np.cumsum(members.sum(axis=1))]).astype(np.int32)
    _, classes = np.nonzero(members)  # row-major: each row's members in class order
    values = pa.array(names[classes], pa.string())
    return pa.ListArray.from_arrays(
        pa.array(offsets), values, type=pa.list_(pa.string()), mask=pa.array(~ok)
    )


def _passes_column(passes: np.ndarray | None, ok: np.ndarray) -> pa.Array:
    """int64 passes per row, null where the row is not ok (or no passes are given)."""
    if passes is None:
        return pa.nulls(len(ok), pa.int64())
    return pa.array(np.where(ok, np.asarray(passes, np.int64), 0), pa.int64(), mask=~ok)


def _samples_column(samples: np.ndarray | list[np.ndarray], ok: np.ndarray) -> pa.Array:
    """Fixed-size list (``S``) of fixed-size lists (``classes``) of float32; null if not ok.

    A list of per-image arrays (adaptive passes) gives a list of fixed-size lists instead.
    """
    if isinstance(samples, list):
        kept = [
            np.asarray(s, np.float32) if good else s[:0]
            for s, good in zip(samples, ok, strict=True)
        ]
        lengths = np.array([len(s) for s in kept], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        classes = samples[0].shape[1]
        flat = pa.array(np.concatenate(kept).reshape(-1).astype(np.float32), pa.float32())
        per_sample = pa.FixedSizeListArray.from_arrays(flat, classes)
        return pa.ListArray.from_arrays(offsets, per_sample, mask=pa.array(~ok))
    samples = _zero_where_not_ok(samples, ok)
    batch, per_image, classes = samples.shape
    flat = pa.array(samples.reshape(-1), pa.float32())
    per_sample = pa.FixedSizeListArray.from_arrays(flat, classes)
    return pa.FixedSizeListArray.from_arrays(per_sample, per_image, mask=pa.array(~ok))


# --------------------------------------------------------------------------------------------
# Output path and metadata
# --------------------------------------------------------------------------------------------


def check_output_path(path: str | os.PathLike[str], suffix: str | None = None) -> Path:
    """Check that ``path`` can be written before any work is done.

    Args:
        path: The output file.
        suffix: When given (e.g. ``".parquet"``), the only suffix accepted (any case).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: If the path is a URL (object storage cannot take the atomic rename the
            output relies on), a folder, its folder does not exist or is not writable, or it
            does not end in ``suffix``.
    """
    if is_url(path):
        raise OutputError(
            "The output must be a local path: it is written to a temporary file and renamed "
            "into place, which object storage cannot do atomically. Write locally or to a "
            "mounted filesystem, then copy the file (e.g. `aws s3 cp out.parquet s3://...`). "
            f"Received: output={str(path)!r}"
        )
    out = Path(path)
    if out.is_dir():
        raise OutputError(
            f"The output path is a folder, not a file. Received: output={str(path)!r}"
        )
    _check_parent(out, path)
    if suffix is not None and out.suffix.lower() != suffix.lower():
        kind = suffix.lstrip(".").capitalize()
        raise OutputError(
            f"The output must end in {suffix}: batchuq writes {kind}. "
            f"Received: output={str(path)!r}"
        )
    return out


def _check_parent(out: Path, given: str | os.PathLike[str]) -> None:
    """Refuse an output whose folder is missing or not writable."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(
            f"The output folder {str(parent)!r} does not exist. Received: output={str(given)!r}"
        )
    if not os.access(parent, os.W_OK):
        raise OutputError(
            f"The output folder {str(parent)!r} is not writable. Received: output={str(given)!r}"
        )


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """Whether ``output`` names a folder dataset: a string ending in ``/`` (``scores/``)."""
    return isinstance(output, str) and output.endswith(("/", os.sep))


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """Check that the folder dataset ``path`` (``scores/``) can be written before any work.

    An existing folder is replaced when the run completes, so it must be a previous output:
    nothing in it but ``part-*.parquet`` files.

    Args:
        path: The output folder.

    Returns:
        ``path`` as a ``Path`` (without the trailing ``/``).

    Raises:
        OutputError: If the path is a URL, a file, or a folder that holds other files, or its
            parent folder does not exist or is not writable.
    """
    if is_url(path):
        check_output_path(path)  # refuses it, saying why
    out = Path(path)
    _check_parent(out, path)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"The output ends in / (a folder dataset) but is a file. Received: output={str(path)!r}"
        )
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not fnmatch.fnmatch(p.name, PART_GLOB))
        if foreign:
            raise OutputError(
                "The output folder exists and holds other files than the part-*.parquet of a "
                f"batchuq output (e.g. {foreign[0]!r}); batchuq replaces only its own output "
                f"folders. Received: output={str(path)!r}"
            )
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict:
    """Return the batchuq run metadata stored in a Parquet file written by ``score``.

    Its ``run`` entry (wall time, images/s) is added from the file's footer when recorded. A
    folder dataset (``score --engine ray`` to ``OUT/``) holds it in each of its files.

    Raises:
        UsageError: If the file holds no batchuq metadata.
    """
    if Path(path).is_dir():
        parts = sorted(Path(path).glob(PART_GLOB))
        if not parts:
            raise UsageError(f"The folder holds no part-*.parquet. Received: path={str(path)!r}")
        return metadata_of(pq.read_metadata(parts[0]).metadata, path)
    return metadata_of(pq.read_metadata(path).metadata, path)


def metadata_of(
    key_values: pa.Schema | dict[bytes, bytes] | None, path: str | os.PathLike[str]
) -> dict:
    """The batchuq run metadata of ``path`` (already opened), from its schema or its footer's
    key-value metadata (the footer also holds the ``run`` record).

    Raises:
        UsageError: If it holds no batchuq metadata.
    """
    if isinstance(key_values, pa.Schema):
        key_values = key_values.metadata
    key_values = key_values or {}
    raw = key_values.get(METADATA_KEY)
    if raw is None:
        raise UsageError(f"The file has no batchuq metadata. Received: path={str(path)!r}")
    metadata = json.loads(raw)
    if RUN_METADATA_KEY in key_values:
        metadata["run"] = json.loads(key_values[RUN_METADATA_KEY])
    return metadata


# --------------------------------------------------------------------------------------------
# Checkpoint and sink
# --------------------------------------------------------------------------------------------


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
        with pq.ParquetWriter(temp, schema, compression=_COMPRESSION) as writer:
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
    with pq.ParquetWriter(path, table.schema, compression=_COMPRESSION) as writer:
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
        return pq.ParquetWriter(self.temp_path, self.schema, compression=_COMPRESSION)

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
