"""Checks on a model file that need no TensorFlow, so that the CLI reports a wrong path at once.

``models.load_model`` runs the same checks before it loads the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from batchuq.errors import ModelError  # also importable from here (and from batchuq.models)

BUNDLED_MODEL = Path(__file__).parent / "data" / "digits_cnn.keras"
MODEL_ENV = "BATCHUQ_MODEL"
# A deep ensemble is a folder holding its members and this manifest (``batchuq train --members``).
ENSEMBLE_MANIFEST = "ensemble.json"
ENSEMBLE_FORMAT = "batchuq-ensemble/1"


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is an existing ``.keras`` archive or legacy ``.h5`` (HDF5) file.

    Args:
        path: The model file.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ModelError: If the file is missing, a folder, or neither kind of file.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ModelError(f"The model file {what}. Received: model={str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".keras" and zipfile.is_zipfile(path):
        return path
    if suffix == ".h5" and _is_hdf5(path):
        return path
    raise ModelError(
        "The model must be a Keras 3 `.keras` file (a zip archive saved by model.save) or a "
        f"legacy `.h5` file (HDF5). Received: model={str(path)!r}"
    )


def ensemble_members(folder: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """The members listed by an ensemble folder's manifest, in its order, with their sha256.

    Args:
        folder: A folder written by ``batchuq train --members`` (it holds ``ensemble.json``).

    Returns:
        ``(member path, recorded sha256)`` per member; every path is checked to be a model file.

    Raises:
        ModelError: If the manifest is missing, unreadable or lists no member.
    """
    import json

    folder = Path(folder)
    manifest = folder / ENSEMBLE_MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        members = [(folder / m["file"], str(m.get("sha256", ""))) for m in data["members"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"A model folder must be a deep ensemble with an {ENSEMBLE_MANIFEST} written by "
            f"`batchuq train --members` ({type(exc).__name__}: {exc}). "
            f"Received: model={str(folder)!r}"
        ) from None
    if not members:
        raise ModelError(f"The ensemble lists no member. Received: model={str(folder)!r}")
    for path, _ in members:
        check_model_file(path)
    return members


def check_model_arguments(models: list[str | os.PathLike[str]] | None) -> None:
    """Check every ``--model`` (files, or ensemble folders with their members) without TensorFlow.

    Raises:
        ModelError: If one of them is not a usable model file or ensemble folder.
    """
    for model in models or ():
        if Path(model).is_dir():
            ensemble_members(model)
        else:
            check_model_file(model)


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"


def import_user_modules(names: list[str] | tuple[str, ...] | None) -> None:
    """Import the modules of ``--import``, which register custom layers and models with Keras.

    Args:
        names: Module names (importable, or from the working directory) or ``.py`` file paths.

    Raises:
        ModelError: If a module cannot be found or fails to import; the message names it.
    """
    import importlib
    import importlib.util
    import sys

    for name in names or ():
        try:
            if name.endswith(".py") or os.sep in name:
                spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                if spec is None or spec.loader is None or not Path(name).is_file():
                    raise FileNotFoundError(f"no such file: {name}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path:
                    sys.path.insert(0, os.getcwd())  # the console script's path lacks the cwd
                importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure is the user's module's
            raise ModelError(
                f"Could not import {name!r} (--import): {type(exc).__name__}: {exc}. "
                f"Received: import={name!r}"
            ) from exc
