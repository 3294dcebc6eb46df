"""``batchuq shift``: the command over ``batchuq.jobs.shift`` and ``batchuq.report``."""

from __future__ import annotations

from pathlib import Path

import click

from batchuq.cli.runtime import exit_on_error, setup_logging
from batchuq.corrupt import CORRUPTIONS, SEVERITIES
from batchuq.defaults import DEFAULT_SEED


@click.command("shift")
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--corruptions",
    default=",".join(CORRUPTIONS),
    show_default="all six",
    help=f"Comma-separated corruptions from {', '.join(CORRUPTIONS)}; each gets its own "
    "folder OUT_DIR/<corruption>/.",
)
@click.option(
    "--severities",
    default=f"{SEVERITIES[0]}-{SEVERITIES[-1]}",
    show_default=True,
    help="Severities 1 to 5: a range (1-5), a list (3,5) or one (3); each gets a folder "
    "OUT_DIR/<corruption>/<severity>/.",
)
@click.option(
    "--seed",
    type=int,
    default=DEFAULT_SEED,
    show_default=True,
    help="Seed of the noise and the rotation signs; each image's draws come from the seed, "
    "corruption, severity and its relative path, so a rerun writes the same bytes.",
)
@click.option(
    "--contact-sheet",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="OUT_DIR/contact_sheet.png",
    help="PNG showing one image across corruptions (rows) and severities (columns).",
)
@click.option(
    "--no-contact-sheet",
    is_flag=True,
    default=False,
    show_default=True,
    help="Write no contact sheet.",
)
@click.option(
    "--contact-image",
    default=None,
    show_default="the first image",
    help="The contact sheet's image: its path relative to IMAGES (as in the Parquet `path` "
    "column, e.g. n3/digit_0012.png) or a file path inside IMAGES.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="tqdm bar over images x corruptions x severities on stderr.",
)
def shift(
    images: Path,
    out_dir: Path,
    corruptions: str,
    severities: str,
    seed: int,
    contact_sheet: Path | None,
    no_contact_sheet: bool,
    contact_image: str | None,
    progress: bool,
) -> None:
    """Write corrupted copies of IMAGES to OUT_DIR, one folder per corruption and severity.

    Every image is written to OUT_DIR/<corruption>/<severity>/ under its own relative path and
    in its own format, so `batchuq score OUT_DIR/<corruption>/<severity> ...` gives the same
    `path` column as the clean folder. The corruptions (gaussian_noise, gaussian_blur,
    contrast, rotate, pixelate, jpeg) follow ImageNet-C, scaled to small images, with the
    parameters of docs/methods.md ("Dataset shift"). Unreadable images are skipped with a
    warning. OUT_DIR also gets shift.json (the settings) and a contact sheet.

    Example:

        batchuq shift sample_data/digits/test shifted/ --severities 3,5
    """
    # The job and the drawing are imported here, not at the top, so that `batchuq shift --help`
    # stays light (no Matplotlib).
    from batchuq.jobs.shift import shift_directory

    setup_logging()
    # The images are the data of the series: an empty folder is a usage error, not a "skip".
    with exit_on_error(skip_on_no_images=False):
        report = shift_directory(
            images,
            out_dir,
            corruptions=corruptions,
            severities=severities,
            seed=seed,
            contact_image=contact_image,
            progress=progress,
        )
        written = None
        if not no_contact_sheet:
            from batchuq.report.contact_sheet import write_contact_sheet

            written = write_contact_sheet(report, contact_sheet)
    sheet = f", contact sheet {written}" if written else ""
    click.echo(
        f"batchuq: {report.images} images x {len(report.corruptions)} corruptions x "
        f"{len(report.severities)} severities = {report.written} files, "
        f"{len(report.skipped)} unreadable skipped, {report.seconds:.1f} s -> {out_dir}{sheet}",
        err=True,
    )
