"""The HTML report of ``batchuq monitor --report``: ``index.html`` and its PNG figures.

``write_monitor_report`` draws from a ``MonitorReport`` (``batchuq.jobs.monitor.monitor_runs``):
tonight's distribution of each tested column against the pooled reference's
(``distributions.png``), the predicted-class mix and the unclassified and error rates
(``class_mix.png``) and, when the reference is a history folder, the last nights as time series
of each column's mean and of each test's Holm-adjusted p-value (``series.png``). The table is
the job's tests; this module computes no statistic.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from batchuq.jobs.monitor import RATES, MonitorReport
from batchuq.report.figures import WRONG_COLOR, format_number, report_folder, save_figure

__all__ = ["write_monitor_report"]

REFERENCE_COLOR = "#495057"
TONIGHT_COLOR = "#1971c2"
_LABELS = {
    "confidence": "confidence (top mean probability)",
    "entropy": "entropy of the mean (nats)",
    "mutual_info": "mutual information (nats)",
    "top_std": "std of the predicted class",
    "set_size": "prediction set size",
}


def _test_of(report: MonitorReport, name: str):
    return next((t for t in report.tests if t.name == name), None)


def _p(value: float) -> str:
    """A p-value to 3 significant digits (``1.2e-09``), ``n/a`` when undefined."""
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def _caption(report: MonitorReport, name: str) -> str:
    test = _test_of(report, name)
    if test is None:
        return name
    flag = "ALERT" if test.alert else "quiet"
    p_holm, psi = _p(test.p_adjusted), format_number(test.psi, 3)
    return f"{name}: p_holm {p_holm}, PSI {psi} ({flag})"


def _draw_distributions(report: MonitorReport) -> Figure:
    """Tonight's histogram of each continuous column over the reference's, as densities."""
    names = [n for n in _LABELS if n in report.tonight.values and n in report.pooled.values]
    cols = 2
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(11, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        ref, now = report.pooled.values[name], report.tonight.values[name]
        edges = np.histogram_bin_edges(np.concatenate([ref, now]), bins=30)
        ax.hist(ref, edges, density=True, histtype="stepfilled", alpha=0.35, color=REFERENCE_COLOR,
                label=f"reference ({ref.size})")  # fmt: skip
        ax.hist(now, edges, density=True, histtype="step", lw=2, color=TONIGHT_COLOR,
                label=f"tonight ({now.size})")  # fmt: skip
        ax.set_xlabel(_LABELS[name])
        ax.set_ylabel("density")
        test = _test_of(report, name)
        # A quiet test keeps Matplotlib's title colour (color=None is refused by set_title).
        alert = {"color": WRONG_COLOR} if test.alert else {}
        ax.set_title(_caption(report, name), fontsize=9, **alert)
        ax.legend(fontsize=8)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _draw_class_mix(report: MonitorReport) -> Figure:
    """Share of each predicted class, and the two rates, tonight beside the reference."""
    fig = Figure(figsize=(11, 3.8))
    mix, rates = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    names = list(report.tonight.metadata.get("class_names") or [])
    ref = report.pooled.class_counts / max(report.pooled.scored, 1)
    now = report.tonight.class_counts / max(report.tonight.scored, 1)
    x = np.arange(len(names))
    mix.bar(x - 0.2, ref, 0.4, color=REFERENCE_COLOR, alpha=0.5, label="reference")
    mix.bar(x + 0.2, now, 0.4, color=TONIGHT_COLOR, label="tonight")
    mix.set_xticks(x, names, rotation=90 if len(names) > 12 else 0, fontsize=8)
    mix.set_ylabel("share of scored images")
    mix.set_title(_caption(report, "class_mix"), fontsize=9)
    mix.legend(fontsize=8)
    r = [report.pooled.means()[n] or 0.0 for n in RATES]
    t = [report.tonight.means()[n] or 0.0 for n in RATES]
    x = np.arange(len(RATES))
    rates.bar(x - 0.2, r, 0.4, color=REFERENCE_COLOR, alpha=0.5)
    rates.bar(x + 0.2, t, 0.4, color=TONIGHT_COLOR)
    rates.set_xticks(x, ["unclassified", "error"])
    rates.set_ylabel("rate")
    states = []
    for name in RATES:
        test = _test_of(report, name)
        states.append(f"{name.split('_')[0]}: {'ALERT' if test and test.alert else 'quiet'}")
    rates.set_title(", ".join(states), fontsize=9)
    fig.tight_layout()
    return fig


def _draw_series(report: MonitorReport) -> Figure:
    """Each column's mean per night, and each test's Holm-adjusted p-value per night."""
    series = report.series or []
    dates = [e["date"] or Path(e["path"]).name for e in series]
    names = [n for n in series[-1]["means"] if n in _LABELS or n in RATES]
    panels = len(names) + 1
    cols = 2
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(11, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = np.arange(len(series))
    for ax, name in zip(axes, names, strict=False):
        y = [np.nan if e["means"].get(name) is None else e["means"][name] for e in series]
        ax.plot(x, y, marker="o", color=REFERENCE_COLOR)
        ax.plot(x[-1:], y[-1:], marker="o", ms=9, color=TONIGHT_COLOR, ls="none", label="tonight")
        ax.set_title(name.replace("_", " ") if name in RATES else f"mean {name}", fontsize=9)
        ax.set_xticks(x, dates, rotation=45, fontsize=7, ha="right")
    ax = axes[len(names)]
    for test in report.tests:
        y = [np.nan if not e["p_adjusted"] or e["p_adjusted"].get(test.name) is None
             else max(e["p_adjusted"][test.name], 1e-16) for e in series]  # fmt: skip
        ax.plot(x, y, marker=".", label=test.name)
    ax.axhline(
        report.settings.alpha, color=WRONG_COLOR, ls="--", label=f"alpha {report.settings.alpha:g}"
    )
    ax.set_yscale("log")
    ax.set_title("Holm-adjusted p (each night vs the other nights; tonight vs all)", fontsize=9)
    ax.set_xticks(x, dates, rotation=45, fontsize=7, ha="right")
    ax.legend(fontsize=6, ncol=2)
    for extra in axes[panels:]:
        extra.set_visible(False)
    fig.tight_layout()
    return fig


def _table(report: MonitorReport) -> str:
    head = ("test", "kind", "statistic", "p", "p (Holm)", "PSI", "Wasserstein", "reference",
            "tonight", "alert")  # fmt: skip
    rows = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for t in report.tests:
        numbers = [
            format_number(None if v is None or not math.isfinite(v) else float(v))
            for v in (t.psi, t.wasserstein, t.reference, t.tonight)
        ]
        statistic = format_number(t.statistic if math.isfinite(t.statistic) else None)
        cells = [t.name, t.test, statistic, _p(t.p_value), _p(t.p_adjusted), *numbers]
        cells.append("<b>ALERT</b>" if t.alert else "no")
        style = ' class="alert"' if t.alert else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows) + "</table>"


def _page(report: MonitorReport, plots: dict[str, str]) -> str:
    s = report.settings
    verdict = f"ALERT: {', '.join(report.alerts)}" if report.alert else "quiet: no test alerts"
    rule = f"an alert also needs PSI &ge; {s.min_psi:g}" if s.min_psi > 0 else "no PSI threshold"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>batchuq monitor</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchuq monitor</h1>",
        f'<p class="verdict {"alert" if report.alert else "quiet"}">{html.escape(verdict)}</p>',
        f"<p>Tonight: {html.escape(report.tonight.path)} ({report.tonight.rows} rows, "
        f"{report.tonight.scored} scored). Reference: {len(report.reference)} run(s), "
        f"{report.pooled.rows} rows. Holm-corrected at alpha {s.alpha:g}; {rule}.</p>",
        _table(report),
    ]
    for name, est in (report.estimated_accuracy or {}).items():
        parts.append(
            f"<p>Estimated accuracy ({html.escape(name)}): {est['tonight']:.4f} tonight, "
            f"{est['reference']:.4f} reference, change {est['change']:+.4f}.</p>"
        )
    for key, src in plots.items():
        parts += [
            f"<h2>{html.escape(_TITLES[key])}</h2>",
            f'<img src="{html.escape(src)}" alt="{key}">',
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_TITLES = {
    "distributions": "Tonight against the reference",
    "class_mix": "Predicted classes and rates",
    "series": "The last nights",
}
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h2 { margin-top: 2em; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #dee2e6; padding: 0.25em 0.6em; text-align: left; }
tr.alert td { background: #fff5f5; }
p.verdict { font-size: 1.2em; font-weight: bold; }
p.verdict.alert { color: #c92a2a; } p.verdict.quiet { color: #2b8a3e; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
"""


def write_monitor_report(report: MonitorReport, report_dir: str | os.PathLike[str]) -> Path:
    """Write ``index.html`` and its PNG figures for a monitor report.

    Args:
        report: What ``monitor_runs`` returned.
        report_dir: Folder for the report; created if needed, existing files are replaced.

    Returns:
        The path of ``index.html``.

    Raises:
        OutputError: If ``report_dir`` is an existing file or cannot be created (a
            ``UsageError``).
        OSError: If the report cannot be written.
    """
    folder = report_folder(report_dir)
    plots = {
        "distributions": save_figure(_draw_distributions(report), folder, "distributions.png"),
        "class_mix": save_figure(_draw_class_mix(report), folder, "class_mix.png"),
    }
    if report.series:
        plots["series"] = save_figure(_draw_series(report), folder, "series.png")
    index = folder / "index.html"
    index.write_text(_page(report, plots), encoding="utf-8")
    return index
