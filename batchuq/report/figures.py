"""What every page of the presentation layer shares: its folder, how a figure is saved, the
colours of right and wrong predictions and how a number is written.

Figures are drawn with Matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), which needs no display and leaves the global backend alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from batchuq.errors import OutputError

DPI = 100
RIGHT_COLOR = "#2b8a3e"
WRONG_COLOR = "#c92a2a"

__all__ = ["DPI", "RIGHT_COLOR", "WRONG_COLOR", "format_number", "report_folder", "save_figure"]


def report_folder(report_dir: str | os.PathLike[str]) -> Path:
    """The report folder, created if needed.

    Raises:
        OutputError: If it is an existing file or cannot be created.
    """
    folder = Path(report_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"The report path is a file, not a folder. Received: report_dir={str(folder)!r}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"Cannot create the report folder: {exc}. Received: report_dir={str(folder)!r}"
        ) from exc
    return folder


def save_figure(fig: Figure, folder: Path, name: str) -> str:
    """Save ``fig`` as ``folder/name`` (PNG) and return ``name``, for the page to link."""
    fig.savefig(folder / name, dpi=DPI, format="png", bbox_inches="tight")
    return name


def format_number(value: float | int | None, digits: int = 4) -> str:
    """``value`` to ``digits`` decimals if a float, as it is if an int, ``n/a`` if None."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
