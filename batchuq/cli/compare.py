"""``batchuq compare``: the command over ``batchuq.jobs.compare`` and ``batchuq.report.compare``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from batchuq.cli.config import config_option
from batchuq.cli.runtime import exit_on_error, setup_logging

_PARQUET = click.Path(exists=True, dir_okay=False, path_type=Path)


def _split_names(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    """``--names a,b,c`` as a list (checked against the files by the library)."""
    return None if value is None else [name.strip() for name in value.split(",")]


@click.command("compare")
@click.argument("files", metavar="A.parquet B.parquet ...", nargs=-1, required=True, type=_PARQUET)
@click.option(
    "--names",
    default=None,
    show_default=True,
    callback=_split_names,
    help="Comma-separated name of each file, in order. Default: the file name without "
    ".parquet; with --series, the method and its T and K from the metadata. With --series, "
    "give the files of one method the same name.",
)
@click.option(
    "--ood",
    type=_PARQUET,
    multiple=True,
    show_default=True,
    help="Parquet file from `batchuq score` on out-of-distribution images with the same model "
    "and settings, one per file in the same order (repeat the option); adds the OOD AUROC.",
)
@click.option(
    "--intersect",
    is_flag=True,
    default=False,
    show_default=True,
    help="Keep only the images every file holds (a warning says how many rows each file lost) "
    "instead of refusing files whose `path` sets differ.",
)
@click.option(
    "--series",
    is_flag=True,
    default=False,
    show_default=True,
    help="The files are a shift series: each file's corruption and severity are read from the "
    "end of its scored folder, <corruption>/<severity> as `batchuq shift` writes it (any other "
    "folder is clean, severity 0). Adds the mean over corruptions per severity and method.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Also write index.html with overlaid reliability diagrams and risk-coverage curves, "
    "cost against quality and, with --series, accuracy and ECE against severity.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print the rows, the settings and the series as JSON instead of tables.",
)
@config_option
def compare_command(
    files: tuple[Path, ...],
    names: list[str] | None,
    ood: tuple[Path, ...],
    intersect: bool,
    series: bool,
    report_dir: Path | None,
    as_json: bool,
) -> None:
    """Compare files scored by `batchuq score` on the same folder, one row per file.

    Each file is one method or setting run over the same images (refused if their paths
    differ, unless --intersect). For each: N, accuracy, coverage and selective accuracy under
    its own decision rule, NLL, Brier, ECE, AURC, the AUROC of entropy for wrong vs right (and
    with --ood for OOD vs in-distribution), the mean set size of a pred_set column, and the
    images/s score recorded. The metrics are those of `batchuq evaluate`.

    With --series the files are scored on a folder and the copies `batchuq shift` wrote of it
    (OUT_DIR/<corruption>/<severity>); the tables add, per method, the mean over corruptions
    at each severity (0 = clean).

    Example:

        batchuq compare det.parquet mc.parquet --names det,mc --report compare/

        batchuq compare mc.parquet shift_mc/*.parquet --series --report series/
    """
    # The job and the report are imported here, not at the top, so that `batchuq compare --help`
    # loads neither pandas nor matplotlib.
    from batchuq.jobs.compare import compare_files, format_comparison

    setup_logging()
    with exit_on_error():
        comparison = compare_files(
            files, names=names, ood=ood or None, intersect=intersect, series=series
        )
        output = comparison.as_json()
        if report_dir is not None:
            from batchuq.report.compare import write_comparison_report

            output["report"] = str(write_comparison_report(comparison, report_dir))
    if as_json:
        click.echo(json.dumps(output, indent=2, allow_nan=False))
    else:
        click.echo(format_comparison(comparison))
        if report_dir is not None:
            click.echo(f"\nreport: {output['report']}", err=True)
