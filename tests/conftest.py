"""Shared fixtures: small real models and image folders made on the fly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TEST = REPO / "sample_data" / "digits" / "test"


def bn_dropout_model(classes: int = 3, size: int = 16, seed: int = 1) -> keras.Model:
    """Functional model with BatchNormalization, a residual branch and a baked-in dropout."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    branch = keras.layers.Dropout(0.3, name="branch_dropout")(x, training=True)
    branch = keras.layers.Conv2D(8, 3, padding="same", name="conv_b")(branch)
    x = keras.layers.Add(name="residual")([x, branch])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dropout(0.2, name="head_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    # Non-trivial moving statistics, so that using batch statistics would show.
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(0.1, 0.5, 8).astype("float32"))
    bn.moving_variance.assign(np.linspace(1.5, 2.5, 8).astype("float32"))
    return model


@pytest.fixture
def bn_model() -> keras.Model:
    return bn_dropout_model()


def write_image(path: Path, size: int = 20, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)
    return path


@pytest.fixture
def digits_subset(tmp_path: Path) -> Path:
    """Three test images of each digit from the bundled sample data (30 images)."""
    root = tmp_path / "digits"
    for folder in sorted(SAMPLE_TEST.iterdir()):
        for image in sorted(folder.iterdir())[:3]:
            (root / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / folder.name / image.name)
    return root
