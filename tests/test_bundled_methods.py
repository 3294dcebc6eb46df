"""The bundled deep ensemble and SNGP model: they load, run, and behave as their methods say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import ROUNDING

import batchuq
from batchuq import score_directory
from batchuq.decode import load_image
from batchuq.jobs.score import ScoreOptions
from batchuq.models import file_sha256, load_models
from batchuq.output.schema import read_metadata

DATA = Path(batchuq.__file__).parent / "data"
ENSEMBLE = DATA / "digits_ensemble"
NAMES = [f"n{i}" for i in range(10)]


def test_bundled_ensemble_loads_its_members_in_manifest_order() -> None:
    manifest = json.loads((ENSEMBLE / "ensemble.json").read_text())
    members = load_models(ENSEMBLE)
    assert [m.path.name for m in members] == [f"member-{i}.keras" for i in range(5)]
    assert [m.sha256 for m in members] == [e["sha256"] for e in manifest["members"]]
    assert [file_sha256(m.path) for m in members] == [m.sha256 for m in members]
    assert load_models([ENSEMBLE])[2].path == members[2].path  # the same order every time
    assert {m.image_spec for m in members} == {members[0].image_spec}
    assert all(m.sidecar["class_names"] == NAMES for m in members)
    # They are different networks (seeds 1-5), not copies.
    assert len({m.sha256 for m in members}) == 5


def test_bundled_ensemble_with_one_pass_is_the_mean_of_the_members_predictions(
    digits_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ens.parquet"
    report = score_directory(
        digits_subset, out, ScoreOptions(model=ENSEMBLE, passes=1, batch_size=7)
    )
    assert report.errors == 0
    metadata = read_metadata(out)
    assert metadata["method"] == "deep_ensemble" and metadata["samples_per_image"] == 5
    frame = pd.read_parquet(out)
    members = load_models(ENSEMBLE)
    spec = members[0].image_spec
    pixels = np.stack([load_image(str(digits_subset / p), spec) for p in frame["path"]])
    pixels = pixels.astype(np.float32) * members[0].sidecar["rescale"]
    expected = np.mean([m.model.predict(pixels, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(frame[[f"mean_{n}" for n in NAMES]].to_numpy(), expected, **ROUNDING)


SNGP_MODEL = DATA / "digits_sngp.keras"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _pixels(paths: list[Path], loaded) -> np.ndarray:
    spec = loaded.image_spec
    return (
        np.stack([load_image(str(p), spec) for p in paths]).astype(np.float32)
        * loaded.sidecar["rescale"]
    )


def test_bundled_sngp_model_is_detected_and_scores_the_test_set(tmp_path: Path) -> None:
    from batchuq.sngp import is_sngp_model, iter_spectral_norms

    (loaded,) = load_models(SNGP_MODEL)  # safe mode: the GP layers are registered by batchuq
    assert is_sngp_model(loaded.model)
    for name, norm, bound in iter_spectral_norms(loaded.model):
        assert norm <= bound + 1e-5, name  # every bounded layer within its bound after training
    out = tmp_path / "sngp.parquet"
    score_directory(SAMPLE / "digits" / "test", out, ScoreOptions(model=SNGP_MODEL, passes=1))
    metadata = read_metadata(out)
    assert metadata["method"] == "sngp" and metadata["lambda"] == np.pi / 8
    frame = pd.read_parquet(out)
    assert (frame["pred"] == frame["label"]).mean() >= 0.95
    assert (frame[[f"std_{n}" for n in NAMES]].to_numpy() == 0).all()  # mean-field: one sample


def test_bundled_sngp_posterior_variance_is_larger_on_ood_than_on_the_test_digits() -> None:
    from batchuq.methods.sngp import SNGP

    (loaded,) = load_models(SNGP_MODEL)
    method = SNGP(loaded.model)
    test = sorted((SAMPLE / "digits" / "test").rglob("*.png"))
    ood = sorted((SAMPLE / "ood").iterdir())
    variance = [
        np.asarray(
            method.head.mean_and_variance(
                method.features(_pixels(paths, loaded)), method.covariance
            )[1]
        ).mean()
        for paths in (test, ood)
    ]
    assert variance[1] > variance[0]
