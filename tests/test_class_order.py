"""Class order as the model was trained: models trained by Keras's own loader score their own
accuracy under ``batchuq score``'s default options.

``keras.utils.image_dataset_from_directory`` numbers class folders in ``sorted()`` order
(``n0, n1, n10, n2 ...``). Each dataset below is trained that way, with no sidecar, and scored
with default options: the accuracy of ``batchuq score`` must be the one ``model.evaluate`` gives
on the loader's dataset. Folders whose natural and sorted orders differ (11 ``n*`` folders, 12
``class_*`` folders) get a notice naming the order used; 100 ImageNet-style synset folders, whose
orders agree, get none.

Each class is one bright pixel at its own place in a 12x12 image (plus a little noise), so that
a tiny dense network with a Dropout layer learns it in a few epochs.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from batchuq.cli import cli

SIZE = 12
PER_CLASS = 3


def _write_dataset(root, names: list[str], seed: int) -> None:
    """Class ``i`` of ``names`` (Keras's order) lights pixel ``i`` of the 12x12 grid."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(sorted(names)):
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            pixels = rng.integers(0, 30, size=(SIZE, SIZE, 3), dtype=np.uint8)
            pixels[index // SIZE, index % SIZE] = 255
            Image.fromarray(pixels).save(folder / f"img{k}.png")


def _train(root, classes: int, seed: int) -> tuple[keras.Model, float]:
    """A model trained on Keras's loader, and ``model.evaluate``'s accuracy on that dataset."""
    keras.utils.set_random_seed(seed)
    dataset = keras.utils.image_dataset_from_directory(
        root, image_size=(SIZE, SIZE), batch_size=32, label_mode="categorical", shuffle=False
    )
    assert len(dataset.class_names) == classes
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(0.1)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.003), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(dataset.shuffle(512, seed=seed), epochs=40, verbose=0, shuffle=False)
    _, accuracy = model.evaluate(dataset, verbose=0)
    return model, float(accuracy)


DATASETS = {
    "11 n-folders": ([f"n{i}" for i in range(11)], True),
    "12 class_ folders": ([f"class_{i}" for i in range(1, 13)], True),
    "100 synsets": ([f"n{1440764 + 7919 * i:08d}" for i in range(100)], False),
}


@pytest.fixture(scope="module", params=list(DATASETS))
def trained(request, tmp_path_factory) -> dict:
    names, orders_differ = DATASETS[request.param]
    root = tmp_path_factory.mktemp("classes")
    images = root / "images"
    _write_dataset(images, names, seed=len(names))
    model, accuracy = _train(images, len(names), seed=len(names))
    model.save(root / "model.keras")
    return {
        "root": root,
        "images": images,
        "names": names,
        "orders_differ": orders_differ,
        "keras_accuracy": accuracy,
    }


def _score(trained: dict, *extra: str):
    out = trained["root"] / f"out{len(extra)}.parquet"
    args = ["score", str(trained["images"]), str(out), "-m", str(trained["root"] / "model.keras")]
    result = CliRunner().invoke(cli, [*args, "--no-progress", *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out), result.stderr


def test_score_gives_keras_accuracy_with_default_options(trained: dict) -> None:
    assert trained["keras_accuracy"] >= 0.95  # the model learnt its classes
    frame, stderr = _score(trained)
    assert frame["label_index"].notna().all()
    accuracy = float((frame["pred_index"] == frame["label_index"]).mean())
    print(
        f"{len(trained['names'])} classes: model.evaluate {trained['keras_accuracy']:.3f}, "
        f"batchuq score {accuracy:.3f}, notice {'numbered in keras order' in stderr}"
    )
    # MC dropout's mean may flip an image the deterministic pass gets right (or wrong).
    assert accuracy == pytest.approx(trained["keras_accuracy"], abs=0.02)
    names = sorted(trained["names"])  # label_index is Keras's class index
    assert [names[i] for i in frame["label_index"]] == frame["label"].tolist()
    notice = "numbered in keras order"
    assert (notice in stderr) == trained["orders_differ"], stderr
    if trained["orders_differ"]:
        assert stderr.count(notice) == 1 and "--class-order natural" in stderr


def test_natural_order_is_an_option(trained: dict) -> None:
    """--class-order natural numbers the folders naturally: for these Keras-trained models
    that shifts most classes where the orders differ, and changes nothing where they agree."""
    frame, stderr = _score(trained, "--class-order", "natural", "--passes", "1")
    accuracy = float((frame["pred_index"] == frame["label_index"]).mean())
    print(f"{len(trained['names'])} classes, --class-order natural: accuracy {accuracy:.3f}")
    if trained["orders_differ"]:
        assert accuracy < 0.5  # the wrong order for this model: most classes shifted
        assert "numbered in natural order" in stderr and "--class-order keras" in stderr
    else:
        assert accuracy >= 0.95 and "numbered in" not in stderr


def _untrained(path, classes: int) -> None:
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Dropout(0.1)(keras.layers.Flatten()(inputs))
    keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x)).save(path)


def test_folders_that_do_not_fit_the_outputs_need_allow_class_mismatch(tmp_path) -> None:
    """5 outputs, 10 labelled folders, nothing naming the outputs: refused before any scoring;
    --allow-class-mismatch scores them (for OOD), every label_index null."""
    from batchuq.errors import ClassMismatchError
    from batchuq.jobs.score import ScoreOptions, score_directory

    _write_dataset(tmp_path / "images", [f"n{i}" for i in range(10)], seed=0)
    _untrained(tmp_path / "five.keras", 5)
    out = tmp_path / "out.parquet"
    with pytest.raises(ClassMismatchError, match="5 outputs .* 10 class folders"):
        score_directory(
            tmp_path / "images", out, ScoreOptions(model=tmp_path / "five.keras", passes=2)
        )
    assert not out.exists()
    score_directory(
        tmp_path / "images",
        out,
        ScoreOptions(model=tmp_path / "five.keras", passes=2, allow_class_mismatch=True),
    )
    frame = pd.read_parquet(out)
    assert len(frame) == 30 and frame["label_index"].isna().all()
    assert frame["label"].notna().all()
