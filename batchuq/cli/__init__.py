"""The ``batchuq`` command line: the group of commands, each loaded only when it is run.

One module per command (``score``, ``calibrate``, ``evaluate``, ``compare``, ``monitor``,
``shift``, ``train``, ``queue``), each a thin layer
that parses options, calls one library function and turns its report into an exit code;
``runtime`` holds what they share (logging, the quiet TensorFlow import, signals and the one
mapping from exceptions to exit codes, documented there and in docs/exit-codes.md); ``options`` and
``config`` the shared options and the ``batchuq.toml`` defaults.

The group imports no command module until that command is run or asked for its help, so
``batchuq --help`` imports neither TensorFlow, Keras, pandas nor matplotlib. Nothing below the
command layer imports this package.
"""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A group whose commands are imported only when they are run or asked for their help.

    ``batchuq --help`` lists them from ``lazy_commands`` without importing them, and running
    one command does not pay for the imports of the others.
    """

    # name -> (module:attribute, the first line of its docstring for `batchuq --help`)
    lazy_commands = {
        "score": (
            "batchuq.cli.score:score",
            "Score every image in IMAGES and write one Parquet row per image to OUTPUT.",
        ),
        "calibrate": (
            "batchuq.cli.calibrate:calibrate_command",
            "Fit validation thresholds, a temperature and conformal sets on VAL_IMAGES.",
        ),
        "evaluate": (
            "batchuq.cli.evaluate:evaluate_command",
            "Evaluate OUT.parquet, written by `batchuq score` on a labelled folder.",
        ),
        "compare": (
            "batchuq.cli.compare:compare_command",
            "Compare files scored by `batchuq score` on the same folder, one row per file.",
        ),
        "train": (
            "batchuq.cli.train:train",
            "Train the reference CNN on the class folders in IMAGES and save it to MODEL.",
        ),
        "monitor": (
            "batchuq.cli.monitor:monitor_command",
            "Test TONIGHT's scored run against a reference: did tonight's images look like those?",
        ),
        "queue": (
            "batchuq.cli.queue:queue_command",
            "Queue TONIGHT's most informative images for labelling, as Label Studio tasks and CSV.",
        ),
        "shift": (
            "batchuq.cli.shift:shift",
            "Write corrupted copies of IMAGES to OUT_DIR, one folder per corruption and severity.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands' names, sorted, without importing them."""
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, imported from its module the first time it is asked for."""
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            module, attribute = self.lazy_commands[cmd_name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The "Commands" section of ``--help``, from ``lazy_commands`` for unloaded ones."""
        rows = [
            (name, self.commands[name].get_short_help_str(limit=80))
            if name in self.commands
            else (name, self.lazy_commands[name][1])
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(package_name="batchuq")
def cli() -> None:
    """Per-image uncertainty for image classifiers, in batch.

    batchuq runs a Keras classifier over a folder of images with Monte Carlo dropout and
    test-time augmentation, and writes one Parquet row per image with the mean, median and
    std of every class probability, uncertainty scores, a prediction and a decision.

    Example:

        batchuq score sample_data/digits/test out.parquet
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batchuq")
