"""The Ray engine against the local engine on the bundled test digits (issue 14, must-show 1).

Runs ``batchuq score sample_data/digits/test OUT`` twice in fresh processes with the same
settings (the defaults: T = 100, no TTA, seed 0, batch 32): once with the local engine, once with
``--engine ray`` (a Ray started on this machine for the run, one actor per CPU at 0.5 CPU each,
unless ``--workers`` / ``--cpus-per-worker`` / ``--checkpoint-rows`` say otherwise). Prints, and
writes as JSON:

* the largest absolute difference between the two files over every float column (the mean,
  median and std of every class, confidence, margin, entropy, mutual information, variation
  ratio), and how many rows have identical ``pred``, ``decision`` and ``status``;
* both wall times: the process's (Python start, TensorFlow import, and for Ray its start and
  its actors' model loading included) and the run's own (``score``'s ``seconds``);
* the CPU, and the 1-minute load average before each run (the machine may be shared).

Run from the repository root, with the ``ray`` extra installed::

    python benchmarks/bench_ray.py [--passes 100] [--workers N] [--checkpoint-rows N]
        [--json benchmarks/results/ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402 (the CPU record)

TEST = REPO / "sample_data" / "digits" / "test"


def score(out: Path, extra: list[str], env: dict[str, str]) -> dict:
    """Run ``batchuq score TEST OUT EXTRA`` in a fresh process; its wall time and run record."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "batchuq", "score", str(TEST), str(out), "--no-progress", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"batchuq score {' '.join(extra)} exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")  # fmt: skip
    from batchuq.output.schema import read_metadata

    return {
        "arguments": extra,
        "process_seconds": round(wall, 2),
        "run": read_metadata(out)["run"],
        "load_average_before": round(load, 2),
        "summary": common.summary_line(proc.stderr),
    }


def compare(local: Path, ray: Path) -> dict:
    """Largest float difference and agreeing rows between two score files."""
    import numpy as np
    import pandas as pd

    a, b = pd.read_parquet(local), pd.read_parquet(ray)
    if list(a.path) != list(b.path):
        raise RuntimeError("the two files do not hold the same images in the same order")
    floats = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    diffs = {c: float(np.nanmax(np.abs(a[c].to_numpy() - b[c].to_numpy()))) for c in floats}
    worst = max(diffs, key=diffs.get)
    same = {c: int((a[c].fillna("") == b[c].fillna("")).sum()) for c in ("pred", "decision")}
    return {
        "images": len(a),
        "float_columns": len(floats),
        "max_abs_difference": diffs[worst],
        "column_of_max": worst,
        "float_values_differing": int(sum((a[c] != b[c]).sum() for c in floats)),
        "float_values": int(len(a) * len(floats)),
        "identical_pred": same["pred"],
        "identical_decision": same["decision"],
        "identical_status": int((a.status == b.status).sum()),
    }


def report(result: dict) -> None:
    """Print the figures of a result."""
    cpu, agree = result["cpu"], result["agreement"]
    print(f"{cpu['usable_cores']}-core {cpu['model_name']}, T = {result['passes']}")
    print(
        f"max abs difference of the {agree['float_columns']} float columns: "
        f"{agree['max_abs_difference']:.3g} ({agree['column_of_max']}); "
        f"{agree['float_values_differing']} of {agree['float_values']} values differ"
    )
    print(
        f"identical decisions: {agree['identical_decision']} of {agree['images']}; "
        f"identical pred: {agree['identical_pred']}"
    )
    for name, run in result["runs"].items():
        print(
            f"{name:5s}: {run['process_seconds']:6.1f} s process wall, "
            f"{run['run']['seconds']:6.1f} s run (load average {run['load_average_before']}); "
            f"{run['summary']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--checkpoint-rows", type=int, default=None)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "ray.json")
    args = parser.parse_args()
    ray_tmp = tempfile.mkdtemp(prefix="bq-bench-ray-", dir="/tmp")  # Ray's session files
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHUQ_", "RAY_ADDRESS"))}
    # A Ray on this machine only: no usage statistics, no token written to ~/.ray.
    env |= {"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--passes", str(args.passes)]
    ray_args = ["--engine", "ray"]
    if args.workers:
        ray_args += ["--workers", str(args.workers)]
    if args.cpus_per_worker:
        ray_args += ["--cpus-per-worker", str(args.cpus_per_worker)]
    if args.checkpoint_rows:
        ray_args += ["--checkpoint-rows", str(args.checkpoint_rows)]
    with tempfile.TemporaryDirectory() as work:
        local_out, ray_out = Path(work) / "local.parquet", Path(work) / "ray.parquet"
        runs = {
            "local": score(local_out, common, env),
            "ray": score(ray_out, common + ray_args, env),
        }
        result = {
            "when": common.now(),
            "cpu": common.cpu_info(),
            "passes": args.passes,
            "runs": runs,
            "agreement": compare(local_out, ray_out),
        }
    shutil.rmtree(ray_tmp, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
