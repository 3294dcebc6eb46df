"""Step 2b of the data flow: test-time augmentation (TTA).

Each image becomes K augmented copies. The random rotation, zoom, translation, contrast and
optional horizontal flip of every copy are drawn with TensorFlow's stateless random ops from the
image's own key (see ``seeds.py``), so a copy looks the same whatever batch it lands in.
With K = 1 the image is passed through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import tensorflow as tf

from batchuq.defaults import (
    DEFAULT_TTA,
    DEFAULT_TTA_CONTRAST,
    DEFAULT_TTA_FLIP,
    DEFAULT_TTA_ROTATION,
    DEFAULT_TTA_SHIFT,
    DEFAULT_TTA_ZOOM,
)
from batchuq.errors import UsageError

_AUGMENT_SALT = 0x7A11


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation settings.

    Attributes:
        copies: Number of copies K per image; 1 means no augmentation.
        rotation: Maximum rotation in degrees, drawn uniformly in ``[-rotation, rotation]``.
        zoom: Maximum relative zoom, scale drawn in ``[1 - zoom, 1 + zoom]``.
        shift: Maximum translation as a fraction of width/height.
        contrast: Maximum contrast change, factor drawn in ``[1 - contrast, 1 + contrast]``.
        flip: Whether to flip half of the copies horizontally (off by default, since a flip
            turns some classes into others, e.g. digits or text).

    Raises:
        UsageError: If ``copies`` is below 1, a range is negative, or zoom or contrast is 1 or
            more.
    """

    copies: int = DEFAULT_TTA
    rotation: float = DEFAULT_TTA_ROTATION
    zoom: float = DEFAULT_TTA_ZOOM
    shift: float = DEFAULT_TTA_SHIFT
    contrast: float = DEFAULT_TTA_CONTRAST
    flip: bool = DEFAULT_TTA_FLIP

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise UsageError(f"`tta` must be at least 1. Received: tta={self.copies}")
        for name in ("rotation", "zoom", "shift", "contrast"):
            if getattr(self, name) < 0:
                raise UsageError(
                    f"`tta_{name}` must be >= 0. Received: tta_{name}={getattr(self, name)}"
                )
        if self.zoom >= 1 or self.contrast >= 1:
            raise UsageError(
                "`tta_zoom` and `tta_contrast` must be below 1. "
                f"Received: tta_zoom={self.zoom}, tta_contrast={self.contrast}"
            )

    def as_metadata(self) -> dict[str, float | int | bool]:
        """Settings as a JSON-serialisable dict (for the Parquet metadata)."""
        return asdict(self)


def _transforms(params: tf.Tensor, height: int, width: int, config: TTAConfig) -> tf.Tensor:
    """Projective transforms mapping output to input pixels, shape ``(K, 8)``."""
    u = params * 2.0 - 1.0  # uniform in [-1, 1)
    theta = u[:, 0] * (config.rotation * math.pi / 180.0)
    scale = 1.0 + u[:, 1] * config.zoom
    dx = u[:, 2] * config.shift * width
    dy = u[:, 3] * config.shift * height
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = cx - a0 * cx - a1 * cy - dx
    b2 = cy - b0 * cx - b1 * cy - dy
    zeros = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def _copy_parameters(
    key: tf.Tensor, config: TTAConfig, height: int, width: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The K copies' transforms ``(K, 8)``, contrast factors ``(K,)`` and flips ``(K,)``."""
    seed = tf.stack([tf.cast(key, tf.int64), tf.constant(_AUGMENT_SALT, tf.int64)])
    params = tf.random.stateless_uniform((config.copies, 6), seed=seed)
    factor = 1.0 + (params[:, 4] * 2.0 - 1.0) * config.contrast
    return _transforms(params, height, width, config), factor, params[:, 5] < 0.5


def _transform_copies(
    copies: tf.Tensor,
    transforms: tf.Tensor,
    factor: tf.Tensor,
    flip: tf.Tensor,
    config: TTAConfig,
) -> tf.Tensor:
    """Apply per-row transforms, contrast factors and flips to ``(rows, H, W, C)`` copies."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=copies,
        transforms=transforms,
        output_shape=tf.constant([copies.shape[1], copies.shape[2]], tf.int32),
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    if config.contrast > 0:
        mean = tf.reduce_mean(out, axis=(1, 2), keepdims=True)
        out = (out - mean) * factor[:, None, None, None] + mean
        out = tf.clip_by_value(out, 0.0, 255.0)
    if config.flip:
        flipped = tf.reverse(out, axis=[2])
        out = tf.where(flip[:, None, None, None], flipped, out)
    return out


def augment_copies(image: tf.Tensor, key: tf.Tensor, config: TTAConfig) -> tf.Tensor:
    """Make the K test-time copies of one image.

    Args:
        image: ``float32`` image of shape ``(height, width, channels)`` with values in
            ``[0, 255]``.
        key: The image's ``uint32`` key (scalar).
        config: The augmentation settings.

    Returns:
        ``float32`` tensor of shape ``(K, height, width, channels)`` with values in ``[0, 255]``.
    """
    copies = tf.repeat(image[None], config.copies, axis=0)
    if config.copies == 1:
        return copies
    parameters = _copy_parameters(key, config, image.shape[0], image.shape[1])
    return _transform_copies(copies, *parameters, config)


class CopyMaker:
    """Makes the test-time copies of a batch of images a range of rows at a time.

    Row ``r`` of a batch is copy ``r % K`` of image ``r // K`` (the order of
    ``augment_copies`` stacked image by image), and it is the same array whichever range it is
    made in: each image's copy parameters are drawn whole from its key, then sliced. Making
    rows range by range keeps the copies of a batch within the memory budget however large K is.

    Args:
        config: The augmentation settings.
        shape: ``(height, width, channels)`` of the images.
        rescale: Factor applied to the copies' pixel values ``[0, 255]``.
    """

    def __init__(self, config: TTAConfig, shape: tuple[int, int, int], rescale: float) -> None:
        self.config = config
        self.rescale = rescale
        self._function = tf.function(
            self._rows,
            input_signature=[
                tf.TensorSpec((None, *shape), tf.float32),
                tf.TensorSpec((None,), tf.uint32),
                tf.TensorSpec((), tf.int32),
                tf.TensorSpec((), tf.int32),
            ],
        )

    def _rows(self, images: tf.Tensor, keys: tf.Tensor, start: tf.Tensor, stop: tf.Tensor):
        copies = self.config.copies
        rows = tf.range(start, stop)
        if copies == 1:
            return tf.gather(images, rows) * tf.constant(self.rescale, tf.float32)
        first, last = start // copies, (stop - 1) // copies + 1
        height, width = images.shape[1], images.shape[2]
        # Per image with shape (K, ...), as augment_copies draws them: bitwise the same values.
        transforms, factor, flip = tf.map_fn(
            lambda key: _copy_parameters(key, self.config, height, width),
            keys[first:last],
            fn_output_signature=(
                tf.TensorSpec((copies, 8), tf.float32),
                tf.TensorSpec((copies,), tf.float32),
                tf.TensorSpec((copies,), tf.bool),
            ),
        )
        wanted = rows - first * copies
        parameters = [
            tf.gather(tf.reshape(transforms, [-1, 8]), wanted),
            tf.gather(tf.reshape(factor, [-1]), wanted),
            tf.gather(tf.reshape(flip, [-1]), wanted),
        ]
        out = _transform_copies(tf.gather(images, rows // copies), *parameters, self.config)
        return out * tf.constant(self.rescale, tf.float32)

    def rows(self, images: tf.Tensor, keys: tf.Tensor, start: int, stop: int) -> tf.Tensor:
        """Rows ``start:stop`` of the batch's copies.

        Args:
            images: ``float32`` images ``(B, height, width, channels)``, values in ``[0, 255]``.
            keys: Their ``uint32`` keys ``(B,)``.
            start: First row (``0 <= start <= stop <= B * K``).
            stop: One past the last row.

        Returns:
            ``float32`` copies ``(stop - start, height, width, channels)``, rescaled.
        """
        return self._function(
            images, keys, tf.constant(start, tf.int32), tf.constant(stop, tf.int32)
        )
