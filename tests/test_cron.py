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


@pytest.mark.skipif(not BATCHUQ.exists(), reason="batchuq is not installed beside this Python")
def test_readme_cron_line_runs_under_cron_environment(tmp_path: Path) -> None:
    yesterday = subprocess.run(
        ["date", "-d", "yesterday", "+%F"], capture_output=True, text=True, check=True
    ).stdout.strip()
    scores, incoming, models = tmp_path / "scores", tmp_path / "incoming", tmp_path / "models"
    night = incoming / yesterday
    for folder in (scores, night, models):
        folder.mkdir(parents=True)
    for image in sorted((SAMPLE_TEST / "n7").iterdir())[:4]:
        shutil.copy(image, night / image.name)
    bundled = REPO / "batchuq" / "data"
    shutil.copy(bundled / "digits_cnn.keras", models / "monkeys.keras")
    shutil.copy(bundled / "digits_cnn.classes.json", models / "monkeys.classes.json")
    (scores / "batchuq.toml").write_text(f'[score]\nmodel = "{models}/monkeys.keras"\npasses = 3\n')
    command, queue_command = (_placed(_cron_line(i), scores, incoming) for i in (0, 1))

    done = _run_as_cron(command, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == done.stderr == ""  # nothing printed: cron sends no mail
    log = (scores / "batchuq.log").read_text().splitlines()
    assert log and all(re.match(rf"batchuq: {ISO_TIME} ", line) for line in log), log
    night_one = log[-1]
    out = scores / "history" / f"date={yesterday}" / "part-0.parquet"
    assert pq.read_metadata(out).num_rows == 4
    meta = read_metadata(out)
    assert meta["demo_model"] is False and meta["model_path"].endswith("monkeys.keras")
    assert meta["settings"]["model"]["source"] == "config file (batchuq.toml)"
    assert meta["partition"] == {"date": yesterday}

    done = _run_as_cron(queue_command, tmp_path)  # the morning's labelling queue
    assert done.returncode == 0 and done.stdout == done.stderr == "", done.stdout
    tasks = json.loads((scores / f"tasks-{yesterday}.json").read_text())
    assert sorted(Path(t["data"]["image"]).name for t in tasks) == sorted(
        p.name for p in night.iterdir()
    )
    assert (scores / "queue" / f"date={yesterday}" / "part-0.parquet").is_file()
    log = (scores / "batchuq.log").read_text().splitlines()
    night_one = log[-1]

    shutil.rmtree(night)  # a failing night: the folder never arrived
    done = _run_as_cron(command, tmp_path)
    assert done.returncode == 0  # the `|| { ...; }` part ran; cron mails what it printed
    assert "batchuq failed with exit code 2" in done.stdout
    assert "images folder does not exist" in done.stdout  # the log's tail
    # The tail holds the first night's lines too: the timestamps tell them apart.
    tail = done.stdout.splitlines()[1:]
    assert tail[-2] == night_one
    (error,) = [line for line in tail if "images folder does not exist" in line]
    assert re.match(rf"batchuq: {ISO_TIME} Error: ", error) and error == tail[-1]
    assert _time_of(error) >= _time_of(night_one)
