"""Score the images of the day that has just ended, every night, with batchuq (Airflow 3).

The ``@daily`` schedule uses Airflow 3's default ``CronTriggerTimetable``: a run fires at
midnight UTC and its logical date D is that midnight (the data interval is empty). The run scores
the folder of day D - 1, the day that has just ended (the night). So

    airflow dags test batchuq_nightly 2026-11-23

scores ``$BATCHUQ_IMAGES_ROOT/2026-11-22/`` into the history partition
``$BATCHUQ_OUTPUT_DIR/history/date=2026-11-22/part-0.parquet``, then, after ``score``:

* ``monitor`` tests that night against the ``BATCHUQ_MONITOR_LAST`` (default 7) nights before it
  in the history folder (or against ``BATCHUQ_REFERENCE``) and writes its report to
  ``$BATCHUQ_OUTPUT_DIR/monitor/date=2026-11-22/index.html``; an alert (exit 5) fails the task,
  so the usual failure alerting fires;
* ``queue`` writes the night's labelling queue, ``$BATCHUQ_OUTPUT_DIR/labelling/tasks-2026-11-22
  .json`` (and ``.csv``), never queuing an image of an earlier night (``$BATCHUQ_OUTPUT_DIR/
  queue/``); it does not wait for ``monitor``: a shifted night is when labels matter most;
* ``count_decisions`` returns the night's counts as its XCom.

Configured only through environment variables, read by the tasks when they run:

* ``BATCHUQ_IMAGES_ROOT``: the folder holding one dated subfolder per night, ``YYYY-MM-DD``;
* ``BATCHUQ_OUTPUT_DIR``: where the history, reports and queues go, created if missing;
* ``BATCHUQ_MODEL``: the ``.keras`` model, read by batchuq itself (as is ``BATCHUQ_CONFIG``);
* ``BATCHUQ_BIN``: absolute path of the ``batchuq`` executable; if unset, the one beside the
  Python that runs this DAG (batchuq installed in Airflow's venv);
* ``BATCHUQ_REFERENCE`` (optional): what ``monitor`` compares with, a run of known-good images
  or a history folder; default: ``$BATCHUQ_OUTPUT_DIR/history``;
* ``BATCHUQ_MONITOR_LAST`` (default 7) and ``BATCHUQ_QUEUE_SIZE`` (default 50).

Each task runs its batchuq command in a child process, prints the command and batchuq's output
to the task log, and turns batchuq's exit code (docs/exit-codes.md) into the task's state:

====  =============================================================  ===========================
exit  batchuq                                                        task
====  =============================================================  ===========================
0     success                                                        success
1     output written, more unreadable images than --max-error-rate   failed, not retried
2     usage error (bad option, model, reference, ...)                failed, not retried
3     fatal error during the run                                     failed, retried (2 retries)
4     no images (no folder, an empty one)                            skipped, and so is all
                                                                     after ``score``
5     ``monitor``: tonight differs from the reference                failed, not retried
130+  interrupted (SIGINT, SIGTERM; also the task's timeout)         failed, retried
====  =============================================================  ===========================

A retry cannot fix exits 1, 2 and 5, so they raise ``AirflowFailException``; every try of
``score`` passes ``--resume``, so a retry scores only what an interrupted try left.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

try:  # the task SDK's exceptions (Airflow 3.3 deprecates their airflow.exceptions names)
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
except ImportError:  # earlier Airflow 3 releases
    from airflow.exceptions import AirflowFailException, AirflowSkipException

# batchuq's exit codes (docs/exit-codes.md) that no retry can change: fail the task at once.
NO_RETRY = {
    1: "more unreadable images than --max-error-rate allows (the output is written)",
    2: "usage error",
    5: "monitor alert: tonight's images differ from the reference",
}
EXIT_NO_IMAGES = 4  # no images to score (empty folder, or missing with --missing-ok): skipped


def run_batchuq(*args: str) -> None:
    """Run ``batchuq ARGS``, its output into the task log; its exit code sets the task's state.

    Args:
        *args: The command line after ``batchuq``.

    Raises:
        AirflowSkipException: On exit 4 (no images, or an empty night).
        AirflowFailException: On exit 1, 2 or 5, or when ``batchuq`` cannot be started.
        RuntimeError: On any other non-zero exit (3, or a signal): the task is retried.
    """
    default = Path(sys.executable).parent / "batchuq"
    command = [os.environ.get("BATCHUQ_BIN") or str(default), *args]
    shown = shlex.join(command)
    print(f"$ {shown}", flush=True)
    try:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except OSError as exc:  # no such executable: set BATCHUQ_BIN; a retry would not help
        raise AirflowFailException(f"cannot run batchuq: {exc}. Command: {shown}") from exc
    with child:
        try:
            for line in child.stdout:
                print(line, end="", flush=True)
        finally:  # the task's timeout (AirflowTaskTimeout): batchuq stops at its next batch
            if child.poll() is None:
                child.terminate()
            child.wait()
    code = child.returncode
    if code == 0:
        return
    if code == EXIT_NO_IMAGES:
        raise AirflowSkipException(f"batchuq exited 4: nothing to do. Command: {shown}")
    if code in NO_RETRY:
        raise AirflowFailException(
            f"batchuq exited {code} ({NO_RETRY[code]}); a retry cannot change that. "
            f"Command: {shown}"
        )
    raise RuntimeError(f"batchuq exited {code}; the task will be retried. Command: {shown}")


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise AirflowFailException(f"the environment variable {name} is not set")
    return value


def _night(ds: str) -> str:
    """The night a run scores: the day before its logical date ``ds``."""
    return (dt.date.fromisoformat(ds) - timedelta(days=1)).isoformat()


def _output_dir() -> Path:
    return Path(_env("BATCHUQ_OUTPUT_DIR"))


@dag(
    dag_id="batchuq_nightly",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    default_args={
        # Retried only for exit 3 and signals (run_batchuq): a crash, a lost worker or the
        # timeout below (SIGTERM: batchuq stops at the next batch boundary and exits 143). The
        # retry reruns the same command; --resume then scores only the images that are not in
        # the checkpoint yet.
        "retries": 2,
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=4),
    },
)
def batchuq_nightly() -> None:
    @task
    def score(ds: str | None = None) -> str:
        """Score the night into its history partition; return the partition's folder."""
        night = _night(ds)
        history = _output_dir() / "history"
        history.mkdir(parents=True, exist_ok=True)
        run_batchuq(
            "score",
            str(Path(_env("BATCHUQ_IMAGES_ROOT")) / night),
            f"{history}/",
            "--partition",
            f"date={night}",
            "--missing-ok",
            "--resume",
            "--max-error-rate",
            "0.01",
            "--log-format",
            "json",
            "--no-progress",
        )
        return str(history / f"date={night}")

    @task
    def monitor(tonight: str) -> None:
        """Test the night against the reference; an alert (exit 5) fails the task."""
        history = Path(tonight).parent
        reference = os.environ.get("BATCHUQ_REFERENCE")
        if not reference and not any(p.name < Path(tonight).name for p in history.glob("date=*")):
            # The first night of a new history has nothing to compare with.
            raise AirflowSkipException(f"no night before {tonight} in {history} yet")
        run_batchuq(
            "monitor",
            tonight,
            "--reference",
            reference or str(history),
            "--last",
            _env("BATCHUQ_MONITOR_LAST", "7"),
            "--report",
            str(_output_dir() / "monitor" / Path(tonight).name),
        )

    @task
    def queue(tonight: str) -> str:
        """Queue the night's most informative images for labelling; return the task file."""
        night = Path(tonight).name.removeprefix("date=")
        tasks = _output_dir() / "labelling" / f"tasks-{night}.json"
        tasks.parent.mkdir(parents=True, exist_ok=True)
        run_batchuq(
            "queue",
            tonight,
            "-n",
            _env("BATCHUQ_QUEUE_SIZE", "50"),
            "-o",
            str(tasks),
            "--history",
            str(_output_dir() / "queue"),
        )
        return str(tasks)

    @task
    def count_decisions(tonight: str) -> dict[str, int]:
        """Counts for the morning report, pushed to XCom as the task's return value."""
        import pandas as pd

        scores = pd.read_parquet(tonight, columns=["decision", "status"])
        return {
            "images": len(scores),
            "unclassified": int((scores["decision"] == "unclassified").sum()),
            "errors": int((scores["status"] != "ok").sum()),  # status is "error: <reason>"
        }

    # Default trigger rule (all_success): when the scoring is skipped (no images), so are the
    # tasks after it; when it fails, they are upstream_failed. monitor and queue both follow
    # score, side by side.
    tonight = score()
    monitor(tonight)
    queue(tonight)
    count_decisions(tonight)


batchuq_nightly()
