"""``batchuq train``: the command over ``batchuq.jobs.train.train_directory``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from batchuq.cli.config import config_option
from batchuq.cli.runtime import exit_on_error, import_tensorflow_quietly, setup_logging
from batchuq.defaults import (
    DEFAULT_EPOCHS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_INDUCING,
    DEFAULT_SEED,
    DEFAULT_TRAIN_BATCH_SIZE,
    DEFAULT_VAL_SPLIT,
)


@click.command("train")
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DEFAULT_EPOCHS,
    show_default=True,
    help="Training epochs.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=46),
    default=DEFAULT_IMAGE_SIZE,
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
    default=DEFAULT_VAL_SPLIT,
    show_default=True,
    help="Stratified fraction held out to report val accuracy.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_TRAIN_BATCH_SIZE,
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
    default=DEFAULT_SEED,
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
@click.option(
    "--members",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train a deep ensemble of this many members (seeds SEED, SEED+1, ...): MODEL is then "
    "a folder that gets member-0.keras ... and ensemble.json; score it with --model MODEL.",
)
@click.option(
    "--method",
    type=click.Choice(["reference", "sngp"]),
    default="reference",
    show_default=True,
    help="reference: the reference CNN, scored with MC dropout; sngp: a spectral-normalised "
    "residual CNN with a random-feature Gaussian-process head, scored with SNGP (detected "
    "from the model, no flag needed at score time).",
)
@click.option(
    "--num-inducing",
    type=click.IntRange(min=1),
    default=DEFAULT_NUM_INDUCING,
    show_default=True,
    help="--method sngp: random Fourier features of the Gaussian-process head (the model file "
    "holds a num-inducing x num-inducing precision matrix: 4 MB at 1024).",
)
@config_option
def train(images: Path, model: Path, members: int, **options: Any) -> None:
    """Train the reference CNN on the class folders in IMAGES and save it to MODEL.

    The network is the 10-monkey-species post's CNN (Conv32-Pool-Conv32-Pool-Dropout0.5-
    Conv64-Pool-Conv64-Pool-Dropout0.5-Flatten-Dense512-Dropout0.3-Dense-softmax, Adam).
    A sidecar MODEL-stem.classes.json with the class names is written beside MODEL, so that
    `batchuq score --model MODEL` names its columns.

    With --members M, MODEL is a folder and M members are trained, a deep ensemble. With
    --method sngp the network is an SNGP model instead (docs/methods.md, "SNGP").

    Example:

        batchuq train sample_data/digits/train digits.keras --image-size 64 --channels 1
    """
    setup_logging()
    # The images are the training data: an empty folder is a usage error, not a "skip".
    with exit_on_error(skip_on_no_images=False):
        import_tensorflow_quietly()
        from batchuq.jobs.train import TrainOptions, train_directory, train_ensemble

        size, channels = options.pop("image_size"), int(options.pop("channels"))
        train_options = TrainOptions(**options, image_size=(size, size), channels=channels)
        if members > 1:
            ensemble = train_ensemble(images, model, members, train_options)
            report = ensemble.members[0]
        else:
            report = train_directory(images, model, train_options)
    if members > 1:
        accuracies = [r.val_accuracy for r in ensemble.members]
        shown = ", ".join("n/a" if a is None else f"{a:.4f}" for a in accuracies)
        click.echo(
            f"trained {members} members on {report.train_images} images "
            f"({len(report.class_names)} classes), validation accuracy {shown} -> "
            f"{ensemble.manifest}",
            err=True,
        )
        return
    accuracy = "n/a" if report.val_accuracy is None else f"{report.val_accuracy:.4f}"
    click.echo(
        f"trained on {report.train_images} images ({len(report.class_names)} classes), "
        f"validation accuracy {accuracy} -> {report.model_path}",
        err=True,
    )
