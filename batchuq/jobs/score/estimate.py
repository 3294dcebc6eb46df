"""The label-free accuracy estimate of a scoring run (``score --calibration``), from its rows.

With a calibration that holds ATC thresholds (``postprocess.atc``), each engine counts its
scored rows as they are written (``count_rows``), and the rows a checkpoint already held
(``count_parts``: a resumed run, the Ray engine's parts); the counts go into the footer's run
record as ``estimated_accuracy`` (``AccuracyEstimate.as_metadata``) and into the summary line.
The counts are read from the rows' ``mean_*`` columns, tempered unless the run applied the
temperature already, so the estimate is what the Parquet file holds, recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchuq.defaults import STATUS_OK
from batchuq.jobs.score.plan import RunPlan
from batchuq.postprocess.atc import AccuracyEstimate


def run_estimate(plan: RunPlan) -> AccuracyEstimate | None:
    """A fresh counter for the run, or ``None`` without a calibration holding ATC thresholds."""
    if plan.calibration is None:
        return None
    return plan.calibration.accuracy_estimate(tempered=bool(plan.temperature))


def _mean_columns(plan: RunPlan) -> list[str]:
    return [f"mean_{name}" for name in plan.labels.class_names]


def count_rows(
    estimate: AccuracyEstimate | None, plan: RunPlan, rows: pa.RecordBatch | pa.Table
) -> None:
    """Add the scored (``ok``) rows of a batch or part to the counts (nothing without any)."""
    if estimate is None:
        return
    ok = rows.filter(pc.equal(rows.column("status"), STATUS_OK))
    if ok.num_rows == 0:
        return
    means = np.column_stack(
        [ok.column(name).to_numpy(zero_copy_only=False) for name in _mean_columns(plan)]
    )
    estimate.add(means.astype(np.float32))


def count_parts(
    estimate: AccuracyEstimate | None,
    plan: RunPlan,
    parts: Iterable[Path],
    skip: set[str] | None = None,
) -> None:
    """Add the scored rows of part files, one at a time, each image once.

    Args:
        estimate: The counter (``None``: nothing to do).
        plan: The run.
        parts: Part files (``--resume`` checkpoints, the Ray engine's parts).
        skip: Paths not to count (a duplicate row of an image another part holds); the paths
            counted are added to it.
    """
    if estimate is None:
        return
    seen = set() if skip is None else skip
    for part in parts:
        table = pq.read_table(part, columns=["path", "status", *_mean_columns(plan)])
        paths = table.column("path").to_pylist()
        new = np.array([path not in seen for path in paths], dtype=bool)
        seen.update(paths)
        count_rows(estimate, plan, table.filter(pa.array(new)))
