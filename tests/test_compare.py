"""`batchuq compare`: one table over several scored files, evaluate's numbers, shift series."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_TEST

from batchuq import metrics
from batchuq.cli import cli
from batchuq.errors import UsageError
from batchuq.jobs.compare import (
    COMPARED_SCORE,
    INTERVAL_METRICS,
    Shift,
    compare_files,
    format_comparison,
    series_table,
    shift_of,
    verdict,
)
from batchuq.jobs.evaluate import evaluate_frame, evaluate_parquet, read_scored_file

METRICS = ("accuracy", "coverage", "selective_accuracy", "nll", "brier", "ece", "aurc")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict[str, Path]:
    """The same 30 digits scored deterministically (T = 1) and with MC dropout (T = 5)."""
    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions

    root = tmp_path_factory.mktemp("compare")
    images = root / "digits"
    for folder in sorted(SAMPLE_TEST.iterdir()):
        (images / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:3]:
            shutil.copy(image, images / folder.name / image.name)
    files = {"det": root / "det.parquet", "mc": root / "mc.parquet"}
    score_directory(images, files["det"], ScoreOptions(passes=1))
    score_directory(images, files["mc"], ScoreOptions(passes=5))
    return files


def _rewrite(src: Path, dst: Path, *, images: str | None = None, keep: int | None = None) -> Path:
    """A copy of a scored file: its first ``keep`` rows, its metadata ``images`` replaced."""
    table = pq.read_table(src)
    if keep is not None:
        table = table.slice(0, keep)
    metadata = dict(table.schema.metadata)
    batchuq = json.loads(metadata[b"batchuq"])
    if images is not None:
        batchuq["images"] = images
    metadata[b"batchuq"] = json.dumps(batchuq).encode()
    pq.write_table(table.replace_schema_metadata(metadata), dst)
    return dst


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["compare", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_json_rows_are_evaluates_numbers(scored):
    code, out, _ = _run(scored["det"], scored["mc"], "--names", "det,mc", "--json")
    assert code == 0
    parsed = json.loads(out)
    rows = parsed["rows"]
    assert [row["name"] for row in rows] == ["det", "mc"]
    assert [row["passes"] for row in rows] == [1, 5]
    assert parsed["settings"]["score"] == COMPARED_SCORE == "entropy"
    assert parsed["series"] is None
    for row, key in zip(rows, ("det", "mc"), strict=True):
        results = evaluate_parquet(scored[key])
        assert row["n"] == results["n"] == 30
        assert row["method"] == "mc_dropout"
        for metric in METRICS:
            assert row[metric] == results[metric], metric  # the same numbers, not close ones
        assert row["auroc_error"] == results["auroc_error"]["entropy"]
        assert row["ood_auroc"] is None and row["mean_set_size"] is None
    # Five passes of one copy are five samples per image.
    assert [row["samples_per_image"] for row in rows] == [1, 5]


def test_table_prints_and_ood_columns(scored):
    # Any file scored by the same model serves as the "OOD" file of the mechanics.
    args = [scored["det"], scored["mc"], "--ood", scored["mc"], "--ood", scored["det"]]
    code, out, _ = _run(*args)
    assert code == 0
    print(out)
    header = out.splitlines()[2]
    for column in ("name", "method", "N", "acc", "NLL", "ECE", "AURC", "AUROC OOD", "img/s"):
        assert column in header
    assert "det " in out and "mc " in out and "set size" not in out
    comparison = compare_files([scored["det"]], ood=[scored["mc"]])
    expected = evaluate_parquet(scored["det"], scored["mc"])["ood"]["auroc"]["entropy"]
    assert comparison.rows[0]["ood_auroc"] == expected is not None


def test_images_per_second_is_read_from_the_metadata(scored, tmp_path):
    comparison = compare_files([scored["det"]])
    recorded = read_scored_file(scored["det"]).metadata.get("run", {}).get("images_per_second")
    assert comparison.rows[0]["images_per_second"] == recorded  # None until score records it


def test_different_paths_are_refused_or_intersected(scored, tmp_path):
    cut = _rewrite(scored["mc"], tmp_path / "cut.parquet", keep=25)
    code, _, err = _run(scored["det"], cut)
    assert code == 2
    assert "do not hold the same images" in err and "--intersect" in err
    with pytest.raises(UsageError, match=r"5 paths are only in the first.*Received: files="):
        compare_files([scored["det"], cut])

    code, out, err = _run(scored["det"], cut, "--intersect", "--json")
    assert code == 0
    assert "5 rows dropped" in err and "det.parquet" in err
    rows = json.loads(out)["rows"]
    assert [row["n"] for row in rows] == [25, 25]
    assert json.loads(out)["settings"]["dropped"] == {str(scored["det"]): 5}
    # The kept rows of det, evaluated by evaluate itself.
    det = read_scored_file(scored["det"])
    kept = det.frame[det.frame["path"].isin(set(pq.read_table(cut)["path"].to_pylist()))]
    expected = evaluate_frame(kept, det.class_names)
    for metric in METRICS:
        assert rows[0][metric] == expected[metric], metric


def test_bad_arguments_exit_2(scored):
    code, _, err = _run(scored["det"], scored["mc"], "--names", "only_one")
    assert code == 2 and "Received: names=" in err
    code, _, err = _run(scored["det"], scored["mc"], "--ood", scored["det"])
    assert code == 2 and "Received: ood=" in err
    with pytest.raises(UsageError, match="Received: paths=\\[\\]"):
        compare_files([])


def test_report_writes_the_plots(scored, tmp_path):
    code, _, err = _run(scored["det"], scored["mc"], "--names", "det,mc", "--report", tmp_path)
    assert code == 0 and "report:" in err
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    for name in ("reliability.png", "risk_coverage.png", "cost_quality.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert name in page
    assert not (tmp_path / "series.png").exists()


def test_shift_of_reads_the_layout_of_batchuq_shift():
    assert shift_of("/data/shift/gaussian_noise/3") == Shift("gaussian_noise", 3)
    assert shift_of("out/contrast/1/") == Shift("contrast", 1)
    assert shift_of("sample_data/digits/test") == Shift()
    assert shift_of("x/jpeg/0") == Shift()  # severities start at 1
    assert shift_of(None) == Shift() and Shift().label == "clean"


def _series_files(scored: dict[str, Path], folder: Path) -> list[Path]:
    """A small synthetic series: each method clean, then 2 corruptions x severities 1 and 3.

    The corrupted files are the first rows of the clean ones (20 at severity 1, 10 at 3), so
    their metrics differ; only the metadata ``images`` folder says where each sits.
    """
    files = []
    for method in ("det", "mc"):
        files.append(_rewrite(scored[method], folder / f"{method}.parquet", images="x/digits"))
        for corruption in ("gaussian_noise", "contrast"):
            for severity, keep in ((1, 20), (3, 10)):
                keep -= 5 * (corruption == "contrast")
                name = f"{method}_{corruption}_{severity}.parquet"
                images = f"x/shift/{corruption}/{severity}"
                files.append(_rewrite(scored[method], folder / name, images=images, keep=keep))
    return files


def test_series_groups_and_averages_over_corruptions(scored, tmp_path):
    files = _series_files(scored, tmp_path)
    code, out, _ = _run(*files, "--series", "--json")
    assert code == 0
    parsed = json.loads(out)
    rows, series = parsed["rows"], parsed["series"]
    # Default names from the metadata: one name per method, shared by its files.
    assert {row["name"] for row in rows} == {"mc_dropout T=1", "mc_dropout T=5"}
    assert [(e["name"], e["severity"], e["corruptions"]) for e in series] == [
        ("mc_dropout T=1", 0, 0),
        ("mc_dropout T=1", 1, 2),
        ("mc_dropout T=1", 3, 2),
        ("mc_dropout T=5", 0, 0),
        ("mc_dropout T=5", 1, 2),
        ("mc_dropout T=5", 3, 2),
    ]
    for entry in series:
        members = [
            r for r in rows if r["name"] == entry["name"] and r["severity"] == entry["severity"]
        ]
        for metric in ("accuracy", "ece", "nll", "brier"):
            values = [evaluate_parquet(r["file"])[metric] for r in members]
            assert entry[metric] == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert series == series_table(rows)

    names = ",".join(["det"] * 5 + ["mc"] * 5)
    code, out, _ = _run(*files, "--series", "--names", names, "--report", tmp_path / "report")
    assert code == 0
    print(out)
    assert "Shift series: mean over corruptions per severity" in out
    assert "gaussian_noise/3" in out and "clean" in out
    assert (tmp_path / "report" / "series.png").stat().st_size > 1000


def test_series_refuses_two_files_in_one_cell(scored, tmp_path):
    files = _series_files(scored, tmp_path)
    code, _, err = _run(*files, "--series", "--names", ",".join(["same"] * 10))
    assert code == 2 and "Two files of the series are 'same' at clean" in err


def test_text_table_of_a_comparison(scored):
    text = format_comparison(compare_files([scored["det"], scored["mc"]], names=["det", "mc"]))
    lines = text.splitlines()
    assert lines[2].split()[:3] == ["name", "method", "T"]
    assert lines[4].split()[:4] == ["det", "mc_dropout", "1", "1"]
    assert lines[5].split()[:4] == ["mc", "mc_dropout", "5", "1"]


def test_help_imports_nothing_heavy():
    probe = (
        "import sys\nfrom batchuq.cli import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
        "    heavy = [m for m in ('tensorflow', 'keras', 'pandas', 'matplotlib') "
        "if m in sys.modules]\n    print('PROBE', exc.code, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "compare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip().splitlines()[-1] == "PROBE 0 []"
    assert "Example:" in done.stdout


# --------------------------------------------------------------------------------------------
# Intervals: the paired bootstrap over images
# --------------------------------------------------------------------------------------------


def test_resampled_metrics_are_the_metrics_of_the_expanded_resample():
    # Confidences on a grid of 0.01 so that ties occur (AURC keeps their input order, the
    # AUROC averages their ranks); each resample expanded into its images, in input order.
    rng = np.random.default_rng(3)
    n = 120
    confidence = np.round(rng.uniform(0.2, 1.0, n), 2)
    correct = rng.uniform(size=n) < confidence
    probs = rng.dirichlet(np.ones(4), n)
    labels = rng.integers(0, 4, n)
    counts = metrics.bootstrap_counts(n, 40, rng)
    assert counts.shape == (40, n) and (counts.sum(axis=1) == n).all()
    resampled = {
        "aurc": metrics.resampled_aurc(confidence, correct, counts),
        "ece": metrics.resampled_ece(confidence, correct, counts),
        "auroc": metrics.resampled_auroc(confidence, ~correct, counts),
        "accuracy": metrics.resampled_mean(correct, counts),
        "nll": metrics.resampled_mean(metrics.nll_terms(probs, labels), counts),
        "brier": metrics.resampled_mean(metrics.brier_terms(probs, labels), counts),
    }
    for b in range(len(counts)):
        i = np.repeat(np.arange(n), counts[b].astype(int))
        expected = {
            "aurc": metrics.aurc(confidence[i], correct[i]),
            "ece": metrics.ece(confidence[i], correct[i]),
            "auroc": metrics.auroc(confidence[i], ~correct[i]),
            "accuracy": float(np.mean(correct[i])),
            "nll": metrics.nll(probs[i], labels[i]),
            "brier": metrics.brier(probs[i], labels[i]),
        }
        for key, value in expected.items():
            assert resampled[key][b] == pytest.approx(value, rel=1e-12, abs=1e-14), (key, b)


def test_resampled_metrics_of_nothing_drawn_are_undefined():
    counts = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    confidence, correct = np.array([0.9, 0.6]), np.array([True, False])
    assert np.isnan(metrics.resampled_mean(correct, counts)[0])
    assert np.isnan(metrics.resampled_aurc(confidence, correct, counts)[0])
    assert np.isnan(metrics.resampled_ece(confidence, correct, counts)[0])
    # A resample without a negative (or a positive) has no AUROC.
    auroc = metrics.resampled_auroc(confidence, ~correct, counts)
    assert np.isnan(auroc[0]) and auroc[1] == 0.0 and np.isnan(auroc[2])  # wrong: 0.6 < 0.9


def test_percentile_interval_needs_the_statistic_in_nearly_every_resample():
    samples = np.tile(np.arange(1000.0)[:, None], (1, 2))
    samples[:5, 0] = np.nan  # 0.5% undefined: left out
    samples[:20, 1] = np.nan  # 2% undefined: no interval
    low, high = metrics.percentile_interval(samples)
    assert 5 < low[0] < 35 and 970 < high[0] < 999
    assert np.isnan(low[1]) and np.isnan(high[1])


def _simulated_coverage(draw, truth: float, repetitions: int = 400) -> float:
    """How often the 95% interval of the bootstrap holds ``truth``, over seeded data sets.

    ``draw(rng)`` gives one data set as an ``(n, k)`` array of 0/1 outcomes; the statistic
    is the last column's mean minus the first's (with k = 1, the mean itself).
    """
    hits = 0
    for repetition in range(repetitions):
        data = draw(np.random.default_rng([7, repetition]))

        def statistic(counts, data=data):
            means = np.stack([metrics.resampled_mean(col, counts) for col in data.T], axis=1)
            return means[:, -1] - (means[:, 0] if data.shape[1] > 1 else 0.0)

        samples = metrics.paired_bootstrap(statistic, [len(data)], 1000, seed=repetition)
        low, high = metrics.percentile_interval(samples)
        hits += bool(low <= truth <= high)
    return hits / repetitions


def test_bootstrap_covers_the_true_accuracy_and_the_true_paired_difference():
    # 400 repetitions: a 95% interval covers in 0.95 +- 0.011 (one Monte-Carlo standard
    # error) of them; the bounds below are about three standard errors.
    def bernoulli(rng):
        return (rng.uniform(size=(200, 1)) < 0.8).astype(float)

    accuracy = _simulated_coverage(bernoulli, 0.8)

    # Two classifiers right on the same images 70% of the time: their difference has a
    # much smaller spread than either, which only a paired resample sees. Resampling the
    # two independently would cover the true difference (0.05) in nearly every repetition.
    def correlated(rng):
        u = rng.uniform(size=200)
        v = np.where(rng.uniform(size=200) < 0.7, u, rng.uniform(size=200))
        return np.column_stack([u < 0.8, v < 0.85]).astype(float)

    difference = _simulated_coverage(correlated, 0.05)
    print(f"\ncoverage of the 95% interval: accuracy {accuracy:.3f}, difference {difference:.3f}")
    assert 0.915 <= accuracy <= 0.985
    assert 0.915 <= difference <= 0.985


def test_paired_bootstrap_is_seeded_and_resamples_each_set_within_itself():
    def statistic(a, b):
        return np.stack([a.sum(axis=1), b.sum(axis=1), a[:, 0], b[:, 0]], axis=1)

    once = metrics.paired_bootstrap(statistic, [50, 7], 300, seed=4)
    assert once.shape == (300, 4)
    assert (once[:, 0] == 50).all() and (once[:, 1] == 7).all()  # each drawn within itself
    assert np.array_equal(once, metrics.paired_bootstrap(statistic, [50, 7], 300, seed=4))
    assert not np.array_equal(once, metrics.paired_bootstrap(statistic, [50, 7], 300, seed=5))
    with pytest.raises(UsageError, match="Received: resamples=0"):
        metrics.paired_bootstrap(statistic, [50], 0)


def _with_probs(src: Path, dst: Path, *, uniform: bool = False, reverse: bool = False) -> Path:
    """A copy of a scored file: its mean probabilities uniform, or its rows in reverse order."""
    table = pq.read_table(src)
    if reverse:
        table = table.take(list(range(table.num_rows))[::-1])
    if uniform:
        for name in [c for c in table.column_names if c.startswith("mean_")]:
            column = pa.array(np.full(table.num_rows, 0.1), table.schema.field(name).type)
            table = table.set_column(table.schema.get_field_index(name), name, column)
    pq.write_table(table, dst)
    return dst


def test_baseline_verdicts_better_worse_and_tie(scored, tmp_path):
    same = _with_probs(scored["det"], tmp_path / "same.parquet", reverse=True)
    flat = _with_probs(scored["det"], tmp_path / "flat.parquet", uniform=True)
    files = [scored["det"], same, flat]
    comparison = compare_files(files, names=["det", "same", "flat"], baseline="det")
    det, same_row, flat_row = comparison.rows
    assert det["difference_to_baseline"] is None
    # The same predictions with their rows reversed: matched by path, every resample's
    # difference is exactly 0 (matched by row position, it would not be); evaluate's own
    # values may differ in the last bit, summed in another order.
    for key, entry in same_row["difference_to_baseline"].items():
        if det[key] is None or (key == "auroc_error" and det["accuracy"] > 0.9):
            # A wrong prediction or two in 30: many resamples draw none, the AUROC has no
            # interval (metrics.percentile_interval).
            assert entry["low"] is entry["verdict"] is None, key
        else:
            assert (entry["low"], entry["high"], entry["verdict"]) == (0.0, 0.0, "tie"), key
            assert entry["value"] == pytest.approx(0.0, abs=1e-12), key  # evaluate's sums
    # Uniform probabilities (NLL ln 10, Brier 0.9) over the same decisions: worse NLL and
    # Brier, and the metrics of the confidence column unchanged.
    diff = flat_row["difference_to_baseline"]
    assert flat_row["nll"] == pytest.approx(np.log(10)) and flat_row["brier"] == pytest.approx(0.9)
    assert diff["nll"]["verdict"] == diff["brier"]["verdict"] == "worse"
    assert diff["nll"]["low"] > 0 and diff["brier"]["low"] > 0
    assert diff["accuracy"]["verdict"] == diff["ece"]["verdict"] == "tie"
    # Seen from the flat file, det is better.
    reverse = compare_files([flat, scored["det"]], names=["flat", "det"], baseline="flat")
    assert reverse.rows[1]["difference_to_baseline"]["nll"]["verdict"] == "better"
    assert verdict("nll", -0.2, -0.1) == "better" and verdict("accuracy", -0.2, -0.1) == "worse"
    assert verdict("coverage", 0.1, 0.2) == "higher" and verdict("ece", None, 0.1) is None


def test_json_intervals_and_differences(scored, tmp_path):
    args = [scored["det"], scored["mc"], "--names", "det,mc", "--ood", scored["mc"]]
    args += ["--ood", scored["det"], "--baseline", str(scored["det"]), "--json"]
    code, out, _ = _run(*args, "--bootstrap", "200", "--seed", "3")
    assert code == 0
    parsed = json.loads(out)
    assert parsed["settings"]["bootstrap"] == {
        "method": "paired percentile bootstrap over images",
        "resamples": 200,
        "seed": 3,
        "level": 0.95,
    }
    det, mc = parsed["rows"]
    assert set(det["intervals"]) == set(INTERVAL_METRICS)
    for key in ("accuracy", "nll", "brier", "ece", "aurc", "ood_auroc"):
        entry = mc["intervals"][key]
        assert entry["value"] == mc[key] and entry["low"] <= entry["high"], key
        difference = mc["difference_to_baseline"][key]
        assert difference["value"] == pytest.approx(mc[key] - det[key], abs=1e-15)
        assert difference["low"] <= difference["high"]
        assert difference["verdict"] in ("better", "worse", "tie")
    assert mc["intervals"]["nll"]["low"] < mc["nll"] < mc["intervals"]["nll"]["high"]
    again = json.loads(_run(*args, "--bootstrap", "200", "--seed", "3")[1])
    assert again["rows"] == parsed["rows"]  # the same seed, the same intervals
    other = json.loads(_run(*args, "--bootstrap", "200", "--seed", "4")[1])
    assert other["rows"][1]["intervals"] != mc["intervals"]

    code, out, _ = _run(scored["det"], scored["mc"], "--bootstrap", "0", "--json")
    parsed = json.loads(out)
    assert code == 0 and parsed["settings"]["bootstrap"] is None
    assert [row["intervals"] for row in parsed["rows"]] == [None, None]


def test_table_and_report_show_the_intervals(scored, tmp_path):
    args = [scored["det"], scored["mc"], "--names", "det,mc", "--baseline", "det"]
    code, out, _ = _run(*args, "--bootstrap", "200")
    assert code == 0
    print(out)
    assert "paired percentile bootstrap over images, B = 200, seed 0" in out
    assert max(len(line) for line in out.split("95% intervals")[1].splitlines()) <= 100
    nll = [line.split() for line in out.splitlines() if line.startswith("NLL ")]
    assert [line[1] for line in nll] == ["det", "mc"] and nll[0][-1] == "baseline"
    assert nll[1][-1] in ("better", "worse", "tie") and nll[1][3].startswith("[")

    code, _, _ = _run(*args, "--bootstrap", "200", "--report", tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert code == 0 and "<h2>Intervals</h2>" in page
    assert page.count('<span class="ci">') >= 2 * 7  # under each metric of each file


def test_baseline_must_be_a_compared_file(scored):
    code, _, err = _run(scored["det"], scored["mc"], "--names", "det,mc", "--baseline", "nope")
    assert code == 2 and "Received: baseline='nope'" in err and "['det', 'mc']" in err
    code, _, err = _run(scored["det"], scored["mc"], "--baseline", "det", "--bootstrap", "0")
    assert code == 2 and "bootstrap > 0" in err
    code, _, err = _run(scored["det"], "--bootstrap", "-1")
    assert code == 2 and "--bootstrap" in err


def test_series_pairs_the_files_of_each_corruption_and_severity(scored, tmp_path):
    files = _series_files(scored, tmp_path)
    args = [*files, "--series", "--baseline", "mc_dropout T=1", "--bootstrap", "100"]
    code, out, _ = _run(*args, "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    for row in rows:
        assert row["intervals"]["accuracy"]["value"] == row["accuracy"]
        if row["name"] == "mc_dropout T=1":
            assert row["difference_to_baseline"] is None
            continue
        # The baseline of each cell is the T=1 file of the same corruption and severity.
        (base,) = [
            r
            for r in rows
            if r["name"] == "mc_dropout T=1"
            and (r["corruption"], r["severity"]) == (row["corruption"], row["severity"])
        ]
        difference = row["difference_to_baseline"]["nll"]
        assert difference["value"] == pytest.approx(row["nll"] - base["nll"], abs=1e-15)
    code, out, _ = _run(*args)
    assert code == 0 and "Intervals of every file of the series: --json or --report." in out


def test_rules_side_by_side_at_their_operating_points(scored, tmp_path):
    """The median (det), confidence and certified risk rules on the same 30 images: each row
    has the rule, coverage and selective risk with its Clopper-Pearson interval; the risk run
    its certified target and whether it held."""
    from batchuq import score_directory
    from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory
    from batchuq.jobs.score import ScoreOptions
    from batchuq.postprocess.rules import DecisionRule
    from batchuq.postprocess.selective import clopper_pearson

    images = Path(evaluate_parquet(scored["det"])["file"]).parent / "digits"
    cal = tmp_path / "cal.json"
    options = CalibrateOptions(passes=1, score_passes=1, target_risk=0.2, delta=0.1)
    calibrate_directory(SAMPLE_TEST.parent / "val", cal, options)
    conf, risk = tmp_path / "conf.parquet", tmp_path / "risk.parquet"
    rule = DecisionRule("confidence", min_confidence=0.99)
    score_directory(images, conf, ScoreOptions(passes=1, rule=rule))
    score_directory(
        images, risk, ScoreOptions(passes=1, calibration=cal, rule=DecisionRule("risk"))
    )
    files = [scored["det"], conf, risk]
    comparison = compare_files(files, names=["median", "conf", "risk"])
    for row, path in zip(comparison.rows, files, strict=True):
        results = evaluate_parquet(path)
        errors = results["accepted"] - round(results["accepted"] * results["selective_accuracy"])
        assert row["accepted"] == results["accepted"]
        assert row["selective_risk"] == pytest.approx(1 - results["selective_accuracy"])
        assert row["risk_interval"] == list(clopper_pearson(errors, results["accepted"]))
    median, confident, certified = comparison.rows
    assert median["rule"].startswith("median") and confident["rule"].startswith("confidence")
    assert certified["rule"].startswith("risk") and certified["target_risk"] == 0.2
    assert certified["target_held"] == (certified["selective_risk"] <= 0.2)
    assert median["target_risk"] is None and median["target_held"] is None
    assert confident["coverage"] < median["coverage"]  # a stricter operating point
    text = format_comparison(comparison)
    assert "Decision rules at their operating points" in text
    table = text.split("Decision rules at their operating points")[1]
    assert "sel.risk" in table and "target" in table and str(certified["target_held"]) in table
    from batchuq.report.compare import write_comparison_report

    page = write_comparison_report(comparison, tmp_path / "report").read_text(encoding="utf-8")
    assert "<h2>Decision rules</h2>" in page and certified["rule"].split(" ")[0] in page
    same = format_comparison(compare_files([scored["det"], scored["mc"]]))
    assert "Decision rules at their operating points" not in same  # one rule: no table
