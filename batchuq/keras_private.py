"""Every private Keras API batchuq relies on, behind one small function each.

Keras 3 has no public way to list a model's nested layers, walk a functional graph node by
node, run one node, or read a spatial dropout layer's mask shape, and MC sampling
(``batchuq.sampling``) needs all four. Each function below says which private attribute or
behaviour it relies on and the Keras version it was checked against, so that a Keras upgrade
is checked here and nowhere else (``tests/test_sample.py`` exercises every function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

KERAS_CHECKED = "3.15.1"  # the version every function below was read against


def flatten_layers(
    layer: keras.layers.Layer, include_self: bool = False, recursive: bool = True
) -> list[keras.layers.Layer]:
    """Every layer inside ``layer`` (nested models and their layers too), each once.

    Args:
        layer: A layer or model.
        include_self: Put ``layer`` itself first.
        recursive: Also the layers inside sublayers (otherwise one level, like ``.layers``).

    Returns:
        The layers, breadth-first in tracking order (the order the model was built in).
    """
    # Layer._flatten_layers(include_self, recursive): breadth-first over the sublayers tracked
    # by Layer.__setattr__, skipping repeats. `model.layers` is one level deep only.
    # Checked against Keras 3.15.1.
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def spatial_noise_shape(layer: keras.layers.Layer, inputs: tf.Tensor) -> tuple | None:
    """The dropout mask shape of a ``SpatialDropout1D/2D/3D`` layer for ``inputs``, else None.

    Args:
        layer: A dropout layer.
        inputs: The tensor it would drop from, ``(rows, ...)``.

    Returns:
        The mask shape (one entry per axis of ``inputs``; 1 on the axes one mask spans, e.g.
        ``(rows, 1, 1, channels)`` for ``SpatialDropout2D`` channels-last), or ``None`` for
        layers that have no such method (their public ``noise_shape`` applies).
    """
    # BaseSpatialDropout._get_noise_shape(inputs): the spatial layers keep `noise_shape` None
    # and compute the mask shape from the input's shape and `data_format` in this method.
    # Checked against Keras 3.15.1.
    get_noise_shape = getattr(layer, "_get_noise_shape", None)
    return None if get_noise_shape is None else tuple(get_noise_shape(inputs))


def graph_model(model: keras.Model) -> keras.Model | None:
    """The functional graph a model runs through: itself, a built Sequential's, or None.

    Args:
        model: A Keras model.

    Returns:
        A model whose nodes ``graph_nodes`` can walk, or ``None`` (subclassed models, and
        Sequential models built without an input shape).
    """
    if isinstance(model, keras.Sequential):
        # Sequential._functional: the Functional model a built Sequential delegates `call` to
        # (None until built with a known input). Checked against Keras 3.15.1.
        model = getattr(model, "_functional", None)
    # Function._nodes_by_depth exists on functional graphs only. Checked against Keras 3.15.1.
    if model is None or not hasattr(model, "_nodes_by_depth"):
        return None
    return model


@dataclass(frozen=True, eq=False)
class GraphNode:
    """One call of an operation (a layer or a ``keras.ops`` function) in a functional graph.

    Attributes:
        operation: The layer or operation called.
        input_tensors: The symbolic tensors it reads (ids key the values in ``run_node``).
        outputs: The symbolic tensors it makes, in the order of its flattened outputs.
        node: The Keras node itself, for ``run_node``.
    """

    operation: Any
    input_tensors: tuple
    outputs: tuple
    node: Any


def graph_nodes(graph: keras.Model) -> list[GraphNode]:
    """The operation calls of a functional graph in an order that runs it, inputs first.

    Args:
        graph: A model returned by ``graph_model``.

    Returns:
        The nodes, input layers left out.
    """
    # Function._nodes_by_depth: {depth: [Node]}, depth 0 holding the nodes that make the
    # outputs, so deepest first is an execution order (Function._run_through_graph walks it
    # so). Node.operation, Node.is_input, Node.input_tensors (the KerasTensors it reads) and
    # Node.outputs: keras.src.ops.node.Node, which Keras does not export. Checked against
    # Keras 3.15.1.
    by_depth = graph._nodes_by_depth
    return [
        GraphNode(node.operation, tuple(node.input_tensors), tuple(node.outputs), node)
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation and not node.is_input
    ]


def run_node(node: GraphNode, tensors: dict[int, Any]) -> None:
    """Call one node on computed values in inference mode, adding its outputs to ``tensors``.

    Args:
        node: A node from ``graph_nodes``.
        tensors: ``id(symbolic tensor) -> value``; must hold every tensor the node reads.
    """
    # Node.arguments.fill_in(tensors): SymbolicArguments rebuilds the call's args and kwargs
    # with each KerasTensor replaced by tensors[id(tensor)]. Layer._call_context_args: the
    # context arguments (here `training`) a layer's call accepts; passing `training` only to
    # those is what Functional.call does (functional.operation_fn). Checked against Keras 3.15.1.
    args, kwargs = node.node.arguments.fill_in(tensors)
    operation = node.operation
    if "training" in getattr(operation, "_call_context_args", ()):
        kwargs = {**kwargs, "training": False}
    outputs = operation(*args, **kwargs)
    for symbolic, value in zip(node.outputs, tf.nest.flatten(outputs), strict=True):
        tensors[id(symbolic)] = value


def override_call(layer: keras.layers.Layer, call: Callable[..., Any]) -> None:
    """Make ``layer.call`` run ``call`` until ``restore_call``; the model is not changed.

    Args:
        layer: The layer.
        call: Takes the arguments of the layer's ``call`` (without ``self``).
    """
    # Layer.__call__ looks `self.call` up at call time, so an instance attribute shadows the
    # class's method; object.__setattr__ skips Layer.__setattr__, whose tracker would record
    # the function as state of the layer. Checked against Keras 3.15.1.
    object.__setattr__(layer, "call", call)


def restore_call(layer: keras.layers.Layer) -> None:
    """Undo ``override_call``: the class's ``call`` applies again (a no-op if not overridden)."""
    # The override lives in the instance's __dict__ (see override_call). Checked against
    # Keras 3.15.1.
    if "call" in layer.__dict__:
        object.__delattr__(layer, "call")
