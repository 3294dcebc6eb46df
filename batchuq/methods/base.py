"""The method seam: the interface every uncertainty method implements.

The score job feeds a method *rows*: decoded, rescaled images (or test-time copies of them),
each with its own random key. The method returns ``samples_per_row`` probability vectors per
row. The job then groups the rows of each image (all samples of TTA copy 0, then copy 1, ...),
summarises, decides and writes; it knows nothing else about the method.

A method may also give per-row *extras* (``extras``, ``sample_with_extras``,
``prepared_extras``): values computed in the same passes, such as ``max_logit`` and ``energy``
from the logits, SNGP's ``gp_variance``, or the penultimate ``features`` (for the kNN score).
The job averages them over an image's test-time copies and writes each scalar one as a Parquet
column of that name; it never asks which method made them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from batchuq.errors import UsageError

if TYPE_CHECKING:
    import tensorflow as tf

    from batchuq.models import LoadedModel


class UncertaintyMethod(ABC):
    """Draws samples of class probabilities for rows of images.

    Subclasses set ``samples_per_row`` and implement ``sample`` and ``metadata``; they may
    override ``row_chunks`` to bound the memory of one call.
    """

    #: S: probability vectors returned per row (e.g. MC passes T; 1 for a deterministic net).
    samples_per_row: int = 1
    #: Whether the method draws passes on demand (``prepare`` and ``sample_passes``), which
    #: ``--passes auto`` needs.
    supports_adaptive: bool = False
    #: Probability vectors one pass gives per row (an ensemble's members; else 1).
    pass_groups: int = 1
    #: Names of the per-row values ``sample_with_extras`` returns besides the probabilities:
    #: scalar scores (``max_logit``, ``energy``, ``gp_variance``) and ``features``.
    extras: tuple[str, ...] = ()

    @abstractmethod
    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        """Draw the samples of a chunk of rows.

        Args:
            rows: float32 images after rescaling, shape ``(rows, H, W, C)`` (or ``(rows, H,
                W)`` for a model without a channel axis).
            row_keys: uint32 keys, shape ``(rows,)``: a row's random draws must depend only
                on its key (and the sample index), never on its position in the chunk, so
                that results do not depend on batch size.

        Returns:
            float32 probabilities, shape ``(rows, samples_per_row, classes)``.
        """

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """What describes the samples, merged into the Parquet metadata (JSON-serialisable).

        Keys already used by the job's own metadata must not be returned, except those the
        method decides (``passes``, ``precision``, ``precision_requested``, ``sampled_layers``,
        ``logits``).
        """

    def sample_with_extras(
        self, rows: tf.Tensor, row_keys: tf.Tensor
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``sample``'s probabilities and, from the same passes, the rows' ``extras``.

        The default has no extras (``extras`` is empty).

        Args:
            rows: As for ``sample``.
            row_keys: As for ``sample``.

        Returns:
            float32 ``(rows, samples_per_row, classes)``, and per name of ``extras`` a float32
            ``(rows,)`` array (``(rows, D)`` for ``features``).
        """
        return self.sample(rows, row_keys), {}

    def prepared_extras(self, prepared: Any) -> dict[str, np.ndarray]:
        """The ``extras`` of prepared rows, from the passes ``sample_passes`` drew of them.

        Args:
            prepared: What ``prepare`` returned, after every row was sampled at least once.

        Returns:
            As the extras of ``sample_with_extras``, for every prepared row (default: none).
        """
        return {}

    def prepare(self, rows: tf.Tensor, row_keys: tf.Tensor) -> Any:
        """Do the work of a chunk of rows that no pass changes, once, for ``sample_passes``.

        Args:
            rows: As for ``sample``.
            row_keys: As for ``sample``.

        Returns:
            Whatever ``sample_passes`` reads (e.g. activations before the first dropout).

        Raises:
            UsageError: If the method has no passes to draw on demand.
        """
        raise UsageError(
            "--passes auto needs a method that draws passes on demand (MC dropout or a deep "
            f"ensemble). Received: method={type(self).__name__}"
        )

    def sample_passes(
        self, prepared: Any, index: np.ndarray, first_pass: int | np.ndarray, passes: int
    ) -> np.ndarray:
        """Draw passes ``first_pass .. first_pass + passes - 1`` of some prepared rows.

        Pass ``t`` of a row must give the draws ``sample`` gives as its pass ``t``, so that an
        adaptive run's samples are the first passes of the fixed run's.

        Args:
            prepared: What ``prepare`` returned for the chunk.
            index: ``(n,)`` rows of the chunk to sample.
            first_pass: Index of the first pass, or ``(n,)``: one per row.
            passes: Passes to draw.

        Returns:
            float32 probabilities, shape ``(n, pass_groups, passes, classes)``.
        """
        raise NotImplementedError

    def join_prepared(self, parts: list[tuple[Any, np.ndarray]]) -> Any:
        """Some rows of several ``prepare`` results, as one, for ``sample_passes`` to draw from.

        ``--passes auto`` pools the unsettled rows of many batches this way, so that its
        rounds run full calls.

        Args:
            parts: ``(prepared, index)`` pairs: rows ``index`` of each, concatenated in order.

        Returns:
            What ``prepare`` would have returned for those rows.
        """
        raise NotImplementedError

    def row_chunks(self, rows: int) -> list[tuple[int, int]]:
        """How to cut ``rows`` rows into calls of ``sample``: ``(start, stop)`` ranges.

        The job builds each chunk's rows (augmented copies) just before sampling it, so that
        memory stays within the method's budget however many copies an image has. The default
        is one chunk.
        """
        return [(0, rows)] if rows > 0 else []


#: Builds a method for a loaded model (what ``ScoreOptions(method=...)`` accepts; the registry's
#: builders, ``batchuq.methods.registry``, take every model of the run and its settings instead).
MethodFactory = Callable[["LoadedModel"], UncertaintyMethod]
