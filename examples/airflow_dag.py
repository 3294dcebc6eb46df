"""Score a folder of images every night with Airflow, two ways.

* ``score_cli`` runs the command line in a BashOperator: Airflow marks the task failed on any
  non-zero exit code (1: too many unreadable images, 2: usage, 3: fatal, 130/143: killed).
* ``score_python`` calls the library in a ``@task``; ``score_directory`` raises on usage and
  fatal errors, and the report decides whether unreadable images fail the task.

Both write the output atomically, so a downstream task never reads a half-written file.
"""

from __future__ import annotations

import pendulum
from airflow.decorators import dag, task
from airflow.operators.bash import BashOperator

IMAGES = "/data/camera-traps/{{ ds }}"
OUTPUT = "/data/scores/{{ ds }}.parquet"


@dag(schedule="@daily", start_date=pendulum.datetime(2026, 11, 1, tz="UTC"), catchup=False)
def batchuq_nightly() -> None:
    BashOperator(
        task_id="score_cli",
        bash_command=(
            f"batchuq score {IMAGES} {OUTPUT} --model /models/monkeys.keras "
            "--passes 100 --tta 4 --resume --max-error-rate 0.01 --log-format json --no-progress"
        ),
    )

    @task
    def score_python(images: str, output: str) -> dict:
        from batchuq import score_directory

        report = score_directory(
            images, output, model="/models/monkeys.keras", passes=100, tta=4, resume=True
        )
        if report.error_rate > 0.01:
            raise RuntimeError(f"{report.errors} unreadable images: {report.error_paths[:10]}")
        return {"images": report.images, "unclassified": report.unclassified}

    score_python(IMAGES, OUTPUT.replace(".parquet", "-py.parquet"))


batchuq_nightly()
