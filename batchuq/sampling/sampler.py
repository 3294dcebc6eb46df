"""Step 3 of the data flow: Monte Carlo dropout sampling (``MCSampler``).

Only dropout layers are stochastic (``batchuq.sampling.dropout``). Speed: for functional models
the graph is split (``batchuq.sampling.graph_split``): the mask-independent *prefix* runs once
per image; only the *tail* runs on the batch tiled over passes, in chunks whose size is set by
a memory budget (``batchuq.sampling.memory``). Subclassed models fall back to tiling the whole
model. Both paths draw the same masks, so they give the same samples. With ``bfloat16``
(``batchuq.sampling.precision``) the tail runs under Keras's ``mixed_bfloat16`` policy, up to
the softmax.

Memory: the same budget bounds the rows run at once. A call with more rows (e.g. a batch of B
images times K test-time copies) is cut into chunks of at most ``max_chunk_rows`` rows, each run
through the prefix and then tiled through the tail, so peak memory does not grow with B x K.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from batchuq.defaults import DEFAULT_MEMORY_BUDGET_MB, DEFAULT_PRECISION
from batchuq.errors import NoDropoutError, UsageError
from batchuq.keras_private import flatten_layers
from batchuq.sampling.dropout import dropout_sampling, find_dropout_layers, using_row_keys
from batchuq.sampling.graph_split import GraphSplit, run_nodes, split_graph
from batchuq.sampling.head import Head, find_head, head_values
from batchuq.sampling.memory import balanced_chunks, bucket_rows, row_limits
from batchuq.sampling.precision import PRECISIONS
from batchuq.seeds import mix


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
        self.head = _find_head(self.split, logits)
        input_shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
        # Rows run at once: their prefix activations fit the budget, and so does one pass of
        # them through the tail (without a split, that is the whole model).
        self.max_rows, self.max_chunk_rows = row_limits(
            self.split.tail_bytes_per_row if self.split else 0,
            self.split.prefix_bytes_per_row if self.split else 0,
            input_shape,
            precision,
            memory_budget_mb,
        )
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
        per_row = tf.TensorSpec((None,), tf.int32)
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
            input_signature=[frontier, keys, per_row, per_row, scalar],
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

    @property
    def extras(self) -> tuple[str, ...]:
        """The per-row values ``sample_with_extras`` gives besides the probabilities: ``max_logit``
        and ``energy`` when the logits are found, ``features`` when the penultimate layer is
        (``batchuq.sampling.head``); none for a model whose head is not found."""
        if self.head is None:
            return ()
        return ("max_logit", "energy") + (("features",) if self.head.width else ())

    def _forward_tail(
        self, frontier: list[tf.Tensor], keys: tf.Tensor
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """The tail's output and, with a head, its values (``head_values``) per tiled row."""
        with using_row_keys(keys):
            if self.split is None:
                return self.model(frontier[0], training=False), {}
            tensors = dict(zip(self.split.frontier, frontier, strict=True))
            run_nodes(self.split.tail, tensors)
            output = tensors[id(self.split.graph.outputs[0])]
            return output, ({} if self.head is None else head_values(self.head, tensors))

    def _prefix(self, images: tf.Tensor) -> list[tf.Tensor]:
        """The mask-independent part: the frontier tensors the tail reads, one row per image."""
        if self.split is None:
            return [images]
        tensors = {id(self.split.graph.inputs[0]): images}
        run_nodes(self.split.prefix, tensors)
        return [
            tf.cast(tensors[i], tf.bfloat16) if cast else tensors[i]
            for i, cast in zip(self.split.frontier, self._cast_before_tiling, strict=True)
        ]

    def _tail_passes(
        self, frontier: list[tf.Tensor], keys: tf.Tensor, first_pass: tf.Tensor, passes: tf.Tensor
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Passes ``first_pass .. first_pass + passes - 1`` of the tail on every frontier row.

        Pass ``t`` of row ``i`` draws its masks from ``mix(keys[i], t)`` whatever else is in the
        call, so a call for passes 10..19 gives the draws of those passes in a call for 0..99.
        ``first_pass`` is a scalar or one per row (rows at different rounds in one call).

        Returns:
            float32 ``(passes, rows, classes)``, and per name of ``extras`` the sum over the
            passes of its per-row value, ``(rows, ...)``.
        """
        rows = tf.shape(keys)[0]
        sums = self._zero_sums(rows)
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
            # (count, 1) for a scalar first pass, (count, rows) for one per row.
            pass_index = tf.reshape(first_pass, [1, -1]) + start + tf.range(count)[:, None]
            pass_keys = tf.reshape(mix(keys[None, :], tf.cast(pass_index, tf.uint32)), [-1])
            output, values = self._forward_tail(tiled, pass_keys)
            probs = tf.cast(output, tf.float32)
            if self.logits:
                probs = tf.nn.softmax(probs, axis=-1)
            results = results.write(chunk, tf.reshape(probs, [count, rows, -1]))
            sums = {
                name: total
                + tf.reduce_sum(
                    tf.reshape(values[name], tf.concat([[count, rows], tf.shape(total)[1:]], 0)),
                    axis=0,
                )
                for name, total in sums.items()
            }
        return results.concat(), sums

    def _zero_sums(self, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        """Zeros for the per-row sums of ``extras``."""
        sums = {}
        for name in self.extras:
            shape = [rows, self.head.width] if name == "features" else [rows]
            sums[name] = tf.zeros(shape, tf.float32)
        return sums

    def _sample(self, images: tf.Tensor, keys: tf.Tensor) -> tuple[tf.Tensor, dict]:
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

    def join_prepared(self, parts: list[tuple[PreparedRows, np.ndarray]]) -> PreparedRows:
        """Some rows of several ``prepare`` results, as one (e.g. to pool rows across batches).

        Args:
            parts: ``(prepared, index)`` pairs: the rows ``index`` of each, in order.

        Returns:
            The picked rows' frontier tensors, keys, and sums and passes drawn so far.
        """
        rows = [np.asarray(index, dtype=np.int32) for _, index in parts]
        picks = [(p, tf.constant(index)) for (p, _), index in zip(parts, rows, strict=True)]
        frontier = [
            tf.concat([tf.gather(p.frontier[i], index) for p, index in picks], 0)
            for i in range(len(parts[0][0].frontier))
        ]
        keys = tf.concat([tf.gather(p.keys, index) for p, index in picks], 0)
        kept = [(p, index) for (p, _), index in zip(parts, rows, strict=True)]
        sums = {
            name: np.concatenate([p.sums[name][index] for p, index in kept])
            for name in parts[0][0].sums
        }
        passes = np.concatenate([p.passes[index] for p, index in kept])
        return PreparedRows(frontier, keys, sums, passes)

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
        return self.sample_with_extras(images, keys)[0]

    def sample_with_extras(
        self, images: np.ndarray | tf.Tensor, keys: np.ndarray | tf.Tensor
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``sample``'s probabilities and, from the same passes, the mean of each of ``extras``.

        Args:
            images: As for ``sample``.
            keys: As for ``sample``.

        Returns:
            ``float32`` ``(passes, rows, classes)``, and per name of ``extras`` its mean over
            the passes, ``(rows,)`` (``(rows, D)`` for ``features``).
        """
        images = tf.convert_to_tensor(images, tf.float32)
        keys = tf.convert_to_tensor(keys, tf.uint32)
        chunks = self.row_chunks(int(images.shape[0])) or [(0, 0)]
        with self._sampling():
            parts, sums = [], []
            for start, stop in chunks:
                self.largest_chunk_rows = max(self.largest_chunk_rows, stop - start)
                if len(chunks) > 1:
                    chunk_images, chunk_keys = images[start:stop], keys[start:stop]
                else:
                    chunk_images, chunk_keys = images, keys
                probs, chunk_sums = self._function(chunk_images, chunk_keys)
                parts.append(probs.numpy())
                sums.append({name: value.numpy() for name, value in chunk_sums.items()})
        extras = {
            name: np.concatenate([part[name] for part in sums]) / self.passes
            for name in self.extras
        }
        return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)), extras

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
        rows = int(images.shape[0])
        sums = {
            name: np.zeros((rows, self.head.width) if name == "features" else rows, np.float64)
            for name in self.extras
        }
        return PreparedRows(frontier, tf.convert_to_tensor(keys, tf.uint32), sums, np.zeros(rows))

    def sample_rows(
        self, prepared: PreparedRows, index: np.ndarray, first_pass: int | np.ndarray, passes: int
    ) -> np.ndarray:
        """Draw passes ``first_pass .. first_pass + passes - 1`` of some prepared rows.

        The draws of pass ``t`` of a row are those ``sample`` makes for it (same keys), so
        calls for passes 0..9 then 10..19 give the first 20 passes of a 100-pass ``sample``
        (equal up to float32 rounding: other shapes can take other kernels). The rows are
        padded to ``bucket_rows(len(index))`` so that a few shapes reach the compiled code.
        The sums of ``extras`` over the passes drawn are added to ``prepared``
        (``prepared_extras`` gives their means).

        Args:
            prepared: What ``prepare`` returned.
            index: ``(n,)`` indices of the rows to sample, into the prepared rows.
            first_pass: Index of the first pass to draw, or ``(n,)``: one per row.
            passes: Number of passes to draw (at least 1).

        Returns:
            ``float32`` probabilities, shape ``(passes, n, classes)``.
        """
        index = np.asarray(index, dtype=np.int32)
        if index.size == 0:
            raise UsageError("`index` must name at least one row. Received: index=[]")
        padded = np.full(bucket_rows(index.size), index[-1], dtype=np.int32)
        padded[: index.size] = index
        first = np.empty_like(padded)
        first[: index.size] = first_pass
        first[index.size :] = first[index.size - 1]
        with self._sampling():
            probs, sums = self._rows_function(
                prepared.frontier,
                prepared.keys,
                tf.constant(padded),
                tf.constant(first),
                tf.constant(passes, tf.int32),
            )
        for name, total in prepared.sums.items():
            np.add.at(total, index, sums[name].numpy()[: index.size])
        np.add.at(prepared.passes, index, passes)
        return probs.numpy()[:, : index.size]

    @staticmethod
    def prepared_extras(prepared: PreparedRows) -> dict[str, np.ndarray]:
        """Per name of ``extras``, its mean over the passes ``sample_rows`` drew of each row.

        Args:
            prepared: What ``prepare`` returned, after ``sample_rows`` drew every row once.

        Returns:
            float32 ``(rows,)`` (``(rows, D)`` for ``features``) per name.
        """
        passes = np.maximum(prepared.passes, 1)
        return {
            name: (total / passes.reshape((-1,) + (1,) * (total.ndim - 1))).astype(np.float32)
            for name, total in prepared.sums.items()
        }


def _find_head(split: GraphSplit | None, logits: bool) -> Head | None:
    """The head of a split model (``batchuq.sampling.head``), its tensors made readable by the
    tail: one the prefix computes (nothing sampled after it) joins the frontier."""
    if split is None:
        return None
    head = find_head(split.graph, logits)
    if head is None:
        return None
    made_in_tail = {id(t) for node in split.tail for t in node.outputs}
    for tensor in head.tensors:
        if id(tensor) not in made_in_tail and id(tensor) not in split.frontier:
            split.frontier.append(id(tensor))
            split.frontier_shapes.append(tuple(tensor.shape))
    return head


@dataclass(frozen=True)
class PreparedRows:
    """Rows after the mask-independent prefix (``MCSampler.prepare``).

    Attributes:
        frontier: The tensors the stochastic tail reads, each ``(rows, ...)``.
        keys: ``uint32`` row keys, ``(rows,)``.
        sums: Per name of ``MCSampler.extras``, its sum over the passes drawn so far, float64
            ``(rows, ...)`` (``sample_rows`` adds to it).
        passes: Passes drawn so far per row, float64 ``(rows,)``.
    """

    frontier: list[tf.Tensor]
    keys: tf.Tensor
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    passes: np.ndarray = field(default_factory=lambda: np.zeros(0))
