"""The figures of ``batchuq evaluate --report``, drawn from what the evaluate job computed.

A reliability diagram with the image count of each bin (bins of fewer than ``MIN_BIN_IMAGES``
images faded), the risk-coverage curve (with a zoomed panel where it changes, and the run's
decision rule marked), histograms of each uncertainty score for right / wrong / OOD images, and
a confusion matrix. Every number drawn is the ``Evaluation``'s, but for the oracle curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchuq import metrics
from batchuq.jobs.evaluate import SCORE_NAMES, Evaluation, RiskCoverage
from batchuq.report.figures import RIGHT_COLOR, WRONG_COLOR, format_number, save_figure

MAX_ANNOTATED_CLASSES = 20
MIN_BIN_IMAGES = 5  # reliability bins with fewer images are drawn faded
FADED_ALPHA = 0.3
ZOOM_MIN_START = 0.5  # the risk-coverage curve gets a zoomed panel if it is 0 up to here
OOD_COLOR = "#1c7ed6"
IN_COLOR = "#495057"

__all__ = [
    "Group",
    "draw_reliability",
    "draw_risk_coverage",
    "plot_confusion",
    "plot_score_histograms",
    "score_groups",
    "write_figures",
]


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_reliability(bins: metrics.ReliabilityBins | None, ece: float | None) -> Figure:
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
    top.set_title(f"Reliability diagram: ECE = {format_number(ece)} ({len(few)} bins, N = {n})")
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


def draw_risk_coverage(curve: RiskCoverage | None, correct: np.ndarray, results: dict) -> Figure:
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
    model_label = f"by confidence (AURC = {format_number(results.get('aurc'))})"
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


Group = tuple[str, str, dict[str, np.ndarray]]  # (label, colour, scores of its images)


def plot_score_histograms(folder: Path, groups: list[Group], results: dict) -> str:
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


def _draw_score_histogram(ax: Axes, name: str, groups: list[Group], results: dict) -> None:
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


def plot_confusion(folder: Path, labels: np.ndarray, preds: np.ndarray, names: list[str]) -> str:
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


def score_groups(evaluation: Evaluation) -> list[Group]:
    """(label, colour, scores) of right / wrong (or all in-distribution) and OOD images.

    The scores are those evaluate computed, split by the masks it computed.
    """
    scores, lab = evaluation.scores, evaluation.labelled
    groups: list[Group] = []
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


def write_figures(folder: Path, evaluation: Evaluation) -> dict[str, str]:
    """Draw and save the report's four figures of an evaluated file.

    Args:
        folder: The report folder.
        evaluation: What ``evaluate_file`` returned.

    Returns:
        The PNG file names in ``folder``, by figure: ``reliability``, ``risk_coverage``,
        ``scores`` and ``confusion``.
    """
    results, lab, names = evaluation.results, evaluation.labelled, evaluation.class_names
    reliability = draw_reliability(evaluation.reliability, results["ece"])
    risk_coverage = draw_risk_coverage(evaluation.risk_coverage, lab.correct, results)
    return {
        "reliability": save_figure(reliability, folder, "reliability.png"),
        "risk_coverage": save_figure(risk_coverage, folder, "risk_coverage.png"),
        "scores": plot_score_histograms(folder, score_groups(evaluation), results),
        "confusion": plot_confusion(folder, lab.labels, lab.pred.astype(np.int64), names),
    }
