"""batchuq: per-image uncertainty for image classifiers, in batch, written to Parquet.

``score_directory`` is imported lazily so that ``import batchuq`` (and the CLI's ``--help``)
does not pay for importing TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from batchuq.score import ScoreReport, score_directory

__all__ = ["ScoreReport", "__version__", "score_directory"]


def __getattr__(name: str) -> Any:
    if name in ("score_directory", "ScoreReport"):
        from batchuq import score

        return getattr(score, name)
    raise AttributeError(f"module 'batchuq' has no attribute {name!r}")
