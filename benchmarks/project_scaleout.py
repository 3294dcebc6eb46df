"""Scale-out projection: what one worker and the driver cost here, projected to 8, 64 and 512
workers (issue 14).

Measured on this machine:

* **one worker's images/s**: ``score_directory`` (the local engine) end to end, JPEG files to
  Parquet, after a warm-up run in the same process, in a fresh process pinned to one CPU core
  (``os.sched_setaffinity`` before TensorFlow is imported, so its thread pools and batchuq's
  decode workers size themselves to one core): the share of one Ray worker with
  ``--cpus-per-worker 1``. Two workloads: ``bench_mc.py``'s 128x128x3 JPEGs through the
  reference CNN (random weights, 5 classes), T = 100; and the bundled digits model on
  ``sample_data/digits/test``, T = 100 (a light model, where the limits come sooner).
* **the driver's serial work per image**: discovery of a local folder of many small files (10
  class folders); discovery of the same layout from an S3 server (moto, on 127.0.0.1 of this
  machine: a Python server on the same two cores, not S3); and compaction per row: a
  ``pyarrow.parquet.ParquetWriter`` streaming Parquet parts of score rows (the schema of a score
  run, 10 classes) into one file, one part in memory at a time. ``--compactor MODULE:FUNCTION``
  times another ``compact(parts, output)`` (the Ray engine's) on the same parts.
* **bytes per image** of each workload's files.

The model (Amdahl): discovery runs on the driver before the workers start and compaction after
they finish, so per image the run costs ``d`` serial seconds (listing + compaction) plus
``1 / (N r1)`` with N workers of ``r1`` images/s each: ``X(N) = 1 / (d + 1 / (N r1))``, capped
by the object store's request rate (``--store-gets-per-second``, default 5,500: AWS's documented
GET rate per partitioned S3 prefix, not measured here). Speed-up is ``X(N) / X(1)``. The
bottleneck is the largest of the three terms. Ray's own per-task overhead is not in the model
(the Ray engine's benchmark measures it).

Usage::

    python benchmarks/project_scaleout.py           # ~5 min on 2 shared cores: JSON for the docs
    python benchmarks/project_scaleout.py --quick   # smoke run (small sizes); writes nothing
    python benchmarks/project_scaleout.py --compactor batchuq.jobs.score.ray_engine:compact_parts
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_mc  # noqa: E402 (the benchmark images and the CPU record)
import common  # noqa: E402 (the CPU, versions and date of a result)

RESULTS_JSON = HERE / "results" / "scaleout.json"
DIGITS = REPO / "sample_data" / "digits" / "test"
WORKERS = (1, 8, 64, 512)
CHILD_TAG = "SCALEOUT_WORKER "
Compactor = Callable[[list[Path], Path], None]


# --------------------------------------------------------------------------------------------
# One worker
# --------------------------------------------------------------------------------------------


def worker_child(args: argparse.Namespace) -> None:
    """In a fresh process pinned to one core: a warm-up run, then the timed run."""
    os.sched_setaffinity(0, {args.core})  # before TensorFlow sizes its thread pools
    from batchuq import score_directory
    from batchuq.jobs.score import RunControl, ScoreOptions

    model = args.child_model or None
    out = Path(args.child_output)
    score_directory(
        args.child_warmup,
        out,
        ScoreOptions(model=model, passes=args.passes),
        control=RunControl(progress=False),
    )
    report = score_directory(args.child_images, out, ScoreOptions(model=model, passes=args.passes))
    result = {
        "images": report.images,
        "seconds": report.seconds,
        "images_per_second": report.images_per_second,
        "cores": sorted(os.sched_getaffinity(0)),
    }
    print(CHILD_TAG + json.dumps(result), flush=True)


def measure_worker(images: Path, warmup: Path, model: Path | None, passes: int, tmp: Path) -> dict:
    """One worker's images/s (see ``worker_child``), from a fresh process."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker-child",
        "--child-images",
        str(images),
        "--child-warmup",
        str(warmup),
        "--child-model",
        str(model or ""),
        "--child-output",
        str(tmp / "worker.parquet"),
        "--passes",
        str(passes),
    ]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    files = [p for p in images.rglob("*") if p.is_file()]
    return json.loads(lines[-1][len(CHILD_TAG) :]) | {
        "passes": passes,
        "loadavg_before": round(load, 2),
        "bytes_per_image": sum(p.stat().st_size for p in files) / len(files),
    }


# --------------------------------------------------------------------------------------------
# The driver: discovery and compaction
# --------------------------------------------------------------------------------------------


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``run``, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def small_files(folder: Path, count: int, classes: int = 10) -> list[str]:
    """``count`` tiny PNG-named files in ``classes`` class folders; their relative paths."""
    names = [f"n{i % classes}/img_{i:07d}.png" for i in range(count)]
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return names


def measure_local_discovery(tmp: Path, count: int, repeats: int) -> dict:
    """``discover_images`` of a local folder of ``count`` files: seconds per image."""
    from batchuq.discover import discover_images

    folder = tmp / "many"
    small_files(folder, count)
    seconds = best_seconds(lambda: discover_images(folder), repeats)
    return {"images": count, "seconds": seconds, "us_per_image": 1e6 * seconds / count}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_s3_listing(tmp: Path, count: int, repeats: int) -> dict:
    """``discover_images("s3://...")`` of ``count`` objects on a local moto server."""
    import boto3
    from moto.server import ThreadedMotoServer

    from batchuq.discover import discover_images

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = dict(os.environ)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        names = [f"n{i % 10}/img_{i:07d}.png" for i in range(count)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: client.put_object(Bucket="bench", Key=k, Body=b"x"), names))
        seconds = best_seconds(lambda: discover_images("s3://bench"), repeats)
        if len(discover_images("s3://bench").files) != count:
            raise RuntimeError("the listing did not find every object")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    return {"images": count, "seconds": seconds, "us_per_image": 1e6 * seconds / count}


def score_rows_table(rows: int, classes: int, seed: int):
    """A table of ``rows`` realistic score rows (10 classes by default), the schema of a run."""
    import pyarrow as pa

    from batchuq.output.schema import (
        CLASS_STATISTICS,
        SCORE_COLUMNS,
        output_schema,
        score_record_batch,
    )

    names = [f"n{i}" for i in range(classes)]
    schema = output_schema(names, {"bench": "project_scaleout"})
    rng = np.random.default_rng(seed)
    mean = rng.dirichlet(np.full(classes, 0.3), rows).astype(np.float32)
    stats = {name: rng.random(rows, dtype=np.float32) for name in SCORE_COLUMNS}
    stats |= {stat: mean for stat in CLASS_STATISTICS}
    stats["std"] = (mean * (1 - mean)).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    batch = score_record_batch(
        schema,
        names,
        paths=[f"n{i}/img_{seed:04d}_{r:07d}.jpg" for r, i in enumerate(labels)],
        labels=[names[i] for i in labels],
        label_indices=labels.tolist(),
        statuses=["ok"] * rows,
        pred_index=mean.argmax(axis=1),
        decision_index=mean.argmax(axis=1),
        stats=stats,
    )
    return pa.Table.from_batches([batch])


def stream_compact(parts: list[Path], output: Path) -> None:
    """One Parquet file from ``parts``, streaming: one part in memory at a time."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(parts[0])
    with pq.ParquetWriter(output, schema, compression="zstd") as writer:
        for part in parts:
            writer.write_table(pq.read_table(part, schema=schema))


def batchuq_compact(parts: list[Path], output: Path) -> None:
    """What the Ray engine's driver does: ``compact.SortedParts`` puts the rows in path order
    (one row per image) and ``write.write_file_from_parts`` streams them, a row group at a
    time, into one file written atomically."""
    import pyarrow.parquet as pq

    from batchuq.compact import SortedParts
    from batchuq.output.sink import write_file_from_parts

    paths = [p for part in parts for p in pq.read_table(part, columns=["path"])["path"].to_pylist()]
    position_of = {path: i for i, path in enumerate(sorted(paths))}
    schema = pq.read_schema(parts[0])
    write_file_from_parts(SortedParts(parts, position_of), output, schema, group_rows=4096)


def measure_compaction(
    tmp: Path, parts: int, rows_per_part: int, repeats: int, compact: Compactor
) -> dict:
    """``compact`` over ``parts`` Parquet parts of ``rows_per_part`` score rows: s per row."""
    import pyarrow.parquet as pq

    folder = tmp / "parts"
    folder.mkdir()
    paths = []
    for i in range(parts):
        paths.append(folder / f"part-{i:06d}.parquet")
        pq.write_table(score_rows_table(rows_per_part, 10, i), paths[-1], compression="zstd")
    output = tmp / "compacted.parquet"
    seconds = best_seconds(lambda: compact(paths, output), repeats)
    rows = parts * rows_per_part
    if pq.read_metadata(output).num_rows != rows:
        raise RuntimeError(f"compaction wrote {pq.read_metadata(output).num_rows} of {rows} rows")
    return {
        "parts": parts,
        "rows_per_part": rows_per_part,
        "rows": rows,
        "seconds": seconds,
        "us_per_row": 1e6 * seconds / rows,
        "bytes_per_row": output.stat().st_size / rows,
    }


def load_compactor(spec: str | None) -> tuple[Compactor, str]:
    """``stream_compact``, or ``MODULE:FUNCTION`` taking ``(parts, output)``; and its name."""
    if not spec:
        return batchuq_compact, "the Ray engine's own compaction (compact.SortedParts, sorted)"
    if spec == "plain":
        return stream_compact, "pyarrow's ParquetWriter, one part in memory at a time"
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name), spec


# --------------------------------------------------------------------------------------------
# The projection
# --------------------------------------------------------------------------------------------


def project(worker: dict, driver_us: float, store_gets: float) -> list[dict]:
    """Projected images/s, speed-up and bottleneck at each of ``WORKERS``.

    Args:
        worker: One worker's measurement (``images_per_second``).
        driver_us: The driver's serial microseconds per image (listing + compaction).
        store_gets: The object store's GET requests per second (one per image).

    Returns:
        One dict per worker count.
    """
    rate, serial = worker["images_per_second"], driver_us * 1e-6
    rows = []
    for n in WORKERS:
        parallel = 1.0 / (n * rate)
        amdahl = 1.0 / (serial + parallel)
        throughput = min(amdahl, store_gets)
        if store_gets < amdahl:
            bottleneck = "S3 GET rate of one prefix"
        elif serial > parallel:
            bottleneck = "driver (discovery + compaction)"
        else:
            bottleneck = "workers (model compute)"
        rows.append(
            {
                "workers": n,
                "images_per_second": throughput,
                "driver_share": serial / (serial + parallel),
                "bottleneck": bottleneck,
            }
        )
    for row in rows:
        row["speedup"] = row["images_per_second"] / rows[0]["images_per_second"]
        row["efficiency"] = row["speedup"] / row["workers"]
    return rows


def markdown(figures: dict) -> str:
    """The projection, one line per workload, store and worker count (the docs' results page
    shows it as tables)."""
    return "\n".join(
        f"{name:<10} {store:<10} {row['workers']:>4} workers: {row['images_per_second']:>10,.1f} "
        f"images/s, speed-up {row['speedup']:>6.1f}, bottleneck {row['bottleneck']}"
        for name, stores in figures["projection"].items()
        for store, rows in stores.items()
        for row in rows
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="reference-CNN images (256)")
    parser.add_argument("--passes", type=int, default=100, help="MC passes T (100)")
    parser.add_argument("--discovery-files", type=int, default=20000, help="local files (20000)")
    parser.add_argument("--s3-objects", type=int, default=2000, help="moto objects (2000)")
    parser.add_argument("--parts", type=int, default=100, help="Parquet parts (100)")
    parser.add_argument("--rows-per-part", type=int, default=1024, help="rows per part (1024)")
    parser.add_argument("--repeats", type=int, default=3, help="keep the fastest of (3)")
    parser.add_argument(
        "--store-gets-per-second",
        type=float,
        default=5500.0,
        help="object-store GET rate cap: AWS's documented 5,500/s per S3 prefix (not measured)",
    )
    parser.add_argument(
        "--assumed-list-ms",
        type=float,
        default=100.0,
        help="assumed ms per 1,000-key S3 listing request, for the what-if line (100)",
    )
    parser.add_argument(
        "--compactor",
        default=None,
        help="MODULE:FUNCTION(parts, output), or 'plain' for a bare ParquetWriter loop "
        "(default: the Ray engine's compaction)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes; writes nothing")
    parser.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--child-images", "--child-warmup", "--child-model", "--child-output"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.passes, args.discovery_files, args.s3_objects = 16, 4, 500, 200
        args.parts, args.rows_per_part, args.repeats = 4, 256, 1
    return args


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    """Every measured input of the projection."""
    import keras

    from batchuq.decode import ImageSpec
    from batchuq.jobs.train import reference_cnn

    shape = (bench_mc.HEIGHT, bench_mc.WIDTH, bench_mc.CHANNELS)
    keras.utils.set_random_seed(0)
    model_path = tmp / "reference_cnn.keras"
    reference_cnn(ImageSpec(*shape), bench_mc.CLASSES).save(model_path)
    paths = bench_mc.write_images(tmp / "images", args.images, seed=0)
    (tmp / "warmup").mkdir()
    for path in paths[:32]:
        shutil.copy(path, tmp / "warmup" / path.name)
    digits_warmup = tmp / "digits_warmup" / "n0"
    digits_warmup.mkdir(parents=True)
    for path in sorted((DIGITS / "n0").iterdir())[:32]:
        shutil.copy(path, digits_warmup / path.name)
    digits_images = DIGITS if not args.quick else digits_warmup.parent
    compact, compactor = load_compactor(args.compactor)
    print("one worker: reference CNN ...", flush=True)
    reference = measure_worker(tmp / "images", tmp / "warmup", model_path, args.passes, tmp)
    print("one worker: bundled digits model ...", flush=True)
    digits = measure_worker(digits_images, digits_warmup.parent, None, args.passes, tmp)
    print("driver: discovery, listing, compaction ...", flush=True)
    return {
        "workloads": {
            "reference": reference | {"image_size": list(shape), "format": "JPEG"},
            "digits": digits | {"image_size": [32, 32, 1], "format": "PNG"},
        },
        "local_discovery": measure_local_discovery(tmp, args.discovery_files, args.repeats),
        "s3_listing": measure_s3_listing(tmp, args.s3_objects, args.repeats),
        "compaction": measure_compaction(tmp, args.parts, args.rows_per_part, args.repeats, compact)
        | {"compactor": compactor},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker_child:
        worker_child(args)
        return 0
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="scaleout_"))
    try:
        result = {
            "generated_by": "python benchmarks/project_scaleout.py",
            "date": common.now(),
            "cpu": common.cpu_info(),
            "versions": common.versions(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "config": {k: v for k, v in vars(args).items() if not k.startswith("child")},
            **measure(args, tmp),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    compaction = result["compaction"]["us_per_row"]
    # At most 1,000 keys per ListObjectsV2 request: ms per request = µs per key.
    result["driver_us_per_image"] = {
        "shared_fs": result["local_discovery"]["us_per_image"] + compaction,
        "s3_moto": result["s3_listing"]["us_per_image"] + compaction,
        "s3_assumed": args.assumed_list_ms * 1e3 / 1000 + compaction,
    }
    # Images on a shared filesystem are read with no per-request cap.
    caps = {"shared_fs": float("inf")} | dict.fromkeys(
        ("s3_moto", "s3_assumed"), args.store_gets_per_second
    )
    result["projection"] = {
        name: {
            case: project(w, driver_us, caps[case])
            for case, driver_us in result["driver_us_per_image"].items()
        }
        for name, w in result["workloads"].items()
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(result))
    if args.quick:
        return 0
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
