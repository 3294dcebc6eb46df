"""Every calibration is fitted on the predictor it is applied to (issues 21 and 22).

* The temperature of a deep ensemble and of SNGP is fitted as MC dropout's: on the scoring
  predictor's mean probabilities (the ensemble's average; SNGP's mean-field probabilities, so
  that tempering them is tempering the mean-field logits).
* ``--rule threshold --temperature`` compares the tempered mean with thresholds fitted on the
  tempered means of the validation images.
* ``calibrate --score-passes auto`` fits the temperature, the conformal sets and the risk
  threshold on the adaptive predictor: scoring the validation folder with ``score --passes
  auto`` gives back exactly what was fitted.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from batchuq import calibrate_directory, score_directory
from batchuq.cli import cli
from batchuq.defaults import UNCLASSIFIED_NAME
from batchuq.jobs.calibrate import CalibrateOptions
from batchuq.jobs.score import ScoreOptions
from batchuq.metrics import nll
from batchuq.models import load_models
from batchuq.output.schema import read_metadata
from batchuq.postprocess.rules import DecisionRule
from batchuq.postprocess.selective import fit_selective_threshold
from batchuq.postprocess.temperature import apply_temperature, fit_temperature

REPO = Path(__file__).resolve().parents[1]
VAL = REPO / "sample_data" / "digits" / "val"
DATA = REPO / "batchuq" / "data"
ENSEMBLE, SNGP = DATA / "digits_ensemble", DATA / "digits_sngp.keras"
DEMO = DATA / "digits_cnn.keras"
CLASSES = [f"n{i}" for i in range(10)]


def _means(path: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The ``mean_*`` columns (float32, as written), the labels and the frame of a run."""
    frame = pd.read_parquet(path)
    means = frame[[f"mean_{c}" for c in CLASSES]].to_numpy()
    assert means.dtype == np.float32
    return means, frame["label_index"].to_numpy(np.int64), frame


def _subset(target: Path, per_class: int) -> Path:
    for folder in sorted(VAL.iterdir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, target / folder.name / image.name)
    return target


@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 5-member ensemble calibrated on 12 validation images per class (one pass per
    member), then those images scored without and with --temperature --rule threshold."""
    work = tmp_path_factory.mktemp("ensemble")
    val = _subset(work / "val", 12)
    members = load_models(ENSEMBLE)  # loaded once for the three runs
    options = CalibrateOptions(model=members, tta=1, passes=1, score_passes=1, seed=1)
    calibration = calibrate_directory(val, work / "cal.json", options)
    plain, tempered = work / "plain.parquet", work / "tempered.parquet"
    run = {"model": members, "passes": 1, "seed": 1, "calibration": work / "cal.json"}
    score_directory(val, plain, ScoreOptions(**run))
    score_directory(
        val, tempered, ScoreOptions(**run, temperature=True, rule=DecisionRule("threshold"))
    )
    return {"calibration": calibration, "plain": plain, "tempered": tempered}


def test_ensemble_temperature_is_fitted_on_the_averaged_probabilities(ensemble_runs) -> None:
    """The ensemble's temperature minimises the NLL of the members' averaged probabilities,
    as score writes them, and lowers it against T = 1."""
    calibration = ensemble_runs["calibration"]
    assert calibration.predictor["method"] == "deep_ensemble"
    means, y, _ = _means(ensemble_runs["plain"])
    t = calibration.temperature
    before, after = nll(means.astype(np.float64), y), nll(apply_temperature(means, t), y)
    assert after < 0.8 * before  # 0.0475 -> 0.0203 on the whole validation folder
    assert math.isclose(
        after, calibration.stats["nll_after"], rel_tol=1e-6
    )  # float32 means of two batchings
    for nearby in (t * 1.05, t / 1.05):  # a minimum, not merely an improvement
        assert nll(apply_temperature(means, nearby), y) > after


def test_tempered_run_writes_the_tempered_average(ensemble_runs) -> None:
    means, _, _ = _means(ensemble_runs["plain"])
    tempered, _, frame = _means(ensemble_runs["tempered"])
    t = ensemble_runs["calibration"].temperature
    expected = apply_temperature(means.astype(np.float64), t).astype(np.float32)
    np.testing.assert_array_equal(tempered, expected)
    assert read_metadata(ensemble_runs["tempered"])["calibration"]["temperature"] == t


def test_threshold_rule_with_temperature_uses_thresholds_of_the_tempered_mean(
    ensemble_runs,
) -> None:
    """The thresholds applied are the 10th percentile, per predicted class, of the tempered
    confidences of the validation images (recomputed here from score's own columns), not the
    thresholds of the untempered augmented copies; each class keeps about 90% of its images."""
    calibration = ensemble_runs["calibration"]
    _, _, frame = _means(ensemble_runs["tempered"])
    applied = read_metadata(ensemble_runs["tempered"])["decision_rule"]["thresholds"]
    np.testing.assert_array_equal(applied, calibration.tempered_thresholds)
    assert not np.allclose(calibration.tempered_thresholds, calibration.thresholds)
    confidence = frame["confidence"].to_numpy().astype(np.float64)
    pred = frame["pred_index"].to_numpy()
    for c in range(len(CLASSES)):
        expected = np.percentile(confidence[pred == c], calibration.settings["percentile"])
        assert applied[c] == expected
        # Linear interpolation: at most ceil(0.1 (n - 1)) of n values fall below it.
        accepted = confidence[pred == c] >= applied[c]
        assert accepted.sum() >= accepted.size - math.ceil(0.1 * (accepted.size - 1))
    decided = np.where(
        confidence >= np.asarray(applied)[pred], frame["pred"].to_numpy(), UNCLASSIFIED_NAME
    )
    np.testing.assert_array_equal(frame["decision"].to_numpy(), decided)


def test_sngp_calibrates_and_scores_with_temperature(tmp_path: Path) -> None:
    """SNGP's temperature is fitted on its mean-field probabilities and applied by score."""
    val = _subset(tmp_path / "val", 6)
    options = CalibrateOptions(model=SNGP, tta=1, passes=1, score_passes=1, seed=1)
    calibration = calibrate_directory(val, tmp_path / "cal.json", options)
    assert calibration.predictor["method"] == "sngp"
    assert calibration.stats["nll_after"] < calibration.stats["nll_before"]
    plain, tempered = tmp_path / "plain.parquet", tmp_path / "tempered.parquet"
    run = {"model": SNGP, "passes": 1, "calibration": tmp_path / "cal.json"}
    score_directory(val, plain, ScoreOptions(**run))
    score_directory(val, tempered, ScoreOptions(**run, temperature=True))
    means, y, _ = _means(plain)
    # calibrate and score batch the images differently, so their float32 means may differ in
    # the last bits (oneDNN rounds by position in a batch); the fitted optimum moves by as much.
    assert math.isclose(fit_temperature(means, y), calibration.temperature, rel_tol=1e-6)
    expected = apply_temperature(means.astype(np.float64), calibration.temperature)
    np.testing.assert_array_equal(_means(tempered)[0], expected.astype(np.float32))


def test_tempering_sngp_mean_field_probabilities_tempers_its_logits() -> None:
    """softmax(log softmax(z) / T) = softmax(z / T): what the temperature rescales for SNGP
    with one pass is its mean-field logits z = logits / sqrt(1 + pi/8 v), to float32 rounding."""
    import tensorflow as tf

    from batchuq.sngp import mean_field_logits

    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(0, 4, (200, 10)), tf.float32)
    variance = tf.constant(rng.uniform(0, 1, 200), tf.float32)
    z = mean_field_logits(logits, variance, math.pi / 8).numpy().astype(np.float64)
    probs = tf.nn.softmax(mean_field_logits(logits, variance, math.pi / 8)).numpy()
    for t in (0.3, 1.7):
        direct = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
        direct /= direct.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(apply_temperature(probs, t), direct, atol=1e-5)


@pytest.fixture(scope="module")
def adaptive_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MC dropout calibrated with --score-passes auto for --rule risk (rounds of 5 passes, at
    most 30) on 10 validation images per class, then those scored with `batchuq score --passes
    auto --rule risk --calibration`."""
    work = tmp_path_factory.mktemp("adaptive")
    val = _subset(work / "val", 10)
    adaptive = {"min_passes": 5, "max_passes": 30}
    options = CalibrateOptions(
        model=DEMO,
        tta=1,
        passes=1,
        score_passes="auto",
        score_rule="risk",
        target_risk=0.1,
        seed=3,
        **adaptive,
    )
    calibration = calibrate_directory(val, work / "cal.json", options)
    out = work / "val.parquet"
    args = ["score", str(val), str(out), "--model", str(DEMO), "--passes", "auto"]
    args += ["--min-passes", "5", "--max-passes", "30", "--rule", "risk", "--seed", "3"]
    result = CliRunner().invoke(cli, [*args, "--calibration", str(work / "cal.json")])
    assert result.exit_code == 0, result.output  # the command line, its early checks included
    return {"calibration": calibration, "out": out}


def test_adaptive_calibration_records_its_predictor(adaptive_runs) -> None:
    predictor = adaptive_runs["calibration"].predictor
    assert predictor["passes"] == "auto"
    assert predictor["adaptive"] == {
        "min_passes": 5,
        "max_passes": 30,
        "alpha": 0.01,
        "stopping": {"rule": "pred settled (none, risk)"},
    }
    metadata = read_metadata(adaptive_runs["out"])
    assert metadata["calibration"]["predictor_mismatch"] is None
    assert metadata["decision_rule"]["rule"] == "risk"


def test_adaptive_calibration_is_what_score_passes_auto_computes(adaptive_runs) -> None:
    """Scoring the validation folder with the same adaptive predictor gives back every fitted
    quantity: the images stop at different passes, and the temperature, the LAC quantile and
    the selective threshold refitted on score's columns are the calibration's."""
    calibration = adaptive_runs["calibration"]
    means, y, frame = _means(adaptive_runs["out"])
    passes = frame["passes"].to_numpy()
    assert passes.min() < passes.max() <= 30
    assert fit_temperature(means, y) == calibration.temperature
    p_true = means.astype(np.float64)[np.arange(len(y)), y]
    n, alpha = len(y), calibration.alpha
    quantile = np.sort(1.0 - p_true)[math.ceil((n + 1) * (1 - alpha)) - 1]
    assert quantile == calibration.conformal_quantiles[0]
    correct = frame["pred_index"].to_numpy() == y
    threshold, _ = fit_selective_threshold(
        frame["confidence"].to_numpy().astype(np.float64), correct, 0.1, 0.1
    )
    assert threshold == calibration.selective.threshold
    accepted = frame["decision"].to_numpy() != UNCLASSIFIED_NAME
    np.testing.assert_array_equal(accepted, frame["confidence"].to_numpy() >= threshold)
