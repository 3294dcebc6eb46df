"""The README documents every command and every option, and its set-up commands match CI."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from batchuq.cli import LazyGroup, cli

_CTX = click.Context(cli)
COMMANDS = {name: cli.get_command(_CTX, name) for name in cli.list_commands(_CTX)}
README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_documented(name: str) -> None:
    assert f"batchuq {name}" in README


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (name, opt)
        for name, cmd in sorted(COMMANDS.items())
        for p in cmd.params
        for opt in p.opts
        if opt.startswith("--")
    ],
)
def test_every_option_is_documented(command: str, option: str) -> None:
    assert option in README, f"{command} {option} is not in the README"


def test_ci_runs_the_readme_test_command() -> None:
    lines = [line for line in CI.strip().splitlines() if not line.startswith("#")]
    (command,) = [line for line in lines if line.startswith("python3 -m venv")]
    assert f"```bash\n{command}\n```" in README
    # ... and after it the numerics-sensitive tests again, limited to AVX2.
    assert lines[-1] == (
        "ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 "
        ".venv/bin/python -m pytest -m numerics"
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_ends_with_an_example(name: str) -> None:
    assert "Example:" in (COMMANDS[name].help or "")
    for param in COMMANDS[name].params:
        if param.param_type_name == "option" and "--help" not in param.opts:
            assert param.help, f"{name} {param.opts} has no help"


def test_lazy_commands_list_their_own_first_help_line() -> None:
    for name, (_, short_help) in LazyGroup.lazy_commands.items():
        assert COMMANDS[name].help.strip().splitlines()[0] == short_help
