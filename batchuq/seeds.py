"""Per-image random keys, so results never depend on batch size, order or resumption.

Every random draw batchuq makes (test-time augmentation, dropout masks) is a pure function of
``(run seed, image path, TTA copy, pass, layer, element)``. Keys are unsigned 32-bit integers
mixed with the MurmurHash3 finaliser, which is cheap enough to run once per mask element inside
the compiled sampler.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf

_GOLDEN = 0x9E3779B9
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35


def image_key(seed: int, relative_path: str) -> int:
    """Return the 32-bit key of one image for one run.

    Args:
        seed: The run seed (``--seed``).
        relative_path: The image path relative to the scored folder, with ``/`` separators.

    Returns:
        An integer in ``[0, 2**32)``.
    """
    digest = hashlib.blake2b(f"{seed}\0{relative_path}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def image_keys(seed: int, relative_paths: list[str]) -> np.ndarray:
    """Return the keys of many images, shape ``(n,)``, dtype ``uint32``."""
    return np.array([image_key(seed, p) for p in relative_paths], dtype=np.uint32)


def fmix32(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3 32-bit finaliser on a ``uint32`` tensor (any shape)."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
    h = h * tf.constant(_M1, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(13, tf.uint32)))
    h = h * tf.constant(_M2, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


def mix(key: tf.Tensor, value: tf.Tensor | int) -> tf.Tensor:
    """Derive a child key from ``key`` and ``value`` (both ``uint32``, broadcastable)."""
    value = (
        tf.cast(value, tf.uint32)
        if isinstance(value, tf.Tensor)
        else tf.constant(value & 0xFFFFFFFF, tf.uint32)
    )
    return fmix32(tf.bitwise.bitwise_xor(key, fmix32(value + tf.constant(_GOLDEN, tf.uint32))))


def uniform_from_keys(row_keys: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Draw uniform numbers in ``[0, 1)`` from one key per row.

    Args:
        row_keys: ``uint32`` tensor of shape ``(rows,)``.
        shape: Full shape ``(rows, ...)`` of the draw, as a 1-D integer tensor.

    Returns:
        A ``float32`` tensor of ``shape``; row ``i`` depends only on ``row_keys[i]``.
    """
    shape = tf.cast(shape, tf.int32)
    per_row = tf.reduce_prod(shape[1:])
    counter = tf.reshape(tf.range(per_row, dtype=tf.int32), shape[1:])
    counter = tf.cast(counter, tf.uint32)
    rank = tf.size(shape)
    keys = tf.reshape(row_keys, tf.concat([shape[:1], tf.ones([rank - 1], tf.int32)], 0))
    bits = fmix32(tf.bitwise.bitwise_xor(fmix32(keys), counter * tf.constant(_GOLDEN, tf.uint32)))
    # 24 high bits give exactly representable float32 values in [0, 1).
    return tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32) * (
        1.0 / (1 << 24)
    )
