"""Evaluate a Parquet file written by ``batchuq score``: accuracy, calibration and how well the
uncertainty scores flag wrong predictions and out-of-distribution images.

All labelled metrics are computed on the rows whose ``status`` is ``ok`` and whose label is one
of the model's classes (``label_index`` not null); formulas are those of ``docs/methods.md`` (see
``batchuq.metrics``). The results are a plain dict of numbers, strings, lists and ``None`` (for
undefined values), so they can be printed as JSON.

Each file is read once (``read_scored_file``) and evaluated once (``evaluate_file``); the
``Evaluation`` it returns keeps the arrays the metrics were computed from (labelled rows,
uncertainty scores, reliability bins, risk-coverage curve), which is all that
``batchuq.report.evaluate`` draws from. This module never imports the report: the report imports
it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchuq import metrics
from batchuq.defaults import STATUS_OK, UNCLASSIFIED_NAME
from batchuq.errors import UsageError
from batchuq.output.schema import metadata_of
from batchuq.postprocess.coverage import coverage_rows, stratified_coverage
from batchuq.postprocess.ood import OOD_COLUMN_SCORES, ood_metrics
from batchuq.postprocess.selective import clopper_pearson

# Uncertainty scores compared by AUROC; higher = more uncertain.
SCORE_NAMES = ("1 - confidence", "entropy", "mutual_info", "mean_std", "variation_ratio")

# The raw samples column of `batchuq score --save-samples`: large, and only the report uses it.
SAMPLES_COLUMN = "samples"

__all__ = [
    "SCORE_NAMES",
    "Evaluation",
    "LabelledRows",
    "RiskCoverage",
    "ScoredFile",
    "evaluate_file",
    "evaluate_frame",
    "evaluate_parquet",
    "format_table",
    "labelled_rows",
    "read_scored_file",
    "uncertainty_scores",
]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # holds DataFrames and arrays: compared by identity
class ScoredFile:
    """A Parquet file written by ``batchuq score``, read once.

    Attributes:
        path: The file, as the caller named it.
        frame: Every column except ``samples``, one row per image.
        metadata: The batchuq run metadata stored in the file (has ``class_names``).
        samples: The ``samples`` column as Arrow (per row a ``(samples, classes)`` list), or
            ``None`` when the file has none or it was not asked for.
    """

    path: str | os.PathLike[str]
    frame: pd.DataFrame
    metadata: dict
    samples: pa.ChunkedArray | None = None

    @property
    def class_names(self) -> list[str]:
        """The model's class names in output order."""
        return list(self.metadata["class_names"])


def _batchuq_metadata(
    key_values: pa.Schema | dict[bytes, bytes] | None, path: str | os.PathLike[str]
) -> dict:
    """The batchuq metadata of a file (its schema or footer key-values), checked to name the
    classes.

    Raises:
        UsageError: If the file has no batchuq metadata or it has no class names.
    """
    metadata = metadata_of(key_values, path)
    if not metadata.get("class_names"):
        raise UsageError(
            f"The file's batchuq metadata has no class_names. Received: path={str(path)!r}"
        )
    return metadata


def read_scored_file(path: str | os.PathLike[str], *, samples: bool = False) -> ScoredFile:
    """Read a file written by ``batchuq score``: its metadata and rows, in one pass.

    Args:
        path: The Parquet file.
        samples: Also read the (large) ``samples`` column if the file has one; the report
            draws the raw samples of a few images from it.

    Returns:
        The ``ScoredFile``.

    Raises:
        UsageError: If the file is not Parquet, cannot be read, or has no batchuq metadata
            with class names.
    """
    try:
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            metadata = _batchuq_metadata(parquet.metadata.metadata, path)
            wanted = [name for name in schema.names if samples or name != SAMPLES_COLUMN]
            table = parquet.read(columns=wanted)
    except (OSError, pa.ArrowException) as exc:
        # A file that is not Parquet (or not readable) is the caller's input, not a crash.
        raise UsageError(f"{exc}. Received: path={str(path)!r}") from exc
    column = None
    if SAMPLES_COLUMN in table.column_names:
        column = table.column(SAMPLES_COLUMN)
        table = table.drop_columns([SAMPLES_COLUMN])
    return ScoredFile(path=path, frame=table.to_pandas(), metadata=metadata, samples=column)


def _read_pair(
    path: str | os.PathLike[str], ood_path: str | os.PathLike[str] | None, samples: bool
) -> tuple[ScoredFile, ScoredFile | None]:
    """Read a scored file and, optionally, its OOD counterpart (without its samples).

    Raises:
        UsageError: As ``read_scored_file``, or if the two files have different class names.
    """
    scored = read_scored_file(path, samples=samples)
    if ood_path is None:
        return scored, None
    ood = read_scored_file(ood_path)
    if ood.class_names != scored.class_names:
        raise UsageError(
            "The OOD file was scored with other class names than the in-distribution file "
            f"({scored.class_names!r}). Received: ood_class_names={ood.metadata['class_names']!r}"
        )
    return scored, ood


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        raise UsageError(
            f"The table has no column {name!r}; was it written by `batchuq score`? "
            f"Received: columns={list(df.columns)}"
        )
    return df[name]


def _floats(df: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(_column(df, name)).to_numpy(dtype=np.float64, na_value=np.nan)


def _check_class_names(class_names: list[str]) -> list[str]:
    names = list(class_names)
    if not names or not all(isinstance(name, str) for name in names):
        raise UsageError(
            f"`class_names` must be a non-empty list of strings. Received: class_names={names!r}"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"`class_names` must be unique. Received: class_names={names!r}")
    return names


def uncertainty_scores(df: pd.DataFrame, class_names: list[str]) -> dict[str, np.ndarray]:
    """The uncertainty scores of every row, higher meaning more uncertain.

    Args:
        df: Rows of a ``batchuq score`` Parquet file (as a pandas DataFrame).
        class_names: The model's class names (output order).

    Returns:
        A dict from each name in ``SCORE_NAMES`` to a float64 array of shape ``(rows,)``:
        ``1 - confidence``, ``entropy``, ``mutual_info``, ``mean_std`` (the average of the
        ``std_<class>`` columns) and ``variation_ratio``. Rows without scores are NaN.

    Raises:
        UsageError: If a column is missing.
    """
    stds = np.column_stack([_floats(df, f"std_{name}") for name in class_names])
    return {
        "1 - confidence": 1.0 - _floats(df, "confidence"),
        "entropy": _floats(df, "entropy"),
        "mutual_info": _floats(df, "mutual_info"),
        "mean_std": stds.mean(axis=1),
        "variation_ratio": _floats(df, "variation_ratio"),
    }


def _number(value: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities become ``None``."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _auroc_or_none(scores: np.ndarray, positives: np.ndarray) -> float | None:
    if positives.all() or not positives.any() or not np.isfinite(scores).all():
        return None
    return _number(metrics.auroc(scores, positives))


def _ok_mask(df: pd.DataFrame) -> np.ndarray:
    return (_column(df, "status").astype("string") == STATUS_OK).fillna(False).to_numpy(bool)


class LabelledRows(NamedTuple):
    """The rows the labelled metrics use: ``status == "ok"`` and a label that is a class.

    Attributes:
        mask: Which rows of the frame these are, boolean shape ``(rows,)``.
        labels: True class index of each, int64 shape ``(n,)``.
        pred: Predicted class index (``pred_index``), float64 shape ``(n,)``.
        confidence: The ``confidence`` column, float64 shape ``(n,)``.
        correct: ``pred == labels``, boolean shape ``(n,)``.
        accepted: ``decision != "unclassified"``, boolean shape ``(n,)``.
        decision_correct: Whether the decision is the true class, boolean shape ``(n,)``.
    """

    mask: np.ndarray
    labels: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    accepted: np.ndarray
    decision_correct: np.ndarray


def labelled_rows(df: pd.DataFrame, class_names: list[str]) -> LabelledRows:
    """Select the labelled ok rows of ``df`` and read what the labelled metrics need.

    Args:
        df: Rows of a ``batchuq score`` Parquet file.
        class_names: The model's class names (output order).

    Returns:
        The ``LabelledRows``.

    Raises:
        UsageError: If a column is missing.
    """
    mask = _ok_mask(df) & np.isfinite(_floats(df, "label_index"))
    lab = df[mask]
    labels = _floats(lab, "label_index").astype(np.int64)
    pred = _floats(lab, "pred_index")
    decision = _column(lab, "decision").astype("string").fillna(UNCLASSIFIED_NAME)
    index_of = {name: i for i, name in enumerate(class_names)}
    decided = decision.map(index_of).to_numpy(dtype=np.float64, na_value=np.nan)
    return LabelledRows(
        mask=mask,
        labels=labels,
        pred=pred,
        confidence=_floats(lab, "confidence"),
        correct=pred == labels,
        accepted=(decision != UNCLASSIFIED_NAME).to_numpy(bool),
        decision_correct=decided == labels,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class RiskCoverage(NamedTuple):
    """The risk-coverage curve of the labelled rows by ``confidence`` (``metrics``).

    Attributes:
        coverage: k / N for k = 1..N, float64 shape ``(n,)``.
        risk: Error rate among the k most confident rows, float64 shape ``(n,)``.
    """

    coverage: np.ndarray
    risk: np.ndarray


@dataclass(frozen=True, eq=False)  # holds DataFrames and arrays: compared by identity
class Evaluation:
    """Scored rows, evaluated: the results and the arrays they were computed from.

    The report draws from these, so that it computes nothing that evaluate computed.

    Attributes:
        results: The JSON-serialisable results (see ``evaluate_frame`` and ``evaluate_file``).
        class_names: The model's class names (output order).
        frame: The in-distribution rows.
        ok: Which rows have ``status == "ok"``, boolean shape ``(rows,)``.
        labelled: The labelled ok rows (``LabelledRows``).
        scores: Each uncertainty score of every row, float64 shape ``(rows,)`` each.
        reliability: The confidence bins of the labelled rows; ``None`` without any.
        risk_coverage: Their risk-coverage curve; ``None`` without labelled rows.
        ood_ok: Which OOD rows have ``status == "ok"``, boolean ``(ood rows,)``; or ``None``.
        ood_scores: Each uncertainty score of every OOD row; ``None`` without OOD rows.
        source: The file the rows were read from (``evaluate_file``); ``None`` for frames.
        ood_source: The OOD file, if any.
    """

    results: dict
    class_names: list[str]
    frame: pd.DataFrame
    ok: np.ndarray
    labelled: LabelledRows
    scores: dict[str, np.ndarray]
    reliability: metrics.ReliabilityBins | None
    risk_coverage: RiskCoverage | None
    ood_ok: np.ndarray | None = None
    ood_scores: dict[str, np.ndarray] | None = None
    source: ScoredFile | None = None
    ood_source: ScoredFile | None = None


def _row_counts(df: pd.DataFrame, ok: np.ndarray, labelled: np.ndarray) -> dict[str, int]:
    """How many rows are ok, failed, labelled, unlabelled, or labelled with a non-class."""
    has_label = _column(df, "label").notna().to_numpy(bool)
    return {
        "total": len(df),
        "ok": int(ok.sum()),
        "errors": int((~ok).sum()),
        "labelled": int(labelled.sum()),
        "unlabelled": int((ok & ~has_label).sum()),
        "unknown_label": int((ok & has_label & ~labelled).sum()),
    }


def _labelled_metrics(
    df: pd.DataFrame, names: list[str], lab: LabelledRows
) -> tuple[dict[str, Any], metrics.ReliabilityBins | None, RiskCoverage | None]:
    """Accuracy, coverage, NLL, Brier, ECE and AURC of the labelled rows (``None`` if none).

    Returns:
        ``(metrics by result key, reliability bins, risk-coverage curve)``.
    """
    keys = ("accuracy", "accepted", "coverage", "selective_accuracy", "nll", "brier")
    values: dict[str, Any] = dict.fromkeys(keys + ("ece", "aurc"))
    if not lab.mask.any():
        return values, None, None
    y, correct, accepted = lab.labels, lab.correct, lab.accepted
    probs = np.column_stack([_floats(df[lab.mask], f"mean_{name}") for name in names])
    values.update(
        accuracy=metrics.accuracy(lab.pred, y),
        accepted=int(accepted.sum()),
        coverage=metrics.coverage(accepted),
        selective_accuracy=_number(metrics.selective_accuracy(lab.decision_correct, accepted)),
        nll=metrics.nll(probs, y),
        brier=metrics.brier(probs, y),
        ece=metrics.ece(lab.confidence, correct, n_bins=metrics.DEFAULT_ECE_BINS),
        aurc=metrics.aurc(lab.confidence, correct),
    )
    bins = metrics.reliability_bins(lab.confidence, correct, n_bins=metrics.DEFAULT_ECE_BINS)
    curve = RiskCoverage(*metrics.risk_coverage_curve(lab.confidence, correct))
    return values, bins, curve


def _error_aurocs(scores: dict[str, np.ndarray], lab: LabelledRows) -> dict[str, float | None]:
    """Per score, the AUROC for telling wrong from right predictions (wrong = positive)."""
    if not lab.mask.any():
        return dict.fromkeys(SCORE_NAMES)
    return {name: _auroc_or_none(values[lab.mask], ~lab.correct) for name, values in scores.items()}


def ood_column_scores(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The OOD columns a file holds (``max_logit``, ``energy``, ``knn_distance``,
    ``gp_variance``), each as a score higher for OOD images (``OOD_COLUMN_SCORES``: the max
    logit negated, as ``-max_logit``)."""
    return {
        name: sign * _floats(df, column)
        for name, (column, sign) in OOD_COLUMN_SCORES.items()
        if column in df.columns
    }


def _ood_aurocs(
    ok: np.ndarray,
    scores: dict[str, np.ndarray],
    ood_ok: np.ndarray,
    ood_scores: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Per score both files have, the AUROC for telling ok OOD rows (positive) from ok
    in-distribution rows, and the FPR@95 (``postprocess.ood.ood_metrics``)."""
    n_in, n_ood = int(ok.sum()), int(ood_ok.sum())
    positives = np.concatenate([np.zeros(n_in, bool), np.ones(n_ood, bool)])
    names = [name for name in scores if name in ood_scores]
    found = {
        name: ood_metrics(np.concatenate([scores[name][ok], ood_scores[name][ood_ok]]), positives)
        for name in names
    }
    return {
        "n_in": n_in,
        "n_ood": n_ood,
        "auroc": {name: _number(found[name]["auroc"]) for name in names},
        "fpr95": {name: _number(found[name]["fpr95"]) for name in names},
    }


def _set_members(value: Any) -> list[str] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return [str(item) for item in value]


def _conformal(
    df: pd.DataFrame, labelled: np.ndarray, names: list[str] | None = None
) -> dict[str, Any] | None:
    """Empirical coverage and mean size of the ``pred_set`` column, and the same per true
    class and per set size with Clopper–Pearson intervals (``stratified_coverage``); ``None``
    without the column."""
    if "pred_set" not in df.columns:
        return None
    sets = [_set_members(value) for value in df.loc[labelled, "pred_set"]]
    labels = df.loc[labelled, "label"].astype(str).tolist()
    pairs = [(s, label) for s, label in zip(sets, labels, strict=True) if s is not None]
    return {
        "n": len(pairs),
        "coverage": _number(np.mean([label in s for s, label in pairs])) if pairs else None,
        "mean_set_size": _number(np.mean([len(s) for s, _ in pairs])) if pairs else None,
        **stratified_coverage([s for s, _ in pairs], [label for _, label in pairs], names or []),
    }


def evaluate_scored(
    df: pd.DataFrame, class_names: list[str], ood_df: pd.DataFrame | None = None
) -> Evaluation:
    """Evaluate scored rows; what ``evaluate_frame`` returns the results of.

    Raises:
        UsageError: As ``evaluate_frame``.
    """
    names = _check_class_names(class_names)
    ok = _ok_mask(df)
    lab = labelled_rows(df, names)
    rows = _row_counts(df, ok, lab.mask)
    scores = uncertainty_scores(df, names)
    values, bins, curve = _labelled_metrics(df, names, lab)
    results: dict[str, Any] = {
        "class_names": names,
        "rows": rows,
        "n": int(lab.mask.sum()),
        **values,
        "auroc_error": _error_aurocs(scores, lab),
        "ood": None,
    }
    ood_ok = ood_scores = None
    if ood_df is not None:
        ood_ok, ood_scores = _ok_mask(ood_df), uncertainty_scores(ood_df, names)
        results["ood"] = _ood_aurocs(
            ok,
            scores | ood_column_scores(df),
            ood_ok,
            ood_scores | ood_column_scores(ood_df),
        )
    results["conformal"] = _conformal(df, lab.mask, names)
    return Evaluation(
        results=results,
        class_names=names,
        frame=df,
        ok=ok,
        labelled=lab,
        scores=scores,
        reliability=bins,
        risk_coverage=curve,
        ood_ok=ood_ok,
        ood_scores=ood_scores,
    )


def evaluate_frame(
    df: pd.DataFrame, class_names: list[str], ood_df: pd.DataFrame | None = None
) -> dict:
    """Evaluate scored rows.

    Labelled metrics use the rows with ``status == "ok"`` and a non-null ``label_index``:
    accuracy of ``pred``; coverage = share with ``decision != "unclassified"``; selective
    accuracy = share of accepted rows whose decision is the label; NLL and Brier of the
    ``mean_<class>`` probabilities; ECE (15 bins) and AURC of ``confidence``; and, per
    uncertainty score, the AUROC for telling wrong from right predictions (wrong = positive).
    With ``ood_df``, the AUROC and FPR@95 (``postprocess.ood.ood_metrics``) per score for
    telling its ok rows (positive) from all ok rows of ``df`` (labelled or not): the scores of
    ``SCORE_NAMES`` and the OOD columns both files hold (``ood_column_scores``). With a
    ``pred_set`` column, the empirical coverage of the prediction sets (share of labelled ok
    rows whose label is in the set) and the mean size.

    Args:
        df: Rows of a ``batchuq score`` Parquet file.
        class_names: The model's class names (output order), from the file's metadata.
        ood_df: Rows of the same model's output on an out-of-distribution folder.

    Returns:
        A JSON-serialisable dict; undefined values (no labelled rows, only right predictions,
        nothing accepted) are ``None``. Keys: ``class_names``, ``rows`` (counts), ``n``,
        ``accuracy``, ``accepted``, ``coverage``, ``selective_accuracy``, ``nll``, ``brier``,
        ``ece``, ``aurc``, ``auroc_error`` (score name -> AUROC), ``ood`` (``None`` or a dict
        with ``n_ood``, ``n_in``, ``auroc`` and ``fpr95``), ``conformal`` (``None`` or a dict
        with ``n``, ``coverage`` and ``mean_set_size``).

    Raises:
        UsageError: If a column is missing or ``class_names`` is not a list of unique strings
            (a ``ValueError`` too).
    """
    return evaluate_scored(df, class_names, ood_df).results


def evaluate_file(
    path: str | os.PathLike[str],
    ood_path: str | os.PathLike[str] | None = None,
    *,
    samples: bool = False,
) -> Evaluation:
    """Read a file written by ``batchuq score`` (and an OOD one) once, and evaluate it.

    Args:
        path: The scored in-distribution file; class names come from its metadata.
        ood_path: The same model's output on an out-of-distribution folder.
        samples: Also keep the ``samples`` column (``score --save-samples``) of ``path``, for
            the report's per-image box plots.

    Returns:
        The ``Evaluation``, with ``source`` and ``ood_source`` set. Its ``results`` are those
        of ``evaluate_frame`` preceded by ``file``, ``ood_file``, ``passes``, ``tta`` and
        ``decision_rule`` from the metadata.

    Raises:
        UsageError: If a file is not a batchuq Parquet file or lacks a column, or the two
            files have different class names (a ``ValueError`` too).
    """
    scored, ood = _read_pair(path, ood_path, samples)
    metadata = scored.metadata
    evaluation = evaluate_scored(
        scored.frame, scored.class_names, None if ood is None else ood.frame
    )
    results = {
        "file": str(path),
        "ood_file": None if ood_path is None else str(ood_path),
        "passes": metadata.get("passes"),
        "mean_passes": _mean_passes(scored.frame),
        "tta": metadata.get("tta"),
        "decision_rule": metadata.get("decision_rule"),
        **evaluation.results,
        "selective": selective_check(evaluation.labelled, metadata.get("decision_rule")),
    }
    return dataclasses.replace(evaluation, results=results, source=scored, ood_source=ood)


def selective_check(lab: LabelledRows, rule: dict[str, Any] | None) -> dict[str, Any] | None:
    """For a ``--rule risk`` run: the realised selective risk and coverage against the target.

    Over the labelled ok rows: ``risk`` = wrong decisions among the accepted ones / accepted,
    ``coverage`` = accepted / N, each with its two-sided 95% Clopper–Pearson interval
    (``clopper_pearson``). ``target_held`` is whether the realised risk is at or below the
    certified ``target_risk``. The certificate bounds the *population* selective risk (with
    probability ``1 - delta``); one night's share scatters around it, which the interval
    shows: a realised risk above the target with an interval that reaches below it is not, by
    itself, evidence that the certificate failed.

    Args:
        lab: The labelled ok rows.
        rule: The ``decision_rule`` entry of the metadata.

    Returns:
        ``None`` for another rule; else ``target_risk``, ``delta``, ``statement``, ``n``,
        ``accepted``, ``errors``, ``risk``, ``risk_interval``, ``coverage``,
        ``coverage_interval``, ``interval_level`` (0.95) and ``target_held`` (values ``None``
        where undefined: no labelled row, nothing accepted).
    """
    if not isinstance(rule, dict) or rule.get("rule") != "risk":
        return None
    certificate = rule.get("certificate") or {}
    target = certificate.get("target_risk")
    n = int(lab.mask.sum())
    accepted = int(lab.accepted.sum())
    errors = int((lab.accepted & ~lab.decision_correct).sum())
    risk = errors / accepted if accepted else None
    return {
        "target_risk": target,
        "delta": certificate.get("delta"),
        "statement": rule.get("statement"),
        "n": n,
        "accepted": accepted,
        "errors": errors,
        "risk": risk,
        "risk_interval": list(clopper_pearson(errors, accepted, _LEVEL)) if accepted else None,
        "coverage": accepted / n if n else None,
        "coverage_interval": list(clopper_pearson(accepted, n, _LEVEL)) if n else None,
        "interval_level": _LEVEL,
        "target_held": None if risk is None or target is None else bool(risk <= target),
    }


_LEVEL = 0.95  # of the Clopper–Pearson intervals of ``selective_check``


def _mean_passes(frame: pd.DataFrame) -> float | None:
    """Mean passes per readable image (varies with ``--passes auto``); None in older files."""
    if "passes" not in frame.columns or not frame["passes"].notna().any():
        return None
    return round(float(frame["passes"].mean()), 2)


def evaluate_parquet(
    path: str | os.PathLike[str], ood_path: str | os.PathLike[str] | None = None
) -> dict:
    """Evaluate a Parquet file written by ``batchuq score`` (see ``evaluate_frame``).

    Args:
        path: The scored in-distribution file; class names come from its metadata.
        ood_path: The same model's output on an out-of-distribution folder.

    Returns:
        The dict of ``evaluate_frame`` plus ``file``, ``ood_file``, ``passes``, ``tta`` and
        ``decision_rule`` from the metadata.

    Raises:
        UsageError: If a file has no batchuq metadata or a column is missing, or the two files
            have different class names (a ``ValueError`` too).
    """
    return evaluate_file(path, ood_path).results


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

_Section = tuple[str, list[tuple[str, Any]]]


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _significant(value: Any) -> str:
    """A rule parameter for people: floats to 4 significant digits, lists item by item."""
    if isinstance(value, list):
        return "[" + ", ".join(_significant(v) for v in value) + "]"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_rule(rule: dict[str, Any] | None) -> str:
    """The decision rule of the metadata as text, e.g. ``threshold (thresholds=[0.9983, ...])``.

    Thresholds are printed to 4 significant digits (``None``, a class without one, as
    ``none``); the JSON results and the metadata keep every digit.

    Args:
        rule: The ``decision_rule`` entry of the metadata (``None``: not recorded).

    Returns:
        The rule's name and its parameters, or ``n/a``.
    """
    if not isinstance(rule, dict):
        return "n/a"
    shown = {k: v for k, v in rule.items() if k not in ("rule", "certificate", "statement")}
    params = ", ".join(f"{k}={_significant(v)}" for k, v in shown.items())
    return f"{rule.get('rule', 'n/a')}" + (f" ({params})" if params else "")


def _input_section(results: dict) -> _Section:
    """The file, the run's settings and the row counts."""
    rows = results.get("rows", {})
    items = [("file", results.get("file"))] if results.get("file") else []
    rule = results.get("decision_rule")
    if isinstance(rule, dict):
        items.append(("decision rule", format_rule(rule)))
    if results.get("passes") is not None:
        items.append(("passes x tta", f"{results.get('passes')} x {results.get('tta')}"))
    if results.get("passes") == "auto" and results.get("mean_passes") is not None:
        items.append(("  mean passes", f"{results['mean_passes']:.1f}"))
    items += [
        ("rows", rows.get("total")),
        ("  ok", rows.get("ok")),
        ("  errors", rows.get("errors")),
        ("  unlabelled", rows.get("unlabelled")),
        ("  label not a class", rows.get("unknown_label")),
    ]
    return "Input", items


def _metric_sections(results: dict) -> list[_Section]:
    """The labelled metrics, the AUROCs, and the OOD and conformal results when present."""
    sections: list[_Section] = [
        (
            f"Labelled ok rows (N = {results.get('n')})",
            [
                ("accuracy (pred)", results.get("accuracy")),
                ("coverage (accepted / N)", results.get("coverage")),
                ("selective accuracy", results.get("selective_accuracy")),
                ("NLL (nats)", results.get("nll")),
                ("Brier", results.get("brier")),
                ("ECE (15 bins)", results.get("ece")),
                ("AURC", results.get("aurc")),
            ],
        ),
        ("AUROC, wrong vs right prediction", list((results.get("auroc_error") or {}).items())),
    ]
    ood = results.get("ood")
    if ood:
        title = f"OOD ({ood.get('n_ood')}) vs in-distribution ({ood.get('n_in')}): AUROC, FPR@95"
        fpr95 = ood.get("fpr95") or {}
        items = [
            (name, f"{_fmt(value)}  {_fmt(fpr95.get(name))}")
            for name, value in (ood.get("auroc") or {}).items()
        ]
        sections.append((title, items))
    conformal = results.get("conformal")
    if conformal:
        items = [
            ("empirical coverage", conformal.get("coverage")),
            ("mean set size", conformal.get("mean_set_size")),
        ]
        sections.append((f"Conformal prediction sets (N = {conformal.get('n')})", items))
        if conformal.get("per_class"):
            title = "Conformal coverage per true class (95% Clopper-Pearson)"
            sections.append((title, coverage_rows(conformal["per_class"], "class")))
        if conformal.get("per_size"):
            title = "Conformal coverage per set size (size-stratified, 95% Clopper-Pearson)"
            sections.append((title, coverage_rows(conformal["per_size"], "size")))
    selective = results.get("selective")
    if selective:
        sections.append(_selective_section(selective))
    return sections


def _interval_text(value: float | None, interval: list[float] | None) -> str:
    """``0.0153 (95% CI 0.0050-0.0353)``, or ``n/a``."""
    if value is None or interval is None:
        return "n/a"
    return f"{value:.4f} (95% CI {interval[0]:.4f}-{interval[1]:.4f})"


def _selective_section(selective: dict[str, Any]) -> _Section:
    """The ``--rule risk`` check: certified target, realised risk and coverage, verdict."""
    target, held = selective.get("target_risk"), selective.get("target_held")
    verdict = "n/a" if held is None else ("target held" if held else "target exceeded")
    if held is not None and selective.get("risk_interval"):
        low, high = selective["risk_interval"]
        where = "inside" if low <= target <= high else ("above" if target > high else "below")
        verdict += f" (target {target:.4g} is {where} the risk's 95% CI)"
    items = [
        ("certificate", selective.get("statement")),
        ("target selective risk", target),
        ("accepted / errors", f"{selective.get('accepted')} / {selective.get('errors')}"),
        (
            "realised selective risk",
            _interval_text(selective.get("risk"), selective.get("risk_interval")),
        ),
        (
            "coverage (accepted / N)",
            _interval_text(selective.get("coverage"), selective.get("coverage_interval")),
        ),
        ("verdict", verdict),
    ]
    return f"Selective risk, --rule risk (N = {selective.get('n')})", items


def _render(sections: list[_Section]) -> str:
    """Sections as a title, a rule and aligned ``name  value`` lines, blank lines between."""
    width = max(len(name) for _, items in sections for name, _ in items)
    lines: list[str] = []
    for title, items in sections:
        if lines:
            lines.append("")
        lines.append(title)
        lines.append("-" * max(len(title), width + 10))
        lines.extend(f"{name:<{width}}  {_fmt(value)}" for name, value in items)
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """Render the results of ``evaluate_parquet`` / ``evaluate_frame`` as a plain-text table.

    Args:
        results: The dict returned by ``evaluate_parquet`` or ``evaluate_frame``.

    Returns:
        Lines of ``name  value`` grouped in sections, for a terminal.
    """
    return _render([_input_section(results), *_metric_sections(results)])
