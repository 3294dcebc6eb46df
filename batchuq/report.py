"""An HTML report with plots for a Parquet file written by ``batchuq score``.

``write_report`` writes ``index.html`` and PNG plots into a folder: a reliability diagram, the
risk-coverage curve, histograms of each uncertainty score for right / wrong / OOD images, a
confusion matrix, and the most uncertain images (top 12 by entropy) beside a bar chart of their
per-class mean probability with std error bars and median markers. The page is self-contained
(inline CSS, relative ``<img src>`` paths), so the folder can be zipped or served as it is.

Plots are drawn with Matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), which needs no display and leaves the global backend alone.

If the file has a ``samples`` column (``batchuq score --save-samples``), the per-image charts are
box plots of each class's raw samples, which show whether the model is "flipping a coin";
otherwise they are bars of the stored mean ± std with the median.
"""

from __future__ import annotations

import html
import logging
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchuq import metrics
from batchuq.evaluate import (
    SCORE_NAMES,
    evaluate_parquet,
    read_scored,
    uncertainty_scores,
)

logger = logging.getLogger("batchuq")

TOP_UNCERTAIN = 12
MAX_BAR_CLASSES = 20
MAX_ANNOTATED_CLASSES = 20
THUMBNAIL_SIZE = 256
MAX_THUMBNAIL_PIXELS = 89_478_485
DPI = 100

RIGHT_COLOR = "#2b8a3e"
WRONG_COLOR = "#c92a2a"
OOD_COLOR = "#1c7ed6"
IN_COLOR = "#495057"

__all__ = ["write_report"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _save(fig: Figure, folder: Path, name: str) -> str:
    fig.savefig(folder / name, dpi=DPI, format="png", bbox_inches="tight")
    return name


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _fmt(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _read_samples(out_path: Path, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Raw samples of the given rows, each ``(samples, classes)``; empty without the column."""
    if "samples" not in pq.read_schema(out_path).names or not len(rows):
        return {}
    column = pq.read_table(out_path, columns=["samples"]).column("samples").take(rows)
    return {
        int(row): np.asarray(value, dtype=np.float64)
        for row, value in zip(rows, column.to_pylist(), strict=True)
        if value is not None
    }


def _resolve_images_root(
    out_path: Path, metadata: dict, images_root: str | os.PathLike[str] | None
) -> Path | None:
    if images_root is not None:
        return Path(images_root)
    scored = metadata.get("images")
    if not scored:
        return None
    for candidate in (Path(scored), out_path.parent / scored):
        if candidate.is_dir():
            return candidate
    return Path(scored)


def _thumbnail(path: Path | None) -> tuple[np.ndarray | None, str]:
    """The image at ``path`` shrunk to a thumbnail, or ``None`` and the reason."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return None, "no images folder known"
    if not path.is_file():
        return None, "image not found"
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_THUMBNAIL_PIXELS:
                return None, "image too large"
            image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            return np.asarray(image), ""
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"cannot read image ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plot_reliability(folder: Path, confidence: np.ndarray, correct: np.ndarray) -> str:
    fig = Figure(figsize=(6.4, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if len(confidence) == 0:
        _empty(top, "no labelled images")
        _empty(bottom, "")
        return _save(fig, folder, "reliability.png")
    bins = metrics.reliability_bins(confidence, correct, metrics.DEFAULT_ECE_BINS)
    ece = metrics.ece(confidence, correct)
    width = bins.edges[1] - bins.edges[0]
    left = bins.edges[:-1]
    filled = bins.counts > 0
    top.bar(
        left[filled],
        bins.accuracy[filled],
        width=width,
        align="edge",
        color="#74c0fc",
        edgecolor="#1864ab",
        label="accuracy in bin",
    )
    top.scatter(
        bins.confidence[filled],
        bins.accuracy[filled],
        color="#1864ab",
        s=14,
        zorder=3,
        label="(mean confidence, accuracy)",
    )
    top.plot([0, 1], [0, 1], "--", color="#868e96", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram: ECE = {ece:.4f} (15 bins, N = {len(confidence)})")
    top.legend(loc="upper left", fontsize=9)
    top.grid(alpha=0.3)
    bottom.bar(left, bins.counts, width=width, align="edge", color="#adb5bd", edgecolor="#495057")
    bottom.set_xlabel("confidence (max mean probability)")
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
    return _save(fig, folder, "reliability.png")


def _plot_risk_coverage(
    folder: Path, confidence: np.ndarray, correct: np.ndarray, results: dict
) -> str:
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    if len(confidence) == 0:
        _empty(ax, "no labelled images")
        return _save(fig, folder, "risk_coverage.png")
    cov, risk = metrics.risk_coverage_curve(confidence, correct)
    k = np.arange(1, len(correct) + 1)
    oracle = np.maximum(k - int(correct.sum()), 0) / k
    ax.plot(cov, risk, color="#1864ab", lw=2, label=f"by confidence (AURC = {results['aurc']:.4f})")
    ax.plot(
        cov,
        oracle,
        "--",
        color=RIGHT_COLOR,
        label=f"oracle: errors last (AURC = {float(np.trapezoid(oracle, cov)):.4f})",
    )
    ax.axhline(1 - correct.mean(), color="#868e96", ls=":", label="no rejection (error rate)")
    if results.get("coverage") is not None and results.get("selective_accuracy") is not None:
        ax.scatter(
            [results["coverage"]],
            [1 - results["selective_accuracy"]],
            marker="*",
            s=180,
            color=WRONG_COLOR,
            zorder=4,
            label="decision rule (coverage, 1 - selective accuracy)",
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of images kept, most confident first)")
    ax.set_ylabel("risk (error rate among kept images)")
    ax.set_title("Risk-coverage curve")
    ax.legend(fontsize=9, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, folder, "risk_coverage.png")


def _plot_score_histograms(
    folder: Path,
    groups: list[tuple[str, str, dict[str, np.ndarray]]],
    results: dict,
) -> str:
    fig = Figure(figsize=(13, 7.2))
    axes = fig.subplots(2, 3).ravel()
    for ax, name in zip(axes, SCORE_NAMES, strict=False):
        present = [(label, color, values[name]) for label, color, values in groups]
        present = [(lab, col, v[np.isfinite(v)]) for lab, col, v in present if np.isfinite(v).any()]
        if not present:
            _empty(ax, "no rows")
            ax.set_title(name)
            continue
        everything = np.concatenate([v for _, _, v in present])
        low, high = float(everything.min()), float(everything.max())
        if high <= low:
            high = low + 1e-6
        edges = np.linspace(low, high, 31)
        for label, color, values in present:
            ax.hist(
                values,
                bins=edges,
                density=True,
                histtype="stepfilled",
                alpha=0.25,
                color=color,
            )
            ax.hist(
                values,
                bins=edges,
                density=True,
                histtype="step",
                lw=1.6,
                color=color,
                label=f"{label} ({len(values)})",
            )
        notes = []
        error_auc = (results.get("auroc_error") or {}).get(name)
        if error_auc is not None:
            notes.append(f"wrong vs right {error_auc:.3f}")
        ood = results.get("ood") or {}
        ood_auc = (ood.get("auroc") or {}).get(name)
        if ood_auc is not None:
            notes.append(f"OOD vs in {ood_auc:.3f}")
        ax.set_title(name + ("\nAUROC " + ", ".join(notes) if notes else ""), fontsize=10)
        ax.set_xlabel(f"{name} (higher = more uncertain)", fontsize=9)
        ax.set_ylabel("density", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    if handles:
        axes[-1].legend(handles, labels, loc="center", fontsize=11, title="images")
    fig.suptitle("Uncertainty scores by group (densities)")
    fig.tight_layout()
    return _save(fig, folder, "score_histograms.png")


def _plot_confusion(folder: Path, labels: np.ndarray, preds: np.ndarray, names: list[str]) -> str:
    n = len(names)
    size = min(max(4.5, 0.5 * n + 2.5), 20)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    if len(labels) == 0:
        _empty(ax, "no labelled images")
        return _save(fig, folder, "confusion.png")
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels, preds), 1)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted class (pred)")
    ax.set_ylabel("true class (label)")
    ax.set_title(f"Confusion matrix (N = {len(labels)}; counts, colour = row share)")
    return _save(fig, folder, "confusion.png")


def _plot_uncertain_image(
    folder: Path,
    rank: int,
    row: pd.Series,
    names: list[str],
    images_root: Path | None,
    samples: np.ndarray | None,
) -> str:
    fig = Figure(figsize=(11, 3.6))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.6]})
    rel = str(row["path"])
    thumb, reason = _thumbnail(None if images_root is None else images_root / rel)
    if thumb is None:
        left.set_facecolor("#e9ecef")
        left.text(
            0.5,
            0.5,
            reason + "\n" + "\n".join(textwrap.wrap(rel, 28)),
            ha="center",
            va="center",
            fontsize=9,
            color="#495057",
            transform=left.transAxes,
        )
        left.set_xticks([])
        left.set_yticks([])
    else:
        small = max(thumb.shape[:2]) < 128
        left.imshow(thumb, interpolation="nearest" if small else "antialiased")
        left.axis("off")
    left.set_title("\n".join(textwrap.wrap(rel, 36)), fontsize=9)

    mean = np.array([row[f"mean_{c}"] for c in names], dtype=np.float64)
    median = np.array([row[f"median_{c}"] for c in names], dtype=np.float64)
    std = np.array([row[f"std_{c}"] for c in names], dtype=np.float64)
    order = np.arange(len(names))
    note = ""
    if len(names) > MAX_BAR_CLASSES:
        order = np.sort(np.argsort(-mean, kind="stable")[:MAX_BAR_CLASSES])
        note = f" (top {MAX_BAR_CLASSES} of {len(names)} classes by mean)"
    x = np.arange(len(order))
    label = row.get("label")
    label = None if label is None or pd.isna(label) else str(label)
    colors = [WRONG_COLOR if names[c] == row["pred"] else "#74c0fc" for c in order]
    if samples is None:
        right.bar(
            x,
            mean[order],
            yerr=std[order],
            color=colors,
            edgecolor="#1864ab",
            capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "#343a40"},
            label="mean ± std",
        )
        right.scatter(x, median[order], marker="D", color="#f08c00", zorder=4, s=28, label="median")
    else:
        boxes = right.boxplot(
            samples[:, order],
            positions=x,
            widths=0.6,
            patch_artist=True,
            medianprops={"color": "#f08c00", "linewidth": 2},
            flierprops={"markersize": 2, "alpha": 0.4},
        )
        boxes["medians"][0].set_label("median")
        for box, color in zip(boxes["boxes"], colors, strict=True):
            box.set_facecolor(color)
            box.set_edgecolor("#1864ab")
        right.scatter(x, mean[order], marker="_", color="#212529", zorder=4, s=120, label="mean")
        note += f"; box plots of the {len(samples)} samples"
    right.set_xticks(x)
    tick_labels = [names[c] + (" ✓" if label == names[c] else "") for c in order]
    right.set_xticklabels(
        tick_labels,
        rotation=45 if len(order) > 8 else 0,
        ha="right" if len(order) > 8 else "center",
    )
    right.set_ylim(0, 1.05)
    right.set_ylabel("probability")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8, loc="upper right")
    right.set_title(
        f"#{rank}  label {label or 'n/a'} (✓), pred {row['pred']} (red), decision "
        f"{row['decision']}\nentropy {row['entropy']:.3f}, mutual info {row['mutual_info']:.3f}, "
        f"variation ratio {row['variation_ratio']:.3f}, confidence {row['confidence']:.3f}{note}",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, folder, f"uncertain_{rank:02d}.png")


# --------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------

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
        text = _fmt(value) if numeric else str(value)
        css = ' class="num"' if numeric else ""
        parts.append(f"<tr><td>{html.escape(name)}</td><td{css}>{html.escape(text)}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _figure(src: str, alt: str, note: str) -> str:
    return (
        f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">\n'
        f'<p class="note">{html.escape(note)}</p>'
    )


def _page(results: dict, metadata: dict, plots: dict[str, str], uncertain: list[str]) -> str:
    rule = results.get("decision_rule") or {}
    params = ", ".join(f"{k}={v}" for k, v in rule.items() if k != "rule")
    rule_text = f"{rule.get('rule', 'n/a')}" + (f" ({params})" if params else "")
    made_by = [
        f"batchuq {metadata['batchuq_version']}" if metadata.get("batchuq_version") else "",
        f"scored {metadata['created']}" if metadata.get("created") else "",
    ]
    rows = results["rows"]
    run = [
        ("file", results.get("file")),
        ("model", metadata.get("model_path", "n/a")),
        ("images folder", metadata.get("images", "n/a")),
        ("passes x TTA copies", f"{metadata.get('passes', 'n/a')} x {metadata.get('tta', 'n/a')}"),
        ("decision rule", rule_text),
        ("rows / ok / errors", f"{rows['total']} / {rows['ok']} / {rows['errors']}"),
        ("unlabelled / label not a class", f"{rows['unlabelled']} / {rows['unknown_label']}"),
    ]
    if results.get("ood_file"):
        run.append(("OOD file", results["ood_file"]))
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
            f"{_fmt((results.get('auroc_error') or {}).get(name), 3)}"
            + (f" / {_fmt((ood.get('auroc') or {}).get(name), 3)}" if ood else ""),
        )
        for name in SCORE_NAMES
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>batchuq report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchuq evaluation report</h1>",
        f'<p class="meta">{html.escape(", ".join(part for part in made_by if part))}</p>',
        "<h2>Run</h2>",
        _table([(k, "n/a" if v is None else str(v)) for k, v in run]),
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
    conformal = results.get("conformal")
    if conformal:
        parts += [
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
        ]
    parts += [
        "<h2>Reliability diagram</h2>",
        _figure(
            plots["reliability"],
            "reliability diagram",
            "Images are grouped by confidence into 15 equal bins. In a calibrated model each "
            "bar (the accuracy in the bin) reaches the dashed diagonal: bars below it mean "
            "over-confidence, bars above it under-confidence. ECE is the average gap weighted "
            "by the number of images per bin (lower panel).",
        ),
        "<h2>Risk-coverage curve</h2>",
        _figure(
            plots["risk_coverage"],
            "risk-coverage curve",
            "Keep only the most confident images and read off the error rate (risk) among "
            "those kept, for every share kept (coverage). A good uncertainty estimate keeps the "
            "curve low at low coverage and close to the oracle curve, which would reject every "
            "wrong prediction first. The star is the decision rule used for this run. AURC is "
            "the area under the curve.",
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
        f"<h2>Most uncertain images (top {TOP_UNCERTAIN} by entropy)</h2>",
        '<p class="note">Each image is shown beside the distribution of its per-class '
        "probabilities over the Monte Carlo samples (the predicted class in red; the true class "
        "is ticked). With <code>score --save-samples</code> these are box plots of the raw "
        "samples (orange line: median, black dash: mean); otherwise bars of the mean with ± one "
        "standard deviation and the median as an orange diamond. Boxes that overlap, or wide "
        "error bars, mean the samples disagree: the model is close to flipping a coin. Missing "
        "images are drawn as grey placeholders.</p>",
    ]
    if not uncertain:
        parts.append("<p>No readable images.</p>")
    for i, src in enumerate(uncertain, start=1):
        parts.append(f'<img src="{html.escape(src)}" alt="uncertain image {i}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    out_path: str | os.PathLike[str],
    report_dir: str | os.PathLike[str],
    ood_path: str | os.PathLike[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``index.html`` and its PNG plots for a scored Parquet file.

    Args:
        out_path: Parquet file written by ``batchuq score`` (labelled rows give the metrics).
        report_dir: Folder for the report; created if needed, existing files are replaced.
        ood_path: The same model's output on an out-of-distribution folder (optional).
        images_root: Folder the ``path`` column is relative to, for the thumbnails. Default:
            the ``images`` folder stored in the file's metadata. Missing images get a
            placeholder.

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: If a file has no batchuq metadata or a column is missing, the OOD file
            has other class names, or ``report_dir`` is an existing file.
        OSError: If a file cannot be read or the report cannot be written.
    """
    out_path = Path(out_path)
    folder = Path(report_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"The report path is a file, not a folder. Received: report_dir={str(folder)!r}"
        )
    folder.mkdir(parents=True, exist_ok=True)

    scored = read_scored(out_path, ood_path)  # each file read once, for metrics and plots
    results = evaluate_parquet(out_path, ood_path, scored)
    df, metadata, ood_df = scored
    names = list(metadata["class_names"])
    ok = (df["status"] == "ok").to_numpy(bool)
    label_index = pd.to_numeric(df["label_index"]).to_numpy(dtype=np.float64, na_value=np.nan)
    labelled = ok & np.isfinite(label_index)
    y = label_index[labelled].astype(np.int64)
    pred = pd.to_numeric(df.loc[labelled, "pred_index"]).to_numpy(dtype=np.int64)
    confidence = pd.to_numeric(df.loc[labelled, "confidence"]).to_numpy(dtype=np.float64)
    correct = pred == y

    scores = uncertainty_scores(df, names)
    groups: list[tuple[str, str, dict[str, np.ndarray]]] = []
    if labelled.any():
        groups.append(("right", RIGHT_COLOR, {k: v[labelled][correct] for k, v in scores.items()}))
        groups.append(("wrong", WRONG_COLOR, {k: v[labelled][~correct] for k, v in scores.items()}))
    else:
        groups.append(("in-distribution", IN_COLOR, {k: v[ok] for k, v in scores.items()}))
    if ood_df is not None:
        ood_ok = (ood_df["status"] == "ok").to_numpy(bool)
        ood_scores = uncertainty_scores(ood_df, names)
        groups.append(("OOD", OOD_COLOR, {k: v[ood_ok] for k, v in ood_scores.items()}))

    plots = {
        "reliability": _plot_reliability(folder, confidence, correct),
        "risk_coverage": _plot_risk_coverage(folder, confidence, correct, results),
        "scores": _plot_score_histograms(folder, groups, results),
        "confusion": _plot_confusion(folder, y, pred, names),
    }

    root = _resolve_images_root(out_path, metadata, images_root)
    entropy = pd.to_numeric(df["entropy"]).to_numpy(dtype=np.float64, na_value=np.nan)
    candidates = np.flatnonzero(ok & np.isfinite(entropy))
    top = candidates[np.argsort(-entropy[candidates], kind="stable")[:TOP_UNCERTAIN]]
    samples = _read_samples(out_path, top)
    for stale in folder.glob("uncertain_*.png"):
        stale.unlink()
    uncertain = [
        _plot_uncertain_image(folder, rank, df.iloc[int(i)], names, root, samples.get(int(i)))
        for rank, i in enumerate(top, start=1)
    ]

    index = folder / "index.html"
    index.write_text(_page(results, metadata, plots, uncertain), encoding="utf-8")
    return index
