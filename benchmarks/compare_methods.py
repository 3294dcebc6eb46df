"""Which method should I trust? Every method on the bundled digits, in distribution, under shift
and out of distribution, with its cost (issue 12's benchmark; seeds and intervals: issue 21).

In one run:

1. ``batchuq shift`` writes the corruption series of ``sample_data/digits/test``;
2. ``batchuq calibrate`` fits, per model and seed, a temperature on ``sample_data/digits/val``
   (for the "+ temperature" rows), on the predictor it is applied to;
3. for each seed of ``SEEDS`` (0, 1, 2: the seed of ``score``'s dropout masks and of the
   calibration), every configuration scores the clean test set (timed: images/s) and
   ``sample_data/ood``; with the first seed it also scores each corrupted copy;
4. ``batchuq compare`` makes the tables: per seed, the clean files with their OOD files; the mean
   and standard deviation of each metric over the seeds; the first seed's paired bootstrap 95%
   intervals (1,000 resamples over images) of each difference to ``BASELINE``, with a verdict
   (better, worse, or tie when the interval holds 0); and the first seed's shift series with
   the same differences per corruption and severity.

The seeds vary only what ``score`` draws (dropout masks, TTA, SNGP head samples), not the
training of the bundled models: deterministic configurations give the same figures for every
seed. One seed convention across the benchmarks: a single-seed figure uses seed 0 (the CLI's
default); a multi-seed figure uses 0, 1 and 2.

Writes ``benchmarks/results/compare_methods.json`` and the figure
``docs/figures/compare_series.png``; the docs' results page reads both. Run from the
repository root::

    python benchmarks/compare_methods.py            # severities 3, 5 (about 15 min, 2 cores)
    python benchmarks/compare_methods.py --quick    # smoke run: 50 images, 2 corruptions
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402 (the CPU, versions and date of a result)

TEST = REPO / "sample_data" / "digits" / "test"
VAL = REPO / "sample_data" / "digits" / "val"
OOD = REPO / "sample_data" / "ood"
DATA = REPO / "batchuq" / "data"
RESULTS_JSON = HERE / "results" / "compare_methods.json"
FIGURE = REPO / "docs" / "figures" / "compare_series.png"
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "rotate", "pixelate", "jpeg")

DEMO, ENSEMBLE, SNGP = (
    DATA / "digits_cnn.keras",
    DATA / "digits_ensemble",
    DATA / "digits_sngp.keras",
)
SEEDS = (0, 1, 2)
BASELINE = "MC dropout T=100"
BOOTSTRAP = 1000
# name -> score_directory keywords; "temperature" rows get the calibration of their model
CONFIGS: dict[str, dict] = {
    "deterministic": {"model": DEMO, "passes": 1},
    "deterministic + temperature": {"model": DEMO, "passes": 1, "temperature": True},
    "MC dropout T=100": {"model": DEMO, "passes": 100},
    "MC dropout T=100 + temperature": {"model": DEMO, "passes": 100, "temperature": True},
    "TTA K=10 T=10": {"model": DEMO, "passes": 10, "tta": 10},
    "ensemble M=5": {"model": ENSEMBLE, "passes": 1},
    "ensemble M=5 + temperature": {"model": ENSEMBLE, "passes": 1, "temperature": True},
    "ensemble M=5 T=20": {"model": ENSEMBLE, "passes": 20},
    "SNGP mean-field": {"model": SNGP, "passes": 1},
    "SNGP mean-field + temperature": {"model": SNGP, "passes": 1, "temperature": True},
    "SNGP T=100": {"model": SNGP, "passes": 100},
}
# the metrics averaged over seeds (``compare``'s row keys)
MEAN_SD_METRICS = ("accuracy", "nll", "ece", "aurc", "ood_auroc", "images_per_second")


def subset(source: Path, target: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class folder (for ``--quick``)."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, target / folder.name / image.name)
    return target


def calibrate(options: dict, seed: int, work: Path) -> Path:
    """The temperature of one configuration, fitted on the validation digits with its
    scoring predictor (model, passes) and ``seed``."""
    from batchuq import calibrate_directory
    from batchuq.jobs.calibrate import CalibrateOptions

    passes, tta = options["passes"], options.get("tta", 1)
    slug = f"{Path(options['model']).stem}_T{passes}_K{tta}_seed{seed}"
    out = work / "calibrations" / f"{slug}.json"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fit = CalibrateOptions(
            model=options["model"], tta=1, passes=1, score_passes=passes, score_tta=tta, seed=seed
        )
        calibrate_directory(VAL, out, fit)
    return out


def score_config(name: str, options: dict, folders: dict[str, Path], work: Path, seed: int):
    """Score every folder with one configuration and seed; returns folder label -> file."""
    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions

    if options.get("temperature"):
        options = {**options, "calibration": calibrate(options, seed, work)}
    files = {}
    slug = "".join(c if c.isalnum() else "_" for c in name)
    for label, folder in folders.items():
        out = work / "scores" / f"seed{seed}" / slug / (label.replace("/", "-") + ".parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        score_directory(folder, out, ScoreOptions(seed=seed, **options))
        files[label] = out
    return files


def mean_sd(tables: list[dict]) -> list[dict]:
    """Per configuration, each ``MEAN_SD_METRICS`` value's mean and sample sd over the seeds."""
    import numpy as np

    out = []
    for rows in zip(*(table["rows"] for table in tables), strict=True):
        entry = {"name": rows[0]["name"], "samples_per_image": rows[0]["samples_per_image"]}
        for key in MEAN_SD_METRICS:
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                entry[key] = {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}
        out.append(entry)
    return out


def slim(row: dict) -> dict:
    """A series row as the docs read it: where, the accuracy, NLL and ECE, and the verdicts of
    their differences to the baseline (no file paths, no other intervals)."""
    keys = ("accuracy", "nll", "ece")
    out = {k: row.get(k) for k in ("name", "corruption", "severity", *keys)}
    differences = row.get("difference_to_baseline") or {}
    out["difference_to_baseline"] = {k: differences[k] for k in keys if k in differences}
    return out


def shift_folders(test: Path, work: Path, corruptions, severities) -> dict[str, Path]:
    """The corrupted copies of ``test``, by ``corruption/severity``."""
    from batchuq.jobs.shift import shift_directory

    shift_directory(test, work / "shift", corruptions=corruptions, severities=severities)
    return {f"{c}/{s}": work / "shift" / c / str(s) for c in corruptions for s in severities}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 images, 2 corruptions, sev. 3")
    parser.add_argument("--severities", default="3,5", help="severities of the series")
    args = parser.parse_args(argv)
    from batchuq.jobs.compare import compare_files, format_comparison
    from batchuq.report.compare import write_comparison_report

    started = time.perf_counter()
    severities = [3] if args.quick else [int(s) for s in args.severities.split(",")]
    corruptions = ("gaussian_noise", "rotate") if args.quick else CORRUPTIONS
    names = list(CONFIGS)
    with tempfile.TemporaryDirectory(prefix="compare_methods_") as tmp:
        work = Path(tmp)
        test = subset(TEST, work / "test", 5) if args.quick else TEST
        series_folders = shift_folders(test, work, corruptions, severities)
        clean_by_seed, series_files = [], []
        for seed in SEEDS:
            folders = {"clean": test, "ood": OOD} | (series_folders if seed == SEEDS[0] else {})
            files = {}
            for name, options in CONFIGS.items():
                print(f"seed {seed}: {name} ...", flush=True)
                files[name] = score_config(name, options, folders, work, seed)
            clean = compare_files(
                [files[n]["clean"] for n in names],
                names=names,
                ood=[files[n]["ood"] for n in names],
                bootstrap=BOOTSTRAP if seed == SEEDS[0] else 0,
                baseline=BASELINE if seed == SEEDS[0] else None,
            )
            print(format_comparison(clean))
            clean_by_seed.append(clean.as_json())
            if seed == SEEDS[0]:
                series_files = [
                    (n, f) for n in names for label, f in files[n].items() if label != "ood"
                ]
        series = compare_files(
            [f for _, f in series_files],
            names=[n for n, _ in series_files],
            series=True,
            baseline=BASELINE,
            bootstrap=BOOTSTRAP,
        )
        report = write_comparison_report(series, work / "report")
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        if not args.quick:
            shutil.copy(report.parent / "series.png", FIGURE)
        print(format_comparison(series))
    result = {
        "generated_by": "python benchmarks/compare_methods.py" + (" --quick" if args.quick else ""),
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "quick": args.quick,
        "seeds": list(SEEDS),
        "baseline": BASELINE,
        "bootstrap": BOOTSTRAP,
        "corruptions": list(corruptions),
        "severities": severities,
        "clean": clean_by_seed[0],
        "clean_by_seed": [table["rows"] for table in clean_by_seed],
        "mean_sd": mean_sd(clean_by_seed),
        "series": series.as_json()["series"],
        "series_rows": [slim(row) for row in series.rows],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"compare_methods: {result['seconds']:.0f} s")
    if args.quick:
        return 0  # a smoke run records nothing
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
