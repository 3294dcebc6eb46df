"""`batchuq train`: the reference CNN, a saved model with its sidecar, usable by `score`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from batchuq.cli import cli
from batchuq.decode import ImageSpec
from batchuq.jobs.train import reference_cnn
from batchuq.models import load_model, read_sidecar


def test_reference_cnn_architecture() -> None:
    model = reference_cnn(ImageSpec(128, 128, 3), 10)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Dropout",
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Dropout",
        "Flatten", "Dense", "Dropout", "Dense",
    ]  # fmt: skip
    assert [layer.rate for layer in model.layers if hasattr(layer, "rate")] == [0.5, 0.5, 0.3]
    assert model.layers[-1].units == 10 and model.layers[-3].units == 512


def test_train_writes_model_and_sidecar_that_score_uses(
    digits_subset: Path, tmp_path: Path
) -> None:
    model_path = tmp_path / "tiny.keras"
    result = CliRunner().invoke(
        cli,
        ["train", str(digits_subset), str(model_path), "--epochs", "1", "--image-size", "46",
         "--channels", "1", "--val-split", "0.2"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    assert read_sidecar(model_path)["class_names"] == [f"n{i}" for i in range(10)]
    assert load_model(model_path).image_spec == ImageSpec(46, 46, 1)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        cli, ["score", str(digits_subset), str(out), "-m", str(model_path), "-T", "3",
              "--no-progress"], catch_exceptions=False
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean_n9" in pd.read_parquet(out).columns


def test_train_needs_two_classes(tmp_path: Path) -> None:
    from conftest import write_image

    write_image(tmp_path / "only" / "a.png")
    result = CliRunner().invoke(cli, ["train", str(tmp_path), str(tmp_path / "m.keras")])
    assert result.exit_code == 2 and "at least two class" in result.output


@pytest.mark.parametrize("name", ["model.h5", "model"])
def test_train_refuses_non_keras_path(digits_subset: Path, tmp_path: Path, name: str) -> None:
    result = CliRunner().invoke(cli, ["train", str(digits_subset), str(tmp_path / name)])
    assert result.exit_code == 2 and ".keras" in result.output


def test_train_members_writes_an_ensemble_that_score_reads_in_order(
    digits_subset: Path, tmp_path: Path
) -> None:
    import json

    import numpy as np

    from batchuq.decode import load_image
    from batchuq.models import file_sha256
    from batchuq.output.schema import read_metadata

    folder = tmp_path / "ens"
    result = CliRunner().invoke(
        cli,
        ["train", str(digits_subset), str(folder), "--members", "2", "--epochs", "1",
         "--image-size", "46", "--channels", "1", "--val-split", "0"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((folder / "ensemble.json").read_text())
    assert [m["file"] for m in manifest["members"]] == ["member-0.keras", "member-1.keras"]
    assert [m["sha256"] for m in manifest["members"]] == [
        file_sha256(folder / f"member-{i}.keras") for i in range(2)
    ]
    assert manifest["seeds"] == [0, 1] and manifest["class_names"] == [f"n{i}" for i in range(10)]

    out = tmp_path / "ens.parquet"
    result = CliRunner().invoke(
        cli, ["score", str(digits_subset), str(out), "--model", str(folder), "--passes", "1",
              "--no-progress"], catch_exceptions=False
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = read_metadata(out)
    assert metadata["method"] == "deep_ensemble" and metadata["samples_per_image"] == 2
    assert [m["name"] for m in metadata["members"]] == ["member-0.keras", "member-1.keras"]
    # --passes 1: the mean of the members' own model.predict, to float32 rounding.
    frame = pd.read_parquet(out)
    members = [load_model(folder / f"member-{i}.keras") for i in range(2)]
    spec = members[0].image_spec
    pixels = (
        np.stack([load_image(str(digits_subset / p), spec) for p in frame["path"]]).astype(
            np.float32
        )
        / 255.0
    )
    expected = np.mean([m.model.predict(pixels, verbose=0) for m in members], axis=0)
    mean = frame[[f"mean_n{i}" for i in range(10)]].to_numpy()
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)

    # The same members named one by one give the same rows.
    again = tmp_path / "again.parquet"
    result = CliRunner().invoke(
        cli, ["score", str(digits_subset), str(again), "-m", str(folder / "member-0.keras"),
              "-m", str(folder / "member-1.keras"), "--passes", "1", "--no-progress"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_parquet(again), frame)
