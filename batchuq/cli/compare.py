"""``batchuq compare``: the command over ``batchuq.jobs.compare`` and ``batchuq.report.compare``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from batchuq.cli.config import config_option
from batchuq.cli.runtime import exit_on_error, setup_logging
from batchuq.defaults import DEFAULT_SEED
from batchuq.metrics import DEFAULT_RESAMPLES

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
    "and settings, one per file in the same order (repeat the option); adds the OOD AUROC of "
    "entropy, and a table of every score's OOD AUROC and FPR@95 (with max_logit, energy, "
    "knn_distance, gp_variance when the files hold them).",
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
    "--bootstrap",
    type=click.IntRange(min=0),
    default=DEFAULT_RESAMPLES,
    show_default=True,
    help="Resamples B of the paired bootstrap over images that gives every metric, and every "
    "difference to --baseline, a percentile 95% interval: the images (matched by `path`) are "
    "drawn with replacement B times, the same draws for every file; OOD images are drawn "
    "independently, within themselves. 0: no intervals.",
)
@click.option(
    "--seed",
    type=int,
    default=DEFAULT_SEED,
    show_default=True,
    help="Seed of the bootstrap's resamples; the same seed gives the same intervals.",
)
@click.option(
    "--baseline",
    default=None,
    show_default=True,
    metavar="NAME_OR_PATH",
    help="One of the files, by its name (--names) or its path: adds each other file's "
    "difference to it per metric, with its 95% interval and a verdict: better or worse "
    "(each metric's own direction: lower NLL, Brier, ECE and AURC is better) only where the "
    "interval excludes 0, tie where it holds 0; higher or lower for coverage.",
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
    bootstrap: int,
    seed: int,
    baseline: str | None,
    report_dir: Path | None,
    as_json: bool,
) -> None:
    """Compare files scored by `batchuq score` on the same folder, one row per file.

    Each file is one method or setting run over the same images (refused if their paths
    differ, unless --intersect). For each: N, accuracy, coverage and selective accuracy under
    its own decision rule, NLL, Brier, ECE, AURC, the AUROC of entropy for wrong vs right (and
    with --ood for OOD vs in-distribution), the mean set size of a pred_set column, and the
    images/s score recorded. The metrics are those of `batchuq evaluate`.

    Each metric gets a paired bootstrap 95% interval over the images (--bootstrap, --seed);
    with --baseline, each file's difference to it, with its interval and a verdict: a file is
    better or worse than the baseline only where the interval excludes 0, a tie otherwise.

    With --series the files are scored on a folder and the copies `batchuq shift` wrote of it
    (OUT_DIR/<corruption>/<severity>); the tables add, per method, the mean over corruptions
    at each severity (0 = clean).

    Example:

        batchuq compare det.parquet mc.parquet --names det,mc --report compare/

        batchuq compare det.parquet mc.parquet --names det,mc --baseline det --json

        batchuq compare mc.parquet shift_mc/*.parquet --series --report series/
    """
    # The job and the report are imported here, not at the top, so that `batchuq compare --help`
    # loads neither pandas nor matplotlib.
    from batchuq.jobs.compare import compare_files, format_comparison

    setup_logging()
    with exit_on_error():
        comparison = compare_files(
            files,
            names=names,
            ood=ood or None,
            intersect=intersect,
            series=series,
            bootstrap=bootstrap,
            seed=seed,
            baseline=baseline,
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
