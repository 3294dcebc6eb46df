"""The Parquet output: record batches built by columns equal the rows the job wrote one dict
per image; the sink is atomic; a checkpoint keeps finished rows for the next run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import INTEGER_COLUMNS, assert_integer_columns_stay_integers

from batchuq.compact import SortedParts, part_name_at, write_part_file
from batchuq.defaults import STATUS_OK, UNCLASSIFIED, UNCLASSIFIED_NAME
from batchuq.errors import CheckpointError, OutputError, UsageError
from batchuq.output.paths import check_output_path
from batchuq.output.schema import SCORE_COLUMNS, output_schema, read_metadata, score_record_batch
from batchuq.output.sink import Checkpoint, ParquetSink, write_folder_from_parts

CLASSES = ["cat", "dog", "owl"]
GARBAGE = 1234.5  # what an unreadable image's rows hold; it must not reach the output


def _batch_arrays(n: int = 7, per_image: int = 4, seed: int = 0, float64: bool = False) -> dict:
    """The arrays of one batch: rows 1 and 4 are error rows holding garbage values."""
    rng = np.random.default_rng(seed)
    samples = rng.dirichlet(np.ones(len(CLASSES)), size=(n, per_image)).astype(np.float32)
    statuses = [STATUS_OK] * n
    statuses[1] = "error: cannot identify image file"
    statuses[4] = "error: image too large"
    bad = np.array([s != STATUS_OK for s in statuses])
    samples[bad] = GARBAGE
    mean = samples.mean(axis=1)
    stats = {
        "mean": mean,
        "median": np.median(samples, axis=1).astype(np.float32),
        "std": samples.std(axis=1),
        **{name: rng.random(n).astype(np.float32) for name in SCORE_COLUMNS},
    }
    stats["entropy"][bad] = GARBAGE
    if float64:  # temperature scaling recomputes some statistics in float64
        stats = {k: v.astype(np.float64) + 1e-9 for k, v in stats.items()}
    decision = mean.argmax(axis=1)
    decision[[2, 5]] = UNCLASSIFIED
    decision[4] = 99  # garbage index of an error row
    return {
        "paths": [f"c{i % 2}/img_{i}.png" for i in range(n)],
        "labels": [None if i == 3 else f"label {i % 2}" for i in range(n)],
        "label_indices": [None if i == 3 else i % 2 for i in range(n)],
        "statuses": statuses,
        "pred_index": mean.argmax(axis=1),
        "decision_index": decision,
        "stats": stats,
        "pred_sets": samples.mean(axis=1) > 0.3,  # some rows with an empty set
        "samples": samples,
    }


def _rows_one_dict_per_image(arrays: dict, pred_sets: bool, samples: bool) -> list[dict]:
    """The rows as the job built them before record batches (score._rows and
    _add_prediction_sets), kept here as the reference."""
    rows = []
    for i, status in enumerate(arrays["statuses"]):
        row: dict = {
            "path": arrays["paths"][i],
            "label": arrays["labels"][i],
            "label_index": arrays["label_indices"][i],
            "status": status,
        }
        if status == STATUS_OK:
            pred = int(arrays["pred_index"][i])
            row["pred"] = CLASSES[pred]
            row["pred_index"] = pred
            decision = int(arrays["decision_index"][i])
            row["decision"] = UNCLASSIFIED_NAME if decision == UNCLASSIFIED else CLASSES[decision]
            for column in SCORE_COLUMNS:
                row[column] = float(arrays["stats"][column][i])
            for stat in ("mean", "median", "std"):
                for c, name in enumerate(CLASSES):
                    row[f"{stat}_{name}"] = float(arrays["stats"][stat][i][c])
            if samples:
                row["samples"] = list(arrays["samples"][i])
            if pred_sets:
                row["pred_set"] = [CLASSES[c] for c in np.flatnonzero(arrays["pred_sets"][i])]
        rows.append(row)
    return rows


def _schema(pred_sets: bool, samples: bool, per_image: int = 4) -> pa.Schema:
    return output_schema(
        CLASSES, {"run": 1}, pred_set=pred_sets, samples_per_image=per_image if samples else None
    )


def _record_batch(arrays: dict, pred_sets: bool, samples: bool) -> pa.RecordBatch:
    return score_record_batch(
        _schema(pred_sets, samples),
        CLASSES,
        **{k: v for k, v in arrays.items() if k not in ("pred_sets", "samples")},
        pred_sets=arrays["pred_sets"] if pred_sets else None,
        samples=arrays["samples"] if samples else None,
    )


@pytest.mark.parametrize("samples", [False, True], ids=["no-samples", "samples"])
@pytest.mark.parametrize("pred_sets", [False, True], ids=["no-sets", "sets"])
@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_record_batch_equals_the_rows_built_one_dict_per_image(
    pred_sets: bool, samples: bool, float64: bool
) -> None:
    arrays = _batch_arrays(float64=float64)
    schema = _schema(pred_sets, samples)
    expected = pa.Table.from_pylist(_rows_one_dict_per_image(arrays, pred_sets, samples), schema)
    got = pa.Table.from_batches([_record_batch(arrays, pred_sets, samples)])
    assert got.schema.equals(expected.schema, check_metadata=True)
    assert got.equals(expected)
    assert got.to_pylist() == expected.to_pylist()


def test_error_rows_hold_nulls_and_no_garbage() -> None:
    arrays = _batch_arrays()
    batch = _record_batch(arrays, pred_sets=True, samples=True)
    rows = batch.to_pylist()
    computed = ["pred", "pred_index", "decision", *SCORE_COLUMNS, "pred_set", "samples"]
    computed += [f"{stat}_{name}" for stat in ("mean", "median", "std") for name in CLASSES]
    for i in (1, 4):
        assert rows[i]["status"].startswith("error")
        assert all(rows[i][column] is None for column in computed)
    assert rows[2]["decision"] == UNCLASSIFIED_NAME
    # Nulls, and not even hidden under them: the buffers hold no garbage value.
    child = batch.column("samples").values.values.to_numpy()
    assert GARBAGE not in child
    assert GARBAGE not in batch.column("entropy").to_numpy(zero_copy_only=False)


def test_record_batch_does_not_share_the_callers_arrays() -> None:
    arrays = _batch_arrays()
    batch = _record_batch(arrays, pred_sets=False, samples=True)
    before = batch.to_pylist()
    arrays["samples"][:] = 0.0  # e.g. a buffer reused for the next batch
    arrays["stats"]["mean"][:] = 0.0
    assert batch.to_pylist() == before


def test_optional_columns_must_match_the_schema() -> None:
    arrays = _batch_arrays()
    with pytest.raises(ValueError, match="has a `samples` column"):
        score_record_batch(
            _schema(False, True),
            CLASSES,
            **{k: v for k, v in arrays.items() if k not in ("pred_sets", "samples")},
        )
    with pytest.raises(ValueError, match="has no `pred_set` column"):
        score_record_batch(
            _schema(False, False),
            CLASSES,
            **{k: v for k, v in arrays.items() if k != "samples"},
        )


def _batches(count: int, size: int = 2) -> list[pa.RecordBatch]:
    """``count`` record batches of ``size`` rows with distinct paths (row 1 an error row)."""
    out = []
    for b in range(count):
        arrays = _batch_arrays(seed=b)
        arrays["paths"] = [f"img_{b * size + i:03d}.png" for i in range(7)]
        out.append(_record_batch(arrays, pred_sets=False, samples=False).slice(0, size))
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sink_writes_row_groups_and_renames_into_place(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    batches = _batches(5)
    with ParquetSink(out, batches[0].schema, row_group_size=4) as sink:
        assert sink.temp_path.exists() and not out.exists()
        for batch in batches:
            sink.write(batch)
        assert sink.done.paths == set()
    assert sink.rows_written == 10
    assert pq.read_table(out).equals(pa.Table.from_batches(batches))
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 4 + 4 + 2 rows
    assert read_metadata(out) == {"run": 1}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["error", "interrupt"])
def test_an_exception_in_the_sink_leaves_the_previous_output(
    tmp_path: Path, error: type[BaseException]
) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous output")
    batches = _batches(5)
    with pytest.raises(error), ParquetSink(out, batches[0].schema, row_group_size=4) as sink:
        for batch in batches[:3]:
            sink.write(batch)
        raise error("stop")
    assert out.read_bytes() == b"previous output"
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "out.parquet.checkpoint").exists()


def test_checkpoint_keeps_finished_rows_for_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    batches = _batches(5)
    fingerprint = {"passes": 10, "files": "abc"}
    folder = tmp_path / "out.parquet.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        checkpoint = Checkpoint(out, fingerprint, rows_per_part=4)
        with ParquetSink(out, batches[0].schema, checkpoint=checkpoint) as sink:
            for batch in batches[:3]:  # 4 rows make a part; 2 are buffered at the interrupt
                sink.write(batch)
            raise KeyboardInterrupt
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        "part-000000.parquet",
        "part-000001.parquet",
        "run.json",
    ]
    assert _leftovers(tmp_path) == [] and _leftovers(folder) == []

    with pytest.raises(CheckpointError, match="was made by a run with other settings"):
        ParquetSink(out, batches[0].schema, checkpoint=Checkpoint(out, {"passes": 20})).__enter__()
    assert folder.is_dir()  # a refused checkpoint is left alone

    # Tuples and lists are the same after JSON: the fingerprint compares as run.json holds it.
    again = Checkpoint(out, {"files": "abc", "passes": 10}, rows_per_part=4)
    with ParquetSink(out, batches[0].schema, checkpoint=again) as sink:
        assert sink.done.paths == {f"img_{i:03d}.png" for i in range(6)}
        assert sink.done.statuses[:2] == [STATUS_OK, "error: cannot identify image file"]
        assert len(sink.done.decisions) == 6
        for batch in batches[3:]:
            sink.write(batch)
    assert sink.rows_written == 4
    assert pq.read_table(out).equals(pa.Table.from_batches(batches))
    assert read_metadata(out) == {"run": 1}
    assert not folder.exists()
    assert _leftovers(tmp_path) == []


def test_checkpoint_parts_are_written_atomically_and_numbered_on(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    checkpoint = Checkpoint(out, {"run": 1})
    assert checkpoint.open().paths == set()
    (checkpoint.folder / ".part-000000.parquet.tmp-1").write_bytes(b"half a part")  # a kill
    table = pa.Table.from_batches(_batches(1))
    checkpoint.write_part(table)
    reopened = Checkpoint(out, {"run": 1})
    assert len(reopened.open().statuses) == 2
    assert _leftovers(checkpoint.folder) == []  # the stray temporary part is gone
    assert reopened.write_part(table).name == "part-000001.parquet"
    assert [p.name for p in reopened.parts()] == ["part-000000.parquet", "part-000001.parquet"]
    reopened.remove()
    assert not checkpoint.folder.exists()


def test_check_output_path_refuses_what_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a folder, not a file. Received: output="):
        check_output_path(tmp_path)
    with pytest.raises(OutputError, match="does not exist. Received: output="):
        check_output_path(tmp_path / "missing" / "out.parquet")
    message = "The output must end in .parquet: batchuq writes Parquet. Received: output="
    with pytest.raises(OutputError, match=message):
        check_output_path(tmp_path / "out.csv", suffix=".parquet")
    assert check_output_path(tmp_path / "OUT.PARQUET", suffix=".parquet").name == "OUT.PARQUET"
    assert check_output_path(tmp_path / "out.json") == tmp_path / "out.json"
    assert issubclass(OutputError, UsageError) and issubclass(OutputError, ValueError)


def test_read_metadata_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    with pytest.raises(UsageError, match="has no batchuq metadata. Received: path="):
        read_metadata(path)


@pytest.mark.parametrize("resumable", [False, True])
def test_the_run_record_goes_into_the_footer_and_read_metadata_returns_it(
    tmp_path: Path, resumable: bool
) -> None:
    out = tmp_path / "out.parquet"
    batches = _batches(3)
    schema = batches[0].schema.with_metadata({b"batchuq": b'{"class_names": ["cat"]}'})
    checkpoint = Checkpoint(out, {"files": "x"}, rows_per_part=2) if resumable else None
    with ParquetSink(out, schema, checkpoint=checkpoint) as sink:
        for batch in batches:
            sink.write(batch.replace_schema_metadata(schema.metadata))
        sink.record_run({"seconds": 1.25, "images_per_second": 4.8})
    metadata = read_metadata(out)
    assert metadata["class_names"] == ["cat"]
    assert metadata["run"] == {"seconds": 1.25, "images_per_second": 4.8}
    assert pq.read_table(out).num_rows == 6
    # A file without a run record (written before there was one) has no `run`.
    pq.write_table(pq.read_table(out), tmp_path / "old.parquet")
    assert "run" not in read_metadata(tmp_path / "old.parquet")


def _batches_with_integer_nulls(count: int) -> list[pa.RecordBatch]:
    """``count`` batches of 7 rows: rows 1 and 4 error rows (no ``pred_index``, no ``passes``),
    row 3 unlabelled (no ``label_index``)."""
    out = []
    for b in range(count):
        arrays = _batch_arrays(seed=b)
        arrays["paths"] = [f"img_{b * 7 + i:03d}.png" for i in range(7)]
        bad = np.array([status != STATUS_OK for status in arrays["statuses"]])
        passes = np.where(bad, 0, 8 + b)  # whatever an error row holds is dropped
        batch = score_record_batch(
            _schema(False, False),
            CLASSES,
            **{k: v for k, v in arrays.items() if k not in ("pred_sets", "samples")},
            passes=passes,
        )
        out.append(batch)
    return out


def _write_resumed(out: Path, batches: list[pa.RecordBatch]) -> Path:
    """An interrupted run's checkpoint parts, then the run that finishes and compacts them."""
    schema = batches[0].schema
    with pytest.raises(KeyboardInterrupt):
        checkpoint = Checkpoint(out, {"run": 1}, rows_per_part=4)
        with ParquetSink(out, schema, checkpoint=checkpoint) as sink:
            sink.write(batches[0])
            raise KeyboardInterrupt
    assert [p.name for p in Checkpoint(out, {"run": 1}).parts()] == ["part-000000.parquet"]
    with ParquetSink(out, schema, checkpoint=Checkpoint(out, {"run": 1}, rows_per_part=4)) as sink:
        for batch in batches[1:]:
            sink.write(batch)
    return out


def _write_folder(out: Path, batches: list[pa.RecordBatch]) -> Path:
    """Part files as the Ray workers write them, compacted into a folder dataset (``OUT/``)."""
    parts = out.with_name("parts")
    parts.mkdir()
    schema = batches[0].schema
    for index, batch in enumerate(batches):  # the first image's position names the part
        write_part_file(parts, part_name_at(index * 7), pa.Table.from_batches([batch]))
    order = [path for batch in batches for path in batch.column("path").to_pylist()]
    rows = SortedParts(sorted(parts.iterdir()), {path: i for i, path in enumerate(order)})
    write_folder_from_parts(rows, out, schema, rows_per_file=5, group_rows=5)
    assert len(list(out.iterdir())) == 5  # 21 rows, 5 a file
    return out


def _write_file(out: Path, batches: list[pa.RecordBatch]) -> Path:
    with ParquetSink(out, batches[0].schema, row_group_size=4) as sink:
        for batch in batches:
            sink.write(batch)
    return out


@pytest.mark.parametrize(
    "write", [_write_file, _write_resumed, _write_folder], ids=["file", "resumed", "folder"]
)
def test_integer_columns_with_nulls_stay_integers_in_pandas_polars_and_duckdb(
    tmp_path: Path, write
) -> None:
    """Issue 19: pandas read ``pred_index`` and ``passes`` as float64 once an error row made
    them null. The schema's pandas metadata makes them nullable ``Int64``, on every writer, and
    keeps the batchuq metadata; the Arrow types (what polars and DuckDB read) stay int64."""
    batches = _batches_with_integer_nulls(3)
    out = write(tmp_path / "out.parquet", batches)
    assert_integer_columns_stay_integers(out)
    assert read_metadata(out) == {"run": 1}
    one_file = next(out.iterdir()) if out.is_dir() else out
    pandas = pq.read_schema(one_file).pandas_metadata
    assert {c["name"]: c["numpy_type"] for c in pandas["columns"]}["pred_index"] == "Int64"
    assert pq.read_table(out).num_rows == 21


def test_pandas_metadata_names_every_column_and_changes_no_arrow_type() -> None:
    schema = output_schema(CLASSES, {"run": 1}, pred_set=True, samples_per_image=4)
    columns = schema.pandas_metadata["columns"]
    assert [c["name"] for c in columns] == schema.names
    integers = {f.name for f in schema if pa.types.is_integer(f.type)}
    assert integers == set(INTEGER_COLUMNS)
    assert {c["name"] for c in columns if c["numpy_type"] == "Int64"} == integers
    assert schema.pandas_metadata["index_columns"] == []  # a plain RangeIndex
    # The types pandas gives an empty file are those of the one with rows and nulls.
    frame = schema.empty_table().to_pandas()
    assert all(str(frame[name].dtype) == "Int64" for name in integers)
    assert frame["mean_cat"].dtype == np.float32
