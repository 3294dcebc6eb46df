"""Settings from batchuq.toml: precedence, checks that name the key, and provenance in metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO

from batchuq.cli import cli
from batchuq.cli.runtime import EXIT_OK, EXIT_USAGE
from batchuq.output.schema import read_metadata

BUNDLED = REPO / "batchuq" / "data" / "digits_cnn.keras"


def _copy_model(folder: Path, name: str) -> Path:
    """A copy of the bundled model (with its class-name sidecar) under another name."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLED, folder / f"{name}.keras")
    shutil.copy(BUNDLED.with_name("digits_cnn.classes.json"), folder / f"{name}.classes.json")
    return folder / f"{name}.keras"


def _score(args: list[str], env: dict[str, str] | None = None) -> object:
    env = {"BATCHUQ_MODEL": None, "BATCHUQ_CONFIG": None, **(env or {})}
    return CliRunner().invoke(cli, ["score", *args, "--no-progress"], env=env)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_subset: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_config_in_working_directory_sets_defaults_and_metadata_names_sources(
    workdir: Path, digits_subset: Path
) -> None:
    config_model = _copy_model(workdir / "models", "from_config")
    env_model = _copy_model(workdir / "elsewhere", "from_env")
    (workdir / "batchuq.toml").write_text(
        '[score]\nmodel = "models/from_config.keras"\npasses = 3\nseed = 5\n'
        "max-error-rate = 0.5\n\n[calibrate]\ntta = 4\n"
    )
    result = _score([str(digits_subset), "a.parquet"])
    assert result.exit_code == EXIT_OK, result.output
    meta = read_metadata(workdir / "a.parquet")
    assert Path(meta["model_path"]) == config_model.resolve() and meta["demo_model"] is False
    assert meta["passes"] == 3 and meta["seed"] == 5
    settings = meta["settings"]
    assert settings["config"] == {"value": "batchuq.toml", "source": "working directory"}
    assert settings["passes"] == {"value": 3, "source": "config file (batchuq.toml)"}
    assert settings["max_error_rate"]["source"] == "config file (batchuq.toml)"
    assert settings["batch_size"] == {"value": 32, "source": "default"}
    assert "(bundled demo model)" not in result.output

    # Command line beats environment beats config file.
    result = _score(
        [str(digits_subset), "b.parquet", "--seed", "7"], env={"BATCHUQ_MODEL": str(env_model)}
    )
    assert result.exit_code == EXIT_OK, result.output
    meta = read_metadata(workdir / "b.parquet")
    assert Path(meta["model_path"]) == env_model and meta["seed"] == 7 and meta["passes"] == 3
    assert meta["settings"]["model"]["source"] == "environment (BATCHUQ_MODEL)"
    assert meta["settings"]["seed"] == {"value": 7, "source": "command line"}


def test_config_option_and_env_find_a_file_elsewhere_with_paths_relative_to_it(
    workdir: Path, digits_subset: Path
) -> None:
    model = _copy_model(workdir / "prod", "prod")
    config = workdir / "prod" / "settings.toml"
    config.write_text('[score]\nmodel = "prod.keras"\npasses = 2\n')
    (workdir / "batchuq.toml").write_text("[score]\npasses = 9\n")  # loses to both below
    for args, env in (
        (["--config", str(config)], None),
        ([], {"BATCHUQ_CONFIG": str(config)}),
    ):
        result = _score([str(digits_subset), "c.parquet", *args], env=env)
        assert result.exit_code == EXIT_OK, result.output
        meta = read_metadata(workdir / "c.parquet")
        assert Path(meta["model_path"]) == model.resolve() and meta["passes"] == 2
        expected = "command line" if args else "environment (BATCHUQ_CONFIG)"
        assert meta["settings"]["config"] == {"value": str(config), "source": expected}


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[score]\npases = 3\n", "'pases' is not an option of 'batchuq score'"),
        ('[score]\npasses = "many"\n', "passes = 'many': expected a whole number"),
        ("[score]\npasses = 2.5\n", "passes = 2.5: wrong type for --passes"),
        ("[score]\ntta-flip = 1\n", "tta-flip = 1: wrong type for --tta-flip"),
        ('[score]\nrule = "mode"\n', "rule = 'mode'"),
        ("[score]\npasses = 0\n", "passes = 0"),
        ("[scroe]\npasses = 3\n", "[scroe] is not a batchuq command"),
        ("[score\n", "Could not read the config file"),
        ('[calibrate]\npercentile = "ten"\n', "percentile = 'ten'"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_key(
    workdir: Path, digits_subset: Path, toml: str, named: str
) -> None:
    (workdir / "batchuq.toml").write_text(toml)
    command = "calibrate" if "calibrate" in toml else "score"
    args = [str(digits_subset), "-o", "cal.json"] if command == "calibrate" else ["x.parquet"]
    if command == "score":
        args.insert(0, str(digits_subset))
    result = CliRunner().invoke(cli, [command, *args], env={"BATCHUQ_CONFIG": None})
    assert result.exit_code == EXIT_USAGE, result.output
    assert named in result.output and "batchuq.toml" in result.output
    assert not (workdir / "x.parquet").exists() and not (workdir / "cal.json").exists()


def test_demo_model_is_never_silent(workdir: Path, digits_subset: Path) -> None:
    result = _score([str(digits_subset), "d.parquet", "--passes", "2", "--log-format", "json"])
    assert result.exit_code == EXIT_OK, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["demo_model"] is True and summary["message"].endswith("(bundled demo model)")
    meta = json.loads(pq.read_schema(workdir / "d.parquet").metadata[b"batchuq"])
    assert meta["demo_model"] is True
    assert meta["settings"]["model"] == {"value": None, "source": "default"}
