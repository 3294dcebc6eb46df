"""Checks on a model file that need no TensorFlow, so that the CLI reports a wrong path at once.

``models.load_model`` runs the same checks before it loads the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent / "data" / "digits_cnn.keras"
MODEL_ENV = "BATCHUQ_MODEL"


class ModelError(ValueError):
    """Raised when a model cannot be used; the message says why."""


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is an existing Keras 3 ``.keras`` archive.

    Args:
        path: The model file.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ModelError: If the file is missing, a folder, or not a ``.keras`` zip archive.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ModelError(f"The model file {what}. Received: model={str(path)!r}")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ModelError(
            "The model must be a Keras 3 `.keras` file (a zip archive saved by model.save). "
            f"Received: model={str(path)!r}"
        )
    return path
