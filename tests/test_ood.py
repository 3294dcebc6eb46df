"""OOD scores: max-logit, energy, SNGP's GP variance, the kNN distance, AUROC and FPR@95."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, ROUNDING, bn_dropout_model
from sklearn.metrics import roc_auc_score, roc_curve

from batchuq import score_directory
from batchuq.decode import ImageSpec, load_image
from batchuq.errors import CalibrationError
from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory
from batchuq.jobs.compare import compare_files, format_comparison
from batchuq.jobs.evaluate import evaluate_parquet
from batchuq.jobs.score import ScoreOptions
from batchuq.methods.mc_dropout import MCDropout
from batchuq.methods.sngp import SNGP
from batchuq.models import load_model
from batchuq.output.schema import OOD_COLUMNS
from batchuq.postprocess.calibration_file import Calibration
from batchuq.postprocess.ood import default_k, fit_knn, fpr_at_tpr, knn_side_path, ood_metrics
from batchuq.sampling.sampler import MCSampler

DATA = REPO / "batchuq" / "data"
SPEC = ImageSpec(64, 64, 1)
OOD = REPO / "sample_data" / "ood"


def _pixels(folder: Path) -> tuple[list[str], np.ndarray]:
    """Relative paths and decoded, rescaled images of a folder, in path order."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    images = np.stack([load_image(str(p), SPEC).astype(np.float32) / 255.0 for p in paths])
    return [p.relative_to(folder).as_posix() for p in paths], images


def _numpy_logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The last Dense layer's pre-activation, its input from Keras, the product in NumPy."""
    dense = model.layers[-1]
    features = keras.Model(model.inputs[0], dense.input)(images).numpy().astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in dense.get_weights())
    return features @ kernel + bias


def test_max_logit_and_energy_columns_equal_numpy_from_the_models_logits(
    digits_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    score_directory(digits_subset, out, ScoreOptions(model=DATA / "digits_cnn.keras", passes=1))
    frame = pd.read_parquet(out).set_index("path")
    assert [c for c in frame.columns if c in OOD_COLUMNS] == ["max_logit", "energy"]
    paths, images = _pixels(digits_subset)
    model = keras.saving.load_model(DATA / "digits_cnn.keras")
    logits = _numpy_logits(model, images)
    top = logits.max(axis=1)
    energy = -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))
    np.testing.assert_allclose(frame.loc[paths, "max_logit"], top, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frame.loc[paths, "energy"], energy, rtol=1e-5, atol=1e-5)


def test_extras_are_means_over_the_same_passes_whatever_the_head() -> None:
    """max_logit + energy = log max_c p_c of a pass, so their means over the passes can be
    recomputed from the probabilities of those passes: the extras saw the same masks."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    hidden = keras.layers.Dropout(0.4)(hidden)
    logits = keras.layers.Dense(4)(hidden)
    heads = {
        "softmax layer": keras.Model(inputs, keras.layers.Softmax()(logits)),
        "logits output": keras.Model(inputs, logits),
        "dense softmax": bn_dropout_model(classes=4, size=8),
    }
    rng = np.random.default_rng(0)
    for name, model in heads.items():
        shape = (6, *model.inputs[0].shape[1:])
        rows = rng.normal(size=shape).astype(np.float32)
        method = MCDropout(model, passes=7, logits=name == "logits output")
        assert method.extras == ("max_logit", "energy", "features"), name
        probs, extras = method.sample_with_extras(rows, np.arange(6, dtype=np.uint32))
        by_hand = np.log(probs.max(axis=2).astype(np.float64)).mean(axis=1)
        np.testing.assert_allclose(extras["max_logit"] + extras["energy"], by_hand, atol=2e-5)
        assert extras["features"].shape == (6, 16), name
        # Adaptive: the same passes drawn in rounds give the same means.
        prepared = method.prepare(rows, np.arange(6, dtype=np.uint32))
        method.sample_passes(prepared, np.arange(6), 0, 3)
        method.sample_passes(prepared, np.arange(6), 3, 4)
        for key, value in method.prepared_extras(prepared).items():
            np.testing.assert_allclose(value, extras[key], rtol=1e-5, atol=1e-5)


def test_adaptive_runs_write_the_means_over_each_images_own_passes(
    digits_subset: Path, tmp_path: Path
) -> None:
    """With --passes auto an image's extras are means over the passes it got: the identity
    max_logit + energy = mean over passes of log max_c p_c holds on its saved samples."""
    out = tmp_path / "auto.parquet"
    options = ScoreOptions(passes="auto", max_passes=40, save_samples=True, tta=2, seed=5)
    score_directory(digits_subset, out, options)
    frame = pd.read_parquet(out)
    assert frame["passes"].nunique() > 1  # images stopped after different rounds
    for (_, row), samples in zip(frame.iterrows(), frame["samples"], strict=True):
        probs = np.stack(samples).astype(np.float64)  # (K * passes, classes), copy-major
        per_copy = np.log(probs.max(axis=1)).reshape(2, -1).mean(axis=1)
        assert row["max_logit"] + row["energy"] == pytest.approx(per_copy.mean(), abs=5e-5)


def test_an_ensembles_extras_average_scalars_and_join_unit_features() -> None:
    from batchuq.methods.ensemble import DeepEnsemble

    member = bn_dropout_model(classes=4, size=8)
    rows = np.random.default_rng(2).normal(size=(5, 8, 8, 3)).astype(np.float32)
    keys = np.arange(5, dtype=np.uint32)
    _, alone = MCDropout(member, passes=1).sample_with_extras(rows, keys)
    _, pair = DeepEnsemble([member, member], passes=1).sample_with_extras(rows, keys)
    np.testing.assert_allclose(pair["max_logit"], alone["max_logit"], rtol=1e-6)
    np.testing.assert_allclose(pair["energy"], alone["energy"], rtol=1e-6)
    unit = alone["features"] / np.linalg.norm(alone["features"], axis=1, keepdims=True)
    np.testing.assert_allclose(
        pair["features"], np.concatenate([unit, unit], axis=1) / math.sqrt(2), atol=1e-6
    )


def test_a_model_without_a_found_head_has_no_extras() -> None:
    inputs = keras.Input((8,))
    probs = keras.layers.Dense(4, activation="softmax")(keras.layers.Dense(6)(inputs))
    pooled = keras.layers.Lambda(lambda x: x * 1.0)(probs)  # the softmax is not the last node
    assert MCSampler(keras.Model(inputs, pooled), 1).extras == ()


def test_gp_variance_column_equals_sngp_variance(digits_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "sngp.parquet"
    model_path = DATA / "digits_sngp.keras"
    score_directory(digits_subset, out, ScoreOptions(model=model_path))
    frame = pd.read_parquet(out).set_index("path")
    assert [c for c in frame.columns if c in OOD_COLUMNS] == ["max_logit", "energy", "gp_variance"]
    paths, images = _pixels(digits_subset)
    method = SNGP(load_model(model_path).model)
    np.testing.assert_allclose(frame.loc[paths, "gp_variance"], method.variance(images), **ROUNDING)
    hidden = method.features(images)
    logits = np.asarray(method.head.mean_and_variance(hidden, method.covariance)[0], np.float64)
    np.testing.assert_allclose(frame.loc[paths, "max_logit"], logits.max(axis=1), atol=1e-5)


def test_knn_distance_is_fitted_by_calibrate_and_written_by_score(
    digits_subset: Path, tmp_path: Path
) -> None:
    cal = tmp_path / "cal.json"
    model = DATA / "digits_cnn.keras"
    calibration = calibrate_directory(
        digits_subset, cal, CalibrateOptions(model=model, tta=1, score_passes=1)
    )
    assert calibration.knn is not None and calibration.knn.k == default_k(30) == 1
    entry = json.loads(cal.read_text())["knn"]
    assert entry["file"] == knn_side_path(cal).name and entry["images"] == 30
    assert entry["dim"] == 512
    options = ScoreOptions(model=model, passes=1, calibration=cal)
    inside, outside = tmp_path / "in.parquet", tmp_path / "ood.parquet"
    score_directory(digits_subset, inside, options)
    score_directory(OOD, outside, options)
    near = pd.read_parquet(inside)["knn_distance"].to_numpy()
    far = pd.read_parquet(outside)["knn_distance"].to_numpy()
    # k = 1 and every scored image is in the calibration set: its own features, up to float16.
    assert near.max() < 2e-3
    assert far.min() > 0.05
    # evaluate: every score both files hold, AUROC and FPR@95 as ood_metrics computes them.
    results = evaluate_parquet(inside, outside)["ood"]
    assert {"-max_logit", "energy", "knn_distance", "entropy"} <= set(results["auroc"])
    expected = ood_metrics(np.concatenate([near, far]), np.repeat([False, True], [30, 40]))
    assert results["auroc"]["knn_distance"] == pytest.approx(expected["auroc"]) == 1.0
    assert results["fpr95"]["knn_distance"] == pytest.approx(expected["fpr95"]) == 0.0
    table = format_comparison(compare_files([inside], ood=[outside]))
    assert re.search(r"knn_distance\s+1\.0000\s+0\.0000", table)


def test_the_knn_side_file_is_checked(digits_subset: Path, tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    calibration = calibrate_directory(
        digits_subset, cal, CalibrateOptions(model=DATA / "digits_cnn.keras", tta=1, score_passes=1)
    )
    loaded = Calibration.from_json(cal)
    np.testing.assert_allclose(loaded.knn.features, calibration.knn.features, atol=1e-3)
    side = knn_side_path(cal)
    data = dict(np.load(side))
    data["features"] = data["features"][::-1].copy()
    np.savez_compressed(side, **data)
    with pytest.raises(CalibrationError, match="sha256 differs"):
        Calibration.from_json(cal)
    side.unlink()
    with pytest.raises(CalibrationError, match="missing"):
        Calibration.from_json(cal)


def test_knn_distance_is_the_distance_to_the_kth_nearest_normalised_feature() -> None:
    rng = np.random.default_rng(1)
    bank, query = rng.normal(size=(40, 5)), rng.normal(size=(7, 5)) * 3
    index = fit_knn(bank, "sha", k=4)
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    by_hand = np.sort(np.linalg.norm(q[:, None] - unit[None], axis=2), axis=1)[:, 3]
    np.testing.assert_allclose(index.distances(query), by_hand, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_fpr95_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(20, 200, size=2)
    scores = np.round(rng.normal(size=n_in + n_out) + np.repeat([0, 1], [n_in, n_out]), 1)
    positives = np.repeat([False, True], [n_in, n_out])  # rounded: many ties
    found = ood_metrics(scores, positives)
    assert found["auroc"] == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(~positives, -scores, drop_intermediate=False)
    assert found["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert fpr_at_tpr(scores, positives) == found["fpr95"]
    assert math.isnan(fpr_at_tpr(scores[:n_in], positives[:n_in]))


def test_the_schema_page_describes_every_ood_column() -> None:
    page = (REPO / "docs" / "output-schema.md").read_text()
    for column in OOD_COLUMNS:
        assert re.search(rf"^\| `{column}`", page, re.MULTILINE), column
