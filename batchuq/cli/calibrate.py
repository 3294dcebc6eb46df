"""``batchuq calibrate``: the command over ``batchuq.jobs.calibrate.calibrate_directory``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from batchuq.cli.config import config_option, section_defaults, settings_provenance
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
from batchuq.defaults import DEFAULT_PASSES
from batchuq.postprocess.calibration import CONFORMAL_METHODS, CalibrationWarning


# --------------------------------------------------------------------------------------------
# Command line.

# calibrate option -> score option whose value in the config's [score] table becomes its
# default: the scoring predictor (and the model) follow the scoring settings.
_FROM_SCORE_TABLE = {
    "model": "model",
    "score_passes": "passes",
    "score_tta": "tta",
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
}


@click.command("calibrate")
@click.argument(
    "val_images",
    metavar="VAL_IMAGES",
    type=click.Path(file_okay=False, path_type=Path),
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
    default=100,
    show_default=True,
    help="Thresholds: augmented copies per validation image.",
)
@click.option(
    "--passes",
    "-T",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Thresholds: MC dropout passes per copy (a copy's vector is the mean of its passes).",
)
@click.option(
    "--score-passes",
    type=click.IntRange(min=1),
    default=DEFAULT_PASSES,
    show_default=True,
    help="Scoring predictor (temperature, conformal sets): MC passes, as score's --passes. "
    "Default: passes in the config's [score] table, else score's default.",
)
@click.option(
    "--score-tta",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Scoring predictor: TTA copies, as score's --tta. Default: tta in the config's "
    "[score] table, else score's default.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(0, 100),
    default=10.0,
    show_default=True,
    help="Percentile of the predicted-class probabilities taken as each class's threshold.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Conformal miscoverage: sets hold the true class with probability >= 1 - alpha.",
)
@click.option(
    "--conformal",
    type=click.Choice(CONFORMAL_METHODS),
    default="lac",
    show_default=True,
    help="Conformal sets: lac = marginal, {c : 1 - p_c <= q}; class = one quantile per class "
    "(needs about 10/alpha images per class); aps = adaptive sets, never empty.",
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
    ctx: click.Context,
    val_images: Path,
    output: Path,
    model: Path | None,
    imports: tuple[str, ...],
    tta: int,
    passes: int,
    score_passes: int,
    score_tta: int,
    percentile: float,
    alpha: float,
    conformal: str,
    tta_rotation: float,
    tta_zoom: float,
    tta_shift: float,
    tta_contrast: float,
    tta_flip: bool,
    rescale: float | None,
    sample_layers: str | None,
    precision: str,
    logits: bool,
    exif_transpose: bool | None,
    class_names: str | None,
    labels: Path | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Fit validation thresholds, a temperature and conformal sets on VAL_IMAGES.

    VAL_IMAGES is a labelled folder with one subfolder per class. Thresholds: each image is
    augmented --tta times (each copy run --passes times with dropout on), and per class the
    --percentile of the predicted-class probabilities of the copies that predict it becomes its
    threshold. Temperature and conformal sets: fitted on the MC mean of the scoring predictor
    (--score-passes, --score-tta and the shared options, which default to the [score] table of
    the config file, else to score's defaults), exactly as `batchuq score` computes it; score
    refuses the calibration for a run with another predictor. The temperature minimises the
    NLL; the conformal quantile (--conformal, at level --alpha) makes sets that hold the true
    class with probability >= 1 - alpha. The result, with the model's sha256, both predictors
    and all settings, is written to --output as JSON.

    Example:

        batchuq calibrate sample_data/digits/val -o calibration.json
    """
    from click.core import ParameterSource

    from batchuq.cli import EXIT_USAGE, import_tensorflow_quietly
    from batchuq.jobs.calibrate import calibrate_directory
    from batchuq.postprocess.calibration import format_summary
    from batchuq.discover import NoImagesFoundError

    values = dict(ctx.params)
    options = settings_provenance(ctx)
    score_table = section_defaults(ctx, "score")
    for name, key in _FROM_SCORE_TABLE.items():
        if key in score_table and ctx.get_parameter_source(name) == ParameterSource.DEFAULT:
            values[name] = score_table[key]
            options[name] = {
                "value": score_table[key],
                "source": f"config file [score] ({options['config']['value']})",
            }
    model = None if values["model"] is None else Path(values["model"])

    import_tensorflow_quietly()
    from batchuq.model_files import import_user_modules
    from batchuq.models import ModelError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        try:
            import_user_modules(values["imports"])
            calibration = calibrate_directory(
                val_images,
                output,
                model=model,
                tta=tta,
                passes=passes,
                score_passes=values["score_passes"],
                score_tta=values["score_tta"],
                conformal=conformal,
                percentile=percentile,
                alpha=alpha,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
                tta_rotation=values["tta_rotation"],
                tta_zoom=values["tta_zoom"],
                tta_shift=values["tta_shift"],
                tta_contrast=values["tta_contrast"],
                tta_flip=values["tta_flip"],
                class_names=split_csv(class_names),
                labels=labels,
                rescale=values["rescale"],
                sample_layers=split_csv(values["sample_layers"]),
                precision=values["precision"],
                logits=values["logits"],
                exif_transpose=values["exif_transpose"],
                settings=options,
            )
        except (NoImagesFoundError, NotADirectoryError, ModelError, ValueError) as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        finally:
            for warning in caught:
                if issubclass(warning.category, CalibrationWarning):
                    click.echo(f"Warning: {warning.message}", err=True)
                else:
                    warnings.showwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
    click.echo(format_summary(calibration))
    click.echo(f"-> {output}", err=True)
