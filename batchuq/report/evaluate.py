"""An HTML report with plots for a Parquet file written by ``batchuq score``.

``write_report`` writes ``index.html`` and PNG plots into a folder: a reliability diagram (with
the image count of each bin; bins of fewer than 5 images faded), the risk-coverage curve (with a
zoomed panel where it changes, and the run's decision rule marked), histograms of each
uncertainty score for right / wrong / OOD images, a confusion matrix, and the most uncertain
images (top 12 by entropy, each titled "correct" or "wrong") beside a bar chart of their
per-class mean probability with std error bars and median markers. The page is self-contained
(inline CSS, relative ``<img src>`` paths), so the folder can be zipped or served as it is.

Plots are drawn with Matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), which needs no display and leaves the global backend alone.

If the file has a ``samples`` column (``batchuq score --save-samples``), the per-image charts are
box plots of each class's raw samples, which show whether the model is "flipping a coin";
otherwise they are bars of the stored mean ± std with the median.

The report draws from an ``Evaluation`` (``batchuq.jobs.evaluate.evaluate_file``): each file is
read once, and the labelled rows, uncertainty scores, reliability bins, risk-coverage curve and
every number on the page are those evaluate computed. This module imports the evaluate job,
never the reverse.
"""

from __future__ import annotations

import html
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchuq import metrics
from batchuq.defaults import DEFAULT_MAX_PIXELS
from batchuq.jobs.evaluate import (
    SCORE_NAMES,
    Evaluation,
    RiskCoverage,
    evaluate_file,
    format_rule,
)
from batchuq.report.figures import report_folder, save_figure

TOP_UNCERTAIN = 12
MAX_BAR_CLASSES = 20
MAX_ANNOTATED_CLASSES = 20
THUMBNAIL_SIZE = 256
MAX_THUMBNAIL_PIXELS = DEFAULT_MAX_PIXELS  # what `score --max-pixels` refuses by default
MIN_BIN_IMAGES = 5  # reliability bins with fewer images are drawn faded
FADED_ALPHA = 0.3
ZOOM_MIN_START = 0.5  # the risk-coverage curve gets a zoomed panel if it is 0 up to here

RIGHT_COLOR = "#2b8a3e"
WRONG_COLOR = "#c92a2a"
OOD_COLOR = "#1c7ed6"
IN_COLOR = "#495057"
PRED_COLOR = "#1864ab"  # the predicted class of an unlabelled image
TRUE_COLOR = "#9775fa"  # the true class of a wrong prediction
OTHER_COLOR = "#74c0fc"

__all__ = ["write_evaluation_report", "write_report"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


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


def _read_samples(column: pa.ChunkedArray | None, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Raw samples of the given rows, each ``(samples, classes)``; empty without the column.

    Args:
        column: The ``samples`` column read with the rest of the file, or ``None``.
        rows: Row indices, int shape ``(k,)``.

    Returns:
        Row index -> float64 array ``(samples, classes)``, for the rows that have samples.
    """
    if column is None or not len(rows):
        return {}
    column = column.take(rows)
    return {
        int(row): np.asarray(value, dtype=np.float64)
        for row, value in zip(rows, column.to_pylist(), strict=True)
        if value is not None
    }


def _resolve_images_root(
    out_path: Path | None, metadata: dict, images_root: str | os.PathLike[str] | None
) -> Path | None:
    """The folder the ``path`` column is relative to: given, or the one in the metadata.

    That is the folder discovery actually scored, ``images_root`` (a Kaggle wrapper
    ``monkeys/training`` holding only ``training/`` is scored as ``monkeys/training/training``),
    else, for files written before it was recorded, the ``images`` folder given to score. A
    relative folder is tried from the working directory, then from the scored file's folder.
    """
    if images_root is not None:
        return Path(images_root)
    scored = metadata.get("images_root") or metadata.get("images")
    if not scored:
        return None
    candidates = [Path(scored)] + ([] if out_path is None else [out_path.parent / scored])
    for candidate in candidates:
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


def _draw_reliability(bins: metrics.ReliabilityBins | None, ece: float | None) -> Figure:
    """Accuracy per confidence bin (top) above the image count of each bin (bottom).

    Bins holding fewer than ``MIN_BIN_IMAGES`` images are drawn faded and hatched: their
    accuracy rests on too few images to be read as a calibration gap.
    """
    fig = Figure(figsize=(6.4, 6.4))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    if bins is None:
        _empty(top, "no labelled images")
        _empty(bottom, "")
        return fig
    few = bins.counts < MIN_BIN_IMAGES
    _draw_accuracy_bars(top, bins, few)
    top.plot([0, 1], [0, 1], "--", color="#868e96", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.25)  # room above 1 for the legend
    top.set_yticks(np.linspace(0, 1, 6))
    top.set_ylabel("accuracy in bin")
    n = int(bins.counts.sum())
    top.set_title(f"Reliability diagram: ECE = {_fmt(ece)} ({len(few)} bins, N = {n})")
    top.legend(loc="upper left", fontsize=8, framealpha=0.9, ncol=2)
    top.grid(alpha=0.3)
    _draw_bin_counts(bottom, bins, few)
    return fig


def _draw_accuracy_bars(ax: Axes, bins: metrics.ReliabilityBins, few: np.ndarray) -> None:
    """Accuracy (bars) and mean confidence (dots) of each non-empty bin; ``few`` ones faded."""
    width = bins.edges[1] - bins.edges[0]
    left = bins.edges[:-1]
    for faded, label in (
        (False, f"accuracy in bin (≥ {MIN_BIN_IMAGES} images)"),
        (True, f"under {MIN_BIN_IMAGES} images: too few to judge"),
    ):
        keep = (bins.counts > 0) & (few == faded)
        if not keep.any():
            continue
        style = {"alpha": FADED_ALPHA, "hatch": "//"} if faded else {}
        ax.bar(
            left[keep],
            bins.accuracy[keep],
            width=width,
            align="edge",
            color="#74c0fc",
            edgecolor="#1864ab",
            label=label,
            **style,
        )
        ax.scatter(
            bins.confidence[keep],
            bins.accuracy[keep],
            color="#1864ab",
            s=14,
            zorder=3,
            alpha=FADED_ALPHA if faded else 1.0,
        )


def _draw_bin_counts(ax: Axes, bins: metrics.ReliabilityBins, few: np.ndarray) -> None:
    """The number of images in each bin, as bars with the count written above them."""
    width = bins.edges[1] - bins.edges[0]
    left = bins.edges[:-1]
    alpha = np.where(few, FADED_ALPHA, 1.0)
    bars = ax.bar(
        left, bins.counts, width=width, align="edge", color="#adb5bd", edgecolor="#495057"
    )
    for bar, count, a in zip(bars, bins.counts, alpha, strict=True):
        bar.set_alpha(a)
        if count:
            ax.annotate(
                str(count),
                (bar.get_x() + width / 2, count),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_ylim(0, max(1, int(bins.counts.max())) * 1.3)
    ax.set_xlabel("confidence (max mean probability)")
    ax.set_ylabel("images")
    ax.grid(alpha=0.3)


def _operating_point(results: dict) -> tuple[float, float] | None:
    """``(coverage, selective risk)`` of the run's decision rule, as ``evaluate`` computed them.

    Accepted images are those whose ``decision`` is not ``unclassified``; the selective risk is
    the share of them whose decision is not the true class (1 - selective accuracy).
    """
    coverage, accuracy = results.get("coverage"), results.get("selective_accuracy")
    if coverage is None or accuracy is None:
        return None
    return float(coverage), 1.0 - float(accuracy)


def _zoom_start(coverage: np.ndarray, risk: np.ndarray, point: float | None) -> float | None:
    """Left edge of a zoomed view of the risk-coverage curve, or ``None`` if it adds nothing.

    The view starts just before the first error among the most confident images (the curve is
    0 to the left of it) and includes the decision rule's coverage ``point``; it is worth
    drawing only when it starts at coverage ``ZOOM_MIN_START`` or higher.
    """
    errors = np.flatnonzero(risk > 0)
    if not len(errors):
        return None
    start = float(coverage[errors[0]]) - 1.0 / len(coverage)
    if point is not None:
        start = min(start, point)
    start -= 0.1 * (1.0 - start)
    return start if start >= ZOOM_MIN_START else None


def _draw_risk_coverage(curve: RiskCoverage | None, correct: np.ndarray, results: dict) -> Figure:
    """The risk-coverage curve, with a zoomed panel where it changes when that is narrow.

    Args:
        curve: The curve evaluate computed (``Evaluation.risk_coverage``); ``None`` without
            labelled rows.
        correct: Whether each labelled prediction is right, boolean shape ``(n,)``; gives the
            oracle curve and the error rate.
        results: The evaluation results (AURC, coverage and selective accuracy of the rule).

    Returns:
        The figure, one panel or two.
    """
    if curve is None:
        fig = Figure(figsize=(6.4, 4.6))
        _empty(fig.subplots(), "no labelled images")
        return fig
    cov, risk = curve
    # Only the oracle (right predictions first: the best order) is the report's own.
    oracle_scores = correct.astype(np.float64)  # right predictions first: the best order
    _, oracle = metrics.risk_coverage_curve(oracle_scores, correct)
    curves = {
        "cov": cov,
        "risk": risk,
        "oracle": oracle,
        "oracle_aurc": metrics.aurc(oracle_scores, correct),
        "error_rate": 1.0 - float(correct.mean()),
    }
    point = _operating_point(results)
    start = _zoom_start(cov, risk, None if point is None else point[0])
    if start is None:
        fig = Figure(figsize=(6.4, 4.6))
        axes = [fig.subplots()]
    else:
        fig = Figure(figsize=(12.8, 4.6))
        axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    _risk_panel(axes[0], curves, results, point, 0.0)
    axes[0].set_title("Risk-coverage curve" + ("" if start is None else ": whole range"))
    if start is not None:
        _risk_panel(axes[1], curves, results, point, start)
        axes[1].set_title(f"Zoomed to coverage ≥ {start:.2f} (risk is 0 below it)")
    axes[-1].legend(fontsize=8.5, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    return fig


def _risk_panel(
    ax: Axes, curves: dict, results: dict, point: tuple[float, float] | None, start: float
) -> None:
    cov, risk, oracle = curves["cov"], curves["risk"], curves["oracle"]
    model_label = f"by confidence (AURC = {_fmt(results.get('aurc'))})"
    ax.plot(cov, risk, color="#1864ab", lw=2, label=model_label)
    oracle_label = f"oracle: errors last (AURC = {curves['oracle_aurc']:.4f})"
    ax.plot(cov, oracle, "--", color=RIGHT_COLOR, label=oracle_label)
    ax.axhline(curves["error_rate"], color="#868e96", ls=":", label="no rejection (error rate)")
    if point is not None:
        ax.axvline(point[0], color=WRONG_COLOR, lw=0.8, ls=":", zorder=1)
        ax.scatter(
            [point[0]],
            [point[1]],
            marker="*",
            s=220,
            color=WRONG_COLOR,
            zorder=4,
            edgecolors="white",
            linewidths=0.8,
            label=f"decision rule: coverage {point[0]:.3f}, risk {point[1]:.3f}",
        )
    ax.set_xlim(start, 1.0 + 0.02 * (1.0 - start))
    visible = cov >= start
    top = max(float(risk[visible].max()), float(oracle[visible].max()), curves["error_rate"])
    if point is not None:
        top = max(top, point[1])
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
    ax.set_xlabel("coverage (share of images kept, most confident first)")
    ax.set_ylabel("risk (error rate among kept images)")
    ax.grid(alpha=0.3)


_Group = tuple[str, str, dict[str, np.ndarray]]  # (label, colour, scores of its images)


def _plot_score_histograms(folder: Path, groups: list[_Group], results: dict) -> str:
    """One histogram panel per uncertainty score (groups overlaid), and a legend panel."""
    fig = Figure(figsize=(13, 7.2))
    axes = fig.subplots(2, 3).ravel()
    for ax, name in zip(axes, SCORE_NAMES, strict=False):
        _draw_score_histogram(ax, name, groups, results)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    if handles:
        axes[-1].legend(handles, labels, loc="center", fontsize=11, title="images")
    fig.suptitle("Uncertainty scores by group (densities)")
    fig.tight_layout()
    return save_figure(fig, folder, "score_histograms.png")


def _draw_score_histogram(ax: Axes, name: str, groups: list[_Group], results: dict) -> None:
    """Densities of score ``name`` per group, titled with the AUROCs evaluate computed."""
    present = [(label, color, values[name]) for label, color, values in groups]
    present = [(lab, col, v[np.isfinite(v)]) for lab, col, v in present if np.isfinite(v).any()]
    if not present:
        _empty(ax, "no rows")
        ax.set_title(name)
        return
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


def _plot_confusion(folder: Path, labels: np.ndarray, preds: np.ndarray, names: list[str]) -> str:
    n = len(names)
    size = min(max(4.5, 0.5 * n + 2.5), 20)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    if len(labels) == 0:
        _empty(ax, "no labelled images")
        return save_figure(fig, folder, "confusion.png")
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
    return save_figure(fig, folder, "confusion.png")


def _verdict(label: str | None, pred: str) -> str:
    """``"correct"`` or ``"wrong"`` for a labelled image, ``"unlabelled"`` otherwise."""
    if label is None:
        return "unlabelled"
    return "correct" if label == pred else "wrong"


def _row_label(row: pd.Series) -> str | None:
    label = row.get("label")
    return None if label is None or pd.isna(label) else str(label)


def _panel_title(rank: int, row: pd.Series, names: list[str], note: str) -> str:
    """First line: the verdict in words, the label, the prediction and the decision."""
    label, pred = _row_label(row), str(row["pred"])
    verdict = _verdict(label, pred)
    if label is None:
        head = f"#{rank}  no label; predicted {pred}"
    elif label in names:
        head = f"#{rank}  {verdict}: label {label}, predicted {pred}"
    else:
        head = f"#{rank}  {verdict}: label {label} (not a class of the model), predicted {pred}"
    return (
        f"{head}; decision {row['decision']}\n"
        f"entropy {row['entropy']:.3f}, mutual info {row['mutual_info']:.3f}, "
        f"variation ratio {row['variation_ratio']:.3f}, confidence {row['confidence']:.3f}{note}"
    )


def _class_style(name: str, label: str | None, pred: str) -> tuple[str, str]:
    """Tick text and bar colour of one class in an image's per-class chart."""
    roles = [role for role, hit in (("label", name == label), ("pred", name == pred)) if hit]
    if name == pred:
        colour = {"correct": RIGHT_COLOR, "wrong": WRONG_COLOR}.get(
            _verdict(label, pred), PRED_COLOR
        )
    else:
        colour = TRUE_COLOR if name == label else OTHER_COLOR
    return name + (f" ({', '.join(roles)})" if roles else ""), colour


def _draw_thumbnail(ax: Axes, rel: str, images_root: Path | None) -> None:
    thumb, reason = _thumbnail(None if images_root is None else images_root / rel)
    if thumb is None:
        ax.set_facecolor("#e9ecef")
        text = reason + "\n" + "\n".join(textwrap.wrap(rel, 28))
        ax.text(
            0.5,
            0.5,
            text,
            ha="center",
            va="center",
            fontsize=9,
            color="#495057",
            transform=ax.transAxes,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        small = max(thumb.shape[:2]) < 128
        ax.imshow(thumb, interpolation="nearest" if small else "antialiased")
        ax.axis("off")
    ax.set_title("\n".join(textwrap.wrap(rel, 36)), fontsize=9)


def _draw_class_chart(
    ax: Axes, row: pd.Series, names: list[str], samples: np.ndarray | None
) -> str:
    """Per-class probabilities of one image; returns a note for the title."""
    mean = np.array([row[f"mean_{c}"] for c in names], dtype=np.float64)
    order = np.arange(len(names))
    note = ""
    if len(names) > MAX_BAR_CLASSES:
        order = np.sort(np.argsort(-mean, kind="stable")[:MAX_BAR_CLASSES])
        note = f" (top {MAX_BAR_CLASSES} of {len(names)} classes by mean)"
    x = np.arange(len(order))
    styles = [_class_style(names[c], _row_label(row), str(row["pred"])) for c in order]
    colours = [colour for _, colour in styles]
    if samples is None:
        _draw_class_bars(ax, row, names, order, colours)
    else:
        _draw_class_boxes(ax, samples[:, order], mean[order], colours)
        note += f"; box plots of the {len(samples)} samples"
    rotate = len(order) > 8
    ax.set_xticks(x)
    ax.set_xticklabels(
        [text for text, _ in styles],
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
    )
    ax.set_ylim(0, 1.16)  # room above 1 for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("probability")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    return note


def _draw_class_bars(
    ax: Axes, row: pd.Series, names: list[str], order: np.ndarray, colours: list[str]
) -> None:
    """Bars of the stored mean ± std of the classes ``order``, and the median as diamonds."""
    x = np.arange(len(order))
    mean, median, std = (
        np.array([row[f"{stat}_{c}"] for c in names], dtype=np.float64)[order]
        for stat in ("mean", "median", "std")
    )
    ax.bar(
        x,
        mean,
        yerr=std,
        color=colours,
        edgecolor="#1864ab",
        capsize=3,
        error_kw={"elinewidth": 1, "ecolor": "#343a40"},
        label="mean ± std",
    )
    ax.scatter(x, median, marker="D", color="#f08c00", zorder=4, s=28, label="median")


def _draw_class_boxes(ax: Axes, samples: np.ndarray, mean: np.ndarray, colours: list[str]) -> None:
    """Box plots of raw ``samples`` of shape ``(S, classes shown)``, with the mean as a dash."""
    x = np.arange(samples.shape[1])
    boxes = ax.boxplot(
        samples,
        positions=x,
        widths=0.6,
        patch_artist=True,
        medianprops={"color": "#f08c00", "linewidth": 2},
        flierprops={"markersize": 2, "alpha": 0.4},
    )
    boxes["medians"][0].set_label("median")
    for box, colour in zip(boxes["boxes"], colours, strict=True):
        box.set_facecolor(colour)
        box.set_edgecolor("#1864ab")
    ax.scatter(x, mean, marker="_", color="#212529", zorder=4, s=120, label="mean")


def _draw_uncertain_image(
    rank: int,
    row: pd.Series,
    names: list[str],
    images_root: Path | None,
    samples: np.ndarray | None,
) -> Figure:
    """One of the most uncertain images beside its per-class distribution."""
    fig = Figure(figsize=(11, 4.0))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.6]})
    _draw_thumbnail(left, str(row["path"]), images_root)
    note = _draw_class_chart(right, row, names, samples)
    verdict = _verdict(_row_label(row), str(row["pred"]))
    colour = {"correct": RIGHT_COLOR, "wrong": WRONG_COLOR}.get(verdict, "#212529")
    right.set_title(_panel_title(rank, row, names, note), fontsize=9, color=colour)
    fig.tight_layout()
    return fig


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
            f"{_fmt((results.get('auroc_error') or {}).get(name), 3)}"
            + (f" / {_fmt((ood.get('auroc') or {}).get(name), 3)}" if ood else ""),
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
    ]


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


def _score_groups(evaluation: Evaluation) -> list[_Group]:
    """(label, colour, scores) of right / wrong (or all in-distribution) and OOD images.

    The scores are those evaluate computed, split by the masks it computed.
    """
    scores, lab = evaluation.scores, evaluation.labelled
    groups: list[_Group] = []
    if lab.mask.any():
        right, wrong = lab.correct, ~lab.correct
        groups.append(("right", RIGHT_COLOR, {k: v[lab.mask][right] for k, v in scores.items()}))
        groups.append(("wrong", WRONG_COLOR, {k: v[lab.mask][wrong] for k, v in scores.items()}))
    else:
        ok = evaluation.ok
        groups.append(("in-distribution", IN_COLOR, {k: v[ok] for k, v in scores.items()}))
    if evaluation.ood_scores is not None and evaluation.ood_ok is not None:
        ood_ok = evaluation.ood_ok
        groups.append(("OOD", OOD_COLOR, {k: v[ood_ok] for k, v in evaluation.ood_scores.items()}))
    return groups


def _write_uncertain(
    folder: Path, evaluation: Evaluation, root: Path | None
) -> list[tuple[str, str]]:
    """Draw the ``TOP_UNCERTAIN`` ok rows with the highest entropy; ``(png, alt text)`` each."""
    df, names = evaluation.frame, evaluation.class_names
    entropy = evaluation.scores["entropy"]
    candidates = np.flatnonzero(evaluation.ok & np.isfinite(entropy))
    top = candidates[np.argsort(-entropy[candidates], kind="stable")[:TOP_UNCERTAIN]]
    source = evaluation.source
    samples = _read_samples(None if source is None else source.samples, top)
    for stale in folder.glob("uncertain_*.png"):
        stale.unlink()
    uncertain = []
    for rank, i in enumerate(top, start=1):
        row = df.iloc[int(i)]
        fig = _draw_uncertain_image(rank, row, names, root, samples.get(int(i)))
        verdict = _verdict(_row_label(row), str(row["pred"]))
        alt = f"uncertain image {rank}: {row['path']}, {verdict}"
        uncertain.append((save_figure(fig, folder, f"uncertain_{rank:02d}.png"), alt))
    return uncertain


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
    results, lab, names = evaluation.results, evaluation.labelled, evaluation.class_names
    source = evaluation.source
    metadata = {} if source is None else source.metadata
    reliability = _draw_reliability(evaluation.reliability, results["ece"])
    risk_coverage = _draw_risk_coverage(evaluation.risk_coverage, lab.correct, results)
    plots = {
        "reliability": save_figure(reliability, folder, "reliability.png"),
        "risk_coverage": save_figure(risk_coverage, folder, "risk_coverage.png"),
        "scores": _plot_score_histograms(folder, _score_groups(evaluation), results),
        "confusion": _plot_confusion(folder, lab.labels, lab.pred.astype(np.int64), names),
    }
    out_path = None if source is None else Path(source.path)
    root = _resolve_images_root(out_path, metadata, images_root)
    uncertain = _write_uncertain(folder, evaluation, root)

    index = folder / "index.html"
    index.write_text(_page(results, metadata, plots, uncertain), encoding="utf-8")
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
