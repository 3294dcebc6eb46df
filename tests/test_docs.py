"""The documentation builds with ``mkdocs build --strict``, and its command-line reference,
generated from the Click commands, lists every option of every command."""

from __future__ import annotations

import re

import click
import pytest
from site_build import REPO, built_site, page_text

from batchuq.cli import cli


def commands() -> dict[str, click.Command]:
    """Every command under ``batchuq``, by its full name (``batchuq score``), groups included."""
    found: dict[str, click.Command] = {}

    def walk(command: click.Command, name: str, parent: click.Context | None) -> None:
        found[name] = command
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=name.split()[-1], parent=parent)
            for sub in command.list_commands(ctx):
                walk(command.get_command(ctx, sub), f"{name} {sub}", ctx)

    walk(cli, "batchuq", None)
    return found


def long_flags(command: click.Command) -> list[str]:
    """Every long flag of ``command``'s options, ``--no-…`` halves of boolean flags included."""
    return [
        flag
        for param in command.params
        if isinstance(param, click.Option)
        for flag in (*param.opts, *param.secondary_opts)
        if flag.startswith("--")
    ]


def missing_flags(text: str, flags: list[str]) -> list[str]:
    """The flags that are not in ``text`` as a whole word (``--tta`` is not in ``--tta-zoom``)."""
    return [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]


def test_the_site_builds_strictly() -> None:
    site = built_site()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert (site / page.stem / "index.html").exists() or page.stem == "index", page.name


@pytest.mark.parametrize("name", sorted(commands()))
def test_the_cli_reference_lists_every_option(name: str) -> None:
    command = commands()[name]
    text = page_text("cli")
    assert name in text, f"{name} has no section in docs/cli.md"
    assert not missing_flags(text, long_flags(command)), f"{name}: options missing from the page"


def test_every_command_is_found() -> None:
    names = set(commands())
    assert {"batchuq score", "batchuq calibrate", "batchuq evaluate", "batchuq train"} <= names
    assert sum(len(long_flags(c)) for c in commands().values()) > 80


def test_the_check_is_whole_word() -> None:
    text = "score --tta-zoom 0.1 and --no-tta-flip, --passes"
    assert missing_flags(text, ["--tta", "--tta-flip", "--passes", "--pass"]) == [
        "--tta",
        "--tta-flip",
        "--pass",
    ]
    assert missing_flags(text, ["--tta-zoom", "--no-tta-flip"]) == []


def test_the_check_catches_an_option_left_out_of_the_page() -> None:
    text = page_text("cli")
    flags = long_flags(commands()["batchuq score"])
    assert "--tta" in flags and not missing_flags(text, flags)
    without = re.sub(r"(?<![\w-])--tta(?![\w-])", "", text)
    assert missing_flags(without, flags) == ["--tta"]
