"""Step 3 of the data flow: Monte Carlo dropout sampling.

Only dropout layers are stochastic. Every other layer (BatchNormalization, in-model augmentation
layers, ...) runs in inference mode, so scoring never changes the model and never depends on
which images share a batch. Dropout layers are made stochastic by swapping their ``call`` for a
sampling one while the compiled function is traced; that also covers a
``Dropout(...)(x, training=True)`` written into a functional model, which Keras 3's
``model.predict`` silently turns off.

Speed: for functional models the graph is split. Layers whose output cannot depend on a dropout
mask (the *prefix*) run once per image; only the *tail* runs on the batch tiled over passes,
in chunks whose size is set by a memory budget. Subclassed models fall back to tiling the whole
model. Both paths draw the same masks, so they give the same samples.

Memory: the same budget bounds the rows run at once. A call with more rows (e.g. a batch of B
images times K test-time copies) is cut into chunks of at most ``max_chunk_rows`` rows, each run
through the prefix and then tiled through the tail, so peak memory does not grow with B x K.

Masks come from per-row keys (see ``seeds.py``): pass ``t`` of row ``i`` uses
``mix(key_i, t)``, so every image's samples are independent of batch size and order.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from batchuq.defaults import DEFAULT_MEMORY_BUDGET_MB, DEFAULT_PRECISION
from batchuq.errors import NoDropoutError, UsageError
from batchuq.keras_private import (
    GraphNode,
    flatten_layers,
    graph_model,
    graph_nodes,
    override_call,
    restore_call,
    run_node,
    spatial_noise_shape,
)
from batchuq.seeds import mix, uniform_from_keys

DROPOUT_TYPES: tuple[type, ...] = (
    keras.layers.Dropout,  # includes SpatialDropout1D/2D/3D
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
PRECISIONS = ("float32", "bfloat16")

_STATE = threading.local()


# bfloat16 instructions in the CPU's feature flags (/proc/cpuinfo): x86 AVX512-BF16 and AMX-BF16,
# Arm BF16.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Values of oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) that keep it from the
# CPU's bfloat16 instructions: every ISA not at or above AVX512_CORE_BF16 in oneDNN's partial
# order (its "CPU Dispatcher Control" guide). AVX2_VNNI_2 is beside the AVX-512 line, not above
# it. Under such a cap TensorFlow still hands bf16 convolutions to oneDNN on an AVX-512 CPU, which
# then refuses them ("could not create a primitive descriptor for the convolution"). The values
# that allow bf16 are AVX512_CORE_BF16, AVX10_1_512 (AVX512_CORE_FP16), AVX10_1_512_AMX
# (AVX512_CORE_AMX), AVX10_1_512_AMX_FP16 (AVX512_CORE_AMX_FP16), ALL and DEFAULT; oneDNN ignores
# a value it does not know (it compares names exactly), and so does ``native_bf16``.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm) from ``/proc/cpuinfo``.

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.

    Returns:
        The flags, or ``None`` when they cannot be read (not Linux).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16).

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.

    Returns:
        ``True`` or ``False`` from the CPU's feature flags, ``None`` when they cannot be read
        (not Linux).
    """
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & _BF16_FLAGS)


def onednn_isa_cap(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The ISA cap oneDNN reads from the environment, as ``(variable, value)``.

    oneDNN reads ``ONEDNN_MAX_CPU_ISA`` and, only when that is not set, its older name
    ``DNNL_MAX_CPU_ISA``.

    Args:
        environ: The environment; ``os.environ`` when ``None``.

    Returns:
        The variable and its value, or ``None`` when neither is set.
    """
    environ = os.environ if environ is None else environ
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if name in environ:
            return name, environ[name]
    return None


def native_bf16(
    cpuinfo: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[bool | None, str]:
    """Whether bfloat16 passes would run on the CPU's bfloat16 instructions in this process.

    That needs the instructions (``cpu_has_bf16``), oneDNN (TensorFlow's CPU kernels for
    convolutions and matmuls; ``TF_ENABLE_ONEDNN_OPTS=0`` turns it off and leaves bf16 to
    emulation) and an ISA cap that lets oneDNN use them (``ONEDNN_MAX_CPU_ISA``, see
    ``ONEDNN_ISAS_WITHOUT_BF16``). Read before TensorFlow runs anything: oneDNN reads the cap once.

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.
        environ: The environment; ``os.environ`` when ``None``.

    Returns:
        ``(native, why_not)``: ``native`` is ``True``, ``False``, or ``None`` when the CPU's
        flags cannot be read; ``why_not`` says why it is not (empty otherwise).
    """
    environ = os.environ if environ is None else environ
    has = cpu_has_bf16(cpuinfo)
    if has is False:
        return False, (
            "this CPU has no native bfloat16 (AVX512-BF16, AMX or Arm BF16), where it would be "
            "emulated and slower"
        )
    cap = onednn_isa_cap(environ)
    if cap is not None and cap[1] in ONEDNN_ISAS_WITHOUT_BF16:
        return False, (
            f"{cap[0]}={cap[1]} keeps oneDNN from this CPU's bfloat16 instructions (it needs "
            "AVX512_CORE_BF16 or above), where bfloat16 convolutions fail or are emulated"
        )
    if environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false"):
        return False, (
            "TF_ENABLE_ONEDNN_OPTS=0 turns oneDNN off, where TensorFlow would emulate bfloat16"
        )
    return has, ""


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
    ``_row_keys``; on exit the original ``call`` methods are restored.
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
def _row_keys(keys: tf.Tensor) -> Iterator[None]:
    previous = getattr(_STATE, "row_keys", None)
    _STATE.row_keys = keys
    try:
        yield
    finally:
        _STATE.row_keys = previous


@contextlib.contextmanager
def _dtype_policy(layers: list[keras.layers.Layer], policy: str | None) -> Iterator[None]:
    """Temporarily give ``layers`` another dtype policy (e.g. ``mixed_bfloat16``)."""
    if policy is None:
        yield
        return
    previous = [layer.dtype_policy for layer in layers]
    for layer in layers:
        layer.dtype_policy = policy
    try:
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.dtype_policy = old


def _applies_softmax(layer: object) -> bool:
    """Whether ``layer`` is a Softmax layer or has a softmax activation."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    return getattr(getattr(layer, "activation", None), "__name__", None) == "softmax"


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


def _run_nodes(nodes: list[GraphNode], tensors: dict[int, tf.Tensor]) -> None:
    """Run functional-graph nodes in inference mode, writing outputs into ``tensors``."""
    for node in nodes:
        run_node(node, tensors)


def balanced_chunks(rows: int, largest: int) -> list[tuple[int, int]]:
    """Cut ``rows`` rows into ``(start, stop)`` ranges of at most ``largest`` rows each, whose
    sizes differ by at most one (e.g. 399 + 400 + 400, not 416 + 416 + 367), so that few
    distinct shapes reach compiled code."""
    if rows <= 0:
        return []
    count = -(-rows // largest)
    bounds = [rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class MCSampler:
    """Draws Monte Carlo dropout samples of a Keras model's class probabilities.

    Args:
        model: A Keras model mapping images ``(batch, H, W, C)`` to probabilities
            ``(batch, classes)``.
        passes: Stochastic forward passes T per input row.
        sample_layers: Optional name patterns restricting which dropout layers are sampled.
        memory_budget_mb: Upper bound for the activations of one chunk: the rows run through
            the prefix at once (at most ``max_chunk_rows``), and those rows tiled over passes
            in the tail (at most ``max_rows`` rows x passes).
        split: Whether to compute the mask-independent prefix once (functional models only).
        precision: ``float32``, or ``bfloat16`` to run the sampled tail (all but the output
            layer) under Keras's ``mixed_bfloat16`` policy; probabilities and statistics stay
            float32.
        logits: The model outputs logits: a float32 softmax is applied to every pass.

    Raises:
        NoDropoutError: If ``passes > 1`` and the model has no dropout layer to sample.
    """

    def __init__(
        self,
        model: keras.Model,
        passes: int,
        sample_layers: tuple[str, ...] | list[str] | None = None,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        split: bool = True,
        precision: str = DEFAULT_PRECISION,
        logits: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise UsageError(
                f"`precision` must be one of {PRECISIONS}. Received: precision={precision!r}"
            )
        if passes < 1:
            raise UsageError(f"`passes` must be at least 1. Received: passes={passes}")
        if memory_budget_mb <= 0:
            raise UsageError(
                "`memory_budget_mb` must be positive. "
                f"Received: memory_budget_mb={memory_budget_mb}"
            )
        self.model = model
        self.passes = passes
        self.precision = precision
        self.logits = logits
        self.dropout_layers = find_dropout_layers(model, sample_layers) if passes > 1 else []
        if passes > 1 and not self.dropout_layers:
            which = f" matching {list(sample_layers)}" if sample_layers else ""
            raise NoDropoutError(
                f"The model has no dropout layer{which} to sample, so {passes} passes would all "
                "be identical. Use passes=1 (--passes 1) for the plain softmax, or a model with "
                f"Dropout layers. Received: passes={passes}"
            )
        self.split = split_graph(model, self.dropout_layers) if split else None
        input_shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
        per_row = self.split.tail_bytes_per_row if self.split else 0
        if not per_row:
            per_row = 4 * 16 * math.prod(d or 1 for d in (input_shape or (None, 64))[1:])
        if precision == "bfloat16":
            per_row //= 2
        self.max_rows = max(1, int(memory_budget_mb * 2**20 // per_row))
        # Rows run at once: their prefix activations fit the budget, and so does one pass of
        # them through the tail (without a split, that is the whole model).
        prefix_row = self.split.prefix_bytes_per_row if self.split else 0
        prefix_rows = int(memory_budget_mb * 2**20 // prefix_row) if prefix_row else self.max_rows
        self.max_chunk_rows = max(1, min(prefix_rows, self.max_rows))
        self.largest_chunk_rows = 0  # the most rows one compiled call has run (for tests)
        self._low_precision_layers = self._tail_layers() if precision == "bfloat16" else []
        self._cast_before_tiling = self._frontier_read_only_in_low_precision()
        self._compile(input_shape)

    def _compile(self, input_shape: tuple | None) -> None:
        """Wrap the sampling functions in ``tf.function``s that never retrace for a new number
        of rows: every row axis is ``None`` in the signatures."""
        if input_shape is None:  # a subclassed model without symbolic inputs
            self._function = tf.function(self._sample, reduce_retracing=True)
            self._prefix_function = tf.function(self._prefix, reduce_retracing=True)
            self._rows_function = tf.function(self._sample_rows, reduce_retracing=True)
            return
        images = tf.TensorSpec((None, *input_shape[1:]), tf.float32)
        keys = tf.TensorSpec((None,), tf.uint32)
        scalar = tf.TensorSpec((), tf.int32)
        self._function = tf.function(self._sample, input_signature=[images, keys])
        self._prefix_function = tf.function(self._prefix, input_signature=[images])
        if self.split is None:
            frontier = [images]
        else:
            frontier = [
                tf.TensorSpec((None, *shape[1:]), tf.bfloat16 if cast else tf.float32)
                for shape, cast in zip(
                    self.split.frontier_shapes, self._cast_before_tiling, strict=True
                )
            ]
        self._rows_function = tf.function(
            self._sample_rows,
            input_signature=[frontier, keys, tf.TensorSpec((None,), tf.int32), scalar, scalar],
        )

    @property
    def uses_split(self) -> bool:
        """Whether the prefix is computed once (``False``: whole model tiled)."""
        return self.split is not None

    def _tail_layers(self) -> list[keras.layers.Layer]:
        """Layers to run in bf16: those on tiled rows, up to the softmax.

        The layer producing the output, any layer applying a softmax, and every layer after a
        softmax stay float32, so probabilities are not rounded to bf16's 8 bits.
        """
        if self.split is None:
            layers = flatten_layers(self.model)
            last = self.model.layers[-1] if self.model.layers else None
            return [layer for layer in layers if layer is not last and not _applies_softmax(layer)]
        output_id = id(self.split.graph.outputs[0])
        float32_tensors: set[int] = set()
        found: dict[int, keras.layers.Layer] = {}
        for node in self.split.tail:
            operation = node.operation
            outputs = [id(t) for t in node.outputs]
            if (
                output_id in outputs
                or _applies_softmax(operation)
                or any(id(t) in float32_tensors for t in node.input_tensors)
            ):
                float32_tensors.update(outputs)
                continue
            if isinstance(operation, keras.layers.Layer):
                for layer in flatten_layers(operation, include_self=True):
                    found.setdefault(id(layer), layer)
        return list(found.values())

    def _frontier_read_only_in_low_precision(self) -> list[bool]:
        """Per frontier tensor: is it read only by bf16 layers (so it can be tiled as bf16)?

        Those layers cast their float32 inputs to bfloat16 anyway; casting before tiling gives
        the same values and moves half the bytes.
        """
        if self.split is None or not self._low_precision_layers:
            return [False] * (len(self.split.frontier) if self.split else 1)
        low = {id(layer) for layer in self._low_precision_layers}
        readers: dict[int, list] = {i: [] for i in self.split.frontier}
        for node in self.split.tail:
            for tensor in node.input_tensors:
                if id(tensor) in readers:
                    readers[id(tensor)].append(node.operation)
        return [
            bool(readers[i]) and all(id(op) in low for op in readers[i])
            for i in self.split.frontier
        ]

    def _forward_tail(self, frontier: list[tf.Tensor], keys: tf.Tensor) -> tf.Tensor:
        with _row_keys(keys):
            if self.split is None:
                return self.model(frontier[0], training=False)
            tensors = dict(zip(self.split.frontier, frontier, strict=True))
            _run_nodes(self.split.tail, tensors)
            return tensors[id(self.split.graph.outputs[0])]

    def _prefix(self, images: tf.Tensor) -> list[tf.Tensor]:
        """The mask-independent part: the frontier tensors the tail reads, one row per image."""
        if self.split is None:
            return [images]
        tensors = {id(self.split.graph.inputs[0]): images}
        _run_nodes(self.split.prefix, tensors)
        return [
            tf.cast(tensors[i], tf.bfloat16) if cast else tensors[i]
            for i, cast in zip(self.split.frontier, self._cast_before_tiling, strict=True)
        ]

    def _tail_passes(
        self, frontier: list[tf.Tensor], keys: tf.Tensor, first_pass: tf.Tensor, passes: tf.Tensor
    ) -> tf.Tensor:
        """Passes ``first_pass .. first_pass + passes - 1`` of the tail on every frontier row.

        Pass ``t`` of row ``i`` draws its masks from ``mix(keys[i], t)`` whatever else is in the
        call, so a call for passes 10..19 gives the draws of those passes in a call for 0..99.

        Returns:
            float32 ``(passes, rows, classes)``.
        """
        rows = tf.shape(keys)[0]
        largest = tf.minimum(tf.maximum(1, self.max_rows // tf.maximum(rows, 1)), passes)
        chunks = (passes + largest - 1) // largest
        # Balanced chunks (e.g. 34+34+32, not 38+38+24): fewer distinct shapes to compile.
        per_chunk = (passes + chunks - 1) // chunks
        results = tf.TensorArray(tf.float32, size=chunks, infer_shape=False)
        for chunk in tf.range(chunks):
            start = chunk * per_chunk
            count = tf.minimum(per_chunk, passes - start)
            tiled = [
                tf.tile(t, tf.concat([[count], tf.ones([tf.rank(t) - 1], tf.int32)], 0))
                for t in frontier
            ]
            pass_index = tf.cast(
                tf.range(first_pass + start, first_pass + start + count), tf.uint32
            )
            pass_keys = tf.reshape(mix(keys[None, :], pass_index[:, None]), [-1])
            probs = tf.cast(self._forward_tail(tiled, pass_keys), tf.float32)
            if self.logits:
                probs = tf.nn.softmax(probs, axis=-1)
            results = results.write(chunk, tf.reshape(probs, [count, rows, -1]))
        return results.concat()

    def _sample(self, images: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        return self._tail_passes(self._prefix(images), keys, 0, self.passes)

    def _sample_rows(
        self,
        frontier: list[tf.Tensor],
        keys: tf.Tensor,
        index: tf.Tensor,
        first_pass: tf.Tensor,
        passes: tf.Tensor,
    ) -> tf.Tensor:
        picked = [tf.gather(t, index) for t in frontier]
        return self._tail_passes(picked, tf.gather(keys, index), first_pass, passes)

    def row_chunks(self, rows: int) -> list[tuple[int, int]]:
        """How ``sample`` cuts ``rows`` rows: ``(start, stop)`` ranges of balanced size.

        Each holds at most ``max_chunk_rows`` rows, and sizes differ by at most one (e.g.
        399 + 400 + 400, not 416 + 416 + 367), so few distinct shapes reach the compiled code.
        Callers that build rows on the fly (test-time copies) use it to build one chunk at a time.
        """
        return balanced_chunks(rows, self.max_chunk_rows)

    @contextlib.contextmanager
    def _sampling(self) -> Iterator[None]:
        """Dropout layers sampling per-row masks, the tail in its precision (while tracing)."""
        policy = "mixed_bfloat16" if self.precision == "bfloat16" else None
        with (
            dropout_sampling(self.dropout_layers),
            _dtype_policy(self._low_precision_layers, policy),
        ):
            yield

    def sample(self, images: np.ndarray | tf.Tensor, keys: np.ndarray | tf.Tensor) -> np.ndarray:
        """Draw the samples for a batch of rows.

        Rows are run ``row_chunks`` at a time; a row's samples do not depend on its chunk
        (up to float32 rounding: other chunk sizes can take other kernels).

        Args:
            images: ``float32`` images, shape ``(rows, H, W, C)``.
            keys: ``uint32`` keys, shape ``(rows,)``, one per row (image or TTA copy).

        Returns:
            ``float32`` probabilities of shape ``(passes, rows, classes)``.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        keys = tf.convert_to_tensor(keys, tf.uint32)
        chunks = self.row_chunks(int(images.shape[0])) or [(0, 0)]
        with self._sampling():
            parts = []
            for start, stop in chunks:
                self.largest_chunk_rows = max(self.largest_chunk_rows, stop - start)
                if len(chunks) > 1:
                    chunk_images, chunk_keys = images[start:stop], keys[start:stop]
                else:
                    chunk_images, chunk_keys = images, keys
                parts.append(self._function(chunk_images, chunk_keys).numpy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def prepare(self, images: np.ndarray | tf.Tensor, keys: np.ndarray | tf.Tensor) -> PreparedRows:
        """Run the mask-independent prefix of rows once, for ``sample_rows`` to draw passes from.

        The prefix runs ``row_chunks`` at a time, so its activations stay within the memory
        budget however many rows there are; only its output (the frontier) is kept.

        Args:
            images: ``float32`` images, shape ``(rows, H, W, C)``.
            keys: ``uint32`` keys, shape ``(rows,)``.

        Returns:
            The rows' frontier tensors (what the tail reads) and keys.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        chunks = self.row_chunks(int(images.shape[0])) or [(0, 0)]
        with self._sampling():
            parts = [self._prefix_function(images[start:stop]) for start, stop in chunks]
        frontier = [tf.concat(tensors, axis=0) for tensors in zip(*parts, strict=True)]
        return PreparedRows(frontier, tf.convert_to_tensor(keys, tf.uint32))

    def sample_rows(
        self, prepared: PreparedRows, index: np.ndarray, first_pass: int, passes: int
    ) -> np.ndarray:
        """Draw passes ``first_pass .. first_pass + passes - 1`` of some prepared rows.

        The draws of pass ``t`` of a row are those ``sample`` makes for it (same keys), so
        calls for passes 0..9 then 10..19 give the first 20 passes of a 100-pass ``sample``
        (equal up to float32 rounding: other shapes can take other kernels). The rows are
        padded to ``bucket_rows(len(index))`` so that a few shapes reach the compiled code.

        Args:
            prepared: What ``prepare`` returned.
            index: ``(n,)`` indices of the rows to sample, into the prepared rows.
            first_pass: Index of the first pass to draw.
            passes: Number of passes to draw (at least 1).

        Returns:
            ``float32`` probabilities, shape ``(passes, n, classes)``.
        """
        index = np.asarray(index, dtype=np.int32)
        if index.size == 0:
            raise UsageError("`index` must name at least one row. Received: index=[]")
        padded = np.full(bucket_rows(index.size), index[-1], dtype=np.int32)
        padded[: index.size] = index
        with self._sampling():
            probs = self._rows_function(
                prepared.frontier,
                prepared.keys,
                tf.constant(padded),
                tf.constant(first_pass, tf.int32),
                tf.constant(passes, tf.int32),
            )
        return probs.numpy()[:, : index.size]


@dataclass(frozen=True)
class PreparedRows:
    """Rows after the mask-independent prefix (``MCSampler.prepare``).

    Attributes:
        frontier: The tensors the stochastic tail reads, each ``(rows, ...)``.
        keys: ``uint32`` row keys, ``(rows,)``.
    """

    frontier: list[tf.Tensor]
    keys: tf.Tensor


def bucket_rows(rows: int) -> int:
    """The padded number of rows for ``rows`` rows: the next of 1, 2, 3, 4, 6, 8, 12, 16, ...

    Adaptive sampling runs ever fewer rows; padding them to these sizes (at most a third
    more) keeps the shapes that reach XLA and oneDNN, each compiled once, to a handful.
    """
    if rows <= 2:
        return max(rows, 1)
    power = 1 << (rows - 1).bit_length()  # next power of two >= rows
    return power * 3 // 4 if power * 3 // 4 >= rows else power


def _probe_model() -> keras.Model:
    """A tiny convolutional model (fixed weights) whose sampled tail has the layers of a CNN."""
    init = keras.initializers.GlorotUniform(seed=0)  # seeded: the global RNG is left alone
    inputs = keras.Input((8, 8, 3), name="bf16_probe_input")
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=init, name="bf16_probe_c1")(
        inputs
    )
    x = keras.layers.Dropout(0.25, seed=0, name="bf16_probe_drop")(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=init, name="bf16_probe_c2")(
        x
    )
    x = keras.layers.BatchNormalization(name="bf16_probe_bn")(x)
    x = keras.layers.MaxPooling2D(name="bf16_probe_pool")(x)
    x = keras.layers.Flatten(name="bf16_probe_flat")(x)
    outputs = keras.layers.Dense(
        3, activation="softmax", kernel_initializer=init, name="bf16_probe_dense"
    )(x)
    return keras.Model(inputs, outputs, name="bf16_probe")


@functools.cache
def bf16_probe() -> str | None:
    """Run a tiny CNN's MC passes in bfloat16, as ``MCSampler`` runs a model's, once a process.

    oneDNN can refuse bf16 kernels where the CPU's flags promise them (an ISA cap it reads, a
    build without them); the error comes only when a convolution first runs. This finds out
    before any image is scored.

    Returns:
        ``None`` if the passes ran and gave finite probabilities, else why not (one line).
    """
    rows = np.linspace(0.0, 1.0, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    try:
        sampler = MCSampler(_probe_model(), passes=2, precision="bfloat16")
        samples = sampler.sample(rows, np.arange(2, dtype=np.uint32))
    except Exception as exc:  # noqa: BLE001 - any failure means: do not score in bf16
        text = str(exc)
        found = re.search(r"message: ([^.]+)", text)
        line = found.group(1) if found else next((s for s in text.splitlines() if s), "")
        return f"{type(exc).__name__}: {line.strip()}"
    if not np.isfinite(samples).all():
        return "the bfloat16 passes gave non-finite probabilities"
    return None


def resolve_precision(
    precision: str, cpuinfo: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    """The precision to run for the ``precision`` asked for, and the notice if it differs.

    ``bfloat16`` runs only where it is native (``native_bf16``: the CPU's flags, oneDNN's ISA cap)
    and a bfloat16 probe (``bf16_probe``) runs in this process; otherwise ``float32``.

    Args:
        precision: ``float32`` or ``bfloat16``.
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.
        environ: The environment; ``os.environ`` when ``None``.

    Returns:
        ``(precision, notice)``: the precision to run, and ``None`` or why bfloat16 was not.
    """
    if precision != "bfloat16":
        return precision, None
    native, why_not = native_bf16(cpuinfo, environ)
    if native is False:
        return "float32", f"--precision bfloat16: {why_not}; using float32."
    failure = bf16_probe()
    if failure is not None:
        return "float32", (
            f"--precision bfloat16: a bfloat16 convolution failed in this process ({failure}); "
            "using float32."
        )
    return "bfloat16", None
