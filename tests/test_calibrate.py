"""Tests of ``batchuq.calibrate``: thresholds, temperature, conformal sets, the JSON file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from batchuq.calibrate import (
    CALIBRATION_FORMAT,
    UNCLASSIFIED,
    Calibration,
    apply_temperature,
    calibrate_command,
    calibrate_directory,
    class_thresholds,
    conformal_level,
    conformal_quantiles,
    fit_temperature,
    nll,
    prediction_sets,
    threshold_decisions,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_VAL = REPO / "sample_data" / "digits" / "val"


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
    with pytest.raises(ValueError, match=r"Received: copy_probs.shape=\(2, 3\)"):
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
    with pytest.raises(ValueError, match="Received: pred with range"):
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


# --- conformal ----------------------------------------------------------------------------


def test_conformal_level_by_hand() -> None:
    assert conformal_level(9, 0.1) == 1.0  # ceil(10 * 0.9) / 9 = 9 / 9
    assert conformal_level(5, 0.1) > 1  # ceil(6 * 0.9) / 5 = 6 / 5
    assert conformal_level(19, 0.1) == pytest.approx(18 / 19)  # ceil(20 * 0.9) = 18


def test_conformal_quantiles_tiny_n_by_hand() -> None:
    # Class 0: nine images with scores 0.1 .. 0.9 -> level 1 -> the largest score.
    # Class 1: five images -> level 6/5 > 1 -> inf. Class 2: no images -> inf.
    p0 = 1.0 - np.arange(1, 10) / 10
    probs = np.zeros((14, 3))
    probs[:9, 0], probs[:9, 1] = p0, 1.0 - p0
    probs[9:, 1] = 1.0
    labels = np.array([0] * 9 + [1] * 5)
    q = conformal_quantiles(probs, labels, alpha=0.1)
    assert q[0] == pytest.approx(0.9)
    assert math.isinf(q[1]) and math.isinf(q[2])
    # With alpha = 0.5 and n = 9: k = ceil(10 * 0.5) = 5 -> 5th smallest score = 0.5.
    assert conformal_quantiles(probs, labels, alpha=0.5)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="Received: alpha=1.0"):
        conformal_quantiles(probs, labels, alpha=1.0)


def test_conformal_sets_cover_held_out_data() -> None:
    alpha, classes = 0.1, 4
    probs, labels = sharpened_data(6000, classes, 1.5, seed=3)  # exchangeable rows
    cal, test = slice(0, 3000), slice(3000, None)
    q = conformal_quantiles(probs[cal], labels[cal], alpha)
    sets = prediction_sets(probs[test], q)
    held = labels[test]
    covered = sets[np.arange(len(held)), held]
    assert covered.mean() >= 1 - alpha - 0.02
    for y in range(classes):  # class-conditional guarantee
        assert covered[held == y].mean() >= 1 - alpha - 0.04
    assert sets.sum(axis=1).mean() < classes  # informative sets


def test_prediction_sets_hand_cases() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = np.array([0.4, 0.7, np.inf])
    expected = np.array([[True, True, True], [False, False, True]])
    np.testing.assert_array_equal(prediction_sets(probs, q), expected)
    # nan (no quantile) behaves like inf
    np.testing.assert_array_equal(prediction_sets(probs, np.array([0.4, 0.7, np.nan])), expected)
    with pytest.raises(ValueError, match=r"Received: quantiles.shape=\(2,\)"):
        prediction_sets(probs, np.array([0.1, 0.2]))


# --- calibration file -----------------------------------------------------------------------


def make_calibration() -> Calibration:
    return Calibration(
        class_names=["a", "b", "c"],
        thresholds=np.array([0.5, np.nan, 0.25]),
        temperature=1.7,
        conformal_quantiles=np.array([0.3, np.inf, 0.9]),
        model_sha256="ab" * 32,
        settings={"tta": 100, "passes": 1},
        created="2024-01-01T00:00:00+00:00",
    )


def test_calibration_json_round_trip(tmp_path: Path) -> None:
    path = make_calibration().to_json(tmp_path / "calibration.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == CALIBRATION_FORMAT
    assert raw["thresholds"] == [0.5, None, 0.25]
    assert raw["conformal_quantiles"] == [0.3, None, 0.9]
    back = Calibration.from_json(path)
    np.testing.assert_array_equal(back.thresholds, [0.5, np.nan, 0.25])
    np.testing.assert_array_equal(back.conformal_quantiles, [0.3, np.inf, 0.9])
    assert back.temperature == 1.7 and back.class_names == ["a", "b", "c"]
    assert back.settings == {"tta": 100, "passes": 1}


def test_calibration_check_model_refuses_other_model(tmp_path: Path) -> None:
    calibration = make_calibration()
    calibration.check_model("ab" * 32)
    with pytest.raises(ValueError, match=r"made for another model.*Received: model_sha256='cd"):
        calibration.check_model("cd" * 32)
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="Not a batchuq calibration file"):
        Calibration.from_json(tmp_path / "other.json")


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture
def val_subset(tmp_path: Path) -> Path:
    """Two validation images of each digit (20 images)."""
    root = tmp_path / "val"
    for folder in sorted(SAMPLE_VAL.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def test_calibrate_directory_end_to_end(val_subset: Path, tmp_path: Path) -> None:
    from batchuq.models import load_model

    loaded = load_model(None)
    out = tmp_path / "calibration.json"
    calibration = calibrate_directory(val_subset, out, model=loaded, tta=4, passes=2, seed=3)
    raw = json.loads(out.read_text())
    for key in (
        "format",
        "class_names",
        "thresholds",
        "temperature",
        "conformal_quantiles",
        "model_sha256",
        "settings",
        "stats",
        "created",
        "batchuq_version",
    ):
        assert key in raw
    assert raw["model_sha256"] == loaded.sha256
    assert raw["class_names"] == [f"n{i}" for i in range(10)]
    settings = raw["settings"]
    assert (settings["tta"], settings["passes"], settings["percentile"], settings["alpha"]) == (
        4,
        2,
        10.0,
        0.1,
    )
    assert settings["seed"] == 3 and settings["augmentation"]["copies"] == 4
    assert all(t is None or 0.0 <= t <= 1.0 for t in raw["thresholds"])
    # 2 images per class: level ceil(3 * 0.9) / 2 = 3/2 > 1 -> every quantile is inf (null)
    assert raw["conformal_quantiles"] == [None] * 10
    assert 0.05 <= raw["temperature"] <= 20
    stats = raw["stats"]
    assert stats["images"] == 20 and stats["skipped"] == 0
    assert sum(stats["copies_predicted"]) == 20 * 4
    assert stats["nll_after"] <= stats["nll_before"] + 1e-9
    Calibration.from_json(out).check_model(loaded.sha256)
    assert calibration.model_sha256 == loaded.sha256


def test_calibrate_command_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        calibrate_command, [str(tmp_path / "missing"), "-o", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 2
    assert "Error:" in result.output
    assert not (tmp_path / "c.json").exists()
    help_text = CliRunner().invoke(calibrate_command, ["--help"]).output
    assert "batchuq calibrate sample_data/digits/val -o calibration.json" in help_text
