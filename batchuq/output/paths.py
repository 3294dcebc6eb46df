"""Output paths checked before any work: a writable local file, or a folder dataset.

``check_output_path`` and ``check_output_folder`` refuse, before a single image is scored, an
output that could not be written (a URL, a missing or read-only folder, a wrong suffix, a folder
holding other files). The writing itself is ``batchuq.output.sink``.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from batchuq.compact import PART_GLOB
from batchuq.errors import OutputError
from batchuq.storage import is_url


def check_output_path(path: str | os.PathLike[str], suffix: str | None = None) -> Path:
    """Check that ``path`` can be written before any work is done.

    Args:
        path: The output file.
        suffix: When given (e.g. ``".parquet"``), the only suffix accepted (any case).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: If the path is a URL (object storage cannot take the atomic rename the
            output relies on), a folder, its folder does not exist or is not writable, or it
            does not end in ``suffix``.
    """
    if is_url(path):
        raise OutputError(
            "The output must be a local path: it is written to a temporary file and renamed "
            "into place, which object storage cannot do atomically. Write locally or to a "
            "mounted filesystem, then copy the file (e.g. `aws s3 cp out.parquet s3://...`). "
            f"Received: output={str(path)!r}"
        )
    out = Path(path)
    if out.is_dir():
        raise OutputError(
            f"The output path is a folder, not a file. Received: output={str(path)!r}"
        )
    _check_parent(out, path)
    if suffix is not None and out.suffix.lower() != suffix.lower():
        kind = suffix.lstrip(".").capitalize()
        raise OutputError(
            f"The output must end in {suffix}: batchuq writes {kind}. "
            f"Received: output={str(path)!r}"
        )
    return out


def _check_parent(out: Path, given: str | os.PathLike[str]) -> None:
    """Refuse an output whose folder is missing or not writable."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(
            f"The output folder {str(parent)!r} does not exist. Received: output={str(given)!r}"
        )
    if not os.access(parent, os.W_OK):
        raise OutputError(
            f"The output folder {str(parent)!r} is not writable. Received: output={str(given)!r}"
        )


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """Whether ``output`` names a folder dataset: a string ending in ``/`` (``scores/``)."""
    return isinstance(output, str) and output.endswith(("/", os.sep))


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """Check that the folder dataset ``path`` (``scores/``) can be written before any work.

    An existing folder is replaced when the run completes, so it must be a previous output:
    nothing in it but ``part-*.parquet`` files.

    Args:
        path: The output folder.

    Returns:
        ``path`` as a ``Path`` (without the trailing ``/``).

    Raises:
        OutputError: If the path is a URL, a file, or a folder that holds other files, or its
            parent folder does not exist or is not writable.
    """
    if is_url(path):
        check_output_path(path)  # refuses it, saying why
    out = Path(path)
    _check_parent(out, path)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"The output ends in / (a folder dataset) but is a file. Received: output={str(path)!r}"
        )
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not fnmatch.fnmatch(p.name, PART_GLOB))
        if foreign:
            raise OutputError(
                "The output folder exists and holds other files than the part-*.parquet of a "
                f"batchuq output (e.g. {foreign[0]!r}); batchuq replaces only its own output "
                f"folders. Received: output={str(path)!r}"
            )
    return out
