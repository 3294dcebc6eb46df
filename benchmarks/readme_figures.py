"""Every figure in the README, computed and written to JSON, and the README blocks that show them.

The README's measured figures sit between ``<!-- figures:NAME ... -->`` and
``<!-- /figures:NAME -->``. Each block is rendered from ``benchmarks/readme_figures.json`` by
``render_NAME`` below, and ``tests/test_readme_figures.py`` checks that the README holds exactly
that rendering (and no such figures outside the blocks). To change a block's words, edit its
render function and run ``--from-json --write-readme``; to change its numbers, run the script.

Sources of the figures:

* the bundled digits (``sample_data``): this script runs the README's own ``batchuq score`` and
  ``batchuq calibrate`` commands in fresh processes, in a temporary folder where
  ``sample_data`` links to the repository's, and evaluates the Parquet files with
  ``batchuq.jobs.evaluate.evaluate_parquet`` (the metrics of ``batchuq evaluate``);
* speed: ``benchmarks/results/bench_mc.json``, written by
  ``python benchmarks/bench_mc.py --json benchmarks/results/bench_mc.json`` (``--bench`` runs it);
  it records the CPU it ran on, and the README names that CPU;
* memory: ``benchmarks/results/memory_flat.json`` and ``memory_tta.json``. ``--memory`` makes
  them with ``benchmarks/memory_flat.py``'s functions: the runs of ``memory_flat.py`` and
  ``memory_tta.py``, the latter also on the commit before the TTA copies were chunked.

Each JSON records the CPU it was made on. On 2 shared cores: digits ~7 min, ``--memory``
~5 min, ``--bench`` 5-15 min.

Usage::

    python benchmarks/readme_figures.py                   # digits figures -> JSON, report drift
    python benchmarks/readme_figures.py --write-readme    # ... and rewrite the README blocks
    python benchmarks/readme_figures.py --bench --memory --write-readme   # everything
    python benchmarks/readme_figures.py --from-json --write-readme        # re-render only
    python benchmarks/readme_figures.py --from-json --check               # exit 1 on drift
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README = REPO / "README.md"
FIGURES_JSON = HERE / "readme_figures.json"
RESULTS = HERE / "results"
BENCH_JSON = RESULTS / "bench_mc.json"
MEMORY_FLAT_JSON = RESULTS / "memory_flat.json"
MEMORY_FLAT_SIZES = (2000, 20000)
MEMORY_FLAT_PASSES = 10
MEMORY_TTA_JSON = RESULTS / "memory_tta.json"
MEMORY_TTA_COPIES = (10, 100)
# A commit from before the TTA copies were chunked (884b4d6): B x K rows went through at once.
BEFORE_TTA_CHUNKING = "9ae75ec613c5e93b3a0fc40b1a5b70d15319904f"
BUNDLED_MODEL = REPO / "batchuq" / "data" / "digits_cnn.keras"
RULES = ("median", "threshold", "confidence", "none")
CONFORMAL_METHODS = ("lac", "class", "aps")
SMALL_ALPHA = 0.02

BLOCK = re.compile(
    r"<!-- figures:(?P<name>[\w-]+)[^>]*-->\n(?P<body>.*?)\n<!-- /figures:(?P=name) -->",
    re.DOTALL,
)


def cpu_info() -> dict:
    """The CPU this process runs on (``bench_mc.cpu_info``: model name, ISA flags, bf16)."""
    return benchmark_module("bench_mc").cpu_info()


def versions() -> dict:
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


# --------------------------------------------------------------------------------------------
# Bundled digits: the README's commands, run for real
# --------------------------------------------------------------------------------------------


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


def summary_line(stderr: str) -> str:
    lines = [
        x.strip() for x in re.split(r"[\r\n]", stderr) if re.match(r"(batchuq: )?\d+ images, ", x)
    ]
    if not lines:
        raise RuntimeError(f"no summary line in:\n{stderr[-2000:]}")
    return lines[-1]


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
            entry["mapie"] = _mapie_quantile(probs, labels, alpha, method)
        result["methods"][method] = entry
    return result


def _mapie_quantile(probs, labels, alpha: float, method: str) -> float:
    from mapie.classification import SplitConformalClassifier
    from mapie.conformity_scores import APSConformityScore
    from sklearn.base import BaseEstimator, ClassifierMixin

    class GivenProbabilities(ClassifierMixin, BaseEstimator):
        def fit(self, X, y=None):  # noqa: ANN001, N803
            self.classes_ = list(range(X.shape[1]))
            return self

        def predict_proba(self, X):  # noqa: ANN001, N803
            return X

        def predict(self, X):  # noqa: ANN001, N803
            return X.argmax(axis=1)

    class NonRandomisedAPS(APSConformityScore):
        """MAPIE's APS score without its random term (as ``tests/test_calibrate.py``)."""

        def get_conformity_scores(self, y, y_pred, y_enc=None, **kwargs):  # noqa: ANN001
            scores, self.cutoff = self.get_true_label_cumsum_proba(y, y_pred, self.classes)
            return scores

    score = "lac" if method == "lac" else NonRandomisedAPS()
    mapie = SplitConformalClassifier(
        estimator=GivenProbabilities().fit(probs),
        confidence_level=1 - alpha,
        conformity_score=score,
        prefit=True,
    ).conformalize(probs, labels)
    params = {"include_last_label": True} if method == "aps" else {}
    mapie.predict_set(probs, conformity_score_params=params)  # sets the fitted quantile
    return float(mapie._mapie_classifier.conformity_score_function_.quantiles_[0])


def digits_figures() -> dict:
    """Run the README's commands on the bundled digits and collect every figure."""
    from batchuq.postprocess.conformal import conformal_level, min_images_per_class
    from batchuq.write import read_metadata

    with tempfile.TemporaryDirectory(prefix="readme_figures_") as tmp:
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

        # "Calibrated decisions on the bundled digits", the commands as the README lists them.
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


# --------------------------------------------------------------------------------------------
# Speed and memory: the benchmark scripts' JSON
# --------------------------------------------------------------------------------------------


def run_bench() -> None:
    RESULTS.mkdir(exist_ok=True)
    command = [sys.executable, str(HERE / "bench_mc.py"), "--json", str(BENCH_JSON)]
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def benchmark_module(name: str):
    """Import ``benchmarks/NAME.py`` (``memory_flat``, ``bench_mc``)."""
    sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(HERE))


def measure_memory_flat() -> None:
    """``memory_flat.py --sizes 2000 20000 --passes 10``, kept as JSON."""
    memory_flat = benchmark_module("memory_flat")
    runs = []
    with tempfile.TemporaryDirectory(prefix="memory_flat_") as tmp:
        folder = Path(tmp) / "images"
        for size in MEMORY_FLAT_SIZES:
            memory_flat.make_images(folder, size)  # grows the same folder: N, then 10 N
            rss, seconds = memory_flat.peak_rss_mb(
                folder, Path(tmp) / f"out{size}.parquet", MEMORY_FLAT_PASSES
            )
            runs.append({"images": size, "peak_rss_mib": rss, "seconds": seconds})
            print(f"  memory_flat: {size} images, peak RSS {rss:.0f} MiB, {seconds:.1f} s")
    sizes = " ".join(map(str, MEMORY_FLAT_SIZES))
    result = {
        "command": f"python benchmarks/memory_flat.py --sizes {sizes} --passes "
        f"{MEMORY_FLAT_PASSES}",
        "passes": MEMORY_FLAT_PASSES,
        "runs": runs,
        "cpu": cpu_info(),
        "date": now(),
    }
    RESULTS.mkdir(exist_ok=True)
    MEMORY_FLAT_JSON.write_text(json.dumps(result, indent=2) + "\n")


def memory_tta_runs(label: str) -> dict:
    """The runs of ``memory_tta.py --tta 10 100 --passes 1 --calibrate``: fresh ``batchuq score``
    processes at each K and one ``batchuq calibrate`` with its defaults, each child's peak RSS."""
    memory_flat = benchmark_module("memory_flat")
    test, val = REPO / "sample_data/digits/test", REPO / "sample_data/digits/val"
    where = subprocess.run(
        [sys.executable, "-c", "import batchuq; print(batchuq.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out: dict = {"batchuq_from": where, "score": []}
    with tempfile.TemporaryDirectory(prefix="memory_tta_") as tmp:
        for copies in MEMORY_TTA_COPIES:
            command = ["score", str(test), str(Path(tmp) / f"tta{copies}.parquet")]
            command += ["--tta", str(copies), "--passes", "1", "--no-progress"]
            rss, seconds = memory_flat.cli_peak_rss_mb(command)
            out["score"].append({"tta": copies, "peak_rss_mib": rss, "seconds": seconds})
            print(f"  memory_tta ({label}): --tta {copies}, peak RSS {rss:.0f} MiB")
        rss, seconds = memory_flat.cli_peak_rss_mb(
            ["calibrate", str(val), "-o", str(Path(tmp) / "cal.json")]
        )
        out["calibrate"] = {"peak_rss_mib": rss, "seconds": seconds}
        print(f"  memory_tta ({label}): calibrate, peak RSS {rss:.0f} MiB")
    return out


def measure_memory_tta() -> None:
    """``memory_tta.py``'s runs on this checkout and on the commit before the TTA copies were
    chunked (``git archive`` of its ``batchuq/`` first on ``PYTHONPATH``, as memory_tta.py's
    docstring describes), kept as JSON."""
    current = memory_tta_runs("this checkout")
    with tempfile.TemporaryDirectory(prefix="before_chunking_") as src:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BEFORE_TTA_CHUNKING, "batchuq"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        # The children run `python -c`, whose first import path is the working directory: run
        # them in the old source tree, and put it first on PYTHONPATH as well.
        saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
        os.environ["PYTHONPATH"] = src + (os.pathsep + saved if saved else "")
        os.chdir(src)
        try:
            before = memory_tta_runs(f"commit {BEFORE_TTA_CHUNKING[:7]}")
        finally:
            os.chdir(cwd)
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        if not before["batchuq_from"].startswith(src):
            raise RuntimeError(f"the old commit's batchuq was not imported: {before}")
    before["batchuq_from"] = f"git archive {BEFORE_TTA_CHUNKING} batchuq"
    current["batchuq_from"] = str(Path(current["batchuq_from"]).parent.relative_to(REPO))
    from batchuq.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_BUDGET_MB

    result = {
        "command": "python benchmarks/memory_tta.py --tta "
        + " ".join(map(str, MEMORY_TTA_COPIES))
        + " --passes 1 --calibrate",
        "batch_size": DEFAULT_BATCH_SIZE,
        "memory_budget_mb": DEFAULT_MEMORY_BUDGET_MB,
        "current": current,
        "before_chunking": {"commit": BEFORE_TTA_CHUNKING} | before,
        "cpu": cpu_info(),
        "date": now(),
    }
    RESULTS.mkdir(exist_ok=True)
    MEMORY_TTA_JSON.write_text(json.dumps(result, indent=2) + "\n")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Rendering: one function per README block
# --------------------------------------------------------------------------------------------


WIDTH = 100


def para(*parts: str) -> str:
    """One Markdown paragraph from ``parts``, wrapped at ``WIDTH`` columns; code spans are never
    broken (one longer than a line gets a line of its own)."""
    text = " ".join(part.strip() for part in parts if part)
    protected = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
    # Nor a figure from its unit, an equation, or a CPU's name.
    protected = re.sub(r"(?<=\d) (?=MiB|MB|GB|GFLOP|s\b|images/s)", "\0", protected)
    protected = re.sub(r"(?<=\w) = (?=\S)", "\0=\0", protected)
    protected = re.sub(
        r"\d+-core [^(),;:]+?(?= \(|[,;:)]|$)", lambda m: m.group(0).replace(" ", "\0"), protected
    )
    lines = textwrap.wrap(protected, WIDTH, break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines).replace("\0", " ")


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def sci(x: float) -> str:
    """``6.0e-8``, as the README writes small differences."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}").replace("e+", "e")


def isa(cpu: dict) -> str:
    """``AVX2, no AVX-512, no native bfloat16`` and the like, from ``cpu_info`` flags."""
    flags = cpu["flags"]
    parts = []
    if flags.get("avx512f"):
        parts.append("AVX-512")
    else:
        parts += (["AVX2"] if flags.get("avx2") else []) + ["no AVX-512"]
    if flags.get("avx512_bf16"):
        parts.append("AVX512-BF16")
    if flags.get("amx_bf16"):
        parts.append("AMX-BF16")
    if not cpu.get("bf16_native"):
        parts.append("no native bfloat16")
    return ", ".join(parts)


def cpu_name(cpu: dict) -> str:
    return f"{cpu['usable_cores']}-core {cpu['model_name']}"


def render_setup(f: dict) -> str:
    d = f["digits"]
    return para(
        "The first command prints a progress bar and a summary such as",
        f"`{d['setup']['summary_line']}`",
        f"(this one on a {cpu_name(d['cpu'])}).",
    )


def render_sample_data(f: dict) -> str:
    files = f["digits"]["files"]
    h, w = files["image_size"]
    ih, iw = files["model_input"][:2]
    mode = {"L": "grayscale", "RGB": "RGB"}.get(files["image_mode"], files["image_mode"])
    return para(
        "`sample_data/` is made by `python sample_data/make_sample_data.py` (needs scikit-learn)",
        "from scikit-learn's bundled handwritten digits — real data, no download: a stratified",
        f"60/15/25 split (`train` {files['train']}, `val` {files['val']}, `test` {files['test']}",
        f"images in `n0` … `n{files['classes'] - 1}`), stored as {w}×{h} {mode} PNGs (the model",
        f"input is {iw}×{ih}, so scoring always resizes), and `sample_data/ood/` with",
        f"{files['ood']} {files['ood_mode']} crops of the two photos that ship with scikit-learn.",
        "The bundled model `batchuq/data/digits_cnn.keras` was trained with",
    )


def render_sample_accuracy(f: dict) -> str:
    d = f["digits"]
    default, single = d["default"], d["passes1"]
    n = default["n"]
    return para(
        f"Test accuracy on `sample_data/digits/test` ({n} images): **{pct(single['accuracy'])}**",
        "with a single deterministic pass (`--passes 1`) and",
        f"**{pct(default['accuracy'])}** with the MC mean of the default {default['passes']}",
        f"passes; the median rule leaves {n - default['accepted']} of {n} unclassified",
        f"(selective accuracy {pct(default['selective_accuracy'])}). Reproduce with",
        "`batchuq score sample_data/digits/test out.parquet` and",
        "`python -c \"import pandas as pd; d = pd.read_parquet('out.parquet');",
        'print((d.pred == d.label).mean())"`.',
    )


RULE_LABELS = {
    "median": "median (≥ 0.5)",
    "threshold": "threshold (10th percentile)",
    "confidence": "confidence (≥ 0.5)",
    "none": "none",
}


def render_calibration(f: dict) -> str:
    d = f["digits"]
    cal = d["calibration"]
    t = cal["temperature"]
    thresholds, scoring = cal["threshold_predictor"], cal["predictor"]
    if t < 1:
        confident = "under-confident on this model, and the temperature sharpens it"
    elif t > 1:
        confident = "over-confident on this model, and the temperature softens it"
    else:
        confident = "calibrated as it is"
    each = f" ({thresholds['passes']} passes each)" if thresholds["passes"] != 1 else ""
    lines = [
        para(
            f"T = {d['evaluate']['passes']} passes, no TTA at scoring, seed",
            f"{cal['settings']['seed']}. Calibration: thresholds from {thresholds['tta']} TTA",
            f"copies per validation image{each}; temperature and conformal sets from the scoring",
            f"predictor itself (T = {scoring['passes']}, K = {scoring['tta']}; fitted temperature",
            f"{t:.2f}: the MC mean over dropout passes is {confident}).",
        ),
        "",
        "| rule | accuracy | coverage | selective accuracy |",
        "|---|---|---|---|",
    ]
    for rule in RULES:
        r = d["rules"][rule]
        lines.append(
            f"| {RULE_LABELS[rule]} | {r['accuracy']:.3f} | {r['coverage']:.3f} | "
            f"{r['selective_accuracy']:.3f} |"
        )
    lines += ["", "| | NLL | Brier | ECE (15 bins) | AURC |", "|---|---|---|---|---|"]
    for label, e in (
        ("before temperature", d["evaluate"]),
        ("after temperature", d["evaluate_temperature"]),
    ):
        lines.append(
            f"| {label} | {e['nll']:.3f} | {e['brier']:.4f} | {e['ece']:.3f} | {e['aurc']:.5f} |"
        )
    return "\n".join(lines)


def render_conformal(f: dict) -> str:
    d = f["digits"]
    c = d["conformal"]
    alpha, methods = c["alpha"], c["methods"]
    lac, cls, aps = methods["lac"], methods["class"], methods["aps"]
    small = methods[f"alpha{c['small_alpha']}"]
    n_val, n_test = lac["validation_images"], lac["images"]
    accuracy = d["evaluate"]["accuracy"]
    # The prose below states these; if one stops holding, the words must change too.
    claims = {
        "the model is right more often than 1 - alpha": accuracy > 1 - alpha,
        "LAC leaves sets empty": lac["empty"] > 0,
        "APS is never empty": aps["empty"] == 0,
        "APS over-covers": aps["evaluate"]["coverage"] > 1 - alpha,
        "class has fewer images than it asks for": max(cls["images_per_class"])
        < c["min_images_per_class"],
        "class warns": bool(cls["warnings"]),
    }
    broken = [claim for claim, holds in claims.items() if not holds]
    if broken:
        raise ValueError(f"conformal prose no longer true: {broken}")

    def coverage(m: dict) -> str:
        text = f"{m['evaluate']['coverage']:.3f}"
        return f"**{text}**" if m["evaluate"]["coverage"] < 1 - alpha else text

    lines = [
        para(
            f"Conformal sets at α = {alpha} on `test`, calibrated on `val` ({n_val} images) with",
            "the default scoring predictor",
            "(`batchuq calibrate sample_data/digits/val -o cal-METHOD.json --conformal METHOD`,",
            "then",
            "`batchuq score sample_data/digits/test test-METHOD.parquet --calibration "
            "cal-METHOD.json`):",
        ),
        "",
        "| `--conformal` | coverage | mean set size | empty sets |",
        "|---|---|---|---|",
    ]
    for name, label in (("lac", "`lac` (default)"), ("class", "`class`"), ("aps", "`aps`")):
        m = methods[name]
        lines.append(
            f"| {label} | {coverage(m)} | {m['evaluate']['mean_set_size']:.2f} | {m['empty']} |"
        )
    high = c["coverage_bounds"][1]
    per_class = cls["images_per_class"]
    counts = (
        f"{min(per_class)}–{max(per_class)}"
        if min(per_class) != max(per_class)
        else f"{min(per_class)}"
    )
    mapie = d["mapie"]
    if mapie["max_abs_diff"] is None:
        agreement = "in `tests/test_calibrate.py`"
    else:
        exact = "exactly" if mapie["max_abs_diff"] == 0 else f"to {sci(mapie['max_abs_diff'])}"
        agreement = f"{exact}, here and in `tests/test_calibrate.py`"
    empty_conf = lac["max_confidence_empty_correct"]
    at_most = f" (confidence at most {empty_conf:.2f})" if empty_conf is not None else ""
    lines += [
        "",
        para(
            "The guarantee holds on average over calibration sets: with LAC, expected coverage",
            f"{c['expected_coverage']:.3f} here (between 1 − α and 1 − α + 1/(n + 1) =",
            f"{high:.3f}); one set of {n_val} validation images and {n_test} test images moves",
            f"the coverage by about ±{c['coverage_sd']:.2f} (one standard deviation). A model",
            f"that is right {pct(accuracy)} of the time can only come down to",
            f"{100 * (1 - alpha):.0f}% coverage by leaving sets empty: LAC leaves {lac['empty']}",
            f"of {n_test} empty, {lac['empty_correct']} of them for correct predictions{at_most};",
            f"at `--alpha {c['small_alpha']}` it covers {small['evaluate']['coverage']:.3f} with",
            f"{small['empty']} empty sets. `class` has {counts} images per class, far below",
            f"10/α = {c['min_images_per_class']}, and warns. APS without randomisation is never",
            "empty but over-covers on so accurate a model: for a correct prediction its score is",
            f"the top probability, so q̂ is the {100 * (1 - alpha):.0f}th percentile of the top",
            f"probabilities ({aps['quantiles'][0]:.3f}), and a set gathers classes until it holds",
            f"that much ({aps['evaluate']['mean_set_size']:.2f} classes on average). The LAC and",
            f"APS quantiles equal MAPIE {mapie['version']}'s (`lac`, and `aps` without its random",
            f"term with `include_last_label=True`) {agreement}.",
        ),
    ]
    return "\n".join(lines)


AUROC_COLUMNS = ("1 - confidence", "entropy", "mutual_info", "mean_std", "variation_ratio")


def render_auroc(f: dict) -> str:
    d = f["digits"]
    rows = (
        ("wrong vs right (test)", d["evaluate"]["auroc_error"]),
        ("OOD vs test", d["evaluate"]["ood"]["auroc"]),
        ("OOD vs test, after temperature", d["evaluate_temperature"]["ood"]["auroc"]),
    )
    lines = [
        "| AUROC by score | 1 − confidence | entropy | mutual info | mean std | variation ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(f"{values[k]:.3f}" for k in AUROC_COLUMNS) + " |")
    return "\n".join(lines)


def render_bitwise(f: dict) -> str:
    d = f["digits"]
    b = d["batch_size"]
    mean = b["mean"]
    ulps = round(mean["max_abs_diff"] / 2.0**-24)  # float32 spacing between 0.5 and 1
    ulp_text = "one float32 ulp" if ulps == 1 else f"{ulps} float32 ulps"
    identical = (
        f"identical for all {b['images']} images"
        if b["pred_identical"] == b["decision_identical"] == b["images"]
        else f"identical for {b['pred_identical']} and {b['decision_identical']} of "
        f"{b['images']} images"
    )
    return para(
        f"Measured on a {cpu_name(d['cpu'])} ({isa(d['cpu'])}), `-b {b['b']}` against",
        f"`-b {b['a']}` on `sample_data/digits/test`: {mean['differ']} of the",
        f"{mean['values']:,} `mean_*` values differ, by at most {sci(mean['max_abs_diff'])}",
        f"({ulp_text} between 0.5 and 1); `median_*` by at most",
        f"{sci(b['median']['max_abs_diff'])}, `std_*` {sci(b['std']['max_abs_diff'])},",
        f"`entropy` {sci(b['entropy']['max_abs_diff'])}; `pred` and `decision` are {identical}.",
    )


BENCH_BLOCKS = {
    "a_predict_loop": "(a)",
    "a2_classic_compiled": "(a2)",
    "b_tiled": "(b)",
    "b2_split_fp32": "(b2) fp32",
    "b2_split_bf16": "(b2) bf16",
    "d_bound_fp32": "(d) fp32",
    "d_bound_bf16": "(d) bf16",
    "c_end_to_end_fp32": "(c) fp32",
    "c_end_to_end_bf16": "(c) bf16",
    "rss_N": "the first peak-RSS run",
    "rss_4N": "the second peak-RSS run",
}


def render_performance(f: dict) -> str:
    r = f["bench_mc"]
    cfg, g, env = r["config"], r["gflop_per_image"], r["env"]
    cpu = env["cpu"]
    native = bool(cpu.get("bf16_native"))
    n, passes = cfg["images"], cfg["passes"]
    full, split = g["full_model_x_T"], g["prefix_once_tail_x_T"]
    shares = {k: v for k, v in r["cpu_share_used_by_other_processes"].items() if v is not None}
    worst = max(shares, key=shares.get) if shares else None

    def row(label: str, keys: tuple[str, ...], gflop: float) -> str:
        rates = [r[key]["images_per_second"] for key in keys]
        return (
            f"| {label} | {' / '.join(f'{x:.1f}' for x in rates)} | "
            f"{' / '.join(f'{x * gflop:.0f}' for x in rates)} |"
        )

    h, w, ch = cfg["image_size"]
    bf16 = "bf16" if native else "bf16 emulated"
    c16 = "bf16" if native else "`--precision bfloat16` (falls back to fp32)"
    if worst is not None and shares[worst] >= 0.05:
        load = (
            f"The machine was shared: other processes used up to {shares[worst]:.0%} of its CPU "
            f"during the timed blocks (during {BENCH_BLOCKS.get(worst, worst)}; 1-minute load "
            f"average {env['loadavg_at_start'][0]:.1f} at the start), so the figures are lower "
            "than on an idle machine."
        )
    else:
        load = "Nothing else was running."
    head = para(
        "`python benchmarks/bench_mc.py --json benchmarks/results/bench_mc.json` (about",
        f"{r['total_seconds'] / 60:.0f} minutes on {env['cpu_count']} cores here) writes {n}",
        f"JPEGs at {h}×{w}×{ch} and scores them with the reference CNN ({cfg['classes']}",
        f"classes, random weights), T = {passes}, batch {cfg['batch_size']}. Figures from one run",
        f"on a {cpu_name(cpu)} ({isa(cpu)}), TensorFlow {env['tensorflow']}, Keras",
        f"{env['keras']}. {load} The slow baselines (a), (a2), (b) use the first",
        f"{cfg['baseline_images']} images; their rate does not depend on N.",
    )
    table = [
        "| what | images/s | GFLOP/s |",
        "|---|---:|---:|",
        row(
            "(a) classic loop: `model.predict` T times, dropout forced on, preloaded arrays",
            ("a_predict_loop",),
            full,
        ),
        row(
            "(a2) classic loop at its best: compiled `model(x, training=True)` T times",
            ("a2_classic_compiled",),
            full,
        ),
        row(
            "(b) whole model tiled T times in one compiled function (`MCSampler(split=False)`)",
            ("b_tiled",),
            full,
        ),
        row(
            f"(b2) prefix once + tail tiled (`MCSampler`), preloaded arrays, fp32 / {bf16}",
            ("b2_split_fp32", "b2_split_bf16"),
            split,
        ),
        row(
            f"(c) `batchuq score` end to end, JPEG files → Parquet, fp32 / {c16}",
            ("c_end_to_end_fp32", "c_end_to_end_bf16"),
            split,
        ),
        row(
            "(d) compute bound: prefix once + tail at batch B·T with dropout as identity, "
            f"fp32 / {bf16}",
            ("d_bound_fp32", "d_bound_bf16"),
            split,
        ),
    ]
    c32 = r["c_end_to_end_fp32"]
    ratios = r["ratios"]
    steady = c32.get("images_per_second_minus_fixed")
    parts = [
        f"{split:.2f} GFLOP per image at T = {passes} with the prefix computed once",
        f"({g['prefix_per_image']:.3f} GFLOP prefix + {g['tail_per_pass']:.3f} per pass),",
        f"against {full:.2f} GFLOP for T full passes. Ratios:",
        f"**c/a = {ratios['c/a fp32 (vs model.predict loop)']:.1f}**",
        f"(c/a2 = {ratios['c/a2 fp32 (vs compiled loop)']:.1f}),",
        f"**c/d = {ratios['c/d fp32']:.2f}** (fp32). The fixed per-run cost of `batchuq score`",
        "(model load, tracing and compilation, measured as a 1-image call) is",
        f"{c32['fixed_seconds_1_image_call']:.2f} s fp32"
        + (f"; without it (c) fp32 runs at {steady:.1f} images/s." if steady else "."),
    ]
    if native:
        c16r, agree = r["c_end_to_end_bf16"], r["bf16_vs_fp32_agreement"]
        same = (
            "every image"
            if agree["pred_agreement"] == 1
            else f"{pct(agree['pred_agreement'])} of the images"
        )
        parts += [
            f"bf16 end to end is **{ratios['bf16/fp32 end to end (c)']:.2f}×** fp32 for this",
            f"{n}-image run; without the fixed cost ({c16r['fixed_seconds_1_image_call']:.2f} s",
            f"bf16) it is **{ratios['bf16/fp32 end to end minus fixed cost']:.2f}×**, the",
            f"sampler alone {ratios['bf16/fp32 sampler (b2)']:.2f}× and the compute bound",
            f"{ratios['bf16/fp32 compute bound (d)']:.2f}×. bf16 means agree with fp32 to",
            f"{agree['max_se_units']:.3f} Monte Carlo standard errors at most (median",
            f"{agree['median_se_units']:.3f}; same predicted class for {same}); fp32 stays the",
            "default all the same, because that agreement is measured on one model.",
        ]
    else:
        parts += [
            "This CPU has no native bfloat16 (no AVX512-BF16 or AMX): the bf16 figures of (b2)",
            "and (d) are bfloat16 emulated in software, and `batchuq score --precision bfloat16`",
            "(c) falls back to float32 with a warning, so none of them shows what bf16 gains on",
            "a CPU that has it.",
        ]
    rss = r.get("rss")
    if rss:
        small, large = rss["N"], rss["4N"]
        parts += [
            f"Peak RSS of a fresh `batchuq score` process (T = {small['passes']}, fp32, default",
            f"`--memory-budget` {memory_budget()}): {small['peak_rss_mib']:,.0f} MiB for",
            f"{small['images']:,} images, {large['peak_rss_mib']:,.0f} MiB for",
            f"{large['images']:,} (ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.3f};",
            f"about {round(small['peak_rss_before_scoring_mib'], -1):,.0f} MiB of it is",
            "TensorFlow after imports).",
        ]
    return "\n\n".join([head, "\n".join(table), para(*parts)])


def memory_budget() -> int:
    from batchuq.defaults import DEFAULT_MEMORY_BUDGET_MB

    return DEFAULT_MEMORY_BUDGET_MB


def render_memory_flat(f: dict) -> str:
    m = f["memory_flat"]
    runs = sorted(m["runs"], key=lambda run: run["images"])
    first, last = runs[0], runs[-1]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"] - 1
    times = last["images"] / first["images"]
    sizes = ", ".join(
        f"{run['peak_rss_mib']:,.0f} MiB for {run['images']:,} images" for run in runs
    )
    verdict = f"{growth:.0%} more for {times:.0f}× the images"
    if growth < 0.1 * (times - 1):
        verdict += ": memory does not grow in proportion to N"
    return para(
        f"`{m['command']}` measures peak RSS against the number of images (fresh process each,",
        f"bundled digits model, {cpu_name(m['cpu'])}): {sizes} — {verdict}.",
    )


def render_memory_tta(f: dict) -> str:
    m = f["memory_tta"]
    files, cal = f["digits"]["files"], f["digits"]["calibration"]
    h, w, ch = files["model_input"]

    def peaks(run: dict) -> tuple[str, float]:
        score = sorted(run["score"], key=lambda r: r["tta"])
        low, high = score[0], score[-1]
        ratio = high["peak_rss_mib"] / low["peak_rss_mib"]
        text = (
            f"{low['peak_rss_mib']:,.0f} MiB at K = {low['tta']} and "
            f"{high['peak_rss_mib']:,.0f} MiB at K = {high['tta']} (ratio {ratio:.2f})"
        )
        return text, run["calibrate"]["peak_rss_mib"]

    now_text, now_cal = peaks(m["current"])
    before = m["before_chunking"]
    before_text, before_cal = peaks(before)
    rows = m["batch_size"] * max(r["tta"] for r in before["score"])
    return para(
        f"`{m['command']}` does the same against the number of TTA copies K, with fresh",
        "processes of `batchuq score sample_data/digits/test out.parquet --tta K --passes 1`",
        f"(bundled digits model, {h}×{w}×{ch}, `--batch-size` {m['batch_size']}, default",
        f"`--memory-budget` {m['memory_budget_mb']}). Peak RSS: {now_text};",
        "`batchuq calibrate sample_data/digits/val -o cal.json`, whose thresholds use",
        f"{cal['threshold_predictor']['tta']} copies per image, {now_cal:,.0f} MiB. Before the",
        f"copies were chunked (commit {before['commit'][:7]}, measured by the same script from",
        f"`git archive`), a batch went through the model as {rows:,} rows: {before_text};",
        f"`calibrate` {before_cal:,.0f} MiB. Measured on a {cpu_name(m['cpu'])}",
        f"({isa(m['cpu'])}).",
    )


def render_methods(f: dict) -> str:
    m = f.get("methods")
    if not m:
        return "Not measured yet: run `python benchmarks/bench_methods.py`."
    rows = m["rows"]
    lines = [
        para(
            f"On a {cpu_name(m['cpu'])} ({isa(m['cpu'])}), `python benchmarks/bench_methods.py`",
            f"({m['date']}) scored `sample_data/digits/test` ({rows['deterministic']['images']}",
            "images) and `sample_data/ood` with each bundled model; images/s is the test set's",
            "end-to-end `score` wall time after a warm-up run:",
        ),
        "",
        "| method | samples per image | accuracy | NLL | ECE | AURC | OOD AUROC (entropy) "
        "| images/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("deterministic", "deterministic (one pass)"),
        ("mc_dropout_t100", "MC dropout, T = 100"),
        ("ensemble", f"deep ensemble, M = {m['members']}"),
        ("ensemble_t20", f"deep ensemble, M = {m['members']}, T = 20"),
        ("sngp_mean_field", "SNGP mean-field"),
        ("sngp_t100", "SNGP, T = 100 head samples"),
    ):
        r = rows[name]
        lines.append(
            f"| {label} | {r['samples_per_image']} | {pct(r['accuracy'])} | {r['nll']:.4f} | "
            f"{r['ece']:.4f} | {sci(r['aurc'])} | {r['ood_auroc_entropy']:.4f} | "
            f"{r['images_per_second']:.1f} |"
        )
    one = rows["one_member"]
    shown = {
        "deterministic": "the deterministic pass",
        "mc_dropout_t100": "MC dropout",
        "ensemble": "the ensemble",
        "ensemble_t20": "the ensemble with T = 20",
        "sngp_mean_field": "SNGP mean-field",
        "sngp_t100": "SNGP with T = 100",
    }

    def best(key: str, high: bool = False) -> str:
        pick = (max if high else min)(shown, key=lambda name: rows[name][key])
        return shown[pick]

    lines += [
        "",
        para(
            f"Best NLL: {best('nll')}; best ECE: {best('ece')}; best AURC: {best('aurc')};",
            f"best OOD AUROC: {best('ood_auroc_entropy', high=True)}.",
        ),
        "",
        para(
            f"SNGP's {rows['sngp_t100']['passes']} posterior samples of the head took",
            f"{m['sngp_t100_over_t1']}× the wall time of mean-field (the network runs once per",
            "image either way).",
            f"The {m['members']}-member ensemble took {m['ensemble_over_one_member']}× the wall",
            f"time of one member alone ({one['images_per_second']:.1f} images/s), against",
            f"{m['members']}× if nothing were shared: each batch is decoded once for all members.",
            f"The bundled ensemble and SNGP model add {m['package_data_added_bytes'] / 1e6:.1f} MB",
            f"to the package (`batchuq/data/` holds {m['package_data_bytes'] / 1e6:.1f} MB).",
        ),
    ]
    return "\n".join(lines)


def render_adaptive(f: dict) -> str:
    a = f.get("adaptive")
    if not a:
        return "Not measured yet: run `python benchmarks/bench_adaptive.py`."
    rows = [
        ("bundled digits test set, median rule", a["digits"]),
        ("bundled digits test set, confidence rule", a["digits_confidence"]),
        ("reference CNN 128×128×3, trained, median rule", a["reference"]),
    ]
    lines = [
        para(
            f"On a {cpu_name(a['cpu'])} ({isa(a['cpu'])}), `{a['generated_by']}` ({a['date']})",
            "ran fixed `--passes 100` and `--passes auto` (10 to 100 passes, alpha 0.01) in one",
            "process, each after a warm-up call, keeping each mode's best end-to-end wall time",
            "(files to Parquet):",
        ),
        "",
        "| images | T = 100 images/s | auto images/s | speed-up | mean passes | at 10 passes "
        "| at 100 passes | same decisions | most passes (image) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in rows:
        worst = r["worst"]
        lines.append(
            f"| {label} ({r['images']}) | {r['fixed_images_per_second']:.1f} | "
            f"{r['auto_images_per_second']:.1f} | {r['speedup']:.2f}× | {r['mean_passes']:.1f} | "
            f"{pct(r['share_at_min_passes'])} | {pct(r['share_at_max_passes'])} | "
            f"{r['same_decisions']} of {r['images']} ({pct(r['same_decisions_share'])}) | "
            f"{worst['passes']} (`{worst['path']}`) |"
        )
    d, ref = a["digits"], a["reference"]
    lines += [
        "",
        para(
            "The first call of each mode in a process also compiles its shapes: on the digits",
            f"{d['cold_seconds']['fixed']:.1f} s for T = 100 and {d['cold_seconds']['auto']:.1f}",
            "s for auto, which compiles one shape per padded row count. The confidence rule's",
            "empirical-Bernstein test settles far later than the median rule's order-statistic",
            "test, as docs/methods.md says. The trained reference CNN finds the brightened",
            f"band of 5 with accuracy {pct(ref['accuracy_fixed'])} (T = 100) and",
            f"{pct(ref['accuracy_auto'])} (auto).",
        ),
    ]
    if a.get("memory"):
        runs = a["memory"]
        lines += [
            "",
            para(
                "Memory stays flat with `--passes auto`: peak RSS",
                " and ".join(
                    f"{r['peak_rss_mib']} MiB on {r['images']:,} images ({r['seconds']:.0f} s)"
                    for r in runs
                )
                + ".",
            ),
        ]
    return "\n".join(lines)


def _series_cell(series: list[dict], name: str, severity: int, key: str) -> str:
    for row in series:
        if row["name"] == name and row["severity"] == severity and row.get(key) is not None:
            return pct(row[key]) if key == "accuracy" else f"{row[key]:.4f}"
    return "n/a"


def render_compare_methods(f: dict) -> str:
    m = f.get("compare_methods")
    if not m:
        return "Not measured yet: run `python benchmarks/compare_methods.py`."
    rows, series = m["clean"]["rows"], m["series"]
    n, shown = rows[0]["n"], [s for s in (3, 5) if s in m["severities"]]
    lines = [
        para(
            f"On a {cpu_name(m['cpu'])} ({isa(m['cpu'])}), `python benchmarks/compare_methods.py`",
            f"({m['date']}, {m['seconds'] / 60:.0f} min) scored the {n} test digits, their",
            f"shift series ({len(m['corruptions'])} corruptions at severities",
            f"{', '.join(map(str, m['severities']))}) and `sample_data/ood` with every method.",
            "In distribution, with the OOD AUROC of entropy and the clean run's end-to-end",
            "images/s (model loading included):",
        ),
        "",
        "| method | samples per image | accuracy | NLL | ECE | AURC | OOD AUROC | images/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ips = "n/a" if r.get("images_per_second") is None else f"{r['images_per_second']:.1f}"
        lines.append(
            f"| {r['name']} | {r['samples_per_image']} | {pct(r['accuracy'])} | {r['nll']:.4f} | "
            f"{r['ece']:.4f} | {sci(r['aurc'])} | {r['ood_auroc']:.4f} | {ips} |"
        )
    head = " | ".join(f"accuracy sev. {s} | ECE sev. {s}" for s in shown)
    lines += [
        "",
        "Under shift, the mean over the corruptions:",
        "",
        f"| method | {head} |",
        "|---|" + "---:|" * (2 * len(shown)),
    ]
    for r in rows:
        cells = " | ".join(
            f"{_series_cell(series, r['name'], s, 'accuracy')} | "
            f"{_series_cell(series, r['name'], s, 'ece')}"
            for s in shown
        )
        lines.append(f"| {r['name']} | {cells} |")
    worst = max(shown)

    def best(key: str, high: bool = False, severity: int | None = None) -> str:
        if severity is None:
            values = {r["name"]: r[key] for r in rows if r.get(key) is not None}
        else:
            values = {
                s["name"]: s[key]
                for s in series
                if s["severity"] == severity and s.get(key) is not None
            }
        return (max if high else min)(values, key=values.get)

    lines += [
        "",
        para(
            f"Best in distribution: NLL {best('nll')}, ECE {best('ece')}, AURC {best('aurc')};",
            f"best OOD AUROC: {best('ood_auroc', high=True)}; at severity {worst}: accuracy",
            f"{best('accuracy', high=True, severity=worst)}, ECE {best('ece', severity=worst)}.",
        ),
    ]
    return "\n".join(lines)


def render_scaleout(f: dict) -> str:
    m = f.get("scaleout")
    if not m:
        return "Not measured yet: run `python benchmarks/project_scaleout.py`."
    ref, dig = m["workloads"]["reference"], m["workloads"]["digits"]
    local, listing, comp = m["local_discovery"], m["s3_listing"], m["compaction"]
    proj = m["projection"]
    lines = [
        para(
            f"On a {cpu_name(m['cpu'])} ({isa(m['cpu'])}), `python benchmarks/project_scaleout.py`",
            f"({m['date']}, {m['seconds'] / 60:.0f} min; 1-minute load average",
            f"{m['loadavg_at_start'][0]:.1f} at the start: the machine was shared) measured:",
        ),
        "",
        para(
            "* one worker, the local engine in a process pinned to one core, after a warm-up",
            f"run: {ref['images_per_second']:.2f} images/s for the reference CNN on",
            f"{ref['images']} JPEGs of {'×'.join(map(str, ref['image_size']))}",
            f"(T = {ref['passes']}, {ref['bytes_per_image'] / 1e3:.1f} kB per file), and",
            f"{dig['images_per_second']:.1f} images/s for the bundled digits model on the",
            f"{dig['images']} test digits (T = {dig['passes']},",
            f"{dig['bytes_per_image'] / 1e3:.2f} kB per PNG);",
        ),
        para(
            f"* the driver, per image: {local['us_per_image']:.1f} µs to discover a local folder",
            f"of {local['images']:,} files in 10 class folders; {listing['us_per_image']:.1f} µs",
            f"to list {listing['images']:,} objects from a moto S3 server on the same machine (a",
            "Python server on the same cores, not S3); and",
            f"{comp['us_per_row']:.2f} µs per row to compact {comp['parts']} Parquet parts of",
            f"{comp['rows_per_part']:,} score rows (10 classes) into one file with",
            f"{comp['compactor']} ({comp['bytes_per_row']:.0f} bytes per row written).",
        ),
        "",
        para(
            "The projection: discovery runs on the driver before the workers start and",
            "compaction after they finish, so with N workers of r1 images/s each a run takes",
            "d + 1 / (N r1) seconds per image, d being the driver's serial work per image",
            "(discovery + compaction). Images in S3 are also capped at",
            f"{m['config']['store_gets_per_second']:,.0f} images/s, the GET requests per second",
            "AWS documents for one prefix (one GET per image; not measured here). The bottleneck",
            "is the largest term. On a shared filesystem",
            f"d = {m['driver_us_per_image']['shared_fs']:.1f} µs; in S3 as listed from moto here,",
            f"d = {m['driver_us_per_image']['s3_moto']:.1f} µs:",
        ),
    ]
    for name, label in (("reference", "Reference CNN"), ("digits", "Bundled digits model")):
        lines += [
            "",
            f"| {label}: workers | shared filesystem, images/s | speed-up | bottleneck "
            "| S3 (moto listing), images/s | speed-up | bottleneck |",
            "|---:|---:|---:|---|---:|---:|---|",
        ]
        cases = proj[name]
        for fs_row, s3_row in zip(cases["shared_fs"], cases["s3_moto"], strict=True):
            lines.append(
                f"| {fs_row['workers']} | {fs_row['images_per_second']:,.1f} | "
                f"{fs_row['speedup']:.1f} | {fs_row['bottleneck']} | "
                f"{s3_row['images_per_second']:,.1f} | {s3_row['speedup']:.1f} | "
                f"{s3_row['bottleneck']} |"
            )
    last_r, last_d = proj["reference"]["s3_assumed"][-1], proj["digits"]["s3_assumed"][-1]
    lines += [
        "",
        para(
            "moto is a Python server on the same two cores, so its listing is no measure of S3's.",
            "S3 returns at most 1,000 keys per listing request; at an assumed",
            f"{m['config']['assumed_list_ms']:.0f} ms per request (not measured) the listing",
            f"costs {m['config']['assumed_list_ms']:.0f} µs per image, and at",
            f"{last_r['workers']} workers the driver's serial work would be",
            f"{last_r['driver_share']:.0%} of the reference CNN's run (speed-up",
            f"{last_r['speedup']:.0f}, bottleneck: {last_r['bottleneck']}) and",
            f"{last_d['driver_share']:.0%} of the digits model's (speed-up",
            f"{last_d['speedup']:.0f}, bottleneck: {last_d['bottleneck']}).",
        ),
    ]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[dict], str]] = {
    "setup": render_setup,
    "calibration": render_calibration,
    "conformal": render_conformal,
    "auroc": render_auroc,
    "sample-data": render_sample_data,
    "sample-accuracy": render_sample_accuracy,
    "bitwise": render_bitwise,
    "performance": render_performance,
    "memory-flat": render_memory_flat,
    "memory-tta": render_memory_tta,
    "methods": render_methods,
    "compare-methods": render_compare_methods,
    "adaptive": render_adaptive,
    "scaleout": render_scaleout,
}


def record(key: str, result: dict, results_json: Path) -> None:
    """Keep a benchmark's ``result``: as ``results_json``, as ``key`` of the figures JSON, and
    in the README blocks rendered from it."""
    results_json.parent.mkdir(exist_ok=True)
    results_json.write_text(json.dumps(result, indent=2) + "\n")
    figures = json.loads(FIGURES_JSON.read_text())
    figures[key] = result
    FIGURES_JSON.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    README.write_text(rewrite(README.read_text(encoding="utf-8"), figures), encoding="utf-8")


def readme_blocks(text: str) -> dict[str, str]:
    """The README's generated blocks, name -> body (without the blank lines inside the markers)."""
    blocks: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        name = match["name"]
        if name in blocks:
            raise ValueError(f"README: block {name!r} appears twice")
        blocks[name] = match["body"].strip("\n")
    return blocks


def outside_blocks(text: str) -> str:
    return BLOCK.sub("", text)


def rewrite(text: str, figures: dict) -> str:
    """``text`` with every block's body replaced by its rendering (nothing else changes)."""
    found = readme_blocks(text)
    unknown = set(found) - set(BLOCKS)
    missing = set(BLOCKS) - set(found)
    if unknown or missing:
        raise ValueError(f"README blocks: unknown {sorted(unknown)}, missing {sorted(missing)}")

    def replace(match: re.Match) -> str:
        head, tail = match.group(0).split("\n", 1)[0], f"<!-- /figures:{match['name']} -->"
        return f"{head}\n\n{BLOCKS[match['name']](figures)}\n\n{tail}"

    return BLOCK.sub(replace, text)


def drift(text: str, figures: dict) -> list[str]:
    found = readme_blocks(text)
    return [name for name, render in BLOCKS.items() if found.get(name) != render(figures)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", action="store_true", help="run bench_mc.py first")
    parser.add_argument(
        "--memory", action="store_true", help="measure the memory_flat and memory_tta figures"
    )
    parser.add_argument(
        "--from-json", action="store_true", help=f"render from {FIGURES_JSON.name}, compute nothing"
    )
    parser.add_argument("--write-readme", action="store_true", help="rewrite the README blocks")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README differs")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.from_json:
        figures = json.loads(FIGURES_JSON.read_text())
    else:
        if args.bench:
            run_bench()
        if args.memory:
            measure_memory_flat()
            measure_memory_tta()
        for path in (BENCH_JSON, MEMORY_FLAT_JSON, MEMORY_TTA_JSON):
            if not path.exists():
                parser.error(f"{path.relative_to(REPO)} is missing: run with --bench / --memory")
        print("bundled digits: the README's commands", flush=True)
        figures = {
            "generated_by": shlex.join(
                [
                    "python",
                    "benchmarks/readme_figures.py",
                    *(sys.argv[1:] if argv is None else argv),
                ]
            ),
            "date": now(),
            "versions": versions(),
            "cpu": cpu_info(),
            "digits": digits_figures(),
            "bench_mc": read_json(BENCH_JSON),
            "memory_flat": read_json(MEMORY_FLAT_JSON),
            "memory_tta": read_json(MEMORY_TTA_JSON),
        }
        figures["seconds"] = round(time.perf_counter() - started, 1)
        # Written first: a block that cannot render is fixed and re-rendered with --from-json.
        FIGURES_JSON.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
        print(f"figures -> {FIGURES_JSON.relative_to(REPO)} ({figures['seconds']:.0f} s)")

    text = README.read_text(encoding="utf-8")
    if args.write_readme:
        new = rewrite(text, figures)
        if new != text:
            README.write_text(new, encoding="utf-8")
        print(f"README.md: {len(drift(text, figures))} block(s) rewritten")
        return 0
    stale = drift(text, figures)
    print("README.md blocks up to date" if not stale else f"README.md blocks differ: {stale}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
