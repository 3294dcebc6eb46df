"""The errors batchuq raises on purpose, in one hierarchy.

Everything here is free of TensorFlow, so that the command layer can map errors to exit codes
without importing it. The command layer (``batchuq.cli.runtime``) owns that mapping; the
library only says *what* went wrong:

* ``UsageError``: a bad argument, option, file, folder or model given by the caller. Nothing
  was written. It is a ``ValueError`` too, so that Python callers can catch it as one.
* ``NoImagesFoundError``: the images folder holds nothing to score (a "skip" for schedulers).
* ``StopRequested``: a run stopped because its ``should_stop`` callback asked it to.

Any other exception that escapes a job is a bug or a failure of the machine (disk full, a
broken model file halfway through), and the command layer reports it with its traceback.
"""

from __future__ import annotations


class BatchuqError(Exception):
    """Base class of the errors batchuq raises with a message meant for its user."""


class UsageError(BatchuqError, ValueError):
    """A bad argument, option, file, folder or model; nothing was written."""


class ModelError(UsageError):
    """The model file cannot be used: missing, unreadable, or not an image classifier."""


class NoDropoutError(ModelError):
    """The model has no dropout layer to sample (or none matches ``sample_layers``)."""


class ClassMismatchError(UsageError):
    """Labelled class folders that nothing maps onto the model's outputs."""


class LayoutError(UsageError):
    """The images folder is laid out in a way batchuq refuses to guess about."""


class ImagesFolderError(UsageError, NotADirectoryError):
    """The images folder does not exist or is not a folder."""


class OutputError(UsageError):
    """The output path cannot be written (no folder, a folder, read-only, wrong suffix)."""


class CalibrationError(UsageError):
    """The calibration file is unreadable or was made for another model."""


class PredictorMismatchError(CalibrationError):
    """The calibration was fitted on another predictor than this run's."""


class CheckpointError(UsageError):
    """The ``--resume`` checkpoint belongs to a run with other settings or files."""


class NoImagesFoundError(BatchuqError, ValueError):
    """The images folder holds no image to score."""


class StopRequested(BaseException):  # noqa: N818 (it is not an error: a request was honoured)
    """A run stopped because its ``should_stop`` callback asked it to.

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` does not
    swallow it.
    """
