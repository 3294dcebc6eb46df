"""examples/airflow_dag.py runs for real through Airflow's own ``dag.test()``.

The DAG test needs Apache Airflow 3 installed beside batchuq (docs/unattended.md, "Airflow");
without it, it is skipped. Airflow runs in a child process (this file, run as a script) with its
own AIRFLOW_HOME and sqlite database, so that its configuration and logging set-up stay out of
the rest of the test session.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "examples" / "airflow_dag.py"
SAMPLE_TEST = REPO / "sample_data" / "digits" / "test"
BUNDLED_MODEL = REPO / "batchuq" / "data" / "digits_cnn.keras"


def test_dag_file_compiles() -> None:
    compile(DAG_FILE.read_text(encoding="utf-8"), str(DAG_FILE), "exec")


def _batchuq_executable() -> str:
    batchuq = Path(sys.executable).parent / "batchuq"
    found = str(batchuq) if batchuq.exists() else shutil.which("batchuq")
    assert found, "no batchuq executable beside this Python or on PATH"
    return found


def _nights(root: Path, batchuq: str) -> None:
    """The images folder: two clean nights (the even and the odd test digits), a shifted one
    (Gaussian noise at severity 5 on the odd ones), none on 2026-11-23, an empty folder on
    2026-11-24, and two small nights for the failing runs."""
    images = sorted(p.relative_to(SAMPLE_TEST) for p in SAMPLE_TEST.rglob("*.png"))
    for night, chosen in (("2026-11-20", images[0::2]), ("2026-11-21", images[1::2])):
        for image in chosen:
            (root / night / image.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE_TEST / image, root / night / image)
    shifted = root.parent / "shifted"
    subprocess.run(
        [
            batchuq,
            "shift",
            str(root / "2026-11-21"),
            str(shifted),
            "--corruptions",
            "gaussian_noise",
            "--severities",
            "5",
            "--no-contact-sheet",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    shutil.move(shifted / "gaussian_noise" / "5", root / "2026-11-22")
    (root / "2026-11-24").mkdir()
    for night in ("2026-11-25", "2026-11-26"):
        for image in images[:5]:
            (root / night / image.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE_TEST / image, root / night / image)


def test_nightly_dag_scores_monitors_and_maps_exit_codes_to_task_states(tmp_path: Path) -> None:
    """One run per night: clean nights pass score and monitor, a shifted night fails monitor
    (exit 5) without a retry, no images skip every task, a usage error (exit 2) fails score
    without a retry, a fatal error (exit 3) is retried twice."""
    try:  # Airflow 3 ships its task SDK as a distribution; looked up without importing Airflow
        importlib.metadata.version("apache-airflow-task-sdk")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs Apache Airflow 3: pip install 'apache-airflow>=3.1,<4'")
    import pandas as pd
    import pyarrow.parquet as pq

    batchuq = _batchuq_executable()
    root = tmp_path / "images"
    _nights(root, batchuq)
    output_dir = tmp_path / "scores"  # does not exist yet: the DAG creates it
    # The bundled model under another name, to see that BATCHUQ_MODEL reaches batchuq.
    model = tmp_path / "models" / "nightly.keras"
    model.parent.mkdir()
    shutil.copy(BUNDLED_MODEL, model)
    shutil.copy(BUNDLED_MODEL.with_suffix(".classes.json"), model.with_suffix(".classes.json"))
    config = tmp_path / "batchuq.toml"
    config.write_text("[score]\npasses = 10\n")  # BATCHUQ_CONFIG reaches batchuq too
    # 2026-11-26's partition cannot be written: its part-0.parquet is a folder, so the run
    # fails at its very end (exit 3), every try.
    (output_dir / "history" / "date=2026-11-26" / "part-0.parquet").mkdir(parents=True)

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BATCHUQ"))},
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "BATCHUQ_IMAGES_ROOT": str(root),
        "BATCHUQ_OUTPUT_DIR": str(output_dir),
        "BATCHUQ_MODEL": str(model),
        "BATCHUQ_CONFIG": str(config),
        "BATCHUQ_BIN": batchuq,
        "BATCHUQ_QUEUE_SIZE": "20",
    }
    # Logical date D scores the night D - 1; 2026-11-26 scores with a model that is not there.
    plan = [
        {"date": date, "env": {}}
        for date in ("2026-11-21", "2026-11-22", "2026-11-23", "2026-11-24", "2026-11-25")
    ]
    plan += [
        {"date": "2026-11-26", "env": {"BATCHUQ_MODEL": str(tmp_path / "gone.keras")}},
        {"date": "2026-11-27", "env": {}},
    ]
    child = subprocess.run(
        [sys.executable, __file__, json.dumps(plan)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(child.stdout[-30000:], child.stderr[-5000:])  # Airflow's task logs, shown on a failure
    assert child.returncode == 0
    runs = json.loads(child.stdout.strip().splitlines()[-1])
    history = output_dir / "history"
    ok = {"score": "success", "monitor": "success", "queue": "success"}
    ok["count_decisions"] = "success"
    one_try = dict.fromkeys(ok, 1)

    # The first night: scored into its partition; nothing before it to monitor against.
    first = runs["2026-11-21"]
    assert first["state"] == "success"
    assert first["tasks"] == {**ok, "monitor": "skipped"} and first["tries"] == one_try
    partition = history / "date=2026-11-20"
    assert first["xcom"]["score"] == str(partition)
    frame = pd.read_parquet(partition / "part-0.parquet")
    meta = json.loads(pq.read_schema(partition / "part-0.parquet").metadata[b"batchuq"])
    assert meta["model_path"] == str(model) and meta["passes"] == 10
    assert sorted(frame["path"]) == sorted(
        str(p.relative_to(root / "2026-11-20")) for p in (root / "2026-11-20").rglob("*.png")
    )
    assert first["xcom"]["count_decisions"] == {
        "images": 225,
        "unclassified": int((frame["decision"] == "unclassified").sum()),
        "errors": int((frame["status"] != "ok").sum()),
    }
    tasks = json.loads((output_dir / "labelling" / "tasks-2026-11-20.json").read_text())
    assert first["xcom"]["queue"] == str(output_dir / "labelling" / "tasks-2026-11-20.json")
    assert len(tasks) == 20

    # The second clean night: monitor against the first is quiet (exit 0), its report written.
    second = runs["2026-11-22"]
    assert second["state"] == "success" and second["tasks"] == ok, second
    assert second["tries"] == one_try
    assert (output_dir / "monitor" / "date=2026-11-21" / "index.html").is_file()
    assert "$ " + batchuq + " monitor " + str(history / "date=2026-11-21") in child.stdout

    # The shifted night: monitor alerts (exit 5), the task fails at its first try (no retry)
    # and so does the run; the queue is still written.
    shifted = runs["2026-11-23"]
    assert shifted["state"] == "failed"
    assert shifted["tasks"] == {**ok, "monitor": "failed"} and shifted["tries"] == one_try
    assert (output_dir / "monitor" / "date=2026-11-22" / "index.html").is_file()
    assert "batchuq exited 5 (monitor alert" in child.stdout + child.stderr
    assert (output_dir / "labelling" / "tasks-2026-11-22.json").is_file()

    # No folder for 2026-11-23, an empty one for 2026-11-24: exit 4, every task skipped, the
    # run itself succeeds, nothing written.
    for date in ("2026-11-24", "2026-11-25"):
        assert runs[date]["state"] == "success", date
        assert runs[date]["tasks"] == dict.fromkeys(ok, "skipped"), date
        assert runs[date]["xcom"] == {}, date
    assert sorted(p.name for p in history.iterdir()) == [
        f"date=2026-11-{day}" for day in (20, 21, 22, 26)
    ]

    # A usage error (the model is missing): score fails at its first try, not retried.
    usage = runs["2026-11-26"]
    assert usage["state"] == "failed" and usage["tries"]["score"] == 1
    assert usage["tasks"] == {**dict.fromkeys(ok, "upstream_failed"), "score": "failed"}
    assert "batchuq exited 2 (usage error)" in child.stdout + child.stderr
    # A fatal error (exit 3): score is retried twice, three tries in all.
    fatal = runs["2026-11-27"]
    assert fatal["state"] == "failed" and fatal["tries"]["score"] == 3
    assert fatal["tasks"] == {**dict.fromkeys(ok, "upstream_failed"), "score": "failed"}
    assert "batchuq exited 3; the task will be retried" in child.stdout + child.stderr

    # The same through the command line, as docs/unattended.md runs a night by hand: the
    # clean night reruns quiet (exit 0), the shifted one fails on its monitor alert (exit 1).
    airflow = Path(sys.executable).parent / "airflow"
    for date, code in (("2026-11-22", 0), ("2026-11-23", 1)):
        done = subprocess.run(
            [str(airflow), "dags", "test", "batchuq_nightly", date],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == code, done.stdout[-5000:] + done.stderr[-5000:]
        night = _night_before(date)
        assert f"monitor {history / f'date={night}'} --reference {history}" in done.stdout
    assert "ALERT: " in done.stdout and "batchuq exited 5 (monitor alert" in done.stdout


def _night_before(date: str) -> str:
    return (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()


def _run_dag(plan: list[dict]) -> None:
    """In the child: run the example DAG once per logical date of ``plan`` (each with its
    environment changes, read by the tasks when they run) and print states, tries and XComs."""
    from datetime import timedelta

    import pendulum
    from airflow.models.xcom import XComModel
    from airflow.utils.db import initdb
    from airflow.utils.session import create_session
    from sqlalchemy import select

    initdb()
    spec = importlib.util.spec_from_file_location("airflow_dag", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.batchuq_nightly()
    for task in dag.tasks:
        # The DAG's retries, without its 10-minute wait between tries (dag.test() waits too).
        task.retry_delay = timedelta(0)

    runs = {}
    base = dict(os.environ)
    for step in plan:
        os.environ.clear()
        os.environ.update({**base, **step["env"]})
        run = dag.test(logical_date=pendulum.parse(step["date"], tz="UTC"))
        with create_session() as session:
            tis = run.get_task_instances(session=session)
            xcoms = session.scalars(
                select(XComModel).where(
                    XComModel.run_id == run.run_id,
                    XComModel.dag_id == run.dag_id,
                    XComModel.key == "return_value",
                )
            )
            runs[step["date"]] = {
                "state": str(run.state),
                "tasks": {ti.task_id: str(ti.state) for ti in tis},
                "tries": {ti.task_id: ti.try_number for ti in tis},
                "xcom": {x.task_id: x.value for x in xcoms if x.value is not None},
            }
    print(json.dumps(runs))


if __name__ == "__main__":
    _run_dag(json.loads(sys.argv[1]))
