"""Peak memory against the number of images and of TTA copies, kept as JSON for the docs.

Runs ``memory_flat.py``'s and ``memory_tta.py``'s measurements (fresh ``batchuq`` processes,
each child's peak RSS) and writes ``benchmarks/results/memory_flat.json`` and
``memory_tta.json`` with the CPU and the date. ``memory_tta`` is measured twice: on this
checkout and on the commit before the TTA copies were chunked (``git archive`` of its
``batchuq/`` first on ``PYTHONPATH``). About 5 minutes on 2 shared cores::

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, RESULTS, benchmark_module, cpu_info, now, record

MEMORY_FLAT_JSON = RESULTS / "memory_flat.json"
MEMORY_FLAT_SIZES = (2000, 20000)
MEMORY_FLAT_PASSES = 10
MEMORY_TTA_JSON = RESULTS / "memory_tta.json"
MEMORY_TTA_COPIES = (10, 100)
# A commit from before the TTA copies were chunked (884b4d6): B x K rows went through at once.
BEFORE_TTA_CHUNKING = "9ae75ec613c5e93b3a0fc40b1a5b70d15319904f"


def measure_memory_flat() -> None:
    """``memory_flat.py --sizes 2000 20000 --passes 10``, kept as JSON."""
    memory_flat = benchmark_module("memory_flat")
    runs = []
    with tempfile.TemporaryDirectory(prefix="memory_flat_") as tmp:
        folder = Path(tmp) / "images"
        for size in MEMORY_FLAT_SIZES:
            memory_flat.make_images(folder, size)  # grows the same folder: N, then 10 N
            rss, seconds = memory_flat.peak_rss_mb(
                folder, Path(tmp) / f"out{size}.parquet", MEMORY_FLAT_PASSES
            )
            runs.append({"images": size, "peak_rss_mib": rss, "seconds": seconds})
            print(f"  memory_flat: {size} images, peak RSS {rss:.0f} MiB, {seconds:.1f} s")
    sizes = " ".join(map(str, MEMORY_FLAT_SIZES))
    result = {
        "command": f"python benchmarks/memory_flat.py --sizes {sizes} --passes "
        f"{MEMORY_FLAT_PASSES}",
        "passes": MEMORY_FLAT_PASSES,
        "runs": runs,
        "cpu": cpu_info(),
        "date": now(),
    }
    record(result, MEMORY_FLAT_JSON)


def memory_tta_runs(label: str) -> dict:
    """The runs of ``memory_tta.py --tta 10 100 --passes 1 --calibrate``: fresh ``batchuq score``
    processes at each K and one ``batchuq calibrate`` with its defaults, each child's peak RSS."""
    memory_flat = benchmark_module("memory_flat")
    test, val = REPO / "sample_data/digits/test", REPO / "sample_data/digits/val"
    where = subprocess.run(
        [sys.executable, "-c", "import batchuq; print(batchuq.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out: dict = {"batchuq_from": where, "score": []}
    with tempfile.TemporaryDirectory(prefix="memory_tta_") as tmp:
        for copies in MEMORY_TTA_COPIES:
            command = ["score", str(test), str(Path(tmp) / f"tta{copies}.parquet")]
            command += ["--tta", str(copies), "--passes", "1", "--no-progress"]
            rss, seconds = memory_flat.cli_peak_rss_mb(command)
            out["score"].append({"tta": copies, "peak_rss_mib": rss, "seconds": seconds})
            print(f"  memory_tta ({label}): --tta {copies}, peak RSS {rss:.0f} MiB")
        rss, seconds = memory_flat.cli_peak_rss_mb(
            ["calibrate", str(val), "-o", str(Path(tmp) / "cal.json")]
        )
        out["calibrate"] = {"peak_rss_mib": rss, "seconds": seconds}
        print(f"  memory_tta ({label}): calibrate, peak RSS {rss:.0f} MiB")
    return out


def measure_memory_tta() -> None:
    """``memory_tta.py``'s runs on this checkout and on the commit before the TTA copies were
    chunked (``git archive`` of its ``batchuq/`` first on ``PYTHONPATH``, as memory_tta.py's
    docstring describes), kept as JSON."""
    current = memory_tta_runs("this checkout")
    with tempfile.TemporaryDirectory(prefix="before_chunking_") as src:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BEFORE_TTA_CHUNKING, "batchuq"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        # The children run `python -c`, whose first import path is the working directory: run
        # them in the old source tree, and put it first on PYTHONPATH as well.
        saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
        os.environ["PYTHONPATH"] = src + (os.pathsep + saved if saved else "")
        os.chdir(src)
        try:
            before = memory_tta_runs(f"commit {BEFORE_TTA_CHUNKING[:7]}")
        finally:
            os.chdir(cwd)
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        if not before["batchuq_from"].startswith(src):
            raise RuntimeError(f"the old commit's batchuq was not imported: {before}")
    before["batchuq_from"] = f"git archive {BEFORE_TTA_CHUNKING} batchuq"
    current["batchuq_from"] = str(Path(current["batchuq_from"]).parent.relative_to(REPO))
    from batchuq.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_BUDGET_MB

    result = {
        "command": "python benchmarks/memory_tta.py --tta "
        + " ".join(map(str, MEMORY_TTA_COPIES))
        + " --passes 1 --calibrate",
        "batch_size": DEFAULT_BATCH_SIZE,
        "memory_budget_mb": DEFAULT_MEMORY_BUDGET_MB,
        "current": current,
        "before_chunking": {"commit": BEFORE_TTA_CHUNKING} | before,
        "cpu": cpu_info(),
        "date": now(),
    }
    record(result, MEMORY_TTA_JSON)


if __name__ == "__main__":
    measure_memory_flat()
    measure_memory_tta()
