"""Dropout layers made stochastic per row: which layers are sampled and how a mask is drawn.

Only dropout layers are stochastic. Every other layer (BatchNormalization, in-model augmentation
layers, ...) runs in inference mode, so scoring never changes the model and never depends on
which images share a batch. Dropout layers are made stochastic by swapping their ``call`` for a
sampling one while the compiled function is traced (``dropout_sampling``); that also covers a
``Dropout(...)(x, training=True)`` written into a functional model, which Keras 3's
``model.predict`` silently turns off.

Masks come from per-row keys (see ``batchuq.seeds``): pass ``t`` of row ``i`` uses
``mix(key_i, t)``, so every image's samples are independent of batch size and order.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import threading
from collections.abc import Iterator

import keras
import tensorflow as tf

from batchuq.keras_private import flatten_layers, override_call, restore_call, spatial_noise_shape
from batchuq.seeds import mix, uniform_from_keys

DROPOUT_TYPES: tuple[type, ...] = (
    keras.layers.Dropout,  # includes SpatialDropout1D/2D/3D
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)

_STATE = threading.local()


def find_dropout_layers(
    model: keras.Model, patterns: tuple[str, ...] | list[str] | None = None
) -> list[keras.layers.Layer]:
    """Return the dropout layers of ``model`` (nested ones included) that will be sampled.

    Args:
        model: A Keras model.
        patterns: Optional shell-style patterns (``fnmatch``) on layer names; when given, only
            matching dropout layers are sampled, e.g. to leave stochastic-depth layers alone.

    Returns:
        The layers, in the model's layer order.
    """
    layers = [layer for layer in flatten_layers(model) if isinstance(layer, DROPOUT_TYPES)]
    if patterns:
        layers = [
            layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)
        ]
    return layers


def _noise_shape(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The mask shape of ``layer`` for ``inputs``, always one mask row per input row."""
    shape = tf.shape(inputs)
    spatial = spatial_noise_shape(layer, inputs)  # SpatialDropout*: one mask per feature map
    if spatial is not None:
        noise = [shape[i] if d is None else d for i, d in enumerate(spatial)]
    elif getattr(layer, "noise_shape", None) is not None:
        noise = [shape[i] if d is None else d for i, d in enumerate(layer.noise_shape)]
    else:
        return shape
    noise[0] = shape[0]  # masks are per row; a shared mask would couple images in a batch
    return tf.stack([tf.cast(d, tf.int32) for d in noise])


def sample_dropout(layer: keras.layers.Layer, inputs: tf.Tensor, row_keys: tf.Tensor) -> tf.Tensor:
    """Apply one stochastic dropout draw with per-row keys.

    Args:
        layer: A Dropout (or subclass), GaussianDropout or AlphaDropout layer.
        inputs: Tensor of shape ``(rows, ...)``.
        row_keys: ``uint32`` keys, shape ``(rows,)``, already specific to this layer.

    Returns:
        A tensor like ``inputs``, with the same expectation as ``inputs``.
    """
    rate = float(layer.rate)
    if rate <= 0.0:
        return inputs
    dtype = inputs.dtype
    if isinstance(layer, keras.layers.GaussianDropout):
        u1 = uniform_from_keys(mix(row_keys, 1), tf.shape(inputs))
        u2 = uniform_from_keys(mix(row_keys, 2), tf.shape(inputs))
        normal = tf.sqrt(-2.0 * tf.math.log(1.0 - u1)) * tf.cos(2.0 * math.pi * u2)
        noise = 1.0 + math.sqrt(rate / (1.0 - rate)) * normal
        return inputs * tf.cast(noise, dtype)
    if rate >= 1.0:
        return tf.zeros_like(inputs)
    if isinstance(layer, keras.layers.AlphaDropout):
        keep = tf.cast(uniform_from_keys(row_keys, _noise_shape(layer, inputs)) >= rate, dtype)
        alpha_p = -1.6732632423543772848170429916717 * 1.0507009873554804934193349852946
        a = ((1 - rate) * (1 + rate * alpha_p**2)) ** -0.5
        b = -a * alpha_p * rate
        return tf.cast(a, dtype) * (inputs * keep + alpha_p * (1 - keep)) + tf.cast(b, dtype)
    return _inverted_dropout(inputs, row_keys, _noise_shape(layer, inputs), rate)


@tf.function(jit_compile=True)
def _inverted_dropout(
    inputs: tf.Tensor, row_keys: tf.Tensor, mask_shape: tf.Tensor, rate: float
) -> tf.Tensor:
    """``inputs * keep / (1 - rate)`` with ``keep`` hashed from the row keys, in one fused kernel.

    XLA fuses the ~15 integer and float operations per element of the hashed mask into one
    pass over memory; run op by op they cost more than the convolutions they feed. The draws are
    exactly those of ``uniform_from_keys`` (integer arithmetic, no rounding to differ).

    Args:
        inputs: Tensor of shape ``(rows, ...)``.
        row_keys: ``uint32`` keys, shape ``(rows,)``.
        mask_shape: Shape of the mask, ``inputs``' shape or broadcastable to it.
        rate: Drop probability in ``(0, 1)``; a Python float (one compilation per rate).

    Returns:
        A tensor like ``inputs``.
    """
    keep = uniform_from_keys(row_keys, mask_shape) >= rate
    scaled = inputs * tf.cast(1.0 / (1.0 - rate), inputs.dtype)
    return tf.where(keep, scaled, tf.zeros_like(scaled))


@contextlib.contextmanager
def dropout_sampling(layers: list[keras.layers.Layer]) -> Iterator[None]:
    """Make ``layers`` draw per-row dropout masks while the context is open.

    Inside, each layer's ``call`` ignores ``training`` and uses the row keys set by
    ``using_row_keys``; on exit the original ``call`` methods are restored.
    """
    for layer_id, layer in enumerate(layers):

        def call(inputs, *args, _layer=layer, _id=layer_id, **kwargs):
            keys = getattr(_STATE, "row_keys", None)
            if keys is None:
                raise RuntimeError("Dropout sampling needs row keys; call through MCSampler.")
            return sample_dropout(_layer, inputs, mix(keys, 0x1000 + _id))

        override_call(layer, call)
    try:
        yield
    finally:
        for layer in layers:
            restore_call(layer)


@contextlib.contextmanager
def using_row_keys(keys: tf.Tensor) -> Iterator[None]:
    """Give the sampling dropout layers these ``uint32`` row keys while the context is open."""
    previous = getattr(_STATE, "row_keys", None)
    _STATE.row_keys = keys
    try:
        yield
    finally:
        _STATE.row_keys = previous
