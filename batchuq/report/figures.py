"""What every page of the presentation layer shares: its folder and how a figure is saved.

Figures are drawn with Matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), which needs no display and leaves the global backend alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from batchuq.errors import OutputError

DPI = 100

__all__ = ["DPI", "report_folder", "save_figure"]


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
