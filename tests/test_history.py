"""History as a dataset: ``score ... HISTORY/ --partition date=...`` writes one Hive partition
per night, replaced atomically on a rerun, that pandas, polars and DuckDB read as one table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_TEST

from batchuq.errors import StopRequested, UsageError
from batchuq.jobs.score import RaySettings, RunControl, ScoreOptions, score_directory
from batchuq.output.history import Partition, partition_checkpoint
from batchuq.output.schema import read_metadata

OPTIONS = ScoreOptions(passes=3, batch_size=4)


def night(root: Path, first: int, per_class: int = 2, classes: int = 4) -> Path:
    """A night's folder: ``per_class`` test digits of the first ``classes`` digits."""
    for folder in sorted(SAMPLE_TEST.iterdir())[:classes]:
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[first : first + per_class]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def visible_files(history: Path) -> list[str]:
    """What a reader's glob can find under ``history``, hidden files and folders included."""
    return sorted(str(p.relative_to(history)) for p in history.rglob("*") if p.is_file())


def test_partition_is_key_equals_a_folder_safe_value() -> None:
    assert Partition.parse("date=2026-12-01").folder_name == "date=2026-12-01"
    assert Partition.parse("camera_id=cam-7.b+2") == Partition("camera_id", "cam-7.b+2")
    for bad, says in [
        ("2026-12-01", "KEY=VALUE"),
        ("=x", "KEY=VALUE"),
        ("1day=x", "KEY=VALUE"),
        ("date=", "names a folder"),
        ("date=../etc", "names a folder"),
        ("date=a/b", "names a folder"),
        ("date=.hidden", "names a folder"),
        ("date=x=y", "names a folder"),
        ("status=ok", "column of batchuq"),
        ("mean_cat=1", "column of batchuq"),
    ]:
        with pytest.raises(UsageError, match=says) as caught:
            Partition.parse(bad)
        assert str(caught.value).endswith(f"Received: partition={bad!r}")


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """A history of two nights, and the first night also scored to a single file."""
    work = tmp_path_factory.mktemp("history")
    first, second = night(work / "in" / "a", 0), night(work / "in" / "b", 2)
    history = work / "history"
    score_directory(first, f"{history}/", OPTIONS, partition="date=2026-12-01")
    score_directory(second, history, OPTIONS, partition=Partition("date", "2026-12-02"))
    single = work / "single.parquet"
    score_directory(first, single, OPTIONS)
    return history, single, first, second


def test_two_nights_read_as_one_table_by_pandas_polars_and_duckdb(two_nights) -> None:
    history, single, *_ = two_nights
    assert visible_files(history) == [
        "date=2026-12-01/part-0.parquet",
        "date=2026-12-02/part-0.parquet",
    ]
    frame = pd.read_parquet(history)
    nights = {"2026-12-01": 8, "2026-12-02": 8}
    assert frame["date"].astype(str).value_counts().to_dict() == nights
    assert str(frame["passes"].dtype) == "Int64"  # the file's pandas metadata still applies
    first = frame[frame["date"] == "2026-12-01"].drop(columns="date").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, pd.read_parquet(single))  # a rerun: bitwise

    table = pl.read_parquet(f"{history}/**/*.parquet", hive_partitioning=True)
    assert table.schema["date"] == pl.Date
    counts = table.group_by("date").len().sort("date")
    assert [str(d) for d in counts["date"]] == list(nights) and counts["len"].to_list() == [8, 8]

    rows = duckdb.sql(
        f"SELECT CAST(date AS VARCHAR), count(*), count(DISTINCT path) "
        f"FROM read_parquet('{history}/*/*.parquet', hive_partitioning = true) "
        "GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert rows == [("2026-12-01", 8, 8), ("2026-12-02", 8, 8)]


def test_a_partition_keeps_the_single_files_metadata(two_nights) -> None:
    history, single, first, _ = two_nights
    part = read_metadata(history / "date=2026-12-01")
    alone = read_metadata(single)
    assert part.pop("partition") == {"date": "2026-12-01"} and "partition" not in alone
    for varying in ("created", "run"):
        assert part.pop(varying) and alone.pop(varying)
    assert part == alone
    assert (
        pq.read_schema(single).names
        == pq.read_schema(history / "date=2026-12-01" / "part-0.parquet").names
    )


def test_a_rerun_replaces_the_partition_and_a_failed_one_leaves_it(two_nights, tmp_path) -> None:
    _, _, first, second = two_nights
    history = tmp_path / "history"
    score_directory(first, history, OPTIONS, partition="date=2026-12-01")
    part = history / "date=2026-12-01" / "part-0.parquet"
    before = part.read_bytes()
    stop = RunControl(should_stop=lambda: True)
    with pytest.raises(StopRequested):
        score_directory(second, history, OPTIONS, stop, partition="date=2026-12-01")
    assert part.read_bytes() == before
    assert visible_files(history) == ["date=2026-12-01/part-0.parquet"]
    with pytest.raises(StopRequested):  # a failed first night leaves no empty partition
        score_directory(second, history, OPTIONS, stop, partition="date=2026-12-02")
    assert sorted(p.name for p in history.iterdir()) == ["date=2026-12-01"]

    score_directory(second, history, OPTIONS, partition="date=2026-12-01")
    paths = pd.read_parquet(history)["path"].tolist()
    assert paths == sorted(str(p.relative_to(second)) for p in second.rglob("*.png"))
    assert visible_files(history) == ["date=2026-12-01/part-0.parquet"]
    assert json.loads(pq.read_schema(part).metadata[b"batchuq"])["images"] == str(second)


def test_resume_keeps_its_checkpoint_out_of_the_history(two_nights, tmp_path) -> None:
    _, _, first, _ = two_nights
    history = tmp_path / "history"
    calls = iter(range(1000))
    stop_after_a_batch = RunControl(resume=True, should_stop=lambda: next(calls) >= 2)
    with pytest.raises(StopRequested):
        score_directory(first, history, OPTIONS, stop_after_a_batch, partition="date=1")
    checkpoint = partition_checkpoint(history, Partition("date", "1"))
    assert checkpoint == tmp_path / ".history.date=1.checkpoint"
    assert list(checkpoint.glob("part-*.parquet"))  # finished rows kept, outside the history
    assert not history.exists() or visible_files(history) == []
    score_directory(first, history, OPTIONS, RunControl(resume=True), partition="date=1")
    assert not checkpoint.exists() and visible_files(history) == ["date=1/part-0.parquet"]
    assert len(pd.read_parquet(history)) == 8


def test_history_refuses_what_it_cannot_write(two_nights, tmp_path) -> None:
    _, _, first, _ = two_nights
    (tmp_path / "h" / "date=1").mkdir(parents=True)
    (tmp_path / "h" / "date=1" / "other.parquet").write_bytes(b"")
    with pytest.raises(UsageError, match="other.parquet"):
        score_directory(first, tmp_path / "h", OPTIONS, partition="date=1")
    with pytest.raises(UsageError, match="history folder"):
        score_directory(first, tmp_path / "out.parquet", OPTIONS, partition="date=1")
    with pytest.raises(UsageError, match="local engine only"):
        score_directory(first, tmp_path / "h", OPTIONS, ray=RaySettings(), partition="date=2")
