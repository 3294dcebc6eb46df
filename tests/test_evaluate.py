"""Tests of batchuq.jobs.evaluate and batchuq.report.evaluate on small hand-made Parquet files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchuq import metrics
from batchuq.cli.evaluate import evaluate_command
from batchuq.errors import OutputError, UsageError
from batchuq.jobs import evaluate
from batchuq.jobs.evaluate import (
    RiskCoverage,
    evaluate_file,
    evaluate_frame,
    evaluate_parquet,
    format_rule,
    format_table,
)
from batchuq.output.schema import output_schema
from batchuq.report import evaluate as evaluate_report
from batchuq.report import evaluate_figures, uncertain
from batchuq.report.evaluate import write_evaluation_report, write_report

CLASSES = ["cat", "dog", "fox"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(path, label, label_index, mean, decision, scores, std, pred_set=None, status="ok"):
    """One row in the `batchuq score` layout; scores = (entropy, mutual_info, variation_ratio)."""
    row = {"path": path, "label": label, "label_index": label_index, "status": status}
    if status != "ok":
        return row | {"pred_set": pred_set}
    pred = int(np.argmax(mean))
    ordered = sorted(mean)
    entropy, mutual_info, variation_ratio = scores
    row |= {
        "pred": CLASSES[pred],
        "pred_index": pred,
        "decision": decision,
        "confidence": max(mean),
        "margin": ordered[-1] - ordered[-2],
        "entropy": entropy,
        "mutual_info": mutual_info,
        "variation_ratio": variation_ratio,
        "pred_set": pred_set,
    }
    for c, name in enumerate(CLASSES):
        row[f"mean_{name}"] = mean[c]
        row[f"median_{name}"] = mean[c]
        row[f"std_{name}"] = std[c]
    return row


# Labelled ok rows are a, b, c, d (N = 4); e is unlabelled, g's label is not a class, f failed.
# The scores are set by hand (evaluate reads them as stored).
IN_ROWS = [
    _row("n0/a.png", "cat", 0, [0.8, 0.1, 0.1], "cat", (0.6, 0.1, 0.0), [0.3, 0.0, 0.0], ["cat"]),
    _row(
        "n1/b.png",
        "dog",
        1,
        [0.1, 0.82, 0.08],
        "dog",
        (0.3, 0.2, 0.0),
        [0.15, 0.0, 0.0],
        ["dog", "fox"],
    ),
    _row(
        "n2/c.png",
        "fox",
        2,
        [0.5, 0.1, 0.4],
        "unclassified",
        (1.0, 0.2, 0.0),
        [0.3, 0.3, 0.3],
        ["cat"],
    ),
    _row(
        "n0/d.png",
        "cat",
        0,
        [0.3, 0.3, 0.4],
        "fox",
        (0.5, 0.05, 0.4),
        [0.0, 0.3, 0.3],
        ["cat", "fox"],
    ),
    _row("e.png", None, None, [0.2, 0.7, 0.1], "dog", (0.4, 0.1, 0.1), [0.1, 0.1, 0.1], ["dog"]),
    _row("n9/f.png", "cat", 0, None, None, None, None, status="error: cannot decode image"),
    _row("wolf/g.png", "wolf", None, [0.6, 0.3, 0.1], "cat", (0.7, 0.1, 0.2), [0.1] * 3, ["cat"]),
]
OOD_ROWS = [
    _row("o1.jpg", None, None, [0.35, 0.3, 0.35], "unclassified", (1.05, 0.3, 0.5), [0.2] * 3),
    _row("o2.jpg", None, None, [0.55, 0.25, 0.2], "cat", (0.45, 0.1, 0.2), [0.1] * 3),
    _row("o3.jpg", None, None, None, None, None, None, status="error: truncated file"),
]


def write_parquet(
    path: Path, rows: list[dict], images: str, pred_set: bool = True, rule: dict | None = None
) -> Path:
    metadata = {
        "class_names": CLASSES,
        "passes": 20,
        "tta": 2,
        "decision_rule": rule or {"rule": "median", "min_median": 0.5},
        "images": images,
    }
    schema = output_schema(CLASSES, metadata)
    if pred_set:
        schema = schema.append(pa.field("pred_set", pa.list_(pa.string())))
    else:
        rows = [{k: v for k, v in row.items() if k != "pred_set"} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    images = tmp_path / "images"
    # Only a.png and c.png exist: the other thumbnails must become placeholders.
    for rel, colour in (("n0/a.png", (200, 30, 30)), ("n2/c.png", (30, 30, 200))):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(images / rel)
    return {
        "out": write_parquet(tmp_path / "out.parquet", IN_ROWS, str(images)),
        "ood": write_parquet(tmp_path / "ood.parquet", OOD_ROWS, str(tmp_path / "ood"), False),
        "images": images,
    }


def check_hand_computed(results: dict) -> None:
    assert results["rows"] == {
        "total": 7,
        "ok": 6,
        "errors": 1,
        "labelled": 4,
        "unlabelled": 1,
        "unknown_label": 1,
    }
    assert results["n"] == 4
    assert results["accuracy"] == 0.5  # a, b right; c (cat for fox), d (fox for cat) wrong
    assert results["accepted"] == 3
    assert results["coverage"] == 0.75  # c is unclassified
    assert results["selective_accuracy"] == pytest.approx(2 / 3)  # d's decision fox is wrong
    tol = {"abs": 1e-6}  # float32 storage
    nll = -(math.log(0.8) + math.log(0.82) + math.log(0.4) + math.log(0.3)) / 4
    assert results["nll"] == pytest.approx(nll, **tol)
    # Brier per row: 0.06, 0.0488, 0.62, 0.74
    assert results["brier"] == pytest.approx((0.06 + 0.0488 + 0.62 + 0.74) / 4, **tol)
    # ECE: bin 12 holds 0.8 and 0.82 (right); 0.5 and 0.4 (wrong) are alone in their bins.
    assert results["ece"] == pytest.approx(0.5 * 0.19 + 0.25 * 0.5 + 0.25 * 0.4, **tol)
    # AURC: by confidence 0.82 (right), 0.8 (right), 0.5, 0.4: risks 0, 0, 1/3, 1/2.
    assert results["aurc"] == pytest.approx(0.25 * (0 + 1 / 6 + 5 / 12), **tol)
    assert results["auroc_error"] == {
        "1 - confidence": 1.0,  # wrong 0.5, 0.6 > right 0.2, 0.18
        "entropy": 0.75,  # wrong 1.0, 0.5 vs right 0.6, 0.3: 3 of 4 pairs
        "mutual_info": 0.375,  # wrong 0.2, 0.05 vs right 0.1, 0.2: 1 + one tie = 1.5 of 4
        "mean_std": 1.0,  # wrong 0.3, 0.2 vs right 0.1, 0.05 (the max std would tie at 0.3)
        "variation_ratio": 0.75,  # wrong 0.0, 0.4 vs right 0.0, 0.0: 2 + two ties = 3 of 4
    }


def test_evaluate_parquet_hand_computed(files):
    results = evaluate_parquet(files["out"], files["ood"])
    check_hand_computed(results)
    assert results["class_names"] == CLASSES
    assert results["passes"] == 20
    assert results["decision_rule"] == {"rule": "median", "min_median": 0.5}
    # OOD: 2 ok OOD rows vs the 6 ok in-distribution rows (labelled or not).
    ood = results["ood"]
    assert (ood["n_ood"], ood["n_in"]) == (2, 6)
    # entropy: in 0.6, 0.3, 1.0, 0.5, 0.4, 0.7; OOD 1.05 beats all 6, 0.45 beats 2.
    assert ood["auroc"]["entropy"] == pytest.approx(8 / 12)
    # 1 - confidence: in 0.2, 0.18, 0.5, 0.6, 0.3, 0.4; OOD 0.65 beats 6, 0.45 beats 4.
    assert ood["auroc"]["1 - confidence"] == pytest.approx(10 / 12)
    # FPR@95: keeping >= 95% of 6 in-distribution rows keeps all 6 (entropy <= 1.0, 1 -
    # confidence <= 0.6), and so keeps the OOD row at 0.45 of each: 1 of 2.
    assert ood["fpr95"]["entropy"] == ood["fpr95"]["1 - confidence"] == 0.5
    # pred_set: a (cat in [cat]), b (dog in [dog, fox]), d (cat in [cat, fox]) cover; c not.
    conformal = results["conformal"]
    assert {k: conformal[k] for k in ("n", "coverage", "mean_set_size")} == {
        "n": 4,
        "coverage": 0.75,
        "mean_set_size": 1.5,
    }
    check_stratified_coverage(conformal)
    json.dumps(results, allow_nan=False)


def check_stratified_coverage(conformal: dict) -> None:
    """Per class: cat a, d covered (sizes 1, 2); dog b covered (2); fox c missed (1). Per size:
    1 = a (hit), c (miss); 2 = b, d (both hit). Clopper-Pearson 95% by hand: k = m gives
    [0.025 ** (1 / m), 1], k = 0 gives [0, 1 - 0.025 ** (1 / m)], 1 of 2 gives
    [1 - sqrt(0.975), sqrt(0.975)]."""
    by_class = {row["class"]: row for row in conformal["per_class"]}
    assert list(by_class) == CLASSES
    cat, dog, fox = by_class["cat"], by_class["dog"], by_class["fox"]
    assert (cat["n"], cat["covered"], cat["mean_set_size"]) == (2, 2, 1.5)
    assert cat["interval"] == pytest.approx([0.025**0.5, 1.0], abs=1e-9)
    assert (dog["n"], dog["covered"], dog["coverage"]) == (1, 1, 1.0)
    assert dog["interval"] == pytest.approx([0.025, 1.0], abs=1e-9)
    assert (fox["n"], fox["covered"], fox["coverage"]) == (1, 0, 0.0)
    assert fox["interval"] == pytest.approx([0.0, 0.975], abs=1e-9)
    one, two = conformal["per_size"]
    assert (one["size"], one["n"], one["covered"], one["coverage"]) == (1, 2, 1, 0.5)
    assert one["interval"] == pytest.approx([1 - 0.975**0.5, 0.975**0.5], abs=1e-9)
    assert (two["size"], two["n"], two["covered"]) == (2, 2, 2)
    assert two["interval"] == pytest.approx([0.025**0.5, 1.0], abs=1e-9)


def test_evaluate_without_ood_or_pred_set(tmp_path):
    path = write_parquet(tmp_path / "plain.parquet", IN_ROWS, "nowhere", pred_set=False)
    results = evaluate_parquet(path)
    check_hand_computed(results)
    assert results["ood"] is None
    assert results["conformal"] is None


def test_evaluate_frame_undefined_values_are_none():
    unlabelled = [row | {"label": None, "label_index": None} for row in IN_ROWS]
    table = pa.Table.from_pylist(unlabelled, schema=_schema_with_pred_set())
    results = evaluate_frame(table.to_pandas(), CLASSES)
    assert results["n"] == 0
    assert results["accuracy"] is None and results["ece"] is None
    assert set(results["auroc_error"].values()) == {None}
    conformal = results["conformal"]
    assert (conformal["n"], conformal["coverage"], conformal["mean_set_size"]) == (0, None, None)
    assert conformal["per_size"] == []
    assert all(row["n"] == 0 and row["interval"] is None for row in conformal["per_class"])
    json.dumps(results, allow_nan=False)
    assert "n/a" in format_table(results)

    # Only right predictions: the AUROC wrong vs right is undefined.
    right = pa.Table.from_pylist(IN_ROWS[:2], schema=_schema_with_pred_set())
    results = evaluate_frame(right.to_pandas(), CLASSES)
    assert results["accuracy"] == 1.0
    assert set(results["auroc_error"].values()) == {None}


def _schema_with_pred_set() -> pa.Schema:
    schema = output_schema(CLASSES, {"class_names": CLASSES})
    return schema.append(pa.field("pred_set", pa.list_(pa.string())))


def test_evaluate_rejects_mismatched_ood(tmp_path, files):
    other = tmp_path / "other.parquet"
    schema = output_schema(["a", "b", "c"], {"class_names": ["a", "b", "c"]})
    pq.write_table(pa.Table.from_pylist([], schema=schema), other)
    with pytest.raises(UsageError, match="other class names.*Received: ood_class_names="):
        evaluate_parquet(files["out"], other)
    with pytest.raises(UsageError, match="class_names"):
        evaluate_frame(pq.read_table(files["out"]).to_pandas(), [])


def test_bad_input_is_a_usage_error(tmp_path, files):
    """Bad files are the caller's input: UsageError (exit 2), still a ValueError in Python."""
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(UsageError, match="Received: path="):
        evaluate_parquet(not_parquet)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), plain)
    with pytest.raises(ValueError, match="no batchuq metadata. Received: path="):
        evaluate_parquet(plain)
    no_entropy = tmp_path / "no_entropy.parquet"
    pq.write_table(pq.read_table(files["out"]).drop_columns(["entropy"]), no_entropy)
    with pytest.raises(UsageError, match="no column 'entropy'.*Received: columns="):
        evaluate_parquet(no_entropy)
    with pytest.raises(OutputError, match="not a folder. Received: report_dir="):
        write_report(files["out"], not_parquet)

    result = CliRunner().invoke(evaluate_command, [str(not_parquet)])
    assert result.exit_code == 2 and "Error: " in result.stderr, result.output
    assert "Traceback" not in result.output


def check_report(index: Path) -> list[str]:
    assert index.name == "index.html" and index.is_file()
    text = index.read_text(encoding="utf-8")
    sources = re.findall(r'<img\s[^>]*src="([^"]+)"', text)
    assert sources
    for src in sources:
        assert not Path(src).is_absolute() and "/" not in src
        png = index.parent / src
        assert png.is_file(), src
        assert png.read_bytes()[:8] == PNG_SIGNATURE, src
        with Image.open(png) as image:
            image.verify()
    return sources


def test_write_report(files, tmp_path):
    index = write_report(files["out"], tmp_path / "report", ood_path=files["ood"])
    sources = check_report(index)
    expected = {"reliability.png", "risk_coverage.png", "score_histograms.png", "confusion.png"}
    assert expected <= set(sources)
    assert sorted(s for s in sources if s.startswith("uncertain_")) == [
        f"uncertain_{i:02d}.png"
        for i in range(1, 7)  # the 6 readable rows
    ]
    text = index.read_text(encoding="utf-8")
    assert "Reliability diagram" in text and "Conformal prediction sets" in text


def test_write_report_images_root_and_no_labels(tmp_path, files):
    rows = [row | {"label": None, "label_index": None} for row in IN_ROWS]
    path = write_parquet(tmp_path / "unlabelled.parquet", rows, "does/not/exist")
    index = write_report(path, tmp_path / "r2", images_root=files["images"])
    check_report(index)


def test_cli_json_and_report(files, tmp_path):
    report_dir = tmp_path / "cli-report"
    result = CliRunner().invoke(
        evaluate_command,
        [str(files["out"]), "--ood", str(files["ood"]), "--report", str(report_dir), "--json"],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    check_hand_computed(results)
    assert results["ood"]["auroc"]["entropy"] == pytest.approx(8 / 12)
    assert results["report"] == str(report_dir / "index.html")
    check_report(report_dir / "index.html")
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    assert "<h3>Coverage per set size (size-stratified)</h3>" in page
    assert "0.0000 (95% CI 0.0000-0.9750), n = 1, mean size 1.00" in page  # fox, per class
    assert "0.5000 (95% CI 0.0126-0.9874), n = 2" in page  # sets of size 1


def test_cli_table_help_and_errors(files, tmp_path):
    runner = CliRunner()
    result = runner.invoke(evaluate_command, [str(files["out"])])
    assert result.exit_code == 0, result.output
    assert "accuracy (pred)" in result.stdout and "0.5000" in result.stdout
    assert "ECE (15 bins)" in result.stdout

    result = runner.invoke(evaluate_command, ["--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout and "--ood" in result.stdout and "--json" in result.stdout
    assert "batchuq evaluate out.parquet --ood ood.parquet --report report/" in result.stdout

    not_batchuq = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), not_batchuq)
    result = runner.invoke(evaluate_command, [str(not_batchuq)])
    assert result.exit_code == 2
    assert "no batchuq metadata" in result.stderr


def spy(monkeypatch, module, name: str) -> list:
    """Record what the report function ``module.name`` returns (its figure) at each call."""
    returned = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(module, name, wrapper)
    return returned


def bar_bins(ax, n_bins: int) -> dict[int, object]:
    """The bars of a reliability panel by bin index."""
    return {int(round(bar.get_x() * n_bins)): bar for bar in ax.patches}


def test_reliability_diagram_counts_and_fades_small_bins():
    rng = np.random.default_rng(0)
    confidence = np.concatenate(
        [rng.uniform(0.94, 1.0, 200), rng.uniform(0.68, 0.72, 7), [0.41, 0.42, 0.45, 0.21, 1.0]]
    )
    correct = rng.random(len(confidence)) < confidence
    bins = metrics.reliability_bins(confidence, correct)
    expected, _ = np.histogram(confidence, bins=metrics.DEFAULT_ECE_BINS, range=(0, 1))
    assert bins.counts.tolist() == expected.tolist()
    assert sorted(set(expected[expected > 0])) == [1, 3, 7, 201]  # faded and solid bins

    top, bottom = evaluate_figures.draw_reliability(bins, 0.05).axes
    n_bins = metrics.DEFAULT_ECE_BINS
    counts = bar_bins(bottom, n_bins)
    assert [counts[b].get_height() for b in range(n_bins)] == expected.tolist()
    assert sorted(int(text.get_text()) for text in bottom.texts) == sorted(expected[expected > 0])
    accuracy = bar_bins(top, n_bins)
    assert sorted(accuracy) == np.flatnonzero(expected).tolist()  # empty bins have no bar
    for b, bar in accuracy.items():
        faded = expected[b] < evaluate_figures.MIN_BIN_IMAGES
        assert (bar.get_alpha() == evaluate_figures.FADED_ALPHA) == faded, (b, expected[b])
        assert (counts[b].get_alpha() == evaluate_figures.FADED_ALPHA) == faded
        assert bar.get_height() == pytest.approx(correct[bin_of(confidence) == b].mean())


def bin_of(confidence: np.ndarray) -> np.ndarray:
    return np.minimum((confidence * metrics.DEFAULT_ECE_BINS).astype(int), 14)


def test_write_report_draws_the_evaluated_bins(files, tmp_path, monkeypatch):
    figures = spy(monkeypatch, evaluate_figures, "draw_reliability")
    write_report(files["out"], tmp_path / "report")
    (top, bottom) = figures[0].axes
    # The labelled ok rows a, b, c, d have confidence 0.8, 0.82, 0.5, 0.4: every bin is faded.
    expected, _ = np.histogram([0.8, 0.82, 0.5, 0.4], bins=metrics.DEFAULT_ECE_BINS, range=(0, 1))
    assert [bar.get_height() for bar in bottom.patches] == expected.tolist()
    assert {bar.get_alpha() for bar in top.patches} == {evaluate_figures.FADED_ALPHA}
    assert "ECE = 0.3200" in top.get_title()  # the ECE evaluate computed


def test_risk_coverage_marks_the_decision_rule(files, tmp_path, monkeypatch):
    figures = spy(monkeypatch, evaluate_figures, "draw_risk_coverage")
    write_report(files["out"], tmp_path / "report")
    # Coverage and selective risk from the decision column of the labelled ok rows.
    table = pq.read_table(files["out"]).to_pandas()
    labelled = table[(table["status"] == "ok") & table["label_index"].notna()]
    accepted = labelled["decision"] != "unclassified"
    coverage = accepted.mean()
    risk = (labelled["decision"][accepted] != labelled["label"][accepted]).mean()
    assert (coverage, risk) == (0.75, pytest.approx(1 / 3))
    (ax,) = figures[0].axes  # the most confident image (b) is right, but c at 0.5 is not
    (star,) = [c for c in ax.collections if c.get_label().startswith("decision rule")]
    np.testing.assert_allclose(star.get_offsets(), [[coverage, risk]])
    assert star.get_label() == "decision rule: coverage 0.750, risk 0.333"


def test_risk_coverage_zooms_to_where_it_changes():
    confidence = np.linspace(1.0, 0.5, 200)
    correct = np.ones(200, bool)
    correct[[189, 194, 198]] = False  # errors only among the least confident
    results = {"coverage": 0.97, "selective_accuracy": 0.99, "aurc": 0.001}
    curve = curve_of(confidence, correct)
    whole, zoomed = evaluate_figures.draw_risk_coverage(curve, correct, results).axes
    assert whole.get_xlim()[0] == 0.0
    start = zoomed.get_xlim()[0]
    assert start == pytest.approx(0.95 - 0.005 - 0.1 * 0.055)  # just before the first error
    cov, risk = metrics.risk_coverage_curve(confidence, correct)
    assert not risk[cov < start].any()  # as the title says: risk is 0 below the zoom
    assert "0.94" in zoomed.get_title()
    assert zoomed.get_ylim()[1] >= risk.max()
    for ax in (whole, zoomed):
        (star,) = [c for c in ax.collections if c.get_label().startswith("decision rule")]
        np.testing.assert_allclose(star.get_offsets(), [[0.97, 0.01]])

    # An error among the most confident images: the curve changes everywhere, no zoom.
    correct[0] = False
    curve = curve_of(confidence, correct)
    (ax,) = evaluate_figures.draw_risk_coverage(curve, correct, results).axes
    assert ax.get_xlim()[0] == 0.0
    # No errors at all: nothing to zoom to.
    right = np.ones(200, bool)
    (ax,) = evaluate_figures.draw_risk_coverage(curve_of(confidence, right), right, results).axes
    assert ax.get_xlim()[0] == 0.0


def curve_of(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    return RiskCoverage(*metrics.risk_coverage_curve(confidence, correct))


def test_uncertain_image_titles_say_correct_or_wrong(files, tmp_path, monkeypatch):
    figures = spy(monkeypatch, uncertain, "_draw_uncertain_image")
    index = write_report(files["out"], tmp_path / "report")
    expected = {
        "n0/a.png": "correct: label cat, predicted cat",
        "n1/b.png": "correct: label dog, predicted dog",
        "n2/c.png": "wrong: label fox, predicted cat",
        "n0/d.png": "wrong: label cat, predicted fox",
        "e.png": "no label; predicted dog",
        "wolf/g.png": "wrong: label wolf (not a class of the model), predicted cat",
    }
    titles = {fig.axes[0].get_title(): fig.axes[1].get_title() for fig in figures}
    assert set(titles) == set(expected)
    for path, title in titles.items():
        assert expected[path] in title.splitlines()[0], title
        words = set(re.findall(r"\b(correct|wrong)\b", title))
        assert words == {w for w in ("correct", "wrong") if expected[path].startswith(w)}
    # The tick labels mark the true and the predicted class in words too.
    ticks = {
        fig.axes[0].get_title(): [t.get_text() for t in fig.axes[1].get_xticklabels()]
        for fig in figures
    }
    assert ticks["n0/d.png"] == ["cat (label)", "dog", "fox (pred)"]
    assert ticks["n0/a.png"] == ["cat (label, pred)", "dog", "fox"]
    text = index.read_text(encoding="utf-8")
    assert 'alt="uncertain image 1: n2/c.png, wrong"' in text  # c has the highest entropy


def test_report_draws_saved_samples_as_box_plots(digits_subset, tmp_path, monkeypatch):
    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions

    with_samples, without = tmp_path / "samples.parquet", tmp_path / "plain.parquet"
    score_directory(digits_subset, with_samples, ScoreOptions(passes=8, save_samples=True))
    score_directory(digits_subset, without, ScoreOptions(passes=8))
    figures = spy(monkeypatch, uncertain, "_draw_uncertain_image")
    boxes = write_report(with_samples, tmp_path / "boxes")
    box_chart = figures[0].axes[1]
    bars = write_report(without, tmp_path / "bars")
    bar_chart = figures[len(figures) // 2].axes[1]
    assert check_report(boxes) == check_report(bars)  # same plots, same names
    assert "score --save-samples" in boxes.read_text(encoding="utf-8")

    # The most uncertain image: drawn from its raw samples in one report (each box spans the
    # class's quartiles), from its stored means in the other.
    table = pq.read_table(with_samples).to_pandas()
    first = table.iloc[int(np.argsort(-table["entropy"].to_numpy(), kind="stable")[0])]
    samples = np.asarray(first["samples"].tolist(), dtype=np.float64)
    names = [f"n{i}" for i in range(10)]
    quartiles = [
        (patch.get_path().vertices[:, 1].min(), patch.get_path().vertices[:, 1].max())
        for patch in box_chart.patches
    ]
    np.testing.assert_allclose(quartiles, np.percentile(samples, [25, 75], axis=0).T, atol=1e-6)
    plain = pq.read_table(without).to_pandas().set_index("path").loc[first["path"]]
    heights = [bar.get_height() for bar in bar_chart.patches]
    np.testing.assert_allclose(heights, [plain[f"mean_{c}"] for c in names], atol=1e-6)


TABLE = """\
Input
---------------------------------
file                     out.parquet
decision rule            median (min_median=0.5)
passes x tta             20 x 2
rows                     7
  ok                     6
  errors                 1
  unlabelled             1
  label not a class      1

Labelled ok rows (N = 4)
---------------------------------
accuracy (pred)          0.5000
coverage (accepted / N)  0.7500
selective accuracy       0.6667
NLL (nats)               0.6355
Brier                    0.3672
ECE (15 bins)            0.3200
AURC                     0.1458

AUROC, wrong vs right prediction
---------------------------------
1 - confidence           1.0000
entropy                  0.7500
mutual_info              0.3750
mean_std                 1.0000
variation_ratio          0.7500

OOD (2) vs in-distribution (6): AUROC, FPR@95
---------------------------------------------
1 - confidence           0.8333  0.5000
entropy                  0.6667  0.5000
mutual_info              0.7083  0.5000
mean_std                 0.5000  1.0000
variation_ratio          0.8750  0.5000

Conformal prediction sets (N = 4)
---------------------------------
empirical coverage       0.7500
mean set size            1.5000

Conformal coverage per true class (95% Clopper-Pearson)
-------------------------------------------------------
cat                      1.0000 (95% CI 0.1581-1.0000), n = 2, mean size 1.50
dog                      1.0000 (95% CI 0.0250-1.0000), n = 1, mean size 2.00
fox                      0.0000 (95% CI 0.0000-0.9750), n = 1, mean size 1.00

Conformal coverage per set size (size-stratified, 95% Clopper-Pearson)
----------------------------------------------------------------------
size 1                   0.5000 (95% CI 0.0126-0.9874), n = 2
size 2                   1.0000 (95% CI 0.1581-1.0000), n = 2"""


def test_format_table_text(files):
    """The whole table, character for character (as printed before it was split into steps)."""
    results = evaluate_parquet(files["out"], files["ood"]) | {"file": "out.parquet"}
    assert format_table(results) == TABLE


def test_thresholds_are_printed_to_four_significant_digits(tmp_path):
    """The table and the report round the calibrated thresholds; the JSON keeps every digit."""
    thresholds = [0.9983289122581482, 0.4719766914844513, None]  # fox: no threshold
    rule = {"rule": "threshold", "thresholds": thresholds}
    out = write_parquet(tmp_path / "t.parquet", IN_ROWS, str(tmp_path), rule=rule)
    shown = "threshold (thresholds=[0.9983, 0.472, none])"
    runner = CliRunner()
    table = runner.invoke(evaluate_command, [str(out), "--report", str(tmp_path / "report")])
    assert table.exit_code == 0, table.output
    assert f"decision rule            {shown}\n" in table.stdout
    assert f"<td>decision rule</td><td>{shown}</td>" in (
        tmp_path / "report" / "index.html"
    ).read_text(encoding="utf-8")
    as_json = runner.invoke(evaluate_command, [str(out), "--json"])
    assert json.loads(as_json.stdout)["decision_rule"]["thresholds"] == thresholds
    assert format_rule({"rule": "median", "min_median": 0.5}) == "median (min_median=0.5)"
    assert format_rule(None) == "n/a"


def test_cli_reads_each_file_once(files, tmp_path, monkeypatch):
    """`evaluate --ood --report` opens each Parquet file once, for the metrics and the plots."""
    opened = []

    class CountingParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            opened.append(Path(source).name)
            super().__init__(source, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a second way of reading the file")

    monkeypatch.setattr(pq, "ParquetFile", CountingParquetFile)
    for name in ("read_table", "read_schema", "read_metadata", "read_pandas"):
        monkeypatch.setattr(pq, name, refuse)
    report_dir = tmp_path / "report"
    args = [str(files["out"]), "--ood", str(files["ood"]), "--report", str(report_dir)]
    result = CliRunner().invoke(evaluate_command, args)
    assert result.exit_code == 0, result.output
    assert sorted(opened) == ["ood.parquet", "out.parquet"]
    check_report(report_dir / "index.html")


def test_report_draws_what_evaluate_computed(files, tmp_path, monkeypatch):
    """The report reads no file and recomputes no score, mask, bin, curve or metric."""
    evaluation = evaluate_file(files["out"], files["ood"], samples=True)
    files["out"].unlink()  # nothing left to read again
    files["ood"].unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed by the report")

    for name in ("uncertainty_scores", "labelled_rows", "read_scored_file", "evaluate_file"):
        monkeypatch.setattr(evaluate, name, refuse)
        for module in (evaluate_report, evaluate_figures, uncertain):  # if imported by name
            monkeypatch.setattr(module, name, refuse, raising=False)
    for name in ("reliability_bins", "ece", "auroc", "accuracy", "nll", "brier"):
        monkeypatch.setattr(metrics, name, refuse)
    curves = []  # the only curve the report computes is its oracle: right predictions first
    original_curve = metrics.risk_coverage_curve

    def curve(confidence, correct):
        curves.append((np.asarray(confidence), np.asarray(correct)))
        return original_curve(confidence, correct)

    monkeypatch.setattr(metrics, "risk_coverage_curve", curve)
    bins = spy(monkeypatch, evaluate_figures, "draw_reliability")
    risk = spy(monkeypatch, evaluate_figures, "draw_risk_coverage")
    index = write_evaluation_report(evaluation, tmp_path / "report", images_root=files["images"])

    check_report(index)
    assert curves and all((c == k.astype(np.float64)).all() for c, k in curves)
    (fig,) = bins
    assert "ECE = 0.3200" in fig.axes[0].get_title()
    (fig,) = risk
    (line, *_) = fig.axes[0].lines
    np.testing.assert_array_equal(line.get_xdata(), evaluation.risk_coverage.coverage)
    np.testing.assert_array_equal(line.get_ydata(), evaluation.risk_coverage.risk)
    assert evaluation.results["ood"]["auroc"]["entropy"] == pytest.approx(8 / 12)


def test_evaluate_never_imports_the_report_or_the_commands():
    """One direction: the report imports the evaluate job, never the reverse (not even inside a
    function), and no job imports the command layer."""
    import ast

    tree = ast.parse(Path(evaluate.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not {name for name in imported if "report" in name or name.startswith("batchuq.cli")}
    assert "matplotlib" not in " ".join(imported)


# --- a --rule risk run: realised selective risk and coverage against the certified target ----


@pytest.mark.parametrize(
    ("k", "m"), [(0, 1), (0, 30), (1, 1), (3, 10), (4, 445), (30, 30), (7, 2000)]
)
def test_clopper_pearson_is_the_beta_quantiles(k: int, m: int) -> None:
    from scipy.stats import beta

    from batchuq.postprocess.selective import clopper_pearson

    low, high = clopper_pearson(k, m)
    assert low == pytest.approx(beta.ppf(0.025, k, m - k + 1) if k else 0.0, abs=1e-12)
    assert high == pytest.approx(beta.ppf(0.975, k + 1, m - k) if k < m else 1.0, abs=1e-12)
    low90, high90 = clopper_pearson(k, m, 0.9)
    assert low <= low90 <= high90 <= high
    with pytest.raises(UsageError, match="k"):
        clopper_pearson(m + 1, m)


def _lab(decision_correct: list[bool], accepted: list[bool]) -> evaluate.LabelledRows:
    n = len(accepted)
    return evaluate.LabelledRows(
        mask=np.ones(n, bool),
        labels=np.zeros(n, np.int64),
        pred=np.zeros(n),
        confidence=np.ones(n),
        correct=np.array(decision_correct),
        accepted=np.array(accepted),
        decision_correct=np.array(decision_correct) & np.array(accepted),
    )


def test_selective_check_counts_errors_among_the_accepted_only() -> None:
    rule = {
        "rule": "risk",
        "certificate": {"target_risk": 0.25, "delta": 0.1},
        "statement": "the statement",
    }
    # 8 rows: 4 accepted (1 wrong), 4 refused (all wrong: they do not count).
    correct = [True, True, True, False, False, False, False, False]
    check = evaluate.selective_check(_lab(correct, [True] * 4 + [False] * 4), rule)
    assert (check["n"], check["accepted"], check["errors"]) == (8, 4, 1)
    assert check["risk"] == 0.25 and check["coverage"] == 0.5
    assert check["target_held"] is True  # at the target counts as held
    assert check["risk_interval"] == list(clopper_pearson_of(1, 4))
    assert check["coverage_interval"] == list(clopper_pearson_of(4, 8))
    worse = evaluate.selective_check(_lab([True, False, False, True], [True] * 4), rule)
    assert worse["risk"] == 0.5 and worse["target_held"] is False
    nothing = evaluate.selective_check(_lab([True, True], [False, False]), rule)
    assert nothing["risk"] is None and nothing["target_held"] is None
    assert nothing["risk_interval"] is None and nothing["coverage"] == 0.0
    assert evaluate.selective_check(_lab([True], [True]), {"rule": "median"}) is None
    table = evaluate.format_table({"rows": {}, "selective": check})
    assert "0.2500 (95% CI" in table and "target held (target 0.25 is inside" in table


def clopper_pearson_of(k: int, m: int) -> tuple[float, float]:
    from batchuq.postprocess.selective import clopper_pearson

    return clopper_pearson(k, m)
