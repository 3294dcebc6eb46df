"""The usage errors of docs/exit-codes.md, each a ``batchuq`` command line that makes
it, for ``tests/test_usage_errors.py`` and ``benchmarks/usage_errors.py``.

``make_cases(work)`` builds what the cases need in ``work`` (small models, folders, a calibration
file) and returns them: ``name -> Case``. Every one must exit with its code before TensorFlow is
imported. ``DRIVER`` runs a command line in a fresh interpreter the way the console script does
and prints, as JSON, the exit code and whether TensorFlow or Keras were imported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "sample_data" / "digits" / "test"
BUNDLED = REPO / "batchuq" / "data" / "digits_cnn.keras"
SNGP = REPO / "batchuq" / "data" / "digits_sngp.keras"

DRIVER = """
import json, sys
import click
from batchuq.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="batchuq", standalone_mode=False)
    code = 0
except click.ClickException as exc:
    exc.show()
    code = exc.exit_code
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules}))
"""


@dataclass(frozen=True)
class Case:
    """One usage error: the command line, its exit code and a part of its message."""

    args: list[str]
    code: int
    message: str


def run_case(case: Case, cwd: Path) -> tuple[dict, str]:
    """Run ``case`` in a fresh interpreter: ``({"code", "tensorflow", "keras"}, stderr)``."""
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *case.args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_clean_env(), "PYTHONPATH": str(REPO)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("BATCHUQ_")}


def _save_models(work: Path) -> dict[str, Path]:
    """Small models for the model errors (imports Keras: call from the test or benchmark)."""
    import keras

    def image() -> keras.KerasTensor:
        return keras.Input((8, 8, 1))

    models = {}
    inputs = image()
    x = keras.layers.Lambda(lambda t: t * 2)(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x))
    models["lambda"] = keras.Model(inputs, outputs)
    inputs = image()
    x = keras.layers.Dropout(0.2)(keras.layers.Flatten()(inputs))
    a = keras.layers.Dense(10, activation="softmax")(x)
    b = keras.layers.Dense(10, activation="softmax")(x)
    models["two_outputs"] = keras.Model(inputs, [a, b])
    inputs = keras.Input((10,))
    x = keras.layers.Dropout(0.2)(inputs)
    models["vector_input"] = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    inputs = image()
    x = keras.layers.Flatten()(inputs)
    models["no_dropout"] = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    inputs = image()
    x = keras.layers.Dropout(0.2)(keras.layers.Flatten()(inputs))
    models["five"] = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))
    paths = {}
    for name, model in models.items():
        paths[name] = work / f"{name}.keras"
        model.save(paths[name])
    return paths


def _calibration(work: Path, model: Path, **predictor) -> Path:
    """A calibration file for ``model`` fitted (as it says) on the default score predictor."""
    from batchuq.model_files import file_sha256
    from batchuq.postprocess.calibration_file import Calibration

    fitted = {
        "method": "mc_dropout",
        "passes": 100,
        "tta": 1,
        "augmentation": None,
        "rescale": 1 / 255,
        "precision": "float32",
        "sampled_layers": ["dropout1", "dropout2", "dropout3"],
        "logits": False,
        "exif_transpose": False,
        **predictor,
    }
    calibration = Calibration(
        class_names=[f"n{i}" for i in range(10)],
        thresholds=[0.5] * 10,
        temperature=1.0,
        conformal_quantiles=[0.5],
        model_sha256=file_sha256(model),
        conformal_method="lac",
        predictor=fitted,
    )
    return calibration.to_json(work / f"calibration-{len(predictor)}.json")


def _scored_runs(work: Path) -> dict[str, Path]:
    """Small runs written by ``score_directory`` for the monitor and queue cases (imports
    TensorFlow: call from the test or benchmark): a history of one night and a run of the SNGP
    model (another model, another method)."""
    from batchuq import ScoreOptions, score_directory

    images = work / "night" / "n0"
    images.mkdir(parents=True)
    for image in sorted(DIGITS.glob("n0/*"))[:2]:
        shutil.copy(image, images / image.name)
    options = ScoreOptions(model=BUNDLED, passes=2)
    score_directory(work / "night", work / "nights", options, partition="date=2026-12-01")
    score_directory(work / "night", work / "sngp.parquet", ScoreOptions(model=SNGP, passes=1))
    (work / "nights" / "date=2026-12-02").mkdir()  # an empty night
    return {"tonight": work / "nights" / "date=2026-12-01", "sngp": work / "sngp.parquet"}


def _monitor_and_queue_cases(runs: dict[str, Path]) -> dict[str, Case]:
    """The usage errors of ``monitor`` and ``queue`` (and their empty nights, exit 4)."""
    tonight, sngp = str(runs["tonight"]), str(runs["sngp"])
    return {
        "monitor: missing TONIGHT": Case(
            ["monitor", "nights/date=2026-11-30", "-r", "nights"], 2, "Tonight's run does not"
        ),
        "monitor: missing reference": Case(
            ["monitor", tonight, "-r", "gone.parquet"], 2, "'gone.parquet' does not exist"
        ),
        "monitor: reference from another model": Case(
            ["monitor", tonight, "-r", sngp], 2, "model_sha256: "
        ),
        "monitor: history with no night before tonight": Case(
            ["monitor", tonight, "-r", "nights", "--last", "3"], 2, "no night before tonight's"
        ),
        "monitor: TONIGHT not a score output": Case(
            ["monitor", "notes.txt", "-r", tonight], 2, "Cannot read it as a `batchuq score`"
        ),
        "monitor: --last without a history folder": Case(
            ["monitor", tonight, "-r", sngp, "--last", "3"], 2, "no --reference is one"
        ),
        "monitor: --last 0": Case(["monitor", tonight, "-r", "nights", "--last", "0"], 2, "--last"),
        "monitor: empty night": Case(
            ["monitor", "nights/date=2026-12-02", "-r", "nights"], 4, "holds no rows"
        ),
        "monitor: missing TONIGHT with --missing-ok": Case(
            ["monitor", "nights/date=2026-11-30", "-r", sngp, "--missing-ok"], 4, "does not exist"
        ),
        "queue: output folder missing": Case(
            ["queue", tonight, "-o", "no/such/tasks.json"], 2, "no/such"
        ),
        "queue: -o not .json": Case(["queue", tonight, "-o", "tasks.txt"], 2, ".json"),
        "queue: --night not KEY=VALUE": Case(
            ["queue", tonight, "-o", "tasks.json", "--night", "monday"], 2, "KEY=VALUE"
        ),
        "queue: TONIGHT not a score output": Case(
            ["queue", "notes.txt", "-o", "tasks.json"], 2, "Cannot read it as a Parquet file"
        ),
        "queue: empty night": Case(
            ["queue", "nights/date=2026-12-02", "-o", "tasks.json"], 4, "no rows"
        ),
    }


def make_cases(work: Path) -> dict[str, Case]:
    """Build the inputs in ``work`` and return every usage error case (run them in ``work``)."""
    models = _save_models(work)
    empty = work / "empty"
    empty.mkdir()
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = work / "splits" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(next(DIGITS.glob("n0/*")), folder / "x.png")
    (work / "exists.parquet").write_bytes(b"")
    (work / "bad.toml").write_text("[score]\npasses = 'many'\n")
    (work / "labels.txt").write_text("Label, Latin Name, Common Name\nm0, x, howler\n")
    (work / "notes.txt").write_text("not a model")
    (work / "notcal.json").write_text("{}")
    (work / "history" / "date=2026-12-01").mkdir(parents=True)
    (work / "history" / "date=2026-12-01" / "notes.parquet").write_bytes(b"")
    calibration = _calibration(work, BUNDLED)
    other = _calibration(work, models["five"], passes=50)
    stopping = {"rule": "median", "min_median": 0.5}
    adaptive = {"min_passes": 10, "max_passes": 100, "alpha": 0.01, "stopping": stopping}
    auto = _calibration(work, BUNDLED, passes="auto", adaptive=adaptive)
    digits, out = str(DIGITS), "out.parquet"
    cases = {
        "bad option value": Case(["score", digits, out, "--passes", "0"], 2, "--passes"),
        "bad config file": Case(["score", digits, out, "--config", "bad.toml"], 2, "passes"),
        "missing images folder": Case(["score", "nowhere", out], 2, "nowhere"),
        "folder of dataset splits": Case(["score", "splits", out], 2, "dataset splits"),
        "OUTPUT not .parquet": Case(["score", digits, "out.csv"], 2, ".parquet"),
        "output folder missing": Case(["score", digits, "no/such/out.parquet"], 2, "no/such"),
        "OUTPUT given as a URL": Case(["score", digits, "s3://b/out.parquet"], 2, "s3://"),
        "existing OUTPUT with --no-clobber": Case(
            ["score", digits, "exists.parquet", "--no-clobber"], 2, "--no-clobber"
        ),
        "model file missing": Case(["score", digits, out, "-m", "gone.keras"], 2, "gone.keras"),
        "model not a Keras file": Case(["score", digits, out, "-m", "notes.txt"], 2, ".keras"),
        "model with a Lambda layer": Case(
            ["score", digits, out, "-m", str(models["lambda"])], 2, "Lambda"
        ),
        "model with two outputs": Case(
            ["score", digits, out, "-m", str(models["two_outputs"])], 2, "2 outputs"
        ),
        "model input not an image": Case(
            ["score", digits, out, "-m", str(models["vector_input"])], 2, "input_shape"
        ),
        "model without dropout, --passes 100": Case(
            ["score", digits, out, "-m", str(models["no_dropout"])], 2, "no dropout layer"
        ),
        "--passes auto with an SNGP model": Case(
            ["score", digits, out, "-m", str(SNGP), "--passes", "auto"], 2, "passes auto"
        ),
        "--class-names count != outputs": Case(
            ["score", digits, out, "--class-names", "a,b"], 2, "10 outputs but 2 class names"
        ),
        "5 outputs, 10 class folders": Case(
            ["score", digits, out, "-m", str(models["five"])], 2, "5 outputs"
        ),
        "labels file naming no folder": Case(
            ["score", digits, out, "--labels", "labels.txt"], 2, "names none of the class"
        ),
        "--rule threshold without --calibration": Case(
            ["score", digits, out, "--rule", "threshold"], 2, "--calibration"
        ),
        "--temperature without --calibration": Case(
            ["score", digits, out, "--temperature"], 2, "--calibration"
        ),
        "--rule risk without --calibration": Case(
            ["score", digits, out, "--rule", "risk"], 2, "--target-risk"
        ),
        "--rule risk, calibration without --target-risk": Case(
            ["score", digits, out, "--rule", "risk", "--calibration", str(calibration)],
            2,
            "selective=None",
        ),
        "--rule risk with --temperature": Case(
            [
                "score",
                digits,
                out,
                "--rule",
                "risk",
                "--calibration",
                str(calibration),
                "--temperature",
            ],
            2,
            "Drop --temperature",
        ),
        "unreadable calibration file": Case(
            ["score", digits, out, "--calibration", "notcal.json"], 2, "calibration"
        ),
        "calibration for another model": Case(
            ["score", digits, out, "--calibration", str(other)], 2, "another model"
        ),
        "calibration of another predictor": Case(
            ["score", digits, out, "--calibration", str(calibration), "--passes", "50"],
            2,
            "passes (score --passes, calibrate --score-passes): 100 in the calibration, 50",
        ),
        "--passes auto, calibration for fixed passes": Case(
            ["score", digits, out, "--calibration", str(calibration), "--passes", "auto"],
            2,
            "fitted with `batchuq calibrate --score-passes auto`",
        ),
        "--passes auto, calibration of another stopping rule": Case(
            [
                "score",
                digits,
                out,
                "--calibration",
                str(auto),
                "--passes",
                "auto",
                "--rule",
                "confidence",
            ],
            2,
            "adaptive.stopping (score --rule, --min-median, --min-confidence, --temperature; "
            'calibrate --score-rule): {"min_median": 0.5, "rule": "median"} in the calibration',
        ),
        "--rule threshold --temperature, no tempered thresholds": Case(
            [
                "score",
                digits,
                out,
                "--calibration",
                str(calibration),
                "--rule",
                "threshold",
                "--temperature",
            ],
            2,
            "tempered_thresholds=None",
        ),
        "empty images folder": Case(["score", "empty", out], 4, "No images"),
        "missing folder with --missing-ok": Case(
            ["score", "nowhere", out, "--missing-ok"], 4, "--missing-ok"
        ),
        "--partition not KEY=VALUE": Case(
            ["score", digits, "history/", "--partition", "2026-12-01"], 2, "KEY=VALUE"
        ),
        "--partition key is an output column": Case(
            ["score", digits, "history/", "--partition", "pred=a"], 2, "column of batchuq"
        ),
        "--partition value not a folder name": Case(
            ["score", digits, "history/", "--partition", "date=../x"], 2, "names a folder"
        ),
        "--partition folder holding other files": Case(
            ["score", digits, "history/", "--partition", "date=2026-12-01"], 2, "notes.parquet"
        ),
        "--partition with OUTPUT a .parquet": Case(
            ["score", digits, out, "--partition", "date=2026-12-01"], 2, "history folder"
        ),
        "--partition with --engine ray": Case(
            ["score", digits, "history/", "--partition", "date=1", "--engine", "ray"],
            2,
            "local engine only",
        ),
        "calibrate: --class-names count": Case(
            ["calibrate", digits, "-o", "c.json", "--class-names", "a,b"], 2, "2 class names"
        ),
        "calibrate: 5 outputs, 10 folders": Case(
            ["calibrate", digits, "-o", "c.json", "-m", str(models["five"])], 2, "5 outputs"
        ),
        "calibrate: --score-passes auto with an SNGP model": Case(
            ["calibrate", digits, "-o", "c.json", "-m", str(SNGP), "--score-passes", "auto"],
            2,
            "passes auto",
        ),
        "calibrate: --score-passes auto, --score-rule threshold": Case(
            [
                "calibrate",
                digits,
                "-o",
                "c.json",
                "--score-passes",
                "auto",
                "--score-rule",
                "threshold",
            ],
            2,
            "Received: score_passes='auto', score_rule='threshold'",
        ),
    }
    cases.update(_monitor_and_queue_cases(_scored_runs(work)))
    if importlib.util.find_spec("ray") is None:  # else tests/test_cli_checks.py fakes it
        cases["--engine ray without Ray"] = Case(
            ["score", digits, out, "--engine", "ray"], 2, "needs Ray"
        )
    return cases
