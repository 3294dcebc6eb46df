"""The graph split of a functional model and the memory estimate of its two parts.

Layers whose output cannot depend on a dropout mask (the *prefix*) run once per image; only the
*tail* runs on the rows tiled over passes. ``split_graph`` finds the first tensors that depend
on a sampled dropout layer and estimates the activation bytes per row of each part, which the
memory budget turns into rows (``batchuq.sampling.memory``). Subclassed models cannot be walked:
they have no split, and the sampler tiles the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from batchuq.keras_private import GraphNode, flatten_layers, graph_model, graph_nodes, run_node


def _contains(operation: object, targets: set[int]) -> bool:
    if id(operation) in targets:
        return True
    if isinstance(operation, keras.layers.Layer):
        return any(id(inner) in targets for inner in flatten_layers(operation))
    return False


@dataclass
class GraphSplit:
    """A functional model split into a mask-independent prefix and a stochastic tail.

    Attributes:
        prefix: Nodes that run once per row, in execution order.
        tail: Nodes that run on rows tiled over passes, in execution order.
        frontier: Ids of prefix tensors the tail (or the output) reads.
        frontier_shapes: Their symbolic shapes, ``(None, ...)``, in the same order.
        tail_bytes_per_row: Estimated float32 bytes of tail activations per row.
    """

    graph: keras.Model
    prefix: list[GraphNode] = field(default_factory=list)
    tail: list[GraphNode] = field(default_factory=list)
    frontier: list[int] = field(default_factory=list)
    frontier_shapes: list[tuple] = field(default_factory=list)
    tail_bytes_per_row: int = 0
    prefix_bytes_per_row: int = 0


def _row_bytes(tensor: object) -> int:
    """float32 bytes of one row of a symbolic tensor."""
    return 4 * math.prod(d or 1 for d in tensor.shape[1:])


def _inner_peak_bytes(operation: object) -> int:
    """Peak activation bytes per row inside a nested functional or Sequential model, else 0."""
    if not isinstance(operation, keras.Model):
        return 0
    graph = _functional_graph(operation)
    if graph is None:
        return 0
    keep = {id(t) for t in graph.outputs}
    return _peak_live_bytes(graph.inputs, graph_nodes(graph), keep)


def _peak_live_bytes(inputs: list, nodes: list[GraphNode], keep: set[int]) -> int:
    """Estimated peak float32 bytes per row alive while ``nodes`` run in order.

    A tensor lives from the node that makes it to its last reader; ids in ``keep`` (tensors
    read after ``nodes``, such as the prefix's frontier) live to the end. A nested model counts
    with its own peak. A rough bound: it ignores kernels' scratch space.
    """
    last_read: dict[int, int] = {}
    for step, node in enumerate(nodes):
        for tensor in node.input_tensors:
            last_read[id(tensor)] = step
    live = {id(t): _row_bytes(t) for t in inputs}
    peak = sum(live.values())
    for step, node in enumerate(nodes):
        made = sum(_row_bytes(t) for t in node.outputs)
        peak = max(peak, sum(live.values()) + max(made, _inner_peak_bytes(node.operation)))
        for tensor in node.outputs:
            live[id(tensor)] = _row_bytes(tensor)
        for tensor in [*node.input_tensors, *node.outputs]:
            if last_read.get(id(tensor), -1) <= step and id(tensor) not in keep:
                live.pop(id(tensor), None)
    return peak


def _functional_graph(model: keras.Model) -> keras.Model | None:
    """The walkable graph of a model with one input and one output, else ``None``."""
    graph = graph_model(model)
    if graph is None or len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return None
    return graph


def split_graph(model: keras.Model, sampled: list[keras.layers.Layer]) -> GraphSplit | None:
    """Split a functional model at the first tensors that depend on a dropout mask.

    Args:
        model: The model (functional or Sequential).
        sampled: The dropout layers that will be sampled.

    Returns:
        The split, or ``None`` for models whose graph cannot be walked (subclassed models).
    """
    graph = _functional_graph(model)
    if graph is None:
        return None
    targets = {id(layer) for layer in sampled}
    stochastic: set[int] = set()
    split = GraphSplit(graph=graph)
    for node in graph_nodes(graph):
        inputs = [id(t) for t in node.input_tensors]
        if _contains(node.operation, targets) or any(i in stochastic for i in inputs):
            split.tail.append(node)
            stochastic.update(id(t) for t in node.outputs)
            for tensor in node.input_tensors:
                if id(tensor) not in stochastic and id(tensor) not in split.frontier:
                    split.frontier.append(id(tensor))
                    split.frontier_shapes.append(tuple(tensor.shape))
            # A nested model (e.g. a keras.applications base with its own dropout) counts
            # with the activations inside it, not just its output.
            split.tail_bytes_per_row += max(
                sum(_row_bytes(t) for t in node.outputs), _inner_peak_bytes(node.operation)
            )
        else:
            split.prefix.append(node)
    output = graph.outputs[0]
    if id(output) not in stochastic and id(output) not in split.frontier:
        split.frontier.append(id(output))
        split.frontier_shapes.append(tuple(output.shape))
    split.prefix_bytes_per_row = _peak_live_bytes(graph.inputs, split.prefix, set(split.frontier))
    return split


def run_nodes(nodes: list[GraphNode], tensors: dict[int, tf.Tensor]) -> None:
    """Run functional-graph nodes in inference mode, writing outputs into ``tensors``."""
    for node in nodes:
        run_node(node, tensors)
