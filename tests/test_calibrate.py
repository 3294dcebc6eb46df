"""Tests of ``batchuq.jobs.calibrate``: thresholds, temperature, conformal sets, the JSON file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from batchuq.cli import cli
from batchuq.cli.calibrate import calibrate_command
from batchuq.cli.runtime import EXIT_OK, EXIT_USAGE
from batchuq.errors import CalibrationError, UsageError
from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory
from batchuq.jobs.score import ScoreOptions
from batchuq.metrics import nll
from batchuq.output.schema import read_metadata
from batchuq.postprocess.calibration_file import (
    CALIBRATION_FORMAT,
    Calibration,
    CalibrationWarning,
    PredictorMismatchError,
    predictor_differences,
    predictor_from_metadata,
)
from batchuq.postprocess.conformal import (
    RAPS_LAMBDAS,
    conformal_level,
    conformal_quantiles,
    conformal_scores,
    fit_conformal,
    prediction_sets,
    raps_parameters,
    set_uniforms,
)
from batchuq.postprocess.rules import UNCLASSIFIED, SelectiveRule, threshold_decisions
from batchuq.postprocess.temperature import apply_temperature, fit_temperature
from batchuq.postprocess.thresholds import class_thresholds

REPO = Path(__file__).resolve().parents[1]
SAMPLE_VAL = REPO / "sample_data" / "digits" / "val"
SAMPLE_TEST = REPO / "sample_data" / "digits" / "test"


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sharpened_data(n: int, classes: int, true_t: float, seed: int) -> tuple[np.ndarray, ...]:
    """Labels drawn from softmax(z); the model reports softmax(z * T): over-confident by T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (n, classes))
    true = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in true])
    return softmax(logits * true_t), labels


# --- thresholds ---------------------------------------------------------------------------


def test_class_thresholds_are_numpy_percentiles_per_predicted_class() -> None:
    rng = np.random.default_rng(0)
    copy_probs = rng.dirichlet(np.ones(4) * 0.7, size=(6, 5))  # (n=6, K=5, C=4)
    copy_probs[..., 3] = 0.0  # class 3 is never predicted
    copy_probs /= copy_probs.sum(axis=-1, keepdims=True)
    flat = copy_probs.reshape(-1, 4)
    pred, conf = flat.argmax(axis=1), flat.max(axis=1)
    for q in (10.0, 50.0, 0.0, 100.0):
        got = class_thresholds(copy_probs, q)
        for c in range(3):
            assert got[c] == pytest.approx(np.percentile(conf[pred == c], q))
        assert np.isnan(got[3])


def test_class_thresholds_group_by_copy_prediction_not_image() -> None:
    # One image, two copies: one predicts class 0 (0.9), one predicts class 1 (0.6).
    copy_probs = np.array([[[0.9, 0.1], [0.4, 0.6]]])
    np.testing.assert_allclose(class_thresholds(copy_probs, 10), [0.9, 0.6])


def test_class_thresholds_refuse_bad_input() -> None:
    with pytest.raises(
        UsageError, match=r"\(n, copies, classes\).*Received: copy_probs=.*shape=\(2, 3\)"
    ):
        class_thresholds(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="Received: percentile=150"):
        class_thresholds(np.ones((1, 1, 2)) / 2, 150)


def test_threshold_decisions_hand_cases() -> None:
    thresholds = np.array([0.5, np.nan, 0.8])
    pred = np.array([0, 0, 1, 2, 2])
    conf = np.array([0.5, 0.49, 0.01, 0.79, 0.95])
    got = threshold_decisions(pred, conf, thresholds)
    np.testing.assert_array_equal(got, [0, UNCLASSIFIED, 1, UNCLASSIFIED, 2])
    assert got.dtype == np.int64
    with pytest.raises(
        UsageError, match=r"class indices in \[0, 3\), but pred\[0\] = 3\. Received: pred="
    ):
        threshold_decisions(np.array([3]), np.array([0.9]), thresholds)


# --- temperature --------------------------------------------------------------------------


@pytest.mark.parametrize("true_t", [2.0, 0.5])
def test_fit_temperature_recovers_known_temperature(true_t: float) -> None:
    probs, labels = sharpened_data(4000, 5, true_t, seed=1)
    fitted = fit_temperature(probs, labels)
    assert fitted == pytest.approx(true_t, rel=0.1)
    assert nll(apply_temperature(probs, fitted), labels) < nll(probs, labels)


def test_fit_temperature_is_the_minimum_of_the_nll() -> None:
    probs, labels = sharpened_data(500, 4, 3.0, seed=2)
    fitted = fit_temperature(probs, labels)
    best = nll(apply_temperature(probs, fitted), labels)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert best <= nll(apply_temperature(probs, fitted * factor), labels) + 1e-12


def test_fit_temperature_stays_in_bounds_when_already_certain() -> None:
    probs = np.eye(3)[[0, 1, 2, 0]]
    fitted = fit_temperature(probs, np.array([0, 1, 2, 0]))
    assert 0.05 <= fitted <= 20.0
    with pytest.raises(ValueError, match=r"Received: labels.shape=\(3,\)"):
        fit_temperature(probs, np.array([0, 1, 2]))


def test_apply_temperature_handles_zeros_and_identity() -> None:
    probs = np.array([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]])
    same = apply_temperature(probs, 1.0)
    np.testing.assert_allclose(same, probs, atol=1e-11)
    soft = apply_temperature(probs, 2.0)
    assert np.all(np.isfinite(soft)) and np.allclose(soft.sum(axis=-1), 1.0)
    assert soft[0, 0] / soft[0, 1] == pytest.approx(math.sqrt(0.7 / 0.3))
    assert apply_temperature(np.ones((2, 3, 4)) / 4, 5.0).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="Received: temperature=0.0"):
        apply_temperature(probs, 0.0)


# --- conformal: hand cases -------------------------------------------------------------------


def test_conformal_level_by_hand() -> None:
    assert conformal_level(9, 0.1) == 1.0  # ceil(10 * 0.9) / 9 = 9 / 9
    assert conformal_level(5, 0.1) > 1  # ceil(6 * 0.9) / 5 = 6 / 5
    assert conformal_level(19, 0.1) == pytest.approx(18 / 19)  # ceil(20 * 0.9) = 18


def test_lac_and_class_quantiles_tiny_n_by_hand() -> None:
    # Class 0: nine images with scores 0.1 .. 0.9 -> level 1 -> the largest score.
    # Class 1: five images -> level 6/5 > 1 -> inf. Class 2: no images -> inf.
    p0 = 1.0 - np.arange(1, 10) / 10
    probs = np.zeros((14, 3))
    probs[:9, 0], probs[:9, 1] = p0, 1.0 - p0
    probs[9:, 1] = 1.0
    labels = np.array([0] * 9 + [1] * 5)
    q = conformal_quantiles(probs, labels, alpha=0.1, method="class")
    assert q[0] == pytest.approx(0.9)
    assert math.isinf(q[1]) and math.isinf(q[2])
    # With alpha = 0.5 and n = 9: k = ceil(10 * 0.5) = 5 -> 5th smallest score = 0.5.
    assert conformal_quantiles(probs, labels, 0.5, "class")[0] == pytest.approx(0.5)
    # LAC pools all 14 scores (0.1 .. 0.9 and five zeros): k = ceil(15 * 0.9) = 14 -> 0.9;
    # at alpha 0.5, k = 8 -> the 8th smallest = 0.3.
    np.testing.assert_allclose(conformal_quantiles(probs, labels, 0.1), [0.9])
    np.testing.assert_allclose(conformal_quantiles(probs, labels, 0.5, "lac"), [0.3])
    assert math.isinf(conformal_quantiles(probs[:5], labels[:5], 0.1)[0])  # k = 6 > n = 5
    with pytest.raises(ValueError, match="Received: alpha=1.0"):
        conformal_quantiles(probs, labels, alpha=1.0)
    with pytest.raises(ValueError, match="Received: method='top-k'"):
        conformal_quantiles(probs, labels, method="top-k")


def test_aps_scores_and_sets_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # Image 0, true class 1: ranked 0 (0.5), 1 (0.3) -> 0.8. Image 1, true class 0: all -> 1.0.
    np.testing.assert_allclose(conformal_scores(probs, np.array([1, 0]), "aps"), [0.8, 1.0])
    np.testing.assert_allclose(conformal_scores(probs, np.array([1, 0]), "lac"), [0.7, 0.9])
    row = probs[:1]
    for q, expected in [
        (0.8, [True, True, False]),  # 0.5 < 0.8, then 0.8 reaches it
        (0.79, [True, True, False]),
        (0.81, [True, True, True]),
        (0.3, [True, False, False]),  # the top class alone reaches 0.3
        (0.0, [True, False, False]),  # never empty
        (math.inf, [True, True, True]),
        (math.nan, [True, True, True]),
    ]:
        np.testing.assert_array_equal(prediction_sets(row, [q], "aps")[0], expected, str(q))
    # Ties go to the lower class index, in the scores and in the sets alike.
    tied = np.array([[0.4, 0.4, 0.2]])
    np.testing.assert_allclose(conformal_scores(tied, np.array([1]), "aps"), [0.8])
    np.testing.assert_array_equal(prediction_sets(tied, [0.4], "aps"), [[True, False, False]])


def test_prediction_sets_hand_cases() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = np.array([0.4, 0.7, np.inf])
    expected = np.array([[True, True, True], [False, False, True]])
    np.testing.assert_array_equal(prediction_sets(probs, q, "class"), expected)
    # nan (no quantile) behaves like inf
    nan_q = np.array([0.4, 0.7, np.nan])
    np.testing.assert_array_equal(prediction_sets(probs, nan_q, "class"), expected)
    lac = prediction_sets(probs, 0.7, "lac")  # p >= 0.3; the second row keeps only class 2
    np.testing.assert_array_equal(lac, [[True, True, False], [False, False, True]])
    assert not prediction_sets(probs, [0.3], "lac")[0].any()  # LAC sets can be empty
    with pytest.raises(ValueError, match=r"Received: quantiles.shape=\(2,\)"):
        prediction_sets(probs, np.array([0.1, 0.2]), "class")
    with pytest.raises(ValueError, match=r"shape \(1,\) for method 'lac'"):
        prediction_sets(probs, q, "lac")


# --- conformal: coverage with a known answer ---------------------------------------------------


def calibrated_draws(rng: np.random.Generator, n: int, classes: int = 10) -> tuple[np.ndarray, ...]:
    """Probabilities and labels drawn from those same probabilities: a calibrated model."""
    probs = rng.dirichlet(np.full(classes, 0.4), size=n)
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return probs, np.minimum(labels, classes - 1)


@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_conformal_coverage_on_calibrated_probabilities(alpha: float) -> None:
    """Over many calibration/test draws, split conformal covers with probability
    k / (n + 1), k = ceil((n + 1)(1 - alpha)), exactly for LAC (continuous scores): in
    [1 - alpha, 1 - alpha + 1 / (n + 1)]. APS without randomisation covers at least that."""
    rng = np.random.default_rng(7)
    trials, n_cal, n_test = 300, 300, 1000
    known = math.ceil((n_cal + 1) * (1 - alpha) - 1e-9) / (n_cal + 1)
    assert 1 - alpha <= known <= 1 - alpha + 1 / (n_cal + 1)
    coverage = {"lac": [], "aps": [], "class": []}
    per_class_hits, per_class_n = np.zeros(10), np.zeros(10)
    sizes = {"lac": [], "aps": []}
    for _ in range(trials):
        probs, labels = calibrated_draws(rng, n_cal + n_test)
        cal_p, cal_y, test_p, test_y = probs[:n_cal], labels[:n_cal], probs[n_cal:], labels[n_cal:]
        for method in coverage:
            sets = prediction_sets(test_p, conformal_quantiles(cal_p, cal_y, alpha, method), method)
            hit = sets[np.arange(n_test), test_y]
            coverage[method].append(hit.mean())
            if method == "class":
                per_class_hits += np.bincount(test_y, weights=hit, minlength=10)
                per_class_n += np.bincount(test_y, minlength=10)
            else:
                sizes[method].append(sets.sum(axis=1).mean())
            if method == "aps":
                assert sets.any(axis=1).all()
    # Binomial tolerance: per trial, the coverage given the calibration draw has variance about
    # alpha (1 - alpha) / (n_cal + 2), and the test draw adds alpha (1 - alpha) / n_test.
    sd = math.sqrt(alpha * (1 - alpha) * (1 / (n_cal + 2) + 1 / n_test) / trials)
    tol = 4 * sd
    lac = float(np.mean(coverage["lac"]))
    assert abs(lac - known) <= tol, (lac, known, tol)
    assert 1 - alpha - tol <= lac <= 1 - alpha + 1 / (n_cal + 1) + tol
    assert float(np.mean(coverage["aps"])) >= known - tol
    # Class-conditional: every class covered (n_y is about n_cal / 10 per class here).
    class_sd = np.sqrt(alpha * (1 - alpha) * (10 / (n_cal + 2) + 1 / per_class_n) / trials)
    assert np.all(per_class_hits / per_class_n >= 1 - alpha - 4 * class_sd)
    assert float(np.mean(coverage["class"])) >= 1 - alpha - tol
    assert np.mean(sizes["lac"]) < 10 and np.mean(sizes["aps"]) < 10  # informative sets


def test_aps_sets_are_never_empty() -> None:
    rng = np.random.default_rng(11)
    probs = np.concatenate(
        [
            rng.dirichlet(np.full(7, 0.05), size=2000),  # nearly one-hot
            rng.dirichlet(np.full(7, 5.0), size=2000),  # nearly flat
            np.eye(7)[rng.integers(0, 7, 200)],  # exactly one-hot, exact ties at 0
            np.full((10, 7), 1 / 7),  # all tied
        ]
    ).astype(np.float32)  # float32, like the MC means score writes
    for q in [0.0, 1e-9, 0.05, 0.5, 0.9, 0.999, 1.0, math.inf]:
        sets = prediction_sets(probs, [q], "aps")
        assert sets.any(axis=1).all(), q
        top = probs.argmax(axis=1)
        assert sets[np.arange(len(probs)), top].all()


def test_aps_set_holds_every_class_whose_score_is_within_the_quantile() -> None:
    """The coverage event: y is in the set whenever its APS score is at most q."""
    rng = np.random.default_rng(12)
    probs = rng.dirichlet(np.full(6, 0.3), size=3000)
    probs[:100, 3:] = 0.0  # zero probabilities: running totals that stop growing
    probs[:100] /= probs[:100].sum(axis=1, keepdims=True)
    for q in [0.2, 0.6, 0.95, 1.0]:
        sets = prediction_sets(probs, [q], "aps")
        for c in range(6):
            labels = np.full(len(probs), c)
            within = conformal_scores(probs, labels, "aps") <= q
            assert sets[within, c].all()


# --- conformal: cross-check with MAPIE -----------------------------------------------------------


def test_lac_and_aps_quantiles_and_sets_match_mapie() -> None:
    pytest.importorskip("mapie", minversion="1.0")
    from mapie_adapter import mapie_conformal

    rng = np.random.default_rng(5)
    worst = 0.0
    for n_cal, classes, concentration in [(269, 10, 0.3), (1000, 10, 1.0), (150, 4, 0.5)]:
        probs = rng.dirichlet(np.full(classes, concentration), size=n_cal + 500)
        labels = (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1)
        labels = np.minimum(labels, classes - 1)
        cal_p, cal_y, test_p = probs[:n_cal], labels[:n_cal], probs[n_cal:]
        for alpha in (0.1, 0.05):
            for method in ("lac", "aps"):
                mapie_q, mapie_sets = mapie_conformal(cal_p, cal_y, alpha, method, test_p)
                ours = conformal_quantiles(cal_p, cal_y, alpha, method)
                worst = max(worst, float(np.max(np.abs(mapie_q - ours))))
                np.testing.assert_allclose(ours, mapie_q, rtol=0, atol=1e-12)
                np.testing.assert_array_equal(prediction_sets(test_p, ours, method), mapie_sets)
    assert worst <= 1e-12


# --- calibration file and predictor ------------------------------------------------------------


PREDICTOR = {
    "method": "mc_dropout",
    "passes": 100,
    "tta": 1,
    "augmentation": None,
    "rescale": 1 / 255,
    "precision": "float32",
    "sampled_layers": ["dropout1", "dropout2"],
    "logits": False,
    "exif_transpose": False,
}


def make_calibration(method: str = "class") -> Calibration:
    return Calibration(
        class_names=["a", "b", "c"],
        thresholds=np.array([0.5, np.nan, 0.25]),
        temperature=1.7,
        conformal_quantiles=np.array([0.3, np.inf, 0.9] if method == "class" else [0.4]),
        model_sha256="ab" * 32,
        conformal_method=method,
        predictor=dict(PREDICTOR),
        settings={"tta": 100, "passes": 1},
        created="2024-01-01T00:00:00+00:00",
    )


def test_calibration_json_round_trip(tmp_path: Path) -> None:
    path = make_calibration().to_json(tmp_path / "calibration.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == CALIBRATION_FORMAT == "batchuq-calibration/2"
    assert raw["thresholds"] == [0.5, None, 0.25]
    assert raw["conformal_quantiles"] == [0.3, None, 0.9]
    assert raw["conformal_method"] == "class" and raw["predictor"] == PREDICTOR
    back = Calibration.from_json(path)
    np.testing.assert_array_equal(back.thresholds, [0.5, np.nan, 0.25])
    np.testing.assert_array_equal(back.conformal_quantiles, [0.3, np.inf, 0.9])
    assert back.temperature == 1.7 and back.class_names == ["a", "b", "c"]
    assert back.settings == {"tta": 100, "passes": 1} and back.predictor == PREDICTOR
    lac = Calibration.from_json(make_calibration("lac").to_json(tmp_path / "lac.json"))
    assert lac.conformal_method == "lac" and lac.conformal_quantiles.tolist() == [0.4]
    with pytest.raises(
        CalibrationError, match=r"must have shape \(1,\) for conformal method 'aps'"
    ):
        Calibration(["a", "b"], [0.1, 0.2], 1.0, [0.1, 0.2], "ab", conformal_method="aps")


def test_calibration_check_model_refuses_other_model_and_old_files(tmp_path: Path) -> None:
    calibration = make_calibration()
    calibration.check_model("ab" * 32)
    with pytest.raises(
        CalibrationError, match=r"made for another model.*Received: model_sha256='cd"
    ):
        calibration.check_model("cd" * 32)
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(CalibrationError, match="Not a batchuq calibration file"):
        Calibration.from_json(tmp_path / "other.json")
    old = make_calibration().as_dict() | {"format": "batchuq-calibration/1"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(CalibrationError, match=r"older batchuq.*Run `batchuq calibrate` again"):
        Calibration.from_json(tmp_path / "old.json")


def test_predictor_from_metadata_and_differences() -> None:
    metadata = {
        "passes": 100,
        "tta": 1,
        "augmentation": {"copies": 1, "rotation": 15.0, "zoom": 0.1, "flip": False},
        "rescale": 1 / 255,
        "precision": "float32",
        "sampled_layers": ["dropout1", "dropout2"],
        "logits": False,
        "exif_transpose": False,
        "seed": 3,
        "batch_size": 8,
    }
    assert predictor_from_metadata(metadata) == PREDICTOR  # no seed; no augmentation at K = 1
    assert predictor_differences(PREDICTOR, predictor_from_metadata(metadata)) == []
    # A calibration from before methods were recorded is an MC dropout one; an ensemble is not.
    legacy = {k: v for k, v in PREDICTOR.items() if k != "method"}
    assert predictor_differences(legacy, predictor_from_metadata(metadata)) == []
    ensemble = predictor_from_metadata(metadata | {"method": "deep_ensemble"})
    assert predictor_differences(legacy, ensemble) == [("method", "mc_dropout", "deep_ensemble")]
    augmented = metadata | {"tta": 4, "seed": 9}
    assert predictor_from_metadata(augmented)["augmentation"] == {
        "rotation": 15.0,
        "zoom": 0.1,
        "flip": False,
    }
    assert predictor_differences(PREDICTOR, predictor_from_metadata(augmented)) == [("tta", 1, 4)]
    other = predictor_from_metadata(
        augmented | {"augmentation": {"copies": 4, "rotation": 10.0, "zoom": 0.1, "flip": True}}
    )
    assert predictor_differences(predictor_from_metadata(augmented), other) == [
        ("augmentation.flip", False, True),
        ("augmentation.rotation", 15.0, 10.0),
    ]
    assert predictor_differences(PREDICTOR, PREDICTOR | {"rescale": 1.0, "logits": 0}) == [
        ("rescale", 1 / 255, 1.0),
        ("logits", False, 0),
    ]
    assert predictor_differences(PREDICTOR, PREDICTOR | {"rescale": (1 / 255) * (1 + 1e-12)}) == []
    assert predictor_from_metadata(metadata | {"rescale": {"value": 1.0}})["rescale"] == 1.0
    calibration = make_calibration("lac")
    assert calibration.check_predictor(metadata) == []
    with pytest.raises(PredictorMismatchError) as caught:
        calibration.check_predictor(metadata | {"passes": 10, "precision": "bfloat16"})
    message = str(caught.value)
    assert (
        "passes (score --passes, calibrate --score-passes): 100 in the calibration, 10 in this run"
        in message
    )
    assert "precision (--precision): float32 in the calibration, bfloat16 in this run" in message
    assert "--allow-predictor-mismatch" in message
    allowed = calibration.check_predictor(metadata | {"passes": 10}, allow=True)
    assert allowed == [("passes", 100, 10)]


# --- end to end: calibrate, then score with the calibration -----------------------------------


@pytest.fixture
def val_subset(tmp_path: Path) -> Path:
    """Two validation images of each digit (20 images)."""
    root = tmp_path / "val"
    for folder in sorted(SAMPLE_VAL.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def test_calibrate_directory_fits_conformal_on_the_scoring_predictor(
    val_subset: Path, tmp_path: Path
) -> None:
    """Thresholds from 4 augmented copies x 1 pass; temperature and conformal sets from the
    scoring predictor (3 passes, no TTA): `score` with that predictor on the same folder
    reproduces the calibration's in-sample coverage and set sizes exactly."""
    from batchuq.jobs.score import score_directory
    from batchuq.models import load_model

    loaded = load_model(None)
    out = tmp_path / "calibration.json"
    calibration = calibrate_directory(
        val_subset, out, CalibrateOptions(tta=4, model=loaded, passes=1, score_passes=3, seed=3)
    )
    raw = json.loads(out.read_text())
    for key in (
        "format",
        "class_names",
        "thresholds",
        "temperature",
        "conformal_quantiles",
        "conformal_method",
        "model_sha256",
        "predictor",
        "threshold_predictor",
        "settings",
        "stats",
        "created",
        "batchuq_version",
    ):
        assert key in raw
    assert raw["model_sha256"] == loaded.sha256
    assert raw["class_names"] == [f"n{i}" for i in range(10)]
    assert raw["conformal_method"] == "lac"
    predictor, threshold_predictor = raw["predictor"], raw["threshold_predictor"]
    assert (predictor["passes"], predictor["tta"], predictor["augmentation"]) == (3, 1, None)
    assert predictor["sampled_layers"] == ["dropout1", "dropout2", "dropout3"]
    assert predictor["rescale"] == pytest.approx(1 / 255) and predictor["logits"] is False
    assert (threshold_predictor["passes"], threshold_predictor["tta"]) == (1, 4)
    assert threshold_predictor["augmentation"]["rotation"] == 15.0
    settings = raw["settings"]
    assert (settings["tta"], settings["passes"], settings["percentile"], settings["alpha"]) == (
        4,
        1,
        10.0,
        0.1,
    )
    assert (settings["score_passes"], settings["score_tta"], settings["conformal"]) == (3, 1, "lac")
    assert settings["seed"] == 3 and settings["augmentation"]["copies"] == 4
    assert all(t is None or 0.0 <= t <= 1.0 for t in raw["thresholds"])
    # 20 images: k = ceil(21 * 0.9) = 19 <= 20, one finite quantile.
    assert len(raw["conformal_quantiles"]) == 1 and raw["conformal_quantiles"][0] is not None
    assert 0.05 <= raw["temperature"] <= 20
    stats = raw["stats"]
    assert stats["images"] == 20 and stats["skipped"] == 0 and stats["runs"] == 2
    assert sum(stats["copies_predicted"]) == 20 * 4
    assert stats["nll_after"] <= stats["nll_before"] + 1e-9
    assert stats["conformal_coverage"] >= 0.9 and stats["warnings"] == []
    Calibration.from_json(out).check_model(loaded.sha256)
    assert calibration.model_sha256 == loaded.sha256

    scored = tmp_path / "val.parquet"
    for tempered in (False, True):  # the temperature does not change the sets
        score_directory(
            val_subset,
            scored,
            ScoreOptions(model=loaded, passes=3, seed=3, calibration=out, temperature=tempered),
        )
        frame = pd.read_parquet(scored)
        covered = [
            label in members for label, members in zip(frame.label, frame.pred_set, strict=True)
        ]
        assert np.mean(covered) == stats["conformal_coverage"]
        assert frame.pred_set.map(len).mean() == pytest.approx(stats["mean_set_size"])
    meta = read_metadata(scored)["calibration"]
    assert meta["conformal_method"] == "lac" and meta["predictor_mismatch"] is None

    with pytest.raises(
        PredictorMismatchError,
        match=r"tta \(score --tta, calibrate --score-tta\): 1 in the calibration, 2",
    ):
        score_directory(
            val_subset, scored, ScoreOptions(model=loaded, passes=3, tta=2, calibration=out)
        )


# --conformal class at alpha 0.4: k = ceil((n + 1) * 0.6) is 3 of 4 images (a finite quantile
# with a score on either side of it) and 2 of 1 image (no quantile: the class is in every set).
CLASS_ALPHA = 0.4


@pytest.fixture
def val_uneven(tmp_path: Path) -> Path:
    """Four validation images of digits 0-4 and one of digits 5-9 (25 images)."""
    root = tmp_path / "val_uneven"
    for index, folder in enumerate(sorted(SAMPLE_VAL.iterdir())):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[: 4 if index < 5 else 1]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def test_calibrate_class_quantiles_are_the_kth_smallest_scores_of_the_scored_means(
    val_uneven: Path, tmp_path: Path
) -> None:
    """One run when both predictors agree; each class's quantile is its k-th smallest score
    1 - p_y, recomputed here from the mean_* columns `score` writes with the same predictor."""
    from batchuq.jobs.score import score_directory
    from batchuq.models import load_model

    loaded = load_model(None)
    out = tmp_path / "class.json"
    same = {"tta": 1, "passes": 2, "score_passes": 2, "score_tta": 1, "seed": 7}
    with pytest.warns(CalibrationWarning, match=r"10 of 10 classes have fewer than 25"):
        calibration = calibrate_directory(
            val_uneven,
            out,
            CalibrateOptions(model=loaded, conformal="class", alpha=CLASS_ALPHA, **same),
        )
    assert calibration.stats["runs"] == 1
    assert calibration.predictor == calibration.threshold_predictor

    scored = tmp_path / "val.parquet"
    score_directory(val_uneven, scored, ScoreOptions(model=loaded, passes=2, seed=7))
    frame = pd.read_parquet(scored)
    means = frame[[f"mean_n{i}" for i in range(10)]].to_numpy(np.float64)
    labels = frame.label_index.to_numpy()
    scores = 1.0 - means[np.arange(len(frame)), labels]
    quantiles = calibration.conformal_quantiles
    for y in range(10):
        own = np.sort(scores[labels == y])
        k = math.ceil((len(own) + 1) * (1 - CLASS_ALPHA))
        if y < 5:
            assert (len(own), k) == (4, 3)
            assert quantiles[y] == pytest.approx(own[k - 1], rel=1e-6, abs=1e-9), (y, own)
            assert np.mean(own <= quantiles[y]) >= 1 - CLASS_ALPHA
        else:
            assert (len(own), k) == (1, 2)
            assert np.isinf(quantiles[y])
    # In some class the 3rd of 4 scores differs from its neighbours, so that a quantile of the
    # wrong rank would fail above.
    assert any(
        np.sort(scores[labels == y])[1] < quantiles[y] < np.sort(scores[labels == y])[3]
        for y in range(5)
    )
    raw = json.loads(out.read_text())["conformal_quantiles"]
    assert raw[5:] == [None] * 5 and all(isinstance(q, float) for q in raw[:5])
    # A class-conditional set holds every class c with 1 - p_c <= q_c.
    in_set = 1.0 - means <= quantiles[None, :]
    assert calibration.stats["conformal_coverage"] == pytest.approx(
        in_set[np.arange(25), labels].mean()
    )
    assert calibration.stats["mean_set_size"] == pytest.approx(in_set.sum(axis=1).mean())
    assert "n5, n6, n7, n8, n9 get no quantile" in calibration.stats["warnings"][0]


DIGITS_PASSES = 100  # score's default predictor: T = 100 passes, no TTA


@pytest.fixture(scope="module")
def digits_lac(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """LAC at alpha 0.1 fitted on sample_data/digits/val with score's default predictor (one
    run: the thresholds use the same predictor here), then `score --calibration` on test."""
    from batchuq.jobs.score import score_directory
    from batchuq.models import load_model

    folder = tmp_path_factory.mktemp("digits")
    loaded = load_model(None)
    same = {"tta": 1, "passes": DIGITS_PASSES, "score_tta": 1, "score_passes": DIGITS_PASSES}
    cal = folder / "lac.json"
    calibrate_directory(SAMPLE_VAL, cal, CalibrateOptions(model=loaded, alpha=0.1, **same))
    out = folder / "test.parquet"
    score_directory(
        SAMPLE_TEST, out, ScoreOptions(model=loaded, passes=DIGITS_PASSES, calibration=cal)
    )
    return {"model": loaded, "same": same, "calibration": cal, "test": pd.read_parquet(out)}


@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_lac_coverage_on_the_bundled_digits(digits_lac: dict, alpha: float) -> None:
    frame = digits_lac["test"]
    assert (frame.status == "ok").all()
    names = [f"n{i}" for i in range(10)]
    means = frame[[f"mean_{n}" for n in names]].to_numpy()
    if alpha == 0.1:
        calibration = Calibration.from_json(digits_lac["calibration"])
        members = frame.pred_set  # as written by score --calibration
        expected = calibration.prediction_sets(means)
        assert [list(np.array(names)[row]) for row in expected] == [list(m) for m in members]
    else:
        calibration = calibrate_directory(
            SAMPLE_VAL,
            None,
            CalibrateOptions(model=digits_lac["model"], alpha=alpha, **digits_lac["same"]),
        )
    n_cal = calibration.stats["images"]
    assert n_cal == 269 and calibration.settings["alpha"] == alpha
    sets = calibration.prediction_sets(means)
    labels = frame.label_index.to_numpy()
    coverage = sets[np.arange(len(frame)), labels].mean()
    # Binomial tolerance of one calibration draw (n_cal) and one test draw (450 images).
    tol = 3 * math.sqrt(alpha * (1 - alpha) * (1 / (n_cal + 2) + 1 / len(frame)))
    assert 1 - alpha - tol <= coverage <= 1 - alpha + 1 / (n_cal + 1) + tol, coverage
    assert sets.sum(axis=1).mean() <= 1.5  # a 98%-accurate model: mostly single classes


def _invoke(args: list[str]) -> object:
    env = {"BATCHUQ_MODEL": None, "BATCHUQ_CONFIG": None}
    return CliRunner().invoke(cli, [*args, "--no-progress"], env=env)


def test_calibrate_follows_score_table_and_score_refuses_another_predictor(
    val_subset: Path, digits_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bundled = REPO / "batchuq" / "data" / "digits_cnn.keras"
    (tmp_path / "models").mkdir()
    shutil.copy(bundled, tmp_path / "models" / "digits.keras")
    shutil.copy(bundled.with_suffix(".classes.json"), tmp_path / "models" / "digits.classes.json")
    (tmp_path / "batchuq.toml").write_text(
        '[score]\nmodel = "models/digits.keras"\npasses = 2\ntta = 2\ntta-rotation = 5.0\n\n'
        "[calibrate]\ntta = 2\n"
    )
    result = _invoke(["calibrate", str(val_subset), "-o", "cal.json", "--conformal", "aps"])
    assert result.exit_code == EXIT_OK, result.output
    raw = json.loads((tmp_path / "cal.json").read_text())
    predictor = raw["predictor"]
    assert (predictor["passes"], predictor["tta"]) == (2, 2)
    assert predictor["augmentation"]["rotation"] == 5.0  # from [score], shared with thresholds
    assert raw["threshold_predictor"]["augmentation"]["rotation"] == 5.0
    assert raw["stats"]["runs"] == 2  # thresholds: tta 2 x passes 1, from [calibrate]
    assert Path(raw["model_path"]) == (tmp_path / "models" / "digits.keras").resolve()
    options = raw["settings"]["options"]
    assert options["model"]["source"] == "config file [score] (batchuq.toml)"
    assert options["score_passes"] == {"value": 2, "source": "config file [score] (batchuq.toml)"}
    assert options["tta"]["source"] == "config file (batchuq.toml)"
    assert options["alpha"]["source"] == "default"

    # The same predictor (from the same [score] table): accepted, APS sets never empty.
    ok = _invoke(["score", str(digits_subset), "a.parquet", "--calibration", "cal.json"])
    assert ok.exit_code == EXIT_OK, ok.output
    frame = pd.read_parquet(tmp_path / "a.parquet")
    assert frame.pred_set.map(len).min() >= 1

    refused = _invoke(
        ["score", str(digits_subset), "b.parquet", "--calibration", "cal.json", "--passes", "3"]
    )
    assert refused.exit_code == EXIT_USAGE
    assert (
        "passes (score --passes, calibrate --score-passes): 2 in the calibration, 3 in this run"
        in refused.output
    )
    assert "--allow-predictor-mismatch" in refused.output
    assert not (tmp_path / "b.parquet").exists()
    refused = _invoke(
        [
            "score",
            str(digits_subset),
            "b.parquet",
            "--calibration",
            "cal.json",
            "--tta-rotation",
            "20",
            "--rescale",
            "1",
        ]
    )
    assert refused.exit_code == EXIT_USAGE
    assert "augmentation.rotation (--tta-rotation): 5 in the calibration, 20 in this run" in (
        refused.output
    )
    assert "rescale (--rescale): 0.00392157 in the calibration, 1 in this run" in refused.output

    allowed = _invoke(
        [
            "score",
            str(digits_subset),
            "b.parquet",
            "--calibration",
            "cal.json",
            "--passes",
            "3",
            "--allow-predictor-mismatch",
        ]
    )
    assert allowed.exit_code == EXIT_OK, allowed.output
    assert "another predictor" in allowed.output and "3 in this run" in allowed.output
    meta = read_metadata(tmp_path / "b.parquet")["calibration"]
    assert meta["predictor_mismatch"] == [{"setting": "passes", "calibration": 2, "run": 3}]
    assert "pred_set" in pd.read_parquet(tmp_path / "b.parquet").columns


def test_calibrate_command_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        calibrate_command, [str(tmp_path / "missing"), "-o", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 2
    assert "Error:" in result.output
    assert not (tmp_path / "c.json").exists()
    help_text = CliRunner().invoke(calibrate_command, ["--help"]).output
    assert "batchuq calibrate sample_data/digits/val -o calibration.json" in help_text


def test_calibrate_names_each_unreadable_file_once_in_batchuq_lines(tmp_path: Path) -> None:
    """A folder with one file that is not an image, a model that scales pixels itself and two
    predictors (two plans): every stderr line is `batchuq: ...`, the unreadable file is named
    once (as score names it), the rescale notice is said once."""
    import keras
    from conftest import write_image

    keras.utils.set_random_seed(2)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255, name="to_unit")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(tmp_path / "m.keras")
    val = tmp_path / "val"
    for c in range(3):
        for i in range(3):
            write_image(val / f"c{c}" / f"{i}.png", size=16, seed=10 * c + i)
    (val / "c1" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "cal.json"
    args = ["calibrate", str(val), "-o", str(out), "--model", str(tmp_path / "m.keras")]
    result = _invoke([*args, "--tta", "2", "--score-passes", "2"])
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("batchuq: ") for line in lines), lines
    assert sum("c1/broken.png: error: not a recognised image format" in x for x in lines) == 1
    assert sum("scales pixels itself" in line for line in lines) == 1
    assert lines[-1].endswith(f"-> {out}")
    assert "validation: 9 images (1 skipped: 1 unreadable)" in result.stdout
    stats = json.loads(out.read_text())["stats"]
    assert (stats["images"], stats["skipped"], stats["unreadable"], stats["runs"]) == (9, 1, 1, 2)


# --- the risk rule: calibrate --target-risk, score --rule risk, evaluate ---------------------


def test_calibration_round_trip_with_and_without_a_selective_threshold(tmp_path: Path) -> None:
    selective = SelectiveRule(
        score="entropy",
        threshold=-0.123456789012345,
        statement="selective risk <= 5% ...",
        certificate={"target_risk": 0.05, "delta": 0.1, "n": 300, "accepted": 200},
    )
    calibration = make_calibration("lac")
    calibration.selective = selective
    path = calibration.to_json(tmp_path / "risk.json")
    assert json.loads(path.read_text())["selective"]["threshold"] == -0.123456789012345
    assert Calibration.from_json(path).selective == selective  # every digit kept
    # A file written before the selective threshold existed has no such key and still loads.
    old = make_calibration("lac").as_dict()
    del old["selective"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Calibration.from_json(tmp_path / "old.json").selective is None
    old["selective"] = {"score": "variance", "threshold": 0.5, "statement": "", "certificate": {}}
    (tmp_path / "bad.json").write_text(json.dumps(old))
    with pytest.raises(CalibrationError, match="variance"):
        Calibration.from_json(tmp_path / "bad.json")


def test_calibrate_target_risk_then_score_rule_risk_then_evaluate(
    val_subset: Path, digits_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain on 20 validation and 30 test images, 5 passes throughout. The threshold is
    fitted on the scoring predictor: scoring the validation images again reproduces the
    certificate's counts exactly; score accepts at or above it; evaluate checks the target."""
    from scipy.stats import beta

    monkeypatch.chdir(tmp_path)
    fast = ["--tta", "1", "--passes", "5", "--score-passes", "5"]
    # 20 images: k = 5 steps, the first accepts the 10 most confident.
    risk = ["--target-risk", "0.4", "--delta", "0.5"]
    result = _invoke(["calibrate", str(val_subset), "-o", "cal.json", *fast, *risk])
    assert result.exit_code == EXIT_OK, result.output
    calibration = Calibration.from_json("cal.json")
    selective = calibration.selective
    certificate = selective.certificate
    assert selective.score == "confidence" and certificate["n"] == 20
    assert (certificate["target_risk"], certificate["delta"]) == (0.4, 0.5)
    assert certificate["risk_bound"] < 0.4
    assert selective.statement in result.stdout
    assert calibration.settings["target_risk"] == 0.4

    again = _invoke(["score", str(val_subset), "val.parquet", "--passes", "5"])
    assert again.exit_code == EXIT_OK, again.output
    val = pd.read_parquet("val.parquet")
    accepted = val.confidence.astype(np.float64) >= selective.threshold
    assert accepted.sum() == certificate["accepted"]
    assert (val.pred_index[accepted] != val.label_index[accepted]).sum() == certificate["errors"]

    args = ["score", str(digits_subset), "out.parquet", "--passes", "5", "--rule", "risk"]
    scored = _invoke([*args, "--calibration", "cal.json"])
    assert scored.exit_code == EXIT_OK, scored.output
    assert f"; risk rule: {selective.statement}" in scored.stderr
    frame = pd.read_parquet("out.parquet")
    keep = frame.confidence.astype(np.float64) >= selective.threshold
    assert 0 < keep.sum() < len(frame)  # some accepted, some not, on these 30 images
    assert (frame.decision[keep] == frame.pred[keep]).all()
    assert (frame.decision[~keep] == "unclassified").all()
    rule = read_metadata("out.parquet")["decision_rule"]
    assert rule["rule"] == "risk" and rule["risk_threshold"] == selective.threshold
    assert rule["statement"] == selective.statement and rule["certificate"] == certificate

    evaluated = CliRunner().invoke(cli, ["evaluate", "out.parquet", "--json"])
    assert evaluated.exit_code == EXIT_OK, evaluated.output
    check = json.loads(evaluated.stdout)["selective"]
    errors = int((frame.decision[keep] != frame.label[keep]).sum())
    m, n = int(keep.sum()), len(frame)
    assert (check["n"], check["accepted"], check["errors"]) == (n, m, errors)
    assert check["risk"] == errors / m and check["coverage"] == m / n
    assert check["target_held"] == (errors / m <= 0.4)
    low = beta.ppf(0.025, errors, m - errors + 1) if errors else 0.0
    np.testing.assert_allclose(
        check["risk_interval"], [low, beta.ppf(0.975, errors + 1, m - errors)], rtol=1e-9
    )
    text = CliRunner().invoke(cli, ["evaluate", "out.parquet"]).stdout
    assert "realised selective risk" in text and selective.statement in text
    assert ("target held" if check["target_held"] else "target exceeded") in text

    # A target these 20 images cannot certify: exit 2, how many images it needs, no file.
    refused = _invoke(
        ["calibrate", str(val_subset), "-o", "no.json", *fast, "--target-risk", "0.001"]
    )
    assert refused.exit_code == EXIT_USAGE, refused.output
    assert "cannot be certified on 20 calibration images" in refused.stderr
    assert "labelled calibration images would be needed" in refused.stderr
    assert not Path("no.json").exists()


# --- Randomised APS and RAPS (issue 22) -----------------------------------------------------


def _paper_raps_sets(probs, q, uniforms, k_reg, lam):
    """Angelopoulos et al.'s ``gcq`` (their reference code), transcribed: the prefix of the
    ranking whose penalised running total is at most ``q``, plus one, minus one when their
    uniform ``U' >= V``. Their calibration score is ``total above y + U' p_y``, ours
    ``total up to y - U p_y``: the same with ``U' = 1 - U``."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=1)
    cumsum = np.cumsum(ordered, axis=1)
    pen = lam * np.maximum(0, np.arange(1, probs.shape[1] + 1) - k_reg)
    base = np.minimum(((cumsum + pen) <= q).sum(axis=1) + 1, probs.shape[1])
    last = base - 1
    rows = np.arange(len(probs))
    v = (q - (cumsum[rows, last] - ordered[rows, last]) - pen[last]) / ordered[rows, last]
    sizes = base - ((1.0 - uniforms) >= v)
    members = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(members, order, np.arange(probs.shape[1])[None, :] < sizes[:, None], 1)
    return members, base


@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_randomised_aps_and_raps_match_mapie_on_the_bundled_digits(
    digits_lac: dict, alpha: float
) -> None:
    from mapie_adapter import mapie_randomised

    frame = digits_lac["test"]
    probs = np.clip(frame[[f"mean_n{i}" for i in range(10)]].to_numpy(np.float64), 0.0, 1.0)
    labels = frame.label_index.to_numpy()
    half = np.random.default_rng(22).permutation(len(frame))
    cal, test = half[: len(frame) // 2], half[len(frame) // 2 :]
    report = {}
    for method in ("aps-random", "raps"):
        m = mapie_randomised(probs[cal], labels[cal], alpha, method, probs[test], seed=7)
        fit = cal[m["cal_index"]]  # MAPIE's calibration rows, in its order (RAPS holds out 20%)
        raps = (m["k_star"], m["lambda_star"]) if method == "raps" else None
        q = conformal_quantiles(probs[fit], labels[fit], alpha, method, m["cal_uniforms"], raps)
        assert abs(q[0] - m["quantile"]) <= 1e-12  # the same k-th smallest score
        ours = prediction_sets(probs[test], q, method, m["test_uniforms"], raps)
        if method == "aps-random":
            np.testing.assert_array_equal(ours, m["sets"])
        else:
            # k_reg is the paper's and MAPIE's rule on MAPIE's tuning split.
            tune = cal[m["tune_index"]]
            assert raps_parameters(probs[tune], labels[tune], alpha)[0] == m["k_star"]
            paper, base = _paper_raps_sets(probs[test], q[0], m["test_uniforms"], *raps)
            np.testing.assert_array_equal(ours, paper)
            # MAPIE divides the last class's slack by p - lambda max(0, L - k) + lambda [L > k]
            # instead of p: the same only while the unrandomised set has L <= k_reg + 1 classes.
            same = base <= m["k_star"] + 1
            np.testing.assert_array_equal(ours[same], m["sets"][same])
        covered = ours[np.arange(len(test)), labels[test]]
        report[method] = (covered.mean(), ours.sum(axis=1).mean())
        mapie_cov = m["sets"][np.arange(len(test)), labels[test]].mean()
        assert covered.mean() == pytest.approx(mapie_cov, abs=2 / len(test))
        # One calibration and one test draw of ~225 images each: 3 binomial sds.
        tol = 3 * math.sqrt(alpha * (1 - alpha) * (1 / len(fit) + 1 / len(test)))
        assert abs(covered.mean() - (1 - alpha)) <= tol, (method, covered.mean())
    print(f"alpha {alpha}: (coverage, mean size) {report}")


@pytest.mark.parametrize("method", ["aps-random", "raps"])
def test_randomised_sets_cover_at_least_one_minus_alpha_over_many_splits(method: str) -> None:
    """500 random calibration/test splits of an overconfident 10-class model (labels drawn
    from tempered probabilities): the mean coverage over splits is at least 1 - alpha and,
    randomised, at most 1 - alpha + 1/(n+1), within 4 standard errors of that mean."""
    rng = np.random.default_rng(5)
    alpha, n_cal, n_test, splits = 0.1, 200, 500, 500
    logits = rng.normal(size=(n_cal + n_test, 10)) * 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    true = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(axis=1, keepdims=True)
    paths = [f"img{i:04d}.png" for i in range(n_cal + n_test)]
    coverages, sizes = [], []
    for split in range(splits):
        labels = (true.cumsum(axis=1) < rng.random((len(true), 1))).sum(axis=1)
        order = rng.permutation(len(probs))
        cal, test = order[:n_cal], order[n_cal:]
        fitted = fit_conformal(
            probs[cal], labels[cal], alpha, method, [paths[i] for i in cal], seed=split
        )
        sets = fitted.sets(probs[test], [paths[i] for i in test])
        coverages.append(sets[np.arange(n_test), labels[test]].mean())
        sizes.append(sets.sum(axis=1).mean())
    n_fit = fitted.params.get("quantile_images", n_cal)
    mean, se = float(np.mean(coverages)), float(np.std(coverages) / math.sqrt(splits))
    assert mean >= 1 - alpha - 4 * se, (mean, se)
    assert mean <= 1 - alpha + 1 / (n_fit + 1) + 4 * se, (mean, se)
    assert np.mean(sizes) < 10  # the sets are not trivially everything


def test_randomised_sets_draw_u_per_image_not_per_batch() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5) * 0.5, size=60)
    labels = rng.integers(0, 5, size=60)
    paths = [f"c/{i}.png" for i in range(60)]
    for method in ("aps-random", "raps"):
        fitted = fit_conformal(probs, labels, 0.2, method, paths, seed=11)
        whole = fitted.sets(probs, paths)
        one_by_one = np.vstack([fitted.sets(probs[i : i + 1], paths[i : i + 1]) for i in range(60)])
        reversed_ = fitted.sets(probs[::-1], paths[::-1])[::-1]
        np.testing.assert_array_equal(whole, one_by_one)
        np.testing.assert_array_equal(whole, reversed_)
        other_seed = fit_conformal(probs, labels, 0.2, method, paths, seed=12)
        assert other_seed.sets(probs, paths).tolist() != whole.tolist()
    with pytest.raises(UsageError, match="Received: uniforms=None"):
        prediction_sets(probs, [0.5], "aps-random")
    with pytest.raises(UsageError, match="Received: raps=None"):
        conformal_scores(probs, labels, "raps", np.zeros(60))


def test_calibrate_and_score_with_raps_write_sets_independent_of_batch_size(
    val_subset: Path, digits_subset: Path, tmp_path: Path
) -> None:
    cal = tmp_path / "raps.json"
    args = ["--passes", "2", "--seed", "4"]
    result = _invoke(
        ["calibrate", str(val_subset), "-o", str(cal), "--conformal", "raps", "--alpha", "0.2"]
        + ["--score-passes", "2", "--passes", "2", "--seed", "4"]
    )
    assert result.exit_code == EXIT_OK, result.output
    raw = json.loads(cal.read_text())
    params = raw["settings"]["conformal_params"]
    assert params["tuning_images"] + params["quantile_images"] == 20
    assert params["lambda"] in RAPS_LAMBDAS and 1 <= params["k_reg"] <= 10
    frames = []
    for batch in ("1", "16"):
        out = tmp_path / f"b{batch}.parquet"
        scored = _invoke(
            ["score", str(digits_subset), str(out), "--calibration", str(cal)]
            + [*args, "--batch-size", batch]
        )
        assert scored.exit_code == EXIT_OK, scored.output
        frames.append(pd.read_parquet(out))
    assert [list(s) for s in frames[0].pred_set] == [list(s) for s in frames[1].pred_set]
    calibration = Calibration.from_json(cal)
    means = frames[0][[f"mean_n{i}" for i in range(10)]].to_numpy()
    expected = calibration.prediction_sets(means, list(frames[0].path), seed=4)
    names = np.array([f"n{i}" for i in range(10)])
    assert [list(names[row]) for row in expected] == [list(s) for s in frames[0].pred_set]
    meta = read_metadata(tmp_path / "b1.parquet")["calibration"]
    assert meta["conformal_method"] == "raps" and meta["conformal_params"] == params
    assert f"k_reg {params['k_reg']}, lambda" in result.output


def test_raps_tunes_on_a_fifth_and_fits_the_quantile_on_the_rest() -> None:
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.ones(6) * 0.3, size=400)
    labels = (probs.cumsum(axis=1) < rng.random((400, 1))).sum(axis=1)
    paths = [f"n{y}/{i}.png" for i, y in enumerate(labels)]
    fitted = fit_conformal(probs, labels, 0.1, "raps", paths, seed=3)
    params = fitted.params
    tune = set_uniforms(3, paths, purpose="raps-tuning") < 0.2
    assert params["tuning_images"] == tune.sum() and 60 < tune.sum() < 100
    assert params["quantile_images"] == 400 - tune.sum() and not params["tuned_on_quantile_images"]
    assert (params["k_reg"], params["lambda"]) == raps_parameters(probs[tune], labels[tune], 0.1)
    uniforms = set_uniforms(3, paths)
    expected = conformal_quantiles(
        probs[~tune], labels[~tune], 0.1, "raps", uniforms[~tune], fitted.raps
    )
    np.testing.assert_array_equal(fitted.quantiles, expected)
    # k_reg: one plus the conformal quantile of the 0-based rank of the true class.
    order = np.argsort(-probs[tune], axis=1, kind="stable")
    rank = np.argmax(order == labels[tune][:, None], axis=1)
    assert params["k_reg"] == int(np.sort(rank)[math.ceil((tune.sum() + 1) * 0.9) - 1]) + 1
    tiny = fit_conformal(probs[:2], labels[:2], 0.5, "raps", paths[:2], seed=3)
    assert tiny.params["tuned_on_quantile_images"]
