"""`batchuq shift`: deterministic corruption series that keep the folder's layout and modes."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLE_TEST, write_image
from PIL import Image

from batchuq.cli import cli
from batchuq.corrupt import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    corruption_rng,
    parse_corruptions,
    parse_severities,
)
from batchuq.errors import UsageError
from batchuq.jobs.shift import shift_directory
from batchuq.report.contact_sheet import contact_sheet_size, write_contact_sheet


def _run(*args: str) -> object:
    return CliRunner().invoke(cli, [*args, "--no-progress"])


@pytest.fixture
def digits20(tmp_path: Path) -> Path:
    """Two test images of each digit (20 images, 32x32 grayscale PNGs)."""
    root = tmp_path / "digits"
    for folder in sorted(SAMPLE_TEST.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


def test_same_seed_same_bytes_other_seed_other_noise(digits20: Path, tmp_path: Path) -> None:
    options = {"severities": "3"}
    shift_directory(digits20, tmp_path / "a", seed=0, **options)
    shift_directory(digits20, tmp_path / "b", seed=0, **options)
    shift_directory(digits20, tmp_path / "c", seed=1, **options)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 20 * len(CORRUPTIONS) and a == b
    for name in CORRUPTIONS:
        changed = [k for k in a if k.startswith(f"{name}/") and a[k] != c[k]]
        if name == "gaussian_noise":
            assert len(changed) == 20
        elif name == "rotate":  # only the sign is random: about half the images change
            assert 0 < len(changed) < 20
        else:
            assert changed == []
    # Nothing half-written is left behind.
    assert not [p for p in (tmp_path / "a").rglob(".*")]


def test_draws_depend_only_on_seed_corruption_severity_and_path() -> None:
    draw = corruption_rng(0, "rotate", 3, "n1/a.png").random()
    assert draw == corruption_rng(0, "rotate", 3, "n1/a.png").random()
    for other in [(1, "rotate", 3, "n1/a.png"), (0, "rotate", 4, "n1/a.png")]:
        assert corruption_rng(*other).random() != draw
    assert corruption_rng(0, "rotate", 3, "n1/b.png").random() != draw


def test_difference_to_the_clean_image_grows_with_severity() -> None:
    files = sorted(SAMPLE_TEST.glob("*/*.png"))[::90]  # five digits
    for name in CORRUPTIONS:
        means = []
        for severity in SEVERITIES:
            diffs = []
            for file in files:
                clean = Image.open(file)
                rng = corruption_rng(0, name, severity, file.name)
                shifted = np.asarray(corrupt(clean, name, severity, rng), np.float64)
                diffs.append(np.abs(shifted - np.asarray(clean, np.float64)).mean())
            means.append(np.mean(diffs))
        assert np.all(np.diff(means) > 0), (name, means)
        assert means[0] > 0.5, (name, means)


@pytest.mark.parametrize(
    ("mode", "suffix", "expected_mode"),
    [
        ("L", ".png", "L"),
        ("RGB", ".png", "RGB"),
        ("RGBA", ".png", "RGBA"),
        ("LA", ".png", "LA"),
        ("RGB", ".jpg", "RGB"),
        ("L", ".bmp", "L"),
        ("P", ".gif", "P"),  # corrupted as RGB; GIF holds palette images only
    ],
)
def test_mode_and_format_are_kept(
    tmp_path: Path, mode: str, suffix: str, expected_mode: str
) -> None:
    clean = tmp_path / "images" / f"img{suffix}"
    write_image(tmp_path / "src.png", size=24, mode="RGB")
    clean.parent.mkdir()
    Image.open(tmp_path / "src.png").convert(mode).save(clean)
    shift_directory(clean.parent, tmp_path / "out", severities="2,5")
    for name in CORRUPTIONS:
        for severity in (2, 5):
            with Image.open(tmp_path / "out" / name / str(severity) / clean.name) as shifted:
                assert shifted.mode == expected_mode, (name, severity)
                assert shifted.size == (24, 24)
                assert shifted.format == Image.open(clean).format


def test_sixteen_bit_images_become_eight_bit_grayscale(tmp_path: Path) -> None:
    pixels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250
    Image.fromarray(pixels).save(tmp_path / "deep.png")  # uint16: a 16-bit grayscale PNG
    rng = corruption_rng(0, "contrast", 1, "deep.png")
    shifted = corrupt(Image.open(tmp_path / "deep.png"), "contrast", 1, rng)
    assert shifted.mode == "L" and np.asarray(shifted).max() > 128


def test_score_of_a_shifted_folder_has_the_clean_paths(digits20: Path, tmp_path: Path) -> None:
    shifted = tmp_path / "shifted"
    done = _run("shift", str(digits20), str(shifted), "--corruptions", "rotate,jpeg")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in shifted.iterdir()) == [
        "contact_sheet.png",
        "jpeg",
        "rotate",
        "shift.json",
    ]
    assert sorted(p.name for p in (shifted / "rotate").iterdir()) == ["1", "2", "3", "4", "5"]
    assert _files(shifted / "rotate" / "3").keys() == _files(digits20).keys()
    manifest = json.loads((shifted / "shift.json").read_text())
    assert manifest["parameters"]["jpeg"] == {"1": 25, "2": 18, "3": 15, "4": 10, "5": 7}
    for folder, name in [(digits20, "clean"), (shifted / "rotate" / "5", "rotated")]:
        out = tmp_path / f"{name}.parquet"
        done = _run("score", str(folder), str(out), "--passes", "1")
        assert done.exit_code == 0, done.output
    clean, rotated = (pd.read_parquet(tmp_path / f"{n}.parquet") for n in ("clean", "rotated"))
    assert list(rotated["path"]) == list(clean["path"])
    assert list(rotated["label"]) == list(clean["label"])
    assert (rotated["status"] == "ok").all()


def test_flat_folder_and_unreadable_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flat = tmp_path / "flat"
    for index in range(3):
        write_image(flat / f"photo{index}.png", size=20, seed=index)
    (flat / "broken.png").write_bytes(b"not an image")
    (flat / "notes.txt").write_text("not an image either")
    # The CLI tests' setup_logging stops batchuq's log from propagating to caplog's root handler.
    logging.getLogger("batchuq").addHandler(caplog.handler)
    try:
        report = shift_directory(flat, tmp_path / "out", corruptions=["contrast"], severities=1)
    finally:
        logging.getLogger("batchuq").removeHandler(caplog.handler)
    assert report.images == 3 and report.skipped == ["broken.png"] and report.written == 3
    assert sorted(p.name for p in (tmp_path / "out" / "contrast" / "1").iterdir()) == [
        "photo0.png",
        "photo1.png",
        "photo2.png",
    ]
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.png" in caplog.text


def test_contact_sheet_size(digits20: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    chosen = "n7/" + sorted(p.name for p in (digits20 / "n7").iterdir())[1]
    report = shift_directory(
        digits20,
        tmp_path / "out",
        corruptions="gaussian_noise,pixelate",
        severities="1,3,5",
        contact_image=chosen,
    )
    assert report.contact_image == chosen
    assert not list((tmp_path / "out").glob("*.png"))  # the job draws nothing
    assert write_contact_sheet(report, sheet) == sheet
    assert Image.open(sheet).size == contact_sheet_size(2, 4) == (530, 240)
    assert not (tmp_path / "out" / "contact_sheet.png").exists()
    report = shift_directory(digits20, tmp_path / "full", severities="1-5")
    assert report.contact_image == "n0/" + sorted(p.name for p in (digits20 / "n0").iterdir())[0]
    written = write_contact_sheet(report)
    assert written == tmp_path / "full" / "contact_sheet.png"
    assert Image.open(written).size == contact_sheet_size(6, 6)


def test_parsing_of_corruptions_and_severities() -> None:
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("5,3") == (3, 5)
    assert parse_severities("3") == parse_severities(3) == (3,)
    assert parse_severities("1-2,5") == (1, 2, 5)
    assert parse_corruptions("jpeg, rotate,jpeg") == ("jpeg", "rotate")
    for bad in ["0", "1-6", "4-2", "x", ""]:
        with pytest.raises(UsageError, match="Received: severities="):
            parse_severities(bad)
    with pytest.raises(UsageError, match="Unknown corruption 'fog'.*Received: corruptions="):
        parse_corruptions("jpeg,fog")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corruptions", "fog"], "Received: corruptions='fog'"),
        (["--severities", "0-6"], "Received: severities='0-6'"),
        (["--contact-image", "n9/nope.png"], "Received: contact_image='n9/nope.png'"),
    ],
)
def test_bad_arguments_exit_2(
    digits20: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    done = _run("shift", str(digits20), str(tmp_path / "out"), *args)
    assert done.exit_code == 2 and message in done.output, done.output
    assert not (tmp_path / "out").exists()


def test_output_inside_the_images_folder_exits_2(digits20: Path) -> None:
    done = _run("shift", str(digits20), str(digits20 / "shifted"))
    assert done.exit_code == 2 and "Received: images=" in done.output, done.output
    assert not (digits20 / "shifted").exists()


def test_help_imports_no_heavy_module() -> None:
    probe = (
        "import sys\nfrom batchuq.cli import main\ntry:\n    main()\nexcept SystemExit:\n"
        "    print(sorted(m for m in ('tensorflow', 'keras', 'pandas', 'matplotlib') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "shift", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert "Example:" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout
