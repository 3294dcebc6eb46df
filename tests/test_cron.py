"""The cron line of docs/unattended.md runs as written under cron's bare environment."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLE_TEST

from batchuq.output.schema import read_metadata

DOCS = (REPO / "docs" / "unattended.md").read_text(encoding="utf-8")
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"  # local time, its UTC offset
BATCHUQ = Path(sys.executable).parent / "batchuq"  # the venv's console script


def _cron_line(index: int = 0) -> str:
    """The command of the docs' crontab line (after the five time fields): the line of the
    ``index``-th ``cron`` block (0: scoring, 1: the labelling queue)."""
    blocks = re.findall(r"```cron\n(.*?)```", DOCS, re.DOTALL)
    assert len(blocks) > index, "docs/unattended.md lacks a ```cron block"
    lines = [line for line in blocks[index].splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 5)
    # cron turns an unescaped % into a newline; the docs escape them as \%.
    return fields[5].replace("\\%", "%")


def _placed(command: str, scores: Path, incoming: Path) -> str:
    """``command`` with the docs' paths replaced by the test's."""
    assert "/opt/batchuq/.venv/bin/batchuq" in command and "/srv/scores" in command
    for placeholder, real in (
        ("/opt/batchuq/.venv/bin/batchuq", str(BATCHUQ)),
        ("/srv/scores", str(scores)),
        ("/data/incoming", str(incoming)),
    ):
        command = command.replace(placeholder, real)
    return command


def _time_of(line: str) -> dt.datetime:
    """The time of a log line ``batchuq: <ISO 8601 time> ...``."""
    return dt.datetime.fromisoformat(line.split()[1])


def _run_as_cron(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as cron would: /bin/sh, PATH=/usr/bin:/bin, nothing else inherited."""
    return subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _last_timed(log: list[str]) -> str:
    """The last line of ``log`` that batchuq logged with its time (not the monitor's table)."""
    return [line for line in log if re.match(rf"batchuq: {ISO_TIME} ", line)][-1]


@pytest.mark.skipif(not BATCHUQ.exists(), reason="batchuq is not installed beside this Python")
def test_readme_cron_line_runs_under_cron_environment(tmp_path: Path) -> None:
    def date(when: str) -> str:
        done = subprocess.run(["date", "-d", when, "+%F"], capture_output=True, text=True)
        return done.stdout.strip()

    yesterday, day_before = date("yesterday"), date("2 days ago")
    scores, incoming, models = tmp_path / "scores", tmp_path / "incoming", tmp_path / "models"
    night = incoming / yesterday
    for folder in (scores, night, models):
        folder.mkdir(parents=True)
    for class_dir in sorted(SAMPLE_TEST.iterdir()):  # 10 images of each digit
        for image in sorted(class_dir.iterdir())[:10]:
            shutil.copy(image, night / f"{class_dir.name}_{image.name}")
    bundled = REPO / "batchuq" / "data"
    shutil.copy(bundled / "digits_cnn.keras", models / "monkeys.keras")
    shutil.copy(bundled / "digits_cnn.classes.json", models / "monkeys.classes.json")
    (scores / "batchuq.toml").write_text(f'[score]\nmodel = "{models}/monkeys.keras"\npasses = 3\n')
    command, queue_command = (_placed(_cron_line(i), scores, incoming) for i in (0, 1))
    history = scores / "history"

    # The first night of the history: scored, then nothing to monitor against (exit 2, mailed).
    done = _run_as_cron(command, tmp_path)
    assert done.returncode == 0 and done.stderr == ""  # the `|| { ...; }` part printed the mail
    assert done.stdout.startswith("batchuq failed with exit code 2 (5: the monitor alerts)")
    assert "holds no night before tonight's" in done.stdout
    log = (scores / "batchuq.log").read_text().splitlines()
    assert log and all(re.match(rf"batchuq: {ISO_TIME} ", line) for line in log), log
    out = history / f"date={yesterday}" / "part-0.parquet"
    assert pq.read_metadata(out).num_rows == 100
    meta = read_metadata(out)
    assert meta["demo_model"] is False and meta["model_path"].endswith("monkeys.keras")
    assert meta["settings"]["model"]["source"] == "config file (batchuq.toml)"
    assert meta["partition"] == {"date": yesterday}

    done = _run_as_cron(queue_command, tmp_path)  # the morning's labelling queue
    assert done.returncode == 0 and done.stdout == done.stderr == "", done.stdout
    tasks = json.loads((scores / f"tasks-{yesterday}.json").read_text())
    assert len(tasks) == 50
    assert {Path(t["data"]["image"]).name for t in tasks} <= {p.name for p in night.iterdir()}
    assert (scores / "queue" / f"date={yesterday}" / "part-0.parquet").is_file()

    # The same images as the night before (its partition renamed to the day before): scored
    # and monitored, quiet (exit 0): nothing printed, so cron sends no mail.
    (history / f"date={yesterday}").rename(history / f"date={day_before}")
    done = _run_as_cron(command, tmp_path)
    assert done.returncode == 0 and done.stdout == done.stderr == "", done.stdout
    assert (scores / "batchuq.log").read_text().splitlines()[-1] == "quiet: no test alerts"

    # A shifted night (heavy Gaussian noise on the same images): the monitor alerts (exit 5)
    # and the mail ends with its table.
    shifted = tmp_path / "shifted"
    subprocess.run(
        [str(BATCHUQ), "shift", str(night), str(shifted), "--corruptions", "gaussian_noise",
         "--severities", "5", "--no-contact-sheet", "--no-progress"],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(night)
    shutil.move(shifted / "gaussian_noise" / "5", night)
    done = _run_as_cron(command, tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("batchuq failed with exit code 5"), done.stdout
    assert done.stdout.splitlines()[-1].startswith("ALERT: ")
    log = (scores / "batchuq.log").read_text().splitlines()
    night_one = _last_timed(log)

    shutil.rmtree(night)  # a failing night: the folder never arrived
    done = _run_as_cron(command, tmp_path)
    assert done.returncode == 0  # the `|| { ...; }` part ran; cron mails what it printed
    assert "batchuq failed with exit code 2" in done.stdout
    assert "images folder does not exist" in done.stdout  # the log's tail
    # The tail holds the earlier nights' lines too: the timestamps tell them apart.
    tail = done.stdout.splitlines()[1:]
    assert _last_timed(tail[:-1]) == night_one
    (error,) = [line for line in tail if "images folder does not exist" in line]
    assert re.match(rf"batchuq: {ISO_TIME} Error: ", error) and error == tail[-1]
    assert _time_of(error) >= _time_of(night_one)
