"""End to end: folder in, Parquet out, through the library API and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import (
    REPO,
    assert_frames_bitwise_equal,
    assert_frames_equal_to_rounding,
    assert_integer_columns_stay_integers,
    assert_parquet_bitwise_equal,
    bn_dropout_model,
    write_image,
)

from batchuq import score_directory
from batchuq.cli import cli
from batchuq.cli.runtime import EXIT_IMAGE_ERRORS, EXIT_OK, EXIT_USAGE
from batchuq.discover import NoImagesFoundError
from batchuq.jobs.score import ScoreOptions
from batchuq.output.schema import read_metadata

BASE_COLUMNS = [
    "path",
    "label",
    "label_index",
    "pred",
    "pred_index",
    "decision",
    "confidence",
    "margin",
    "entropy",
    "mutual_info",
    "variation_ratio",
    "status",
    "passes",
]


def _run(*args: str) -> object:
    return CliRunner().invoke(cli, [*args, "--no-progress"], catch_exceptions=False)


def test_scores_labelled_folder_with_all_columns(digits_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    report = score_directory(digits_subset, out, ScoreOptions(passes=20, tta=2, seed=1))
    frame = pd.read_parquet(out)
    classes = [f"n{i}" for i in range(10)]
    per_class = [f"{s}_{c}" for s in ("mean", "median", "std") for c in classes]
    # The bundled model ends in a softmax Dense layer: its logits give the two OOD columns.
    assert list(frame.columns) == BASE_COLUMNS + ["max_logit", "energy"] + per_class
    assert len(frame) == 30 == report.images
    assert (frame.status == "ok").all() and report.errors == 0
    assert (frame.passes == 20).all()
    assert frame.label.tolist() == [f"n{i}" for i in range(10) for _ in range(3)]
    assert frame.label_index.tolist() == [i for i in range(10) for _ in range(3)]
    assert (frame.filter(like="std_").max(axis=1) > 0).mean() > 0.9
    np.testing.assert_allclose(frame.filter(like="mean_").sum(axis=1), 1.0, atol=1e-4)
    assert (frame.pred == frame.label).mean() >= 0.8
    assert set(frame.decision) <= set(classes) | {"unclassified"}
    assert report.unclassified == int((frame.decision == "unclassified").sum())
    meta = read_metadata(out)
    assert meta["passes"] == 20 and meta["tta"] == 2 and meta["seed"] == 1
    assert meta["class_names"] == classes and len(meta["model_sha256"]) == 64
    assert meta["decision_rule"] == {"rule": "median", "min_median": 0.5}
    assert meta["augmentation"]["copies"] == 2


def _contents(path: Path) -> tuple[pd.DataFrame, dict]:
    meta = read_metadata(path)
    meta.pop("created")
    meta.pop("run")  # wall time and images/s of that run
    return pd.read_parquet(path), meta


@pytest.mark.numerics
def test_rerun_is_bitwise_identical_and_batch_size_changes_only_rounding(
    digits_subset: Path, tmp_path: Path
) -> None:
    a, again, cli_run = tmp_path / "a.parquet", tmp_path / "again.parquet", tmp_path / "cli.parquet"
    b, c = tmp_path / "b.parquet", tmp_path / "c.parquet"
    score_directory(digits_subset, a, ScoreOptions(passes=10, tta=3, seed=7, batch_size=8))
    score_directory(digits_subset, again, ScoreOptions(passes=10, tta=3, seed=7, batch_size=8))
    score_directory(digits_subset, b, ScoreOptions(passes=10, tta=3, seed=7, batch_size=5))
    score_directory(digits_subset, c, ScoreOptions(passes=10, tta=3, seed=8, batch_size=8))
    # The same settings, seed and batch size: the same computation, so the same bits, in this
    # process and in a fresh one (as the next night's cron run would be).
    assert_parquet_bitwise_equal(a, again)
    assert _contents(a)[1] == _contents(again)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUQ_")}
    done = subprocess.run(
        [sys.executable, "-m", "batchuq", "score", str(digits_subset), str(cli_run), "-T", "10",
         "--tta", "3", "--seed", "7", "--batch-size", "8", "--no-progress"],
        env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path, capture_output=True, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_parquet_bitwise_equal(a, cli_run)
    # Another batch size puts images at other batch positions: the same random draws, but
    # probabilities equal only to float32 rounding; pred and decision exactly equal.
    frame_a, meta_a = _contents(a)
    frame_b, meta_b = _contents(b)
    assert_frames_equal_to_rounding(frame_a, frame_b)
    assert meta_a == meta_b
    frame_c, _ = _contents(c)
    assert not np.allclose(frame_a.filter(like="mean_"), frame_c.filter(like="mean_"))


@pytest.mark.numerics
def test_corrupt_image_becomes_error_row_and_others_are_written(
    digits_subset: Path, tmp_path: Path
) -> None:
    (digits_subset / "n3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    png = (digits_subset / "n4").iterdir().__next__().read_bytes()
    (digits_subset / "n4" / "truncated.png").write_bytes(png[: len(png) // 2])
    out = tmp_path / "out.parquet"
    clean = tmp_path / "clean.parquet"
    report = score_directory(digits_subset, out, ScoreOptions(passes=5))
    frame = pd.read_parquet(out)
    assert len(frame) == 32 and report.errors == 2
    errors = frame[frame.status != "ok"].set_index("path")
    assert set(errors.index) == {"n3/broken.png", "n4/truncated.png"}
    assert errors.status.str.startswith("error: ").all()
    assert errors.filter(like="mean_").isna().all().all() and errors.decision.isna().all()
    assert errors.label.tolist() == ["n3", "n4"]
    # The error rows' nulls leave the integer columns integers (pandas Int64, polars, DuckDB).
    assert errors.pred_index.isna().all() and errors.passes.isna().all()
    assert_integer_columns_stay_integers(out, with_nulls=("pred_index", "passes"))
    for bad in ("n3/broken.png", "n4/truncated.png"):
        (digits_subset / bad).unlink()
    score_directory(digits_subset, clean, ScoreOptions(passes=5))
    good = frame[frame.status == "ok"].reset_index(drop=True)
    # Without the bad files the good images sit at other batch positions: equal to rounding.
    assert_frames_equal_to_rounding(good, pd.read_parquet(clean), check_dtype=False)


@pytest.mark.numerics
def test_flat_folder_and_bn_model_leave_labels_empty_and_model_unchanged(tmp_path: Path) -> None:
    model = bn_dropout_model(classes=3)
    moving = [w.numpy().copy() for w in model.get_layer("bn").weights]
    for i in range(5):
        write_image(tmp_path / "flat" / f"img{i}.jpg", size=24, seed=i)
    out = tmp_path / "out.parquet"
    score_directory(
        tmp_path / "flat", out, ScoreOptions(model=model, passes=8, class_names=["a", "b", "c"])
    )
    frame = pd.read_parquet(out)
    assert frame.label.isna().all() and frame.label_index.isna().all()
    assert {"mean_a", "median_b", "std_c"} <= set(frame.columns)
    for old, new in zip(moving, model.get_layer("bn").weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


def test_cli_writes_output_and_summary(digits_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = _run("score", str(digits_subset), str(out), "--passes", "5", "--tta", "2")
    assert result.exit_code == EXIT_OK, result.output
    assert "30 images" in result.output and "images/s" in result.output
    assert pq.read_metadata(out).num_rows == 30
    assert "bundled demo" in result.output  # one-line notice about the default model


def test_cli_exit_codes_for_image_errors(digits_subset: Path, tmp_path: Path) -> None:
    (digits_subset / "n0" / "bad.jpg").write_text("not an image")
    out = tmp_path / "out.parquet"
    result = _run("score", str(digits_subset), str(out), "--passes", "2")
    assert result.exit_code == EXIT_IMAGE_ERRORS
    assert pq.read_metadata(out).num_rows == 31  # the output is still complete
    result = _run("score", str(digits_subset), str(out), "--passes", "2", "--max-error-rate", "0.1")
    assert result.exit_code == EXIT_OK


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class-names", "a,b"], "10 outputs but 2 class names"),
        (["--model", "missing.keras"], "does not exist"),
        (["--rule", "mode"], "Invalid value for '--rule'"),
        (["--rule", "threshold"], "threshold rule needs per-class thresholds"),
    ],
)
def test_cli_usage_errors_exit_2(digits_subset: Path, tmp_path: Path, args, message) -> None:
    shutil.copy(Path(__file__).parents[1] / "batchuq/data/digits_cnn.keras", tmp_path / "m.keras")
    if args[0] == "--class-names":
        args = ["--model", str(tmp_path / "m.keras"), *args]  # no sidecar beside this copy
    out = tmp_path / "out.parquet"
    result = _run("score", str(digits_subset), str(out), "--passes", "2", *args)
    assert result.exit_code == EXIT_USAGE
    assert message in result.output
    assert not out.exists()


def test_library_no_images_names_the_extensions(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesFoundError, match=r"No images found.*\.png"):
        score_directory(tmp_path / "empty", tmp_path / "out.parquet", ScoreOptions(passes=2))


def test_output_problems_are_reported_before_work(digits_subset: Path, tmp_path: Path) -> None:
    result = _run("score", str(digits_subset), str(tmp_path / "nowhere" / "out.parquet"))
    assert result.exit_code == EXIT_USAGE and "does not exist" in result.output
    result = _run("score", str(digits_subset), str(tmp_path))
    assert result.exit_code == EXIT_USAGE


def test_failed_run_keeps_previous_output_and_leaves_no_temp_file(
    digits_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous")
    model = bn_dropout_model(classes=3)  # 16x16 RGB model, 10 folder classes: names mismatch
    with pytest.raises(ValueError):
        score_directory(
            digits_subset, out, ScoreOptions(model=model, passes=3, class_names=["a", "b"])
        )
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_labels_file_maps_folder_ids(digits_subset: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    rows = "\n".join(f"n{i}, latin_{i}, digit_{i}, 1, 1" for i in range(10))
    labels.write_text("Label, Latin Name, Common Name, Train Images, Validation Images\n" + rows)
    out = tmp_path / "out.parquet"
    result = _run("score", str(digits_subset), str(out), "--passes", "2", "--labels", str(labels))
    assert result.exit_code == EXIT_OK, result.output
    frame = pd.read_parquet(out)
    assert frame.label.iloc[0] == "digit_0" and "mean_digit_9" in frame.columns
    assert frame.label_index.iloc[-1] == 9
    assert json.loads(pq.read_schema(out).metadata[b"batchuq"])["class_names"][0] == "digit_0"


@pytest.mark.numerics
def test_save_samples_column_holds_the_samples_the_statistics_come_from(
    digits_subset: Path, tmp_path: Path
) -> None:
    (digits_subset / "n3" / "broken.png").write_bytes(b"not an image")
    out, plain = tmp_path / "out.parquet", tmp_path / "plain.parquet"
    result = _run("score", str(digits_subset), str(out), "-T", "6", "--tta", "2", "--save-samples")
    assert result.exit_code == EXIT_IMAGE_ERRORS, result.output  # the broken file
    frame = pd.read_parquet(out)
    names = read_metadata(out)["class_names"]
    assert read_metadata(out)["samples_saved"] is True
    ok = frame[frame.status == "ok"]
    assert frame.loc[frame.status != "ok", "samples"].isna().all()
    for _, row in ok.iterrows():
        samples = np.stack(row["samples"])  # (passes * tta, classes)
        assert samples.shape == (12, len(names))
        np.testing.assert_allclose(samples.sum(axis=1), 1.0, atol=1e-5)
        for c, name in enumerate(names):
            assert row[f"mean_{name}"] == pytest.approx(samples[:, c].mean(), abs=1e-6)
            assert row[f"median_{name}"] == pytest.approx(np.median(samples[:, c]), abs=1e-6)
            assert row[f"std_{name}"] == pytest.approx(samples[:, c].std(), abs=1e-6)
    assert (np.stack(ok["samples"].map(np.stack)).std(axis=1) > 0).any()  # passes differ
    # Everything else is what a run without the column writes, bit for bit (same computation).
    _run("score", str(digits_subset), str(plain), "-T", "6", "--tta", "2")
    assert_frames_bitwise_equal(frame.drop(columns="samples"), pd.read_parquet(plain))


class _SubclassedClassifier(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.dropout = keras.layers.Dropout(0.5)
        self.probs = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs, training=False):
        return self.probs(self.dropout(self.hidden(self.flatten(inputs)), training=training))


def test_subclassed_model_is_refused_clearly_and_scores_once_wrapped(tmp_path: Path) -> None:
    from batchuq.models import ModelError

    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.png", size=8, seed=i, mode="L")
    subclassed = _SubclassedClassifier()
    subclassed(np.zeros((1, 8, 8, 1), np.float32))  # built, but still without symbolic inputs
    with pytest.raises(ModelError, match="wrap a subclassed model"):
        score_directory(
            tmp_path / "images", tmp_path / "refused.parquet", ScoreOptions(model=subclassed)
        )
    assert not (tmp_path / "refused.parquet").exists()
    inputs = keras.Input((8, 8, 1))
    wrapped = keras.Model(inputs, subclassed(inputs))
    score_directory(
        tmp_path / "images", tmp_path / "out.parquet", ScoreOptions(model=wrapped, passes=8)
    )
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert len(frame) == 3 and (frame.filter(like="std_").to_numpy() > 0).any()


@pytest.mark.numerics
def test_bfloat16_under_an_avx2_cap_falls_back_to_float32_with_one_notice(
    digits_subset: Path, tmp_path: Path
) -> None:
    """Issue 19: with oneDNN capped at AVX2 (containers, .ci/run's second step) bf16 is not
    native on any CPU, and on an AVX512-BF16 CPU it used to crash. Fresh processes: oneDNN reads
    the cap when TensorFlow first runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUQ_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    }
    runs = {}
    for precision in ("bfloat16", "float32"):
        out = tmp_path / f"{precision}.parquet"
        runs[precision] = subprocess.run(
            [sys.executable, "-m", "batchuq", "score", str(digits_subset), str(out), "-T", "4",
             "--precision", precision, "--no-progress"],
            env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert runs[precision].returncode == EXIT_OK, runs[precision].stderr
    notices = [
        line for line in runs["bfloat16"].stderr.splitlines() if "--precision bfloat16" in line
    ]
    assert len(notices) == 1 and notices[0].endswith("using float32."), notices
    assert "--precision" not in runs["float32"].stderr
    bf16, fp32 = tmp_path / "bfloat16.parquet", tmp_path / "float32.parquet"
    meta = read_metadata(bf16)
    assert (meta["precision"], meta["precision_requested"]) == ("float32", "bfloat16")
    assert (read_metadata(fp32)["precision"], read_metadata(fp32)["precision_requested"]) == (
        "float32",
        "float32",
    )
    assert_parquet_bitwise_equal(bf16, fp32)  # the fallback is the float32 computation
