"""The Ray engine's connection to Ray: which cluster, and Ray's output kept in batchuq's log.

``ray_session`` connects the driver for one run: to the Ray already initialised in this process,
else to ``address``, else to ``$RAY_ADDRESS``, else to a Ray it starts on this machine (and stops
afterwards). Never to a Ray found running on the machine, as a bare ``ray.init()`` would.

Ray writes to stderr in three ways, none of which may break "one JSON object per line" of
``--log-format json``:

* its Python loggers (``ray``, ``ray.data``): their console handlers are swapped, for the
  session, for one that logs WARNING and above through batchuq's logger (event ``ray``), so
  they come out as ``batchuq: ray: ...`` lines or JSON events;
* its C++ core worker in this process: at start-up a notice, captured and passed on in the
  same way, and during the run one error line per actor pool ("constructor arguments in the
  object store", a known Ray notice for every restartable actor), silenced by starting the core
  worker with ``RAY_BACKEND_LOG_LEVEL=fatal`` unless the variable is set (a Ray started here
  inherits it: its C++ logs in the session folder then hold fatal errors only);
* its workers' output, which stays in Ray's session folder (``log_to_driver=False``).

``ray.init`` also replaces the SIGTERM handler with one that exits at once; the handlers in
place before it are restored, so that the CLI's clean stop keeps working.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

logger = logging.getLogger("batchuq")

# Object store of a Ray started for the run: only parts' positions and summaries pass through.
LOCAL_OBJECT_STORE_BYTES = 256 << 20
# Start-up lines of Ray's C++ code that say nothing to a batchuq user.
_RAY_NOTICES = ("Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL",)


class _ToBatchuqLog(logging.Handler):
    """Passes a Ray log record on to batchuq's logger as event ``ray``."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.log(record.levelno, "ray: %s", record.getMessage(), extra={"event": "ray"})


@contextlib.contextmanager
def ray_session(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Connect to Ray for one run (see the module docstring), with Ray's output kept quiet.

    Args:
        ray: The imported ``ray`` module.
        address: The cluster's address, or ``None`` for ``$RAY_ADDRESS`` or a local Ray.

    Yields:
        Nothing; Ray is connected inside the block.
    """
    started = False
    if not ray.is_initialized():
        _init(ray, address or os.environ.get("RAY_ADDRESS") or "local")
        started = True
    with _ray_logs_to_batchuq(ray):
        try:
            yield
        finally:
            if started:
                ray.shutdown()


def _init(ray: ModuleType, address: str) -> None:
    """``ray.init`` with the C++ start-up output captured and the signal handlers kept."""
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address == "local":  # a new Ray on this machine, never one found running here
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        options |= {"include_dashboard": False, "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    unset = "RAY_BACKEND_LOG_LEVEL" not in os.environ
    if unset:
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    try:
        with _keep_signal_handlers(), _stderr_to_log():
            ray.init(address=address, **options)
    finally:
        if unset:
            del os.environ["RAY_BACKEND_LOG_LEVEL"]


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Restore the SIGTERM and SIGINT handlers after the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """Capture file descriptor 2 during the block; log each line but Ray's notices after it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
    for line in lines:
        if line.strip() and not any(notice in line for notice in _RAY_NOTICES):
            logger.info("ray: %s", line, extra={"event": "ray"})


@contextlib.contextmanager
def _ray_logs_to_batchuq(ray: ModuleType) -> Iterator[None]:
    """Route the console output of Ray's loggers through batchuq's log during the block.

    Ray Data's progress bars and execution banners are switched off (the driver's tqdm bar
    counts images); its log file in the session folder keeps everything.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # It says, once per run, that the progress bars are off.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    forward = _ToBatchuqLog(logging.WARNING)
    swapped: list[tuple[logging.Logger, logging.Handler]] = []
    for name in ("ray", "ray.data"):
        ray_logger = logging.getLogger(name)
        for handler in list(ray_logger.handlers):
            if _is_console(handler):
                ray_logger.removeHandler(handler)
                swapped.append((ray_logger, handler))
        ray_logger.addHandler(forward)
    try:
        yield
    finally:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).removeHandler(forward)
        for ray_logger, handler in swapped:
            ray_logger.addHandler(handler)


def _is_console(handler: logging.Handler) -> bool:
    """Whether a handler writes to the terminal, not to one of Ray's log files."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )
