"""False alarms and power of ``batchuq monitor`` on the bundled digits (issue 23's benchmark).

In one run:

1. ``batchuq score`` (the bundled digits CNN, seed 0) scores ``sample_data/digits/test`` and
   ``sample_data/digits/val`` once (about 720 images: the clean rows), and every folder of
   ``batchuq shift``'s series of the test digits (6 corruptions x severities 1-5);
2. **false alarms**: over ``--splits`` random splits of the clean rows, "tonight" is
   ``--tonight`` rows drawn at random and the reference the other clean rows; the monitor's
   tests (``batchuq.jobs.monitor.night_tests``: the library function behind the command) run
   on each split. Tonight and the reference come from one distribution, so every alarm is a
   false one: the alarm rate, with its 95% Clopper-Pearson interval, should be at most alpha;
3. **power**: for each corruption and severity, ``--draws`` times, tonight is ``--tonight``
   rows drawn at random from the shifted night and the reference is the clean validation rows
   plus the clean test rows of the other images (no image on both sides); the detection rate is
   the share of draws that alert. Both settings of the alert rule are counted: the default
   (``min_psi`` 0, the Holm-adjusted p-value alone) and ``min_psi`` 0.1.

Tonight has as many rows in both parts, and the reference nearly as many (the clean rows
minus tonight's), so the false-alarm rate and the detection rates are comparable.

Writes ``benchmarks/results/monitor.json``; docs/monitoring.md reads it. Run from the
repository root::

    python benchmarks/bench_monitor.py                 # T = 100 passes (the score default)
    python benchmarks/bench_monitor.py --passes 20     # faster scoring, on a loaded machine
    python benchmarks/bench_monitor.py --work /tmp/bm  # keep (and reuse) the scored files
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
RESULTS_JSON = HERE / "results" / "monitor.json"
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "rotate", "pixelate", "jpeg")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_PSI_SETTINGS = (0.0, 0.1)


def score_all(work: Path, passes: int, seed: int) -> dict[str, Path]:
    """Score the clean folders and the shift series (files already in ``work`` are reused)."""
    from batchuq import score_directory
    from batchuq.jobs.score import RunControl, ScoreOptions
    from batchuq.jobs.shift import shift_directory

    shifted = work / "shift"
    if not (shifted / "shift.json").exists():
        shift_directory(TEST, shifted, corruptions=CORRUPTIONS, severities=SEVERITIES)
    folders = {"test": TEST, "val": VAL}
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            folders[f"{corruption}/{severity}"] = shifted / corruption / str(severity)
    files = {}
    for label, folder in folders.items():
        out = work / "scores" / f"T{passes}" / (label.replace("/", "-") + ".parquet")
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            options = ScoreOptions(model=DEMO, passes=passes, seed=seed)
            score_directory(folder, out, options, RunControl(progress=False))
            print(f"scored {label}: {time.perf_counter() - started:.1f} s", flush=True)
        files[label] = out
    return files


def _paths(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(file, columns=["path"])["path"].to_pylist()


def _alerts(reference, tonight) -> dict[float, list[str]]:
    """The tests that alert, under each ``min_psi`` setting."""
    from batchuq.jobs.monitor import MonitorSettings, night_tests

    tests = night_tests(reference, tonight, MonitorSettings())
    found = {}
    for min_psi in MIN_PSI_SETTINGS:
        found[min_psi] = [t.name for t in tests if t.alert and (min_psi <= 0 or t.psi >= min_psi)]
    return found


def _rate(hits: int, n: int) -> dict:
    from scipy import stats

    interval = stats.binomtest(hits, n).proportion_ci(0.95, method="exact")
    return {"alarms": hits, "n": n, "rate": hits / n, "ci95": [interval.low, interval.high]}


def clean_splits(clean, splits: int, size: int, rng: np.random.Generator) -> dict:
    """The alarm rate over random splits of the clean rows (every alarm is a false one)."""
    counts = {m: 0 for m in MIN_PSI_SETTINGS}
    per_test: dict[str, int] = {}
    for _ in range(splits):
        order = rng.permutation(clean.rows)
        found = _alerts(clean.subset(order[size:]), clean.subset(order[:size]))
        for min_psi, names in found.items():
            counts[min_psi] += bool(names)
        for name in found[0.0]:
            per_test[name] = per_test.get(name, 0) + 1
    return {
        "splits": splits,
        "tonight_rows": size,
        "reference_rows": clean.rows - size,
        "by_min_psi": {str(m): _rate(counts[m], splits) for m in MIN_PSI_SETTINGS},
        "alarms_per_test": per_test,
    }


def shifted_draws(nights: dict, files: dict, draws: int, size: int, rng) -> list[dict]:
    """The detection rate per corruption and severity."""
    from batchuq.jobs.monitor import pool

    test, val = nights["test"], nights["val"]
    test_paths = _paths(files["test"])
    rows = []
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            label = f"{corruption}/{severity}"
            night = nights[label]
            if _paths(files[label]) != test_paths:
                raise RuntimeError(f"{label}: rows are not the clean test rows' images")
            counts = {m: 0 for m in MIN_PSI_SETTINGS}
            per_test: dict[str, int] = {}
            for _ in range(draws):
                order = rng.permutation(test.rows)
                reference = pool([val, test.subset(order[size:])])
                found = _alerts(reference, night.subset(order[:size]))
                for min_psi, names in found.items():
                    counts[min_psi] += bool(names)
                for name in found[0.0]:
                    per_test[name] = per_test.get(name, 0) + 1
            rows.append(
                {
                    "corruption": corruption,
                    "severity": severity,
                    "accuracy": _accuracy(files[label]),
                    "by_min_psi": {str(m): _rate(counts[m], draws) for m in MIN_PSI_SETTINGS},
                    "alarms_per_test": per_test,
                }
            )
            print(f"{label}: detection {counts[0.0] / draws:.2f}", flush=True)
    return rows


def _accuracy(file: Path) -> float:
    import pyarrow.parquet as pq

    table = pq.read_table(file, columns=["label_index", "pred_index"]).to_pydict()
    pairs = list(zip(table["label_index"], table["pred_index"], strict=True))
    return sum(a == b for a, b in pairs) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=100, help="MC passes T of every score")
    parser.add_argument("--splits", type=int, default=500, help="random clean splits")
    parser.add_argument("--draws", type=int, default=50, help="draws per shifted night")
    parser.add_argument("--tonight", type=int, default=200, help="rows of tonight per draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of scoring and of the draws")
    parser.add_argument("--work", type=Path, default=None, help="keep the scored files here")
    args = parser.parse_args(argv)
    from batchuq.jobs.monitor import pool, read_night

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        work = args.work or Path(tmp)
        files = score_all(work, args.passes, args.seed)
        scoring_seconds = time.perf_counter() - started
        nights = {label: read_night(f) for label, f in files.items()}
        rng = np.random.default_rng(args.seed)
        clean = pool([nights["test"], nights["val"]])
        false_alarms = clean_splits(clean, args.splits, args.tonight, rng)
        print(f"false alarms: {false_alarms['by_min_psi']['0.0']}", flush=True)
        detection = shifted_draws(nights, files, args.draws, args.tonight, rng)
    result = {
        "generated_by": shlex.join(
            ["python", "benchmarks/bench_monitor.py", *(argv or sys.argv[1:])]
        ),
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "seed": args.seed,
        "passes": args.passes,
        "alpha": 0.05,
        "min_psi_settings": list(MIN_PSI_SETTINGS),
        "clean_rows": clean.rows,
        "clean_accuracy": {k: _accuracy(files[k]) for k in ("test", "val")},
        "false_alarms": false_alarms,
        "draws": args.draws,
        "detection": detection,
        "scoring_seconds": round(scoring_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
