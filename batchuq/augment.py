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
    """

    copies: int = 1
    rotation: float = 15.0
    zoom: float = 0.1
    shift: float = 0.1
    contrast: float = 0.1
    flip: bool = False

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise ValueError(f"`tta` must be at least 1. Received: tta={self.copies}")
        for name in ("rotation", "zoom", "shift", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`tta_{name}` must be >= 0. Received: tta_{name}={getattr(self, name)}"
                )
        if self.zoom >= 1 or self.contrast >= 1:
            raise ValueError(
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
    height, width = image.shape[0], image.shape[1]
    seed = tf.stack([tf.cast(key, tf.int64), tf.constant(_AUGMENT_SALT, tf.int64)])
    params = tf.random.stateless_uniform((config.copies, 6), seed=seed)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=copies,
        transforms=_transforms(params, height, width, config),
        output_shape=tf.constant([height, width], tf.int32),
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    if config.contrast > 0:
        factor = 1.0 + (params[:, 4] * 2.0 - 1.0) * config.contrast
        mean = tf.reduce_mean(out, axis=(1, 2), keepdims=True)
        out = (out - mean) * factor[:, None, None, None] + mean
        out = tf.clip_by_value(out, 0.0, 255.0)
    if config.flip:
        flipped = tf.reverse(out, axis=[2])
        out = tf.where((params[:, 5] < 0.5)[:, None, None, None], flipped, out)
    return out
