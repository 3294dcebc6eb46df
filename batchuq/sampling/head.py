"""The classifier head of a functional model: its pre-softmax logits and penultimate features.

Out-of-distribution scores beyond the probabilities need two tensors the model does not output:

* the **logits**, what the softmax reads (max-logit, Hendrycks et al. 2022; energy, Liu et al.
  2020): the model's output itself for a model that ends in logits (``--logits``), the input of
  a final ``Softmax`` layer (or ``Activation("softmax")``), or the pre-activation of a final
  ``Dense(..., activation="softmax")``, ``features @ kernel + bias``;
* the **penultimate features**, the input of the final ``Dense`` layer (the feature-space kNN
  score, Sun et al. 2022).

``find_head`` finds them in a functional graph by its last nodes; a model whose last nodes are
anything else (a subclassed model, a softmax after a pooling, ...) has no head here, and its
runs write no logit or feature score.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from batchuq.keras_private import GraphNode, graph_nodes

#: Names of the per-row values a head gives (``head_values``).
HEAD_VALUES = ("max_logit", "energy", "features")


def _is_softmax(operation: object) -> bool:
    """A ``Softmax`` layer, or an ``Activation`` layer applying the softmax."""
    if isinstance(operation, keras.layers.Softmax):
        return True
    if isinstance(operation, keras.layers.Activation):
        return getattr(operation.activation, "__name__", None) == "softmax"
    return False


def _activation(layer: keras.layers.Dense) -> str | None:
    return getattr(getattr(layer, "activation", None), "__name__", None)


@dataclass(frozen=True)
class Head:
    """Where a model's logits and penultimate features are.

    Attributes:
        logits: The symbolic tensor holding the logits, or ``None`` when they are the
            pre-activation of ``dense`` (a ``Dense`` with a softmax activation).
        features: The input of the final ``Dense`` layer, ``(rows, D)``, or ``None``.
        dense: The final ``Dense`` layer whose pre-activation is computed, or ``None``.
    """

    logits: object | None
    features: object | None
    dense: keras.layers.Dense | None = None

    @property
    def tensors(self) -> list[object]:
        """The symbolic tensors ``head_values`` reads."""
        return [t for t in (self.logits, self.features) if t is not None]

    @property
    def width(self) -> int:
        """D, the number of penultimate features (0 without them)."""
        return 0 if self.features is None else int(self.features.shape[-1])


def _single_input(node: GraphNode) -> object | None:
    """The one tensor a node reads, if it reads one of rank 2 (``(rows, features)``)."""
    if len(node.input_tensors) != 1 or len(node.input_tensors[0].shape) != 2:
        return None
    return node.input_tensors[0]


def find_head(graph: keras.Model, logits: bool) -> Head | None:
    """The logits and penultimate features of a functional graph (``keras_private.graph_model``).

    Args:
        graph: The model's functional graph (one input, one output).
        logits: The model outputs logits (``--logits``).

    Returns:
        The ``Head``, or ``None`` when neither the logits nor the features can be found.
    """
    nodes = graph_nodes(graph)
    output = graph.outputs[0]
    made_by = {id(t): node for node in nodes for t in node.outputs}
    last = made_by.get(id(output))
    if last is None:
        return None
    operation = last.operation
    if isinstance(operation, keras.layers.Dense) and _single_input(last) is not None:
        features = _single_input(last)
        if _activation(operation) == "softmax":
            return Head(logits=None, features=features, dense=operation)
        if logits and _activation(operation) == "linear":
            return Head(logits=output, features=features)
        return None
    if _is_softmax(operation) and _single_input(last) is not None:
        before = _single_input(last)
        producer = made_by.get(id(before))
        features = None
        if (
            producer is not None
            and isinstance(producer.operation, keras.layers.Dense)
            and _activation(producer.operation) == "linear"
            and _single_input(producer) is not None
        ):
            features = _single_input(producer)
        return Head(logits=before, features=features)
    if logits and len(output.shape) == 2:
        return Head(logits=output, features=None)
    return None


def head_values(head: Head, tensors: dict[int, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Per row: the max logit, the energy ``-logsumexp(logits)`` and the features (float32).

    The energy follows Liu et al. (2020), ``E(x) = -logsumexp(f(x))`` at temperature 1: higher
    is more out-of-distribution (OpenOOD's energy *score* is its negation).

    Args:
        head: What ``find_head`` returned.
        tensors: Computed values by symbolic tensor id; must hold those of ``head.tensors``.

    Returns:
        ``max_logit`` and ``energy`` ``(rows,)`` when the logits are known, and ``features``
        ``(rows, D)`` when the penultimate layer is known.
    """
    values: dict[str, tf.Tensor] = {}
    features = None
    if head.features is not None:
        features = tf.cast(tensors[id(head.features)], tf.float32)
        values["features"] = features
    if head.logits is not None:
        logits = tf.cast(tensors[id(head.logits)], tf.float32)
    else:
        kernel = tf.cast(head.dense.kernel, tf.float32)
        logits = tf.matmul(features, kernel)
        if head.dense.use_bias:
            logits = logits + tf.cast(head.dense.bias, tf.float32)
    values["max_logit"] = tf.reduce_max(logits, axis=-1)
    values["energy"] = -tf.reduce_logsumexp(logits, axis=-1)
    return values
