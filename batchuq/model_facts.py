"""What a model file says about itself, read without TensorFlow: for checks in a moment.

A Keras 3 ``.keras`` file is a zip archive whose ``config.json`` describes the model (layers,
their settings, the input's ``batch_shape``, the output layers); a legacy ``.h5`` file keeps the
same kind of description in its ``model_config`` attribute (read with h5py, which does not
import TensorFlow). ``read_model_facts`` takes from it what the usage checks need: the input
shape, the number of outputs and classes, the layers (for Lambda layers, dropout layers, an
SNGP head and pixel-scaling layers), and the sidecar beside the file.

Every fact is ``None`` (or a property says "unknown") where the description does not say it
plainly: a custom layer, a layer this reader does not know, a config it cannot parse. Callers
then leave that check to the loaded model; a model is never refused because this reader did
not understand it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchuq.classes import sidecar_file

# Model classes whose config holds layers of their own.
_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
# Dropout layers that MC dropout samples (batchuq.sampling.dropout.DROPOUT_TYPES and subclasses).
_DROPOUT_CLASSES = frozenset(
    {
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianDropout",
        "AlphaDropout",
    }
)
# Layers whose output has the last axis of their input.
_SAME_LAST_AXIS = frozenset(
    {
        *_DROPOUT_CLASSES,
        "Activation",
        "Softmax",
        "ReLU",
        "LeakyReLU",
        "ELU",
        "GaussianNoise",
        "ActivityRegularization",
        "BatchNormalization",
        "LayerNormalization",
        "Identity",
        "Rescaling",
    }
)
# Layers with no weights, which may come before a model's pixel-scaling layer.
_WEIGHTLESS = frozenset(
    {
        "InputLayer",
        "Resizing",
        "CenterCrop",
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomTranslation",
        "RandomContrast",
        "RandomBrightness",
        "RandomCrop",
        "Reshape",
        "Permute",
        "Activation",
        *_DROPOUT_CLASSES,
    }
)
_PREPROCESSING = frozenset({"Rescaling", "Normalization"})
_SNGP_HEAD = "RandomFeatureGaussianProcess"


@dataclass(frozen=True)
class LayerFact:
    """One layer of the description: its class, name and settings."""

    class_name: str
    name: str
    config: dict[str, Any]
    custom: bool  # not one of Keras's own layers (nor batchuq's SNGP layers)


@dataclass(frozen=True)
class ModelFacts:
    """What the model file says plainly (``None``: it does not).

    Attributes:
        path: The model file.
        inputs: The number of inputs.
        input_shape: The single input's shape, batch axis first.
        outputs: The number of outputs.
        num_classes: The size of the single output.
        layers: Every layer, nested models' layers after theirs, each once.
        nested: Whether a layer is itself a model.
        sidecar: The sidecar beside the file, or empty (also when unreadable).
    """

    path: Path
    inputs: int | None = None
    input_shape: tuple[int | None, ...] | None = None
    outputs: int | None = None
    num_classes: int | None = None
    layers: list[LayerFact] = field(default_factory=list)
    nested: bool = False
    sidecar: dict[str, Any] = field(default_factory=dict)

    @property
    def opaque(self) -> bool:
        """Whether some layer is custom, so the layers do not tell the whole model."""
        return not self.layers or any(layer.custom for layer in self.layers)

    @property
    def has_lambda(self) -> bool:
        """Whether a ``Lambda`` layer holds a Python lambda's bytecode (safe mode refuses to
        load it; one that names a registered function loads)."""
        return any(
            layer.class_name == "Lambda"
            and not layer.custom
            and any(
                isinstance(value, dict) and value.get("class_name") == "__lambda__"
                for value in layer.config.values()
            )
            for layer in self.layers
        )

    @property
    def sngp(self) -> bool | None:
        """Whether the model has batchuq's SNGP head (``None``: cannot tell)."""
        if any(layer.class_name == _SNGP_HEAD for layer in self.layers):
            return True
        return None if self.opaque else False

    def dropout_layers(self, patterns: Sequence[str] | None = None) -> list[str] | None:
        """Names of the dropout layers MC dropout would sample (``None``: cannot tell)."""
        if self.opaque or self.nested:
            return None
        names = [layer.name for layer in self.layers if layer.class_name in _DROPOUT_CLASSES]
        if patterns:
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return names

    def scales_pixels(self, depth: int = 8) -> bool | None:
        """Whether a ``Rescaling``/``Normalization`` layer comes before the first layer with
        weights, among the first ``depth`` (as ``models.preprocessing_layer``); ``None``: cannot
        tell."""
        if self.nested:
            return None
        for layer in self.layers[:depth]:
            if layer.custom:
                return None
            if layer.class_name in _PREPROCESSING:
                return True
            if layer.class_name not in _WEIGHTLESS:
                return False if layer.class_name in _HAS_WEIGHTS else None
        return False


# Layers that certainly have weights (the first one ends the search for a scaling layer).
_HAS_WEIGHTS = frozenset(
    {
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "DepthwiseConv2D",
        "SeparableConv2D",
        "Conv2DTranspose",
        "Dense",
        "EinsumDense",
        "BatchNormalization",
        "LayerNormalization",
        "Embedding",
    }
)


def read_model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Read what a ``.keras`` or ``.h5`` file says about its model, without TensorFlow.

    Args:
        path: The model file (checked to exist by ``model_files.check_model_file``).

    Returns:
        The facts; those the file does not state plainly are ``None``.
    """
    path = Path(path)
    facts = ModelFacts(path, sidecar=_sidecar(path))
    try:
        config = _model_config(path)
        if not isinstance(config, dict):
            return facts
        return _facts_from(config, facts)
    except Exception:  # noqa: BLE001 - an unreadable description is only "unknown"
        return facts


def _sidecar(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(sidecar_file(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _model_config(path: Path) -> Any:
    """The model's description: ``config.json`` of a ``.keras`` zip, ``model_config`` of an h5."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    import h5py

    with h5py.File(path, "r") as handle:
        text = handle.attrs.get("model_config")
    if text is None:
        return None
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


def _facts_from(config: dict[str, Any], facts: ModelFacts) -> ModelFacts:
    layers = list(_layers(config))
    inputs, input_shape = _input(config)
    outputs, units = _output(config)
    return ModelFacts(
        path=facts.path,
        inputs=inputs,
        input_shape=input_shape,
        outputs=outputs,
        num_classes=units if outputs == 1 else None,
        layers=[_fact(layer) for layer in layers],
        nested=any(layer.get("class_name") in _MODEL_CLASSES for layer in layers),
        sidecar=facts.sidecar,
    )


# Keras layers named in descriptions without a ``module`` (legacy .h5 files).
_KNOWN = _DROPOUT_CLASSES | _SAME_LAST_AXIS | _WEIGHTLESS | _HAS_WEIGHTS | _PREPROCESSING
_KNOWN |= _MODEL_CLASSES | {
    "Flatten",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "ZeroPadding2D",
    "Add",
    "Concatenate",
    "Multiply",
    "Lambda",
}


def _fact(layer: dict[str, Any]) -> LayerFact:
    module = str(layer.get("module") or "")
    registered = layer.get("registered_name")
    kind = str(layer.get("class_name"))
    ours = module.startswith("batchuq.") or str(registered or "").startswith("batchuq>")
    if module:
        custom = not ours and (bool(registered) or not module.startswith("keras"))
    else:
        custom = kind not in _KNOWN
    config = layer.get("config") or {}
    name = str(config.get("name") or layer.get("name") or "")
    return LayerFact(kind, name, config, custom)


def _layers(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The layers of a model's description, breadth-first, nested models' layers after."""
    pending = [model]
    while pending:
        current = pending.pop(0)
        for layer in (current.get("config") or {}).get("layers") or ():
            yield layer
            if layer.get("class_name") in _MODEL_CLASSES:
                pending.append(layer)


def _endpoints(value: Any) -> list[list[Any]]:
    """``input_layers``/``output_layers`` as a list of ``[name, node, tensor]``."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [value]
    return [v for v in value or () if isinstance(v, list)]


def _by_name(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    layers = (model.get("config") or {}).get("layers") or ()
    return {str(layer.get("name") or layer["config"].get("name")): layer for layer in layers}


def _shape(value: Any) -> tuple[int | None, ...] | None:
    if isinstance(value, list) and all(v is None or isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _input(model: dict[str, Any]) -> tuple[int | None, tuple[int | None, ...] | None]:
    """The number of inputs and the single input's shape."""
    config = model.get("config") or {}
    layers = config.get("layers") or []
    if model.get("class_name") == "Sequential":
        first = layers[0] if layers else {}
        first_config = first.get("config") or {}
        shape = (
            _shape(first_config.get("batch_shape"))
            or _shape(first_config.get("batch_input_shape"))
            or _shape(config.get("build_input_shape"))
            or _shape((first.get("build_config") or {}).get("input_shape"))
        )
        return 1, shape
    if model.get("class_name") not in _MODEL_CLASSES:
        return None, None
    ends = _endpoints(config.get("input_layers"))
    if len(ends) != 1:
        return len(ends) or None, None
    layer = _by_name(model).get(str(ends[0][0])) or {}
    layer_config = layer.get("config") or {}
    shape = _shape(layer_config.get("batch_shape")) or _shape(layer_config.get("batch_input_shape"))
    return 1, shape


def _output(model: dict[str, Any]) -> tuple[int | None, int | None]:
    """The number of outputs and the single output's size."""
    config = model.get("config") or {}
    layers = config.get("layers") or []
    if model.get("class_name") == "Sequential":
        return (1, _units_back(layers, len(layers) - 1)) if layers else (None, None)
    if model.get("class_name") not in _MODEL_CLASSES:
        return None, None
    ends = _endpoints(config.get("output_layers"))
    if len(ends) != 1:
        return len(ends) or None, None
    layer = _by_name(model).get(str(ends[0][0]))
    return 1, None if layer is None else _units(layer)


def _units(layer: dict[str, Any]) -> int | None:
    """The last-axis size of a layer's output, when its description says it."""
    kind = layer.get("class_name")
    config = layer.get("config") or {}
    if kind in ("Dense", _SNGP_HEAD) and isinstance(config.get("units"), int):
        return config["units"]
    if kind in _MODEL_CLASSES:
        outputs, units = _output(layer)
        return units if outputs == 1 else None
    if kind in _SAME_LAST_AXIS:
        return _input_last_axis(layer)
    return None


def _units_back(layers: list[dict[str, Any]], index: int) -> int | None:
    """The output size of layer ``index`` of a Sequential, looking back through layers that
    keep the last axis."""
    while index >= 0:
        layer = layers[index]
        if layer.get("class_name") not in _SAME_LAST_AXIS:
            return _units(layer)
        found = _input_last_axis(layer)
        if found is not None:
            return found
        index -= 1
    return None


def _input_last_axis(layer: dict[str, Any]) -> int | None:
    """The last axis of a layer's input, from its inbound node or its build config."""
    for node in layer.get("inbound_nodes") or ():
        args = node.get("args") if isinstance(node, dict) else None
        if args and isinstance(args[0], dict):
            shape = _shape((args[0].get("config") or {}).get("shape"))
            if shape:
                return shape[-1]
    shape = _shape((layer.get("build_config") or {}).get("input_shape"))
    return shape[-1] if shape else None
