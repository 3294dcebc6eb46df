"""`batchuq compare`: one table over several scored files, evaluate's numbers, shift series."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_TEST

from batchuq.cli import cli
from batchuq.errors import UsageError
from batchuq.jobs.compare import (
    COMPARED_SCORE,
    Shift,
    compare_files,
    format_comparison,
    series_table,
    shift_of,
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
