"""examples/airflow_dag.py runs for real through Airflow's own ``dag.test()``.

The DAG test needs Apache Airflow 3 installed beside batchuq (docs/unattended.md, "Airflow");
without it, it is skipped. Airflow runs in a child process (this file, run as a script) with its
own AIRFLOW_HOME and sqlite database, so that its configuration and logging set-up stay out of
the rest of the test session.
"""

from __future__ import annotations

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


def test_nightly_dag_scores_the_day_before_and_skips_a_night_without_images(
    tmp_path: Path,
) -> None:
    try:  # Airflow 3 ships its task SDK as a distribution; looked up without importing Airflow
        importlib.metadata.version("apache-airflow-task-sdk")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs Apache Airflow 3: pip install 'apache-airflow>=3.1,<4'")
    batchuq = Path(sys.executable).parent / "batchuq"
    batchuq = str(batchuq) if batchuq.exists() else shutil.which("batchuq")
    assert batchuq, "no batchuq executable beside this Python or on PATH"
    import pandas as pd
    import pyarrow.parquet as pq

    # One image per class in the folder of 2026-11-22; no folder for 2026-11-23; an empty one
    # for 2026-11-24.
    root = tmp_path / "images"
    for class_dir in sorted(SAMPLE_TEST.iterdir()):
        first = sorted(class_dir.iterdir())[0]
        (root / "2026-11-22" / class_dir.name).mkdir(parents=True)
        shutil.copy(first, root / "2026-11-22" / class_dir.name / first.name)
    (root / "2026-11-24").mkdir()
    output_dir = tmp_path / "scores"  # does not exist yet: the DAG creates it
    # The bundled model under another name, to see that BATCHUQ_MODEL reaches batchuq.
    model = tmp_path / "models" / "nightly.keras"
    model.parent.mkdir()
    shutil.copy(BUNDLED_MODEL, model)
    shutil.copy(BUNDLED_MODEL.with_suffix(".classes.json"), model.with_suffix(".classes.json"))

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BATCHUQ"))},
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "BATCHUQ_IMAGES_ROOT": str(root),
        "BATCHUQ_OUTPUT_DIR": str(output_dir),
        "BATCHUQ_MODEL": str(model),
        "BATCHUQ_BIN": batchuq,
    }
    dates = ["2026-11-23", "2026-11-24", "2026-11-25"]
    child = subprocess.run(
        [sys.executable, __file__, *dates], env=env, capture_output=True, text=True, timeout=600
    )
    print(child.stdout[-20000:], child.stderr[-5000:])  # Airflow's task logs, shown on a failure
    assert child.returncode == 0
    runs = json.loads(child.stdout.strip().splitlines()[-1])

    # 2026-11-23 scores the folder of 2026-11-22, one row per image.
    scored = runs["2026-11-23"]
    assert scored["state"] == "success"
    assert scored["tasks"] == {"score": "success", "count_decisions": "success"}
    parquet = output_dir / "scores-2026-11-22.parquet"
    assert scored["xcom"]["score"] == str(parquet)
    frame = pd.read_parquet(parquet)
    assert json.loads(pq.read_schema(parquet).metadata[b"batchuq"])["model_path"] == str(model)
    assert len(frame) == 10
    assert sorted(frame["path"]) == sorted(
        str(p.relative_to(root / "2026-11-22")) for p in (root / "2026-11-22").rglob("*.png")
    )
    assert scored["xcom"]["count_decisions"] == {
        "images": 10,
        "unclassified": int((frame["decision"] == "unclassified").sum()),
        "errors": int((frame["status"] != "ok").sum()),
    }

    # No folder for 2026-11-23, an empty one for 2026-11-24: exit 4, both tasks skipped, the
    # run itself succeeds.
    for date in ("2026-11-24", "2026-11-25"):
        assert runs[date]["state"] == "success", date
        assert runs[date]["tasks"] == {"score": "skipped", "count_decisions": "skipped"}, date
        assert runs[date]["xcom"] == {}, date
    assert sorted(p.name for p in output_dir.iterdir()) == ["scores-2026-11-22.parquet"]


def _run_dag(dates: list[str]) -> None:
    """In the child: run the example DAG once per logical date and print states and XComs."""
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
        task.retries = 0  # dag.test() would sleep through the 10-minute retry_delay on a failure

    runs = {}
    for date in dates:
        run = dag.test(logical_date=pendulum.parse(date, tz="UTC"))
        with create_session() as session:
            tis = run.get_task_instances(session=session)
            xcoms = session.scalars(
                select(XComModel).where(
                    XComModel.run_id == run.run_id,
                    XComModel.dag_id == run.dag_id,
                    XComModel.key == "return_value",
                )
            )
            runs[date] = {
                "state": str(run.state),
                "tasks": {ti.task_id: str(ti.state) for ti in tis},
                "xcom": {x.task_id: x.value for x in xcoms},
            }
    print(json.dumps(runs))


if __name__ == "__main__":
    _run_dag(sys.argv[1:])
