"""``batchuq calibrate``: the command over ``batchuq.jobs.calibrate.calibrate_directory``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from batchuq.cli.config import config_option, section_defaults, settings_provenance
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
from batchuq.cli.runtime import exit_on_error, import_tensorflow_quietly, logger, setup_logging
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_ALPHA,
    DEFAULT_CALIBRATION_PASSES,
    DEFAULT_CALIBRATION_TTA,
    DEFAULT_CONFORMAL,
    DEFAULT_DELTA,
    DEFAULT_MAX_PASSES,
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_MEDIAN,
    DEFAULT_MIN_PASSES,
    DEFAULT_PASSES,
    DEFAULT_PERCENTILE,
    DEFAULT_RISK_SCORE,
    DEFAULT_RULE,
    DEFAULT_TTA,
)
from batchuq.postprocess.calibration_file import CalibrationWarning
from batchuq.postprocess.conformal import CONFORMAL_METHODS
from batchuq.postprocess.rules import RISK_SCORES, RULES

if TYPE_CHECKING:  # imported where used: the pre-check loads NumPy, the job TensorFlow
    from batchuq.jobs.calibrate import CalibrateOptions
    from batchuq.jobs.precheck import RunRequest

# calibrate option -> score option whose value in the config's [score] table becomes its
# default: the scoring predictor (and the model) follow the scoring settings.
_FROM_SCORE_TABLE = {
    "model": "model",
    "score_passes": "passes",
    "score_tta": "tta",
    "min_passes": "min_passes",
    "max_passes": "max_passes",
    "adaptive_alpha": "adaptive_alpha",
    "score_rule": "rule",
    "min_median": "min_median",
    "min_confidence": "min_confidence",
    "tta_rotation": "tta_rotation",
    "tta_zoom": "tta_zoom",
    "tta_shift": "tta_shift",
    "tta_contrast": "tta_contrast",
    "tta_flip": "tta_flip",
    "rescale": "rescale",
    "sample_layers": "sample_layers",
    "precision": "precision",
    "logits": "logits",
    "exif_transpose": "exif_transpose",
    "imports": "imports",
    "class_order": "class_order",
}


@click.command("calibrate")
@click.argument(
    "val_images",
    metavar="VAL_IMAGES",
    type=PathOrURL(click.Path(file_okay=False, path_type=Path)),
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Calibration JSON file to write.",
)
@model_option
@import_option
@click.option(
    "--tta",
    "-K",
    type=click.IntRange(min=1),
    default=DEFAULT_CALIBRATION_TTA,
    show_default=True,
    help="Thresholds: augmented copies per validation image.",
)
@click.option(
    "--passes",
    "-T",
    type=click.IntRange(min=1),
    default=DEFAULT_CALIBRATION_PASSES,
    show_default=True,
    help="Thresholds: MC dropout passes per copy (a copy's vector is the mean of its passes).",
)
@click.option(
    "--score-passes",
    type=PASSES,
    default=DEFAULT_PASSES,
    show_default=True,
    help="Scoring predictor (temperature, conformal sets, risk threshold): MC passes, as "
    "score's --passes; 'auto' fits them on the adaptive predictor of score --passes auto "
    "(with --min-passes, --max-passes, --adaptive-alpha and the stopping of --score-rule). "
    "Default: passes in the config's [score] table, else score's default.",
)
@click.option(
    "--min-passes",
    type=click.IntRange(min=1),
    default=DEFAULT_MIN_PASSES,
    show_default=True,
    help="With --score-passes auto: as score's --min-passes.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=2),
    default=DEFAULT_MAX_PASSES,
    show_default=True,
    help="With --score-passes auto: as score's --max-passes.",
)
@click.option(
    "--adaptive-alpha",
    type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
    default=DEFAULT_ADAPTIVE_ALPHA,
    show_default=True,
    help="With --score-passes auto: as score's --adaptive-alpha.",
)
@click.option(
    "--score-rule",
    type=click.Choice(RULES),
    default=DEFAULT_RULE,
    show_default=True,
    help="With --score-passes auto: the score --rule this calibration is for, because the "
    "rule decides when adaptive sampling stops (none and risk stop alike, once pred is "
    "settled; threshold is refused: its stopping reads the thresholds fitted here). "
    "Default: rule in the config's [score] table, else score's default.",
)
@click.option(
    "--min-median",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MIN_MEDIAN,
    show_default=True,
    help="With --score-passes auto and --score-rule median: as score's --min-median.",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MIN_CONFIDENCE,
    show_default=True,
    help="With --score-passes auto and --score-rule confidence: as score's --min-confidence.",
)
@click.option(
    "--score-tta",
    type=click.IntRange(min=1),
    default=DEFAULT_TTA,
    show_default=True,
    help="Scoring predictor: TTA copies, as score's --tta. Default: tta in the config's "
    "[score] table, else score's default.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(0, 100),
    default=DEFAULT_PERCENTILE,
    show_default=True,
    help="Percentile of the predicted-class probabilities taken as each class's threshold.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_ALPHA,
    show_default=True,
    help="Conformal miscoverage: sets hold the true class with probability >= 1 - alpha.",
)
@click.option(
    "--conformal",
    type=click.Choice(CONFORMAL_METHODS),
    default=DEFAULT_CONFORMAL,
    show_default=True,
    help="Conformal sets: lac = marginal, {c : 1 - p_c <= q}; class = one quantile per class "
    "(needs about 10/alpha images per class); aps = adaptive sets, never empty; aps-random = "
    "randomised APS (Romano et al.), coverage near 1 - alpha, may be empty; raps = "
    "regularised randomised APS (Angelopoulos et al.), smaller sets, k_reg and lambda tuned on "
    "a fifth of VAL_IMAGES. The randomised sets draw U per image from --seed and its path.",
)
@click.option(
    "--target-risk",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    show_default=True,
    help="Also fit the selective threshold of score --rule risk: of the images it accepts, "
    "at most this share wrong (population selective risk, certified with probability "
    ">= 1 - delta by Geifman & El-Yaniv's SGR). Exit 2 with the images needed if the "
    "validation set cannot certify it. Default: not fitted.",
)
@click.option(
    "--delta",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_DELTA,
    show_default=True,
    help="With --target-risk: the probability that the certificate is wrong.",
)
@click.option(
    "--risk-score",
    type=click.Choice(RISK_SCORES),
    default=DEFAULT_RISK_SCORE,
    show_default=True,
    help="With --target-risk: the score the threshold is on, from the scoring predictor's MC "
    "mean as score writes it (entropy and mutual_information negated: higher = more "
    "confident).",
)
@augmentation_options
# The predictor options, shared with score; defaults come from the config's [score] table
# when it has them (see _FROM_SCORE_TABLE), else they are score's defaults.
@rescale_option
@sample_layers_option
@precision_option
@logits_option
@exif_transpose_option
@class_names_options
@seed_option
@batch_size_option
@progress_option
@config_option
@click.pass_context
def calibrate_command(
    ctx: click.Context, val_images: Path | str, output: Path, **options: Any
) -> None:
    """Fit validation thresholds, a temperature and conformal sets on VAL_IMAGES.

    VAL_IMAGES is a labelled folder with one subfolder per class (or an s3:// or gs:// prefix
    holding them, as for score). Thresholds: each image is augmented --tta times (each copy run
    --passes times with dropout on), and per class the --percentile of the predicted-class
    probabilities of the copies that predict it becomes its threshold. Temperature and
    conformal sets: fitted on the MC mean of the scoring predictor (for an ensemble the
    members' average, for SNGP the mean-field probabilities; --score-passes, --score-tta and
    the shared options, which default to the [score] table of the config file, else to
    score's defaults), exactly as `batchuq score` computes it; score refuses the calibration
    for a run with another predictor. The temperature minimises the NLL; the conformal quantile
    (--conformal, at level --alpha) makes sets that hold the true class with probability
    >= 1 - alpha. With --target-risk, the selective threshold of `score --rule risk` is fitted
    on the same MC mean, with its certificate. For score --rule threshold --temperature,
    thresholds are also fitted on the tempered MC mean of the scoring predictor, one value per
    image. --score-passes auto fits all of these on the adaptive predictor of score --passes
    auto, whose stopping depends on the rule: give the --score-rule (and its --min-median or
    --min-confidence) that score will use. The result, with the model's sha256, both
    predictors and all settings, is written to --output as JSON. When the model's penultimate
    features are found, the validation images' normalised features go to a side file next to
    it (cal.json -> cal.knn.npz) for score's knn_distance OOD column; keep the two together.

    Example:

        batchuq calibrate sample_data/digits/val -o calibration.json

        batchuq calibrate sample_data/digits/val -o cal.json --target-risk 0.02 --delta 0.1

        batchuq calibrate sample_data/digits/val -o cal.json --score-passes auto
    """
    from batchuq.postprocess.calibration_file import format_summary

    setup_logging()  # lines `batchuq: ...`, as score's
    values, settings = _with_score_table_defaults(ctx)
    # Warnings after the error, as they were printed before: the outer block prints them.
    with _calibration_warnings_printed(), exit_on_error(skip_on_no_images=False):
        from batchuq.jobs.precheck import check_before_loading

        check_before_loading(val_images, _run_request(values))
        if values["score_passes"] == "auto":
            from batchuq.postprocess.rules import check_adaptive_calibration

            check_adaptive_calibration(values["score_rule"])
        import_tensorflow_quietly()
        from batchuq.jobs.calibrate import calibrate_directory
        from batchuq.model_files import import_user_modules

        import_user_modules(values["imports"])
        calibration = calibrate_directory(
            val_images,
            output,
            calibrate_options(values),
            progress=values["progress"],
            settings=settings,
        )
    click.echo(format_summary(calibration))
    logger.info("-> %s", output)


# calibrate options that CalibrateOptions takes under the same name and as they are.
_AS_THEY_ARE = (
    "passes",
    "score_passes",
    "score_tta",
    "conformal",
    "percentile",
    "alpha",
    "seed",
    "batch_size",
    "labels",
    "class_order",
    "allow_class_mismatch",
    "rescale",
    "precision",
    "logits",
    "exif_transpose",
    "target_risk",
    "delta",
    "risk_score",
    "min_passes",
    "max_passes",
    "adaptive_alpha",
    "score_rule",
    "min_median",
    "min_confidence",
)


def _with_score_table_defaults(
    ctx: click.Context,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The command's values and their provenance, with defaults from the ``[score]`` table.

    An option left at its built-in default takes the value of its score counterpart
    (``_FROM_SCORE_TABLE``) in the config file's ``[score]`` table, when the table has it.

    Args:
        ctx: The ``calibrate`` command's context, after parsing.

    Returns:
        ``(values, settings)``: the values by parameter name, and ``settings_provenance`` with
        the values taken from ``[score]`` marked as such.
    """
    values = dict(ctx.params)
    settings = settings_provenance(ctx)
    score_table = section_defaults(ctx, "score")
    for name, key in _FROM_SCORE_TABLE.items():
        if key in score_table and ctx.get_parameter_source(name) == ParameterSource.DEFAULT:
            values[name] = score_table[key]
            settings[name] = {
                "value": score_table[key],
                "source": f"config file [score] ({settings['config']['value']})",
            }
    return values, settings


def _run_request(values: Mapping[str, Any]) -> RunRequest:
    """What ``check_before_loading`` checks of calibrate's values (models and classes, and
    a model that ``--score-passes auto`` cannot sample)."""
    from batchuq.jobs.precheck import RunRequest

    model = values["model"]
    auto = values["score_passes"] == "auto"  # checked now: an SNGP model cannot run it
    return RunRequest(
        models=tuple([model] if isinstance(model, str) else model or ()),
        passes="auto" if auto else None,
        max_passes=values["max_passes"],
        class_names=split_csv(values["class_names"]),
        class_order=values["class_order"],
        labels=values["labels"],
        allow_class_mismatch=values["allow_class_mismatch"],
    )


def calibrate_options(values: Mapping[str, Any]) -> CalibrateOptions:
    """The ``CalibrateOptions`` of the values of ``batchuq calibrate``.

    Imports TensorFlow (through the job): call it after ``import_tensorflow_quietly``.

    Args:
        values: The command's values by parameter name (``_with_score_table_defaults``).

    Returns:
        The calibration's options.

    Raises:
        UsageError: If a value is out of range.
    """
    from batchuq.jobs.calibrate import CalibrateOptions

    return CalibrateOptions(
        **{name: values[name] for name in _AS_THEY_ARE},
        model=model_argument(values["model"]),
        tta=tta_config(values, copies=values["tta"]),
        class_names=split_csv(values["class_names"]),
        sample_layers=split_csv(values["sample_layers"]),
    )


@contextmanager
def _calibration_warnings_printed() -> Iterator[None]:
    """Log the ``CalibrationWarning``s raised in the block as ``batchuq: Warning: ...``.

    They say what the user should know about the fit (a class with too few images for its
    quantile, ...); other warnings are shown as Python shows them. They are printed when the
    block ends, however it ends.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, CalibrationWarning):
                    logger.warning("Warning: %s", warning.message)
                else:
                    warnings.showwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
