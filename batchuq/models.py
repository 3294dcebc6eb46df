"""Loading the Keras model and working out its classes and input format."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import keras

from batchuq.decode import ImageSpec
from batchuq.model_files import BUNDLED_MODEL, MODEL_ENV, ModelError, check_model_file


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score, with where it came from.

    Attributes:
        model: The Keras model.
        path: The ``.keras`` file it was loaded from.
        sha256: Hex digest of that file.
        bundled: Whether it is batchuq's bundled demo model.
    """

    model: keras.Model
    path: Path
    sha256: str
    bundled: bool

    @property
    def num_classes(self) -> int:
        """Size of the model's output vector."""
        outputs = getattr(self.model, "outputs", None) or []
        if len(outputs) != 1:
            raise ModelError(
                "batchuq scores functional or Sequential Keras models with one output; wrap a "
                "subclassed model as keras.Model(inputs, model(inputs)) with "
                "inputs = keras.Input((height, width, channels)). "
                f"Received: a model with {len(outputs) or 'no known'} outputs"
            )
        return int(outputs[0].shape[-1])

    @property
    def image_spec(self) -> ImageSpec:
        """Input height, width and channels, from the model's input shape."""
        return image_spec(self.model)


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    """The class-name sidecar that ``batchuq train`` writes beside ``model.keras``."""
    path = Path(model_path)
    return path.with_name(path.stem + ".classes.json")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_spec(model: keras.Model) -> ImageSpec:
    """Read ``(height, width, channels)`` from a model's single image input.

    Raises:
        ModelError: If the model does not take one ``(batch, H, W, C)`` input of known size.
    """
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise ModelError(
            "The model must take exactly one image input of known shape (a functional or "
            "Sequential model; wrap a subclassed model as keras.Model(inputs, model(inputs)) "
            f"with inputs = keras.Input((height, width, channels))). Received: {len(inputs)} inputs"
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ModelError(
            "The model input must be an image batch (batch, height, width, channels) with known "
            f"height, width and channels. Received: input_shape={shape}"
        )
    return ImageSpec(int(shape[1]), int(shape[2]), int(shape[3]))


def load_model(path: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a ``.keras`` model in safe mode (no arbitrary code such as Lambda layers).

    Args:
        path: The model file; ``None`` means ``$BATCHUQ_MODEL`` or else the bundled demo model.

    Returns:
        The loaded model.

    Raises:
        ModelError: If the file is missing, not a Keras model, or unsafe to load.
    """
    bundled = False
    if path is None:
        path = os.environ.get(MODEL_ENV) or None
    if path is None:
        path, bundled = BUNDLED_MODEL, True
    path = check_model_file(path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ModelError(
                "The model holds code (e.g. a Lambda layer) that safe mode refuses to load; "
                f"batchuq never runs code from a model file. Received: model={str(path)!r}"
            ) from exc
        raise ModelError(f"Could not load the model: {exc}. Received: model={str(path)!r}") from exc
    except Exception as exc:  # noqa: BLE001 - any loader failure is a model problem
        raise ModelError(f"Could not load the model: {exc}. Received: model={str(path)!r}") from exc
    return LoadedModel(model, path, file_sha256(path), bundled)


def as_loaded_model(
    model: str | os.PathLike[str] | keras.Model | LoadedModel | None,
) -> LoadedModel:
    """Accept a ``.keras`` path, ``None`` (env or bundled), a Keras model or a ``LoadedModel``.

    An in-memory Keras model gets the path ``<in-memory>`` and an empty sha256.
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, keras.Model):
        return LoadedModel(model, Path("<in-memory>"), "", False)
    return load_model(model)


def read_sidecar(model_path: str | os.PathLike[str]) -> dict:
    """The sidecar beside the model as a dict (empty when there is none).

    Keys written by ``batchuq train``: ``class_names``, ``rescale``, ``image_size``.
    """
    sidecar = sidecar_path(model_path)
    if not sidecar.is_file():
        return {}
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"Could not read the class-name sidecar {str(sidecar)!r}: {exc}") from exc
    return content if isinstance(content, dict) else {}


def write_sidecar(model_path: str | os.PathLike[str], class_names: list[str], **extra) -> Path:
    """Write the class-name sidecar beside ``model_path``."""
    sidecar = sidecar_path(model_path)
    sidecar.write_text(json.dumps({"class_names": class_names, **extra}, indent=2) + "\n")
    return sidecar


def resolve_class_names(
    loaded: LoadedModel,
    class_names: list[str] | None = None,
    folder_names: list[str] | None = None,
) -> tuple[list[str], str]:
    """Work out the model's class names.

    Order of precedence: the sidecar written by ``batchuq train``; ``class_names`` given by the
    user; the discovered class folders when their count equals the model's outputs;
    ``0 .. C-1``.

    Returns:
        The names and where they came from (``sidecar``, ``option``, ``folders``, ``index``).

    Raises:
        ModelError: If the names given do not match the model's output size.
    """
    classes = loaded.num_classes
    sidecar = read_sidecar(loaded.path).get("class_names")
    if sidecar:
        names, source = [str(n) for n in sidecar], "sidecar"
    elif class_names:
        names, source = list(class_names), "option"
    elif folder_names and len(folder_names) == classes:
        names, source = list(folder_names), "folders"
    else:
        names, source = [str(i) for i in range(classes)], "index"
    if len(names) != classes:
        raise ModelError(
            f"The model has {classes} outputs but {len(names)} class names were given "
            f"(from {source}). Received: class_names={names}"
        )
    if len(set(names)) != len(names):
        raise ModelError(f"Class names must be unique. Received: class_names={names}")
    return names, source
