"""Which method should I trust? Every method on the bundled digits, in distribution, under shift
and out of distribution, with its cost (issue 12's benchmark).

In one run:

1. ``batchuq shift`` writes the corruption series of ``sample_data/digits/test``;
2. ``batchuq calibrate`` fits a temperature on ``sample_data/digits/val`` for each "+
   temperature" row, on that row's own predictor (its model, passes and TTA: the
   ensemble's averaged probabilities, SNGP's mean-field probabilities, MC dropout's mean);
3. every configuration below scores the clean test set (timed: images/s), each corrupted copy,
   and ``sample_data/ood``;
4. ``batchuq compare`` makes the tables (the clean files with their OOD files; then the whole
   series, whose mean over corruptions per severity is the Ovadia et al. 2019 view) and the
   accuracy/ECE-against-severity figure.

Configurations: deterministic (one pass); MC dropout T = 100; TTA K = 10 with T = 10; the
5-member ensemble; the ensemble with T = 20; SNGP mean-field; SNGP with T = 100 head samples;
and "+ temperature" for the deterministic model, MC dropout (T = 100), the ensemble and SNGP
mean-field.

Writes ``benchmarks/results/compare_methods.json`` and the figure
``docs/figures/compare_series.png``; the docs' results page reads both. Run from the
repository root::

    python benchmarks/compare_methods.py            # severities 1, 3, 5 (about 15 min, 2 cores)
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
# name -> score_directory keywords (the calibration is added for the temperature rows)
CONFIGS: dict[str, dict] = {
    "deterministic": {"model": DEMO, "passes": 1},
    "MC dropout T=100": {"model": DEMO, "passes": 100},
    "TTA K=10 T=10": {"model": DEMO, "passes": 10, "tta": 10},
    "ensemble M=5": {"model": ENSEMBLE, "passes": 1},
    "ensemble M=5 T=20": {"model": ENSEMBLE, "passes": 20},
    "SNGP mean-field": {"model": SNGP, "passes": 1},
    "SNGP T=100": {"model": SNGP, "passes": 100},
    "deterministic + temperature": {"model": DEMO, "passes": 1, "temperature": True},
    "MC dropout T=100 + temperature": {"model": DEMO, "passes": 100, "temperature": True},
    "ensemble M=5 + temperature": {"model": ENSEMBLE, "passes": 1, "temperature": True},
    "SNGP mean-field + temperature": {"model": SNGP, "passes": 1, "temperature": True},
}


def calibrate_for(options: dict, work: Path) -> Path:
    """A calibration fitted on ``sample_data/digits/val`` with the configuration's own scoring
    predictor (model, passes, TTA), so that its temperature is fitted like for like."""
    from batchuq import calibrate_directory
    from batchuq.jobs.calibrate import CalibrateOptions

    passes, tta = options["passes"], options.get("tta", 1)
    path = work / f"calibration-{Path(options['model']).stem}-{passes}-{tta}.json"
    if not path.exists():
        fitted = CalibrateOptions(
            tta=1, model=options["model"], passes=1, score_passes=passes, score_tta=tta, seed=1
        )
        calibrate_directory(VAL, path, fitted)
    return path


def subset(source: Path, target: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class folder (for ``--quick``)."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, target / folder.name / image.name)
    return target


def score_config(name: str, options: dict, folders: dict[str, Path], work: Path) -> dict:
    """Score every folder with one configuration; returns folder label -> Parquet file."""
    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions

    files = {}
    slug = "".join(c if c.isalnum() else "_" for c in name)
    for label, folder in folders.items():
        out = work / "scores" / slug / (label.replace("/", "-") + ".parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        score_directory(folder, out, ScoreOptions(seed=1, **options))
        files[label] = out
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 images, 2 corruptions, sev. 3")
    parser.add_argument("--severities", default="1,3,5", help="severities of the series")
    args = parser.parse_args(argv)
    from batchuq.jobs.compare import compare_files, format_comparison
    from batchuq.jobs.shift import shift_directory
    from batchuq.report.compare import write_comparison_report

    started = time.perf_counter()
    severities = [3] if args.quick else [int(s) for s in args.severities.split(",")]
    corruptions = ("gaussian_noise", "rotate") if args.quick else CORRUPTIONS
    with tempfile.TemporaryDirectory(prefix="compare_methods_") as tmp:
        work = Path(tmp)
        test = subset(TEST, work / "test", 5) if args.quick else TEST
        shift_directory(test, work / "shift", corruptions=corruptions, severities=severities)
        folders = {"clean": test, "ood": OOD}
        for corruption in corruptions:
            for severity in severities:
                folders[f"{corruption}/{severity}"] = work / "shift" / corruption / str(severity)
        files = {}
        for name, options in CONFIGS.items():
            print(f"{name} ...", flush=True)
            if options.get("temperature"):
                options = {**options, "calibration": calibrate_for(options, work)}
            files[name] = score_config(name, options, folders, work)
        clean = compare_files(
            [files[n]["clean"] for n in CONFIGS],
            names=list(CONFIGS),
            ood=[files[n]["ood"] for n in CONFIGS],
        )
        series_files = [(n, f) for n in CONFIGS for label, f in files[n].items() if label != "ood"]
        series = compare_files(
            [f for _, f in series_files], names=[n for n, _ in series_files], series=True
        )
        report = write_comparison_report(series, work / "report")
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        if not args.quick:
            shutil.copy(report.parent / "series.png", FIGURE)
        print(format_comparison(clean))
        print(format_comparison(series))
    result = {
        "generated_by": "python benchmarks/compare_methods.py" + (" --quick" if args.quick else ""),
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "quick": args.quick,
        "corruptions": list(corruptions),
        "severities": severities,
        "clean": clean.as_json(),
        "series": series.series,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"compare_methods: {result['seconds']:.0f} s")
    if args.quick:
        return 0  # a smoke run records nothing
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
