"""OOD detection on the bundled digits: every score's AUROC and FPR@95, far and near (issue 21).

For each bundled model (MC dropout T = 100 with the demo model; SNGP mean-field; the 5-member
deep ensemble, one pass per member):

1. ``calibrate`` on ``sample_data/digits/val`` (269 digits) with the scoring predictor of step 2;
   this fits the kNN score's normalised features (k = 1 for 269 images, see
   ``batchuq.postprocess.ood``);
2. ``score --calibration`` ``sample_data/digits/test`` (450 digits, in-distribution),
   ``sample_data/ood`` (40 photo crops: far OOD) and the test digits under each of the six
   corruptions of ``batchuq shift`` at severity 5 (2,700 images pooled: near OOD);
3. ``evaluate``'s OOD metrics (``postprocess.ood.ood_metrics``) for every score the files hold:
   AUROC (OOD positive) and FPR@95 (share of OOD images kept at the threshold that keeps 95% of
   the test digits).

For the MC-dropout model it also sweeps the kNN score's k (far OOD, from the same predictor's
features through the library: ``iter_sampled_batches`` and ``fit_knn``), to show why k follows
the calibration set's size rather than OpenOOD's k = 50. And it times the MC-dropout test run
with and without the OOD extras' work (``score`` writes them whenever it can; the cost is the
difference of two runs, best of three each), to report the extra cost per image.

Writes ``benchmarks/results/ood.json``; run from the repository root::

    python benchmarks/bench_ood.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402 (the CPU, versions and date of a result)

VAL = REPO / "sample_data" / "digits" / "val"
TEST = REPO / "sample_data" / "digits" / "test"
FAR = REPO / "sample_data" / "ood"
DATA = REPO / "batchuq" / "data"
RESULTS_JSON = HERE / "results" / "ood.json"
SEED = 0
SEVERITY = 5

# name -> (model argument, passes)
CONFIGS = {
    "mc_dropout_t100": (DATA / "digits_cnn.keras", 100),
    "sngp_mean_field": (DATA / "digits_sngp.keras", 1),
    "deep_ensemble": (DATA / "digits_ensemble", 1),
}


def near_folders(work: Path) -> list[Path]:
    """The test digits under every corruption at ``SEVERITY`` (``batchuq shift``)."""
    from batchuq.corrupt import CORRUPTIONS
    from batchuq.jobs.shift import shift_directory

    report = shift_directory(TEST, work / "shift", severities=SEVERITY, seed=SEED)
    assert tuple(report.corruptions) == CORRUPTIONS
    return list(report.folders)


def run(name: str, near: list[Path], work: Path) -> dict:
    """Calibrate, score test, far and near, and evaluate every OOD score of one model."""
    import pandas as pd

    from batchuq import score_directory
    from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory
    from batchuq.jobs.evaluate import evaluate_scored, read_scored_file
    from batchuq.jobs.score import ScoreOptions

    model, passes = CONFIGS[name]
    cal = work / f"{name}.json"
    calibration = calibrate_directory(
        VAL, cal, CalibrateOptions(model=model, tta=1, score_passes=passes, seed=SEED)
    )
    options = ScoreOptions(model=model, passes=passes, seed=SEED, calibration=cal)
    outputs = {"test": work / f"{name}-test.parquet", "far": work / f"{name}-far.parquet"}
    score_directory(TEST, outputs["test"], options)
    score_directory(FAR, outputs["far"], options)
    near_files = []
    for i, folder in enumerate(near):
        near_files.append(work / f"{name}-near-{i}.parquet")
        score_directory(folder, near_files[-1], options)
    test = read_scored_file(outputs["test"])
    far = read_scored_file(outputs["far"]).frame
    near_frame = pd.concat([read_scored_file(p).frame for p in near_files], ignore_index=True)
    row = {
        "passes": passes,
        "samples_per_image": test.metadata["samples_per_image"],
        "knn_k": None if calibration.knn is None else calibration.knn.k,
    }
    for label, frame in (("far", far), ("near", near_frame)):
        found = evaluate_scored(test.frame, test.class_names, frame).results["ood"]
        row[label] = {
            "n_in": found["n_in"],
            "n_ood": found["n_ood"],
            "auroc": found["auroc"],
            "fpr95": found["fpr95"],
        }
    row["accuracy_test"] = evaluate_scored(test.frame, test.class_names).results["accuracy"]
    return row


def knn_sweep(ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50)) -> dict:
    """Far-OOD AUROC and FPR@95 of the kNN score of the MC-dropout model for several k."""
    import numpy as np

    from batchuq.jobs.score.batches import iter_sampled_batches
    from batchuq.jobs.score.options import ScoreOptions
    from batchuq.jobs.score.plan import prepare_run
    from batchuq.postprocess.ood import fit_knn, ood_metrics

    model, passes = CONFIGS["mc_dropout_t100"]

    def features(folder: Path) -> np.ndarray:
        plan = prepare_run(folder, ScoreOptions(model=model, passes=passes, seed=SEED))
        return np.concatenate([b.extras["features"] for b in iter_sampled_batches(plan)])

    val, test, far = features(VAL), features(TEST), features(FAR)
    positives = np.repeat([False, True], [len(test), len(far)])
    sweep = {}
    for k in ks:
        index = fit_knn(val, "sweep", k)
        found = ood_metrics(
            np.concatenate([index.distances(test), index.distances(far)]), positives
        )
        sweep[str(k)] = found
    return {"calibration_images": len(val), "far": sweep}


def extras_cost(work: Path) -> dict:
    """Seconds of the MC-dropout T = 100 test run with and without the OOD extras (best of 3,
    the two alternating so that a change in the machine's load hits both)."""
    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions
    from batchuq.methods.mc_dropout import MCDropout

    model, passes = CONFIGS["mc_dropout_t100"]
    out = work / "cost.parquet"

    def seconds(options: ScoreOptions) -> float:
        started = time.perf_counter()
        score_directory(TEST, out, options)
        return time.perf_counter() - started

    def with_extras(loaded):
        return MCDropout(loaded.model, passes)

    def without_extras(loaded):
        method = MCDropout(loaded.model, passes)
        method.sampler.head = None  # no head: the tail computes only the probabilities
        method.extras = ()
        method.sampler._compile(tuple(loaded.model.inputs[0].shape))
        return method

    runs = {
        factory: ScoreOptions(model=model, passes=passes, seed=SEED, method=factory)
        for factory in (with_extras, without_extras)
    }
    times: dict = {factory: [] for factory in runs}
    for options in runs.values():
        seconds(options)  # warm-up: loading and tracing
    for _ in range(3):
        for factory, options in runs.items():
            times[factory].append(seconds(options))
    on, off = min(times[with_extras]), min(times[without_extras])
    images = sum(1 for p in TEST.rglob("*") if p.is_file())
    return {
        "images": images,
        "seconds_with_extras": round(on, 3),
        "seconds_without_extras": round(off, 3),
        "ms_per_image": round(1000 * (on - off) / images, 3),
        "ratio": round(on / off, 3),
    }


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ood_") as tmp:
        work = Path(tmp)
        near = near_folders(work)
        rows = {}
        for name in CONFIGS:
            print(f"{name} ...", flush=True)
            rows[name] = run(name, near, work)
        print("kNN k sweep ...", flush=True)
        sweep = knn_sweep()
        print("cost of the extras ...", flush=True)
        cost = extras_cost(work)
    result = {
        "generated_by": "python benchmarks/bench_ood.py",
        "command": "python benchmarks/bench_ood.py",
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "seed": SEED,
        "severity": SEVERITY,
        "near_corruptions": [p.parent.name for p in near],
        "rows": rows,
        "knn_k_sweep_mc_dropout_t100": sweep,
        "extras_cost_mc_dropout_t100": cost,
        "seconds": round(time.perf_counter() - started, 1),
    }
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
