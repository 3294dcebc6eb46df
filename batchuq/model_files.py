"""The model file on disk, before anything loads it: which paths, which files, their hashes.

Resolves ``--model`` (the bundled demo model, ``BATCHUQ_MODEL``, an ensemble folder and its
manifest), checks the paths and hashes the files, imports ``--import`` user modules, and
words the usage errors about a model's inputs and outputs. No TensorFlow, so that the CLI
reports a wrong path at once; ``models.load_model`` runs the same checks before it loads the file
(``models``), and ``model_facts`` reads what the file describes.
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_digest(digests: list[str]) -> str:
    """The sha256 that identifies a run's model: the file's, or for an ensemble one over all
    members' digests in order (so that a calibration is tied to the very members)."""
    import hashlib

    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def model_paths(models: list[str | os.PathLike[str]] | None) -> list[Path]:
    """The model files of a run, members of ensemble folders in their manifest's order.

    Args:
        models: The ``--model`` values (files or ensemble folders); empty or ``None`` means
            ``$BATCHUQ_MODEL`` or else the bundled demo model.

    Raises:
        ModelError: If one of them is not a usable model file or ensemble folder.
    """
    if not models:
        models = [os.environ.get(MODEL_ENV) or BUNDLED_MODEL]  # as models.load_models
    paths: list[Path] = []
    for model in models:
        if Path(model).is_dir():
            paths.extend(path for path, _ in ensemble_members(model))
        else:
            paths.append(check_model_file(model))
    return paths


def lambda_layer_message(path: str | os.PathLike[str]) -> str:
    """Why a model holding a ``Lambda`` layer is refused."""
    return (
        "The model holds code (e.g. a Lambda layer) that safe mode refuses to load; "
        f"batchuq never runs code from a model file. Received: model={str(path)!r}"
    )


def outputs_message(outputs: int) -> str:
    """Why a model with other than one output is refused."""
    return (
        "batchuq scores functional or Sequential Keras models with one output; wrap a "
        "subclassed model as keras.Model(inputs, model(inputs)) with "
        "inputs = keras.Input((height, width, channels)). "
        f"Received: a model with {outputs or 'no known'} outputs"
    )


def inputs_message(inputs: int) -> str:
    """Why a model with other than one input is refused."""
    return (
        "The model must take exactly one image input of known shape (a functional or "
        "Sequential model; wrap a subclassed model as keras.Model(inputs, model(inputs)) "
        f"with inputs = keras.Input((height, width, channels))). Received: {inputs} inputs"
    )


def input_shape_problem(shape: tuple[int | None, ...]) -> str | None:
    """Why an input shape is not an image batch, or ``None`` when it is one."""
    if len(shape) == 3 and all(d is not None for d in shape[1:]):
        return None
    if len(shape) == 4 and all(d is not None for d in shape[1:]):
        return None
    return (
        "The model input must be an image batch (batch, height, width, channels) or "
        "(batch, height, width) with known height, width and channels. "
        f"Received: input_shape={shape}"
    )


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
