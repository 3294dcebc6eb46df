"""Part files of finished rows, and their compaction into one table in path order.

A resumable run (``--resume``) and the Ray engine keep finished rows as Parquet *part files* in a
folder: each is written under a hidden temporary name and renamed, so a kill never leaves half a
part. The local engine numbers its parts as it writes them (``part-000000.parquet`` ...); a Ray
worker names its part by the position of its first image (``part-at-0000000032.parquet``), so
that a retried task rewrites the same file instead of adding a second one.

``sorted_row_groups`` reads the parts back in the run's natural path order, one row group at a
time, whoever wrote them and however their rows interleave (a run resumed on the other engine
fills the gaps the first one left), and keeps one row per image. Only the ``path`` column of
every part and the parts that the current row group draws from are in memory, never the whole
table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COMPRESSION = "zstd"
PART_GLOB = "part-*.parquet"


def part_name_at(first_position: int) -> str:
    """The name of the part file whose first row is image ``first_position`` of the run.

    Args:
        first_position: Index of the part's first image in the run's natural path order.

    Returns:
        ``part-at-NNNNNNNNNN.parquet``: ten digits, so that names sort as positions do.
    """
    return f"part-at-{first_position:010d}.parquet"


def write_part_file(folder: Path, name: str, table: pa.Table) -> Path:
    """Write ``table`` as ``folder/name`` atomically (a hidden temporary file, then a rename).

    Writing the same name again replaces the file in one step, so readers see either part.

    Args:
        folder: An existing folder.
        name: The part's file name (``part-*.parquet``).
        table: The rows.

    Returns:
        The part's path.
    """
    temp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, temp, compression=COMPRESSION)
        os.replace(temp, folder / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return folder / name


def part_positions(part: Path, position_of: Mapping[str, int] | None, start: int = 0) -> np.ndarray:
    """The positions of a part's rows in the run: ``(rows,)`` int64.

    Args:
        part: A part file with a ``path`` column.
        position_of: The run's position of each relative path; ``None`` numbers the rows from
            ``start`` on, in file order.
        start: First number when ``position_of`` is ``None``.

    Raises:
        ValueError: If the part holds a path that is not one of the run's.
    """
    paths = pq.read_table(part, columns=["path"]).column("path").to_pylist()
    if position_of is None:
        return np.arange(start, start + len(paths), dtype=np.int64)
    unknown = [path for path in paths if path not in position_of]
    if unknown:
        raise ValueError(f"The part {str(part)!r} holds rows of other files, e.g. {unknown[0]!r}.")
    return np.fromiter((position_of[path] for path in paths), np.int64, len(paths))


class SortedParts:
    """The rows of part files in position order, one row per position.

    Args:
        parts: The part files, in the order a duplicate row is preferred (the first one wins).
        position_of: Each relative path's position in the run; ``None`` keeps the rows in the
            order of ``parts`` (as concatenated).

    Attributes:
        positions: ``(rows,)`` int64: the kept rows' positions, increasing.
        duplicates: How many rows were dropped because another part already held the image.
    """

    def __init__(self, parts: Sequence[Path], position_of: Mapping[str, int] | None) -> None:
        self.parts = list(parts)
        per_part, start = [], 0
        for part in self.parts:
            per_part.append(part_positions(part, position_of, start))
            start += len(per_part[-1])
        positions = np.concatenate(per_part) if per_part else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(len(per_part), dtype=np.int64), [len(p) for p in per_part])
        row = np.concatenate([np.arange(len(p)) for p in per_part]) if per_part else owner
        order = np.lexsort((owner, positions))  # by position, then by part: the first wins
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = positions[order][1:] != positions[order][:-1]
        order = order[keep]
        self.duplicates = int(len(keep) - keep.sum())
        self.positions = positions[order]
        self._owner = owner[order]
        self._row = row[order]

    def __len__(self) -> int:
        return len(self.positions)

    def row_groups(self, schema: pa.Schema, group_rows: int) -> Iterator[pa.Table]:
        """Yield the kept rows in position order, ``group_rows`` rows a table (the last fewer).

        A part is read when a group first needs it and dropped after the last group that does.

        Args:
            schema: The schema the rows are given (the parts' own metadata is replaced).
            group_rows: Rows per yielded table.

        Yields:
            Tables with ``schema``.
        """
        last_group = np.zeros(len(self.parts), dtype=np.int64)
        np.maximum.at(last_group, self._owner, np.arange(len(self._owner)) // group_rows)
        loaded: dict[int, pa.Table] = {}
        for group, start in enumerate(range(0, len(self), group_rows)):
            owner = self._owner[start : start + group_rows]
            row = self._row[start : start + group_rows]
            pieces, slots = [], []
            for part in np.unique(owner):
                if part not in loaded:
                    loaded[part] = pq.read_table(self.parts[part], schema=schema)
                mine = np.flatnonzero(owner == part)
                pieces.append(loaded[part].take(pa.array(row[mine])))
                slots.append(mine)
            table = pa.concat_tables(pieces)
            table = table.take(pa.array(np.argsort(np.concatenate(slots), kind="stable")))
            yield table.replace_schema_metadata(schema.metadata)
            for part in [p for p in loaded if last_group[p] <= group]:
                del loaded[part]
