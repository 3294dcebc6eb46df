"""Time every usage error of the exit-code table (docs/exit-codes.md), each in a fresh process.

Builds the cases of ``tests/usage_error_cases.py`` in a temporary folder, runs each command line
three times in a fresh interpreter (as the console script would start) and prints a Markdown
table of the best wall time, the exit code, and whether TensorFlow was imported, with the CPU
and the date. Run it from the repository root:

    python benchmarks/usage_errors.py
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import common  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
from usage_error_cases import make_cases, run_case  # noqa: E402

REPEATS = 3


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cases = make_cases(work)
        rows = []
        for name, case in cases.items():
            times, results = [], []
            for _ in range(REPEATS):
                start = time.perf_counter()
                result, _ = run_case(case, work)
                times.append(time.perf_counter() - start)
                results.append(result)
            imported = any(r["tensorflow"] for r in results)
            rows.append((name, results[0]["code"], min(times), imported))
    cpu = common.cpu_info()["model_name"]
    print(
        f"Usage errors, each in a fresh process, best of {REPEATS}: {cpu}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {dt.date.today()}, "
        "`python benchmarks/usage_errors.py`.\n"
    )
    print("| usage error | exit code | seconds | TensorFlow imported |")
    print("|---|---|---|---|")
    for name, code, seconds, imported in rows:
        print(f"| {name} | {code} | {seconds:.2f} | {'yes' if imported else 'no'} |")
    print(f"\nslowest: {max(r[2] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
