"""The Ray engine (``score --engine ray``): the local engine's rows, scored on a Ray cluster.

The tests that need Ray skip, saying so, when it is not installed (CI installs it with the
``test`` extra). They share one local Ray (2 CPUs, 200 MB object store) started once for the
module; the command-line tests start their own: the engine's default local Ray, and a two-node
cluster made by ``ray start`` on 127.0.0.1. Every Ray here lives in a temporary folder of its
own, and the processes of the cluster the tests start are ended by the tests, one by one.

The compaction of part files (order, duplicates, a folder output replacing an older one) and a
local run resuming parts that the Ray worker wrote need no Ray and always run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# The test clusters listen on 127.0.0.1 only: no token (Ray would write one to ~/.ray), no
# usage statistics.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import contextlib

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
from conftest import (  # noqa: E402
    REPO,
    SAMPLE_TEST,
    assert_frames_equal_to_rounding,
    assert_integer_columns_stay_integers,
)

from batchuq import score_directory  # noqa: E402
from batchuq.cli.runtime import EXIT_IMAGE_ERRORS  # noqa: E402
from batchuq.compact import SortedParts, part_name_at, write_part_file  # noqa: E402
from batchuq.errors import OutputError, StopRequested, UsageError  # noqa: E402
from batchuq.jobs.score import RaySettings, RunControl  # noqa: E402
from batchuq.jobs.score.plan import ScoreOptions, prepare_run  # noqa: E402
from batchuq.jobs.score.ray_engine import OutputTarget, finalise  # noqa: E402
from batchuq.jobs.score.ray_worker import PartJob, PartScorer  # noqa: E402
from batchuq.jobs.score.rows import checkpoint_fingerprint, run_schema  # noqa: E402
from batchuq.output.paths import check_output_folder
from batchuq.output.schema import read_metadata
from batchuq.output.sink import Checkpoint, write_folder_from_parts

PASSES = 10  # few passes: the rows' equality does not depend on T, the tests' time does
PART = 32  # images per part: 15 parts of the 450 test digits
RAY_TIMEOUT = 300  # seconds for one command-line run on a loaded 2-core machine


@pytest.fixture(scope="module")
def ray_module():
    return pytest.importorskip("ray", reason='Ray is not installed: pip install "batchuq[ray]"')


def short_temp_dir() -> str:
    """A fresh folder under /tmp: Ray's socket paths inside it must stay under 108 bytes."""
    return tempfile.mkdtemp(prefix="bq-ray-", dir="/tmp")


@pytest.fixture(scope="module")
def local_ray(ray_module) -> Iterator[str]:
    """A local Ray for the module's library calls (the engine uses it as it is)."""
    temp = short_temp_dir()
    ray_module.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 << 20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        _temp_dir=temp,
    )
    yield temp
    ray_module.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled test digits scored by the local engine."""
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    score_directory(SAMPLE_TEST, out, ScoreOptions(passes=PASSES))
    return out


def _metadata_but_run(path: Path) -> dict:
    """The file's metadata without what differs between any two runs (time, run record)."""
    metadata = read_metadata(path)
    for key in ("created", "run"):
        metadata.pop(key, None)
    return metadata


# --- processes of a Ray cluster, found through /proc ---------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (parent, cmdline)
    return found


def cluster_processes(marker: str) -> set[int]:
    """The processes whose command line names ``marker`` (a cluster's own temporary folder),
    and all their descendants (workers, which do not name it); never this process."""
    processes = _processes()
    found = {pid for pid, (_, cmd) in processes.items() if marker in cmd and pid != os.getpid()}
    while True:
        children = {pid for pid, (parent, _) in processes.items() if parent in found} - found
        if not children:
            return found
        found |= children


def scoring_actors(marker: str) -> list[int]:
    """PIDs of the scoring actors of the cluster living in ``marker``."""
    processes = _processes()
    return sorted(
        pid
        for pid in cluster_processes(marker)
        if processes.get(pid, (0, ""))[1].startswith("ray::MapWorker(MapBatches(PartScorer))")
    )


def end_processes(pids: set[int], grace: float = 3.0) -> None:
    """SIGTERM each process, then SIGKILL those still alive after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


# Compared exactly between runs in other processes; the float columns only in the numerics test.
EXACT = ["path", "label", "label_index", "pred", "pred_index", "decision", "status"]


def assert_same_rows(path: Path, reference: Path) -> None:
    """The same images in the same order, each once, with the same predictions and decisions."""
    rows, expected = pd.read_parquet(path, columns=EXACT), pd.read_parquet(reference, columns=EXACT)
    assert rows.path.is_unique
    pd.testing.assert_frame_equal(rows, expected)


def _json_events(stderr: str) -> list[dict]:
    """Every stderr line parsed as JSON (fails on a line that is not)."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


# --- the Ray engine against the local engine -----------------------------------------------------


@pytest.mark.numerics
def test_ray_engine_writes_the_local_engines_rows(
    local_ray: str, local_reference: Path, tmp_path: Path
) -> None:
    report = score_directory(
        SAMPLE_TEST,
        f"{tmp_path}/scores/",
        ScoreOptions(passes=PASSES),
        control=RunControl(checkpoint_rows=PART),
        ray=RaySettings(workers=2),
    )
    # A folder dataset: files whose names sort as their rows, read as one table.
    files = sorted((tmp_path / "scores").iterdir())
    assert [f.name for f in files] == [f"part-{i:06d}.parquet" for i in range(15)]
    rows, local = pd.read_parquet(tmp_path / "scores"), pd.read_parquet(local_reference)
    assert len(rows) == 450 and rows.path.is_unique
    assert (rows[["label_index", "pred_index", "passes"]].dtypes == "Int64").all()
    # Same paths in the same order, identical decisions and statuses, floats to rounding.
    assert_frames_equal_to_rounding(rows, local)
    local_meta = _metadata_but_run(local_reference)
    assert local_meta.pop("engine") == "local"
    for file in files:  # every file holds the metadata
        ray_meta = _metadata_but_run(file)
        assert ray_meta.pop("engine") == "ray"
        assert ray_meta == local_meta
    run = read_metadata(files[0])["run"]
    assert run["images"] == 450 and run["ray"]["parts"] == 15 and run["ray"]["workers"] == 2
    assert sum(run["ray"]["parts_per_node"].values()) == 15
    assert report.images == 450 and report.errors == 0
    assert report.unclassified == int((local.decision == "unclassified").sum())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]  # no parts folder left


@pytest.mark.numerics
def test_ray_engine_writes_the_local_engines_accuracy_estimate(
    local_ray: str, tmp_path: Path
) -> None:
    from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory

    val = SAMPLE_TEST.parent / "val"
    cal = tmp_path / "cal.json"
    same = {"tta": 1, "passes": PASSES, "score_passes": PASSES}
    calibrate_directory(val, cal, CalibrateOptions(**same))
    options = ScoreOptions(passes=PASSES, calibration=cal)
    score_directory(val, tmp_path / "local.parquet", options)
    report = score_directory(
        val,
        tmp_path / "ray.parquet",
        options,
        control=RunControl(checkpoint_rows=PART),
        ray=RaySettings(workers=2),
    )
    local = read_metadata(tmp_path / "local.parquet")["run"]["estimated_accuracy"]
    ray = read_metadata(tmp_path / "ray.parquet")["run"]["estimated_accuracy"]
    assert ray == report.estimated_accuracy and ray["images"] == local["images"] == 269
    # The engines' means agree to float32 rounding: a count may move by an image at most.
    for key in ("atc_mc", "atc_ne"):
        assert abs(ray[key] - local[key]) <= 1 / 269, key
    assert ray["average_confidence"] == pytest.approx(local["average_confidence"], abs=1e-6)


def test_a_killed_worker_is_retried_while_ray_finishes_a_local_checkpoint(
    local_ray: str, local_reference: Path, tmp_path: Path
) -> None:
    # --resume across engines: the local engine stops after three parts...
    out = tmp_path / "out.parquet"
    checks = itertools.count()
    with pytest.raises(StopRequested):  # the local engine stops at its fourth batch
        score_directory(
            SAMPLE_TEST,
            out,
            ScoreOptions(passes=PASSES),
            control=RunControl(
                resume=True, checkpoint_rows=PART, should_stop=lambda: next(checks) >= 6
            ),
        )
    checkpoint = tmp_path / "out.parquet.checkpoint"
    local_parts = sorted(p.name for p in checkpoint.glob("part-*.parquet"))
    assert local_parts == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]

    # ... and Ray finishes, while one of its actors is killed once it has written a part.
    killed: list[int] = []

    def kill_an_actor_once_ray_writes_parts() -> None:
        deadline = time.monotonic() + RAY_TIMEOUT
        while time.monotonic() < deadline:
            actors = scoring_actors(local_ray)
            if actors and any(checkpoint.glob("part-at-*.parquet")):
                os.kill(actors[0], signal.SIGKILL)  # mid-run: some parts are done, most not
                killed.append(actors[0])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_an_actor_once_ray_writes_parts, daemon=True)
    killer.start()
    report = score_directory(
        SAMPLE_TEST,
        out,
        ScoreOptions(passes=PASSES),
        control=RunControl(resume=True, checkpoint_rows=PART),
        ray=RaySettings(workers=2),
    )
    killer.join(timeout=5)
    assert killed, "no scoring actor was found to kill"
    assert not _alive(killed[0])
    # Complete, each image once, in path order, with the rows of an undisturbed run.
    assert_same_rows(out, local_reference)
    assert read_metadata(out)["run"]["ray"]["parts"] == 12  # 450 - 96 images were left
    assert not checkpoint.exists() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    local = pd.read_parquet(local_reference)
    assert report.images == 450
    assert report.unclassified == int((local.decision == "unclassified").sum())


# --- the command line: bad files, JSON events, a Ray of its own, a two-node cluster --------------


def test_cli_ray_engine_turns_bad_files_into_error_rows(ray_module, tmp_path: Path) -> None:
    images = tmp_path / "images"
    for folder in ("n1", "n4"):
        (images / folder).mkdir(parents=True)
        for image in sorted((SAMPLE_TEST / folder).iterdir())[:5]:
            shutil.copy(image, images / folder / image.name)
    (images / "n1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (images / "n4" / "notes.png").write_text("a text file renamed .png")
    temp = short_temp_dir()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batchuq", "score", str(images), str(tmp_path / "ray.parquet"),
             "--engine", "ray", "--passes", str(PASSES), "--workers", "1", "--log-format",
             "json", "--no-progress"],
            capture_output=True, text=True, timeout=RAY_TIMEOUT, cwd=tmp_path,
            env=_cli_env(RAY_TMPDIR=temp),
        )  # fmt: skip
        leftovers = cluster_processes(temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == EXIT_IMAGE_ERRORS, done.stderr  # written, but with 2 bad files
    events = _json_events(done.stderr)  # nothing but JSON on stderr, Ray's output included
    names = [e["event"] for e in events if e["event"] != "ray"]  # Ray's notices, if any
    assert names[names.index("start") :] == [
        "start", "image_error", "image_error", "summary", "too_many_errors",
    ]  # fmt: skip
    assert {e["path"] for e in events if e["event"] == "image_error"} == {
        "n1/corrupt.png",
        "n4/notes.png",
    }
    assert not leftovers, "the Ray started for the run outlived it"
    rows = pd.read_parquet(tmp_path / "ray.parquet")
    assert len(rows) == 12 and (rows.status != "ok").sum() == 2
    means = [c for c in rows.columns if c.startswith("mean_")]
    assert rows.loc[rows.status != "ok", means].isna().all().all()  # no statistics
    assert_integer_columns_stay_integers(tmp_path / "ray.parquet", ("pred_index", "passes"))
    local_out = tmp_path / "local.parquet"
    score_directory(images, local_out, ScoreOptions(passes=PASSES))
    assert_same_rows(tmp_path / "ray.parquet", local_out)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def two_node_cluster(ray_module) -> Iterator[str]:
    """A head and a second node on 127.0.0.1, one CPU each; yields the head's address."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    temp, port = short_temp_dir(), _free_port()
    address = f"127.0.0.1:{port}"
    head = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--num-cpus", "1", "--temp-dir", temp, "--include-dashboard", "false",
            "--disable-usage-stats"]  # fmt: skip
    second = [ray_cli, "start", "--address", address, "--num-cpus", "1"]
    try:
        for command in (head, second):
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        yield address
    finally:
        end_processes(cluster_processes(temp))
        assert not cluster_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_cli_ray_address_runs_on_a_two_node_cluster(
    two_node_cluster: str, local_reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "batchuq", "score", str(SAMPLE_TEST), str(out), "--engine", "ray",
         "--ray-address", two_node_cluster, "--workers", "2", "--passes", str(PASSES),
         "--checkpoint-rows", str(PART), "--no-progress"],
        capture_output=True, text=True, timeout=RAY_TIMEOUT, cwd=tmp_path, env=_cli_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "450 images, " in done.stderr
    run = read_metadata(out)["run"]
    assert len(run["ray"]["parts_per_node"]) == 2, run  # both nodes scored parts
    assert sum(run["ray"]["parts_per_node"].values()) == 15
    assert_same_rows(out, local_reference)


# --- no Ray needed ------------------------------------------------------------------------------


def test_the_ray_engine_without_ray_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when not installed
    with pytest.raises(UsageError, match=r'pip install "batchuq\[ray\]".*Received: engine=.ray.'):
        score_directory(SAMPLE_TEST, "/tmp/never-written.parquet", ray=RaySettings())


def test_the_local_engine_refuses_a_folder_output(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="--engine ray"):
        score_directory(SAMPLE_TEST, f"{tmp_path}/scores/", ScoreOptions(passes=1))


_PART_SCHEMA = pa.schema([("path", pa.string()), ("x", pa.float32())])


def _part(paths: list[str], value: float) -> pa.Table:
    return pa.table({"path": paths, "x": [value] * len(paths)}, schema=_PART_SCHEMA)


def test_sorted_parts_put_interleaved_parts_in_path_order_once(tmp_path: Path) -> None:
    order = [f"img_{i:02d}.png" for i in range(10)]
    # A local part with gaps (a resume), two parts named by their first image, one of them
    # written twice under another name (a retried part): the first in name order wins.
    write_part_file(tmp_path, "part-000000.parquet", _part([order[i] for i in (0, 1, 5, 6)], 1))
    write_part_file(tmp_path, part_name_at(2), _part(order[2:5], 2))
    write_part_file(tmp_path, part_name_at(7), _part(order[7:10], 3))
    write_part_file(tmp_path, "part-zz-retried.parquet", _part(order[7:10], 4))
    parts = sorted(tmp_path.glob("part-*.parquet"))
    rows = SortedParts(parts, {p: i for i, p in enumerate(order)})
    assert len(rows) == 10 and rows.duplicates == 3
    schema = _PART_SCHEMA
    groups = list(rows.row_groups(schema, group_rows=4))
    assert [g.num_rows for g in groups] == [4, 4, 2]
    table = pa.concat_tables(groups)
    assert table.column("path").to_pylist() == order
    assert table.column("x").to_pylist() == [1, 1, 2, 2, 2, 1, 1, 3, 3, 3]


def test_a_folder_output_replaces_only_a_previous_output(tmp_path: Path) -> None:
    order = [f"img_{i}.png" for i in range(5)]
    write_part_file(tmp_path, part_name_at(0), _part(order, 1))
    rows = SortedParts([tmp_path / part_name_at(0)], {p: i for i, p in enumerate(order)})
    schema = _PART_SCHEMA.with_metadata({b"batchuq": b'{"engine": "ray"}'})
    out = tmp_path / "scores"
    (out).mkdir()
    (out / "part-000000.parquet").write_bytes(b"a previous output")
    written = write_folder_from_parts(
        rows, out, schema, rows_per_file=2, group_rows=2, run_record={"images": 5}
    )
    assert [p.name for p in written] == [f"part-{i:06d}.parquet" for i in range(3)]
    assert pd.read_parquet(out).path.tolist() == order
    assert read_metadata(out) == {"engine": "ray", "run": {"images": 5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [part_name_at(0), "scores"]
    (out / "notes.txt").write_text("not ours")
    with pytest.raises(OutputError, match="holds other files .* Received: output="):
        check_output_folder(out)


def test_a_folder_output_keeps_the_integer_columns_integers(tmp_path: Path) -> None:
    """Issue 19: the parts the Ray engine's actor writes (run here as a plain class), compacted
    by its ``finalise`` into a folder dataset (``OUT/``) with an error row among them: pandas
    reads ``pred_index`` and ``passes`` as Int64, polars and DuckDB as 64-bit integers."""
    images = tmp_path / "images"
    for folder in ("n2", "n8"):
        (images / folder).mkdir(parents=True)
        for image in sorted((SAMPLE_TEST / folder).iterdir())[:4]:
            shutil.copy(image, images / folder / image.name)
    (images / "n2" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    options = ScoreOptions(passes=PASSES)
    plan = prepare_run(images, options)
    target = OutputTarget.check(f"{tmp_path}/scores/")
    checkpoint = Checkpoint(
        target.path, checkpoint_fingerprint(plan), 4, order=plan.relative_paths,
        folder=tmp_path / "parts",
    )  # fmt: skip
    checkpoint.open()
    schema = run_schema(plan, "ray")
    job = PartJob.for_workers(plan, options, schema, checkpoint.fingerprint, checkpoint.folder)
    summaries = PartScorer(job)(pa.table({"positions": [[0, 1, 2, 3, 4], [5, 6, 7, 8]]}))
    assert sum(len(s["error_positions"]) for s in summaries.to_pylist()) == 1
    finalise(target, checkpoint, plan, schema, {"images": 9})
    assert len(list(target.path.iterdir())) == 3  # 4 rows a file
    assert_integer_columns_stay_integers(target.path, with_nulls=("pred_index", "passes"))
    assert read_metadata(target.path)["engine"] == "ray"


def test_a_local_resume_finishes_parts_written_by_the_ray_worker(tmp_path: Path) -> None:
    # The Ray engine's actor is a plain class: run here, it writes its parts as on Ray.
    images = tmp_path / "images"
    for folder in ("n2", "n8"):
        (images / folder).mkdir(parents=True)
        for image in sorted((SAMPLE_TEST / folder).iterdir())[:6]:
            shutil.copy(image, images / folder / image.name)
    out = tmp_path / "out.parquet"
    options = ScoreOptions(passes=PASSES)
    plan = prepare_run(images, options)
    checkpoint = Checkpoint(out, checkpoint_fingerprint(plan), 4, order=plan.relative_paths)
    checkpoint.open()
    job = PartJob.for_workers(
        plan, options, run_schema(plan, "ray"), checkpoint.fingerprint, checkpoint.folder
    )
    scorer = PartScorer(job)
    summaries = scorer(pa.table({"positions": [[2, 3, 4], [8, 9]]})).to_pylist()
    assert [(s["first"], s["rows"]) for s in summaries] == [(2, 3), (8, 2)]
    assert sorted(p.name for p in checkpoint.folder.glob("part-*")) == [
        part_name_at(2),
        part_name_at(8),
    ]
    report = score_directory(
        images, out, ScoreOptions(passes=PASSES), control=RunControl(resume=True, checkpoint_rows=4)
    )
    assert report.images == 12 and not checkpoint.folder.exists()
    reference = tmp_path / "reference.parquet"
    score_directory(images, reference, ScoreOptions(passes=PASSES))
    assert_same_rows(out, reference)
    assert pd.read_parquet(out).path.tolist() == plan.relative_paths


@pytest.fixture
def s3_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """Twelve test digits in a local folder and their copy in a moto S3 server on 127.0.0.1."""
    moto_server = pytest.importorskip("moto.server", reason="moto is not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    local = tmp_path / "digits"
    for folder in ("n3", "n5"):
        (local / folder).mkdir(parents=True)
        for image in sorted((SAMPLE_TEST / folder).iterdir())[:6]:
            shutil.copy(image, local / folder / image.name)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="batchuq-ray")
    for path in sorted(local.rglob("*.png")):
        key = f"digits/{path.relative_to(local).as_posix()}"
        client.put_object(Bucket="batchuq-ray", Key=key, Body=path.read_bytes())
    yield "s3://batchuq-ray/digits", local
    server.stop()


def test_the_ray_worker_reads_images_from_object_storage(
    s3_digits: tuple[str, Path], tmp_path: Path
) -> None:
    # Local paths are made absolute for workers (another working directory); URLs stay URLs.
    url, local = s3_digits
    options = ScoreOptions(passes=PASSES)
    plan = prepare_run(url, options)
    folder = tmp_path / "parts"
    folder.mkdir()
    job = PartJob.for_workers(plan, options, run_schema(plan, "ray"), {}, folder)
    assert job.images == url and job.discovery.root == url
    assert all(f.path.startswith(f"{url}/") for f in job.discovery.files)
    job = PartJob.for_workers(
        plan, options, run_schema(plan, "ray"), checkpoint_fingerprint(plan), folder
    )
    summaries = PartScorer(job)(pa.table({"positions": [list(range(12))]})).to_pylist()
    assert summaries[0]["rows"] == 12 and summaries[0]["error_positions"] == []
    score_directory(local, tmp_path / "local.parquet", ScoreOptions(passes=PASSES))
    assert_same_rows(folder / part_name_at(0), tmp_path / "local.parquet")
