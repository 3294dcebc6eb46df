"""Bad files, kills, reruns and untrusted models: the job never loses good rows."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import ROUNDING, assert_frames_bitwise_equal, assert_frames_equal_to_rounding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchuq import score_directory
from batchuq.cli import cli
from batchuq.cli.runtime import EXIT_IMAGE_ERRORS, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE
from batchuq.jobs.score import RunControl, ScoreOptions
from batchuq.models import ModelError, load_model

REPO = Path(__file__).resolve().parents[1]


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_bad_folder(root: Path, outside: Path) -> dict[str, str | None]:
    """Good digits beside every kind of bad input; returns path -> expected error (or None)."""
    good = sorted((REPO / "sample_data/digits/test/n7").iterdir())[:4]
    (root / "n7").mkdir(parents=True)
    for image in good:
        shutil.copy(image, root / "n7" / image.name)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    bad = root / "n7"
    expected: dict[str, str | None] = {f"n7/{p.name}": None for p in good}

    def put(name: str, data: bytes, reason: str | None) -> None:
        (bad / name).write_bytes(data)
        expected[f"n7/{name}"] = reason

    put("truncated.jpg", _jpeg_bytes(rgb)[:300], "truncated")
    put("truncated.png", _png_bytes(rgb)[:200], "truncated")
    put("zero.png", b"", "empty file (0 bytes)")
    put("text.jpg", b"hello, I am a text file\n", "not a recognised image format")
    big = Image.new("L", (3000, 3000))
    put("huge.png", _png_bytes(big, optimize=True), "above the limit")
    put("cmyk.jpg", _jpeg_bytes(rgb.convert("CMYK")), None)
    put("sixteen.png", _png_bytes(Image.new("I;16", (30, 30), 50000)), None)
    put("gray_alpha.png", _png_bytes(rgb.convert("LA")), None)
    put("palette.png", _png_bytes(rgb.convert("P")), None)
    frames = [rgb.convert("P"), Image.new("P", (40, 40), 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    put("animated.gif", buffer.getvalue(), None)
    put("name with spaces é 数字.png", _png_bytes(rgb), None)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(_png_bytes(rgb))
    os.symlink(outside / "secret.png", bad / "escape.png")
    expected["n7/escape.png"] = "symlink to a file outside"
    (bad / "folder.jpg").mkdir()  # a directory named like an image is not a row
    return expected


@pytest.mark.numerics
def test_every_bad_input_kind_gets_its_reason_and_good_rows_match(tmp_path: Path) -> None:
    root = tmp_path / "images"
    expected = build_bad_folder(root, tmp_path / "outside")
    out = tmp_path / "out.parquet"
    report = score_directory(root, out, ScoreOptions(passes=4, max_pixels=4_000_000))
    frame = pd.read_parquet(out).set_index("path")
    assert sorted(frame.index) == sorted(expected)
    for path, reason in expected.items():
        status = frame.loc[path, "status"]
        if reason is None:
            assert status == "ok", (path, status)
        else:
            assert status.startswith("error: ") and reason in status, (path, status)
    assert report.errors == sum(r is not None for r in expected.values())
    clean = tmp_path / "clean"
    (clean / "n7").mkdir(parents=True)
    for path, reason in expected.items():
        if reason is None:
            shutil.copy(root / path, clean / path)
    score_directory(clean, tmp_path / "clean.parquet", ScoreOptions(passes=4, max_pixels=4_000_000))
    reference = pd.read_parquet(tmp_path / "clean.parquet").set_index("path")
    good = frame[frame.status == "ok"].loc[reference.index]
    # Without the bad files the good images sit at other batch positions: equal to rounding.
    assert_frames_equal_to_rounding(good, reference, check_dtype=False)


def test_symlinks_can_be_followed(tmp_path: Path) -> None:
    root = tmp_path / "images"
    build_bad_folder(root, tmp_path / "outside")
    out = tmp_path / "out.parquet"
    score_directory(root, out, ScoreOptions(passes=2, follow_symlinks=True))
    assert pd.read_parquet(out).set_index("path").loc["n7/escape.png", "status"] == "ok"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_error_row(tmp_path: Path) -> None:
    root = tmp_path / "images"
    shutil.copytree(REPO / "sample_data/digits/test/n1", root)
    locked = sorted(root.iterdir())[0]
    locked.chmod(0)
    score_directory(root, tmp_path / "out.parquet", ScoreOptions(passes=2))
    frame = pd.read_parquet(tmp_path / "out.parquet").set_index("path")
    assert frame.loc[locked.name, "status"] == "error: permission denied"


@pytest.mark.numerics
def test_batch_size_changes_probabilities_only_by_rounding(
    digits_subset: Path, tmp_path: Path
) -> None:
    frames = []
    for size in (1, 7, 32, 7):
        out = tmp_path / f"b{size}-{len(frames)}.parquet"
        score_directory(digits_subset, out, ScoreOptions(passes=6, tta=2, seed=3, batch_size=size))
        frames.append(pd.read_parquet(out))
    # The random draws do not depend on the batch, but the kernels' rounding may depend on an
    # image's position in it (up to 6e-8 measured on AVX2): probabilities equal to float32
    # rounding, pred and decision exactly equal.
    for frame in frames[1:3]:
        assert_frames_equal_to_rounding(frames[0], frame)
    assert_frames_bitwise_equal(frames[1], frames[3])  # the same batch size again: same bits


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_random_bytes_never_crash_and_give_one_row_per_file(blobs: list[bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "images"
        root.mkdir()
        for i, blob in enumerate(blobs):
            (root / f"f{i}.{['png', 'jpg', 'gif', 'bmp'][i % 4]}").write_bytes(blob)
        out = Path(folder) / "out.parquet"
        report = score_directory(root, out, ScoreOptions(passes=2))
        frame = pd.read_parquet(out)
        assert len(frame) == len(blobs) == report.images
        assert frame.status.str.match(r"^(ok|error: .+)$").all()


def _lambda_model(path: Path) -> Path:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: t * 2)(inputs)
    x = keras.layers.Flatten()(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(path)
    return path


def test_untrusted_models_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="safe mode"):
        load_model(_lambda_model(tmp_path / "lambda.keras"))
    not_model = tmp_path / "notes.keras"
    not_model.write_text("just text")
    with pytest.raises(ModelError, match="not|Could not"):
        load_model(not_model)
    inputs = keras.Input((5,))
    vector = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    vector.save(tmp_path / "vector.keras")
    with pytest.raises(ModelError, match="image batch"):
        _ = load_model(tmp_path / "vector.keras").image_spec


def test_logits_need_the_logits_flag(digits_subset: Path, tmp_path: Path) -> None:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dropout(0.3)(x)
    logits = keras.layers.Dense(10, kernel_initializer=keras.initializers.RandomNormal(0, 3))(x)
    model_path = tmp_path / "logits.keras"
    keras.Model(inputs, logits).save(model_path)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        cli, ["score", str(digits_subset), str(out), "-m", str(model_path), "-T", "3",
              "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == EXIT_USAGE and "--logits" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        cli, ["score", str(digits_subset), str(out), "-m", str(model_path), "-T", "3",
              "--logits", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(pd.read_parquet(out).filter(like="mean_").sum(axis=1), 1, atol=1e-4)


def test_json_log_format(digits_subset: Path, tmp_path: Path) -> None:
    (digits_subset / "n0" / "bad.jpg").write_text("nope")
    # A real process, so that TensorFlow's import happens here: its C++ start-up notices must
    # not reach stderr, where every line has to be one JSON object, up to the closing message.
    result = subprocess.run(
        [sys.executable, "-m", "batchuq", "score", str(digits_subset),
         str(tmp_path / "o.parquet"), "-T", "2", "--log-format", "json"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == EXIT_IMAGE_ERRORS, result.stderr  # 1 error > 0 tolerated
    assert result.stdout == ""
    events = [json.loads(line) for line in result.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert "start" in kinds and kinds[-2:] == ["summary", "too_many_errors"]
    errors = [e for e in events if e["event"] == "image_error"]
    assert [e["path"] for e in errors] == ["n0/bad.jpg"]
    assert events[-2]["images"] == 31 and events[-2]["errors"] == 1


def _score_process(images: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "batchuq", "score", str(images), str(out), "--no-progress",
         "--batch-size", "4", "-T", "20", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for_rows(process: subprocess.Popen, marker: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if marker.exists() and any(marker.glob("part-*")):
            return
        time.sleep(0.05)


@pytest.fixture
def many_digits(tmp_path: Path) -> Path:
    root = tmp_path / "many"
    for folder in sorted((REPO / "sample_data/digits/test").iterdir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:12]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def _wait_for_start(process: subprocess.Popen) -> None:
    for line in process.stdout:
        if "scoring" in line:
            return


@pytest.mark.parametrize(
    ("sent", "expected", "delay"),
    [
        (signal.SIGTERM, EXIT_SIGTERM, 0.0),
        (signal.SIGTERM, EXIT_SIGTERM, 0.4),  # usually while the sampler is being traced
        (signal.SIGTERM, EXIT_SIGTERM, 0.9),
        (signal.SIGINT, EXIT_SIGINT, 0.4),
    ],
)
def test_signal_leaves_no_partial_output(
    many_digits: Path, tmp_path: Path, sent: int, expected: int, delay: float
) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous run")
    # 400 passes: the run takes seconds after "scoring", so the signal always lands mid-run
    # (a run that finished first would make this test pass without testing anything).
    process = _score_process(many_digits, out, "-T", "400")
    _wait_for_start(process)
    time.sleep(delay)
    process.send_signal(sent)
    output, _ = process.communicate(timeout=120)
    assert "images/s" not in output, "the run finished before the signal"
    assert process.returncode == expected, output
    assert out.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "out.parquet"]


def test_resume_after_kill_equals_uninterrupted_run(many_digits: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.parquet"
    done = _score_process(many_digits, reference, "--seed", "5")
    assert done.wait(timeout=300) == 0
    out = tmp_path / "out.parquet"
    first = _score_process(many_digits, out, "--seed", "5", "--resume", "--checkpoint-rows", "8")
    _wait_for_rows(first, tmp_path / "out.parquet.checkpoint")
    first.send_signal(signal.SIGTERM)
    told, _ = first.communicate(timeout=120)
    assert first.returncode == EXIT_SIGTERM
    assert "run again with --resume" in told
    assert not out.exists() and (tmp_path / "out.parquet.checkpoint").is_dir()
    second = _score_process(many_digits, out, "--seed", "5", "--resume", "--checkpoint-rows", "8")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert "already scored" in output
    assert not (tmp_path / "out.parquet.checkpoint").exists()
    # The resumed part may be batched differently: equal to float32 rounding.
    assert_frames_equal_to_rounding(pd.read_parquet(out), pd.read_parquet(reference))


def test_resume_refuses_a_checkpoint_from_other_settings(
    digits_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    checkpoint = tmp_path / "out.parquet.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "run.json").write_text(json.dumps({"seed": 999}))
    with pytest.raises(ValueError, match="other settings"):
        score_directory(digits_subset, out, ScoreOptions(passes=2), control=RunControl(resume=True))


@pytest.mark.numerics
def test_file_and_folder_names_that_are_not_utf8_are_scored(tmp_path: Path) -> None:
    source = next((REPO / "sample_data/digits/test/n3").iterdir())
    root = tmp_path / "images"
    latin1 = root / os.fsdecode(b"caf\xe9")  # a folder name in Latin-1 bytes
    latin1.mkdir(parents=True)
    shutil.copy(source, latin1 / os.fsdecode(b"\xff\xfe photo.png"))
    shutil.copy(source, latin1 / "plain.png")
    out = tmp_path / "out.parquet"
    report = score_directory(root, out, ScoreOptions(passes=1))
    frame = pd.read_parquet(out)
    assert report.errors == 0 and (frame.status == "ok").all()
    assert frame.path.tolist() == ["caf\\xe9/plain.png", "caf\\xe9/\\xff\\xfe photo.png"]
    assert frame.label.tolist() == ["caf\\xe9"] * 2
    # Same pixels, deterministic pass, but two positions in the batch: equal to float32 rounding.
    means = frame.filter(like="mean_").to_numpy()
    np.testing.assert_allclose(means[0], means[1], **ROUNDING)
    assert frame.pred[0] == frame.pred[1] and frame.decision[0] == frame.decision[1]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_tensorflow_import_notices_are_filtered_and_other_output_kept(
    tmp_path: Path, log_format: str
) -> None:
    # A stand-in `tensorflow` package that writes to fd 2 as TensorFlow's C++ code does.
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see ...\\n')\n"
        "os.write(2, b'E0000 something real went wrong\\n')\n"
        "if os.environ.get('FAKE_TF_ABORT'):\n"
        "    os.abort()\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}", "TMPDIR": str(tmp_path)}
    code = (
        "from batchuq.cli.runtime import import_tensorflow_quietly\n"
        f"import_tensorflow_quietly({log_format!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    if log_format == "json":
        lines = [json.loads(line)["message"] for line in lines]
    assert lines == ["E0000 something real went wrong"]
    assert not list(tmp_path.glob("batchuq-tensorflow-import-*"))
    # An import that kills the process leaves what it printed in the capture file.
    crashed = subprocess.run(
        [sys.executable, "-c", code], env=env | {"FAKE_TF_ABORT": "1"}, capture_output=True
    )
    assert crashed.returncode != 0
    (kept,) = tmp_path.glob("batchuq-tensorflow-import-*.log")
    assert "something real went wrong" in kept.read_text()


@pytest.mark.numerics
def test_resumed_run_reports_the_counts_of_an_uninterrupted_run(
    digits_subset: Path, tmp_path: Path
) -> None:
    from batchuq.errors import StopRequested

    (digits_subset / "n0" / "aaa_bad.jpg").write_text("not an image")  # first: checkpointed
    (digits_subset / "n9" / "zzz_bad.jpg").write_text("not an image")  # last: after resuming
    clean = score_directory(digits_subset, tmp_path / "clean.parquet", ScoreOptions(passes=4))
    out = tmp_path / "out.parquet"
    checks = iter(range(1000))
    with pytest.raises(StopRequested):  # stops at the start of the third batch
        score_directory(
            digits_subset,
            out,
            ScoreOptions(passes=4, batch_size=4),
            control=RunControl(
                resume=True, checkpoint_rows=4, should_stop=lambda: next(checks) >= 4
            ),
        )
    assert not out.exists() and (tmp_path / "out.parquet.checkpoint").is_dir()
    resumed = score_directory(
        digits_subset,
        out,
        ScoreOptions(passes=4, batch_size=4),
        control=RunControl(resume=True, checkpoint_rows=4),
    )
    assert (resumed.images, resumed.errors, resumed.unclassified) == (
        clean.images, clean.errors, clean.unclassified
    )  # fmt: skip
    assert resumed.errors == 2
    frame = pd.read_parquet(out)
    assert (frame.decision == "unclassified").sum() == resumed.unclassified
