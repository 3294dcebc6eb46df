"""The README: short, its set-up commands the ones CI runs, its example output the measured one,
its links into the documentation alive; every command's --help teaches.

Which options exist is the command-line reference's job (generated from the commands, checked by
``tests/test_docs.py``), so the README lists none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from batchuq.cli import LazyGroup, cli

REPO = Path(__file__).resolve().parents[1]
_CTX = click.Context(cli)
COMMANDS = {name: cli.get_command(_CTX, name) for name in cli.list_commands(_CTX)}
README = (REPO / "README.md").read_text(encoding="utf-8")
CI = (REPO / ".ci" / "run").read_text(encoding="utf-8")
DIGITS = json.loads((REPO / "benchmarks" / "results" / "digits.json").read_text(encoding="utf-8"))
TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install ".[test]" && .venv/bin/python -m pytest'
)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL)


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 200


def test_readme_has_the_two_setup_commands_first() -> None:
    install, test = bash_blocks(README)[:2]
    assert install == (
        "python3 -m venv .venv && .venv/bin/pip install . && "
        ".venv/bin/batchuq score sample_data/digits/test out.parquet"
    )
    assert test == TEST_COMMAND


def test_ci_runs_the_readme_test_command() -> None:
    commands = [line for line in CI.splitlines() if line and not line.startswith("#")]
    assert bash_blocks(README)[1] in commands


def test_the_example_output_is_the_measured_one_with_its_cpu_and_date() -> None:
    line = DIGITS["setup"]["summary_line"]
    assert f"```text\n{line}\n```" in README
    cpu = DIGITS["cpu"]
    after = README.split(line, 1)[1][:300]
    assert f"{cpu['usable_cores']}-core {cpu['model_name']}" in after
    assert DIGITS["date"][:10] in after


def test_readme_links_into_the_docs_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert len(local) >= 10
    for link in local:
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}
    linked = {Path(link).name for link in local}
    assert pages <= linked, f"pages the README does not link to: {sorted(pages - linked)}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_ends_with_an_example(name: str) -> None:
    assert "Example:" in (COMMANDS[name].help or "")
    for param in COMMANDS[name].params:
        if param.param_type_name == "option" and "--help" not in param.opts:
            assert param.help, f"{name} {param.opts} has no help"


def test_lazy_commands_list_their_own_first_help_line() -> None:
    for name, (_, short_help) in LazyGroup.lazy_commands.items():
        assert COMMANDS[name].help.strip().splitlines()[0] == short_help
