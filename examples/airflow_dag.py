"""Score the images of the day that has just ended, every night, with batchuq (Airflow 3).

The ``@daily`` schedule uses Airflow 3's default ``CronTriggerTimetable``: a run fires at
midnight UTC and its logical date D is that midnight (the data interval is empty). The run scores
the folder of day D - 1, the day that has just ended. So

    airflow dags test batchuq_nightly 2026-11-23

scores ``$BATCHUQ_IMAGES_ROOT/2026-11-22/`` into ``$BATCHUQ_OUTPUT_DIR/scores-2026-11-22.parquet``.

Configured only through environment variables, read by the task when it runs:

* ``BATCHUQ_IMAGES_ROOT``: the folder holding one dated subfolder per night, ``YYYY-MM-DD``;
* ``BATCHUQ_OUTPUT_DIR``: where the Parquet files go, created if missing;
* ``BATCHUQ_MODEL``: the ``.keras`` model, read by batchuq itself;
* ``BATCHUQ_BIN``: absolute path of the ``batchuq`` executable; if unset, the one beside the
  Python that runs this DAG (batchuq installed in Airflow's venv).

A night without a folder, or with an empty one, is skipped rather than failed (exit code 4), and
so is the counting task after it.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag, task

EXIT_NO_IMAGES = 4  # batchuq: no images to score (empty folder, or missing with --missing-ok)

# The shell reads the environment when the task runs, on the worker; `:?` fails the task with a
# clear message when a variable is unset. ds is the logical date D (UTC), so NIGHT is D - 1.
# The last line of stdout, the output path, becomes the task's XCom for the counting task.
SCORE = """
set -u
NIGHT={{ macros.ds_add(ds, -1) }}
OUT="${BATCHUQ_OUTPUT_DIR:?is not set}/scores-$NIGHT.parquet"
mkdir -p "$BATCHUQ_OUTPUT_DIR"
"${BATCHUQ_BIN:-$DEFAULT_BIN}" score "${BATCHUQ_IMAGES_ROOT:?is not set}/$NIGHT" "$OUT" \\
    --missing-ok --resume --max-error-rate 0.01 --log-format json --no-progress \\
  && echo "$OUT"
"""


@dag(
    dag_id="batchuq_nightly",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    default_args={
        # A retry after a crash, a lost worker or the timeout below (SIGTERM: batchuq stops at the
        # next batch boundary and exits 143) reruns the same command; --resume then scores only
        # the images that are not in OUTPUT.checkpoint/ yet.
        "retries": 2,
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=4),
    },
)
def batchuq_nightly() -> None:
    score = BashOperator(
        task_id="score",
        bash_command=SCORE,
        # Exit 4 = no images for that night: mark the task skipped, not failed. Exit 1 (more
        # than 1% unreadable images, output written), 2 (usage) and 3 (fatal) fail it.
        skip_on_exit_code=EXIT_NO_IMAGES,
        # BATCHUQ_BIN's default: batchuq installed in the venv of the Python that runs the DAG.
        env={"DEFAULT_BIN": str(Path(sys.executable).parent / "batchuq")},
        append_env=True,  # keep the BATCHUQ_* variables and PATH of Airflow's environment
    )

    @task
    def count_decisions(output: str) -> dict[str, int]:
        """Counts for the morning report, pushed to XCom as the task's return value."""
        import pandas as pd

        scores = pd.read_parquet(output, columns=["decision", "status"])
        return {
            "images": len(scores),
            "unclassified": int((scores["decision"] == "unclassified").sum()),
            "errors": int((scores["status"] != "ok").sum()),  # status is "error: <reason>"
        }

    # Default trigger rule (all_success): when the scoring is skipped, so is this task.
    count_decisions(score.output)


batchuq_nightly()
