"""``batchuq queue``: the command over ``batchuq.jobs.queue``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from batchuq.cli.config import config_option
from batchuq.cli.runtime import exit_on_error, setup_logging

BY_CHOICES = ("mutual_information", "margin", "entropy", "ood")


@click.command("queue")
@click.argument("tonight", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-n",
    "--count",
    "count",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="How many images to queue (fewer when fewer readable, not yet queued images are left).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The Label Studio import file to write (JSON: a list of tasks, each with the image "
    "and the predicted class as a pre-annotation).",
)
@click.option(
    "--csv",
    "csv",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Also write the queue as CSV here. Default: OUTPUT with the suffix .csv "
    "(tasks.json -> tasks.csv).",
)
@click.option(
    "--by",
    type=click.Choice(BY_CHOICES),
    default="mutual_information",
    show_default=True,
    help="What makes an image informative: mutual_information (highest first), margin "
    "(smallest first), entropy (highest first), ood (knn_distance, highest first; entropy, "
    "with a warning, when the file has no knn_distance column).",
)
@click.option(
    "--history",
    "history",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="The queue folder: images it holds from other nights are never queued again, and "
    "tonight's picks are added as QUEUE_DIR/KEY=VALUE/part-0.parquet (rerunning a night "
    "replaces that night's picks).",
)
@click.option(
    "--night",
    metavar="KEY=VALUE",
    default=None,
    show_default=True,
    help="Tonight's name in the --history folder. Default: TONIGHT's folder when it is named "
    "KEY=VALUE (a history partition, e.g. date=2026-12-01), else night=<TONIGHT's file stem>.",
)
@click.option(
    "--url-prefix",
    default=None,
    show_default=True,
    help="Give Label Studio this prefix + each image's path within IMAGES (URL-quoted), e.g. "
    "https://files.example/2026-12-01/ or /data/local-files/?d=incoming/2026-12-01/. "
    "Default: the image's absolute path or object-store URL.",
)
@click.option(
    "--images-root",
    default=None,
    show_default=True,
    help="Where the scored images are now, if not where the scored file says (its "
    "images_root; a relative one is taken from the working directory).",
)
@click.option(
    "--from-name",
    default="choice",
    show_default=True,
    help="The name of the <Choices> tag of the Label Studio labelling configuration.",
)
@click.option(
    "--to-name",
    default="image",
    show_default=True,
    help="The name of the <Image> tag of the Label Studio labelling configuration.",
)
@click.option(
    "--model-version",
    default=None,
    show_default=True,
    help="The predictions' model_version in Label Studio. Default: the model file's name and "
    "the first 12 hex digits of its sha256.",
)
@config_option
def queue_command(
    tonight: Path,
    count: int,
    output: Path,
    csv: Path | None,
    by: str,
    history: Path | None,
    night: str | None,
    url_prefix: str | None,
    images_root: str | None,
    from_name: str,
    to_name: str,
    model_version: str | None,
) -> None:
    """Queue TONIGHT's most informative images for labelling, as Label Studio tasks and CSV.

    TONIGHT is a file written by `batchuq score`, or a history partition (score --partition).
    Its readable images are ranked by --by and picked round-robin over the predicted classes
    (the most informative image of every class, then the next of every class, ...), so the
    -n images span the classes. With --history, images queued on other nights are left out
    and tonight's picks are remembered. Error rows are never queued.

    Exit codes: 0 ok (also when nothing is left to queue), 2 usage error, 3 failure, 4 TONIGHT
    holds no rows.

    Example:

        batchuq queue history/date=2026-12-01 -n 50 -o tasks.json --history queue/
    """
    from batchuq.jobs.queue import (
        LabelStudioNames,
        queue_images,
        remember,
        write_csv,
        write_label_studio,
    )
    from batchuq.output.paths import check_output_path

    setup_logging()
    with exit_on_error():
        csv_path = csv or output.with_suffix(".csv")
        check_output_path(output, suffix=".json")  # before any work
        check_output_path(csv_path, suffix=".csv")
        queue = queue_images(
            tonight,
            count,
            by=by,
            queue_dir=history,
            night=night,
            url_prefix=url_prefix,
            images_root=images_root,
            model_version=model_version,
        )
        write_label_studio(queue, output, LabelStudioNames(from_name, to_name, model_version))
        write_csv(queue, csv_path)
        log = remember(queue, history) if history is not None else None
    logging.getLogger("batchuq").info(
        f"queued {len(queue.tasks)} of {queue.rows} images from {queue.tasks['pred'].nunique()} "
        f"predicted classes by {queue.column} ({queue.already_queued} queued on earlier nights "
        f"left out, {queue.errors} error rows) -> {output}, {csv_path}"
        + (f"; remembered in {log}" if log is not None else "")
    )
