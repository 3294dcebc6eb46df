"""Monte Carlo dropout (docs/methods.md, "MC dropout"): T passes with only dropout sampled.

A thin adapter of ``batchuq.sampling.sampler.MCSampler`` (which holds the numerics: the prefix
before the first dropout layer runs once, the passes are tiled inside one compiled function) to
the ``UncertaintyMethod`` interface.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from batchuq.defaults import (
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_METHOD,
    DEFAULT_PASSES,
    DEFAULT_PRECISION,
)
from batchuq.errors import UsageError
from batchuq.methods.base import UncertaintyMethod
from batchuq.methods.registry import MethodSettings, register_method
from batchuq.sampling.probe import resolve_precision
from batchuq.sampling.sampler import MCSampler, PreparedRows

if TYPE_CHECKING:
    from batchuq.models import LoadedModel

logger = logging.getLogger("batchuq")
# Precision notices given in this process: each once, however many predictors a command builds
# (calibrate builds two, an ensemble one per member) with the same outcome.
_NOTICES_GIVEN: set[str] = set()


class MCDropout(UncertaintyMethod):
    """T stochastic forward passes per row, only the dropout layers switched on.

    Args:
        model: Keras model mapping images to probabilities (or logits, with ``logits``).
        passes: T, passes per row (1 = the deterministic softmax).
        sample_layers: Name patterns of the dropout layers to sample (default: all).
        memory_budget_mb: Bound on the activations of one chunk of rows and their passes.
        precision: ``float32``, or ``bfloat16`` for the sampled part; falls back to float32
            with a warning where bfloat16 is not native or does not run here
            (``batchuq.sampling.probe.resolve_precision``).
        logits: The model outputs logits: apply a softmax to every pass.

    Raises:
        NoDropoutError: If ``passes > 1`` and no dropout layer is there to sample.
    """

    def __init__(
        self,
        model: keras.Model,
        passes: int = DEFAULT_PASSES,
        sample_layers: list[str] | None = None,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        precision: str = DEFAULT_PRECISION,
        logits: bool = False,
    ) -> None:
        self.precision_requested = precision
        precision, notice = resolve_precision(precision)
        if notice and notice not in _NOTICES_GIVEN:
            _NOTICES_GIVEN.add(notice)
            logger.warning(notice)
        self.sampler = MCSampler(
            model, passes, sample_layers, memory_budget_mb, precision=precision, logits=logits
        )
        self.samples_per_row = passes
        self.supports_adaptive = passes > 1  # one pass has nothing to adapt
        # max_logit, energy and features, means over the passes (MCSampler.extras).
        self.extras = self.sampler.extras

    def prepare(self, rows: tf.Tensor, row_keys: tf.Tensor) -> PreparedRows:
        """The rows' activations before the first dropout layer; see ``MCSampler.prepare``."""
        return self.sampler.prepare(rows, row_keys)

    def sample_passes(
        self, prepared: PreparedRows, index: np.ndarray, first_pass: int | np.ndarray, passes: int
    ) -> np.ndarray:
        """``(n, 1, passes, classes)``; see ``UncertaintyMethod.sample_passes``."""
        probs = self.sampler.sample_rows(prepared, index, first_pass, passes)  # (passes, n, C)
        return probs.transpose(1, 0, 2)[:, None]

    def join_prepared(self, parts: list[tuple[PreparedRows, np.ndarray]]) -> PreparedRows:
        """Rows of several prepared chunks as one; see ``MCSampler.join_prepared``."""
        return self.sampler.join_prepared(parts)

    def prepared_extras(self, prepared: PreparedRows) -> dict[str, np.ndarray]:
        """Means over the passes drawn of each row; see ``MCSampler.prepared_extras``."""
        return self.sampler.prepared_extras(prepared)

    def sample_with_extras(
        self, rows: tf.Tensor, row_keys: tf.Tensor
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``sample`` and the means over its passes of ``max_logit``, ``energy`` and ``features``
        (the input of the last ``Dense`` layer), each row's own passes."""
        probs, extras = self.sampler.sample_with_extras(rows, row_keys)
        return probs.transpose(1, 0, 2), {k: v.astype(np.float32) for k, v in extras.items()}

    def row_chunks(self, rows: int) -> list[tuple[int, int]]:
        """Chunks whose prefix activations and tiled passes fit the memory budget."""
        return self.sampler.row_chunks(rows)

    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        """``(rows, passes, classes)`` probabilities; see ``UncertaintyMethod.sample``."""
        return self.sampler.sample(rows, row_keys).transpose(1, 0, 2)  # from (passes, rows, C)

    def metadata(self) -> dict[str, Any]:
        """The method's name, passes, precision (used and requested), sampled layers, logits."""
        return {
            "method": DEFAULT_METHOD,
            "passes": self.sampler.passes,
            "precision": self.sampler.precision,
            "precision_requested": self.precision_requested,
            "sampled_layers": [layer.name for layer in self.sampler.dropout_layers],
            "logits": self.sampler.logits,
        }


def build_mc_dropout(models: Sequence[LoadedModel], settings: MethodSettings) -> MCDropout:
    """MC dropout of one model, as the run's settings ask (the registry's builder).

    Raises:
        UsageError: If the run has several models (they are a deep ensemble).
    """
    if len(models) != 1:
        raise UsageError(
            "MC dropout scores one model; several models are a deep ensemble "
            f"(method='deep_ensemble'). Received: {len(models)} models, method='{DEFAULT_METHOD}'"
        )
    return MCDropout(
        models[0].model,
        settings.passes,
        settings.sample_layers,
        settings.memory_budget_mb,
        precision=settings.precision,
        logits=settings.logits,
    )


# The default: the method of a run whose models no other method claims.
register_method(DEFAULT_METHOD, build_mc_dropout)
