"""The HTML report of ``batchuq evaluate --report``, for a file written by ``batchuq score``.

``write_report`` writes ``index.html`` and PNG plots into a folder: a reliability diagram (with
the image count of each bin; bins of fewer than 5 images faded), the risk-coverage curve (with a
zoomed panel where it changes, and the run's decision rule marked), histograms of each
uncertainty score for right / wrong / OOD images, a confusion matrix, and the most uncertain
images (top 12 by entropy, each titled "correct" or "wrong") beside a bar chart of their
per-class mean probability with std error bars and median markers. The page is self-contained
(inline CSS, relative ``<img src>`` paths), so the folder can be zipped or served as it is.

This module writes the page; the figures are ``evaluate_figures``'s and the most uncertain
images ``uncertain``'s. If the file has a ``samples`` column (``batchuq score --save-samples``),
the per-image charts are box plots of each class's raw samples, which show whether the model is
"flipping a coin"; otherwise they are bars of the stored mean ± std with the median.

The report draws from an ``Evaluation`` (``batchuq.jobs.evaluate.evaluate_file``): each file is
read once, and the labelled rows, uncertainty scores, reliability bins, risk-coverage curve and
every number on the page are those evaluate computed. This module imports the evaluate job,
never the reverse.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from batchuq import metrics
from batchuq.jobs.evaluate import (
    SCORE_NAMES,
    Evaluation,
    evaluate_file,
    format_rule,
)
from batchuq.postprocess.coverage import coverage_rows
from batchuq.report.evaluate_figures import MIN_BIN_IMAGES, write_figures
from batchuq.report.figures import format_number, report_folder
from batchuq.report.uncertain import TOP_UNCERTAIN, resolve_images_root, write_uncertain

__all__ = ["write_evaluation_report", "write_report"]


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #212529; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #dee2e6; padding: 0.25em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.note { color: #495057; max-width: 80ch; }
.meta { color: #868e96; font-size: 0.9em; }
"""


def _table(rows: list[tuple[str, object]], header: tuple[str, str] | None = None) -> str:
    parts = ["<table>"]
    if header:
        parts.append(f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>")
    for name, value in rows:
        numeric = value is None or isinstance(value, (int, float))
        text = format_number(value) if numeric else str(value)
        css = ' class="num"' if numeric else ""
        parts.append(f"<tr><td>{html.escape(name)}</td><td{css}>{html.escape(text)}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _figure(src: str, alt: str, note: str) -> str:
    return (
        f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">\n'
        f'<p class="note">{html.escape(note)}</p>'
    )


def _run_table(results: dict, metadata: dict) -> str:
    rule_text = format_rule(results.get("decision_rule") or {})
    rows = results["rows"]
    run = [
        ("file", results.get("file")),
        ("model", metadata.get("model_path", "n/a")),
        ("images folder", metadata.get("images", "n/a")),
        *_scored_folder_row(metadata),
        ("passes x TTA copies", f"{metadata.get('passes', 'n/a')} x {metadata.get('tta', 'n/a')}"),
        ("decision rule", rule_text),
        ("rows / ok / errors", f"{rows['total']} / {rows['ok']} / {rows['errors']}"),
        ("unlabelled / label not a class", f"{rows['unlabelled']} / {rows['unknown_label']}"),
    ]
    if results.get("ood_file"):
        run.append(("OOD file", results["ood_file"]))
    return _table([(k, "n/a" if v is None else str(v)) for k, v in run])


def _scored_folder_row(metadata: dict) -> list[tuple[str, object]]:
    """A "scored folder" row when discovery scored a folder inside the one given to score."""
    given, scored = metadata.get("images"), metadata.get("images_root")
    if not scored or (given and Path(str(scored)) == Path(str(given))):
        return []
    return [("scored folder", scored)]


def _summary_sections(results: dict) -> list[str]:
    summary = [
        ("N (labelled, readable)", results["n"]),
        ("accuracy (pred)", results["accuracy"]),
        ("coverage (accepted / N)", results["coverage"]),
        ("selective accuracy (accepted)", results["selective_accuracy"]),
        ("NLL (nats)", results["nll"]),
        ("Brier (summed over classes)", results["brier"]),
        ("ECE (15 bins)", results["ece"]),
        ("AURC", results["aurc"]),
    ]
    ood = results.get("ood") or {}
    auroc_rows = [
        (
            name,
            f"{format_number((results.get('auroc_error') or {}).get(name), 3)}"
            + (f" / {format_number((ood.get('auroc') or {}).get(name), 3)}" if ood else ""),
        )
        for name in SCORE_NAMES
    ]
    return [
        "<h2>Summary</h2>",
        _table(summary, ("metric", "value")),
        '<p class="note">Computed on the readable images whose label is one of the model\'s '
        "classes. Accuracy is that of the predicted class (highest mean probability) on all of "
        "them; coverage is the share the decision rule did not leave unclassified, and "
        "selective accuracy the accuracy of its decisions on those. Lower NLL, Brier, ECE and "
        "AURC are better.</p>",
        _table(
            auroc_rows,
            ("score", "AUROC wrong vs right" + (" / OOD vs in-distribution" if ood else "")),
        ),
        '<p class="note">AUROC: the probability that a randomly chosen wrong prediction (or OOD '
        "image) gets a higher uncertainty score than a randomly chosen right one (or "
        "in-distribution image). 0.5 is chance, 1.0 is perfect separation.</p>",
    ]


def _conformal_section(results: dict) -> list[str]:
    conformal = results.get("conformal")
    if not conformal:
        return []
    return [
        "<h2>Conformal prediction sets</h2>",
        _table(
            [
                ("images", conformal["n"]),
                ("empirical coverage", conformal["coverage"]),
                ("mean set size", conformal["mean_set_size"]),
            ]
        ),
        '<p class="note">Empirical coverage is the share of labelled images whose true '
        "class is in their prediction set; compare it with the coverage the sets were "
        "calibrated for. Smaller sets at the same coverage are more useful.</p>",
        *_stratified_tables(conformal),
    ]


def _stratified_tables(conformal: dict) -> list[str]:
    """Coverage per true class and per set size, with 95% Clopper–Pearson intervals."""
    parts = []
    if conformal.get("per_class"):
        parts += [
            "<h3>Coverage per true class</h3>",
            _table(coverage_rows(conformal["per_class"], "class"), ("class", "coverage")),
        ]
    if conformal.get("per_size"):
        parts += [
            "<h3>Coverage per set size (size-stratified)</h3>",
            _table(coverage_rows(conformal["per_size"], "size"), ("set size", "coverage")),
            '<p class="note">Marginal coverage can hide classes or set sizes that are covered '
            "less: a class or size whose interval lies below the calibrated 1 - alpha is "
            "under-covered (the guarantee is marginal, over all images). Intervals are 95% "
            "Clopper-Pearson.</p>",
        ]
    return parts


def _plot_sections(plots: dict[str, str]) -> list[str]:
    return [
        "<h2>Reliability diagram</h2>",
        _figure(
            plots["reliability"],
            "reliability diagram",
            f"Images are grouped by confidence into {metrics.DEFAULT_ECE_BINS} equal bins. In a "
            "calibrated model each bar (the accuracy in the bin) reaches the dashed diagonal: "
            "bars below it mean over-confidence, bars above it under-confidence. The lower panel "
            f"gives the number of images in each bin; bins with fewer than {MIN_BIN_IMAGES} "
            "images are faded and hatched, as their accuracy says little. ECE is the average "
            "gap weighted by the number of images per bin.",
        ),
        "<h2>Risk-coverage curve</h2>",
        _figure(
            plots["risk_coverage"],
            "risk-coverage curve",
            "Keep only the most confident images and read off the error rate (risk) among "
            "those kept, for every share kept (coverage). A good uncertainty estimate keeps the "
            "curve low at low coverage and close to the oracle curve, which would reject every "
            "wrong prediction first. When the curve only changes at high coverage, a second "
            "panel zooms in there. The red star is this run's decision rule: the share of "
            "images it did not leave unclassified, and the share of those whose decision is "
            "wrong; it need not lie on the curve, as the rule need not rank by confidence. "
            "AURC is the area under the curve.",
        ),
        "<h2>Uncertainty scores</h2>",
        _figure(
            plots["scores"],
            "histograms of the uncertainty scores",
            "Distribution of each score for right and wrong predictions (and OOD images if "
            "given). The less the groups overlap, the better the score flags wrong or unusual "
            "images; the AUROC in each title summarises that. Mean std is the average over "
            "classes of the per-class standard deviation of the sampled probabilities.",
        ),
        "<h2>Confusion matrix</h2>",
        _figure(
            plots["confusion"],
            "confusion matrix",
            "Rows are true classes, columns predicted classes (before the decision rule); "
            "numbers are image counts and the colour is the share of the row. Off-diagonal "
            "cells show which classes are mistaken for which.",
        ),
    ]


def _uncertain_section(uncertain: list[tuple[str, str]]) -> list[str]:
    parts = [
        f"<h2>Most uncertain images (top {TOP_UNCERTAIN} by entropy)</h2>",
        '<p class="note">Each image is shown beside the distribution of its per-class '
        "probabilities over the Monte Carlo samples. The title says whether the predicted "
        "class is correct or wrong; below the chart, (label) marks the true class and (pred) "
        "the predicted one, whose bar is green when correct and red when wrong (the true "
        "class of a wrong prediction is violet). With <code>score --save-samples</code> these are "
        "box plots of the raw samples (orange line: median, black dash: mean); otherwise bars "
        "of the mean with ± one standard deviation and the median as an orange diamond. Boxes "
        "that overlap, or wide error bars, mean the samples disagree: the model is close to "
        "flipping a coin. Missing images are drawn as grey placeholders.</p>",
    ]
    if not uncertain:
        parts.append("<p>No readable images.</p>")
    for src, alt in uncertain:
        parts.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
    return parts


def _page(
    results: dict, metadata: dict, plots: dict[str, str], uncertain: list[tuple[str, str]]
) -> str:
    made_by = [
        f"batchuq {metadata['batchuq_version']}" if metadata.get("batchuq_version") else "",
        f"scored {metadata['created']}" if metadata.get("created") else "",
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>batchuq report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchuq evaluation report</h1>",
        f'<p class="meta">{html.escape(", ".join(part for part in made_by if part))}</p>',
        "<h2>Run</h2>",
        _run_table(results, metadata),
        *_summary_sections(results),
        *_conformal_section(results),
        *_plot_sections(plots),
        *_uncertain_section(uncertain),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_evaluation_report(
    evaluation: Evaluation,
    report_dir: str | os.PathLike[str],
    images_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``index.html`` and its PNG plots for an evaluated file.

    Args:
        evaluation: What ``evaluate_file`` returned; the report reads no file again. Per-image
            box plots need it made with ``samples=True`` (and a file with a ``samples``
            column); otherwise they are bars of the stored statistics.
        report_dir: Folder for the report; created if needed, existing files are replaced.
        images_root: Folder the ``path`` column is relative to, for the thumbnails. Default:
            the folder the run scored, ``images_root`` in the file's metadata (``images`` for
            older files). Missing images get a placeholder.

    Returns:
        The path of ``index.html``.

    Raises:
        OutputError: If ``report_dir`` is an existing file or cannot be created (a
            ``UsageError``).
        OSError: If the report cannot be written.
    """
    folder = report_folder(report_dir)
    results = evaluation.results
    source = evaluation.source
    metadata = {} if source is None else source.metadata
    plots = write_figures(folder, evaluation)
    out_path = None if source is None else Path(source.path)
    root = resolve_images_root(out_path, metadata, images_root)
    panels = write_uncertain(folder, evaluation, root)

    index = folder / "index.html"
    index.write_text(_page(results, metadata, plots, panels), encoding="utf-8")
    return index


def write_report(
    out_path: str | os.PathLike[str],
    report_dir: str | os.PathLike[str],
    ood_path: str | os.PathLike[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Evaluate a scored Parquet file and write ``index.html`` and its PNG plots.

    Each file is read once (with the ``samples`` column, if any) by ``evaluate_file``; see
    ``write_evaluation_report``.

    Args:
        out_path: Parquet file written by ``batchuq score`` (labelled rows give the metrics).
        report_dir: Folder for the report; created if needed, existing files are replaced.
        ood_path: The same model's output on an out-of-distribution folder (optional).
        images_root: Folder the ``path`` column is relative to, for the thumbnails. Default:
            the folder the run scored, ``images_root`` in the file's metadata (``images`` for
            older files). Missing images get a placeholder.

    Returns:
        The path of ``index.html``.

    Raises:
        UsageError: If a file is not a batchuq Parquet file or a column is missing, the OOD
            file has other class names, or ``report_dir`` is an existing file (a
            ``ValueError`` too).
        OSError: If the report cannot be written.
    """
    report_folder(report_dir)  # refuse a bad folder before reading the files
    evaluation = evaluate_file(out_path, ood_path, samples=True)
    return write_evaluation_report(evaluation, report_dir, images_root)
