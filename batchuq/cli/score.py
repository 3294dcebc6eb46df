"""``batchuq score``: the command over ``batchuq.jobs.score.score_directory``.

The module imports no TensorFlow: ``batchuq score --help`` and every usage mistake (checked by
``check_score_arguments``, then against the model's file by
``batchuq.jobs.precheck.check_before_loading``) are answered in a moment; TensorFlow is imported
only to run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from batchuq.cli.config import config_option, settings_provenance
from batchuq.cli.options import (
    PASSES,
    PathOrURL,
    augmentation_options,
    batch_size_option,
    class_names_options,
    exif_transpose_option,
    import_option,
    logits_option,
    model_argument,
    model_option,
    precision_option,
    progress_option,
    rescale_option,
    sample_layers_option,
    seed_option,
    split_csv,
    tta_config,
)
from batchuq.cli.runtime import (
    EXIT_IMAGE_ERRORS,
    StopOnSignal,
    exit_on_error,
    import_tensorflow_quietly,
    say,
    setup_logging,
)
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_CHECKPOINT_ROWS,
    DEFAULT_CPUS_PER_WORKER,
    DEFAULT_MAX_PASSES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_MEDIAN,
    DEFAULT_MIN_PASSES,
    DEFAULT_PASSES,
    DEFAULT_RULE,
    DEFAULT_TTA,
)
from batchuq.errors import (
    CalibrationError,
    ImagesFolderError,
    NoImagesFoundError,
    OutputError,
    UsageError,
)

if TYPE_CHECKING:  # imported where used: the pre-check loads NumPy, the jobs TensorFlow
    from batchuq.jobs.precheck import RunRequest
    from batchuq.jobs.score import RaySettings, ScoreOptions


@click.command("score")
@click.argument("images", type=PathOrURL(click.Path(file_okay=False, path_type=Path)))
# A string: a trailing / (a folder dataset, --engine ray) must survive; URLs are refused later.
@click.argument("output", type=click.Path(path_type=str))
@model_option
@click.option(
    "--passes",
    "-T",
    type=PASSES,
    default=DEFAULT_PASSES,
    show_default=True,
    help="MC dropout forward passes per (augmented) image. 1 = deterministic softmax. 'auto' "
    "samples each image in rounds of --min-passes and stops once more passes could not change "
    "its decision (at error level --adaptive-alpha), at most --max-passes: the same decisions "
    "as --passes MAX for nearly every image, at a fraction of the passes.",
)
@click.option(
    "--min-passes",
    type=click.IntRange(min=1),
    default=DEFAULT_MIN_PASSES,
    show_default=True,
    help="With --passes auto: passes every image gets, and the size of each later round.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=2),
    default=DEFAULT_MAX_PASSES,
    show_default=True,
    help="With --passes auto: the most passes an image gets; an image that never settles "
    "gets exactly the samples of --passes MAX.",
)
@click.option(
    "--adaptive-alpha",
    type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
    default=DEFAULT_ADAPTIVE_ALPHA,
    show_default=True,
    help="With --passes auto: bound on each image's chance of stopping before --max-passes "
    "with another decision than unlimited passes would give (images that reach --max-passes "
    "get the --passes MAX decision, which may differ; see docs/methods.md).",
)
@click.option(
    "--tta",
    "-K",
    type=click.IntRange(min=1),
    default=DEFAULT_TTA,
    show_default=True,
    help="Test-time augmentation copies per image. 1 = no augmentation.",
)
@augmentation_options
@seed_option
@batch_size_option
@click.option(
    "--rule",
    type=click.Choice(["median", "threshold", "confidence", "risk", "none"]),
    default=DEFAULT_RULE,
    show_default=True,
    help="Decision rule: median = top median beats all others and >= --min-median; "
    "threshold = pred unless below its class's threshold from --calibration; "
    "confidence = mean probability of the prediction >= --min-confidence; risk = pred when "
    "its risk score is at or above the certified selective threshold from --calibration "
    "(calibrate --target-risk), else unclassified; none.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="calibration.json from `batchuq calibrate` for this model and predictor: thresholds "
    "for --rule threshold, the selective threshold for --rule risk, the temperature, and a "
    "conformal pred_set column. For --passes auto it must be fitted with calibrate "
    "--score-passes auto (same adaptive settings and rule).",
)
@click.option(
    "--temperature/--no-temperature",
    default=False,
    show_default=True,
    help="Rescale the MC mean with the calibration's fitted temperature (fitted on this "
    "method's mean: MC dropout's, the ensemble's average, SNGP's mean-field probabilities). "
    "With --rule threshold, the thresholds fitted on the tempered mean are used.",
)
@click.option(
    "--allow-predictor-mismatch",
    is_flag=True,
    default=False,
    show_default=True,
    help="Use a --calibration fitted on another predictor (passes, TTA, augmentation, rescale, "
    "precision, sampled layers, logits, EXIF, adaptive settings) than this run's, with a "
    "warning. Its conformal sets, temperature and risk threshold then carry no guarantee. By "
    "default that is a usage error.",
)
@click.option(
    "--min-median",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MIN_MEDIAN,
    show_default=True,
    help="Median rule: smallest median probability that is accepted.",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MIN_CONFIDENCE,
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
    "`evaluate --report` distribution plots); about 4*T*K*classes bytes per image. With "
    "--passes auto, T is each image's own `passes`.",
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
    default=DEFAULT_CHECKPOINT_ROWS,
    show_default=True,
    help="With --resume: rows per checkpoint part (work lost on a kill is at most this). "
    "With --engine ray, with or without --resume: the most images per unit of work, and "
    "rows per file of a folder OUTPUT.",
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
@click.option(
    "--partition",
    metavar="KEY=VALUE",
    default=None,
    show_default=True,
    help="OUTPUT is a history folder: write the rows to OUTPUT/KEY=VALUE/part-0.parquet "
    "(Hive layout), replacing that partition atomically on a rerun. pandas, polars and DuckDB "
    "read every partition as one table with a KEY column, e.g. --partition date=$(date +%F). "
    "Local engine only.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: score in this process. ray: score on a Ray cluster (pip install "
    '"batchuq[ray]"): a pool of actors, each loading the model once, scores parts of the '
    "folder and writes them beside OUTPUT; the driver then compacts them into OUTPUT in path "
    "order, or, for an OUTPUT ending in /, into a folder dataset. The rows are the same.",
)
@click.option(
    "--ray-address",
    envvar="RAY_ADDRESS",
    default=None,
    show_default=True,
    help="With --engine ray: the cluster to run on, e.g. 10.0.0.5:6379 or ray://head:10001 "
    "(env RAY_ADDRESS). Without it, a Ray is started on this machine for the run and stopped "
    "after it (never one already running here).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    show_default=True,
    help="With --engine ray: actors scoring at once, each holding a copy of the model. "
    "Default: one per CPU of the cluster.",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_CPUS_PER_WORKER,
    show_default=True,
    help="With --engine ray: CPUs Ray books for each actor; TensorFlow runs on that many "
    "threads, rounded up. Below 1, the default pool (one actor per CPU) never books every "
    "CPU, which keeps some for Ray's own tasks and other jobs on the cluster.",
)
@progress_option
@config_option
@click.pass_context
def score(ctx: click.Context, images: Path | str, output: str, **options: Any) -> None:
    """Score every image in IMAGES and write one Parquet row per image to OUTPUT.

    IMAGES is a folder with one subfolder per class (n0, n1, ... : rows get a label) or a flat
    folder of images (unlabelled), or the same layout under an s3:// or gs:// prefix
    (credentials and endpoint from the environment, e.g. AWS_ENDPOINT_URL). Each image is
    augmented --tta times and each copy is run --passes times with only the dropout layers
    switched on; the per-class mean, median and std over those samples, the uncertainty scores
    and a decision go into OUTPUT. OUTPUT is a local file, written to a temporary file and
    renamed into place only when the run completes. With --engine ray the same rows are scored
    on a Ray cluster, and an OUTPUT ending in / is a folder of Parquet files that pandas,
    pyarrow and DuckDB read as one table.

    Every option can also come from a config file (--config, $BATCHUQ_CONFIG or ./batchuq.toml,
    table [score]); the command line and the environment win over it.

    Exit codes: 0 ok, 1 too many unreadable images, 2 usage error, 3 failure during the run,
    4 no images found, 130/143 interrupted.

    Example:

        batchuq score sample_data/digits/test out.parquet --passes 100 --tta 4

        batchuq score sample_data/digits/test out.parquet --passes auto

        batchuq score sample_data/digits/test scores/ --engine ray --workers 2

        batchuq score sample_data/digits/test history/ --partition date=2026-12-01
    """
    setup_logging(options["log_format"])
    with exit_on_error():
        check_score_arguments(
            images,
            output,
            model=options["model"],
            calibration=options["calibration"],
            missing_ok=options["missing_ok"],
            no_clobber=options["no_clobber"],
            include_all=options["include_all"],
            engine=options["engine"],
            partition=options["partition"],
        )
        from batchuq.jobs.precheck import check_before_loading

        check_before_loading(images, run_request(options))
        import_tensorflow_quietly(options["log_format"])
        from batchuq.jobs.score import RunControl, score_directory
        from batchuq.model_files import import_user_modules

        written, checkpoint = written_paths(output, options["partition"])
        with StopOnSignal(written, options["resume"], checkpoint=checkpoint) as stop:
            import_user_modules(options["imports"])
            control = RunControl(
                resume=options["resume"],
                checkpoint_rows=options["checkpoint_rows"],
                should_stop=stop.should_stop,
                # The bar would break "one JSON object per line" on stderr.
                progress=options["progress"] and options["log_format"] == "text",
                settings=settings_provenance(ctx),
            )
            report = score_directory(
                images,
                output,
                score_options(options),
                control,
                ray_settings(options),
                partition=options["partition"],
            )
    if report.errors and report.error_rate > options["max_error_rate"]:
        say(
            f"{report.errors} of {report.images} images could not be read "
            f"({report.error_rate:.1%} > --max-error-rate {options['max_error_rate']:.1%}); "
            "see rows whose status starts with 'error'.",
            "too_many_errors",
        )
        sys.exit(EXIT_IMAGE_ERRORS)


# score options that ScoreOptions takes under the same name and as they are.
_AS_THEY_ARE = (
    "passes",
    "min_passes",
    "max_passes",
    "adaptive_alpha",
    "seed",
    "batch_size",
    "calibration",
    "temperature",
    "allow_predictor_mismatch",
    "labels",
    "class_order",
    "allow_class_mismatch",
    "rescale",
    "max_pixels",
    "precision",
    "logits",
    "save_samples",
    "follow_symlinks",
    "include_all",
    "exif_transpose",
)


def score_options(options: Mapping[str, Any]) -> ScoreOptions:
    """The ``ScoreOptions`` of ``batchuq score``'s options: what decides the rows.

    Imports TensorFlow (through ``batchuq.augment``): call it after
    ``import_tensorflow_quietly``.

    Args:
        options: The command's parsed options, by parameter name.

    Returns:
        The score options.

    Raises:
        UsageError: If a value is out of range.
    """
    from batchuq.jobs.score import ScoreOptions
    from batchuq.postprocess.rules import DecisionRule

    return ScoreOptions(
        **{name: options[name] for name in _AS_THEY_ARE},
        model=model_argument(options["model"]),
        tta=tta_config(options, copies=options["tta"]),
        rule=DecisionRule(options["rule"], options["min_median"], options["min_confidence"]),
        class_names=split_csv(options["class_names"]),
        sample_layers=split_csv(options["sample_layers"]),
        memory_budget_mb=options["memory_budget"],
    )


def ray_settings(options: Mapping[str, Any]) -> RaySettings | None:
    """The ``RaySettings`` of ``batchuq score --engine ray``, or None for the local engine."""
    if options["engine"] != "ray":
        return None
    from batchuq.jobs.score import RaySettings

    return RaySettings(
        address=options["ray_address"],
        workers=options["workers"],
        cpus_per_worker=options["cpus_per_worker"],
        imports=tuple(options["imports"] or ()),
    )


_AUGMENTATION = ("rotation", "zoom", "shift", "contrast", "flip")  # TTAConfig's, from --tta-*


def run_request(options: Mapping[str, Any]) -> RunRequest:
    """What ``check_before_loading`` needs of ``batchuq score``'s options."""
    from batchuq.jobs.precheck import RunRequest

    return RunRequest(
        models=tuple(options["model"] or ()),
        passes=options["passes"],
        min_passes=options["min_passes"],
        max_passes=options["max_passes"],
        adaptive_alpha=options["adaptive_alpha"],
        tta=options["tta"],
        augmentation={name: options[f"tta_{name}"] for name in _AUGMENTATION},
        rule=options["rule"],
        min_median=options["min_median"],
        min_confidence=options["min_confidence"],
        calibration=options["calibration"],
        temperature=options["temperature"],
        allow_predictor_mismatch=options["allow_predictor_mismatch"],
        class_names=split_csv(options["class_names"]),
        class_order=options["class_order"],
        labels=options["labels"],
        allow_class_mismatch=options["allow_class_mismatch"],
        rescale=options["rescale"],
        sample_layers=split_csv(options["sample_layers"]),
        precision=options["precision"],
        logits=options["logits"],
        exif_transpose=options["exif_transpose"],
        include_all=options["include_all"],
        follow_symlinks=options["follow_symlinks"],
    )


def check_score_arguments(
    images: Path | str,
    output: str | Path,
    *,
    model: tuple[Path, ...] | None = None,
    calibration: Path | None = None,
    missing_ok: bool = False,
    no_clobber: bool = False,
    include_all: bool = False,
    engine: str = "local",
    partition: str | None = None,
) -> None:
    """Catch the usual mistakes in a moment, before TensorFlow is imported (which takes seconds).

    Args:
        images: The images folder, or an object-storage URL (only its form is checked here:
            listing it is discovery's work, after TensorFlow is imported).
        output: The Parquet file to write (a URL is refused); with ``engine="ray"`` also a
            folder (ending in ``/``).
        model: The ``--model`` files or ensemble folders, if any.
        calibration: The ``--calibration`` file, if any.
        missing_ok: Whether a missing ``images`` folder means "nothing to score".
        no_clobber: Whether an existing ``output`` is refused.
        include_all: Whether every file counts, not only image extensions.
        engine: ``local`` or ``ray``; ``ray`` needs Ray installed (checked without importing
            it).
        partition: ``KEY=VALUE``: ``output`` is a history folder (local engine only).

    Raises:
        NoImagesFoundError: If there is nothing to score (exit 4).
        UsageError: For a missing images folder, a bad output path, model or calibration
            file, a folder of dataset splits, or the Ray engine without Ray (exit 2).
    """
    from batchuq.discover import IMAGE_EXTENSIONS, has_images, resolve_layout
    from batchuq.model_files import check_model_arguments
    from batchuq.storage import is_url, normalise_url

    if is_url(images):
        normalise_url(images)
    elif not images.exists() and missing_ok:
        raise NoImagesFoundError(f"{str(images)!r} does not exist (--missing-ok).")
    elif not images.is_dir():
        raise ImagesFolderError(
            f"The images folder does not exist or is not a folder. Received: images={str(images)!r}"
        )
    written = check_output_argument(output, engine, partition)
    check_model_arguments(list(model or ()))
    if calibration is not None:
        check_calibration_file(calibration)
    if no_clobber and written.exists():
        exists = "" if str(written) == str(output) else f" ({written})"
        raise OutputError(
            f"The output exists{exists} and --no-clobber is set. Received: output={str(output)!r}"
        )
    extensions = None if include_all else IMAGE_EXTENSIONS
    if is_url(images):
        return
    if not has_images(images, extensions):
        raise NoImagesFoundError(f"none found in {str(images)!r}.")
    resolve_layout(images, extensions)


def check_output_argument(output: str | Path, engine: str, partition: str | None = None) -> Path:
    """Refuse an OUTPUT the engine cannot write, and the Ray engine without Ray installed.

    Args:
        output: The OUTPUT argument as given (a trailing ``/`` makes it a folder dataset).
        engine: ``local`` or ``ray``.
        partition: ``KEY=VALUE``: OUTPUT is a history folder (local engine only).

    Returns:
        What the run writes: OUTPUT, or the partition's file in it.

    Raises:
        OutputError: If OUTPUT does not end in ``.parquet`` (or, with ``ray``, in ``/``; with
            ``partition``, if it is not a folder), or cannot be written.
        UsageError: If ``engine`` is ``ray`` and Ray is not installed, or with ``partition``;
            for a malformed ``partition``.
    """
    from batchuq.output.history import Partition, check_partition_output
    from batchuq.output.paths import check_output_folder, check_output_path, is_folder_output
    from batchuq.storage import is_url

    if partition is not None:
        parsed = Partition.parse(partition)
        if engine == "ray":
            raise UsageError(
                "--partition writes a history partition with the local engine only (the Ray "
                "engine's parts folder would sit where readers of the history look). "
                f"Received: engine='ray', partition={partition!r}"
            )
        return check_partition_output(output, parsed)
    if is_url(str(output)):
        check_output_path(output)  # refuses it, saying why
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError(
            "The Ray engine needs Ray: pip install \"batchuq[ray]\". Received: engine='ray'"
        )
    if is_folder_output(str(output)):
        if engine != "ray":
            raise OutputError(
                "An OUTPUT ending in / (a folder dataset) is written by --engine ray only, or "
                "is a history folder with --partition KEY=VALUE; the local engine writes one "
                f".parquet file. Received: output={str(output)!r}"
            )
        return check_output_folder(output)
    if Path(output).suffix.lower() != ".parquet":
        raise OutputError(
            "OUTPUT must end in .parquet: batchuq writes Parquet files"
            + (" (or, with --engine ray, in / for a folder)" if engine == "ray" else "")
            + f". Received: output={str(output)!r}"
        )
    return check_output_path(output)


def written_paths(output: str, partition: str | None) -> tuple[Path, Path]:
    """The file a run writes and its ``--resume`` checkpoint folder (for ``StopOnSignal``)."""
    if partition is None:
        return Path(output), Path(f"{output.rstrip('/')}.checkpoint")  # Ray: OUT/ -> OUT.checkpoint
    from batchuq.output.history import Partition, partition_checkpoint, partition_file

    parsed = Partition.parse(partition)
    return partition_file(output, parsed), partition_checkpoint(output, parsed)


def check_calibration_file(path: Path) -> None:
    """Refuse a file that is not JSON from ``batchuq calibrate`` (full checks come later).

    Raises:
        CalibrationError: If the file cannot be read as JSON, or lacks the calibration keys.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(
            f"Could not read the calibration file: {exc}. Received: calibration={str(path)!r}"
        ) from None
    if not isinstance(data, dict) or "conformal_quantiles" not in data:
        raise CalibrationError(
            "Not a calibration file written by `batchuq calibrate`. "
            f"Received: calibration={str(path)!r}"
        )
