"""What every benchmark records beside its figures: the CPU, the versions, the date.

The benchmarks write their results as JSON under ``benchmarks/results/``; the documentation
reads those files when it is built (``benchmarks/figures.py``, the mkdocs-macros module), so a
figure's sentences live in the Markdown pages and its numbers in the JSON. Each result records
the CPU it ran on and when, and the pages print both beside the figure.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import json
import platform
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def benchmark_module(name: str):
    """Import ``benchmarks/NAME.py`` (``memory_flat``, ``bench_mc``)."""
    sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(HERE))


def cpu_info() -> dict:
    """The CPU this process runs on (``bench_mc.cpu_info``: model name, ISA flags, bf16)."""
    return benchmark_module("bench_mc").cpu_info()


def versions() -> dict:
    """Versions of Python and of the packages the figures depend on (None: not installed)."""
    found = {"python": platform.python_version()}
    for package, distributions in (
        ("batchuq", ["batchuq"]),
        ("tensorflow", ["tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly"]),
        ("keras", ["keras"]),
        ("numpy", ["numpy"]),
        ("mapie", ["mapie"]),
    ):
        found[package] = None
        for distribution in distributions:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found[package] = importlib.metadata.version(distribution)
                break
    return found


def now() -> str:
    """The current UTC time, ISO 8601 to the second: the ``date`` of a result."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def summary_line(stderr: str) -> str:
    """The last ``N images, ...`` summary line of a ``batchuq score`` run's stderr."""
    lines = [
        x.strip() for x in re.split(r"[\r\n]", stderr) if re.match(r"(batchuq: )?\d+ images, ", x)
    ]
    if not lines:
        raise RuntimeError(f"no summary line in:\n{stderr[-2000:]}")
    return lines[-1]


def record(result: dict, path: Path) -> None:
    """Keep a benchmark's ``result`` as ``path`` (JSON); the docs read it when they are built."""
    for key in ("cpu", "date"):
        if not result.get(key):
            raise ValueError(f"a result names its CPU and date. Received: {key}={result.get(key)}")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"-> {path.relative_to(REPO)} (run `mkdocs build` to see it in the docs)")
