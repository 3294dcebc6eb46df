"""Models from elsewhere: .h5 files, custom layers via --import, (batch, H, W) inputs, model-side
rescaling, and class names given on the command line."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, SAMPLE_TEST, bn_dropout_model, write_image

from batchuq import score_directory
from batchuq.decode import ImageSpec, load_image
from batchuq.jobs.score import ScoreOptions
from batchuq.models import ModelError, load_model, preprocessing_layer
from batchuq.output.schema import read_metadata

# The docs' wrap-and-register recipe (docs/folders-and-models.md), verbatim in spirit: a
# subclassed model registered with Keras, wrapped in a functional model so that batchuq knows
# its input shape.
MYNET = """
import keras


@keras.saving.register_keras_serializable(package="mynet")
class MyNet(keras.Model):
    def __init__(self, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.conv = keras.layers.Conv2D(8, 3, activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dropout = keras.layers.Dropout(0.3)
        self.head = keras.layers.Dense(classes, activation="softmax")

    def call(self, x, training=False):
        return self.head(self.dropout(self.pool(self.conv(x)), training=training))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}
"""

WRAP = """
import keras
import mynet

inputs = keras.Input((16, 16, 3))
wrapped = keras.Model(inputs, mynet.MyNet(3)(inputs))
wrapped.save("mynet.keras")
"""

BATCHUQ = Path(sys.executable).parent / "batchuq"


def _rgb_folder(folder: Path, count: int = 4, size: int = 16) -> Path:
    for i in range(count):
        write_image(folder / f"img{i}.png", size=size, seed=i)
    return folder


def test_h5_model_scores_like_its_keras_twin(tmp_path: Path) -> None:
    model = bn_dropout_model()
    model.save(tmp_path / "m.h5")
    model.save(tmp_path / "m.keras")
    images = _rgb_folder(tmp_path / "imgs")
    frames = {}
    for suffix in ("h5", "keras"):
        out = tmp_path / f"{suffix}.parquet"
        score_directory(
            images, out, ScoreOptions(model=tmp_path / f"m.{suffix}", passes=8, rescale=1 / 255)
        )
        frames[suffix] = out
    import pandas as pd

    h5, ks = (pd.read_parquet(frames[s]) for s in ("h5", "keras"))
    columns = [c for c in h5.columns if c.startswith(("mean_", "std_"))]
    np.testing.assert_array_equal(h5[columns].to_numpy(), ks[columns].to_numpy())  # same run
    assert (h5[columns[-1]] > 0).all()  # dropout is still sampled after the .h5 round trip


def test_unloadable_h5_gets_a_conversion_hint(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "broken.h5", "w") as handle:
        handle.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ModelError, match=r"convert it once.*\.save\('.*broken\.keras'\)"):
        load_model(tmp_path / "broken.h5")


def test_import_registers_a_wrapped_subclassed_model_for_the_cli(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET)
    (tmp_path / "wrap.py").write_text(WRAP)
    subprocess.run([sys.executable, "wrap.py"], cwd=tmp_path, check=True, capture_output=True)
    _rgb_folder(tmp_path / "imgs")
    command = [str(BATCHUQ), "score", "imgs", "out.parquet", "-m", "mynet.keras", "--no-progress"]
    refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "--import MODULE" in refused.stderr
    done = subprocess.run(
        [*command, "--import", "mynet", "-T", "10"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert len(frame) == 4 and (frame.filter(like="std_").to_numpy() > 0).all()


def test_height_width_input_model_is_scored_as_one_channel(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((28, 28))  # as MNIST examples write it: no channel axis
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    images = tmp_path / "digits"
    for path in sorted((SAMPLE_TEST / "n4").iterdir())[:3]:
        images.mkdir(exist_ok=True)
        shutil.copy(path, images / path.name)
    out = tmp_path / "out.parquet"
    score_directory(images, out, ScoreOptions(model=model, passes=1))
    import pandas as pd

    got = pd.read_parquet(out).filter(like="mean_").to_numpy()
    spec = ImageSpec(28, 28, 1)
    pixels = np.stack([load_image(str(p), spec)[..., 0] for p in sorted(images.iterdir())])
    expected = model.predict(pixels.astype("float32") / 255, verbose=0)
    np.testing.assert_allclose(got, expected, atol=1e-6)  # float32 rounding, batch order


def _self_rescaling_model(nested: bool) -> keras.Model:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255, name="to_unit")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    backbone = keras.Model(inputs, x, name="backbone")
    if not nested:
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(backbone.output))
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            backbone,
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_preprocessing_layer_is_found_in_nested_models() -> None:
    assert preprocessing_layer(_self_rescaling_model(nested=False)) == "to_unit"
    assert preprocessing_layer(_self_rescaling_model(nested=True)) == "backbone/to_unit"
    assert preprocessing_layer(bn_dropout_model()) is None


def test_model_that_rescales_itself_gets_raw_pixels(tmp_path: Path, caplog) -> None:
    model = _self_rescaling_model(nested=True)
    model.save(tmp_path / "self_rescaling.keras")
    images = _rgb_folder(tmp_path / "imgs")
    out = tmp_path / "out.parquet"
    with caplog.at_level(logging.WARNING, logger="batchuq"):
        score_directory(
            images, out, ScoreOptions(model=tmp_path / "self_rescaling.keras", passes=1)
        )
    assert "scales pixels itself" in caplog.text
    meta = read_metadata(out)
    assert meta["rescale"] == 1.0 and meta["rescale_source"] == "model layer backbone/to_unit"
    import pandas as pd

    got = pd.read_parquet(out).filter(like="mean_").to_numpy()
    spec = ImageSpec(16, 16, 3)
    pixels = np.stack([load_image(str(p), spec) for p in sorted(images.iterdir())])
    expected = model.predict(pixels.astype("float32"), verbose=0)  # 0..255: the model scales
    np.testing.assert_allclose(got, expected, atol=1e-6)
    score_directory(
        images, out, ScoreOptions(model=tmp_path / "self_rescaling.keras", passes=1, rescale=0.5)
    )
    assert read_metadata(out)["rescale_source"] == "option"  # an explicit value wins


def test_class_names_option_overrides_sidecar_with_a_warning(
    digits_subset: Path, tmp_path: Path, caplog
) -> None:
    names = [f"digit_{i}" for i in range(10)]
    out = tmp_path / "out.parquet"
    with caplog.at_level(logging.WARNING, logger="batchuq"):
        score_directory(digits_subset, out, ScoreOptions(passes=2, class_names=names))
    assert "overrides the names in the model's sidecar" in caplog.text
    assert "n0,n1" in caplog.text and "digit_0,digit_1" in caplog.text
    meta = read_metadata(out)
    assert meta["class_names"] == names and meta["class_names_source"] == "option"


def test_docs_show_the_recipe_this_test_runs() -> None:
    readme = (REPO / "docs" / "folders-and-models.md").read_text(encoding="utf-8")
    assert MYNET.strip() in readme and WRAP.strip() in readme
    assert "--import mynet" in readme
