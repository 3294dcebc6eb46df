"""What the output holds: the Parquet schema, the rows as record batches, the run metadata.

Rows reach Arrow as record batches built from the NumPy arrays of a whole batch
(``score_record_batch``), never as one Python dict per image. The run's settings are JSON under
the ``batchuq`` key of the schema's metadata (``read_metadata`` reads them back, with the ``run``
record the sink adds to the footer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchuq.compact import PART_GLOB
from batchuq.defaults import (
    STATUS_OK,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
)
from batchuq.errors import UsageError

METADATA_KEY = b"batchuq"
# How the run went (wall time, images/s), known only at its end: a key of the file's footer
# added when the file is closed, read back by ``read_metadata`` as the metadata's ``run``.
RUN_METADATA_KEY = b"batchuq.run"
# How pandas restores its dtypes (see ``pandas_metadata``); written by pyarrow's pandas support.
PANDAS_METADATA_KEY = b"pandas"
SCORE_COLUMNS = ("confidence", "margin", "entropy", "mutual_info", "variation_ratio")
#: Optional OOD score columns, in the order a file holds those it has (docs/output-schema.md).
OOD_COLUMNS = ("max_logit", "energy", "knn_distance", "gp_variance")
CLASS_STATISTICS = ("mean", "median", "std")


def output_schema(
    class_names: list[str],
    metadata: dict | None = None,
    pred_set: bool = False,
    samples_per_image: int | None = None,
    variable_samples: bool = False,
    ood_columns: Sequence[str] = (),
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
        ood_columns: Which of ``OOD_COLUMNS`` to add (float32, after ``passes``).

    Returns:
        The Arrow schema.

    Raises:
        ValueError: If ``ood_columns`` names a column not in ``OOD_COLUMNS``.
    """
    unknown = sorted(set(ood_columns) - set(OOD_COLUMNS))
    if unknown:
        raise ValueError(f"Unknown OOD columns {unknown}; known: {OOD_COLUMNS}")
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
        *[pa.field(name, pa.float32()) for name in OOD_COLUMNS if name in ood_columns],
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
        stats: float arrays: each of ``SCORE_COLUMNS`` ``(batch,)``, each of ``OOD_COLUMNS``
            the schema has ``(batch,)``, and ``mean``, ``median``, ``std``
            ``(batch, classes)`` (other keys are ignored). float64 values are rounded
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
        *[
            _float_column(stats[name], ok)
            for name in OOD_COLUMNS
            if schema.get_field_index(name) >= 0
        ],
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


def read_metadata(path: str | os.PathLike[str]) -> dict:
    """Return the batchuq run metadata stored in a Parquet file written by ``score``.

    Its ``run`` entry (wall time, images/s) is added from the file's footer when recorded. A
    folder dataset (``score --engine ray`` to ``OUT/``) holds it in each of its files.

    Raises:
        UsageError: If the file is missing, not a Parquet file, or holds no batchuq metadata.
    """
    if Path(path).is_dir():
        parts = sorted(Path(path).glob(PART_GLOB))
        if not parts:
            raise UsageError(f"The folder holds no part-*.parquet. Received: path={str(path)!r}")
        path, shown = parts[0], path
    else:
        shown = path
    try:
        footer = pq.read_metadata(path).metadata
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(
            f"Cannot read it as a Parquet file written by `batchuq score`: {exc}. "
            f"Received: path={str(shown)!r}"
        ) from exc
    return metadata_of(footer, shown)


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
