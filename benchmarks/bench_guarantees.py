"""Where the guarantees break under shift: the certified selective rule and conformal sets.

On the bundled digits, in one process:

1. ``calibrate`` on ``sample_data/digits/val`` (269 labelled images, score's default predictor:
   T = 100 MC passes, no TTA) with ``--target-risk 0.04 --delta 0.1`` (2% cannot be certified on
   269 images) and conformal sets at ``alpha = 0.1``: once with ``--conformal lac`` (the
   default) and once with ``--conformal raps`` (the same predictor; only the sets differ).
2. ``shift`` the test folder (450 images) through every corruption of ``batchuq shift`` at
   severities 1-5 (severity 0 is the clean folder).
3. ``score --calibration --rule risk`` each folder; ``evaluate`` each file. Reported per
   corruption and severity: accuracy; the certified rule's share accepted (coverage) and
   realised selective risk, each with its 95% Clopper-Pearson interval, and whether the risk
   stayed at or below the certified 4%; the LAC sets' coverage (with interval) and mean size
   (the ``pred_set`` column); the RAPS sets' coverage and mean size, built from the same
   file's MC means with the RAPS calibration; coverage per true class and per set size.
4. For the record: randomised APS and RAPS against MAPIE (``tests/mapie_adapter.py``) on the
   MC means of val (calibration) and test, at alpha 0.1 and 0.05.

Both guarantees assume the scored images are exchangeable with the calibration images: a
shifted night is not, and the table shows at which severity each corruption breaks them.

Writes ``benchmarks/results/guarantees.json`` (the docs' calibration page reads it).

    python benchmarks/bench_guarantees.py                      # ~8 min on 2 cores
    python benchmarks/bench_guarantees.py --corruptions contrast,rotate
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402

REPO = common.REPO
VAL = REPO / "sample_data" / "digits" / "val"
TEST = REPO / "sample_data" / "digits" / "test"
RESULTS_JSON = common.RESULTS / "guarantees.json"
TARGET_RISK, DELTA, ALPHA, SEED = 0.04, 0.1, 0.1, 0


def calibrations(work: Path, model) -> dict:
    """The LAC calibration (with the certified threshold) and the RAPS one, on VAL."""
    from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory

    same = {"tta": 1, "passes": 100, "score_tta": 1, "score_passes": 100, "seed": SEED}
    out = {}
    for method in ("lac", "raps"):
        path = work / f"{method}.json"
        options = CalibrateOptions(
            model=model,
            alpha=ALPHA,
            conformal=method,
            target_risk=TARGET_RISK,
            delta=DELTA,
            **same,
        )
        out[method] = (path, calibrate_directory(VAL, path, options))
    return out


def evaluated(folder: Path, out: Path, model, cals: dict) -> dict:
    """Score one folder with the certified rule and the LAC sets; evaluate; add RAPS sets."""
    import pandas as pd

    from batchuq.jobs.evaluate import evaluate_parquet
    from batchuq.jobs.score import ScoreOptions, score_directory
    from batchuq.postprocess.coverage import stratified_coverage
    from batchuq.postprocess.rules import DecisionRule
    from batchuq.postprocess.selective import clopper_pearson

    lac_path, _ = cals["lac"]
    options = ScoreOptions(
        model=model, passes=100, seed=SEED, calibration=lac_path, rule=DecisionRule("risk")
    )
    score_directory(folder, out, options)
    results = evaluate_parquet(out)
    frame = pd.read_parquet(out)
    names = results["class_names"]
    frame = frame[(frame.status == "ok") & frame.label_index.notna()]
    means = frame[[f"mean_{n}" for n in names]].to_numpy(np.float64)
    labels = frame.label_index.to_numpy().astype(int)
    raps_sets = cals["raps"][1].prediction_sets(means, list(frame.path), seed=SEED)
    covered = int(raps_sets[np.arange(len(labels)), labels].sum())
    selective, conformal = results["selective"], results["conformal"]
    label_names = [names[i] for i in labels]
    raps_members = [[names[c] for c in np.flatnonzero(row)] for row in raps_sets]
    strata = {
        "lac": {k: conformal[k] for k in ("per_class", "per_size")},
        "raps": stratified_coverage(raps_members, label_names, names),
    }
    low, high = clopper_pearson(int(round(conformal["coverage"] * conformal["n"])), conformal["n"])
    return {
        "n": results["n"],
        "accuracy": results["accuracy"],
        "risk_rule": {
            k: selective[k]
            for k in ("accepted", "errors", "risk", "risk_interval", "coverage")
            + ("coverage_interval", "target_held")
        },
        "lac": {
            "coverage": conformal["coverage"],
            "coverage_interval": [low, high],
            "mean_set_size": conformal["mean_set_size"],
        },
        "raps": {
            "coverage": covered / len(labels),
            "coverage_interval": list(clopper_pearson(covered, len(labels))),
            "mean_set_size": float(raps_sets.sum(axis=1).mean()),
        },
        "strata": strata,
    }


def mean_probs(folder: Path, out: Path, model) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Score's MC means (T = 100), labels and paths of a labelled folder."""
    import pandas as pd

    from batchuq.jobs.score import ScoreOptions, score_directory

    score_directory(folder, out, ScoreOptions(model=model, passes=100, seed=SEED))
    frame = pd.read_parquet(out)
    frame = frame[(frame.status == "ok") & frame.label_index.notna()]
    probs = frame[[f"mean_n{i}" for i in range(10)]].to_numpy(np.float64)
    return np.clip(probs, 0.0, 1.0), frame.label_index.to_numpy().astype(int), list(frame.path)


def mapie_agreement(work: Path, model) -> dict:
    """Randomised APS and RAPS against MAPIE on the digits: calibrate on val's MC means, sets
    on test's, at alpha 0.1 and 0.05, with MAPIE's own uniforms and RAPS split and parameters
    (``tests/mapie_adapter.py``): coverage and mean set size of both."""
    sys.path.insert(0, str(REPO / "tests"))
    from mapie_adapter import mapie_randomised

    from batchuq.postprocess.conformal import conformal_quantiles, prediction_sets

    cal_p, cal_y, _ = mean_probs(VAL, work / "val.parquet", model)
    test_p, test_y, _ = mean_probs(TEST, work / "test.parquet", model)
    rows = np.arange(len(test_y))
    out = {"version": common.versions()["mapie"], "mapie_seed": 7, "alphas": {}}
    for alpha in (0.1, 0.05):
        entry = {}
        for method in ("aps-random", "raps"):
            m = mapie_randomised(cal_p, cal_y, alpha, method, test_p, seed=7)
            fit = m["cal_index"]
            raps = (m["k_star"], m["lambda_star"]) if method == "raps" else None
            q = conformal_quantiles(cal_p[fit], cal_y[fit], alpha, method, m["cal_uniforms"], raps)
            ours = prediction_sets(test_p, q, method, m["test_uniforms"], raps)
            entry[method] = {
                "quantile": float(q[0]),
                "mapie_quantile": m["quantile"],
                "coverage": float(ours[rows, test_y].mean()),
                "mapie_coverage": float(m["sets"][rows, test_y].mean()),
                "mean_set_size": float(ours.sum(axis=1).mean()),
                "mapie_mean_set_size": float(m["sets"].sum(axis=1).mean()),
                "sets_differ": int((ours != m["sets"]).any(axis=1).sum()),
                "raps": None if raps is None else {"k_reg": raps[0], "lambda": raps[1]},
            }
        out["alphas"][str(alpha)] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    from batchuq.corrupt import CORRUPTIONS, SEVERITIES
    from batchuq.jobs.shift import shift_directory
    from batchuq.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    args = parser.parse_args(argv)
    corruptions = args.corruptions.split(",")
    started = time.perf_counter()
    command = "python benchmarks/bench_guarantees.py" + (
        f" --corruptions {args.corruptions}" if corruptions != list(CORRUPTIONS) else ""
    )
    result = {
        "generated_by": command,
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "seed": SEED,
        "settings": {
            "target_risk": TARGET_RISK,
            "delta": DELTA,
            "alpha": ALPHA,
            "passes": 100,
            "calibration_folder": "sample_data/digits/val",
            "test_folder": "sample_data/digits/test",
            "corruptions": corruptions,
            "severities": list(SEVERITIES),
        },
    }
    model = load_model(None)
    with tempfile.TemporaryDirectory(prefix="bench_guarantees_") as tmp:
        work = Path(tmp)
        cals = calibrations(work, model)
        lac, raps = cals["lac"][1], cals["raps"][1]
        result["calibration"] = {
            "images": lac.stats["images"],
            "certificate": lac.selective.certificate,
            "statement": lac.selective.statement,
            "lac_quantile": float(lac.conformal_quantiles[0]),
            "raps_quantile": float(raps.conformal_quantiles[0]),
            "raps_params": raps.settings["conformal_params"],
        }
        print("MAPIE ...", flush=True)
        result["mapie"] = mapie_agreement(work, model)
        shift_directory(TEST, work / "shift", corruptions=corruptions, seed=SEED)
        print("clean ...", flush=True)
        result["clean"] = evaluated(TEST, work / "clean.parquet", model, cals)
        result["shift"] = {}
        for corruption in corruptions:
            result["shift"][corruption] = {}
            for severity in SEVERITIES:
                print(f"{corruption} {severity} ...", flush=True)
                folder = work / "shift" / corruption / str(severity)
                out = work / f"{corruption}_{severity}.parquet"
                result["shift"][corruption][str(severity)] = evaluated(folder, out, model, cals)
    result["seconds"] = round(time.perf_counter() - started, 1)
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
