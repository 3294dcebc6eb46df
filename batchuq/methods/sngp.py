"""SNGP (docs/methods.md, "SNGP"): one network pass per row, then only the GP head is sampled.

The network runs once per row up to the GP layer's input ``h``. The head gives the MAP logits
``mu (classes,)`` and the posterior variance ``var`` (one number per row, shared by every
class; see ``batchuq.sngp``). Then:

* ``passes = 1``: the mean-field probabilities ``softmax(mu / sqrt(1 + lambda var))``,
  deterministic;
* ``passes = T``: T logit vectors ``mu + sqrt(var) z_t`` with ``z_t ~ N(0, I)``, and the softmax
  of each. ``z_t`` of a row depends only on the row's key and ``t`` (``mix(key, t)`` as in MC
  dropout, then a constant for the head), never on the batch, the chunk or T itself: the first
  10 passes of T = 100 are the 10 passes of T = 10.

Its extras (``sample_with_extras``), from the same network pass: ``gp_variance`` (``var``),
``max_logit`` and ``energy`` of the MAP logits ``mu`` (not of the sampled or mean-field ones),
and ``features``, the GP layer's input ``h``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from batchuq.defaults import DEFAULT_MEAN_FIELD_LAMBDA, DEFAULT_MEMORY_BUDGET_MB
from batchuq.errors import ModelError, UsageError
from batchuq.methods.base import UncertaintyMethod
from batchuq.methods.registry import MethodSettings, register_method
from batchuq.sampling.memory import balanced_chunks
from batchuq.seeds import mix, uniform_from_keys
from batchuq.sngp import (
    RandomFeatureGaussianProcess,
    gp_layers,
    is_sngp_model,
    mean_field_logits,
)

if TYPE_CHECKING:
    from batchuq.models import LoadedModel

#: The ``method`` recorded in the Parquet metadata of an SNGP run.
METHOD_NAME = "sngp"

# Mixed into a pass key for the head's normal draws (as dropout layers mix in their own id).
_HEAD_SALT = 0x53A6
# Activation bytes per input element, a rough bound for the small SNGP CNNs (16 float32
# activations per input value); the memory budget sets the rows run at once from it.
_BYTES_PER_INPUT_VALUE = 4 * 16


def standard_normal_from_keys(row_keys: tf.Tensor, passes: int, classes: int) -> tf.Tensor:
    """Standard normal draws ``(rows, passes, classes)``; row i, pass t from ``mix(key_i, t)``.

    Box-Muller on two 24-bit uniforms per value (``1 - u`` is in ``(0, 1]``, so the log is
    finite; the largest draw is about 5.8).

    Args:
        row_keys: ``uint32`` keys ``(rows,)``.
        passes: T.
        classes: Values per pass.

    Returns:
        float32 ``(rows, passes, classes)``.
    """
    rows = tf.shape(row_keys)[0]
    pass_index = tf.cast(tf.range(passes), tf.uint32)
    pass_keys = mix(mix(row_keys[:, None], pass_index[None, :]), _HEAD_SALT)  # (rows, T)
    uniform = uniform_from_keys(tf.reshape(pass_keys, [-1]), tf.stack([rows * passes, 2, classes]))
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - uniform[:, 0]))
    normal = radius * tf.cos(2.0 * math.pi * uniform[:, 1])
    return tf.reshape(normal, [rows, passes, classes])


def find_gp_head(model: keras.Model) -> RandomFeatureGaussianProcess:
    """The model's GP output layer.

    Raises:
        ModelError: If the model has no GP layer, more than one, or one that is not its output.
    """
    found = gp_layers(model)
    if len(found) != 1:
        raise ModelError(
            "SNGP scoring needs a model with exactly one RandomFeatureGaussianProcess layer "
            f"(import batchuq.sngp before loading it). Received: gp_layers={len(found)}"
        )
    head = found[0]
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1 or outputs[0] is not head.output:
        raise ModelError(
            "SNGP scoring needs the GP layer's logits as the model's only output (a functional "
            f"model ending in it). Received: gp_layer={head.name!r}"
        )
    return head


class SNGP(UncertaintyMethod):
    """Mean-field probabilities (T = 1) or T posterior samples of the GP head per row.

    Args:
        model: A functional model whose output is a ``RandomFeatureGaussianProcess`` layer
            (``batchuq.sngp.sngp_cnn``).
        passes: T: 1 for the mean-field probabilities, else posterior samples per row.
        lambda_: The mean-field factor (only used with ``passes=1``).
        memory_budget_mb: Bound on the activations of the rows run at once.

    Raises:
        UsageError: If ``passes < 1`` or ``lambda_ < 0``.
        ModelError: If the model is not an SNGP model (see ``find_gp_head``).
    """

    def __init__(
        self,
        model: keras.Model,
        passes: int = 1,
        lambda_: float = DEFAULT_MEAN_FIELD_LAMBDA,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> None:
        if passes < 1:
            raise UsageError(f"`passes` must be at least 1. Received: passes={passes}")
        if lambda_ < 0:
            raise UsageError(f"`lambda_` must be at least 0. Received: lambda_={lambda_}")
        self.head = find_gp_head(model)
        self.passes = int(passes)
        self.lambda_ = float(lambda_)
        self.samples_per_row = self.passes
        self.extras = ("max_logit", "energy", "features", "gp_variance")
        # The network up to the GP layer's input: run once per row.
        # (A one-input model's own input tensor, not a list: Keras warns about the structure.)
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self.features = keras.Model(inputs, self.head.input)
        self.covariance = tf.constant(self.head.covariance())  # (M, M), inverted once
        input_shape = tuple(model.inputs[0].shape)
        per_row = _BYTES_PER_INPUT_VALUE * math.prod(d or 1 for d in input_shape[1:])
        self.max_chunk_rows = max(1, int(memory_budget_mb * 2**20 // per_row))
        signature = [
            tf.TensorSpec((None, *input_shape[1:]), tf.float32),
            tf.TensorSpec((None,), tf.uint32),
        ]
        self._function = tf.function(self._sample, input_signature=signature)
        self._variance_function = tf.function(self._variance, input_signature=signature[:1])

    def _variance(self, rows: tf.Tensor) -> tf.Tensor:
        """``(rows,)`` GP posterior variance, clamped at 0."""
        hidden = self.features(rows, training=False)
        # Clamped at 0: float32 rounding can leave a tiny negative variance far inside the data.
        return tf.maximum(self.head.mean_and_variance(hidden, self.covariance)[1], 0.0)

    def _sample(
        self, rows: tf.Tensor, row_keys: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(rows, T, classes)`` probabilities, the ``(rows,)`` variance, the MAP logits and
        the hidden features; the network once, the head's draws after."""
        hidden = self.features(rows, training=False)
        logits, variance = self.head.mean_and_variance(hidden, self.covariance)
        variance = tf.maximum(variance, 0.0)
        hidden = tf.reshape(tf.cast(hidden, tf.float32), [tf.shape(hidden)[0], -1])
        if self.passes == 1:
            probs = tf.nn.softmax(mean_field_logits(logits, variance, self.lambda_))
            return probs[:, None, :], variance, logits, hidden
        noise = standard_normal_from_keys(row_keys, self.passes, self.head.units)
        scale = tf.sqrt(variance)[:, None, None]
        probs = tf.nn.softmax(logits[:, None, :] + scale * noise, axis=-1)
        return probs, variance, logits, hidden

    def row_chunks(self, rows: int) -> list[tuple[int, int]]:
        """Balanced chunks of at most ``max_chunk_rows`` rows (sizes differ by at most one)."""
        return balanced_chunks(rows, self.max_chunk_rows)

    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        """``(rows, passes, classes)`` probabilities; see ``UncertaintyMethod.sample``."""
        return self.sample_and_variance(rows, row_keys)[0]

    def sample_and_variance(
        self, rows: tf.Tensor, row_keys: tf.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """``sample``'s probabilities and each row's GP posterior variance, from one pass.

        The variance ``v`` (``batchuq.sngp.RandomFeatureGaussianProcess.mean_and_variance``,
        clamped at 0) is SNGP's own out-of-distribution score: it grows with the distance of a
        row's hidden features from the training data's.

        Returns:
            float32 ``(rows, passes, classes)`` and float32 ``(rows,)``.
        """
        rows = tf.convert_to_tensor(rows, tf.float32)
        row_keys = tf.convert_to_tensor(row_keys, tf.uint32)
        probs, variance, _, _ = self._function(rows, row_keys)
        return probs.numpy(), variance.numpy()

    def sample_with_extras(
        self, rows: tf.Tensor, row_keys: tf.Tensor
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``sample``'s probabilities and, from the same network pass, the extras.

        Returns:
            float32 ``(rows, passes, classes)``, and float32 ``gp_variance`` (as
            ``sample_and_variance``), ``max_logit`` and ``energy`` (``-logsumexp``) of the MAP
            logits ``(rows,)``, and ``features`` (the GP layer's input) ``(rows, D)``.
        """
        rows = tf.convert_to_tensor(rows, tf.float32)
        row_keys = tf.convert_to_tensor(row_keys, tf.uint32)
        probs, variance, logits, hidden = self._function(rows, row_keys)
        logits = logits.numpy().astype(np.float64)
        top = logits.max(axis=1)
        energy = -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))
        extras = {
            "max_logit": top.astype(np.float32),
            "energy": energy.astype(np.float32),
            "features": hidden.numpy(),
            "gp_variance": variance.numpy(),
        }
        return probs.numpy(), extras

    def variance(self, rows: tf.Tensor) -> np.ndarray:
        """Each row's GP posterior variance, float32 ``(rows,)`` (see ``sample_and_variance``)."""
        return self._variance_function(tf.convert_to_tensor(rows, tf.float32)).numpy()

    def metadata(self) -> dict[str, Any]:
        """The method, T, lambda and the GP's features; nothing sampled inside the network."""
        return {
            "method": METHOD_NAME,
            "passes": self.passes,
            "lambda": self.lambda_,
            "num_inducing": self.head.num_inducing,
            "precision": "float32",
            "precision_requested": "float32",
            "logits": False,
            "sampled_layers": [],
        }


def build_sngp(models: Sequence[LoadedModel], settings: MethodSettings) -> SNGP:
    """SNGP of one model with a GP head, as the run's settings ask (the registry's builder).

    Raises:
        UsageError: If the run has several models.
        ModelError: If the model has no GP head.
    """
    if len(models) != 1:
        raise UsageError(
            f"SNGP scores one model. Received: {len(models)} models, method='{METHOD_NAME}'"
        )
    return SNGP(models[0].model, settings.passes, memory_budget_mb=settings.memory_budget_mb)


def _is_one_sngp_model(models: Sequence[LoadedModel]) -> bool:
    return len(models) == 1 and is_sngp_model(models[0].model)


register_method(METHOD_NAME, build_sngp, detect=_is_one_sngp_model)
