"""Step 2 of the data flow: read, decode, convert and resize images in a ``tf.data`` pipeline.

Decoding goes through Pillow inside ``tf.numpy_function``: Pillow reads every format we accept
(JPEG incl. CMYK, PNG incl. 16-bit and palette, BMP, WebP, PPM/PGM, ICO, the first page of a
TIFF and the first frame of a GIF), optionally turns it upright by its EXIF orientation, checks
the pixel count from the header before decoding, and its errors name the problem. A file that
cannot be read never raises inside the pipeline: it yields a blank image and a status
``error: <reason>``, so the batch job writes an error row and carries on. An image in object
storage (a URL, see ``batchuq.storage``) is read whole into memory and decoded the same way; a
missing or unreadable object is an error row like a missing or unreadable file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from batchuq.augment import TTAConfig, augment_copies
from batchuq.defaults import DEFAULT_MAX_PIXELS, STATUS_OK
from batchuq.errors import ModelError
from batchuq.storage import is_url, read_bytes

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}

# Object-storage reads kept in flight per pipeline (local files: one per usable core, up to 8).
OBJECT_READS_IN_FLIGHT = 16

# batchuq checks the pixel count itself (``--max-pixels``) from the header, before decoding.
Image.MAX_IMAGE_PIXELS = None


class UnreadableImageError(ValueError):
    """Raised by batchuq's own checks; the message is the reason shown in the row."""


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: ``(height, width, channels)``.

    ``channel_axis=False`` is a one-channel model whose input is ``(batch, height, width)``
    (MNIST-style ``Input(shape=(28, 28))``): images are decoded and augmented with one channel,
    which the scoring loop drops just before the model.

    Raises:
        ModelError: If ``channels`` is not 1, 3 or 4 (the model's input cannot be fed images).
    """

    height: int
    width: int
    channels: int
    channel_axis: bool = True

    def __post_init__(self) -> None:
        if self.channels not in _MODE_FOR_CHANNELS:
            raise ModelError(
                f"The model input must have 1, 3 or 4 channels. Received: channels={self.channels}"
            )


def describe_error(exc: BaseException) -> str:
    """Turn a decoding exception into a short, specific reason."""
    if isinstance(exc, UnreadableImageError):
        return str(exc)
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({exc})"
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower():
        return f"truncated image ({message})"
    return f"{type(exc).__name__}: {message}"


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image to the mode the model needs (``L``, ``RGB`` or ``RGBA``)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    target = _MODE_FOR_CHANNELS[channels]
    return image if image.mode == target else image.convert(target)


def load_image(
    path: str,
    spec: ImageSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> np.ndarray:
    """Read one image file into a ``uint8`` array of shape ``(height, width, channels)``.

    Args:
        path: Image file, or the URL of an object (``s3://bucket/key``).
        spec: Target size and channels.
        max_pixels: Refuse images with more pixels than this, checked on the header before the
            image is decoded.
        exif_transpose: Turn the image upright by its EXIF orientation tag (a phone photo with
            orientation 6 is stored sideways). Off by default, like Keras's own loader, and so
            like the images most models were trained on.

    Returns:
        The resized image.

    Raises:
        OSError, ValueError: If the file cannot be read or decoded (see ``describe_error``).
    """
    source: str | io.BytesIO = path
    if is_url(path):
        source = io.BytesIO(read_bytes(path))
        size = source.getbuffer().nbytes
    else:
        size = os.path.getsize(path)
    if size == 0:
        raise UnreadableImageError("empty file (0 bytes)")
    with Image.open(source) as image:
        if image.width * image.height > max_pixels:
            raise UnreadableImageError(
                f"image has {image.width}x{image.height} pixels, above the limit of "
                f"{max_pixels} (--max-pixels)"
            )
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        image = _to_mode(image, spec.channels)
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array.reshape(spec.height, spec.width, spec.channels)


def _safe_load(
    path: bytes, problem: bytes, spec: ImageSpec, max_pixels: int, exif_transpose: bool = False
) -> tuple[np.ndarray, bytes]:
    """``load_image`` that never raises: returns a blank image and a status string instead."""
    name = path.decode("utf-8", "surrogateescape")
    if problem:
        blank = np.zeros((spec.height, spec.width, spec.channels), np.uint8)
        return blank, b"error: " + problem
    try:
        return load_image(name, spec, max_pixels, exif_transpose), STATUS_OK.encode()
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
        blank = np.zeros((spec.height, spec.width, spec.channels), np.uint8)
        return blank, f"error: {describe_error(exc)}".encode()


def _usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def make_dataset(
    paths: list[str],
    keys: np.ndarray,
    spec: ImageSpec,
    tta: TTAConfig,
    batch_size: int,
    rescale: float = 1.0 / 255.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    problems: list[str | None] | None = None,
    exif_transpose: bool = False,
) -> tf.data.Dataset:
    """Build the streaming input pipeline.

    Args:
        paths: Image files or object URLs (all of one kind), in output order.
        keys: ``uint32`` image keys, shape ``(n,)`` (see ``seeds.image_keys``).
        spec: Model input size and channels.
        tta: Test-time augmentation settings (K = ``tta.copies``).
        batch_size: Images per batch.
        rescale: Factor applied to pixel values in ``[0, 255]`` after augmentation.
        max_pixels: Decompression-bomb limit per image.
        problems: Per file, a reason not to read it (becomes its error status), or ``None``.
        exif_transpose: Turn images upright by their EXIF orientation (see ``load_image``).

    Returns:
        A dataset of dicts with ``index`` ``(B,)`` int64, ``images`` ``(B, K, H, W, C)`` float32
        (C = 1 also for a model without a channel axis: the caller drops it),
        ``keys`` ``(B,)`` uint32 and ``status`` ``(B,)`` string, in the order of ``paths``.
    """
    if len(paths) != len(keys):
        raise ValueError(f"paths and keys differ in length. Received: {len(paths)}, {len(keys)}")
    shape = (spec.height, spec.width, spec.channels)

    def decode(
        index: tf.Tensor, path: tf.Tensor, problem: tf.Tensor, key: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        image, status = tf.numpy_function(
            lambda p, q: _safe_load(p, q, spec, max_pixels, exif_transpose),
            [path, problem],
            [tf.uint8, tf.string],
            stateful=False,
        )
        image = tf.ensure_shape(image, shape)
        status = tf.ensure_shape(status, ())
        return {"index": index, "image": image, "key": key, "status": status}

    def augment(item: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        copies = augment_copies(tf.cast(item["image"], tf.float32), item["key"], tta)
        return {
            "index": item["index"],
            "images": copies * tf.constant(rescale, tf.float32),
            "keys": item["key"],
            "status": item["status"],
        }

    dataset = tf.data.Dataset.from_tensor_slices(
        (
            tf.range(len(paths), dtype=tf.int64),
            tf.constant([os.fsencode(p) for p in paths], dtype=tf.string),  # any file name
            tf.constant([p or "" for p in (problems or [None] * len(paths))], dtype=tf.string),
            tf.constant(np.asarray(keys, np.uint32), dtype=tf.uint32),
        )
    )
    # Autotuning is off: in about half the runs its background work stalled the end of the
    # iterator for 2-4 s (benchmarks/bench_mc.py, 256 images). Decoding costs little next to
    # T x K forward passes, so one call per usable core (at most 8) and one batch prefetched
    # keep the sampler fed; in flight are one batch plus `workers` images per map.
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    workers = reads = min(8, _usable_cores())
    if paths and is_url(paths[0]):
        # An object read waits on the network, not on a core: keep OBJECT_READS_IN_FLIGHT of
        # them going, on threads of the pipeline's own (tf.data's shared pool has one per core,
        # which held 30 ms reads to 2 at a time on 2 cores).
        reads = OBJECT_READS_IN_FLIGHT
        options.threading.private_threadpool_size = reads + workers
    dataset = dataset.with_options(options)
    dataset = dataset.map(decode, num_parallel_calls=reads, deterministic=True)
    dataset = dataset.map(augment, num_parallel_calls=workers, deterministic=True)
    return dataset.batch(batch_size).prefetch(1)
