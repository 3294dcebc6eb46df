"""``batchuq evaluate``: the command over ``batchuq.jobs.evaluate`` and ``batchuq.report``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from batchuq.cli.config import config_option
from batchuq.cli.runtime import exit_on_error, setup_logging


@click.command("evaluate")
@click.argument(
    "out", metavar="OUT.parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--ood",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Parquet file from `batchuq score` on out-of-distribution images, scored by the same "
    "model; adds the AUROC and FPR@95 of each score for telling OOD from in-distribution "
    "images (also of max_logit, energy, knn_distance and gp_variance when both files hold "
    "them).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Also write an HTML report with plots (index.html and PNGs) to this folder.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print the results as JSON instead of a table.",
)
@config_option
def evaluate_command(out: Path, ood: Path | None, report_dir: Path | None, as_json: bool) -> None:
    """Evaluate OUT.parquet, written by `batchuq score` on a labelled folder.

    On the readable, labelled images: accuracy, coverage and selective accuracy of the
    decision rule, NLL, Brier score, ECE (15 bins), AURC, and the AUROC with which each
    uncertainty score (1 - confidence, entropy, mutual information, mean std, variation ratio)
    tells wrong predictions from right ones. With --ood, also how well each score tells the
    out-of-distribution images from the in-distribution ones: AUROC and FPR@95 (the share of
    OOD images kept at the threshold that keeps 95% of the in-distribution ones), for those
    scores and the OOD columns both files hold (-max_logit, energy, knn_distance,
    gp_variance).

    Example:

        batchuq evaluate out.parquet --ood ood.parquet --report report/
    """
    # The jobs are imported here, not at the top, so that `batchuq evaluate --help` loads
    # neither pandas nor (for the report) matplotlib.
    from batchuq.jobs.evaluate import evaluate_file, format_table

    setup_logging()
    with exit_on_error():
        # Each file is read once; the report draws from this same evaluation.
        evaluation = evaluate_file(out, ood, samples=report_dir is not None)
        results = dict(evaluation.results)
        if report_dir is not None:
            from batchuq.report.evaluate import write_evaluation_report

            results["report"] = str(write_evaluation_report(evaluation, report_dir))
    if as_json:
        click.echo(json.dumps(results, indent=2, allow_nan=False))
    else:
        click.echo(format_table(results))
        if report_dir is not None:
            click.echo(f"\nreport: {results['report']}", err=True)
