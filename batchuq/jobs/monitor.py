"""Tonight against the reference: the drift tests of ``batchuq monitor``, read from Parquet.

``monitor_runs(TONIGHT, [REF, ...])`` reads files written by ``batchuq score`` and tests tonight's
rows against the pooled rows of the reference (``batchuq.drift``: KS on each uncertainty column,
chi-square on the predicted-class mix, Fisher's exact test on the unclassified and error rates;
Holm across them; PSI and Wasserstein beside the p-values). It reads Parquet only (pyarrow and
NumPy): nothing here imports TensorFlow or Keras.

What a run is:

* a ``.parquet`` file, or a folder of ``*.parquet`` parts: a history partition
  ``HISTORY/date=2026-12-01/`` (``score --partition``) or a ``score --engine ray`` output folder;
* a history folder (``date=YYYY-MM-DD`` subfolders) given as a reference stands for its ``last``
  latest nights before tonight's (tonight's date is the ``date=`` part of its path; without one,
  every night but tonight's own folder counts). Those nights also give the report's time series.

The columns tested (``COLUMNS``): ``confidence`` (the top mean probability), ``entropy``,
``mutual_info``, ``top_std`` (the std of the predicted class's probability over the samples,
``std_<pred>``) and, when both sides have a ``pred_set`` column, ``set_size``; then
``class_mix`` (over ``pred_index``), ``unclassified_rate`` (``decision`` = ``unclassified``
among the scored rows) and ``error_rate`` (``status`` not ``ok`` among all rows). Continuous
columns and the class mix use the scored (``ok``) rows only.

A reference must come from the same model, class names and predictor settings (``method``,
``passes``, ``tta``, augmentation, rescale, precision, sampled layers, logits, EXIF), decision
rule, calibration (temperature, conformal settings) and adaptive settings as tonight:
otherwise the scores differ for reasons other than the images, and ``monitor_runs`` raises a
``UsageError`` naming the difference. The seed, the batch size and the engine may differ.

The label-free accuracy estimate: when tonight's and every reference run's metadata hold
``estimated_accuracy`` (a number, or a table of numbers), the report gives tonight's, the
reference's (the mean over its runs weighted by their scored rows) and the change.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchuq import drift
from batchuq.defaults import (
    DEFAULT_MIN_PSI,
    DEFAULT_MONITOR_ALPHA,
    DEFAULT_MONITOR_LAST,
    DEFAULT_PSI_BINS,
    STATUS_OK,
    UNCLASSIFIED_NAME,
)
from batchuq.drift import DriftTest
from batchuq.errors import NoImagesFoundError, UsageError
from batchuq.output.schema import metadata_of
from batchuq.postprocess.calibration_file import predictor_differences, predictor_from_metadata

logger = logging.getLogger("batchuq")

__all__ = [
    "COLUMNS",
    "MonitorReport",
    "MonitorSettings",
    "Night",
    "accuracy_estimate",
    "date_of",
    "format_monitor",
    "monitor_nights",
    "monitor_runs",
    "night_tests",
    "pool",
    "read_night",
    "reference_nights",
    "setting_differences",
]

# The continuous columns, in the order of the report (set_size only with a pred_set column).
COLUMNS = ("confidence", "entropy", "mutual_info", "top_std", "set_size")
RATES = ("unclassified_rate", "error_rate")
_DATE = re.compile(r"^date=(.+)$")


# --------------------------------------------------------------------------------------------
# One night's rows
# --------------------------------------------------------------------------------------------


@dataclass
class Night:
    """What the tests need of one run (or of pooled runs): its rows' status and scored values.

    Attributes:
        path: The file or folder read (for a pool, the first run's).
        date: The ``date=`` part of its path, or ``None``.
        metadata: The batchuq metadata of its (first) file.
        ok: Per row, error rows included: whether its ``status`` is ``ok``.
        pred: Per scored row: its ``pred_index``.
        undecided: Per scored row: whether its ``decision`` is ``unclassified``.
        values: Per continuous column: its values over the scored rows (float64).
    """

    path: str
    date: str | None
    metadata: dict
    ok: np.ndarray
    pred: np.ndarray
    undecided: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Every row, error rows included."""
        return int(self.ok.size)

    @property
    def scored(self) -> int:
        """Rows scored (``status`` ``ok``)."""
        return int(self.ok.sum())

    @property
    def errors(self) -> int:
        """Rows whose ``status`` is not ``ok``."""
        return self.rows - self.scored

    @property
    def unclassified(self) -> int:
        """Scored rows whose ``decision`` is ``unclassified``."""
        return int(self.undecided.sum())

    @property
    def class_counts(self) -> np.ndarray:
        """Scored rows per ``pred_index``, in the model's class order."""
        classes = len(self.metadata.get("class_names") or []) or int(self.pred.max(initial=-1)) + 1
        return np.bincount(self.pred, minlength=classes)

    def subset(self, rows: np.ndarray) -> Night:
        """The night cut to some of its rows (the benchmark's random splits).

        Args:
            rows: Row positions (error rows included), or a boolean mask over the rows.

        Returns:
            A ``Night`` of those rows.
        """
        keep = np.zeros(self.rows, bool)
        keep[rows] = True
        kept = keep[self.ok]  # which scored rows are kept
        return Night(
            path=self.path,
            date=self.date,
            metadata=self.metadata,
            ok=self.ok[keep],
            pred=self.pred[kept],
            undecided=self.undecided[kept],
            values={name: v[kept] for name, v in self.values.items()},
        )

    def means(self) -> dict[str, float | None]:
        """Each column's mean and each rate, for the time series."""
        out: dict[str, float | None] = {
            name: float(v.mean()) if v.size else None for name, v in self.values.items()
        }
        out["unclassified_rate"] = self.unclassified / self.scored if self.scored else None
        out["error_rate"] = self.errors / self.rows if self.rows else None
        return out


def date_of(path: str | os.PathLike[str]) -> str | None:
    """The value of the last ``date=...`` part of ``path``, or ``None``."""
    for part in reversed(Path(path).parts):
        found = _DATE.match(part)
        if found:
            return found.group(1)
    return None


def _parts(path: Path) -> list[Path]:
    """The Parquet files of a run: the file itself, or a folder's visible ``*.parquet``."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    return [path]


def _read_columns(part: Path, class_names: list[str]) -> pa.Table:
    """The columns the tests need, from one Parquet file."""
    names = set(pq.read_schema(part).names)
    wanted = ["status", "decision", "pred_index", "confidence", "entropy", "mutual_info"]
    wanted += [f"std_{name}" for name in class_names]
    wanted += ["pred_set"] if "pred_set" in names else []
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UsageError(
            f"The file lacks the columns {missing} that `batchuq score` writes. "
            f"Received: path={str(part)!r}"
        )
    return pq.read_table(part, columns=wanted)


def read_night(path: str | os.PathLike[str]) -> Night:
    """Read one run (a file or a folder of parts) written by ``batchuq score``.

    Args:
        path: A ``.parquet`` file or a folder of ``*.parquet`` parts.

    Returns:
        The run's counts and scored values; a folder with no part gives an empty ``Night``
        (no rows, no metadata).

    Raises:
        UsageError: If a file is not a batchuq Parquet file or lacks a column.
    """
    path = Path(path)
    parts = _parts(path)
    if not parts:
        empty = np.zeros(0, bool)
        return Night(str(path), date_of(path), {}, empty, np.zeros(0, np.int64), empty)
    try:
        metadata = metadata_of(pq.read_schema(parts[0]), parts[0])
        class_names = list(metadata["class_names"])
        table = pa.concat_tables(_read_columns(p, class_names) for p in parts)
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise UsageError(
            f"Cannot read it as a `batchuq score` output: {exc}. Received: path={str(path)!r}"
        ) from exc
    ok = np.asarray(pc.equal(table["status"], STATUS_OK).to_numpy(zero_copy_only=False), bool)
    scored = table.filter(pa.array(ok))
    pred = scored["pred_index"].to_numpy().astype(np.int64)
    stds = np.stack(
        [scored[f"std_{n}"].to_numpy().astype(np.float64) for n in class_names], axis=1
    ).reshape(len(pred), len(class_names))
    values = {name: scored[name].to_numpy().astype(np.float64) for name in COLUMNS[:3]}
    values["top_std"] = np.take_along_axis(stds, pred[:, None], axis=1)[:, 0]
    if "pred_set" in table.column_names:
        values["set_size"] = pc.list_value_length(scored["pred_set"]).to_numpy().astype(float)
    undecided = pc.equal(scored["decision"], UNCLASSIFIED_NAME).to_numpy(zero_copy_only=False)
    return Night(
        path=str(path),
        date=date_of(path),
        metadata=metadata,
        ok=ok,
        pred=pred,
        undecided=np.asarray(undecided, bool),
        values=values,
    )


def pool(nights: Sequence[Night]) -> Night:
    """The nights' rows as one sample (the reference of several runs).

    Args:
        nights: Runs of one model and class set (at least one).

    Returns:
        A ``Night`` whose counts are the sums and whose values are the concatenations; a
        column is kept only if every night has it.
    """
    first = nights[0]
    shared = [name for name in first.values if all(name in n.values for n in nights)]
    return Night(
        path=first.path,
        date=None,
        metadata=first.metadata,
        ok=np.concatenate([n.ok for n in nights]),
        pred=np.concatenate([n.pred for n in nights]),
        undecided=np.concatenate([n.undecided for n in nights]),
        values={name: np.concatenate([n.values[name] for n in nights]) for name in shared},
    )


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def _history_nights(folder: Path) -> list[Path]:
    """A history folder's ``date=...`` partitions, oldest first."""
    found = [p for p in folder.iterdir() if p.is_dir() and _DATE.match(p.name)]
    return sorted(found, key=lambda p: date_of(p) or "")


def reference_nights(
    references: Sequence[str | os.PathLike[str]],
    tonight: str | os.PathLike[str],
    last: int = DEFAULT_MONITOR_LAST,
) -> tuple[list[Path], bool]:
    """The runs the reference pools: each file or part folder, and each history folder's
    ``last`` latest nights before tonight's.

    Args:
        references: Files, part folders or history folders.
        tonight: Tonight's run (its ``date=`` part bounds a history folder's nights).
        last: Nights taken from each history folder.

    Returns:
        The runs, and whether any came from a history folder.

    Raises:
        UsageError: If a reference does not exist, ``last`` < 1, or a history folder holds no
            night before tonight's.
    """
    if last < 1:
        raise UsageError(f"--last must be at least 1 night. Received: last={last!r}")
    tonight_path, tonight_date = Path(tonight).resolve(), date_of(tonight)
    runs: list[Path] = []
    history = False
    for reference in map(Path, references):
        if not reference.exists():
            raise UsageError(
                f"The reference does not exist. Received: reference={str(reference)!r}"
            )
        nights = _history_nights(reference) if reference.is_dir() else []
        if not nights:
            runs.append(reference)
            continue
        history = True
        before = [
            p
            for p in nights
            if p.resolve() not in (tonight_path, *tonight_path.parents)  # not tonight's own
            and (tonight_date is None or (date_of(p) or "") < tonight_date)
        ]
        if not before:
            raise UsageError(
                f"The history folder holds no night before tonight's ({tonight_date}). "
                f"Received: reference={str(reference)!r}"
            )
        runs.extend(before[-last:])
    return runs, history


_SAME_KEYS = ("model_sha256", "class_names", "decision_rule", "calibration", "adaptive")
_NOT_COMPARED = ("created", "predictor_mismatch")  # of the calibration entry


def _setting(metadata: dict, key: str) -> Any:
    value = metadata.get(key)
    if key == "calibration" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in _NOT_COMPARED}
    return value


def setting_differences(reference: dict, tonight: dict) -> list[tuple[str, Any, Any]]:
    """The settings in which a reference run's metadata differs from tonight's.

    Args:
        reference: The reference run's batchuq metadata.
        tonight: Tonight's.

    Returns:
        ``(setting, reference value, tonight's value)`` for the model (``model_sha256``),
        ``class_names``, each predictor setting, ``decision_rule``, ``calibration`` and
        ``adaptive``.
    """
    found = [
        (key, _setting(reference, key), _setting(tonight, key))
        for key in _SAME_KEYS
        if _setting(reference, key) != _setting(tonight, key)
    ]
    found[1:1] = predictor_differences(
        predictor_from_metadata(reference), predictor_from_metadata(tonight)
    )
    return found


def _check_comparable(reference: Night, tonight: Night) -> None:
    """Refuse a reference run scored by another model or with other settings."""
    differences = setting_differences(reference.metadata, tonight.metadata)
    if differences:
        listed = "; ".join(
            f"{name}: {a!r} in the reference, {b!r} tonight" for name, a, b in differences
        )
        raise UsageError(
            "The reference was scored by another model or with other settings than tonight, so "
            f"their scores do not compare: {listed}. Received: reference={reference.path!r}"
        )


# --------------------------------------------------------------------------------------------
# The tests and the report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorSettings:
    """The thresholds of ``monitor`` (``[monitor]`` in ``batchuq.toml``).

    Attributes:
        alpha: Family-wise level of the night's Holm-corrected tests.
        min_psi: PSI an alert also needs (0: the p-value alone decides).
        bins: Quantile bins of the reference for the PSI of a continuous column.
        last: Nights taken from a history folder given as a reference.
    """

    alpha: float = DEFAULT_MONITOR_ALPHA
    min_psi: float = DEFAULT_MIN_PSI
    bins: int = DEFAULT_PSI_BINS
    last: int = DEFAULT_MONITOR_LAST

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise UsageError(f"alpha must be in (0, 1). Received: alpha={self.alpha!r}")
        if not self.min_psi >= 0:
            raise UsageError(f"min_psi must be >= 0. Received: min_psi={self.min_psi!r}")
        if int(self.bins) < 2:
            raise UsageError(f"PSI needs at least 2 bins. Received: bins={self.bins!r}")
        if int(self.last) < 1:
            raise UsageError(f"--last must be at least 1 night. Received: last={self.last!r}")


def night_tests(
    reference: Night, tonight: Night, settings: MonitorSettings = MonitorSettings()
) -> list[DriftTest]:
    """Every test of tonight against the reference, Holm-adjusted and decided.

    Args:
        reference: The reference (``pool`` of its runs).
        tonight: Tonight's run.
        settings: Level, PSI threshold and bins.

    Returns:
        One ``DriftTest`` per column both sides have (``COLUMNS`` order), then ``class_mix``,
        ``unclassified_rate`` and ``error_rate``.
    """
    tests = [
        drift.continuous_test(name, reference.values[name], tonight.values[name], settings.bins)
        for name in COLUMNS
        if name in reference.values and name in tonight.values
    ]
    tests.append(drift.class_mix_test(reference.class_counts, tonight.class_counts))
    tests.append(
        drift.rate_test(
            "unclassified_rate",
            (reference.unclassified, reference.scored),
            (tonight.unclassified, tonight.scored),
        )
    )
    tests.append(
        drift.rate_test(
            "error_rate", (reference.errors, reference.rows), (tonight.errors, tonight.rows)
        )
    )
    return drift.decide(tests, settings.alpha, settings.min_psi)


def _estimates(metadata: dict) -> dict[str, float] | None:
    """``estimated_accuracy`` of a run's metadata as ``{name: value}`` (a lone number is
    ``value``), or ``None`` when it holds none."""
    found = metadata.get("estimated_accuracy")
    if isinstance(found, bool) or found is None:
        return None
    if isinstance(found, int | float):
        return {"value": float(found)}
    if isinstance(found, dict):
        numbers = {
            k: float(v)
            for k, v in found.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return numbers or None
    return None


def accuracy_estimate(reference: Sequence[Night], tonight: Night) -> dict | None:
    """Tonight's label-free accuracy estimate, the reference's and the change.

    Args:
        reference: The reference runs.
        tonight: Tonight's run.

    Returns:
        ``{name: {"tonight", "reference", "change"}}`` for each estimate that tonight and every
        reference run record (the reference's: the mean over its runs weighted by their scored
        rows); ``None`` when there is none.
    """
    now = _estimates(tonight.metadata)
    runs = [(_estimates(n.metadata), n.scored) for n in reference]
    if now is None or not runs or any(est is None for est, _ in runs):
        return None
    out = {}
    for name, value in now.items():
        pairs = [(est[name], w) for est, w in runs if name in est]  # type: ignore[index]
        weight = sum(w for _, w in pairs)
        if len(pairs) != len(runs) or weight == 0:
            continue
        ref = sum(v * w for v, w in pairs) / weight
        out[name] = {"tonight": value, "reference": ref, "change": value - ref}
    return out or None


@dataclass
class MonitorReport:
    """What ``monitor_runs`` found.

    Attributes:
        tonight: Tonight's run.
        reference: The reference runs, oldest first for a history folder.
        pooled: The reference's rows pooled (what tonight is tested against).
        tests: The night's tests (``night_tests``).
        settings: The thresholds used.
        estimated_accuracy: ``accuracy_estimate``'s table, or ``None``.
        series: With a history folder, one entry per night (reference nights, then tonight):
            ``date``, ``path``, ``rows``, ``tonight``, each column's mean and rate, and the
            Holm-adjusted p-value of each test of that night against the other reference
            nights pooled (tonight: against the whole reference); ``None`` without history.
    """

    tonight: Night
    reference: list[Night]
    pooled: Night
    tests: list[DriftTest]
    settings: MonitorSettings
    estimated_accuracy: dict | None = None
    series: list[dict] | None = None

    @property
    def alerts(self) -> list[str]:
        """The names of the tests that alert."""
        return [t.name for t in self.tests if t.alert]

    @property
    def alert(self) -> bool:
        """Whether any test alerts (``monitor`` exits 5)."""
        return bool(self.alerts)

    def as_json(self) -> dict:
        """The report as JSON values: the keys documented in docs/monitoring.md."""
        return {
            "alert": self.alert,
            "alerts": self.alerts,
            "settings": {
                "alpha": self.settings.alpha,
                "min_psi": self.settings.min_psi,
                "psi_bins": self.settings.bins,
                "last": self.settings.last,
                "correction": "holm",
            },
            "tonight": _run_json(self.tonight),
            "reference": {
                "runs": [_run_json(n) for n in self.reference],
                "rows": self.pooled.rows,
                "scored": self.pooled.scored,
            },
            "tests": [t.as_json() for t in self.tests],
            "estimated_accuracy": self.estimated_accuracy,
            "series": self.series,
        }


def _run_json(night: Night) -> dict:
    return {"path": night.path, "date": night.date, "rows": night.rows, "scored": night.scored}


def _series(
    nights: list[Night], tonight: Night, tests: list[DriftTest], settings: MonitorSettings
) -> list[dict]:
    """The time series of a history reference: each night's means and its tests' p-values."""
    entries = []
    for i, night in enumerate(nights):
        others = nights[:i] + nights[i + 1 :]
        p_adjusted = None
        if others and night.scored:
            decided = night_tests(pool(others), night, settings)
            p_adjusted = {t.name: drift._json_number(t.p_adjusted) for t in decided}
        entries.append(_series_entry(night, False, p_adjusted))
    tonight_p = {t.name: drift._json_number(t.p_adjusted) for t in tests}
    entries.append(_series_entry(tonight, True, tonight_p))
    return entries


def _series_entry(night: Night, is_tonight: bool, p_adjusted: dict | None) -> dict:
    return {
        "date": night.date,
        "path": night.path,
        "rows": night.rows,
        "tonight": is_tonight,
        "means": night.means(),
        "p_adjusted": p_adjusted,
    }


def monitor_nights(
    tonight: Night,
    reference: Sequence[Night],
    settings: MonitorSettings = MonitorSettings(),
    history: bool = False,
) -> MonitorReport:
    """Test a night already read against reference runs already read.

    Args:
        tonight: Tonight's run (``read_night``).
        reference: The reference runs (at least one).
        settings: The thresholds.
        history: Add the time series of the reference nights (``MonitorReport.series``).

    Returns:
        The report.

    Raises:
        NoImagesFoundError: If tonight holds no row.
        UsageError: If a reference run differs from tonight in model or settings, or the
            reference holds no scored row.
    """
    if tonight.rows == 0:
        raise NoImagesFoundError(
            f"tonight's run holds no rows: nothing to monitor. Received: tonight={tonight.path!r}"
        )
    used = [n for n in reference if n.rows]
    for night in used:
        _check_comparable(night, tonight)
    pooled = pool(used) if used else None
    if pooled is None or pooled.scored == 0:
        raise UsageError(
            "The reference holds no scored row. Received: reference="
            f"{[n.path for n in reference]!r}"
        )
    tests = night_tests(pooled, tonight, settings)
    return MonitorReport(
        tonight=tonight,
        reference=list(used),
        pooled=pooled,
        tests=tests,
        settings=settings,
        estimated_accuracy=accuracy_estimate(used, tonight),
        series=_series(list(used), tonight, tests, settings) if history else None,
    )


def monitor_runs(
    tonight: str | os.PathLike[str],
    reference: Sequence[str | os.PathLike[str]],
    settings: MonitorSettings = MonitorSettings(),
    missing_ok: bool = False,
) -> MonitorReport:
    """Test tonight's scored run against the reference: are tonight's images like those?

    Example::

        report = monitor_runs("history/date=2026-12-02", ["history/"], MonitorSettings(last=7))
        print(format_monitor(report)); exit_code = 5 if report.alert else 0

    Args:
        tonight: A file or folder of parts written by ``batchuq score``.
        reference: Runs (files, part folders) or history folders (their ``settings.last``
            latest nights before tonight's), pooled.
        settings: Level, PSI threshold, bins and nights.
        missing_ok: A missing ``tonight`` is an empty night rather than a usage error.

    Returns:
        The report; ``report.alert`` says whether any test alerts.

    Raises:
        NoImagesFoundError: If tonight holds no row (or, with ``missing_ok``, does not exist).
        UsageError: If a path does not exist or is not a ``score`` output, or a reference run
            differs from tonight in model or settings.
    """
    if not Path(tonight).exists():
        if missing_ok:
            raise NoImagesFoundError(
                f"tonight's run does not exist. Received: tonight={str(tonight)!r}"
            )
        raise UsageError(f"Tonight's run does not exist. Received: tonight={str(tonight)!r}")
    if not reference:
        raise UsageError("Give at least one reference run (--reference). Received: reference=[]")
    night = read_night(tonight)
    if night.rows == 0:
        return monitor_nights(night, [], settings)  # raises NoImagesFoundError
    runs, history = reference_nights(reference, tonight, settings.last)
    logger.info(
        "monitor: tonight %s (%d rows) against %d reference run(s)", tonight, night.rows, len(runs)
    )
    return monitor_nights(night, [read_night(r) for r in runs], settings, history)


def _cell(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


_HEADER = (
    "test",
    "kind",
    "statistic",
    "p",
    "p_holm",
    "PSI",
    "Wasserstein",
    "reference",
    "tonight",
    "alert",
)
_WIDTHS = (18, 6, 10, 9, 9, 8, 11, 10, 9, 5)


def _row(cells: Sequence[str]) -> str:
    """One line of the table: the names left-aligned, the numbers right-aligned."""
    return "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, _WIDTHS, strict=True))
    )


def format_monitor(report: MonitorReport) -> str:
    """The report for a terminal: one line per test, then the estimate and the verdict.

    Args:
        report: What ``monitor_runs`` returned.

    Returns:
        The text, without a final newline.
    """
    s = report.settings
    head = (
        f"tonight: {report.tonight.path} ({report.tonight.rows} rows, {report.tonight.scored} "
        f"scored); reference: {len(report.reference)} run(s), {report.pooled.rows} rows, "
        f"{report.pooled.scored} scored; Holm at alpha {s.alpha:g}, min PSI {s.min_psi:g}"
    )
    lines = [head, _row(_HEADER)]
    for t in report.tests:
        lines.append(
            _row(
                (
                    t.name,
                    t.test,
                    _cell(t.statistic),
                    _cell(t.p_value, ".3g"),
                    _cell(t.p_adjusted, ".3g"),
                    _cell(t.psi),
                    _cell(t.wasserstein),
                    _cell(t.reference),
                    _cell(t.tonight),
                    "YES" if t.alert else "no",
                )
            )
        )
    for name, est in (report.estimated_accuracy or {}).items():
        lines.append(
            f"estimated accuracy ({name}): {est['tonight']:.4f} tonight, "
            f"{est['reference']:.4f} reference, change {est['change']:+.4f}"
        )
    verdict = f"ALERT: {', '.join(report.alerts)}" if report.alert else "quiet: no test alerts"
    lines.append(verdict)
    return "\n".join(lines)
