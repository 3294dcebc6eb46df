"""The most uncertain images of ``batchuq evaluate --report``, one PNG each.

The ``TOP_UNCERTAIN`` readable images with the highest entropy, each a thumbnail beside the
distribution of its per-class probabilities, titled "correct" or "wrong". With a ``samples``
column (``batchuq score --save-samples``) the charts are box plots of each class's raw samples,
which show whether the model is "flipping a coin"; otherwise bars of the stored mean ± std with
the median. A missing or unreadable image is drawn as a grey placeholder that says why.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchuq.defaults import DEFAULT_MAX_PIXELS
from batchuq.jobs.evaluate import Evaluation
from batchuq.report.figures import RIGHT_COLOR, WRONG_COLOR, save_figure

TOP_UNCERTAIN = 12
MAX_BAR_CLASSES = 20
THUMBNAIL_SIZE = 256
MAX_THUMBNAIL_PIXELS = DEFAULT_MAX_PIXELS  # what `score --max-pixels` refuses by default
PRED_COLOR = "#1864ab"  # the predicted class of an unlabelled image
TRUE_COLOR = "#9775fa"  # the true class of a wrong prediction
OTHER_COLOR = "#74c0fc"

__all__ = ["TOP_UNCERTAIN", "resolve_images_root", "write_uncertain"]


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


def resolve_images_root(
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


def write_uncertain(
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
