"""Real folders end to end: the Kaggle monkey archive, dataset splits, mixed formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_TEST
from PIL import Image

from batchuq.cli import cli
from batchuq.cli.runtime import EXIT_OK, EXIT_USAGE
from batchuq.output.schema import read_metadata

# Kaggle's monkey_labels.txt, with its ragged spacing and trailing tabs.
MONKEY_LABELS = "Label,  Latin Name           , Common Name                   , Train Images\n" + (
    "".join(f"n{i}   , latin_{i}\t, digit_{i}\t , 100\n" for i in range(10))
)


def _score(*args: str) -> object:
    env = {"BATCHUQ_MODEL": None, "BATCHUQ_CONFIG": None}
    return CliRunner().invoke(cli, ["score", "--no-progress", "-T", "3", *args], env=env)


def _kaggle_archive(root: Path, per_class: int = 2) -> Path:
    """The digits arranged as the monkey archive unpacks: training/training/n0 ..."""
    for split in ("training", "validation"):
        for folder in sorted(SAMPLE_TEST.iterdir()):
            target = root / split / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:per_class]:
                shutil.copy(image, target / image.name)
    (root / "monkey_labels.txt").write_text(MONKEY_LABELS)
    return root


def test_kaggle_nested_training_folder_is_labelled_with_readable_names(tmp_path: Path) -> None:
    root = _kaggle_archive(tmp_path / "archive")
    out = tmp_path / "out.parquet"
    result = _score(str(root / "training"), str(out), "--labels", str(root / "monkey_labels.txt"))
    assert result.exit_code == EXIT_OK, result.output
    assert "holds only the folder 'training'" in result.output
    frame = pd.read_parquet(out)
    assert len(frame) == 20 and frame.label_index.notna().all()
    assert sorted(frame.label.unique()) == [f"digit_{i}" for i in range(10)]
    assert {f"mean_digit_{i}" for i in range(10)} <= set(frame.columns)
    assert (frame.label == frame.pred).mean() > 0.8  # the bundled digits model, real labels


def test_report_of_a_kaggle_wrapper_shows_the_scored_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`monkeys/training` holds only `training/n0..`: the log names the folder scored, and the
    report's thumbnails come from it (not "image not found" under the wrapper)."""
    from batchuq.report import uncertain

    root = _kaggle_archive(tmp_path / "monkeys")
    out, report_dir = tmp_path / "out.parquet", tmp_path / "report"
    result = _score(str(root / "training"), str(out))
    assert result.exit_code == EXIT_OK, result.output
    scored = root / "training" / "training"
    assert f"scoring 20 images from {scored}\n" in result.output
    assert read_metadata(out)["images_root"] == str(scored)

    drawn = []  # (path, the thumbnail the report drew, or None) per "most uncertain" panel
    draw = uncertain._draw_thumbnail

    def record(ax, rel, images_root):
        draw(ax, rel, images_root)
        drawn.append((rel, ax.images[0].get_array() if ax.images else None))

    monkeypatch.setattr(uncertain, "_draw_thumbnail", record)
    done = CliRunner().invoke(cli, ["evaluate", str(out), "--report", str(report_dir)])
    assert done.exit_code == EXIT_OK, done.output
    panels = sorted(report_dir.glob("uncertain_*.png"))
    assert len(drawn) == len(panels) == 12
    for rel, pixels in drawn:
        assert pixels is not None, f"no thumbnail for {rel}"
        with Image.open(scored / rel) as image:  # the digit itself, 28 x 28, shown as RGB
            np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    assert f"<td>scored folder</td><td>{scored}</td>" in page


def test_archive_root_with_splits_is_a_usage_error_naming_them(tmp_path: Path) -> None:
    root = _kaggle_archive(tmp_path / "archive", per_class=1)
    out = tmp_path / "out.parquet"
    result = _score(str(root), str(out))
    assert result.exit_code == EXIT_USAGE
    assert "dataset splits" in result.output
    assert str(root / "training") in result.output and str(root / "validation") in result.output
    assert not out.exists()


def test_labels_that_match_no_class_folder_are_a_usage_error(tmp_path: Path) -> None:
    root = _kaggle_archive(tmp_path / "archive", per_class=1)
    wrong = tmp_path / "wrong_labels.txt"
    wrong.write_text("Label, Latin Name, Common Name\nm0, a, b\nm1, c, d\n")
    result = _score(str(root / "training"), str(tmp_path / "o.parquet"), "--labels", str(wrong))
    assert result.exit_code == EXIT_USAGE and "names none of the class folders" in result.output
    partial = tmp_path / "partial.txt"
    partial.write_text("Label, Latin Name, Common Name\nn0, a, zero\nn1, c, one\n")
    result = _score(str(root / "training"), str(tmp_path / "p.parquet"), "--labels", str(partial))
    assert result.exit_code == EXIT_OK and "does not name 8 class folders" in result.output
    assert "n2, n3" in result.output


def _mixed_formats(folder: Path) -> None:
    folder.mkdir()
    digit = Image.open(sorted((SAMPLE_TEST / "n3").iterdir())[0])
    digit.save(folder / "a.webp", lossless=True)
    digit.save(folder / "b.tif")
    digit.convert("RGB").save(folder / "c.tiff", compression="tiff_lzw")
    digit.save(folder / "d.pgm")
    exif = Image.Exif()
    exif[0x0112] = 6
    digit.convert("RGB").save(folder / "e.jpg", exif=exif, quality=95)
    (folder / "notes.txt").write_text("not an image")


def test_every_format_gets_a_row_and_skipped_files_are_counted(tmp_path: Path) -> None:
    _mixed_formats(tmp_path / "mixed")
    out = tmp_path / "out.parquet"
    # One deterministic pass: dropout masks differ per path, the lossless pixels do not.
    result = _score(str(tmp_path / "mixed"), str(out), "--log-format", "json", "-T", "1")
    assert result.exit_code == EXIT_OK, result.output
    frame = pd.read_parquet(out)
    assert list(frame.path) == ["a.webp", "b.tif", "c.tiff", "d.pgm", "e.jpg"]
    assert (frame.status == "ok").all()
    lossless = frame.filter(like="mean_").to_numpy()[:3]
    np.testing.assert_allclose(lossless, lossless[[0, 0, 0]], atol=1e-6)  # same pixels
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["skipped"] == 1 and "1 skipped" in summary["message"]

    result = _score(str(tmp_path / "mixed"), str(out), "--include-all")
    assert result.exit_code == 1  # one unreadable file: more than --max-error-rate 0
    frame = pd.read_parquet(out)
    assert frame.set_index("path").status["notes.txt"].startswith("error: not a recognised")
