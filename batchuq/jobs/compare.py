"""Compare files written by ``batchuq score`` on the same folder: one row per file, one table.

Each file is one method or setting (deterministic, MC dropout, TTA, an ensemble, SNGP, ...) run
over the same images. ``compare_files`` evaluates every file once with
``batchuq.jobs.evaluate.evaluate_file`` (every number in the table is evaluate's: this module
implements no metric) and keeps one row per file: N, accuracy, coverage and selective accuracy
under the file's own decision rule, NLL, Brier, ECE, AURC, the AUROC of ``entropy`` for wrong vs
right predictions and for OOD vs in-distribution images, the mean prediction-set size and the
images/s recorded by ``score``.

Files must hold the same images (the same ``path`` set); with ``intersect=True`` each is cut to
the paths they all hold, with a warning saying how many rows each lost.

A shift series (``series=True``) is a set of files scored on corrupted copies of a folder, as
``batchuq shift IMAGES OUT_DIR`` writes them (``OUT_DIR/<corruption>/<severity>/...``). Each
file's corruption and severity are read from the end of the ``images`` folder in its metadata
(``.../gaussian_noise/3`` is ``gaussian_noise`` at severity 3; any other folder is the clean set,
severity 0). Files of one method share a name (``--names``, or by default the method, T and K
from the metadata); ``series_table`` averages accuracy, ECE, NLL and Brier over the corruptions
of each severity, per method (the figure of Ovadia et al. 2019).

``format_comparison`` renders the tables for a terminal. The HTML report and its figures are
drawn by ``batchuq.report.compare`` from the ``Comparison`` returned here (the ``Evaluation`` of
each file keeps its reliability bins and risk-coverage curve); this job draws nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from batchuq import metrics
from batchuq.defaults import DEFAULT_METHOD, DEFAULT_SEED
from batchuq.errors import UsageError
from batchuq.jobs import evaluate as evaluate_job
from batchuq.jobs.compare_rules import format_rules, rule_columns
from batchuq.jobs.evaluate import Evaluation, evaluate_file

logger = logging.getLogger("batchuq")

# The uncertainty score of the table's two AUROC columns (evaluate computes every score's).
COMPARED_SCORE = "entropy"
# The metrics a shift series averages over corruptions, per severity and method.
SERIES_METRICS = ("accuracy", "ece", "nll", "brier")

__all__ = [
    "COMPARED_SCORE",
    "SERIES_COLUMNS",
    "SERIES_METRICS",
    "TABLE_COLUMNS",
    "Comparison",
    "Shift",
    "DEFAULT_BOOTSTRAP",
    "INTERVAL_LEVEL",
    "INTERVAL_METRICS",
    "INTERVAL_COLUMNS",
    "OOD_SCORE_COLUMNS",
    "compare_files",
    "format_cell",
    "format_comparison",
    "format_interval",
    "format_signed",
    "interval_caption",
    "interval_rows",
    "ood_score_rows",
    "present_columns",
    "series_table",
    "shift_of",
    "table_cells",
    "verdict",
    "with_shift_labels",
]


# --------------------------------------------------------------------------------------------
# Shift series
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shift:
    """Where a file sits in a shift series.

    Attributes:
        corruption: The corruption's name; ``None`` for the clean folder.
        severity: 1, 2, ... for a corrupted folder; 0 for the clean one.
    """

    corruption: str | None = None
    severity: int = 0

    @property
    def label(self) -> str:
        """``<corruption>/<severity>``, or ``clean``."""
        return "clean" if self.corruption is None else f"{self.corruption}/{self.severity}"


def shift_of(images: str | os.PathLike[str] | None) -> Shift:
    """The corruption and severity of a scored folder, from the end of its path.

    Args:
        images: The ``images`` folder of a file's metadata.

    Returns:
        ``Shift(corruption, severity)`` if the folder ends in ``<corruption>/<severity>`` with a
        positive integer severity (the layout ``batchuq shift`` writes); else the clean
        ``Shift()``.
    """
    parts = PurePath(images).parts if images else ()
    if len(parts) >= 2 and parts[-1].isascii() and parts[-1].isdigit() and int(parts[-1]) > 0:
        return Shift(parts[-2], int(parts[-1]))
    return Shift()


def _mean(values: list[float | None]) -> float | None:
    """The mean of the defined values; ``None`` if there are none."""
    defined = [float(v) for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def series_table(rows: Sequence[dict]) -> list[dict]:
    """The mean over corruptions of each ``SERIES_METRICS`` entry, per method and severity.

    Args:
        rows: Rows of a ``Comparison`` made with ``series=True`` (keys ``name``, ``corruption``,
            ``severity`` and the metrics).

    Returns:
        One dict per (name, severity), names in order of first appearance and severities
        ascending: ``name``, ``severity``, ``corruptions`` (how many were averaged; 0 for the
        clean files at severity 0) and the mean of each metric over them (``None`` if undefined
        for all).
    """
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["name"], row["severity"]), []).append(row)
    order = list(dict.fromkeys(row["name"] for row in rows))
    table = []
    for name, severity in sorted(cells, key=lambda key: (order.index(key[0]), key[1])):
        members = cells[(name, severity)]
        corruptions = {row["corruption"] for row in members} - {None}
        entry: dict[str, Any] = {
            "name": name,
            "severity": severity,
            "corruptions": len(corruptions),
        }
        entry.update({key: _mean([row[key] for row in members]) for key in SERIES_METRICS})
        table.append(entry)
    return table


def _check_series_cells(names: list[str], shifts: list[Shift], paths: list[str]) -> None:
    """Refuse two files of one method at the same corruption and severity.

    Raises:
        UsageError: If two files share name, corruption and severity.
    """
    seen: dict[tuple[str, Shift], str] = {}
    for name, shift, path in zip(names, shifts, paths, strict=True):
        if (name, shift) in seen:
            raise UsageError(
                f"Two files of the series are {name!r} at {shift.label}; give each method's "
                f"files their own name with `names`. Received: paths={[seen[(name, shift)], path]}"
            )
        seen[(name, shift)] = path


# --------------------------------------------------------------------------------------------
# Intervals: a paired bootstrap over images
# --------------------------------------------------------------------------------------------

# The metrics given an interval, and which way is better: +1 higher, -1 lower, 0 neither (a
# rule that accepts more images is not better or worse for it; its verdict is higher/lower).
INTERVAL_METRICS = {
    "accuracy": 1,
    "coverage": 0,
    "selective_accuracy": 1,
    "nll": -1,
    "brier": -1,
    "ece": -1,
    "aurc": -1,
    "auroc_error": 1,
    "ood_auroc": 1,
}
DEFAULT_BOOTSTRAP = metrics.DEFAULT_RESAMPLES
INTERVAL_LEVEL = 0.95


@dataclass(frozen=True, eq=False)
class _RunImages:
    """One run's per-image arrays for the bootstrap; positions index the group's images.

    ``labelled`` are the positions of the labelled ok rows, which the next seven arrays
    describe; ``ok`` / ``ok_entropy`` the ok rows (the in-distribution side of the OOD
    AUROC); ``ood`` / ``ood_entropy`` the ok OOD rows, positions into the group's OOD images.
    """

    labelled: np.ndarray
    correct: np.ndarray
    accepted: np.ndarray
    decision_correct: np.ndarray
    confidence: np.ndarray
    nll: np.ndarray
    brier: np.ndarray
    entropy: np.ndarray
    ok: np.ndarray
    ok_entropy: np.ndarray
    ood: np.ndarray | None
    ood_entropy: np.ndarray | None


def _ood_rows(evaluation: Evaluation, common: set[str] | None) -> pd.DataFrame:
    """The OOD rows of a file: all, or with ``common`` those ``--intersect`` kept if it cut."""
    frame = evaluation.ood_source.frame  # type: ignore[union-attr]
    if common is None or len(frame) == len(evaluation.ood_ok):  # type: ignore[arg-type]
        return frame
    return frame[frame["path"].astype(str).isin(common)]


def _by_image(positions: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """``positions`` and ``arrays`` in the order of the group's images.

    Every run then sums its images in the same order, so that runs with the same values give
    the same resampled metrics to the last bit, and their differences are exactly 0.
    """
    order = np.argsort(positions, kind="stable")
    return [positions[order], *(array[order] for array in arrays)]


def _run_images(evaluation: Evaluation, index: pd.Index, ood_index: pd.Index | None) -> _RunImages:
    """The arrays the resampled metrics of one run need (``_RunImages``)."""
    lab, frame = evaluation.labelled, evaluation.frame
    positions = index.get_indexer(frame["path"].astype(str))
    probs = frame.loc[lab.mask, [f"mean_{name}" for name in evaluation.class_names]]
    probs = probs.to_numpy(np.float64, na_value=np.nan)
    labelled = len(lab.labels) > 0
    nll = metrics.nll_terms(probs, lab.labels) if labelled else np.zeros(0)
    brier = metrics.brier_terms(probs, lab.labels) if labelled else np.zeros(0)
    entropy = evaluation.scores[COMPARED_SCORE]
    ood = ood_entropy = None
    if ood_index is not None and evaluation.ood_ok is not None:
        ood_frame = _ood_rows(evaluation, set(ood_index))
        ood_ok = evaluation.ood_ok
        ood, ood_entropy = _by_image(
            ood_index.get_indexer(ood_frame["path"].astype(str))[ood_ok],
            evaluation.ood_scores[COMPARED_SCORE][ood_ok],  # type: ignore[index]
        )
    kept = _by_image(
        positions[lab.mask],
        *(lab.correct, lab.accepted, lab.decision_correct, lab.confidence, nll, brier),
        entropy[lab.mask],
    )
    ok, ok_entropy = _by_image(positions[evaluation.ok], entropy[evaluation.ok])
    return _RunImages(*kept, ok=ok, ok_entropy=ok_entropy, ood=ood, ood_entropy=ood_entropy)


def _resampled(run: _RunImages, row: dict, counts: np.ndarray, ood_counts: Any) -> np.ndarray:
    """Every ``INTERVAL_METRICS`` entry of one run in each resample, shape ``(b, metrics)``.

    A metric whose value is undefined for the whole file (``None`` in its row) stays NaN.
    """
    w = counts[:, run.labelled]
    accepted = run.accepted
    compute = {
        "accuracy": lambda: metrics.resampled_mean(run.correct, w),
        "coverage": lambda: metrics.resampled_mean(accepted, w),
        "selective_accuracy": lambda: metrics.resampled_mean(
            run.decision_correct[accepted], w[:, accepted]
        ),
        "nll": lambda: metrics.resampled_mean(run.nll, w),
        "brier": lambda: metrics.resampled_mean(run.brier, w),
        "ece": lambda: metrics.resampled_ece(run.confidence, run.correct, w),
        "aurc": lambda: metrics.resampled_aurc(run.confidence, run.correct, w),
        "auroc_error": lambda: metrics.resampled_auroc(run.entropy, ~run.correct, w),
        "ood_auroc": lambda: metrics.resampled_auroc(
            np.concatenate([run.ok_entropy, run.ood_entropy]),
            np.repeat([False, True], [len(run.ok), len(run.ood)]),
            np.concatenate([counts[:, run.ok], ood_counts[:, run.ood]], axis=1),
        ),
    }
    out = np.full((len(counts), len(INTERVAL_METRICS)), np.nan)
    for j, key in enumerate(INTERVAL_METRICS):
        if row.get(key) is not None:
            out[:, j] = compute[key]()
    return out


def _group_samples(
    evaluations: list[Evaluation], rows: list[dict], resamples: int, seed: int
) -> np.ndarray:
    """The metrics of each run of one group on the same resamples, shape ``(B, runs, metrics)``.

    The images (by ``path``) are resampled once per resample for all runs; with OOD files, the
    OOD images are resampled too, independently, from their own stream of the seed.
    """
    index = pd.Index(sorted(set().union(*_path_sets([e.frame for e in evaluations]))))
    ood_index = None
    if all(e.ood_source is not None and e.ood_ok is not None for e in evaluations):
        paths = [_ood_rows(e, None)["path"].astype(str) for e in evaluations]
        ood_index = pd.Index(sorted(set.intersection(*map(set, paths))))
    runs = [_run_images(e, index, ood_index) for e in evaluations]
    sizes = [len(index)] + ([] if ood_index is None else [len(ood_index)])

    def statistic(counts: np.ndarray, ood_counts: np.ndarray | None = None) -> np.ndarray:
        return np.stack(
            [_resampled(run, row, counts, ood_counts) for run, row in zip(runs, rows, strict=True)],
            axis=1,
        )

    return metrics.paired_bootstrap(statistic, sizes, resamples, seed)


def _interval(value: float | None, low: float, high: float) -> dict[str, float | None]:
    """``{value, low, high}``; the bounds ``None`` where undefined."""
    finite = value is not None and math.isfinite(low) and math.isfinite(high)
    return {
        "value": value,
        "low": float(low) if finite else None,
        "high": float(high) if finite else None,
    }


def verdict(metric: str, low: float | None, high: float | None) -> str | None:
    """Better, worse or tie for the interval of a difference (run minus baseline).

    Args:
        metric: A key of ``INTERVAL_METRICS`` (which way is better).
        low: The lower bound of the difference's interval.
        high: The upper bound.

    Returns:
        ``tie`` if the interval contains 0; else ``better`` or ``worse`` by the metric's
        direction (``higher`` or ``lower`` for coverage, which has none); ``None`` if the
        interval is undefined.
    """
    if low is None or high is None:
        return None
    if low <= 0.0 <= high:
        return "tie"
    direction = INTERVAL_METRICS[metric]
    if direction == 0:
        return "higher" if low > 0 else "lower"
    return "better" if (low > 0) == (direction > 0) else "worse"


def _add_intervals(rows: list[dict], samples: np.ndarray, baseline: int | None) -> None:
    """Set ``intervals`` and ``difference_to_baseline`` of one group's rows (in place)."""
    low, high = metrics.percentile_interval(samples, INTERVAL_LEVEL)
    if baseline is not None:
        d_low, d_high = metrics.percentile_interval(
            samples - samples[:, baseline : baseline + 1], INTERVAL_LEVEL
        )
    for i, row in enumerate(rows):
        row["intervals"] = {
            key: _interval(row.get(key), low[i, j], high[i, j])
            for j, key in enumerate(INTERVAL_METRICS)
        }
        if baseline is None or i == baseline:
            continue
        differences = {}
        for j, key in enumerate(INTERVAL_METRICS):
            value, base = row.get(key), rows[baseline].get(key)
            entry = _interval(
                None if None in (value, base) else value - base, d_low[i, j], d_high[i, j]
            )
            entry["verdict"] = verdict(key, entry["low"], entry["high"])
            differences[key] = entry
        row["difference_to_baseline"] = differences


def _check_bootstrap(bootstrap: int, baseline: Any) -> int:
    """``bootstrap`` as an int, checked.

    Raises:
        UsageError: If it is not an integer >= 0, or is 0 with a baseline.
    """
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise UsageError(
            "`bootstrap` must be the number of resamples, an integer >= 0 (0: no intervals). "
            f"Received: bootstrap={bootstrap!r}"
        )
    if bootstrap == 0 and baseline is not None:
        raise UsageError(
            "`baseline` needs the bootstrap for the intervals of the differences; give "
            f"bootstrap > 0. Received: bootstrap=0, baseline={str(baseline)!r}"
        )
    return int(bootstrap)


def _bootstrap_settings(bootstrap: int, seed: int) -> dict[str, Any] | None:
    """What the intervals are, for the settings; ``None`` without them."""
    if not bootstrap:
        return None
    return {
        "method": "paired percentile bootstrap over images",
        "resamples": bootstrap,
        "seed": seed,
        "level": INTERVAL_LEVEL,
    }


def _intervals(
    rows: list[dict],
    evaluations: list[Evaluation],
    groups: list[list[int]],
    bootstrap: int,
    seed: int,
    baseline: str | os.PathLike[str] | None,
) -> None:
    """Add ``intervals`` and ``difference_to_baseline`` to the rows, group by group (in place).

    Raises:
        UsageError: If ``baseline`` names no file of any group.
    """
    for row in rows:
        row["intervals"] = row["difference_to_baseline"] = None
    if not bootstrap:
        return
    bases = [
        None if baseline is None else _baseline_of([rows[i] for i in group], str(baseline))
        for group in groups
    ]
    if baseline is not None and all(base is None for base in bases):
        names = list(dict.fromkeys(row["name"] for row in rows))
        raise UsageError(
            f"`baseline` must be the name or the file of one of the compared files ({names!r}). "
            f"Received: baseline={str(baseline)!r}"
        )
    for group, base in zip(groups, bases, strict=True):
        members = [rows[i] for i in group]
        samples = _group_samples([evaluations[i] for i in group], members, bootstrap, seed)
        _add_intervals(members, samples, base)


def _baseline_of(rows: list[dict], baseline: str) -> int | None:
    """The row of a group that is the baseline: by name, else by file; ``None`` if none is."""
    for key in ("name", "file"):
        for i, row in enumerate(rows):
            if str(row.get(key)) == baseline:
                return i
    wanted = Path(baseline).resolve()
    return next(
        (i for i, row in enumerate(rows) if Path(str(row["file"])).resolve() == wanted), None
    )


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # holds Evaluations: compared by identity
class Comparison:
    """Several scored files of the same images, evaluated.

    Attributes:
        rows: One JSON-serialisable dict per file, in the order given (see ``compare_files``).
        evaluations: The ``Evaluation`` of each file (of the rows compared), in the same order.
        settings: ``score`` (the AUROC columns' score), ``ece_bins``, ``intersect``,
            ``dropped`` (file -> rows dropped by ``intersect``) and ``series``.
        series: With ``series=True``, ``series_table(rows)``; else ``None``.
    """

    rows: list[dict]
    evaluations: list[Evaluation]
    settings: dict
    series: list[dict] | None = None

    def as_json(self) -> dict:
        """The settings, the rows and the series, as one JSON-serialisable dict."""
        return {"settings": self.settings, "rows": self.rows, "series": self.series}


def _as_list(values: Sequence[Any] | None, count: int, what: str) -> list[Any]:
    """``values`` as a list of one entry per file (``None`` each when not given).

    Raises:
        UsageError: If it does not have one entry per file.
    """
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise UsageError(
            f"`{what}` must give one entry per file ({count} files), in the same order. "
            f"Received: {what}={[str(v) for v in values]!r}"
        )
    return values


def _default_name(path: str | os.PathLike[str], metadata: dict, series: bool) -> str:
    """The file's name without ``.parquet``; in a series, its method, T and K instead."""
    if not series:
        return Path(path).stem
    name = f"{metadata.get('method', DEFAULT_METHOD)} T={metadata.get('passes')}"
    tta = metadata.get("tta")
    return name + (f" K={tta}" if tta not in (None, 1) else "")


def _check_names(names: list[str | None]) -> None:
    """Refuse empty names.

    Raises:
        UsageError: If a given name is empty.
    """
    if any(name is not None and not str(name).strip() for name in names):
        raise UsageError(f"`names` must not be empty. Received: names={names!r}")


def _path_sets(frames: list[Any]) -> list[set[str]]:
    return [set(frame["path"].astype(str)) for frame in frames]


def _common_paths(
    path_sets: list[set[str]], files: list[str], intersect: bool, what: str
) -> set[str] | None:
    """The paths every file holds, if they differ and may be intersected; ``None`` if equal.

    Raises:
        UsageError: If the sets differ without ``intersect``, or have no path in common.
    """
    if all(paths == path_sets[0] for paths in path_sets):
        return None
    first = next(i for i, paths in enumerate(path_sets) if paths != path_sets[0])
    if not intersect:
        only_first = len(path_sets[0] - path_sets[first])
        only_other = len(path_sets[first] - path_sets[0])
        raise UsageError(
            f"The {what} files do not hold the same images: {only_first} paths are only in "
            f"the first, {only_other} only in {files[first]!r}; compare runs of the same "
            f"folder, or keep the common paths with --intersect. "
            f"Received: files={[files[0], files[first]]!r}"
        )
    common = set.intersection(*path_sets)
    if not common:
        raise UsageError(f"The {what} files have no image in common. Received: files={files!r}")
    return common


def _keep(frame: Any, common: set[str] | None) -> np.ndarray | None:
    """Which rows of ``frame`` hold a common path; ``None`` if all do (or no cut is asked)."""
    if common is None:
        return None
    keep = frame["path"].astype(str).isin(common).to_numpy(bool)
    return None if keep.all() else keep


def _reevaluate(
    evaluation: Evaluation, keep: np.ndarray | None, ood_keep: np.ndarray | None
) -> Evaluation:
    """Evaluate the kept rows of a file (and of its OOD file) again, with evaluate's code.

    The results keep the file's header entries (``file``, ``passes``, ...); ``source`` and
    ``ood_source`` stay the files as read.
    """
    if keep is None and ood_keep is None:
        return evaluation
    frame = evaluation.frame if keep is None else evaluation.frame[keep].reset_index(drop=True)
    ood_frame = None
    if evaluation.ood_source is not None:
        ood_frame = evaluation.ood_source.frame
        if ood_keep is not None:
            ood_frame = ood_frame[ood_keep].reset_index(drop=True)
    # evaluate's own evaluation of a frame: the same metrics, on the kept rows.
    subset = evaluate_job.evaluate_scored(frame, evaluation.class_names, ood_frame)
    header = {k: v for k, v in evaluation.results.items() if k not in subset.results}
    return dataclasses.replace(
        subset,
        results={**header, **subset.results},
        source=evaluation.source,
        ood_source=evaluation.ood_source,
    )


def _align(
    evaluations: list[Evaluation], groups: list[list[int]], intersect: bool
) -> tuple[list[Evaluation], dict[str, int]]:
    """Check that the files of each group hold the same paths, or cut them to the common ones.

    Returns:
        The evaluations (re-evaluated where rows were dropped) and, per file that lost rows,
        how many (in-distribution plus OOD).
    """
    aligned, dropped = list(evaluations), {}
    for group in groups:
        members = [evaluations[i] for i in group]
        files = [str(e.results["file"]) for e in members]
        common = _common_paths(_path_sets([e.frame for e in members]), files, intersect, "scored")
        ood_common = None
        if members[0].ood_source is not None:
            ood_files = [str(e.results["ood_file"]) for e in members]
            ood_frames = [e.ood_source.frame for e in members if e.ood_source is not None]
            ood_common = _common_paths(_path_sets(ood_frames), ood_files, intersect, "OOD")
        for i, file, evaluation in zip(group, files, members, strict=True):
            keep = _keep(evaluation.frame, common)
            ood = evaluation.ood_source
            ood_keep = None if ood is None else _keep(ood.frame, ood_common)
            lost = sum(int((~mask).sum()) for mask in (keep, ood_keep) if mask is not None)
            if lost:
                dropped[file] = lost
                aligned[i] = _reevaluate(evaluation, keep, ood_keep)
    return aligned, dropped


def _images_per_second(metadata: dict) -> float | None:
    """The run's images/s as ``score`` recorded it (``run`` entry of the metadata), if it did."""
    for record in (metadata.get("run") or {}, metadata):
        value = record.get("images_per_second")
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def _row(name: str, evaluation: Evaluation, shift: Shift | None) -> dict[str, Any]:
    """The table row of one evaluated file: its settings, evaluate's metrics and its cost."""
    results = evaluation.results
    metadata = {} if evaluation.source is None else evaluation.source.metadata
    ood = results.get("ood") or {}
    conformal = results.get("conformal") or {}
    samples = metadata.get("samples_per_image")
    if samples is None and results.get("passes") is not None:
        samples = int(results["passes"]) * int(results.get("tta") or 1)
    adaptive = metadata.get("adaptive")
    if adaptive and results.get("mean_passes") is not None and samples is not None:
        # --passes auto: the cost is the passes drawn, not the most an image could get.
        samples = round(samples * results["mean_passes"] / adaptive["max_passes"], 1)
    row: dict[str, Any] = {
        "name": name,
        "file": results.get("file"),
        "ood_file": results.get("ood_file"),
        "method": metadata.get("method", DEFAULT_METHOD),
        "passes": results.get("passes"),
        "tta": results.get("tta"),
        "samples_per_image": samples,
        "n": results["n"],
    }
    row.update({key: results[key] for key in ("accuracy", "coverage", "selective_accuracy")})
    row.update({key: results[key] for key in ("nll", "brier", "ece", "aurc")})
    row["auroc_error"] = (results.get("auroc_error") or {}).get(COMPARED_SCORE)
    row["ood_auroc"] = (ood.get("auroc") or {}).get(COMPARED_SCORE)
    row["mean_set_size"] = conformal.get("mean_set_size")
    row["images_per_second"] = _images_per_second(metadata)
    row.update(rule_columns(results))  # the rule at its operating point (compare_rules)
    row["ood_scores"] = _ood_scores(ood)
    if shift is not None:
        row.update(corruption=shift.corruption, severity=shift.severity)
    return row


def _ood_scores(ood: dict) -> dict[str, dict[str, float | None]] | None:
    """Every OOD score's AUROC and FPR@95 as evaluate gives them (``None`` without OOD)."""
    if not ood:
        return None
    fpr95 = ood.get("fpr95") or {}
    return {
        name: {"auroc": value, "fpr95": fpr95.get(name)}
        for name, value in (ood.get("auroc") or {}).items()
    }


def ood_score_rows(rows: Sequence[dict]) -> list[dict]:
    """The lines of the OOD table (``OOD_SCORE_COLUMNS``): one per file and score.

    Args:
        rows: ``Comparison.rows`` (with ``with_shift_labels`` in a series).

    Returns:
        Dicts with ``name``, ``shift``, ``score``, ``auroc`` and ``fpr95``; empty without OOD
        files.
    """
    return [
        {"name": row["name"], "shift": row.get("shift"), "score": score, **values}
        for row in rows
        for score, values in (row.get("ood_scores") or {}).items()
    ]


def _groups(shifts: list[Shift] | None, count: int) -> list[list[int]]:
    """The files that must hold the same paths: all, or in a series those of one shift."""
    if shifts is None:
        return [list(range(count))]
    cells: dict[Shift, list[int]] = {}
    for i, shift in enumerate(shifts):
        cells.setdefault(shift, []).append(i)
    return list(cells.values())


def compare_files(
    paths: Sequence[str | os.PathLike[str]],
    names: Sequence[str] | None = None,
    ood: Sequence[str | os.PathLike[str]] | None = None,
    intersect: bool = False,
    series: bool = False,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    baseline: str | os.PathLike[str] | None = None,
) -> Comparison:
    """Evaluate files scored on the same images, one per method or setting, into one table.

    Args:
        paths: Parquet files written by ``batchuq score``, one per method or setting.
        names: A name per file, in order. Default: the file name without ``.parquet``; with
            ``series``, the method, T and K from the metadata (``mc_dropout T=100``).
        ood: One file per input (same order): the same model and settings run on an
            out-of-distribution folder; adds the OOD AUROC.
        intersect: Keep the paths every file holds (a warning says how many each lost)
            instead of refusing files whose ``path`` sets differ.
        series: The files are a shift series: each file's corruption and severity come from
            its metadata's ``images`` folder (``shift_of``); files are compared within each
            corruption and severity, and ``Comparison.series`` holds ``series_table``.
        bootstrap: The resamples B of the paired bootstrap over images that gives each metric
            (and each difference to ``baseline``) its percentile 95% interval; 0 for none.
            All files (in a series: of one corruption and severity) are resampled alike, by
            ``path``; OOD images independently, within themselves.
        seed: The seed of the resamples.
        baseline: The name or file of one of the files: adds each other file's difference to
            it, with its interval and a verdict (``better``, ``worse`` or ``tie`` when the
            interval holds 0; ``higher`` or ``lower`` for coverage). In a series, the file of
            that name in each corruption and severity.

    Returns:
        The ``Comparison``. Each row has ``name``, ``file``, ``ood_file``, ``method``,
        ``passes``, ``tta``, ``samples_per_image``, ``n``, ``accuracy``, ``coverage``,
        ``selective_accuracy``, ``nll``, ``brier``, ``ece``, ``aurc``, ``auroc_error`` and
        ``ood_auroc`` (of ``entropy``), ``mean_set_size`` and ``images_per_second`` (``None``
        when undefined or not recorded), and ``ood_scores`` (with ``ood``: per score evaluate
        reports, its ``auroc`` and ``fpr95``; else ``None``); with ``series``, also
        ``corruption`` and ``severity``.
        The values are those of ``evaluate_file``. With ``bootstrap``, ``intervals`` maps each
        ``INTERVAL_METRICS`` key to ``{value, low, high}`` (bounds ``None`` where undefined,
        see ``metrics.percentile_interval``), and ``difference_to_baseline`` (``None`` for the
        baseline and without one) maps it to ``{value, low, high, verdict}``.

    Raises:
        UsageError: If there is no file, ``names`` or ``ood`` has not one entry per file, a
            file is not a batchuq Parquet file, path sets differ (without ``intersect``) or
            have nothing in common, two series files share name, corruption and severity,
            ``bootstrap`` is negative, or ``baseline`` is no file's name or file (or is given
            with ``bootstrap=0``).
    """
    files = [str(path) for path in paths]
    if not files:
        raise UsageError("`paths` must name at least one scored file. Received: paths=[]")
    given = _as_list(names, len(files), "names")
    _check_names(given)
    ood_files = _as_list(ood, len(files), "ood")
    evaluations = [evaluate_file(p, o) for p, o in zip(files, ood_files, strict=True)]
    metadata = [e.source.metadata if e.source is not None else {} for e in evaluations]
    shifts = [shift_of(m.get("images")) for m in metadata] if series else None
    chosen = [
        str(name).strip() if name is not None else _default_name(path, meta, series)
        for name, path, meta in zip(given, files, metadata, strict=True)
    ]
    if shifts is not None:
        _check_series_cells(chosen, shifts, files)
    bootstrap = _check_bootstrap(bootstrap, baseline)
    evaluations, dropped = _align(evaluations, _groups(shifts, len(files)), intersect)
    for file, count in dropped.items():
        logger.warning(
            "compare: %s: %d rows dropped, not held by every file (--intersect)", file, count
        )
    rows = [
        _row(name, evaluation, None if shifts is None else shifts[i])
        for i, (name, evaluation) in enumerate(zip(chosen, evaluations, strict=True))
    ]
    groups = _groups(shifts, len(files))
    _intervals(rows, evaluations, groups, bootstrap, seed, baseline)
    settings = {
        "score": COMPARED_SCORE,
        "ece_bins": metrics.DEFAULT_ECE_BINS,
        "intersect": intersect,
        "dropped": dropped,
        "series": series,
        "bootstrap": _bootstrap_settings(bootstrap, seed),
        "baseline": None if baseline is None else str(baseline),
    }
    return Comparison(rows, evaluations, settings, series_table(rows) if series else None)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

# The columns of the terminal table and of the HTML report's (``batchuq.report.compare``):
# (header, row key, digits); columns whose key is in _OPTIONAL appear only when some row has it.
TABLE_COLUMNS = (
    ("name", "name", None),
    ("shift", "shift", None),
    ("method", "method", None),
    ("T", "passes", None),
    ("K", "tta", None),
    ("N", "n", None),
    ("acc", "accuracy", 4),
    ("cov", "coverage", 4),
    ("sel.acc", "selective_accuracy", 4),
    ("NLL", "nll", 4),
    ("Brier", "brier", 4),
    ("ECE", "ece", 4),
    ("AURC", "aurc", 4),
    ("AUROC err", "auroc_error", 4),
    ("AUROC OOD", "ood_auroc", 4),
    ("set size", "mean_set_size", 3),
    ("img/s", "images_per_second", 1),
)
_OPTIONAL = {"shift", "ood_auroc", "mean_set_size", "difference", "difference_interval", "verdict"}
SERIES_COLUMNS = (
    ("name", "name", None),
    ("severity", "severity", None),
    ("corruptions", "corruptions", None),
    ("acc", "accuracy", 4),
    ("ECE", "ece", 4),
    ("NLL", "nll", 4),
    ("Brier", "brier", 4),
)


# The OOD table: every score's AUROC and FPR@95 per file (``ood_score_rows``).
OOD_SCORE_COLUMNS = (
    ("name", "name", None),
    ("shift", "shift", None),
    ("score", "score", None),
    ("AUROC", "auroc", 4),
    ("FPR@95", "fpr95", 4),
)

# The long table of intervals: one line per metric and file (``interval_rows``).
INTERVAL_COLUMNS = (
    ("metric", "metric", None),
    ("name", "name", None),
    ("shift", "shift", None),
    ("value", "value", None),
    ("95% interval", "interval", None),
    ("difference", "difference", None),
    ("95% interval", "difference_interval", None),
    ("verdict", "verdict", None),
)
_RIGHT = {"passes", "tta", "n", "severity", "corruptions", "value", "difference"}
_METRIC_LABELS = {
    "accuracy": "accuracy",
    "coverage": "coverage",
    "selective_accuracy": "sel. accuracy",
    "nll": "NLL",
    "brier": "Brier",
    "ece": "ECE",
    "aurc": "AURC",
    "auroc_error": "AUROC err",
    "ood_auroc": "AUROC OOD",
}


def _bound(value: float, signed: bool) -> str:
    """A bound to 4 decimals; one that would show as 0 but is not, in two digits of ``e``."""
    sign = "+" if signed else ""
    if value != 0 and abs(value) < 5e-5:
        return f"{value:{sign}.1e}"  # +2.0e-05: excludes 0, which +0.0000 would hide
    return f"{value:{sign}.4f}"


def format_interval(entry: dict | None, signed: bool = False) -> str:
    """``[low, high]`` to 4 decimals (with signs if ``signed``); ``n/a`` where undefined."""
    if not entry or entry.get("low") is None or entry.get("high") is None:
        return "n/a"
    return f"[{_bound(entry['low'], signed)}, {_bound(entry['high'], signed)}]"


def interval_rows(rows: Sequence[dict]) -> list[dict]:
    """The lines of the table of intervals (``INTERVAL_COLUMNS``), metric by metric.

    Args:
        rows: ``Comparison.rows`` made with a bootstrap (with ``with_shift_labels`` in a
            series).

    Returns:
        One dict of texts per metric defined for some file and per file: ``metric``, ``name``,
        ``shift`` (``None`` outside a series),
        ``value``, ``interval``, and with a baseline ``difference``, ``difference_interval``
        and ``verdict`` (``baseline`` on the baseline's lines; ``None`` without one).
    """
    baseline = any(row.get("difference_to_baseline") for row in rows)
    mark = {"difference": "", "difference_interval": "", "verdict": "baseline"}
    lines = []
    for key, label in _METRIC_LABELS.items():
        if all((row.get("intervals") or {}).get(key, {}).get("value") is None for row in rows):
            continue
        for row in rows:
            entry = (row.get("intervals") or {}).get(key) or {}
            line = {
                "metric": label,
                "name": row["name"],
                "shift": row.get("shift"),
                "value": format_cell(entry.get("value"), 4),
                "interval": format_interval(entry),
            }
            diff = (row.get("difference_to_baseline") or {}).get(key)
            if diff is not None:
                line["difference"] = format_signed(diff.get("value"))
                line["difference_interval"] = format_interval(diff, signed=True)
                line["verdict"] = format_cell(diff.get("verdict"), None)
            elif baseline and row.get("difference_to_baseline") is None:
                line.update(mark)
            lines.append(line)
    return lines


def format_signed(value: float | None) -> str:
    """A difference to 4 decimals with its sign; ``n/a`` for ``None``."""
    return "n/a" if value is None else f"{value:+.4f}"


def format_cell(value: Any, digits: int | None) -> str:
    """A table cell's text: ``n/a`` for ``None``, numbers to ``digits`` decimals if given."""
    if value is None:
        return "n/a"
    if digits is not None and isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def present_columns(
    rows: Sequence[dict], columns: Sequence[tuple[str, str, int | None]]
) -> list[tuple[str, str, int | None]]:
    """The columns a table of ``rows`` shows: optional ones only when some row has them."""
    return [
        (header, key, digits)
        for header, key, digits in columns
        if key not in _OPTIONAL or any(row.get(key) is not None for row in rows)
    ]


def table_cells(
    rows: Sequence[dict], columns: Sequence[tuple[str, str, int | None]]
) -> tuple[list[str], list[list[str]], list[bool]]:
    """The cells of a table of ``rows``, for the terminal or an HTML page.

    Args:
        rows: The rows (``Comparison.rows`` with ``with_shift_labels``, or ``.series``).
        columns: ``TABLE_COLUMNS`` or ``SERIES_COLUMNS``.

    Returns:
        The headers, the cell texts row by row, and whether each column is numeric
        (right-aligned); optional columns no row has are left out.
    """
    present = present_columns(rows, columns)
    cells = [[format_cell(row.get(key), digits) for _, key, digits in present] for row in rows]
    numeric = [digits is not None or key in _RIGHT for _, key, digits in present]
    return [header for header, _, _ in present], cells, numeric


def _render(rows: Sequence[dict], columns: Sequence[tuple[str, str, int | None]]) -> str:
    """Rows as an aligned plain-text table under a header line and a rule."""
    headers, cells, numeric = table_cells(rows, columns)
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]

    def line(texts: list[str]) -> str:
        parts = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(texts, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(texts) for texts in cells)])


def with_shift_labels(rows: Sequence[dict]) -> list[dict]:
    """The rows with a ``shift`` label (``<corruption>/<severity>`` or ``clean``) if in a series."""
    return [
        {**row, "shift": Shift(row["corruption"], row["severity"]).label}
        if "severity" in row
        else row
        for row in rows
    ]


def interval_caption(settings: dict) -> str:
    """What the intervals are, for the table's caption (``settings`` of a ``Comparison``)."""
    boot = settings["bootstrap"]
    text = (
        f"{boot['level']:.0%} intervals: paired percentile bootstrap over images, "
        f"B = {boot['resamples']}, seed {boot['seed']}."
    )
    if settings.get("baseline") is not None:
        text += (
            f" Difference = file - baseline ({settings['baseline']}); better or worse only "
            "where its interval excludes 0, else tie."
        )
    return text


def _interval_parts(comparison: Comparison) -> list[str]:
    """The caption and table of intervals; for a series a pointer to --json and --report."""
    if comparison.settings.get("bootstrap") is None:
        return []
    if comparison.series is not None:
        return ["Intervals of every file of the series: --json or --report."]
    caption = textwrap.fill(interval_caption(comparison.settings), width=100)
    return [caption, _render(interval_rows(comparison.rows), INTERVAL_COLUMNS)]


def format_comparison(comparison: Comparison) -> str:
    """Render a comparison as plain-text tables for a terminal.

    Args:
        comparison: What ``compare_files`` returned.

    Returns:
        The table of one row per file (AUROC columns of ``entropy``; the OOD, set size and
        shift columns only when some file has them), the rows dropped by ``intersect``, and
        for a series the table of means over corruptions per severity.
    """
    parts = [
        f"Compared on the labelled ok rows; AUROC of {comparison.settings['score']} "
        "(wrong vs right, and OOD vs in-distribution).",
        _render(with_shift_labels(comparison.rows), TABLE_COLUMNS),
    ]
    parts += _interval_parts(comparison)
    parts += format_rules(comparison.rows, _render)
    ood_lines = ood_score_rows(with_shift_labels(comparison.rows))
    if ood_lines:
        caption = (
            "OOD vs in-distribution, every score (higher = more OOD; -max_logit is the max "
            "logit negated): AUROC, and FPR@95 = share of OOD images kept at the threshold "
            "that keeps 95% of the in-distribution ones."
        )
        parts.append(textwrap.fill(caption, width=100))
        parts.append(_render(ood_lines, OOD_SCORE_COLUMNS))
    dropped = comparison.settings.get("dropped") or {}
    if dropped:
        lost = ", ".join(f"{file}: {count}" for file, count in dropped.items())
        parts.append(f"--intersect dropped rows not held by every file ({lost}).")
    if comparison.series is not None:
        parts.append("Shift series: mean over corruptions per severity (0 = clean)")
        parts.append(_render(comparison.series, SERIES_COLUMNS))
    return "\n\n".join(parts)
