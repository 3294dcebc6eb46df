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
from batchuq.metrics import auroc
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
# The bundled model's GP-variance AUROC, OOD crops against test digits, is 0.9976: the floor
# leaves room for other CPUs' rounding (0.97 still allows one of the 40 crops ranked below all
# 450 digits).
AUROC_FLOOR = 0.97
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
        assert norm <= bound, name  # every bounded layer within its bound after training
    out = tmp_path / "sngp.parquet"
    score_directory(SAMPLE / "digits" / "test", out, ScoreOptions(model=SNGP_MODEL, passes=1))
    metadata = read_metadata(out)
    assert metadata["method"] == "sngp" and metadata["lambda"] == np.pi / 8
    frame = pd.read_parquet(out)
    assert (frame[[f"std_{n}" for n in NAMES]].to_numpy() == 0).all()  # mean-field: one sample

    # Against the reference CNN it is built on (the bundled demo model, its deterministic pass
    # over the same test digits): 96.0% against 98.0%. The goal was within one point; what
    # holds is within 2.5 (docs/methods.md, "SNGP's network": a linear read-out of the same
    # features reaches 98.0%, the random-feature GP head loses the rest).
    sngp_accuracy = (frame["pred"] == frame["label"]).mean()
    (reference,) = load_models(DATA / "digits_cnn.keras")
    paths = [SAMPLE / "digits" / "test" / p for p in frame["path"]]
    probs = reference.model.predict(_pixels(paths, reference), verbose=0)
    reference_accuracy = (np.asarray(NAMES)[probs.argmax(axis=1)] == frame["label"]).mean()
    assert sngp_accuracy >= reference_accuracy - 0.025, (sngp_accuracy, reference_accuracy)


def test_bundled_sngp_posterior_variance_tells_ood_crops_from_test_digits() -> None:
    """The GP variance alone separates the 40 photo crops of ``sample_data/ood`` from the 450
    test digits: AUROC 0.9976 for this model, 0.60 for the model before issue 21 (whose
    convolutions were not bounded as operators, nor its blocks built to keep distances)."""
    from batchuq.methods.sngp import SNGP

    (loaded,) = load_models(SNGP_MODEL)
    method = SNGP(loaded.model)
    test = sorted((SAMPLE / "digits" / "test").rglob("*.png"))
    ood = sorted((SAMPLE / "ood").iterdir())
    variance = [method.variance(_pixels(paths, loaded)) for paths in (test, ood)]
    labels = np.r_[np.zeros(len(test), bool), np.ones(len(ood), bool)]
    assert auroc(np.concatenate(variance), labels) >= AUROC_FLOOR
    # The mean-field factor 1 / sqrt(1 + pi/8 v) then tempers the OOD crops' logits more.
    assert np.median(variance[1]) > 2 * np.median(variance[0])
