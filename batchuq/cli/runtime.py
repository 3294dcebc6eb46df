"""What every ``batchuq`` command shares at run time: logging, TensorFlow, signals, exit codes.

Exit codes (docs/exit-codes.md says the same):

* 0 (``EXIT_OK``): success; every image scored, or the share of unreadable images is at most
  ``--max-error-rate``.
* 1 (``EXIT_IMAGE_ERRORS``): the output was written, but more images than ``--max-error-rate``
  allows could not be read (their rows have ``status`` = ``error: ...``).
* 2 (``EXIT_USAGE``): usage error: bad option or config file, missing images folder, unusable
  model, class names that do not match the model, output not ending in ``.parquet``. Nothing is
  written. Raised as ``batchuq.errors.UsageError`` (or a Click usage error).
* 3 (``EXIT_FATAL``): failure during the run, any exception that is not a usage error; it is
  logged with its traceback. No output is written (a previous output is left untouched).
* 4 (``EXIT_NO_IMAGES``): no images to score: the images folder holds none (or, with
  ``--missing-ok``, does not exist). Nothing is written; schedulers can treat it as "skip"
  (Airflow's ``skip_on_exit_code``).
* 5 (``EXIT_DRIFT``): ``monitor`` only: tonight's run differs from the reference (a drift test
  alerts: its Holm-adjusted p-value is below ``alpha`` and its PSI at least ``min_psi``). The
  report was printed (and written, with ``--report``).
* 130 / 143 (``EXIT_SIGINT`` / ``EXIT_SIGTERM``): interrupted by SIGINT / SIGTERM. No output is
  written.

``exit_on_error`` is the one place where exceptions become exit codes; ``StopOnSignal`` turns
SIGINT and SIGTERM into a stop request that the job polls. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn

import click

from batchuq.errors import NoImagesFoundError, StopRequested, UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ errors only; before TF is imported

EXIT_OK = 0
EXIT_IMAGE_ERRORS = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_NO_IMAGES = 4
EXIT_DRIFT = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

logger = logging.getLogger("batchuq")


# --------------------------------------------------------------------------------------------
# Logging.


def iso_time(seconds: float) -> str:
    """``seconds`` since the epoch as local ISO 8601 time with its UTC offset, to the second,
    e.g. ``2026-12-02T00:30:01+01:00``."""
    return dt.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``event``, ``level``, ``time``, ``message`` and event fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one line of JSON (extra fields come from ``record.data``)."""
        payload = {
            "event": getattr(record, "event", "log"),
            "level": record.levelname.lower(),
            "time": iso_time(record.created),
            "message": record.getMessage(),
            **getattr(record, "data", {}),
        }
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """Lines ``batchuq: <message>``, or ``batchuq: <ISO 8601 time> <message>`` with
    ``timestamps`` (a log file then tells one night's lines from the next)."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__("%(message)s")
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """``record`` as one line (and its traceback, if any, below it)."""
        when = f"{iso_time(record.created)} " if self.timestamps else ""
        return f"batchuq: {when}{super().format(record)}"


_log_format = "text"  # set by setup_logging; "json" turns every stderr message into JSON
_timestamps = False  # set by setup_logging: text lines carry the time


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (not a file, a pipe, cron's mail or Airflow's task log)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def setup_logging(log_format: str = "text", timestamps: bool | None = None) -> None:
    """Send batchuq's log to stderr as text or JSON lines (TensorFlow is not imported here).

    Args:
        log_format: ``text`` (lines ``batchuq: ...``) or ``json`` (one object per line, each
            with its ``time``), as for ``--log-format``. ``say`` follows it too.
        timestamps: Whether text lines carry the time, ``batchuq: 2026-12-02T00:30:01+01:00
            ...``; default: when stderr is not a terminal (a log file under cron, Airflow's
            task log), not on a terminal.
    """
    global _log_format, _timestamps
    _log_format = log_format
    _timestamps = not stderr_is_terminal() if timestamps is None else timestamps
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(_timestamps))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def say(message: str, event: str, level: int = logging.ERROR) -> None:
    """Write a closing message to stderr: plain text, or a JSON event with ``--log-format json``.

    When the log lines carry timestamps (stderr is not a terminal), the text does too, as
    ``batchuq: <time> Error: ...``, so that a log's tail says which run failed.

    Args:
        message: The text, e.g. ``Error: ...``.
        event: The JSON ``event`` field, e.g. ``usage_error``, ``no_images``, ``interrupted``.
        level: Logging level of the JSON event.
    """
    if _log_format == "json":
        logger.log(level, message, extra={"event": event})
    elif _timestamps:
        click.echo(f"batchuq: {iso_time(time.time())} {message}", err=True)
    else:
        click.echo(message, err=True)


# --------------------------------------------------------------------------------------------
# TensorFlow.

# TensorFlow's C++ start-up notices, printed on import whatever TF_CPP_MIN_LOG_LEVEL says. They
# are not errors, and they would break "one JSON object per line" on stderr.
_TENSORFLOW_NOTICES = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
)


class _NotRetracing(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def import_tensorflow_quietly(log_format: str = "text") -> None:
    """Import TensorFlow with its start-up notices kept off stderr.

    File descriptor 2 points at a file ``batchuq-tensorflow-import-<pid>.log`` in the temporary
    folder during the import. Afterwards every captured line except the known notices goes to
    stderr (as a JSON ``stderr`` event with ``log_format="json"``) and the file is deleted. If
    the import kills the process (a broken TensorFlow install), the file keeps its message.

    Args:
        log_format: ``text`` or ``json``, as for ``--log-format``.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    capture = Path(tempfile.gettempdir()) / f"batchuq-tensorflow-import-{os.getpid()}.log"
    sys.stderr.flush()
    saved = os.dup(2)
    with open(capture, "w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
    capture.unlink(missing_ok=True)
    # Every ensemble member (and SNGP head) has its own compiled function, traced once each;
    # TensorFlow counts them together and warns of "retracing" from the fifth on: not true here.
    logging.getLogger("tensorflow").addFilter(_NotRetracing())
    for line in lines:
        if not line.strip() or any(notice in line for notice in _TENSORFLOW_NOTICES):
            continue
        if log_format == "json":
            line = json.dumps({"event": "stderr", "level": "info", "message": line})
        print(line, file=sys.stderr)
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Exceptions to exit codes.


class Terminated(BaseException):  # noqa: N818 (like KeyboardInterrupt, a signal, not an error)
    """Raised for SIGTERM (a second one, or one after the run) so that cleanup code runs."""


def leave_at_once(code: int) -> NoReturn:
    """Flush the log and the streams and end the process with ``code``, skipping teardown.

    Cleanup (temporary file, checkpoint) must be done already. A normal interpreter exit
    would tear down TensorFlow's threads mid-work, which can crash the process and turn 143
    into a segfault.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def usage_error(message: str) -> NoReturn:
    """Report a usage error on stderr (event ``usage_error``) and exit 2."""
    say(f"Error: {message}", "usage_error")
    sys.exit(EXIT_USAGE)


@contextmanager
def exit_on_error(*, skip_on_no_images: bool = True) -> Iterator[None]:
    """Turn the exceptions that escape a command's body into batchuq's exit codes.

    * ``NoImagesFoundError``: ``No images to score: ...`` and exit 4 (with
      ``skip_on_no_images``), else a usage error.
    * any other ``UsageError``: ``Error: <message>`` and exit 2.
    * Click's own exceptions and ``SystemExit``: passed through (Click maps them).
    * ``KeyboardInterrupt``, ``StopRequested``, ``Terminated``: exit 130 (143 for
      ``Terminated``), no output written. ``StopOnSignal`` handles them first where it is used.
    * any other exception: a failure during the run, logged with its traceback; exit 3.

    Args:
        skip_on_no_images: Whether an empty images folder is a "skip" (``score``: exit 4) or
            a usage error (``train``, ``calibrate``: the folder is the data they need).

    Raises:
        SystemExit: With the exit code, for every exception above but Click's own.
    """
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except NoImagesFoundError as exc:
        if not skip_on_no_images:
            usage_error(str(exc))
        say(f"No images to score: {exc}", "no_images", logging.WARNING)
        sys.exit(EXIT_NO_IMAGES)
    except UsageError as exc:
        usage_error(str(exc))
    except (KeyboardInterrupt, StopRequested, Terminated) as exc:
        sigint = not isinstance(exc, Terminated)
        what = "Interrupted (SIGINT)" if sigint else "Terminated (SIGTERM)"
        say(f"{what}: no output written.", "interrupted")
        leave_at_once(EXIT_SIGINT if sigint else EXIT_SIGTERM)
    except Exception as exc:
        logger.exception("fatal error, no output written: %s", exc)
        sys.exit(EXIT_FATAL)


# --------------------------------------------------------------------------------------------
# Signals.


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(inode, mtime_ns)`` of ``path``, or None if it does not exist: was it replaced?"""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class StopOnSignal:
    """Turn SIGINT and SIGTERM into a stop request for a job that writes ``output``.

    The first signal only sets a flag that the job polls through ``should_stop`` (before or
    after a batch's sampling): an exception raised from the handler, inside TensorFlow's C++
    code, can crash the process. A second signal interrupts at once (``KeyboardInterrupt`` or
    ``Terminated``). When the block ends after a signal, whatever it raised, the process says
    what happened to the output (event ``interrupted``) and leaves with 130 (SIGINT) or 143
    (SIGTERM) through ``leave_at_once``. Other exceptions pass on to ``exit_on_error``.

    Example::

        with StopOnSignal(output, resume) as stop:
            score_directory(..., control=RunControl(should_stop=stop.should_stop))

    Args:
        output: The file the job writes (renamed into place when it completes).
        resume: Whether finished rows are kept in a checkpoint (``--resume``).
        checkpoint: The checkpoint folder; default ``OUTPUT.checkpoint/``.
    """

    def __init__(self, output: Path, resume: bool, checkpoint: Path | None = None) -> None:
        self.output = output
        self.resume = resume
        self.checkpoint = checkpoint or output.with_name(output.name + ".checkpoint")
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._output_before: tuple[int, int] | None = None

    def should_stop(self) -> bool:
        """Whether a signal asked the job to stop."""
        return bool(self.received)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def __enter__(self) -> StopOnSignal:
        self._output_before = _file_identity(self.output)
        self._previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            # After a signal the exception is StopRequested or, after a second signal, whatever
            # TensorFlow's C++ code made of the interrupt (e.g. a RuntimeError naming
            # Terminated), or none when the signal came after the last batch: the signal
            # received, not the exception's type, decides.
            if self.received or isinstance(exc, (KeyboardInterrupt, Terminated)):
                self._leave(exc)
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

    def _leave(self, exc: BaseException | None) -> NoReturn:
        """Say what became of the output and leave with 130 or 143."""
        sigint = (self.received[:1] == [signal.SIGINT]) or (
            not self.received and isinstance(exc, KeyboardInterrupt)
        )
        what = "Interrupted (SIGINT)" if sigint else "Terminated (SIGTERM)"
        if _file_identity(self.output) != self._output_before:  # the signal came after the rename
            say(f"{what} after {self.output} was complete; no summary.", "interrupted")
        elif self.resume:
            say(
                f"{what}: no output written; finished rows are kept in "
                f"{self.checkpoint}/ (run again with --resume to finish).",
                "interrupted",
            )
        else:
            say(f"{what}: no output written.", "interrupted")
        leave_at_once(EXIT_SIGINT if sigint else EXIT_SIGTERM)
