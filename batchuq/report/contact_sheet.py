"""The contact sheet of ``batchuq shift``: one image across corruptions and severities, as a PNG.

``write_contact_sheet`` draws from the ``ShiftReport`` that ``batchuq.jobs.shift.shift_directory``
returned: the image it names, clean in the first column, then read back from the series' files
(so the sheet shows what was written) with one row per corruption and one column per severity.
The figure is laid out in pixels: the PNG is exactly ``contact_sheet_size(rows, columns)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from batchuq.corrupt import working_image
from batchuq.jobs.shift import ShiftReport

CONTACT_SHEET_NAME = "contact_sheet.png"  # in OUT_DIR, unless another path is given
# Contact sheet geometry in pixels (the figure is drawn at DPI, so these are exact).
SHEET_DPI = 100
SHEET_CELL_PX = 100  # one image per cell, with a small margin
SHEET_LABEL_PX = 130  # the corruption names, left of the rows
SHEET_HEADER_PX = 40  # "clean", "severity 1" ... above the columns

__all__ = ["CONTACT_SHEET_NAME", "contact_sheet_size", "write_contact_sheet"]


def contact_sheet_size(rows: int, columns: int) -> tuple[int, int]:
    """The contact sheet's ``(width, height)`` in pixels for ``rows`` corruptions and
    ``columns`` images per row (the clean one and one per severity)."""
    return SHEET_LABEL_PX + columns * SHEET_CELL_PX, SHEET_HEADER_PX + rows * SHEET_CELL_PX


def _display_array(image: Image.Image) -> np.ndarray:
    """Pixels for ``imshow``: ``(H, W)`` for grayscale, ``(H, W, 3 or 4)`` otherwise."""
    if image.mode in ("LA", "RGBA"):
        return np.asarray(image.convert("RGBA"))
    return np.asarray(working_image(image))


def _draw(
    out_dir: Path,
    relative_path: str,
    clean: Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
) -> Figure:
    """One image across corruptions (rows) and severities (columns, after the clean image)."""
    columns = [("clean", clean)] + [(f"severity {s}", None) for s in severities]
    width, height = contact_sheet_size(len(corruptions), len(columns))
    fig = Figure(figsize=(width / SHEET_DPI, height / SHEET_DPI), dpi=SHEET_DPI)
    pad = 4
    for row, name in enumerate(corruptions):
        top = SHEET_HEADER_PX + row * SHEET_CELL_PX
        fig.text(8 / width, 1 - (top + SHEET_CELL_PX / 2) / height, name, va="center", size=9)
        for column, (title, file) in enumerate(columns):
            if file is None:
                file = out_dir / name / title.split()[-1] / relative_path
            left = SHEET_LABEL_PX + column * SHEET_CELL_PX
            box = [
                (left + pad) / width,
                1 - (top + SHEET_CELL_PX - pad) / height,
                (SHEET_CELL_PX - 2 * pad) / width,
                (SHEET_CELL_PX - 2 * pad) / height,
            ]
            axes = fig.add_axes(box)
            with Image.open(file) as image:
                pixels = _display_array(image)
            axes.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes.set_axis_off()
            if row == 0:
                x = (left + SHEET_CELL_PX / 2) / width
                fig.text(x, 1 - (SHEET_HEADER_PX / 2) / height, title, ha="center", size=9)
    return fig


def write_contact_sheet(
    report: ShiftReport, path: str | os.PathLike[str] | None = None
) -> Path | None:
    """Draw the series' contact sheet and write it as a PNG (atomically, like the images).

    Args:
        report: What ``shift_directory`` returned; its ``contact_image`` is the image shown.
        path: The PNG to write. Default: ``OUT_DIR/contact_sheet.png``.

    Returns:
        The PNG's path, exactly ``contact_sheet_size(len(report.corruptions),
        len(report.severities) + 1)`` pixels; None when no image could be read (no sheet).

    Raises:
        OSError: If an image cannot be read back or the PNG cannot be written.
    """
    if report.contact_image is None:
        return None
    fig = _draw(
        report.out_dir,
        report.contact_image,
        report.images_root / report.contact_image,
        report.corruptions,
        report.severities,
    )
    target = Path(report.out_dir / CONTACT_SHEET_NAME if path is None else path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, dpi=SHEET_DPI, format="png")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target
