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

``write_comparison_report`` draws from the ``Evaluation`` of each file (its reliability bins and
risk-coverage curve): reliability diagrams and risk-coverage curves overlaid, cost against
quality, and the series figure. Matplotlib is imported only there.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from batchuq import metrics
from batchuq.defaults import DEFAULT_METHOD
from batchuq.errors import UsageError
from batchuq.jobs import evaluate as evaluate_job
from batchuq.jobs.evaluate import Evaluation, evaluate_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger("batchuq")

# The uncertainty score of the table's two AUROC columns (evaluate computes every score's).
COMPARED_SCORE = "entropy"
# The metrics a shift series averages over corruptions, per severity and method.
SERIES_METRICS = ("accuracy", "ece", "nll", "brier")

__all__ = [
    "COMPARED_SCORE",
    "SERIES_METRICS",
    "Comparison",
    "Shift",
    "compare_files",
    "format_comparison",
    "series_table",
    "shift_of",
    "write_comparison_report",
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
    if shift is not None:
        row.update(corruption=shift.corruption, severity=shift.severity)
    return row


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

    Returns:
        The ``Comparison``. Each row has ``name``, ``file``, ``ood_file``, ``method``,
        ``passes``, ``tta``, ``samples_per_image``, ``n``, ``accuracy``, ``coverage``,
        ``selective_accuracy``, ``nll``, ``brier``, ``ece``, ``aurc``, ``auroc_error`` and
        ``ood_auroc`` (of ``entropy``), ``mean_set_size`` and ``images_per_second`` (``None``
        when undefined or not recorded); with ``series``, also ``corruption`` and ``severity``.
        The values are those of ``evaluate_file``.

    Raises:
        UsageError: If there is no file, ``names`` or ``ood`` has not one entry per file, a
            file is not a batchuq Parquet file, path sets differ (without ``intersect``) or
            have nothing in common, or two series files share name, corruption and severity.
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
    evaluations, dropped = _align(evaluations, _groups(shifts, len(files)), intersect)
    for file, count in dropped.items():
        logger.warning(
            "compare: %s: %d rows dropped, not held by every file (--intersect)", file, count
        )
    rows = [
        _row(name, evaluation, None if shifts is None else shifts[i])
        for i, (name, evaluation) in enumerate(zip(chosen, evaluations, strict=True))
    ]
    settings = {
        "score": COMPARED_SCORE,
        "ece_bins": metrics.DEFAULT_ECE_BINS,
        "intersect": intersect,
        "dropped": dropped,
        "series": series,
    }
    return Comparison(rows, evaluations, settings, series_table(rows) if series else None)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

# (header, row key, digits); columns whose key is in _OPTIONAL appear only when some row has it.
_COLUMNS = (
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
_OPTIONAL = {"shift", "ood_auroc", "mean_set_size"}
_SERIES_COLUMNS = (
    ("name", "name", None),
    ("severity", "severity", None),
    ("corruptions", "corruptions", None),
    ("acc", "accuracy", 4),
    ("ECE", "ece", 4),
    ("NLL", "nll", 4),
    ("Brier", "brier", 4),
)


def _cell(value: Any, digits: int | None) -> str:
    if value is None:
        return "n/a"
    if digits is not None and isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def _table_cells(
    rows: Sequence[dict], columns: Sequence[tuple[str, str, int | None]]
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cell texts and whether each column is numeric (right-aligned)."""
    present = [
        (header, key, digits)
        for header, key, digits in columns
        if key not in _OPTIONAL or any(row.get(key) is not None for row in rows)
    ]
    cells = [[_cell(row.get(key), digits) for _, key, digits in present] for row in rows]
    numeric = [
        digits is not None or key in ("passes", "tta", "n", "severity", "corruptions")
        for _, key, digits in present
    ]
    return [header for header, _, _ in present], cells, numeric


def _render(rows: Sequence[dict], columns: Sequence[tuple[str, str, int | None]]) -> str:
    """Rows as an aligned plain-text table under a header line and a rule."""
    headers, cells, numeric = _table_cells(rows, columns)
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]

    def line(texts: list[str]) -> str:
        parts = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(texts, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(texts) for texts in cells)])


def _with_shift(rows: Sequence[dict]) -> list[dict]:
    """The rows with a ``shift`` label (``<corruption>/<severity>`` or ``clean``) if in a series."""
    return [
        {**row, "shift": Shift(row["corruption"], row["severity"]).label}
        if "severity" in row
        else row
        for row in rows
    ]


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
        _render(_with_shift(comparison.rows), _COLUMNS),
    ]
    dropped = comparison.settings.get("dropped") or {}
    if dropped:
        lost = ", ".join(f"{file}: {count}" for file, count in dropped.items())
        parts.append(f"--intersect dropped rows not held by every file ({lost}).")
    if comparison.series is not None:
        parts.append("Shift series: mean over corruptions per severity (0 = clean)")
        parts.append(_render(comparison.series, _SERIES_COLUMNS))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A Matplotlib figure on the Agg canvas (imported here: the table needs no Matplotlib)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _plotted(comparison: Comparison) -> list[tuple[dict, Evaluation]]:
    """The files the overlays draw: all, or in a series the clean ones (if there are any)."""
    pairs = list(zip(comparison.rows, comparison.evaluations, strict=True))
    clean = [(row, e) for row, e in pairs if row.get("severity") == 0]
    return clean if comparison.series is not None and clean else pairs


def _draw_reliability(pairs: list[tuple[dict, Evaluation]]) -> Figure:
    """Accuracy against mean confidence of each non-empty bin, one line per file."""
    fig = _new_figure(6.4, 5.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="#868e96", label="perfect calibration")
    for row, evaluation in pairs:
        bins = evaluation.reliability
        if bins is None:
            continue
        used = bins.counts > 0
        label = f"{row['name']} (ECE {_cell(row['ece'], 4)})"
        ax.plot(bins.confidence[used], bins.accuracy[used], marker="o", ms=4, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability ({metrics.DEFAULT_ECE_BINS} equal bins, empty bins left out)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def _draw_risk_coverage(pairs: list[tuple[dict, Evaluation]]) -> Figure:
    """The risk-coverage curve of each file, overlaid."""
    fig = _new_figure(6.4, 4.6)
    ax = fig.subplots()
    for row, evaluation in pairs:
        curve = evaluation.risk_coverage
        if curve is not None:
            label = f"{row['name']} (AURC {_cell(row['aurc'], 4)})"
            ax.plot(curve.coverage, curve.risk, lw=1.8, label=label)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of images kept, most confident first)")
    ax.set_ylabel("risk (error rate among kept images)")
    ax.set_title("Risk-coverage curves")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def _cost_axis(rows: list[dict]) -> tuple[str, str]:
    """The cost the scatter uses: images/s if every file recorded it, else samples per image."""
    if all(row.get("images_per_second") is not None for row in rows):
        return "images_per_second", "images/s (higher is cheaper)"
    return "samples_per_image", "samples per image (forward passes; lower is cheaper)"


def _draw_cost_quality(rows: list[dict]) -> Figure:
    """NLL and ECE against the cost of each file, as labelled points."""
    fig = _new_figure(11, 4.4)
    key, label = _cost_axis(rows)
    for ax, metric, title in zip(fig.subplots(1, 2), ("nll", "ece"), ("NLL", "ECE"), strict=True):
        points = [(r[key], r[metric], r["name"]) for r in rows if None not in (r[key], r[metric])]
        for x, y, name in points:
            ax.scatter([x], [y], s=40, zorder=3)
            ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
        xs = [x for x, _, _ in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        ax.margins(0.15)  # room for the labels of the outermost points
        ax.set_xlabel(label)
        ax.set_ylabel(f"{title} (lower is better)")
        ax.set_title(f"Cost vs {title}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _draw_series(series: list[dict], rows: list[dict]) -> Figure:
    """Accuracy and ECE against severity per method: means as lines, corruptions as dots."""
    fig = _new_figure(11, 4.4)
    axes: list[Axes] = list(fig.subplots(1, 2))
    names = list(dict.fromkeys(entry["name"] for entry in series))
    colours = [f"C{i % 10}" for i in range(len(names))]
    for ax, metric, title in zip(axes, ("accuracy", "ece"), ("accuracy", "ECE"), strict=True):
        for name, colour in zip(names, colours, strict=True):
            mine = [e for e in series if e["name"] == name and e[metric] is not None]
            ax.plot(
                [e["severity"] for e in mine],
                [e[metric] for e in mine],
                marker="o",
                color=colour,
                label=name,
            )
            dots = [r for r in rows if r["name"] == name and r[metric] is not None]
            ax.scatter(
                [r["severity"] for r in dots], [r[metric] for r in dots], s=10, alpha=0.35, c=colour
            )
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} against severity")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Shift series: lines are means over corruptions, dots each corruption")
    fig.tight_layout()
    return fig


def _html_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, int | None]]) -> str:
    headers, cells, numeric = _table_cells(rows, columns)
    parts = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for texts in cells:
        tds = [
            ('<td class="num">' if right else "<td>") + html.escape(text) + "</td>"
            for text, right in zip(texts, numeric, strict=True)
        ]
        parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


_NOTES = {
    "reliability": "Accuracy against mean confidence in each confidence bin, one line per file "
    "(empty bins left out). A calibrated model follows the dashed diagonal: below it means "
    "over-confident. The bins are those evaluate computed the ECE from.",
    "risk_coverage": "Error rate among the images kept when keeping only the most confident "
    "ones, for every share kept. Lower is better; AURC is the area under each curve.",
    "cost_quality": "Quality against cost: NLL and ECE of each file against the images/s "
    "batchuq score recorded, or, if a file has none, the samples per image (T x K, times the "
    "members of an ensemble).",
    "series": "Accuracy and ECE against the severity of the corruption (0 = the clean folder), "
    "per method: the lines are means over the corruptions, the dots each corruption.",
}


def _page(comparison: Comparison, plots: dict[str, str]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>batchuq comparison</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchuq comparison</h1>",
        _html_table(_with_shift(comparison.rows), _COLUMNS),
        f'<p class="note">On the labelled ok rows of each file; AUROC of '
        f"{html.escape(comparison.settings['score'])}. Coverage and selective accuracy are "
        "those of each file's own decision rule.</p>",
    ]
    if comparison.series is not None:
        parts += ["<h2>Shift series</h2>", _html_table(comparison.series, _SERIES_COLUMNS)]
    for key, src in plots.items():
        parts += [
            f"<h2>{html.escape(key.replace('_', ' ').capitalize())}</h2>",
            f'<img src="{html.escape(src)}" alt="{html.escape(key)}">',
            f'<p class="note">{html.escape(_NOTES[key])}</p>',
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h2 { margin-top: 2em; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #dee2e6; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.note { color: #495057; max-width: 80ch; }
"""


def write_comparison_report(comparison: Comparison, report_dir: str | os.PathLike[str]) -> Path:
    """Write ``index.html`` and its PNG plots for a comparison.

    The plots are drawn from each file's ``Evaluation`` (its reliability bins and risk-coverage
    curve): ``reliability.png`` and ``risk_coverage.png`` overlay the files (in a series, the
    clean ones), ``cost_quality.png`` puts NLL and ECE against cost, and for a series
    ``series.png`` draws accuracy and ECE against severity per method.

    Args:
        comparison: What ``compare_files`` returned.
        report_dir: Folder for the report; created if needed, existing files are replaced.

    Returns:
        The path of ``index.html``.

    Raises:
        OutputError: If ``report_dir`` is an existing file or cannot be created (a
            ``UsageError``).
        OSError: If the report cannot be written.
    """
    from batchuq.jobs.report import report_folder, save_figure

    folder = report_folder(report_dir)
    pairs = _plotted(comparison)
    plots = {
        "reliability": save_figure(_draw_reliability(pairs), folder, "reliability.png"),
        "risk_coverage": save_figure(_draw_risk_coverage(pairs), folder, "risk_coverage.png"),
        "cost_quality": save_figure(
            _draw_cost_quality([row for row, _ in pairs]), folder, "cost_quality.png"
        ),
    }
    if comparison.series is not None:
        figure = _draw_series(comparison.series, comparison.rows)
        plots["series"] = save_figure(figure, folder, "series.png")
    index = folder / "index.html"
    index.write_text(_page(comparison, plots), encoding="utf-8")
    return index
