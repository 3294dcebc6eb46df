"""Images in object storage: ``s3://`` against a local S3-compatible server (moto) and ``gs://``
against a local GCS emulator, both started here.

The servers listen on 127.0.0.1 only, the environment points every call at them (dummy
credentials), and the buckets hold a copy of a local folder: scoring either must give the same
rows, since the relative paths, and so the per-image seeds, are the same.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import ROUNDING, SAMPLE_TEST, assert_frames_equal_to_rounding
from gcp_storage_emulator.server import create_server
from moto.server import ThreadedMotoServer

from batchuq.augment import TTAConfig
from batchuq.cli import cli
from batchuq.decode import ImageSpec, make_dataset
from batchuq.discover import discover_images
from batchuq.errors import ImagesFolderError, LayoutError, NoImagesFoundError, UsageError
from batchuq.storage import filesystem, is_url, list_tree, normalise_url, read_bytes

BUCKET = "batchuq-test"
CORRUPT = b"this is not a PNG"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    """A moto S3 server on 127.0.0.1, the environment pointing at it, and a client for uploads."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        try:
            yield client
        finally:
            server.stop()


def _upload(client: object, folder: Path, prefix: str) -> str:
    """Upload every file below ``folder`` (hidden ones too) under ``prefix``; its URL."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def local_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 test digits in class folders, one corrupt PNG, a text file and a hidden image."""
    local = tmp_path_factory.mktemp("digits") / "digits"
    for folder in sorted(SAMPLE_TEST.iterdir()):
        for image in sorted(folder.iterdir())[:4]:
            (local / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, local / folder.name / image.name)
    (local / "n3" / "corrupt.png").write_bytes(CORRUPT)
    (local / "notes.txt").write_text("not an image")
    (local / ".cache").mkdir()
    shutil.copy(next((local / "n1").iterdir()), local / ".cache" / "hidden.png")
    return local


@pytest.fixture(scope="module")
def digits(s3: object, local_digits: Path) -> tuple[str, Path]:
    """The local digits and the URL of their copy under ``s3://batchuq-test/digits``."""
    return _upload(s3, local_digits, "digits"), local_digits


def _run(*args: str) -> object:
    env = {"BATCHUQ_MODEL": None, "BATCHUQ_CONFIG": None}
    return CliRunner().invoke(cli, [*args, "--no-progress"], env=env, catch_exceptions=False)


def _score(*args: str) -> object:
    return _run("score", *args)


def test_urls_are_told_from_paths() -> None:
    assert is_url("s3://bucket/prefix") and is_url("gs://bucket")
    assert not is_url("images/n0") and not is_url(Path("s3:/bucket")) and not is_url(None)
    assert normalise_url("S3://bucket/prefix/") == "s3://bucket/prefix"
    assert normalise_url("gcs://bucket/a") == "gs://bucket/a"
    with pytest.raises(UsageError, match=r"Received: images='http://example.org/x'$"):
        normalise_url("http://example.org/x")
    with pytest.raises(UsageError, match="names no bucket"):
        normalise_url("s3://")


def test_listing_gives_the_discovery_of_the_local_copy(digits: tuple[str, Path]) -> None:
    url, local = digits
    remote, here = discover_images(url + "/"), discover_images(local)
    assert [f.relative_path for f in remote.files] == [f.relative_path for f in here.files]
    assert [f.folder_label for f in remote.files] == [f.folder_label for f in here.files]
    assert remote.class_folders == here.class_folders == [f"n{i}" for i in range(10)]
    assert remote.skipped == here.skipped == ["notes.txt"]
    assert remote.root == url
    first = remote.files[0]
    assert first.path == f"{url}/{first.relative_path}" and first.problem is None
    assert read_bytes(first.path) == (local / first.relative_path).read_bytes()
    assert len(remote.files) == 41  # 40 digits and the corrupt file; the hidden one left out


def test_layouts_are_detected_in_a_bucket_as_in_a_folder(s3: object, tmp_path: Path) -> None:
    for name in ("training/n0/a.png", "training/n1/b.png"):  # as the Kaggle archive unpacks
        (tmp_path / "wrapped" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next((SAMPLE_TEST / "n0").iterdir()), tmp_path / "wrapped" / name)
    url = _upload(s3, tmp_path / "wrapped", "wrapped")
    found, here = discover_images(url), discover_images(tmp_path / "wrapped")
    assert found.root == f"{url}/training"
    assert [f.relative_path for f in found.files] == ["n0/a.png", "n1/b.png"]
    assert [f.relative_path for f in here.files] == ["n0/a.png", "n1/b.png"]
    assert "holds only the folder 'training'" in found.notices[0]
    for name in ("train/n0/a.png", "val/n0/a.png"):
        s3.put_object(Bucket=BUCKET, Key=f"splits/{name}", Body=b"x")
    with pytest.raises(LayoutError, match="dataset splits"):
        discover_images(f"s3://{BUCKET}/splits")


def test_missing_bucket_empty_prefix_and_object_are_told_apart(digits: tuple[str, Path]) -> None:
    url, _ = digits
    with pytest.raises(ImagesFolderError, match="bucket 'no-such-bucket' does not exist"):
        discover_images("s3://no-such-bucket/images")
    with pytest.raises(ImagesFolderError, match="is an object, not a prefix"):
        discover_images(f"{url}/notes.txt")
    with pytest.raises(NoImagesFoundError):
        discover_images(f"s3://{BUCKET}/nothing-here")
    assert list_tree(f"s3://{BUCKET}/nothing-here").children == []


def test_unreadable_objects_become_error_statuses(digits: tuple[str, Path]) -> None:
    url, _ = digits
    paths = [f"{url}/n0/missing.png", f"{url}/n3/corrupt.png", discover_images(url).files[0].path]
    dataset = make_dataset(
        paths, np.arange(3, dtype=np.uint32), ImageSpec(8, 8, 1), TTAConfig(1), 3
    )
    (batch,) = list(dataset)
    assert [s.decode() for s in batch["status"].numpy()] == [
        "error: file not found",
        "error: not a recognised image format",
        "ok",
    ]


def test_score_s3_gives_the_rows_of_the_local_folder(
    digits: tuple[str, Path], tmp_path: Path
) -> None:
    url, local = digits
    options = ["--passes", "10", "--batch-size", "16", "--max-error-rate", "0.05"]
    from_s3 = _score(url, str(tmp_path / "s3.parquet"), *options)
    from_disk = _score(str(local), str(tmp_path / "local.parquet"), *options)
    assert from_s3.exit_code == 0, from_s3.output
    assert from_disk.exit_code == 0, from_disk.output
    assert "41 images, " in from_s3.output and "1 errors, 1 skipped" in from_s3.output
    s3_rows = pd.read_parquet(tmp_path / "s3.parquet")
    local_rows = pd.read_parquet(tmp_path / "local.parquet")
    assert_frames_equal_to_rounding(s3_rows, local_rows)
    corrupt = s3_rows.set_index("path").loc["n3/corrupt.png"]
    assert corrupt.status == "error: not a recognised image format" and pd.isna(corrupt.pred)
    assert (s3_rows.status == "ok").sum() == 40
    metadata = pq.read_schema(tmp_path / "s3.parquet").metadata[b"batchuq"].decode()
    assert f'"images": "{url}"' in metadata and f'"images_root": "{url}"' in metadata


def test_calibrate_reads_a_bucket_as_a_folder(digits: tuple[str, Path], tmp_path: Path) -> None:
    url, local = digits
    options = ["--tta", "2", "--score-passes", "5", "--batch-size", "16"]
    for source, name in ((url, "s3.json"), (str(local), "local.json")):
        result = _run("calibrate", source, "-o", str(tmp_path / name), *options)
        assert result.exit_code == 0, result.output
    s3_fit, local_fit = (json.loads((tmp_path / n).read_text()) for n in ("s3.json", "local.json"))
    del s3_fit["stats"]["seconds"], local_fit["stats"]["seconds"]
    assert s3_fit["stats"] == local_fit["stats"] and s3_fit["stats"]["images"] == 40
    for key in ("thresholds", "temperature", "conformal_quantiles"):
        np.testing.assert_allclose(s3_fit[key], local_fit[key], **ROUNDING)


def test_empty_prefix_exits_4_and_a_missing_bucket_2(
    digits: tuple[str, Path], tmp_path: Path
) -> None:
    empty = _score(f"s3://{BUCKET}/nothing-here", str(tmp_path / "a.parquet"))
    assert empty.exit_code == 4, empty.output
    assert "No images to score" in empty.output
    missing = _score("s3://no-such-bucket/x", str(tmp_path / "b.parquet"))
    assert missing.exit_code == 2, missing.output
    assert "bucket 'no-such-bucket' does not exist" in missing.output
    assert not list(tmp_path.iterdir())


def test_output_urls_and_other_schemes_are_refused_before_any_work(
    digits: tuple[str, Path],
) -> None:
    url, _ = digits
    to_s3 = _score(url, f"s3://{BUCKET}/out.parquet")
    assert to_s3.exit_code == 2
    assert "Write locally or to a mounted filesystem" in to_s3.output
    assert f"Received: output='s3://{BUCKET}/out.parquet'" in to_s3.output
    other = _score("ftp://host/images", "out.parquet")
    assert other.exit_code == 2 and "Received: images='ftp://host/images'" in other.output


@pytest.fixture(scope="module")
def gcs_digits(local_digits: Path) -> Iterator[str]:
    """A GCS emulator on 127.0.0.1 (``STORAGE_EMULATOR_HOST``) holding a copy of the digits;
    their ``gs://`` URL."""
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        fs, _ = filesystem(f"gs://{BUCKET}")
        for path in sorted(local_digits.rglob("*")):
            if path.is_file():
                key = f"{BUCKET}/digits/{path.relative_to(local_digits).as_posix()}"
                with fs.open_output_stream(key) as out:
                    out.write(path.read_bytes())
        try:
            yield f"gs://{BUCKET}/digits"
        finally:
            server.stop()


def test_gs_listing_and_reads_match_the_local_folder(gcs_digits: str, local_digits: Path) -> None:
    remote, here = discover_images(gcs_digits), discover_images(local_digits)
    assert [f.relative_path for f in remote.files] == [f.relative_path for f in here.files]
    assert remote.class_folders == here.class_folders and remote.skipped == here.skipped
    spec, keys = ImageSpec(16, 16, 1), np.arange(len(here.files), dtype=np.uint32)
    batches = [
        next(iter(make_dataset([f.path for f in found.files], keys, spec, TTAConfig(1), 64)))
        for found in (remote, here)
    ]
    np.testing.assert_array_equal(batches[0]["images"].numpy(), batches[1]["images"].numpy())
    assert list(batches[0]["status"].numpy()) == list(batches[1]["status"].numpy())
    with pytest.raises(ImagesFolderError, match="bucket 'no-such-bucket' does not exist"):
        discover_images("gs://no-such-bucket/images")


def test_an_unreachable_store_is_a_failure_not_a_skip(
    digits: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = digits
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody there
    result = _score(url, str(tmp_path / "out.parquet"))
    assert result.exit_code == 3, result.output
    assert "NETWORK_CONNECTION" in result.output and not list(tmp_path.iterdir())
