"""Decoding every accepted format into what the model expects, and deterministic TTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from batchuq.augment import TTAConfig, augment_copies
from batchuq.decode import ImageSpec, load_image, make_dataset
from batchuq.defaults import STATUS_OK as OK


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_model_channels(tmp_path: Path, mode: str, channels: int) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.new("I;16", (7, 9), 40000)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    image.save(path)
    array = load_image(str(path), ImageSpec(12, 10, channels))
    assert array.shape == (12, 10, channels) and array.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(array[0, 0, 0]) - round(40000 / 257)) <= 1  # 16-bit scaled to 8-bit


def test_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("L", (8, 8), 10), Image.new("L", (8, 8), 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    array = load_image(str(tmp_path / "a.gif"), ImageSpec(8, 8, 1))
    assert abs(int(array.mean()) - 10) <= 2


def test_pipeline_reports_bad_files_without_stopping(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (5, 5), (255, 0, 0)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths = [str(good), str(bad), str(empty), str(good)]
    dataset = make_dataset(
        paths, np.arange(4, dtype=np.uint32), ImageSpec(4, 4, 3), TTAConfig(1), batch_size=3
    )
    batches = list(dataset)
    status = [s.decode() for b in batches for s in b["status"].numpy()]
    assert status[0] == OK and status[3] == OK
    assert status[1] == "error: not a recognised image format"
    assert status[2] == "error: empty file (0 bytes)"
    first = batches[0]["images"].numpy()[0, 0]
    np.testing.assert_allclose(first[..., 0], 1.0)  # red, rescaled by 1/255
    assert [int(i) for b in batches for i in b["index"].numpy()] == [0, 1, 2, 3]


def test_tta_copies_are_deterministic_per_key() -> None:
    image = tf.constant(np.random.default_rng(1).random((16, 16, 3)) * 255, tf.float32)
    config = TTAConfig(copies=5)
    a = augment_copies(image, tf.constant(7, tf.uint32), config).numpy()
    b = augment_copies(image, tf.constant(7, tf.uint32), config).numpy()
    c = augment_copies(image, tf.constant(8, tf.uint32), config).numpy()
    assert a.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a[0], a[1])  # copies differ from each other
    assert a.min() >= 0 and a.max() <= 255


def test_single_copy_is_unchanged() -> None:
    image = tf.constant(np.random.default_rng(1).random((6, 6, 1)) * 255, tf.float32)
    out = augment_copies(image, tf.constant(1, tf.uint32), TTAConfig(copies=1)).numpy()
    np.testing.assert_array_equal(out[0], image.numpy())


def test_invalid_tta_settings_name_the_argument() -> None:
    with pytest.raises(ValueError, match="Received: tta=0"):
        TTAConfig(copies=0)
    with pytest.raises(ValueError, match="tta_zoom"):
        TTAConfig(copies=2, zoom=1.5)


def _gradient(height: int = 12, width: int = 20) -> Image.Image:
    """An RGB image whose red channel grows left to right: its orientation is visible."""
    red = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    return Image.fromarray(np.stack([red, np.zeros_like(red), np.zeros_like(red)], axis=-1))


@pytest.mark.parametrize(
    ("suffix", "options"),
    [
        (".webp", {"lossless": True}),
        (".tif", {}),
        (".tiff", {"compression": "tiff_lzw"}),
        (".jfif", {"format": "JPEG", "quality": 100}),
        (".ppm", {}),
        (".ico", {"sizes": [(20, 20)]}),
    ],
)
def test_more_formats_decode_to_the_same_pixels(tmp_path: Path, suffix: str, options) -> None:
    image = _gradient(20, 20)
    path = tmp_path / f"img{suffix}"
    image.save(path, **options)
    array = load_image(str(path), ImageSpec(20, 20, 3))
    tolerance = 16 if suffix == ".jfif" else 0  # JPEG is lossy even at quality 100
    assert np.abs(array.astype(int) - np.asarray(image, dtype=int)).max() <= tolerance


def test_multi_page_tiff_uses_first_page(tmp_path: Path) -> None:
    pages = [Image.new("L", (8, 8), 30), Image.new("L", (8, 8), 220)]
    pages[0].save(tmp_path / "a.tif", save_all=True, append_images=pages[1:])
    assert int(load_image(str(tmp_path / "a.tif"), ImageSpec(8, 8, 1)).mean()) == 30


def test_exif_orientation_6_is_turned_upright_only_when_asked(tmp_path: Path) -> None:
    # A phone held upright stores the picture rotated and sets orientation 6 ("rotate 90 CW to
    # view"). The stored pixels are 12 x 20 (wide); upright, the picture is 20 x 12 (tall).
    upright = _gradient(20, 12)  # tall: red grows left to right
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera writes
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=100)
    spec = ImageSpec(20, 12, 3)
    turned = load_image(str(path), spec, exif_transpose=True)
    assert np.abs(turned.astype(int) - np.asarray(upright, dtype=int)).max() <= 16  # JPEG
    as_stored = load_image(str(path), spec, exif_transpose=False)  # like keras's loader
    assert np.abs(as_stored.astype(int) - np.asarray(upright, dtype=int)).max() > 100
