"""Peak memory of `batchuq score` for N and 10 N images: it should not grow with N.

Generates small PNGs (copies of the bundled digits, renamed) in a temporary folder, runs
`batchuq score` in a fresh subprocess for each size, and prints each child's peak RSS.
A script, not a test: 20,000 images take a few minutes on 2 cores.

    python benchmarks/memory_flat.py --sizes 2000 20000 --passes 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int) -> None:
    sources = sorted((REPO / "sample_data/digits/test").glob("*/*.png"))
    for i in range(count):
        source = sources[i % len(sources)]
        target = folder / source.parent.name / f"img_{i:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy(source, target)


def cli_peak_rss_mb(arguments: list[str]) -> tuple[float, float]:
    """Run ``batchuq ARGUMENTS`` in a fresh Python process: its peak RSS (MB) and wall time."""
    script = (
        "import resource, sys; from batchuq.cli import main; sys.argv = sys.argv[1:]\n"
        "try:\n    main()\nfinally:\n"
        "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "file=sys.stderr)"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script, "batchuq", *arguments],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    line = [x for x in result.stderr.splitlines() if x.startswith("PEAK_RSS_KB")]
    if not line or result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return int(line[-1].split()[1]) / 1024, seconds


def peak_rss_mb(images: Path, out: Path, passes: int) -> tuple[float, float]:
    return cli_peak_rss_mb(
        ["score", str(images), str(out), "--passes", str(passes), "--no-progress"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        print(f"{'images':>8} {'peak RSS MB':>12} {'seconds':>8} {'images/s':>9}")
        for size in sorted(args.sizes):
            make_images(folder, size)  # grows the same folder: N, then 10 N
            rss, seconds = peak_rss_mb(folder, Path(tmp) / f"out{size}.parquet", args.passes)
            print(f"{size:>8} {rss:>12.0f} {seconds:>8.1f} {size / seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
