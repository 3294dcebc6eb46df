"""The ``batchuq`` command line: a thin Click layer over ``score_directory`` and friends.

Exit codes (also in the README):

* 0: success; every image scored, or the share of unreadable images is at most
  ``--max-error-rate``.
* 1: the output was written, but more images than ``--max-error-rate`` allows could not be read
  (their rows have ``status`` = ``error: ...``).
* 2: usage error: bad option or config file, missing images folder, unusable model, class names
  that do not match the model, output not ending in ``.parquet``. Nothing is written.
* 3: fatal error during the run. No output is written (a previous output is left untouched).
* 4: no images to score: the images folder holds none (or, with ``--missing-ok``, does not
  exist). Nothing is written; schedulers can treat it as "skip" (Airflow's ``skip_on_exit_code``).
* 130 / 143: interrupted by SIGINT / SIGTERM. No output is written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import click

from batchuq.cli.config import config_option, settings_provenance
from batchuq.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MEMORY_BUDGET_MB, DEFAULT_PASSES
from batchuq.cli.options import (
    augmentation_options,
    batch_size_option,
    class_names_options,
    exif_transpose_option,
    import_option,
    logits_option,
    model_option,
    precision_option,
    progress_option,
    rescale_option,
    sample_layers_option,
    seed_option,
    split_csv,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ errors only; before TF is imported

EXIT_OK = 0
EXIT_IMAGE_ERRORS = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_NO_IMAGES = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

logger = logging.getLogger("batchuq")


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup code runs."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``event``, ``level``, ``time``, ``message`` and event fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "event": getattr(record, "event", "log"),
            "level": record.levelname.lower(),
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "message": record.getMessage(),
            **getattr(record, "data", {}),
        }
        return json.dumps(payload, default=str)


# TensorFlow's C++ start-up notices, printed on import whatever TF_CPP_MIN_LOG_LEVEL says. They
# are not errors, and they would break "one JSON object per line" on stderr.
_TENSORFLOW_NOTICES = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
)


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
    for line in lines:
        if not line.strip() or any(notice in line for notice in _TENSORFLOW_NOTICES):
            continue
        if log_format == "json":
            line = json.dumps({"event": "stderr", "level": "info", "message": line})
        print(line, file=sys.stderr)
    sys.stderr.flush()


_log_format = "text"  # set by _setup_logging; "json" turns every stderr message into JSON


def _say(message: str, event: str, level: int = logging.ERROR) -> None:
    """Write a closing message to stderr: plain text, or a JSON event with --log-format json."""
    if _log_format == "json":
        logger.log(level, message, extra={"event": event})
    else:
        click.echo(message, err=True)


def _setup_logging(log_format: str = "text") -> None:
    """Send batchuq's log to stderr as text or JSON lines (TensorFlow is not imported here)."""
    global _log_format
    _log_format = log_format
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("batchuq: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(inode, mtime_ns)`` of ``path``, or None if it does not exist: was it replaced?"""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def is_usage_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a bad argument (exit 2) rather than a failure during the run.

    batchuq raises ``ValueError`` for bad arguments; text encoding errors and Arrow errors are
    ``ValueError`` subclasses too, but they are run-time failures (exit 3, with a traceback).
    """
    import pyarrow as pa

    return isinstance(exc, ValueError) and not isinstance(exc, (UnicodeError, pa.ArrowException))


def _usage_error(message: str) -> None:
    _say(f"Error: {message}", "usage_error")
    sys.exit(EXIT_USAGE)


def _check_score_arguments(
    images: Path,
    output: Path,
    model: Path | None,
    calibration: Path | None,
    missing_ok: bool,
    no_clobber: bool,
    include_all: bool = False,
) -> None:
    """Catch the usual mistakes in a moment, before TensorFlow is imported (which takes seconds).

    Exits 2 for a usage error, and 4 when there is nothing to score.
    """
    from batchuq.discover import IMAGE_EXTENSIONS, LayoutError, has_images, resolve_layout
    from batchuq.model_files import ModelError, check_model_file
    from batchuq.write import check_output_path

    if not images.exists() and missing_ok:
        _say(
            f"No images to score: {str(images)!r} does not exist (--missing-ok).",
            "no_images",
            logging.WARNING,
        )
        sys.exit(EXIT_NO_IMAGES)
    if not images.is_dir():
        _usage_error(
            f"The images folder does not exist or is not a folder. Received: images={str(images)!r}"
        )
    if output.suffix.lower() != ".parquet":
        _usage_error(
            "OUTPUT must end in .parquet: batchuq writes Parquet files. "
            f"Received: output={str(output)!r}"
        )
    try:
        check_output_path(output)
        if model is not None:
            check_model_file(model)
        if calibration is not None:
            _check_calibration_file(calibration)
    except (ValueError, ModelError) as exc:
        _usage_error(str(exc))
    if no_clobber and output.exists():
        _usage_error(f"The output exists and --no-clobber is set. Received: output={str(output)!r}")
    extensions = None if include_all else IMAGE_EXTENSIONS
    if not has_images(images, extensions):
        _say(f"No images to score: none found in {str(images)!r}.", "no_images", logging.WARNING)
        sys.exit(EXIT_NO_IMAGES)
    try:
        resolve_layout(images, extensions)
    except LayoutError as exc:
        _usage_error(str(exc))


def _check_calibration_file(path: Path) -> None:
    """Refuse a file that is not JSON from ``batchuq calibrate`` (full checks come later)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"Could not read the calibration file: {exc}. Received: calibration={str(path)!r}"
        ) from None
    if not isinstance(data, dict) or "conformal_quantiles" not in data:
        raise ValueError(
            "Not a calibration file written by `batchuq calibrate`. "
            f"Received: calibration={str(path)!r}"
        )


class LazyGroup(click.Group):
    """A group whose commands defined in other modules are imported only when they are run.

    ``batchuq --help`` and ``batchuq score ...`` then do not pay for importing pandas and
    friends that only ``calibrate`` and ``evaluate`` need.
    """

    # name -> (module:attribute, the first line of its docstring for `batchuq --help`)
    lazy_commands = {
        "calibrate": (
            "batchuq.cli.calibrate:calibrate_command",
            "Fit validation thresholds, a temperature and conformal sets on VAL_IMAGES.",
        ),
        "evaluate": (
            "batchuq.jobs.evaluate:evaluate_command",
            "Evaluate OUT.parquet, written by `batchuq score` on a labelled folder.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            import importlib

            module, attribute = self.lazy_commands[cmd_name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (name, self.commands[name].get_short_help_str(limit=80))
            if name in self.commands
            else (name, self.lazy_commands[name][1])
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(package_name="batchuq")
def cli() -> None:
    """Per-image uncertainty for image classifiers, in batch.

    batchuq runs a Keras classifier over a folder of images with Monte Carlo dropout and
    test-time augmentation, and writes one Parquet row per image with the mean, median and
    std of every class probability, uncertainty scores, a prediction and a decision.

    Example:

        batchuq score sample_data/digits/test out.parquet
    """


@cli.command()
@click.argument("images", type=click.Path(file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@model_option
@click.option(
    "--passes",
    "-T",
    type=click.IntRange(min=1),
    default=DEFAULT_PASSES,
    show_default=True,
    help="MC dropout forward passes per (augmented) image. 1 = deterministic softmax.",
)
@click.option(
    "--tta",
    "-K",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Test-time augmentation copies per image. 1 = no augmentation.",
)
@augmentation_options
@seed_option
@batch_size_option
@click.option(
    "--rule",
    type=click.Choice(["median", "threshold", "confidence", "none"]),
    default="median",
    show_default=True,
    help="Decision rule: median = top median beats all others and >= --min-median; "
    "threshold = pred unless below its class's threshold from --calibration; "
    "confidence = mean probability of the prediction >= --min-confidence; none.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="calibration.json from `batchuq calibrate` for this model: thresholds for "
    "--rule threshold, the temperature, and a conformal pred_set column.",
)
@click.option(
    "--temperature/--no-temperature",
    default=False,
    show_default=True,
    help="Rescale the MC mean with the calibration's fitted temperature.",
)
@click.option(
    "--allow-predictor-mismatch",
    is_flag=True,
    default=False,
    show_default=True,
    help="Use a --calibration fitted on another predictor (passes, TTA, augmentation, rescale, "
    "precision, sampled layers, logits, EXIF) than this run's, with a warning. Its conformal "
    "sets and temperature then carry no guarantee. By default that is a usage error.",
)
@click.option(
    "--min-median",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Median rule: smallest median probability that is accepted.",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Confidence rule: smallest mean probability that is accepted.",
)
@class_names_options
@rescale_option
@sample_layers_option
@click.option(
    "--memory-budget",
    type=click.FloatRange(min=1),
    default=DEFAULT_MEMORY_BUDGET_MB,
    show_default=True,
    help="Estimated MB of activations for one chunk of augmented copies and tiled passes: "
    "bounds the memory that would grow with --passes and --tta (peak RSS rose by about 1.5x "
    "this on the reference CNN). Larger chunks were not faster there.",
)
@precision_option
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Refuse images with more pixels than this (decompression bombs).",
)
@click.option(
    "--max-error-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of unreadable images tolerated before the exit code is 1.",
)
@logits_option
@click.option(
    "--save-samples",
    is_flag=True,
    default=False,
    show_default=True,
    help="Add a `samples` column with every image's raw T x K samples per class (for "
    "`evaluate --report` distribution plots); about 4*T*K*classes bytes per image.",
)
@click.option(
    "--resume",
    is_flag=True,
    default=False,
    show_default=True,
    help="Keep finished rows in OUTPUT.checkpoint/ and, after an interrupted run with the "
    "same settings, score only the images not done yet.",
)
@click.option(
    "--checkpoint-rows",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="With --resume: rows per checkpoint part (work lost on a kill is at most this).",
)
@click.option(
    "--follow-symlinks",
    is_flag=True,
    default=False,
    show_default=True,
    help="Follow symlinks that leave IMAGES (by default they become error rows).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line on stderr for every event (start, image_error, "
    "summary, usage_error, too_many_errors, interrupted).",
)
@click.option(
    "--include-all",
    is_flag=True,
    default=False,
    show_default=True,
    help="Try every file, not only image extensions (.jpg .png .webp .tif ...): files that are "
    "not images become error rows. Otherwise they are counted as skipped.",
)
@exif_transpose_option
@import_option
@click.option(
    "--missing-ok",
    is_flag=True,
    default=False,
    show_default=True,
    help="A missing IMAGES folder counts as a night with no images: exit 4 (skip), not 2.",
)
@click.option(
    "--no-clobber",
    is_flag=True,
    default=False,
    show_default=True,
    help="Refuse to replace an existing OUTPUT (exit 2). By default it is replaced "
    "atomically when the run completes.",
)
@progress_option
@config_option
@click.pass_context
def score(
    ctx: click.Context,
    images: Path,
    output: Path,
    model: Path | None,
    passes: int,
    tta: int,
    tta_rotation: float,
    tta_zoom: float,
    tta_shift: float,
    tta_contrast: float,
    tta_flip: bool,
    seed: int,
    batch_size: int,
    rule: str,
    calibration: Path | None,
    temperature: bool,
    allow_predictor_mismatch: bool,
    min_median: float,
    min_confidence: float,
    class_names: str | None,
    labels: Path | None,
    rescale: float | None,
    sample_layers: str | None,
    memory_budget: float,
    precision: str,
    max_pixels: int,
    max_error_rate: float,
    logits: bool,
    save_samples: bool,
    resume: bool,
    checkpoint_rows: int,
    follow_symlinks: bool,
    log_format: str,
    include_all: bool,
    exif_transpose: bool | None,
    imports: tuple[str, ...],
    missing_ok: bool,
    no_clobber: bool,
    progress: bool,
) -> None:
    """Score every image in IMAGES and write one Parquet row per image to OUTPUT.

    IMAGES is a folder with one subfolder per class (n0, n1, ... : rows get a label) or a flat
    folder of images (unlabelled). Each image is augmented --tta times and each copy is run
    --passes times with only the dropout layers switched on; the per-class mean, median and
    std over those samples, the uncertainty scores and a decision go into OUTPUT. OUTPUT is
    written to a temporary file and renamed into place only when the run completes.

    Every option can also come from a config file (--config, $BATCHUQ_CONFIG or ./batchuq.toml,
    table [score]); the command line and the environment win over it.

    Exit codes: 0 ok, 1 too many unreadable images, 2 usage error, 3 failure during the run,
    4 no images found, 130/143 interrupted.

    Example:

        batchuq score sample_data/digits/test out.parquet --passes 100 --tta 4
    """
    _setup_logging(log_format)
    _check_score_arguments(images, output, model, calibration, missing_ok, no_clobber, include_all)
    import_tensorflow_quietly(log_format)
    from batchuq.augment import TTAConfig
    from batchuq.postprocess.rules import DecisionRule
    from batchuq.discover import NoImagesFoundError
    from batchuq.model_files import import_user_modules
    from batchuq.models import ModelError
    from batchuq.jobs.score import score_directory

    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        # The first signal only asks score_directory to stop at its next check (before or
        # after a batch's sampling): an exception raised here, inside TensorFlow's C++ code,
        # can crash the process. A second signal interrupts at once.
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    output_before = _file_identity(output)
    try:
        import_user_modules(imports)
        report = score_directory(
            images,
            output,
            model=model,
            passes=passes,
            tta=TTAConfig(tta, tta_rotation, tta_zoom, tta_shift, tta_contrast, tta_flip),
            seed=seed,
            batch_size=batch_size,
            rule=DecisionRule(rule, min_median, min_confidence),
            calibration=calibration,
            temperature=temperature,
            allow_predictor_mismatch=allow_predictor_mismatch,
            class_names=split_csv(class_names),
            labels=labels,
            rescale=rescale,
            sample_layers=split_csv(sample_layers),
            memory_budget_mb=memory_budget,
            max_pixels=max_pixels,
            precision=precision,
            logits=logits,
            save_samples=save_samples,
            resume=resume,
            checkpoint_rows=checkpoint_rows,
            follow_symlinks=follow_symlinks,
            progress=progress and log_format == "text",
            should_stop=lambda: bool(received),
            settings=settings_provenance(ctx),
            include_all=include_all,
            exif_transpose=exif_transpose,
        )
        if received:  # the signal came after the last batch: the output is complete
            raise _Terminated()
    except BaseException as exc:
        # After a signal the exception is StopRequested or, after a second signal, whatever
        # TensorFlow's C++ code made of the interrupt (e.g. a RuntimeError naming
        # _Terminated): the signal received, not the exception's type, decides.
        if received or isinstance(exc, (KeyboardInterrupt, _Terminated)):
            sigint = (received[:1] == [signal.SIGINT]) or (
                not received and isinstance(exc, KeyboardInterrupt)
            )
            what = "Interrupted (SIGINT)" if sigint else "Terminated (SIGTERM)"
            if _file_identity(output) != output_before:  # the signal came after the rename
                _say(f"{what} after {output} was complete; no summary.", "interrupted")
            elif resume:
                _say(
                    f"{what}: no output written; finished rows are kept in "
                    f"{output}.checkpoint/ (run again with --resume to finish).",
                    "interrupted",
                )
            else:
                _say(f"{what}: no output written.", "interrupted")
            # Cleanup (temporary file, checkpoint) is done. Leave at once: a normal interpreter
            # exit would tear down TensorFlow's threads mid-work, which can crash the process
            # and turn 143 into a segfault.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_SIGINT if sigint else EXIT_SIGTERM)
        if isinstance(exc, NoImagesFoundError):
            _say(f"No images to score: {exc}", "no_images", logging.WARNING)
            sys.exit(EXIT_NO_IMAGES)
        if isinstance(exc, (NotADirectoryError, ModelError)) or is_usage_error(exc):
            _usage_error(str(exc))
        if isinstance(exc, Exception):
            logger.exception("fatal error, no output written: %s", exc)
            sys.exit(EXIT_FATAL)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if report.errors and report.error_rate > max_error_rate:
        _say(
            f"{report.errors} of {report.images} images could not be read "
            f"({report.error_rate:.1%} > --max-error-rate {max_error_rate:.1%}); "
            "see rows whose status starts with 'error'.",
            "too_many_errors",
        )
        sys.exit(EXIT_IMAGE_ERRORS)


@cli.command()
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Training epochs."
)
@click.option(
    "--image-size",
    type=click.IntRange(min=46),
    default=128,
    show_default=True,
    help="Height and width of the model input (at least 46 for the reference CNN).",
)
@click.option(
    "--channels",
    type=click.Choice(["1", "3"]),
    default="3",
    show_default=True,
    help="Model input channels: 1 = grayscale, 3 = RGB.",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Stratified fraction held out to report val accuracy.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Training batch size.",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Random rotation, zoom and translation of training images.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for the split, initial weights and shuffling.",
)
@click.option(
    "--exif-transpose/--no-exif-transpose",
    default=False,
    show_default=True,
    help="Turn training images upright by their EXIF orientation; recorded in the sidecar, so "
    "that `batchuq score` reads images the same way.",
)
@config_option
def train(
    images: Path,
    model: Path,
    epochs: int,
    image_size: int,
    channels: str,
    val_split: float,
    batch_size: int,
    augment: bool,
    seed: int,
    exif_transpose: bool,
) -> None:
    """Train the reference CNN on the class folders in IMAGES and save it to MODEL.

    The network is the 10-monkey-species post's CNN (Conv32-Pool-Conv32-Pool-Dropout0.5-
    Conv64-Pool-Conv64-Pool-Dropout0.5-Flatten-Dense512-Dropout0.3-Dense-softmax, Adam).
    A sidecar MODEL-stem.classes.json with the class names is written beside MODEL, so that
    `batchuq score --model MODEL` names its columns.

    Example:

        batchuq train sample_data/digits/train digits.keras --image-size 64 --channels 1
    """
    _setup_logging()
    import_tensorflow_quietly()
    from batchuq.discover import NoImagesFoundError
    from batchuq.jobs.train import train_directory

    try:
        report = train_directory(
            images,
            model,
            epochs=epochs,
            image_size=(image_size, image_size),
            channels=int(channels),
            val_split=val_split,
            batch_size=batch_size,
            augment=augment,
            seed=seed,
            exif_transpose=exif_transpose,
        )
    except (NoImagesFoundError, ValueError) as exc:
        _usage_error(str(exc))
    accuracy = "n/a" if report.val_accuracy is None else f"{report.val_accuracy:.4f}"
    click.echo(
        f"trained on {report.train_images} images ({len(report.class_names)} classes), "
        f"validation accuracy {accuracy} -> {report.model_path}",
        err=True,
    )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batchuq")
