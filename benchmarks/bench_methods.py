"""MC dropout, deep ensembles and SNGP side by side on the bundled digits (issue 11's table).

Scores ``sample_data/digits/test`` (450 labelled digits) and ``sample_data/ood`` (40 photo crops)
with each method's bundled model, evaluates with ``batchuq evaluate``'s own metrics, and times
each test-set run end to end (``score_directory`` wall time, after one warm-up run of the same
configuration, so that TensorFlow's tracing is not counted):

* the deterministic single model (the demo model, ``--passes 1``);
* MC dropout, T = 100 (the demo model);
* the 5-member ensemble (``batchuq/data/digits_ensemble``, ``--passes 1``), and with T = 20;
* SNGP mean-field (``batchuq/data/digits_sngp.keras``, ``--passes 1``), and with T = 100
  posterior samples of the head;
* "+ temperature" for MC dropout T = 100, the ensemble and SNGP mean-field: each fitted by
  ``batchuq calibrate`` on ``sample_data/digits/val`` with its own scoring predictor
  (``--score-passes`` = its passes), then ``score --temperature`` (like for like: every
  method's temperature is fitted on the mean probabilities that method writes).

Also: one ensemble member alone, to compare the ensemble's throughput with M times a single
member's (decoding is shared; only the networks run M times).

Writes ``benchmarks/results/methods.json``, which the docs' results page reads when it is
built. Run from the repository root::

    python benchmarks/bench_methods.py
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

TEST = REPO / "sample_data" / "digits" / "test"
OOD = REPO / "sample_data" / "ood"
DATA = REPO / "batchuq" / "data"
RESULTS_JSON = HERE / "results" / "methods.json"

VAL = REPO / "sample_data" / "digits" / "val"

# name -> (model argument, passes); a name ending in TEMPERATURE is scored with --temperature,
# calibrated on VAL with the same model and passes
TEMPERATURE = "_temperature"
CONFIGS = {
    "deterministic": (DATA / "digits_cnn.keras", 1),
    "mc_dropout_t100": (DATA / "digits_cnn.keras", 100),
    "ensemble": (DATA / "digits_ensemble", 1),
    "ensemble_t20": (DATA / "digits_ensemble", 20),
    "sngp_mean_field": (DATA / "digits_sngp.keras", 1),
    "sngp_t100": (DATA / "digits_sngp.keras", 100),
    "one_member": (DATA / "digits_ensemble" / "member-0.keras", 1),
    "mc_dropout_t100_temperature": (DATA / "digits_cnn.keras", 100),
    "ensemble_temperature": (DATA / "digits_ensemble", 1),
    "sngp_mean_field_temperature": (DATA / "digits_sngp.keras", 1),
}


def run(name: str, work: Path) -> dict:
    """Score test (warm-up, then timed) and OOD with one configuration and evaluate."""
    from batchuq import score_directory
    from batchuq.jobs.evaluate import evaluate_parquet
    from batchuq.jobs.score import ScoreOptions
    from batchuq.output.schema import read_metadata

    model, passes = CONFIGS[name]
    test_out, ood_out = work / f"{name}.parquet", work / f"{name}-ood.parquet"
    common = {"model": model, "passes": passes, "seed": 1}
    temperature = None
    if name.endswith(TEMPERATURE):  # fitted on this very predictor's means
        from batchuq import calibrate_directory
        from batchuq.jobs.calibrate import CalibrateOptions

        calibration = work / f"{name}.json"
        fitted = CalibrateOptions(model=model, tta=1, passes=1, score_passes=passes, seed=1)
        temperature = calibrate_directory(VAL, calibration, fitted).temperature
        common |= {"calibration": calibration, "temperature": True}
    score_directory(TEST, test_out, ScoreOptions(**common))  # warm-up: loading and tracing
    started = time.perf_counter()
    report = score_directory(TEST, test_out, ScoreOptions(**common))
    seconds = time.perf_counter() - started
    score_directory(OOD, ood_out, ScoreOptions(**common))
    results = evaluate_parquet(test_out, ood_out)
    return {
        "passes": passes,
        "temperature": temperature,
        "samples_per_image": read_metadata(test_out)["samples_per_image"],
        "images": report.images,
        "seconds": round(seconds, 3),
        "images_per_second": round(report.images / seconds, 2),
        "accuracy": results["accuracy"],
        "nll": results["nll"],
        "ece": results["ece"],
        "aurc": results["aurc"],
        "ood_auroc_entropy": results["ood"]["auroc"]["entropy"],
    }


def main() -> int:
    missing = [str(p) for p, _ in CONFIGS.values() if not p.exists()]
    if missing:
        print(f"missing bundled models {missing}: run python sample_data/make_bundled_models.py")
        return 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        rows = {}
        for name in CONFIGS:
            print(f"{name} ...", flush=True)
            rows[name] = run(name, Path(tmp))
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    added = size - sum(
        (DATA / n).stat().st_size for n in ("digits_cnn.keras", "digits_cnn.classes.json")
    )
    result = {
        "generated_by": "python benchmarks/bench_methods.py",
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "rows": rows,
        "sngp_t100_over_t1": round(
            rows["sngp_t100"]["seconds"] / rows["sngp_mean_field"]["seconds"], 2
        ),
        "ensemble_over_one_member": round(
            rows["ensemble"]["seconds"] / rows["one_member"]["seconds"], 2
        ),
        "members": 5,
        "package_data_bytes": size,
        "package_data_added_bytes": added,
        "seconds": round(time.perf_counter() - started, 1),
    }
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
