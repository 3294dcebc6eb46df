"""Peak memory of `batchuq score` at --tta 10 and --tta 100: it should not grow with K.

Each run is a fresh `batchuq score` (or `batchuq calibrate`) subprocess on the bundled digits
(64x64x1 model, 450 test and 269 validation images); the child reports its own peak RSS
(``ru_maxrss``). Prints each run, the ratio of the largest to the smallest K, and the peak of
`calibrate` with its defaults (100 copies, 1 pass today). Run one measurement at a time on a quiet
machine. A script, not a test: the runs take a minute or two on 2 cores.

    python benchmarks/memory_tta.py --tta 10 100 --passes 1 --calibrate

To measure another checkout (e.g. a `git worktree` or `git archive` of an older commit), run
this script from inside that checkout's folder: the children import `batchuq` from their working
directory first (it comes before PYTHONPATH on `sys.path`), so from this repository's root they
always measure the current code.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from memory_flat import REPO, cli_peak_rss_mb


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tta", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--images", type=Path, default=REPO / "sample_data/digits/test")
    parser.add_argument("--calibrate", action="store_true", help="also measure calibrate")
    parser.add_argument("--val", type=Path, default=REPO / "sample_data/digits/val")
    parser.add_argument("extra", nargs="*", help="more `batchuq score` options, after --")
    args = parser.parse_args()
    where = subprocess.run(
        [sys.executable, "-c", "import batchuq; print(batchuq.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"batchuq from {where}; CPU {cpu_name()}, {len(os.sched_getaffinity(0))}"
          " usable cores")  # fmt: skip
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'command':<62} {'peak RSS MB':>12} {'seconds':>8}")
        for copies in args.tta:
            command = ["score", str(args.images), str(Path(tmp) / f"tta{copies}.parquet"),
                       "--tta", str(copies), "--passes", str(args.passes), "--no-progress",
                       *args.extra]  # fmt: skip
            rss, seconds = cli_peak_rss_mb(command)
            peaks[copies] = rss
            shown = f"score --tta {copies} --passes {args.passes} {' '.join(args.extra)}".strip()
            print(f"{shown:<62} {rss:>12.0f} {seconds:>8.1f}", flush=True)
        if len(peaks) > 1:
            low, high = peaks[min(peaks)], peaks[max(peaks)]
            print(f"ratio peak(--tta {max(peaks)}) / peak(--tta {min(peaks)}) = {high / low:.2f}")
        if args.calibrate:
            rss, seconds = cli_peak_rss_mb(
                ["calibrate", str(args.val), "-o", str(Path(tmp) / "cal.json")]
            )
            print(f"{'calibrate VAL -o cal.json (its default --tta, --passes)':<62} {rss:>12.0f} "
                  f"{seconds:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
