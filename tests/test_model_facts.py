"""``model_facts`` reads from a model file what the loaded model says, without TensorFlow, or
says it does not know."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import pytest
from conftest import REPO

from batchuq.model_facts import read_model_facts
from batchuq.models import load_model, preprocessing_layer
from batchuq.sampling.dropout import find_dropout_layers


def _sequential_softmax_activation() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((10, 12, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2, name="drop"),
            keras.layers.Dense(7),
            keras.layers.Activation("softmax"),
        ]
    )


def _functional_grayscale() -> keras.Model:
    inputs = keras.Input((28, 28))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.GaussianDropout(0.1, name="gauss")(x)
    x = keras.layers.Dense(4)(x)
    return keras.Model(inputs, keras.layers.Softmax()(x))


def _nested() -> keras.Model:
    inner = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)], name="inner")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inner(inputs))
    x = keras.layers.Dropout(0.3)(x)
    return keras.Model(inputs, keras.layers.Dense(6, activation="softmax")(x))


@pytest.mark.parametrize(
    ("build", "suffix"),
    [
        (_sequential_softmax_activation, ".keras"),
        (_functional_grayscale, ".keras"),
        (_nested, ".keras"),
        (_sequential_softmax_activation, ".h5"),
    ],
)
def test_facts_agree_with_the_loaded_model(tmp_path: Path, build, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    build().save(path)
    facts = read_model_facts(path)
    loaded = load_model(path)
    assert facts.num_classes == loaded.num_classes
    assert facts.input_shape == tuple(loaded.model.inputs[0].shape)
    assert (facts.inputs, facts.outputs) == (1, 1)
    dropout = facts.dropout_layers()
    if dropout is not None:  # unknown for nested models: left to the loaded model
        assert dropout == [layer.name for layer in find_dropout_layers(loaded.model)]
    scales = facts.scales_pixels()
    if scales is not None:
        assert scales == (preprocessing_layer(loaded.model) is not None)
    assert facts.sngp is False


def test_custom_layers_are_unknown_not_refused(tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="facts_test")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(Twice()(inputs))
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(tmp_path / "custom.keras")
    facts = read_model_facts(tmp_path / "custom.keras")
    assert facts.num_classes == 3 and facts.opaque
    assert facts.dropout_layers() is None and facts.sngp is None


def test_reading_facts_imports_no_tensorflow() -> None:
    code = (
        "import sys; from batchuq.model_facts import read_model_facts; "
        "f = read_model_facts('batchuq/data/digits_cnn.keras'); "
        "print(f.num_classes, 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["10", "False", "False"]


def test_only_lambda_bytecode_counts_as_code(tmp_path: Path) -> None:
    """Safe mode refuses a Lambda layer holding a Python lambda, not one naming a registered
    function: the early check refuses the first only."""

    @keras.saving.register_keras_serializable(package="facts_test")
    def double(x):
        return x * 2

    for name, function in (("named", double), ("lambda", lambda x: x * 2)):
        inputs = keras.Input((4,))
        keras.Model(inputs, keras.layers.Lambda(function)(inputs)).save(tmp_path / f"{name}.keras")
    assert not read_model_facts(tmp_path / "named.keras").has_lambda
    load_model(tmp_path / "named.keras")  # loads in safe mode
    assert read_model_facts(tmp_path / "lambda.keras").has_lambda
