"""``batchuq monitor``: the drift tests, their false-alarm rate, the command's exit codes, JSON
and report.

Nights are written as ``batchuq score`` writes them (``output_schema`` and ``score_record_batch``)
from synthetic scores, so that these tests need no model and run in seconds. The statistics are
checked against hand computations and against what they promise (at most alpha false alarms
over many clean splits); the command runs in a fresh interpreter for its exit codes, which also
shows it never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from scipy import stats

from batchuq import drift
from batchuq.cli import cli
from batchuq.defaults import STATUS_OK, UNCLASSIFIED
from batchuq.errors import NoImagesFoundError, UsageError
from batchuq.jobs.monitor import (
    MonitorSettings,
    monitor_runs,
    night_tests,
    pool,
    read_night,
    reference_nights,
    setting_differences,
)
from batchuq.output.schema import RUN_METADATA_KEY, output_schema, score_record_batch

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c", "d"]
METADATA = {
    "class_names": CLASSES,
    "model_sha256": "0" * 64,
    "method": "mc_dropout",
    "passes": 100,
    "tta": 1,
    "decision_rule": {"rule": "median", "min_median": 0.5},
    "calibration": None,
    "adaptive": None,
}


def scores(rows: int, seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Synthetic per-image statistics; ``shift`` > 0 makes the images harder (less confident)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (rows, len(CLASSES)))
    logits[np.arange(rows), rng.integers(0, len(CLASSES), rows)] += 4.0 - 3.0 * shift
    mean = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    std = rng.uniform(0.0, 0.05 + 0.1 * shift, mean.shape)
    top2 = np.sort(mean, axis=1)[:, -2:]
    return {
        "mean": mean,
        "median": mean,
        "std": std,
        "confidence": top2[:, 1],
        "margin": top2[:, 1] - top2[:, 0],
        "entropy": -(mean * np.log(mean)).sum(axis=1),
        "mutual_info": rng.gamma(2.0, 0.01 * (1 + 3 * shift), rows),
        "variation_ratio": np.zeros(rows),
    }


def write_night(
    path: Path,
    rows: int = 300,
    seed: int = 0,
    shift: float = 0.0,
    errors: int = 0,
    metadata: dict | None = None,
    pred_set: bool = False,
    run: dict | None = None,
) -> Path:
    """A Parquet file as ``batchuq score`` writes it, with synthetic scores (``pred_set``: with
    a conformal set of the classes above 0.1; ``run``: the footer's run record)."""
    stats_ = scores(rows, seed, shift)
    schema = output_schema(CLASSES, {**METADATA, **(metadata or {})}, pred_set=pred_set)
    pred = stats_["mean"].argmax(axis=1)
    batch = score_record_batch(
        schema,
        CLASSES,
        paths=[f"img{i:05d}.png" for i in range(rows)],
        labels=[None] * rows,
        label_indices=[None] * rows,
        statuses=[STATUS_OK] * (rows - errors) + ["error: unreadable"] * errors,
        pred_index=pred,
        decision_index=np.where(stats_["confidence"] < 0.5, UNCLASSIFIED, pred),
        stats=stats_,
        pred_sets=stats_["mean"] > 0.1 if pred_set else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        writer.write_table(pa.Table.from_batches([batch]))
        if run is not None:
            writer.add_key_value_metadata({RUN_METADATA_KEY: json.dumps(run)})
    return path


# --- the statistics ------------------------------------------------------------------------------


def test_psi_against_a_hand_computation() -> None:
    reference = np.arange(1.0, 11.0)  # quartiles 3.25, 5.5, 7.75
    tonight = np.array([1.0, 2.0, 3.0, 4.0, 9.0, 9.5, 10.0, 10.0])
    np.testing.assert_allclose(drift.psi_edges(reference, 4), [3.25, 5.5, 7.75])
    # Bins (-inf, 3.25], (3.25, 5.5], (5.5, 7.75], (7.75, inf): reference 3, 2, 2, 3 of 10;
    # tonight 3, 1, 0, 4 of 8, the empty bin floored at 1e-4.
    r = np.array([0.3, 0.2, 0.2, 0.3])
    t = np.array([3 / 8, 1 / 8, 1e-4, 4 / 8])
    expected = sum((t - r) * np.log(t / r))
    assert drift.psi(reference, tonight, bins=4) == pytest.approx(expected, rel=1e-12)
    assert drift.psi(reference, reference, bins=4) == 0.0
    # An edge value falls in the bin it closes: 5.5 is in (3.25, 5.5].
    assert drift.psi(reference, [5.5], bins=4) == pytest.approx(
        drift.psi_of_counts([3, 2, 2, 3], [0, 1, 0, 0])
    )


def test_psi_bins_collapse_on_ties() -> None:
    reference = np.r_[np.full(80, 1.0), np.linspace(0.5, 0.99, 20)]
    edges = drift.psi_edges(reference, 10)
    assert edges[-1] == 1.0 and len(edges) == len(set(edges)) < 9


def test_holm_against_a_hand_computation() -> None:
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max.
    np.testing.assert_allclose(drift.holm(p)[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(drift.holm(p)[4])
    assert drift.holm([0.9, 0.8]).tolist() == [1.0, 1.0]


def test_tests_agree_with_scipy_and_the_alert_rule() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 200), rng.normal(0.5, 1, 150)
    test = drift.continuous_test("x", a, b)
    assert test.p_value == stats.ks_2samp(a, b).pvalue
    assert test.wasserstein == pytest.approx(stats.wasserstein_distance(a, b))
    mix = drift.class_mix_test([50, 30, 0, 20], [10, 30, 0, 60])
    table = np.array([[50, 30, 20], [10, 30, 60]])
    assert mix.p_value == pytest.approx(stats.chi2_contingency(table, correction=False).pvalue)
    rate = drift.rate_test("error_rate", (2, 100), (20, 100))
    assert rate.p_value == pytest.approx(stats.fisher_exact([[20, 80], [2, 98]]).pvalue)
    decided = drift.decide([test, mix, rate], alpha=0.05, min_psi=0.0)
    assert all(t.alert for t in decided)
    big = drift.decide([test, mix, rate], alpha=0.05, min_psi=10.0)
    assert not any(t.alert for t in big) and big[0].p_adjusted == decided[0].p_adjusted


def test_false_alarm_rate_of_clean_splits_is_at_most_alpha(tmp_path: Path) -> None:
    # 400 splits of one distribution: every alarm is false. Holm keeps the chance of any
    # alarm over the night's tests at most alpha; three binomial standard errors of slack.
    night = read_night(write_night(tmp_path / "clean.parquet", rows=500, seed=1, errors=5))
    rng = np.random.default_rng(0)
    splits, alarms, uncorrected = 400, 0, 0
    for _ in range(splits):
        order = rng.permutation(night.rows)
        tests = night_tests(night.subset(order[250:]), night.subset(order[:250]))
        alarms += any(t.alert for t in tests)
        uncorrected += any(t.p_value < 0.05 for t in tests)
    alpha = 0.05
    assert alarms / splits <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / splits)
    assert uncorrected > alarms  # without Holm, the same splits alarm more often


def test_a_shifted_night_alarms_and_a_clean_one_does_not(tmp_path: Path) -> None:
    reference = write_night(tmp_path / "ref.parquet", rows=400, seed=1)
    clean = monitor_runs(write_night(tmp_path / "clean.parquet", seed=2), [reference])
    shifted = monitor_runs(write_night(tmp_path / "shift.parquet", seed=3, shift=0.5), [reference])
    assert not clean.alert
    assert shifted.alert and {"confidence", "entropy", "top_std"} <= set(shifted.alerts)


def test_set_size_is_tested_when_both_sides_have_sets(tmp_path: Path) -> None:
    with_sets = read_night(write_night(tmp_path / "s.parquet", rows=40, pred_set=True))
    expected = (scores(40, 0)["mean"] > 0.1).sum(axis=1)
    np.testing.assert_array_equal(with_sets.values["set_size"], expected)
    without = read_night(write_night(tmp_path / "n.parquet", rows=40, seed=1))
    assert "set_size" in [t.name for t in night_tests(with_sets, with_sets)]
    assert "set_size" not in [t.name for t in night_tests(with_sets, without)]


def test_subset_and_pool_keep_rows_together(tmp_path: Path) -> None:
    night = read_night(write_night(tmp_path / "n.parquet", rows=50, errors=4))
    assert (night.rows, night.scored, night.errors) == (50, 46, 4)
    half = night.subset(np.arange(25, 50))  # the 4 error rows are the last ones
    assert (half.rows, half.errors, half.values["confidence"].size) == (25, 4, 21)
    whole = pool([night.subset(np.arange(25)), half])
    np.testing.assert_array_equal(whole.values["top_std"], night.values["top_std"])
    assert whole.class_counts.tolist() == night.class_counts.tolist()


# --- runs, references and history ----------------------------------------------------------------


def test_history_reference_takes_the_last_nights_before_tonight(tmp_path: Path) -> None:
    history = tmp_path / "history"
    for day in range(1, 6):
        write_night(history / f"date=2026-12-0{day}" / "part-0.parquet", rows=60, seed=day)
    tonight = history / "date=2026-12-04"
    runs, from_history = reference_nights([history], tonight, last=2)
    assert from_history and [r.name for r in runs] == ["date=2026-12-02", "date=2026-12-03"]
    report = monitor_runs(tonight, [history], MonitorSettings(last=2))
    assert [e["date"] for e in report.series] == ["2026-12-02", "2026-12-03", "2026-12-04"]
    assert report.series[-1]["tonight"] and set(report.series[0]["p_adjusted"]) == {
        t.name for t in report.tests
    }


def test_reference_with_other_settings_is_a_usage_error(tmp_path: Path) -> None:
    tonight = write_night(tmp_path / "t.parquet")
    other = write_night(tmp_path / "r.parquet", metadata={"passes": 20})
    with pytest.raises(UsageError, match="passes: 20 in the reference, 100 tonight") as info:
        monitor_runs(tonight, [other])
    assert "Received: reference=" in str(info.value)


def test_settings_compared_and_not_compared() -> None:
    calibration = {"temperature": 1.5, "conformal_alpha": 0.1, "created": "2026-11-01"}
    ref = {**METADATA, "seed": 0, "engine": "local", "calibration": calibration}
    same = {**ref, "seed": 7, "engine": "ray", "calibration": {**calibration, "created": "x"}}
    assert setting_differences(ref, same) == []
    other = {**ref, "model_sha256": "1" * 64, "calibration": {**calibration, "temperature": 2.0}}
    assert [name for name, _, _ in setting_differences(ref, other)] == [
        "model_sha256",
        "calibration",
    ]


def _estimate(atc_mc: float, average_confidence: float, images: int) -> dict:
    """A run record's ``estimated_accuracy`` as ``score --calibration`` writes it."""
    return {
        "estimated_accuracy": {
            "atc_mc": atc_mc,
            "atc_ne": atc_mc,
            "average_confidence": average_confidence,
            "tempered": True,
            "images": images,
        }
    }


def test_estimated_accuracy_is_reported_when_both_have_it(tmp_path: Path) -> None:
    ref_a = write_night(tmp_path / "a.parquet", rows=100, run=_estimate(0.95, 0.96, 100))
    ref_b = write_night(tmp_path / "b.parquet", rows=300, seed=2, run=_estimate(0.91, 0.92, 300))
    now = write_night(tmp_path / "t.parquet", seed=4, run=_estimate(0.90, 0.93, 300))
    report = monitor_runs(now, [ref_a, ref_b])
    assert set(report.estimated_accuracy) == {"atc_mc", "atc_ne", "average_confidence"}
    mc = report.estimated_accuracy["atc_mc"]  # reference: weighted by the scored rows
    assert mc["reference"] == pytest.approx((0.95 * 100 + 0.91 * 300) / 400)
    assert mc["change"] == pytest.approx(0.90 - mc["reference"])
    plain = monitor_runs(write_night(tmp_path / "p.parquet", seed=5), [ref_a])
    assert plain.estimated_accuracy is None


def test_empty_or_missing_night(tmp_path: Path) -> None:
    (tmp_path / "date=2026-12-02").mkdir()
    ref = write_night(tmp_path / "r.parquet")
    with pytest.raises(NoImagesFoundError):
        monitor_runs(tmp_path / "date=2026-12-02", [ref])
    with pytest.raises(NoImagesFoundError):
        monitor_runs(tmp_path / "date=2026-12-03", [ref], missing_ok=True)
    with pytest.raises(UsageError, match="Received: tonight="):
        monitor_runs(tmp_path / "date=2026-12-03", [ref])


# --- the command ---------------------------------------------------------------------------------

DRIVER = """
import json, sys
import click
from batchuq.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="batchuq", standalone_mode=False)
    code = 0
except click.ClickException as exc:
    exc.show()
    code = exc.exit_code
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print("\\nDRIVER " + json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules}))
"""


def run_monitor(*args: object, cwd: Path) -> tuple[dict, str, str]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, "monitor", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    out, _, last = done.stdout.rpartition("\nDRIVER ")
    return json.loads(last), out, done.stderr


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("monitor")
    history = work / "history"
    for day in range(1, 4):
        write_night(history / f"date=2026-12-0{day}" / "part-0.parquet", rows=200, seed=day)
    write_night(history / "date=2026-12-04" / "part-0.parquet", rows=200, seed=9, shift=0.5)
    write_night(work / "clean.parquet", rows=200, seed=10)
    write_night(work / "other.parquet", rows=200, seed=11, metadata={"tta": 4})
    (work / "history" / "date=2026-12-05").mkdir()
    return work


def test_cli_exit_codes_without_tensorflow(nights: Path) -> None:
    refs = ("-r", "history/date=2026-12-01", "-r", "history/date=2026-12-02/part-0.parquet")
    quiet, text, _ = run_monitor("clean.parquet", *refs, cwd=nights)
    assert quiet["code"] == 0 and "quiet" in text
    assert not quiet["tensorflow"] and not quiet["keras"]
    alert, text, _ = run_monitor("history/date=2026-12-04", "-r", "history", cwd=nights)
    assert alert["code"] == 5 and "ALERT" in text
    empty, _, err = run_monitor("history/date=2026-12-05", "-r", "history", cwd=nights)
    assert empty["code"] == 4 and "no rows" in err
    usage, _, err = run_monitor("clean.parquet", "-r", "other.parquet", cwd=nights)
    assert usage["code"] == 2 and "tta" in err and "Received: reference=" in err
    assert not any(r["tensorflow"] for r in (alert, empty, usage))


def invoke(*args: object, cwd: Path) -> Result:
    """The command in this process (Click's runner), for what needs no fresh interpreter."""
    with contextlib.chdir(cwd):
        return CliRunner().invoke(cli, ["monitor", *map(str, args)], catch_exceptions=False)


def test_cli_json_keys_and_config_thresholds(nights: Path) -> None:
    result = invoke("history/date=2026-12-04", "-r", "history", "--last", "2", "--json", cwd=nights)
    report = json.loads(result.stdout)
    assert result.exit_code == 5
    assert set(report) == {
        "alert", "alerts", "settings", "tonight", "reference", "tests", "estimated_accuracy",
        "series",
    }  # fmt: skip
    assert set(report["tests"][0]) == {
        "name", "test", "statistic", "p_value", "p_adjusted", "psi", "wasserstein",
        "reference", "tonight", "n_reference", "n_tonight", "alert",
    }  # fmt: skip
    assert [r["date"] for r in report["reference"]["runs"]] == ["2026-12-02", "2026-12-03"]
    # A PSI no test reaches, from batchuq.toml: the same p-values, no alert.
    (nights / "batchuq.toml").write_text("[monitor]\nmin_psi = 50.0\n")
    try:
        calm = invoke("history/date=2026-12-04", "-r", "history", "--json", cwd=nights)
    finally:
        (nights / "batchuq.toml").unlink()
    assert calm.exit_code == 0 and json.loads(calm.stdout)["settings"]["min_psi"] == 50.0


def test_cli_report_renders(nights: Path) -> None:
    result = invoke("history/date=2026-12-04", "-r", "history", "--report", "report", cwd=nights)
    assert result.exit_code == 5, result.output
    page = (nights / "report" / "index.html").read_text()
    images = [p.split('"')[0] for p in page.split('<img src="')[1:]]
    assert {"distributions.png", "class_mix.png", "series.png"} <= set(images)
    assert all((nights / "report" / image).stat().st_size > 1000 for image in images)


def test_cli_report_of_a_quiet_night_renders(nights: Path) -> None:
    """Found by the Airflow DAG's test: a quiet test's title colour once broke the report."""
    refs = ("-r", "history/date=2026-12-01", "-r", "history/date=2026-12-02/part-0.parquet")
    result = invoke("clean.parquet", *refs, "--report", "quiet", cwd=nights)
    assert result.exit_code == 0, result.output
    assert (nights / "quiet" / "index.html").is_file()
    assert (nights / "quiet" / "distributions.png").stat().st_size > 1000
