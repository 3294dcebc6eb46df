"""Label-free accuracy: the ATC threshold (``postprocess.atc``), its fit by ``calibrate`` and the
``estimated_accuracy`` that ``score --calibration`` writes, read by ``monitor``.

The digits tests calibrate the bundled model on ``sample_data/digits/val`` and score the test
digits once (T = 5 passes: the estimate's bookkeeping does not depend on T), then recompute the
estimate from the Parquet rows.
"""

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
from batchuq.cli.runtime import EXIT_OK
from batchuq.errors import UsageError
from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory
from batchuq.jobs.monitor import monitor_runs
from batchuq.jobs.score import ScoreOptions, score_directory
from batchuq.output.schema import read_metadata
from batchuq.postprocess.atc import (
    AccuracyEstimate,
    atc_scores,
    estimate_accuracy,
    fit_atc,
    tempered_probabilities,
)
from batchuq.postprocess.calibration_file import Calibration, format_summary

REPO = Path(__file__).resolve().parents[1]
SAMPLE_VAL = REPO / "sample_data" / "digits" / "val"
SAMPLE_TEST = REPO / "sample_data" / "digits" / "test"
NAMES = [f"n{i}" for i in range(10)]
PASSES = 5


# --- the threshold -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_leaves_as_many_above_as_are_correct(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=200)
    correct = rng.random(200) < 0.8
    t = fit_atc(scores, correct)
    # Direct: the (k+1)-th largest score, k the correct count; exactly k lie above it.
    k = int(correct.sum())
    assert t == np.sort(scores)[::-1][k]
    assert int((scores > t).sum()) == k
    assert estimate_accuracy(scores, t) == pytest.approx(correct.mean(), abs=0)
    shifted = scores - 0.5  # a harder night: fewer above the same threshold
    assert estimate_accuracy(shifted, t) < correct.mean()


def test_threshold_edge_cases_and_bad_input() -> None:
    scores = np.array([0.9, 0.8, 0.7])
    assert fit_atc(scores, [True, True, True]) == -math.inf  # every image above it
    assert estimate_accuracy(scores, -math.inf) == 1.0
    assert fit_atc(scores, [False, False, False]) == 0.9  # none above it
    assert estimate_accuracy(scores, 0.9) == 0.0
    assert math.isnan(estimate_accuracy(np.zeros(0), 0.5))
    with pytest.raises(UsageError, match=r"Received: scores="):
        fit_atc([0.5, math.nan], [True, False])
    with pytest.raises(UsageError, match="same length"):
        fit_atc([0.5, 0.6], [True])


def test_scores_and_counts_batch_by_batch_equal_the_whole() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, (300, 4))
    means = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    scores = atc_scores(means)
    p = means.astype(np.float64)
    np.testing.assert_allclose(scores["ne"], (p * np.log(p)).sum(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(scores["mc"], p.max(axis=1))
    thresholds = {"mc": 0.7, "ne": -0.8}
    counter = AccuracyEstimate(thresholds, temperature=0.5)
    for start in range(0, 300, 64):
        counter.add(means[start : start + 64])
    whole = atc_scores(tempered_probabilities(means, 0.5))
    got = counter.as_metadata()
    assert got["images"] == 300 and got["tempered"] is True
    for name, t in thresholds.items():
        assert got[f"atc_{name}"] == estimate_accuracy(whole[name], t)
    assert got["average_confidence"] == pytest.approx(whole["mc"].mean(), rel=1e-12)
    assert AccuracyEstimate(thresholds).as_metadata()["atc_mc"] is None  # no image


# --- calibrate, score, monitor on the digits -----------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The calibration on val (one run: both predictors T = 5), and val and test scored with
    it, test twice: with and without ``--temperature``."""
    work = tmp_path_factory.mktemp("atc")
    same = {"tta": 1, "passes": PASSES, "score_passes": PASSES, "seed": 0}
    cal = work / "cal.json"
    calibrate_directory(SAMPLE_VAL, cal, CalibrateOptions(**same))
    files = {"calibration": cal}
    for name, folder, temperature in (
        ("val", SAMPLE_VAL, False),
        ("test", SAMPLE_TEST, False),
        ("test_tempered", SAMPLE_TEST, True),
    ):
        files[name] = work / f"{name}.parquet"
        options = ScoreOptions(passes=PASSES, calibration=cal, temperature=temperature)
        score_directory(folder, files[name], options)
    return files


def test_calibrate_fits_atc_on_the_tempered_mean(digits: dict[str, Path]) -> None:
    cal = Calibration.from_json(digits["calibration"])
    assert cal.atc is not None and set(cal.atc["thresholds"]) == {"mc", "ne"}
    assert cal.atc["accuracy"] == cal.stats["accuracy"] and cal.atc["images"] == 269
    # The same predictor and seed: score's val rows are calibrate's MC means.
    frame = pd.read_parquet(digits["val"])
    correct = (frame.pred_index == frame.label_index).to_numpy(bool)
    means = frame[[f"mean_{n}" for n in NAMES]].to_numpy()
    scores = atc_scores(tempered_probabilities(means, cal.temperature))
    for name in ("mc", "ne"):
        assert cal.atc["thresholds"][name] == fit_atc(scores[name], correct)
    assert "label-free accuracy (ATC" in format_summary(cal)


def _recount(frame: pd.DataFrame, cal: Calibration, temperature: float | None) -> dict:
    probs = tempered_probabilities(frame[[f"mean_{n}" for n in NAMES]].to_numpy(), temperature)
    scores = atc_scores(probs)
    out = {f"atc_{k}": estimate_accuracy(scores[k], t) for k, t in cal.atc["thresholds"].items()}
    return out | {"average_confidence": float(scores["mc"].mean())}


def test_score_writes_the_estimate_the_rows_give(digits: dict[str, Path]) -> None:
    cal = Calibration.from_json(digits["calibration"])
    plain = read_metadata(digits["test"])["run"]["estimated_accuracy"]
    tempered = read_metadata(digits["test_tempered"])["run"]["estimated_accuracy"]
    assert plain["images"] == 450 and plain["tempered"] is True
    # From the mean_* columns with the calibration's temperature, and from the tempered
    # columns of the --temperature run: one float32 rounding of the same tempered mean.
    for found, frame, temperature in (
        (plain, pd.read_parquet(digits["test"]), cal.temperature),
        (tempered, pd.read_parquet(digits["test_tempered"]), None),
    ):
        expected = _recount(frame, cal, temperature)
        for key in ("atc_mc", "atc_ne"):
            assert found[key] == expected[key], key
        assert found["average_confidence"] == pytest.approx(expected["average_confidence"], 1e-12)
    assert plain == tempered  # the temperature does not change the estimate
    accuracy = (pd.read_parquet(digits["test"]).eval("pred_index == label_index")).mean()
    assert abs(plain["atc_mc"] - accuracy) < 0.05  # clean digits: an estimate near the truth


def test_monitor_reads_the_estimate_of_real_runs(digits: dict[str, Path]) -> None:
    report = monitor_runs(digits["test"], [digits["val"]])
    tonight = read_metadata(digits["test"])["run"]["estimated_accuracy"]
    reference = read_metadata(digits["val"])["run"]["estimated_accuracy"]
    assert set(report.estimated_accuracy) == {"atc_mc", "atc_ne", "average_confidence"}
    for key, entry in report.estimated_accuracy.items():
        assert entry["tonight"] == tonight[key] and entry["reference"] == reference[key]
        assert entry["change"] == pytest.approx(tonight[key] - reference[key], abs=1e-15)


def test_a_calibration_without_atc_loads_and_scores_without_estimate(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    data = json.loads(digits["calibration"].read_text())
    del data["atc"]  # as written before ATC was fitted
    data["knn"] = None  # (no side file beside this copy)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert Calibration.from_json(old).atc is None
    out = tmp_path / "out.parquet"
    args = [str(SAMPLE_VAL / "n3"), str(out), "--passes", str(PASSES), "--calibration", str(old)]
    result = CliRunner().invoke(cli, ["score", *args, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == EXIT_OK, result.output
    assert "estimated_accuracy" not in read_metadata(out)["run"]
    assert "estimated accuracy" not in result.output
    assert monitor_runs(out, [digits["val"]]).estimated_accuracy is None  # one side lacks it


def test_the_summary_line_states_the_estimate(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    cal = str(digits["calibration"])
    args = [str(SAMPLE_VAL / "n3"), str(out), "--passes", str(PASSES), "--calibration", cal]
    result = CliRunner().invoke(cli, ["score", *args, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == EXIT_OK, result.output
    found = read_metadata(out)["run"]["estimated_accuracy"]
    line = [x for x in result.output.splitlines() if " images, " in x][-1]
    assert (
        f"estimated accuracy {100 * found['atc_mc']:.1f}% (ATC-MC), "
        f"{100 * found['atc_ne']:.1f}% (ATC-NE), average confidence "
        f"{100 * found['average_confidence']:.1f}%"
    ) in line


def test_a_resumed_run_counts_the_rows_its_checkpoint_held(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    from batchuq.errors import StopRequested
    from batchuq.jobs.score import RunControl

    folder = tmp_path / "n3"
    shutil.copytree(SAMPLE_VAL / "n3", folder)
    (folder / "aaa_bad.jpg").write_text("not an image")  # an error row: not counted
    options = ScoreOptions(passes=PASSES, batch_size=4, calibration=digits["calibration"])
    clean = score_directory(folder, tmp_path / "clean.parquet", options)
    out = tmp_path / "out.parquet"
    checks = iter(range(1000))
    with pytest.raises(StopRequested):  # stops at the start of the third batch
        score_directory(
            folder,
            out,
            options,
            control=RunControl(
                resume=True, checkpoint_rows=4, should_stop=lambda: next(checks) >= 4
            ),
        )
    resumed = score_directory(
        folder, out, options, control=RunControl(resume=True, checkpoint_rows=4)
    )
    assert resumed.estimated_accuracy == clean.estimated_accuracy
    assert resumed.estimated_accuracy["images"] == clean.images - 1
    assert read_metadata(out)["run"]["estimated_accuracy"] == clean.estimated_accuracy
