"""Settings from a ``batchuq.toml`` file: defaults for every option of every command.

A config file has one table per command, keyed by option name (``-`` or ``_`` both work)::

    [score]
    model = "monkeys.keras"        # relative paths are relative to the config file's folder
    passes = 50
    calibration = "calibration.json"

    [calibrate]
    tta = 100

The file is found in this order: ``--config FILE`` on the command line, ``$BATCHUQ_CONFIG``,
``batchuq.toml`` in the working directory. Its values become Click's ``default_map``, so the
precedence, highest first, is: command line, environment (e.g. ``BATCHUQ_MODEL``), config file,
built-in default. ``settings_provenance`` reports which of these gave each value.

The module imports no TensorFlow: the file is read and checked while the options are parsed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

CONFIG_ENV = "BATCHUQ_CONFIG"
CONFIG_NAME = "batchuq.toml"
_META_KEY = "batchuq.cli.config"  # ctx.meta entry: (path, how it was found)
_NOT_SETTINGS = {"config", "help"}


def _find_config(explicit: str | None, ctx: click.Context) -> tuple[Path, str] | None:
    """The config file to use and how it was found, or None when there is none."""
    if explicit is not None:
        how = "environment (BATCHUQ_CONFIG)"
        if ctx.get_parameter_source("config") == ParameterSource.COMMANDLINE:
            how = "command line"
        return Path(explicit), how
    local = Path(CONFIG_NAME)
    if local.is_file():
        return local, "working directory"
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise click.BadParameter(f"The config file {str(path)!r} does not exist.") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"Could not read the config file {str(path)!r}: {exc}") from None


def _option_params(command: click.Command) -> dict[str, click.Option]:
    return {
        p.name: p
        for p in command.params
        if isinstance(p, click.Option) and p.name and p.name not in _NOT_SETTINGS
    }


def _type_ok(param: click.Option, value: Any) -> bool:
    """Whether a TOML value has the kind of value the option takes (no silent coercion)."""
    kind = param.type
    if param.multiple:  # a TOML array, e.g. import = ["mylayers", "more.py"]
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if param.is_flag or isinstance(kind, click.types.BoolParamType):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if getattr(kind, "toml_types", None):  # e.g. --passes: a number or "auto"
        return isinstance(value, kind.toml_types)
    if isinstance(kind, click.types.IntParamType):
        return isinstance(value, int)
    if isinstance(kind, click.types.FloatParamType):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _from(config: Path, value: str) -> str:
    """A path written in the config file, resolved against the file's folder."""
    return value if Path(value).is_absolute() else str(config.parent.resolve() / value)


def _check_section(ctx: click.Context, section: str, table: Any, path: Path) -> dict[str, Any]:
    """Validate one command's table and return it as a ``default_map`` for that command."""
    where = f"{path}: [{section}]"
    if not isinstance(table, dict):
        raise click.BadParameter(f"{where} must be a table of option = value lines.")
    params = _option_params(ctx.command)
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        param = params.get(name)
        if param is None:
            known = ", ".join(sorted(params))
            raise click.BadParameter(
                f"{where} {key!r} is not an option of 'batchuq {section}'. Known: {known}."
            )
        if param.multiple and isinstance(value, str):
            value = [value]  # model = "digits.keras" for one of a repeatable option
        if not _type_ok(param, value):
            raise click.BadParameter(
                f"{where} {key} = {value!r}: wrong type for {max(param.opts, key=len)} "
                f"({param.type.name} expected)."
            )
        if isinstance(param.type, click.Path):  # relative to the config file, not the cwd
            value = [_from(path, v) for v in value] if param.multiple else _from(path, value)
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise click.BadParameter(f"{where} {key} = {value!r}: {exc.message}") from None
        defaults[name] = value
    return defaults


def load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--config`` callback: read the config file and make its table the command's defaults.

    Eager, so it runs before the other options take their values. Unknown commands, unknown
    keys and values of the wrong type are usage errors (exit 2) that name the key.
    """
    found = _find_config(value, ctx)
    if found is None:
        return None
    path, how = found
    data = _read_toml(path)
    root = ctx.find_root().command
    commands = set(root.list_commands(ctx)) if isinstance(root, click.Group) else set()
    for section in data:
        if section not in commands:
            raise click.BadParameter(
                f"{path}: [{section}] is not a batchuq command. "
                f"Known: {', '.join(sorted(commands))}."
            )
    section = ctx.info_name or ""
    defaults = _check_section(ctx, section, data.get(section, {}), path)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_META_KEY] = (str(path), how)
    return str(path)


config_option = click.option(
    "--config",
    envvar=CONFIG_ENV,
    type=click.Path(dir_okay=False),
    default=None,
    is_eager=True,
    expose_value=False,
    callback=load_config,
    help=f"TOML file of defaults, one [command] table per command (env {CONFIG_ENV}). "
    f"Default: ./{CONFIG_NAME} if present. Command line and environment still win.",
)


def _json_value(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def settings_provenance(ctx: click.Context) -> dict[str, dict[str, Any]]:
    """Every option's value and where it came from, for the run's metadata.

    Returns:
        ``{name: {"value": ..., "source": ...}}`` where source is ``command line``,
        ``environment (VAR)``, ``config file (PATH)`` or ``default``; plus a ``config`` entry
        naming the config file and how it was found (``None`` when there was none).
    """
    path, how = ctx.meta.get(_META_KEY, (None, None))
    sources = {
        ParameterSource.COMMANDLINE: "command line",
        ParameterSource.DEFAULT_MAP: f"config file ({path})",
        ParameterSource.DEFAULT: "default",
    }
    settings: dict[str, dict[str, Any]] = {"config": {"value": path, "source": how}}
    for name, param in _option_params(ctx.command).items():
        source = ctx.get_parameter_source(name)
        if source == ParameterSource.ENVIRONMENT:
            label = f"environment ({param.envvar})"
        else:
            label = sources.get(source, str(source.name).lower() if source else "default")
        value = _json_value(ctx.params.get(name))
        if name == "model" and isinstance(value, list) and len(value) < 2:
            value = value[0] if value else None  # one model is recorded as it always was
        settings[name] = {"value": value, "source": label}
    return settings


def section_defaults(ctx: click.Context, section: str) -> dict[str, Any]:
    """The ``[section]`` table of the config file loaded for this command, checked against
    command ``section``'s options (as when that command loads it), or ``{}`` without one.

    Lets one command take defaults from another's table, e.g. ``calibrate`` from ``[score]``.
    Keys are option names with ``_``; relative paths are resolved against the file's folder.
    """
    path, _ = ctx.meta.get(_META_KEY, (None, None))
    if path is None:
        return {}
    data = _read_toml(Path(path))
    if section not in data:
        return {}
    root = ctx.find_root().command
    command = root.get_command(ctx, section) if isinstance(root, click.Group) else None
    if command is None:  # a command run on its own (tests): look it up in the batchuq group
        from batchuq.cli import cli

        command = cli.get_command(ctx, section)
    if command is None:
        raise click.BadParameter(f"{path}: [{section}] is not a batchuq command.")
    context = click.Context(command, info_name=section)
    return _check_section(context, section, data[section], Path(path))
