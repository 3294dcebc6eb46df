"""Label-free accuracy on the shift series: ATC against the true accuracy (issue 23's benchmark).

In one run, with the bundled digits CNN and seed 0:

1. ``batchuq calibrate`` on ``sample_data/digits/val`` (default settings, ``--score-passes T``):
   the temperature and the ATC thresholds (``batchuq.postprocess.atc``) on the scoring
   predictor's tempered MC mean;
2. ``batchuq score --calibration`` (``--passes T``, no ``--temperature``) of the validation
   digits, the clean test digits and every folder of ``batchuq shift``'s series of the test
   digits (6 corruptions x severities 1-5): each file's footer holds ``estimated_accuracy``
   (ATC-MC, ATC-NE, average confidence of the tempered mean);
3. per folder, the true accuracy (``pred`` against the label) beside the estimates, and the mean
   absolute error of each estimate over the 30 shifted folders. For contrast, the *raw* ATC:
   thresholds fitted on the validation rows' untempered MC mean (``mean_*`` columns), applied
   to each folder's untempered mean, and the raw average confidence.

It also checks what it reads: the calibration's thresholds refitted from the validation rows'
``mean_*`` columns, and each file's ``estimated_accuracy`` recounted from its rows.

Writes ``benchmarks/results/atc.json``; docs/monitoring.md reads it. Run from the repository
root::

    python benchmarks/bench_atc.py                 # T = 100 passes (the score default)
    python benchmarks/bench_atc.py --passes 20     # faster, on a loaded machine
    python benchmarks/bench_atc.py --work /tmp/ba  # keep (and reuse) the scored files
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402 (the CPU, versions and date of a result)

TEST = REPO / "sample_data" / "digits" / "test"
VAL = REPO / "sample_data" / "digits" / "val"
DEMO = REPO / "batchuq" / "data" / "digits_cnn.keras"
RESULTS_JSON = HERE / "results" / "atc.json"
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "rotate", "pixelate", "jpeg")
SEVERITIES = (1, 2, 3, 4, 5)
ESTIMATES = ("atc_mc", "atc_ne", "average_confidence")
RAW = ("raw_atc_mc", "raw_atc_ne", "raw_average_confidence")


def calibrate(work: Path, passes: int, seed: int) -> Path:
    """The calibration of the scoring predictor (reused when ``work`` holds it)."""
    from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory

    out = work / f"calibration-T{passes}.json"
    if not out.exists():
        started = time.perf_counter()
        options = CalibrateOptions(model=DEMO, score_passes=passes, seed=seed)
        calibrate_directory(VAL, out, options)
        print(f"calibrated: {time.perf_counter() - started:.1f} s", flush=True)
    return out


def score_all(work: Path, calibration: Path, passes: int, seed: int) -> dict[str, Path]:
    """Score val, test and the shift series with the calibration (files in ``work`` reused)."""
    from batchuq import score_directory
    from batchuq.jobs.score import RunControl, ScoreOptions
    from batchuq.jobs.shift import shift_directory

    shifted = work / "shift"
    if not (shifted / "shift.json").exists():
        shift_directory(TEST, shifted, corruptions=CORRUPTIONS, severities=SEVERITIES)
    folders = {"val": VAL, "test": TEST}
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            folders[f"{corruption}/{severity}"] = shifted / corruption / str(severity)
    files = {}
    for label, folder in folders.items():
        out = work / "scores" / f"T{passes}" / (label.replace("/", "-") + ".parquet")
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            options = ScoreOptions(model=DEMO, passes=passes, seed=seed, calibration=calibration)
            score_directory(folder, out, options, RunControl(progress=False))
            print(f"scored {label}: {time.perf_counter() - started:.1f} s", flush=True)
        files[label] = out
    return files


def read_rows(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The scored rows' ``mean_*`` (float32) and whether ``pred`` is right, and the metadata."""
    import pyarrow.parquet as pq

    from batchuq.output.schema import read_metadata

    metadata = read_metadata(path)
    table = pq.read_table(path).to_pandas()
    table = table[table.status == "ok"]
    means = table[[f"mean_{c}" for c in metadata["class_names"]]].to_numpy(np.float32)
    correct = (table.pred_index == table.label_index).to_numpy(bool)
    return means, correct, metadata


def evaluate(files: dict[str, Path], calibration_path: Path) -> dict:
    """Per folder: the true accuracy, the estimates of its footer, and the raw ATC."""
    from batchuq.postprocess.atc import (
        atc_scores,
        estimate_accuracy,
        fit_atc,
        tempered_probabilities,
    )
    from batchuq.postprocess.calibration_file import Calibration

    calibration = Calibration.from_json(calibration_path)
    val_means, val_correct, _ = read_rows(files["val"])
    raw_val = atc_scores(val_means)
    raw = {name: fit_atc(raw_val[name], val_correct) for name in ("mc", "ne")}
    tempered_val = atc_scores(tempered_probabilities(val_means, calibration.temperature))
    refit = {name: fit_atc(tempered_val[name], val_correct) for name in ("mc", "ne")}
    rows, recount_diff = [], 0.0
    for label, path in files.items():
        means, correct, metadata = read_rows(path)
        estimate = metadata["run"]["estimated_accuracy"]
        scores = atc_scores(tempered_probabilities(means, calibration.temperature))
        recount = {f"atc_{k}": estimate_accuracy(scores[k], t) for k, t in refit.items()}
        recount["average_confidence"] = float(scores["mc"].mean())
        recount_diff = max(recount_diff, *(abs(recount[k] - estimate[k]) for k in ESTIMATES))
        raw_scores = atc_scores(means)
        corruption, _, severity = label.partition("/")
        rows.append(
            {
                "folder": label,
                "corruption": corruption if severity else None,
                "severity": int(severity) if severity else None,
                "images": int(len(correct)),
                "accuracy": float(correct.mean()),
                **{k: estimate[k] for k in ESTIMATES},
                "raw_atc_mc": estimate_accuracy(raw_scores["mc"], raw["mc"]),
                "raw_atc_ne": estimate_accuracy(raw_scores["ne"], raw["ne"]),
                "raw_average_confidence": float(raw_scores["mc"].mean()),
            }
        )
    shifted = [row for row in rows if row["severity"] is not None]
    mae = {
        key: float(np.mean([abs(row[key] - row["accuracy"]) for row in shifted]))
        for key in ESTIMATES + RAW
    }
    return {
        "temperature": calibration.temperature,
        "validation_accuracy": calibration.atc["accuracy"],
        "thresholds": calibration.atc["thresholds"],
        "thresholds_refitted_from_val_rows": refit,
        "raw_thresholds": raw,
        "recount_max_abs_diff": recount_diff,
        "rows": rows,
        "mae": mae,
        "mae_folders": len(shifted),
        "worst": {
            key: max(shifted, key=lambda row, k=key: abs(row[k] - row["accuracy"]))["folder"]
            for key in ESTIMATES + RAW
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=100, help="MC passes T of every score")
    parser.add_argument("--seed", type=int, default=0, help="seed of calibrate and score")
    parser.add_argument("--work", type=Path, default=None, help="keep the scored files here")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_atc_") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        calibration = calibrate(work, args.passes, args.seed)
        files = score_all(work, calibration, args.passes, args.seed)
        found = evaluate(files, calibration)
    result = {
        "generated_by": "benchmarks/bench_atc.py",
        "command": shlex.join(["python", "benchmarks/bench_atc.py", *sys.argv[1:]]),
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "seed": args.seed,
        "passes": args.passes,
        **found,
        "seconds": round(time.perf_counter() - started, 1),
    }
    common.record(result, RESULTS_JSON)
    for key, value in found["mae"].items():
        print(f"MAE {key}: {100 * value:.2f} points")


if __name__ == "__main__":
    main()
