"""The figures of the bundled digits: the documentation's own commands, run for real.

Runs the ``batchuq score`` and ``batchuq calibrate`` commands of the docs (getting started,
calibration and decisions) in fresh processes, in a temporary folder where ``sample_data``
links to the repository's, evaluates the Parquet files with
``batchuq.jobs.evaluate.evaluate_parquet`` (the metrics of ``batchuq evaluate``), cross-checks
the conformal quantiles with MAPIE (``tests/mapie_adapter.py``) and writes everything, with the
CPU and the date, to ``benchmarks/results/digits.json``. The pages read that file when the site
is built (``benchmarks/figures.py``). About 7 minutes on 2 shared cores::

    python benchmarks/bench_digits.py
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from common import REPO, RESULTS, cpu_info, now, record, summary_line, versions

sys.path.insert(0, str(REPO / "tests"))  # mapie_adapter, shared with tests/test_calibrate.py

RESULTS_JSON = RESULTS / "digits.json"
BUNDLED_MODEL = REPO / "batchuq" / "data" / "digits_cnn.keras"
RULES = ("median", "threshold", "confidence", "none")
SMALL_ALPHA = 0.02


def batchuq(arguments: list[str], cwd: Path) -> str:
    """Run ``batchuq ARGUMENTS`` in a fresh process in ``cwd``; return its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUQ_")}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "batchuq", *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    print(f"  {seconds:6.1f} s  batchuq {shlex.join(arguments)}", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"batchuq {shlex.join(arguments)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc.stderr


def sample_files() -> dict:
    from PIL import Image

    root = REPO / "sample_data"
    counts = {
        split: len(list((root / "digits" / split).glob("*/*.png")))
        for split in ("train", "val", "test")
    }
    first = next((root / "digits" / "test").glob("*/*.png"))
    ood = sorted((root / "ood").glob("*.jpg"))
    with Image.open(first) as digit, Image.open(ood[0]) as photo:
        digit_size, digit_mode, ood_mode = list(digit.size), digit.mode, photo.mode
    with zipfile.ZipFile(BUNDLED_MODEL) as archive:
        config = json.loads(archive.read("config.json"))
    (input_layer,) = [
        layer for layer in config["config"]["layers"] if layer["class_name"] == "InputLayer"
    ]
    return counts | {
        "ood": len(ood),
        "classes": len(list((root / "digits" / "test").iterdir())),
        "image_size": digit_size,
        "image_mode": digit_mode,
        "ood_mode": ood_mode,
        "model_input": input_layer["config"]["batch_shape"][1:],
    }


def evaluated(work: Path, name: str, ood: str | None = None) -> dict:
    """``batchuq evaluate NAME [--ood OOD]`` as a dict, with file names relative to ``work``."""
    from batchuq.jobs.evaluate import evaluate_parquet

    result = evaluate_parquet(work / name, None if ood is None else work / ood)
    return result | {"file": name, "ood_file": ood}


def read_rows(path: Path):
    import pandas as pd

    return pd.read_parquet(path, columns=None)


def empty_sets(path: Path) -> dict:
    """Empty conformal sets of a scored file: how many, how many on correct predictions, and the
    highest confidence among those."""
    df = read_rows(path)
    df = df[(df.status == "ok") & df.label_index.notna()]
    empty = df.pred_set.map(len) == 0
    correct = df.pred == df.label
    return {
        "images": len(df),
        "empty": int(empty.sum()),
        "empty_correct": int((empty & correct).sum()),
        "max_confidence_empty_correct": (
            float(df.confidence[empty & correct].max()) if (empty & correct).any() else None
        ),
    }


def batch_size_agreement(path_a: Path, path_b: Path) -> dict:
    """How far two runs that differ only in ``--batch-size`` are apart."""
    import numpy as np

    a, b = read_rows(path_a).set_index("path"), read_rows(path_b).set_index("path")
    b = b.loc[a.index]
    out: dict = {"images": len(a)}
    for prefix in ("mean_", "median_", "std_"):
        cols = [c for c in a.columns if c.startswith(prefix)]
        x, y = a[cols].to_numpy(np.float64), b[cols].to_numpy(np.float64)
        out[prefix.rstrip("_")] = {
            "values": int(x.size),
            "differ": int((x != y).sum()),
            "max_abs_diff": float(np.abs(x - y).max()),
        }
    x, y = a.entropy.to_numpy(np.float64), b.entropy.to_numpy(np.float64)
    out["entropy"] = {"differ": int((x != y).sum()), "max_abs_diff": float(np.abs(x - y).max())}
    out["pred_identical"] = int((a.pred == b.pred).sum())
    out["decision_identical"] = int((a.decision == b.decision).sum())
    return out


def mapie_agreement(val_parquet: Path, calibrations: dict[str, dict], alpha: float) -> dict:
    """LAC and APS quantiles of MAPIE on the validation MC means, against batchuq's fitted ones.

    ``val_parquet`` is ``batchuq score`` of the validation folder with the scoring predictor that
    ``calibrate`` used, so batchuq's own quantile of its rows must equal the calibration file's
    (checked first: otherwise the comparison would be on other probabilities).
    """
    import numpy as np

    from batchuq.postprocess.conformal import conformal_quantiles

    df = read_rows(val_parquet)
    df = df[(df.status == "ok") & df.label_index.notna()]
    names = [c[len("mean_") :] for c in df.columns if c.startswith("mean_")]
    probs = df[[f"mean_{n}" for n in names]].to_numpy(np.float64)
    labels = df.label_index.to_numpy(int)
    result: dict = {"version": versions()["mapie"], "alpha": alpha, "methods": {}}
    for method in ("lac", "aps"):
        fitted = float(calibrations[method]["conformal_quantiles"][0])
        ours = float(conformal_quantiles(probs, labels, alpha, method)[0])
        entry = {"calibration_file": fitted, "batchuq_on_val_scores": ours, "mapie": None}
        if abs(ours - fitted) > 1e-12:
            raise RuntimeError(f"{method}: the validation scores are not calibrate's ({ours})")
        with contextlib.suppress(ImportError):  # MAPIE is a test extra
            from mapie_adapter import mapie_conformal

            entry["mapie"] = float(mapie_conformal(probs, labels, alpha, method)[0][0])
        result["methods"][method] = entry
    return result


def digits_figures() -> dict:
    """Run the docs' commands on the bundled digits and collect every figure."""
    from batchuq.output.schema import read_metadata
    from batchuq.postprocess.conformal import conformal_level, min_images_per_class

    with tempfile.TemporaryDirectory(prefix="bench_digits_") as tmp:
        work = Path(tmp)
        (work / "sample_data").symlink_to(REPO / "sample_data")
        test, val, ood = "sample_data/digits/test", "sample_data/digits/val", "sample_data/ood"
        fig: dict = {"files": sample_files(), "cpu": cpu_info()}

        # Set-up and "Bundled sample data and model".
        setup = ["score", test, "out.parquet"]
        fig["setup"] = {
            "command": "batchuq " + shlex.join(setup),
            "summary_line": summary_line(batchuq(setup, work)),
        }
        batchuq(["score", test, "out-passes1.parquet", "--passes", "1"], work)
        fig["default"] = evaluated(work, "out.parquet")
        metadata = read_metadata(work / "out.parquet")
        fig["versions"] = {  # what the runs imported
            key: metadata[f"{key}_version"] for key in ("batchuq", "tensorflow", "keras")
        }
        fig["passes1"] = evaluated(work, "out-passes1.parquet")

        # "What is bitwise": -b 7 against the default -b 32.
        batchuq(["score", test, "out-b7.parquet", "-b", "7"], work)
        fig["batch_size"] = {"a": 32, "b": 7} | batch_size_agreement(
            work / "out.parquet", work / "out-b7.parquet"
        )

        # "Calibrated decisions on the bundled digits", the commands as the docs list them.
        batchuq(["calibrate", val, "-o", "calibration.json"], work)
        for rule in RULES:
            batchuq(
                [
                    *["score", test, f"test-{rule}.parquet"],
                    *["--rule", rule, "--calibration", "calibration.json"],
                ],
                work,
            )
        batchuq(["score", ood, "ood.parquet", "--calibration", "calibration.json"], work)
        for folder, name in ((test, "test-temp.parquet"), (ood, "ood-temp.parquet")):
            batchuq(
                ["score", folder, name, "--calibration", "calibration.json", "--temperature"], work
            )
        fig["rules"] = {rule: evaluated(work, f"test-{rule}.parquet") for rule in RULES}
        fig["evaluate"] = evaluated(work, "test-median.parquet", "ood.parquet")
        fig["evaluate_temperature"] = evaluated(work, "test-temp.parquet", "ood-temp.parquet")
        calibration = json.loads((work / "calibration.json").read_text())
        if calibration["conformal_method"] != "lac":
            raise RuntimeError("calibrate's default conformal method is no longer lac")

        # Conformal sets per method; `lac` is the default, so calibration.json / test-median.
        calibrations, conformal = {"lac": calibration}, {}
        runs = {"lac": ("calibration.json", "test-median.parquet")}
        for method in ("class", "aps"):
            runs[method] = (f"cal-{method}.json", f"test-{method}.parquet")
            batchuq(["calibrate", val, "-o", runs[method][0], "--conformal", method], work)
            calibrations[method] = json.loads((work / runs[method][0]).read_text())
        small = f"alpha{SMALL_ALPHA}"
        runs[small] = (f"cal-lac-{small}.json", f"test-lac-{small}.parquet")
        batchuq(["calibrate", val, "-o", runs[small][0], "--alpha", str(SMALL_ALPHA)], work)
        calibrations[small] = json.loads((work / runs[small][0]).read_text())
        for key, (cal_file, out_file) in runs.items():
            if key != "lac":
                batchuq(["score", test, out_file, "--calibration", cal_file], work)
            cal = calibrations[key]
            conformal[key] = {
                "calibration": cal_file,
                "scored": out_file,
                "method": cal["conformal_method"],
                "alpha": cal["settings"]["alpha"],
                "quantiles": cal["conformal_quantiles"],
                "validation_images": cal["stats"]["images"],
                "images_per_class": cal["stats"].get("images_per_class"),
                "warnings": cal["stats"].get("warnings"),
                "evaluate": evaluated(work, out_file)["conformal"],
            } | empty_sets(work / out_file)
        alpha = calibration["settings"]["alpha"]
        n_val = calibration["stats"]["images"]
        n_test = conformal["lac"]["images"]
        # Coverage of split conformal given the calibration set is Beta(l, n + 1 - l); on m
        # test images add the binomial spread: one standard deviation of the observed coverage.
        rank = round(conformal_level(n_val, alpha) * n_val)
        a, b = rank, n_val + 1 - rank
        beta_var = a * b / ((a + b) ** 2 * (a + b + 1))
        mean = a / (a + b)
        test_var = (mean * (1 - mean) - beta_var) / n_test
        fig["conformal"] = {
            "alpha": alpha,
            "small_alpha": SMALL_ALPHA,
            "min_images_per_class": min_images_per_class(alpha),
            # E[coverage] = l / (n + 1), between 1 - alpha and 1 - alpha + 1 / (n + 1).
            "expected_coverage": mean,
            "coverage_bounds": [1 - alpha, 1 - alpha + 1 / (n_val + 1)],
            "coverage_sd": math.sqrt(beta_var + test_var),
            "methods": conformal,
        }
        fig["calibration"] = {
            key: calibration[key] for key in ("temperature", "threshold_predictor", "predictor")
        } | {"settings": {k: calibration["settings"].get(k) for k in ("tta", "passes", "seed")}}

        # The MAPIE cross-check "here": the validation MC means of the scoring predictor.
        batchuq(["score", val, "val.parquet"], work)
        fig["mapie"] = mapie_agreement(work / "val.parquet", calibrations, alpha)
        fig["mapie"]["max_abs_diff"] = max(
            (
                abs(m["mapie"] - m["calibration_file"])
                for m in fig["mapie"]["methods"].values()
                if m["mapie"] is not None
            ),
            default=None,
        )
    return fig


def main() -> int:
    started = time.perf_counter()
    print("bundled digits: the documentation's commands", flush=True)
    result = {
        "generated_by": "python benchmarks/bench_digits.py",
        "date": now(),
        "versions": versions(),
        "cpu": cpu_info(),
        **digits_figures(),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
