"""The HTML report of ``batchuq compare --report``: ``index.html`` and its PNG figures.

``write_comparison_report`` draws from a ``Comparison`` (``batchuq.jobs.compare.compare_files``)
and the ``Evaluation`` of each file it holds (its reliability bins and risk-coverage curve):
reliability diagrams and risk-coverage curves overlaid, cost against quality, and for a shift
series accuracy and ECE against severity. The tables are the job's (``table_cells``), as in the
terminal; this module computes no metric.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchuq import metrics
from batchuq.jobs.compare import (
    INTERVAL_COLUMNS,
    SERIES_COLUMNS,
    TABLE_COLUMNS,
    Comparison,
    format_cell,
    format_interval,
    interval_caption,
    interval_rows,
    present_columns,
    table_cells,
    with_shift_labels,
)
from batchuq.jobs.compare_rules import RULE_COLUMNS, RULES_CAPTION, shown_rules
from batchuq.jobs.evaluate import Evaluation
from batchuq.report.figures import report_folder, save_figure

__all__ = ["write_comparison_report"]


def _new_figure(width: float, height: float) -> Figure:
    """A Matplotlib figure on the Agg canvas."""
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
        label = f"{row['name']} (ECE {format_cell(row['ece'], 4)})"
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
            label = f"{row['name']} (AURC {format_cell(row['aurc'], 4)})"
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


def _error_bar(row: dict, metric: str) -> list[list[float]] | None:
    """The distances from a metric's value down and up to its interval's bounds, if it has one."""
    entry = (row.get("intervals") or {}).get(metric) or {}
    if entry.get("low") is None or entry.get("high") is None:
        return None
    return [[max(row[metric] - entry["low"], 0.0)], [max(entry["high"] - row[metric], 0.0)]]


def _draw_cost_quality(rows: list[dict]) -> Figure:
    """NLL and ECE against the cost of each file, as labelled points with their intervals."""
    fig = _new_figure(11, 4.4)
    key, label = _cost_axis(rows)
    for ax, metric, title in zip(fig.subplots(1, 2), ("nll", "ece"), ("NLL", "ECE"), strict=True):
        points = [(r[key], r[metric], r) for r in rows if None not in (r[key], r[metric])]
        for x, y, row in points:
            ax.errorbar([x], [y], yerr=_error_bar(row, metric), fmt="o", ms=6, capsize=3, zorder=3)
            ax.annotate(row["name"], (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
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
    """The rows as an HTML table; a metric with an interval shows it under its value."""
    headers, cells, numeric = table_cells(rows, columns)
    keys = [key for _, key, _ in present_columns(rows, columns)]
    parts = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for row, texts in zip(rows, cells, strict=True):
        intervals = row.get("intervals") or {}
        tds = []
        for key, text, right in zip(keys, texts, numeric, strict=True):
            cell = html.escape(text)
            if (intervals.get(key) or {}).get("low") is not None:
                cell += (
                    f'<br><span class="ci">{html.escape(format_interval(intervals[key]))}</span>'
                )
            tds.append(('<td class="num">' if right else "<td>") + cell + "</td>")
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
    "members of an ensemble). The error bars are the 95% intervals of the bootstrap.",
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
        _html_table(with_shift_labels(comparison.rows), TABLE_COLUMNS),
        f'<p class="note">On the labelled ok rows of each file; AUROC of '
        f"{html.escape(comparison.settings['score'])}. Coverage and selective accuracy are "
        "those of each file's own decision rule.</p>",
    ]
    ruled = shown_rules(comparison.rows)
    if ruled is not None:
        parts += [
            "<h2>Decision rules</h2>",
            f'<p class="note">{html.escape(RULES_CAPTION)}</p>',
            _html_table(ruled, RULE_COLUMNS),
        ]
    if comparison.settings.get("bootstrap") is not None:
        rows = interval_rows(with_shift_labels(comparison.rows))
        parts += [
            "<h2>Intervals</h2>",
            f'<p class="note">{html.escape(interval_caption(comparison.settings))}</p>',
            _html_table(rows, INTERVAL_COLUMNS),
        ]
    if comparison.series is not None:
        parts += ["<h2>Shift series</h2>", _html_table(comparison.series, SERIES_COLUMNS)]
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
span.ci { color: #495057; font-size: 0.85em; white-space: nowrap; }
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
