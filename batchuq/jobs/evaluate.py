"""Evaluate a Parquet file written by ``batchuq score``: accuracy, calibration and how well the
uncertainty scores flag wrong predictions and out-of-distribution images.

All labelled metrics are computed on the rows whose ``status`` is ``ok`` and whose label is one
of the model's classes (``label_index`` not null); formulas are those of ``docs/methods.md`` (see
``batchuq.metrics``). The result is a plain dict of numbers, strings, lists and ``None`` (for
undefined values), so it can be printed as JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from batchuq import metrics
from batchuq.cli.config import config_option
from batchuq.postprocess.rules import UNCLASSIFIED_NAME
from batchuq.write import read_metadata

OK_STATUS = "ok"
EXIT_USAGE = 2

# Uncertainty scores compared by AUROC; higher = more uncertain.
SCORE_NAMES = ("1 - confidence", "entropy", "mutual_info", "mean_std", "variation_ratio")

__all__ = [
    "SCORE_NAMES",
    "evaluate_command",
    "evaluate_frame",
    "evaluate_parquet",
    "LabelledRows",
    "format_table",
    "labelled_rows",
    "uncertainty_scores",
]


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        raise ValueError(
            f"The table has no column {name!r}; was it written by `batchuq score`? "
            f"Received: columns={list(df.columns)}"
        )
    return df[name]


def _floats(df: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(_column(df, name)).to_numpy(dtype=np.float64, na_value=np.nan)


def _check_class_names(class_names: list[str]) -> list[str]:
    names = list(class_names)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(
            f"`class_names` must be a non-empty list of strings. Received: class_names={names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`class_names` must be unique. Received: class_names={names!r}")
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
        ValueError: If a column is missing.
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
    return (_column(df, "status").astype("string") == OK_STATUS).fillna(False).to_numpy(bool)


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

    Raises:
        ValueError: If a column is missing.
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


def _set_members(value: Any) -> list[str] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return [str(item) for item in value]


def evaluate_frame(
    df: pd.DataFrame, class_names: list[str], ood_df: pd.DataFrame | None = None
) -> dict:
    """Evaluate scored rows.

    Labelled metrics use the rows with ``status == "ok"`` and a non-null ``label_index``:
    accuracy of ``pred``; coverage = share with ``decision != "unclassified"``; selective
    accuracy = share of accepted rows whose decision is the label; NLL and Brier of the
    ``mean_<class>`` probabilities; ECE (15 bins) and AURC of ``confidence``; and, per
    uncertainty score, the AUROC for telling wrong from right predictions (wrong = positive).
    With ``ood_df``, the AUROC per score for telling its ok rows (positive) from all ok rows
    of ``df`` (labelled or not). With a ``pred_set`` column, the empirical coverage of the
    prediction sets (share of labelled ok rows whose label is in the set) and the mean size.

    Args:
        df: Rows of a ``batchuq score`` Parquet file.
        class_names: The model's class names (output order), from the file's metadata.
        ood_df: Rows of the same model's output on an out-of-distribution folder.

    Returns:
        A JSON-serialisable dict; undefined values (no labelled rows, only right predictions,
        nothing accepted) are ``None``. Keys: ``class_names``, ``rows`` (counts), ``n``,
        ``accuracy``, ``accepted``, ``coverage``, ``selective_accuracy``, ``nll``, ``brier``,
        ``ece``, ``aurc``, ``auroc_error`` (score name -> AUROC), ``ood`` (``None`` or a dict
        with ``n_ood``, ``n_in`` and ``auroc``), ``conformal`` (``None`` or a dict with ``n``,
        ``coverage`` and ``mean_set_size``).

    Raises:
        ValueError: If a column is missing or ``class_names`` is not a list of unique strings.
    """
    names = _check_class_names(class_names)
    ok = _ok_mask(df)
    has_label = _column(df, "label").notna().to_numpy(bool)
    lab = labelled_rows(df, names)
    labelled = lab.mask
    rows = {
        "total": len(df),
        "ok": int(ok.sum()),
        "errors": int((~ok).sum()),
        "labelled": int(labelled.sum()),
        "unlabelled": int((ok & ~has_label).sum()),
        "unknown_label": int((ok & has_label & ~labelled).sum()),
    }
    result: dict[str, Any] = {"class_names": names, "rows": rows, "n": int(labelled.sum())}
    scores = uncertainty_scores(df, names)

    keys = ("accuracy", "accepted", "coverage", "selective_accuracy", "nll", "brier")
    result.update(dict.fromkeys(keys + ("ece", "aurc")))
    result["auroc_error"] = dict.fromkeys(SCORE_NAMES)
    if labelled.any():
        y, correct, accepted = lab.labels, lab.correct, lab.accepted
        probs = np.column_stack([_floats(df[labelled], f"mean_{name}") for name in names])
        result.update(
            accuracy=metrics.accuracy(lab.pred, y),
            accepted=int(accepted.sum()),
            coverage=metrics.coverage(accepted),
            selective_accuracy=_number(metrics.selective_accuracy(lab.decision_correct, accepted)),
            nll=metrics.nll(probs, y),
            brier=metrics.brier(probs, y),
            ece=metrics.ece(lab.confidence, correct, n_bins=metrics.DEFAULT_ECE_BINS),
            aurc=metrics.aurc(lab.confidence, correct),
        )
        result["auroc_error"] = {
            name: _auroc_or_none(values[labelled], ~correct) for name, values in scores.items()
        }

    result["ood"] = None
    if ood_df is not None:
        ood_ok = _ok_mask(ood_df)
        ood_scores = uncertainty_scores(ood_df, names)
        in_ok = ok
        positives = np.concatenate(
            [np.zeros(int(in_ok.sum()), bool), np.ones(int(ood_ok.sum()), bool)]
        )
        result["ood"] = {
            "n_in": int(in_ok.sum()),
            "n_ood": int(ood_ok.sum()),
            "auroc": {
                name: _auroc_or_none(
                    np.concatenate([scores[name][in_ok], ood_scores[name][ood_ok]]), positives
                )
                for name in SCORE_NAMES
            },
        }

    result["conformal"] = None
    if "pred_set" in df.columns:
        sets = [_set_members(value) for value in df.loc[labelled, "pred_set"]]
        labels = df.loc[labelled, "label"].astype(str).tolist()
        pairs = [(s, lab) for s, lab in zip(sets, labels, strict=True) if s is not None]
        result["conformal"] = {
            "n": len(pairs),
            "coverage": _number(np.mean([lab in s for s, lab in pairs])) if pairs else None,
            "mean_set_size": _number(np.mean([len(s) for s, _ in pairs])) if pairs else None,
        }
    return result


def _read_frame(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict]:
    metadata = read_metadata(path)
    if not metadata.get("class_names"):
        raise ValueError(
            f"The file's batchuq metadata has no class_names. Received: path={str(path)!r}"
        )
    # The (large) raw `samples` column is left out; the report reads it for a few rows only.
    columns = [name for name in pq.read_schema(path).names if name != "samples"]
    return pq.read_table(path, columns=columns).to_pandas(), metadata


def read_scored(
    path: str | os.PathLike[str], ood_path: str | os.PathLike[str] | None = None
) -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """Read a scored file and, optionally, its OOD counterpart (without ``samples``).

    Returns:
        ``(df, metadata, ood_df)``; ``ood_df`` is ``None`` without ``ood_path``.

    Raises:
        ValueError: If a file has no batchuq metadata, or the two files have different class
            names.
        OSError: If a file cannot be read.
    """
    df, metadata = _read_frame(path)
    ood_df = None
    if ood_path is not None:
        ood_df, ood_metadata = _read_frame(ood_path)
        if list(ood_metadata["class_names"]) != list(metadata["class_names"]):
            raise ValueError(
                "The OOD file was scored with other class names than the in-distribution file "
                f"({list(metadata['class_names'])!r}). "
                f"Received: ood_class_names={ood_metadata['class_names']!r}"
            )
    return df, metadata, ood_df


def evaluate_parquet(
    path: str | os.PathLike[str],
    ood_path: str | os.PathLike[str] | None = None,
    scored: tuple[pd.DataFrame, dict, pd.DataFrame | None] | None = None,
) -> dict:
    """Evaluate a Parquet file written by ``batchuq score`` (see ``evaluate_frame``).

    Args:
        path: The scored in-distribution file; class names come from its metadata.
        ood_path: The same model's output on an out-of-distribution folder.
        scored: What ``read_scored(path, ood_path)`` returned, when the caller has read the
            files already.

    Returns:
        The dict of ``evaluate_frame`` plus ``file``, ``ood_file``, ``passes``, ``tta`` and
        ``decision_rule`` from the metadata.

    Raises:
        ValueError: If a file has no batchuq metadata or a column is missing, or the two files
            have different class names.
        OSError: If a file cannot be read.
    """
    df, metadata, ood_df = scored or read_scored(path, ood_path)
    class_names = list(metadata["class_names"])
    result = {
        "file": str(path),
        "ood_file": None if ood_path is None else str(ood_path),
        "passes": metadata.get("passes"),
        "tta": metadata.get("tta"),
        "decision_rule": metadata.get("decision_rule"),
    }
    result.update(evaluate_frame(df, class_names, ood_df))
    return result


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(results: dict) -> str:
    """Render the results of ``evaluate_parquet`` / ``evaluate_frame`` as a plain-text table.

    Args:
        results: The dict returned by ``evaluate_parquet`` or ``evaluate_frame``.

    Returns:
        Lines of ``name  value`` grouped in sections, for a terminal.
    """
    sections: list[tuple[str, list[tuple[str, Any]]]] = []
    rows = results.get("rows", {})
    header = [("file", results.get("file"))] if results.get("file") else []
    rule = results.get("decision_rule")
    if isinstance(rule, dict):
        params = ", ".join(f"{k}={v}" for k, v in rule.items() if k != "rule")
        header.append(("decision rule", f"{rule.get('rule')}" + (f" ({params})" if params else "")))
    if results.get("passes") is not None:
        header.append(("passes x tta", f"{results.get('passes')} x {results.get('tta')}"))
    header += [
        ("rows", rows.get("total")),
        ("  ok", rows.get("ok")),
        ("  errors", rows.get("errors")),
        ("  unlabelled", rows.get("unlabelled")),
        ("  label not a class", rows.get("unknown_label")),
    ]
    sections.append(("Input", header))
    sections.append(
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
        )
    )
    sections.append(
        (
            "AUROC, wrong vs right prediction",
            list((results.get("auroc_error") or {}).items()),
        )
    )
    ood = results.get("ood")
    if ood:
        sections.append(
            (
                f"AUROC, OOD ({ood.get('n_ood')}) vs in-distribution ({ood.get('n_in')})",
                list((ood.get("auroc") or {}).items()),
            )
        )
    conformal = results.get("conformal")
    if conformal:
        sections.append(
            (
                f"Conformal prediction sets (N = {conformal.get('n')})",
                [
                    ("empirical coverage", conformal.get("coverage")),
                    ("mean set size", conformal.get("mean_set_size")),
                ],
            )
        )
    width = max(len(name) for _, items in sections for name, _ in items)
    lines: list[str] = []
    for title, items in sections:
        if lines:
            lines.append("")
        lines.append(title)
        lines.append("-" * max(len(title), width + 10))
        lines.extend(f"{name:<{width}}  {_fmt(value)}" for name, value in items)
    return "\n".join(lines)


@click.command("evaluate")
@click.argument(
    "out", metavar="OUT.parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--ood",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Parquet file from `batchuq score` on out-of-distribution images, scored by the same "
    "model; adds the AUROC of each score for telling OOD from in-distribution images.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Also write an HTML report with plots (index.html and PNGs) to this folder.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print the results as JSON instead of a table.",
)
@config_option
def evaluate_command(out: Path, ood: Path | None, report_dir: Path | None, as_json: bool) -> None:
    """Evaluate OUT.parquet, written by `batchuq score` on a labelled folder.

    On the readable, labelled images: accuracy, coverage and selective accuracy of the
    decision rule, NLL, Brier score, ECE (15 bins), AURC, and the AUROC with which each
    uncertainty score (1 - confidence, entropy, mutual information, mean std, variation ratio)
    tells wrong predictions from right ones. With --ood, also how well each score tells the
    out-of-distribution images from the in-distribution ones.

    Example:

        batchuq evaluate out.parquet --ood ood.parquet --report report/
    """
    try:
        results = evaluate_parquet(out, ood)
        if report_dir is not None:
            from batchuq.jobs.report import write_report

            index = write_report(out, report_dir, ood_path=ood)
            results["report"] = str(index)
    except (ValueError, OSError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(results, indent=2, allow_nan=False))
    else:
        click.echo(format_table(results))
        if report_dir is not None:
            click.echo(f"\nreport: {results['report']}", err=True)
