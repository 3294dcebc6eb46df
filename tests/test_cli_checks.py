"""Usage mistakes are caught before TensorFlow is imported, with the documented exit codes."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLE_TEST

from batchuq.cli.runtime import EXIT_FATAL, EXIT_NO_IMAGES, EXIT_USAGE, exit_on_error, setup_logging
from batchuq.errors import ModelError, NoImagesFoundError, UsageError

# Runs the real CLI in a fresh interpreter and reports, on its last line, the exit code and
# which heavy modules got imported: a check made before the TensorFlow import costs ~0.3 s, one
# made after it ~8 s.
_PROBE = """
import sys
from batchuq.cli import main
try:
    main()
except SystemExit as exc:
    heavy = sorted(
        m for m in ("tensorflow", "keras", "pandas", "matplotlib", "ray") if m in sys.modules
    )
    print("PROBE", exc.code, ",".join(heavy) or "-")
"""


def _probe(*args: str, cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    *_, last = done.stdout.strip().splitlines()
    _, code, heavy = last.split()
    return int(code), heavy, done.stdout + done.stderr


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    for image in sorted((SAMPLE_TEST / "n3").iterdir())[:2]:
        shutil.copy(image, tmp_path / "imgs" / image.name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "model.h5").write_bytes(b"not a keras file")
    (tmp_path / "cal.json").write_text("{not json")
    (tmp_path / "old.parquet").write_bytes(b"previous run")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing", "out.parquet"], EXIT_USAGE, "does not exist"),
        (["missing", "out.parquet", "--missing-ok"], EXIT_NO_IMAGES, "does not exist"),
        (["empty", "out.parquet"], EXIT_NO_IMAGES, "No images to score"),
        (["notes", "out.parquet"], EXIT_NO_IMAGES, "No images to score"),
        (["imgs", "out.csv"], EXIT_USAGE, "must end in .parquet"),
        (["imgs", "nowhere/out.parquet"], EXIT_USAGE, "'nowhere' does not exist"),
        (["imgs", "out.parquet", "-m", "model.h5"], EXIT_USAGE, "`.keras` file"),
        (["imgs", "out.parquet", "-m", "gone.keras"], EXIT_USAGE, "does not exist"),
        (["imgs", "out.parquet", "--calibration", "cal.json"], EXIT_USAGE, "calibration file"),
        (["imgs", "old.parquet", "--no-clobber"], EXIT_USAGE, "--no-clobber"),
        (["imgs", "out.parquet", "--config", "nope.toml"], EXIT_USAGE, "does not exist"),
        (["imgs", "scores/"], EXIT_USAGE, "written by --engine ray only"),
        (["imgs", "notes/", "--engine", "ray"], EXIT_USAGE, "holds other files"),
        (["imgs", "out.parquet", "--engine", "ray", "--cpus-per-worker", "0"], EXIT_USAGE, "x>0"),
    ],
)
def test_mistakes_exit_before_tensorflow_is_imported(
    folders: Path, args: list[str], code: int, message: str
) -> None:
    got, heavy, output = _probe("score", *args, cwd=folders)
    assert got == code, output
    assert message in output
    assert heavy == "-", f"imported {heavy} before reporting: {output}"
    assert not (folders / "out.parquet").exists()
    assert (folders / "old.parquet").read_bytes() == b"previous run"


def test_json_log_format_reports_checks_as_json(folders: Path) -> None:
    got, heavy, output = _probe(
        "score", "empty", "out.parquet", "--log-format", "json", cwd=folders
    )
    assert got == EXIT_NO_IMAGES and heavy == "-"
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["no_images"]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["score", "--help"],
        ["calibrate", "--help"],
        ["evaluate", "--help"],
        ["train", "--help"],
    ],
)
def test_help_imports_no_tensorflow(args: list[str]) -> None:
    # Each command is loaded lazily: the group's help imports none of them, and a command's
    # help imports only its own module, which keeps TensorFlow, Keras, pandas and matplotlib
    # for the moment it runs.
    got, heavy, output = _probe(*args, cwd=REPO)
    assert got == 0 and "Usage: batchuq" in output, output
    assert heavy == "-", f"batchuq {' '.join(args)} imported {heavy}"


def _failing_command(exc: BaseException, **mapping: bool) -> click.Command:
    @click.command()
    def fail() -> None:
        setup_logging()  # to this invocation's stderr
        with exit_on_error(**mapping):
            raise exc

    return fail


@pytest.mark.parametrize(
    ("exc", "mapping", "code", "message"),
    [
        (UsageError("bad option. Received: x=1"), {}, EXIT_USAGE, "Error: bad option"),
        (ModelError("no model. Received: model='m'"), {}, EXIT_USAGE, "Error: no model"),
        (NoImagesFoundError("none in 'x'."), {}, EXIT_NO_IMAGES, "No images to score: none"),
        (NoImagesFoundError("none in 'x'."), {"skip_on_no_images": False}, EXIT_USAGE, "Error:"),
        (click.BadParameter("nope"), {}, EXIT_USAGE, "Invalid value: nope"),
        # Not a usage error: a bug or a failure mid-run, with its traceback (never exit 2).
        (ValueError("shapes (3,) and (4,) not aligned"), {}, EXIT_FATAL, "Traceback"),
        (RuntimeError("disk on fire"), {}, EXIT_FATAL, "fatal error, no output written"),
    ],
)
def test_one_mapping_from_exceptions_to_exit_codes(
    exc: BaseException, mapping: dict[str, bool], code: int, message: str
) -> None:
    result = CliRunner().invoke(_failing_command(exc, **mapping), [])
    assert result.exit_code == code, result.output
    assert message in result.output


ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"  # local time and its UTC offset


def _on_a_terminal(*args: str, cwd: Path) -> str:
    """What ``batchuq ARGS`` writes to stderr when stderr is a terminal (a pseudo-terminal)."""
    import os
    import pty

    main, terminal = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-m", "batchuq", *args],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            cwd=cwd,
            timeout=120,
        )
    finally:
        os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the terminal's other end is closed and everything read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_text_log_lines_carry_a_timestamp_unless_stderr_is_a_terminal(folders: Path) -> None:
    # A pipe, as under cron (`>> batchuq.log 2>&1`) or Airflow: every line has its time.
    got, _, output = _probe("score", "missing", "out.parquet", cwd=folders)
    assert got == EXIT_USAGE
    assert re.search(rf"^batchuq: {ISO_TIME} Error: The images folder does not exist", output, re.M)
    result = CliRunner().invoke(_failing_command(RuntimeError("disk on fire")), [])
    (first, *traceback) = result.output.splitlines()
    assert re.fullmatch(rf"batchuq: {ISO_TIME} fatal error, no output written: disk on fire", first)
    assert traceback[0] == "Traceback (most recent call last):"
    # A terminal: no timestamps, the message as Click prints one.
    shown = _on_a_terminal("score", "missing", "out.parquet", cwd=folders)
    assert shown.startswith("Error: The images folder does not exist"), shown
    # JSON events carry the time in every case, in the same form.
    got, _, output = _probe("score", "empty", "o.parquet", "--log-format", "json", cwd=folders)
    (event,) = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert re.fullmatch(ISO_TIME, event["time"])
    age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(event["time"])
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=2)
