"""``batchuq monitor``: the command over ``batchuq.jobs.monitor`` and ``batchuq.report.monitor``.

It reads Parquet only: neither TensorFlow nor Keras is imported. Exit 0 when quiet, 5
(``EXIT_DRIFT``) when a test alerts, 4 for an empty night, 2 for a usage error (a reference from
another model or with other settings included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from batchuq.cli.config import config_option
from batchuq.cli.runtime import EXIT_DRIFT, exit_on_error, setup_logging
from batchuq.defaults import (
    DEFAULT_MIN_PSI,
    DEFAULT_MONITOR_ALPHA,
    DEFAULT_MONITOR_LAST,
    DEFAULT_PSI_BINS,
)

_RUN = click.Path(exists=False, path_type=Path)


@click.command("monitor")
@click.argument("tonight", metavar="TONIGHT", type=_RUN)
@click.option(
    "--reference",
    "-r",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    required=True,
    show_default=True,
    help="A run scored by `batchuq score` on images known to be fine (a .parquet file or a "
    "folder of parts), or a history folder of date=YYYY-MM-DD nights (its --last latest "
    "before tonight's). Repeat for several; their rows are pooled.",
)
@click.option(
    "--last",
    type=click.IntRange(min=1),
    default=DEFAULT_MONITOR_LAST,
    show_default=True,
    help="Nights taken from a history folder given as --reference: the latest before "
    "tonight's date (the date=... part of TONIGHT's path).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=DEFAULT_MONITOR_ALPHA,
    show_default=True,
    help="Family-wise level: the chance of any false alarm on a night like the reference, "
    "Holm-corrected over all of the night's tests.",
)
@click.option(
    "--min-psi",
    type=click.FloatRange(min=0),
    default=DEFAULT_MIN_PSI,
    show_default=True,
    help="PSI a test also needs to alert (0: the p-value alone decides). On nights of many "
    "thousand images, 0.1 keeps trivial but significant shifts quiet.",
)
@click.option(
    "--bins",
    type=click.IntRange(min=2),
    default=DEFAULT_PSI_BINS,
    show_default=True,
    help="PSI bins of a continuous column: the reference's quantiles (10: deciles).",
)
@click.option(
    "--missing-ok",
    is_flag=True,
    default=False,
    show_default=True,
    help="A TONIGHT that does not exist is an empty night (exit 4) rather than a usage error, "
    "as after `batchuq score --missing-ok` on a night without images.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=True,
    help="Also write index.html with tonight's distributions against the reference and, "
    "with a history folder, the last nights as time series.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print the report as JSON (keys in docs/monitoring.md) instead of a table.",
)
@config_option
def monitor_command(
    tonight: Path,
    reference: tuple[Path, ...],
    last: int,
    alpha: float,
    min_psi: float,
    bins: int,
    missing_ok: bool,
    report_dir: Path | None,
    as_json: bool,
) -> None:
    """Test TONIGHT's scored run against a reference: did tonight's images look like those?

    Two-sample tests of tonight's rows against the pooled reference rows: Kolmogorov-Smirnov
    on confidence, entropy, mutual information, the predicted class's std and (with
    conformal sets) the set size; chi-square on the predicted-class mix; Fisher's exact test
    on the unclassified and error rates. The p-values are Holm-corrected together; PSI and
    the Wasserstein distance stand beside them. A test alerts when its corrected p-value is
    below --alpha and its PSI at least --min-psi. The reference must come from the same
    model and settings (passes, TTA, method, rule, calibration, ...).

    Exit codes: 0 quiet, 5 alert, 4 empty night, 2 usage error. Thresholds can live in
    batchuq.toml under [monitor].

    Example:

        batchuq monitor history/date=2026-12-02 --reference history/ --last 7 --report monitor/

        batchuq monitor tonight.parquet -r week1.parquet -r week2.parquet --json
    """
    # The job and the report are imported here, so that `--help` loads neither.
    from batchuq.jobs.monitor import MonitorSettings, format_monitor, monitor_runs

    setup_logging()
    with exit_on_error():
        if click.get_current_context().get_parameter_source("last") is ParameterSource.COMMANDLINE:
            _check_last_has_a_history(tonight, reference, last)
        settings = MonitorSettings(alpha=alpha, min_psi=min_psi, bins=bins, last=last)
        report = monitor_runs(tonight, list(reference), settings, missing_ok=missing_ok)
        output = report.as_json()
        if report_dir is not None:
            from batchuq.report.monitor import write_monitor_report

            output["report"] = str(write_monitor_report(report, report_dir))
    if as_json:
        click.echo(json.dumps(output, indent=2, allow_nan=False))
    else:
        click.echo(format_monitor(report))
        if report_dir is not None:
            click.echo(f"report: {output['report']}", err=True)
    if report.alert:
        sys.exit(EXIT_DRIFT)


def _check_last_has_a_history(tonight: Path, reference: tuple[Path, ...], last: int) -> None:
    """``--last`` given on the command line counts nights of a history folder: refuse it when no
    reference is one, rather than ignore it (a value from batchuq.toml is not checked)."""
    from batchuq.errors import UsageError
    from batchuq.jobs.monitor import reference_nights

    if not tonight.exists():
        return  # monitor_runs names the missing TONIGHT (or, with --missing-ok, exits 4)
    _, history = reference_nights(list(reference), tonight, last)
    if not history:
        raise UsageError(
            "--last counts the nights of a history folder (date=YYYY-MM-DD subfolders), but no "
            "--reference is one: drop --last, or give the history folder. "
            f"Received: last={last}, reference={[str(r) for r in reference]!r}"
        )
