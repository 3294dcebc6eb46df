"""The loaded model: a Keras model (or ensemble) in memory with its classes and input format.

This is the one module of the three ``model*`` modules that imports TensorFlow: it loads the
file (``load_model``, ``load_models``), reads and writes its sidecar and ensemble manifest, and
works out the class names, image size and pixel scaling from the loaded model. The file on disk
before loading is ``model_files`` (paths, hashes, checks); what the file says about itself,
read without loading it, is ``model_facts``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

import batchuq.sngp  # noqa: F401 (registers the SNGP layers, so SNGP models load in safe mode)
from batchuq.classes import DEFAULT_CLASS_ORDER, ClassNames, resolve_names, sidecar_file
from batchuq.decode import ImageSpec
from batchuq.model_files import (
    BUNDLED_MODEL,
    ENSEMBLE_FORMAT,
    ENSEMBLE_MANIFEST,
    MODEL_ENV,
    ModelError,
    check_model_file,
    combined_digest,
    ensemble_members,
    file_sha256,
    input_shape_problem,
    inputs_message,
    lambda_layer_message,
    outputs_message,
)

logger = logging.getLogger("batchuq")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score, with where it came from.

    Attributes:
        model: The Keras model.
        path: The ``.keras`` file it was loaded from.
        sha256: Hex digest of that file.
        bundled: Whether it is batchuq's bundled demo model.
        sidecar: The sidecar ``batchuq train`` wrote beside the file (class names, rescale,
            EXIF handling), read once when the model is loaded; empty when there is none.
    """

    model: keras.Model
    path: Path
    sha256: str
    bundled: bool
    sidecar: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Size of the model's output vector."""
        outputs = getattr(self.model, "outputs", None) or []
        if len(outputs) != 1:
            raise ModelError(outputs_message(len(outputs)))
        return int(outputs[0].shape[-1])

    @property
    def image_spec(self) -> ImageSpec:
        """Input height, width and channels, from the model's input shape."""
        return image_spec(self.model)


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    """The class-name sidecar that ``batchuq train`` writes beside ``model.keras``."""
    return sidecar_file(model_path)


def image_spec(model: keras.Model) -> ImageSpec:
    """Read ``(height, width, channels)`` from a model's single image input.

    Raises:
        ModelError: If the model does not take one ``(batch, H, W, C)`` input of known size.
    """
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise ModelError(inputs_message(len(inputs)))
    shape = tuple(inputs[0].shape)
    if len(shape) == 3 and all(d is not None for d in shape[1:]):
        # (batch, height, width), as MNIST examples write Input(shape=(28, 28)): one channel,
        # given to the model without a channel axis.
        return ImageSpec(int(shape[1]), int(shape[2]), 1, channel_axis=False)
    problem = input_shape_problem(shape)
    if problem is not None:
        raise ModelError(problem)
    return ImageSpec(int(shape[1]), int(shape[2]), int(shape[3]))


def load_model(path: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a ``.keras`` or legacy ``.h5`` model in safe mode (no code such as Lambda layers).

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
            raise ModelError(lambda_layer_message(path)) from exc
        raise ModelError(_load_failure(path, exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any loader failure is a model problem
        raise ModelError(_load_failure(path, exc)) from exc
    return LoadedModel(model, path, file_sha256(path), bundled, read_sidecar(path))


def _load_failure(path: Path, exc: BaseException) -> str:
    """The message for a model the loader refused, with a hint for legacy ``.h5`` files."""
    hint = ""
    if path.suffix.lower() == ".h5":
        hint = (
            " Keras 3's legacy .h5 loader refused it; convert it once where it loads (e.g. the "
            'TensorFlow/Keras that saved it): python -c "import keras; '
            f"keras.models.load_model('{path}').save('{path.with_suffix('.keras')}')\"."
        )
    if "Unknown layer" in str(exc) or "Could not locate" in str(exc):
        hint += (
            " If it uses custom layers, register them with "
            "@keras.saving.register_keras_serializable() in a module and pass --import MODULE."
        )
    return f"Could not load the model: {exc}.{hint} Received: model={str(path)!r}"


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


def load_models(
    model: str | os.PathLike[str] | keras.Model | LoadedModel | Sequence[Any] | None,
) -> list[LoadedModel]:
    """Load the model of a run, or the members of a deep ensemble, in a fixed order.

    Args:
        model: A ``.keras`` path, an ensemble folder (``ensemble.json``: its members in the
            manifest's order), a Keras model, a ``LoadedModel``, ``None`` (``$BATCHUQ_MODEL``
            or the bundled demo model), or a sequence of these (members in the given order).

    Returns:
        One ``LoadedModel`` per member (one for a single model).

    Raises:
        ModelError: If a file cannot be loaded, or a member's sha256 differs from the manifest.
    """
    if model is None:
        model = os.environ.get(MODEL_ENV) or None
    if isinstance(model, (list, tuple)):
        if not model:
            raise ModelError("No model given. Received: model=[]")
        return [member for item in model for member in load_models(item)]
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        members = []
        for path, recorded in ensemble_members(model):
            member = load_model(path)
            if recorded and member.sha256 != recorded:
                raise ModelError(
                    f"The ensemble member {path.name} changed since {ENSEMBLE_MANIFEST} was "
                    f"written (sha256 {member.sha256[:12]}..., manifest {recorded[:12]}...). "
                    f"Received: model={str(model)!r}"
                )
            members.append(member)
        return members
    return [as_loaded_model(model)]


def write_ensemble_manifest(
    folder: str | os.PathLike[str], member_files: Sequence[str | os.PathLike[str]], **extra: Any
) -> Path:
    """Write ``ensemble.json``: the members (file, sha256) in order, and ``extra`` fields.

    Args:
        folder: The ensemble folder; every member file lies in it.
        member_files: The members' ``.keras`` files, in the order of the samples.
        extra: More fields (e.g. ``class_names``, ``rescale``, ``seeds``).

    Returns:
        The manifest's path.
    """
    folder = Path(folder)
    manifest = {
        "format": ENSEMBLE_FORMAT,
        **extra,
        "members": [
            {"file": str(Path(f).relative_to(folder)), "sha256": file_sha256(f)}
            for f in member_files
        ],
    }
    path = folder / ENSEMBLE_MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def combined_sha256(members: Sequence[LoadedModel]) -> str:
    """The sha256 that identifies a run's model: the file's, or for an ensemble one over all
    members' digests in order (so that a calibration is tied to the very members)."""
    return combined_digest([m.sha256 for m in members])


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
    class_order: str = DEFAULT_CLASS_ORDER,
) -> ClassNames:
    """Work out the model's class names (precedence: ``batchuq.classes``).

    ``--class-names`` given by the user wins over the sidecar written by ``batchuq train``,
    with a warning naming both; then the sidecar; then the discovered class folders when their
    count equals the model's outputs, numbered in ``class_order``; else ``0 .. C-1``.

    Returns:
        The names, where they came from (``option``, ``sidecar``, ``folders``, ``index``) and
        the notices to give (``ClassNames``).

    Raises:
        ModelError: If the names given do not match the model's output size.
    """
    resolved = resolve_names(
        loaded.num_classes,
        class_names,
        loaded.sidecar.get("class_names"),
        folder_names,
        class_order,
        sidecar_path(loaded.path),
    )
    if resolved.overridden:
        logger.warning(
            "--class-names %s overrides the names in the model's sidecar %s (%s).",
            ",".join(resolved.names),
            ",".join(resolved.overridden),
            sidecar_path(loaded.path),
        )
    return resolved


# Layers that scale raw pixels inside the model (keras.applications' EfficientNet, MobileNetV3
# with include_preprocessing, ConvNeXt ...). Given such a model, pixels must stay 0..255.
_PREPROCESSING_LAYERS = (keras.layers.Rescaling, keras.layers.Normalization)


def preprocessing_layer(model: keras.Model, depth: int = 8) -> str | None:
    """The name of a pixel-scaling layer among the model's first layers, or ``None``.

    Looks through the layers before the first one with weights, descending into nested models
    (a ``keras.applications`` model inside a Sequential, say).

    Args:
        model: The model.
        depth: How many leading layers to look at, nested ones included.

    Returns:
        ``"outer/inner"``-style name of the first ``Rescaling`` or ``Normalization`` layer.
    """
    for layer in getattr(model, "layers", [])[:depth]:
        if isinstance(layer, _PREPROCESSING_LAYERS):
            return layer.name
        if isinstance(layer, keras.Model):
            inner = preprocessing_layer(layer, depth)
            return None if inner is None else f"{layer.name}/{inner}"
        if layer.weights:
            return None
    return None


def resolve_rescale(
    loaded: LoadedModel, rescale: float | None, default: float
) -> tuple[float, str]:
    """The pixel scale factor and where it came from.

    Order: ``rescale`` given by the user; the sidecar written by ``batchuq train``; 1 when the
    model scales pixels itself (``preprocessing_layer``); ``default``.

    Returns:
        ``(rescale, source)``, source being ``option``, ``sidecar``, ``model layer NAME`` or
        ``default``.
    """
    if rescale is not None:
        return float(rescale), "option"
    stored = loaded.sidecar.get("rescale")
    if stored is not None:
        return float(stored), "sidecar"
    layer = preprocessing_layer(loaded.model)
    if layer is not None:
        return 1.0, f"model layer {layer}"
    return default, "default"
