"""Every usage error of docs/exit-codes.md is answered before TensorFlow is imported.

Each case (``usage_error_cases.make_cases``) runs the CLI in a fresh interpreter and must exit
with its code and message without importing TensorFlow or Keras: the checks that need the model
read its file's description (``batchuq.model_facts``), not the loaded model. Their times are
measured by ``benchmarks/usage_errors.py``, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from usage_error_cases import BUNDLED, DIGITS, Case, make_cases, run_case

from batchuq.jobs.precheck import RunRequest, check_before_loading, run_predictor
from batchuq.model_facts import read_model_facts
from batchuq.postprocess.calibration_file import predictor_from_metadata


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict[str, Case]]:
    work = tmp_path_factory.mktemp("usage")
    return work, make_cases(work)


NAMES = [
    "bad option value",
    "bad config file",
    "missing images folder",
    "folder of dataset splits",
    "OUTPUT not .parquet",
    "output folder missing",
    "OUTPUT given as a URL",
    "existing OUTPUT with --no-clobber",
    "model file missing",
    "model not a Keras file",
    "model with a Lambda layer",
    "model with two outputs",
    "model input not an image",
    "model without dropout, --passes 100",
    "--passes auto with an SNGP model",
    "--class-names count != outputs",
    "5 outputs, 10 class folders",
    "labels file naming no folder",
    "--rule threshold without --calibration",
    "--temperature without --calibration",
    "--rule risk without --calibration",
    "--rule risk, calibration without --target-risk",
    "--rule risk with --temperature",
    "unreadable calibration file",
    "calibration for another model",
    "calibration of another predictor",
    "--passes auto, calibration for fixed passes",
    "--passes auto, calibration of another stopping rule",
    "--rule threshold --temperature, no tempered thresholds",
    "empty images folder",
    "missing folder with --missing-ok",
    "calibrate: --class-names count",
    "calibrate: 5 outputs, 10 folders",
    "--partition not KEY=VALUE",
    "--partition key is an output column",
    "--partition value not a folder name",
    "--partition folder holding other files",
    "--partition with OUTPUT a .parquet",
    "--partition with --engine ray",
    "calibrate: --score-passes auto with an SNGP model",
    "calibrate: --score-passes auto, --score-rule threshold",
    "monitor: missing TONIGHT",
    "monitor: missing reference",
    "monitor: reference from another model",
    "monitor: history with no night before tonight",
    "monitor: TONIGHT not a score output",
    "monitor: --last without a history folder",
    "monitor: --last 0",
    "monitor: empty night",
    "monitor: missing TONIGHT with --missing-ok",
    "queue: output folder missing",
    "queue: -o not .json",
    "queue: --night not KEY=VALUE",
    "queue: TONIGHT not a score output",
    "queue: empty night",
]


def test_every_case_is_listed(cases) -> None:
    _, made = cases
    assert set(NAMES) <= set(made) and set(made) - set(NAMES) <= {"--engine ray without Ray"}


@pytest.mark.parametrize("name", NAMES)
def test_usage_error_before_tensorflow(cases, name: str) -> None:
    work, made = cases
    case = made[name]
    result, stderr = run_case(case, work)
    assert result["code"] == case.code, stderr
    assert case.message in stderr, stderr
    assert not result["tensorflow"] and not result["keras"], stderr
    assert not (work / "out.parquet").exists() and not (work / "c.json").exists()


def test_five_outputs_on_ten_folders_names_both_counts_and_the_ways_out(cases) -> None:
    work, made = cases
    result, stderr = run_case(made["5 outputs, 10 class folders"], work)
    assert result["code"] == 2 and not result["tensorflow"]
    for part in ("5 outputs", "10 class folders", "--class-names", "--allow-class-mismatch"):
        assert part in stderr


@pytest.mark.parametrize(
    "model", [BUNDLED, BUNDLED.with_name("digits_sngp.keras"), BUNDLED.parent / "digits_ensemble"]
)
def test_predictor_read_from_files_is_the_loaded_runs(model: Path) -> None:
    """The settings the pre-check compares are those the run records once the model is loaded,
    so a calibration that fits the run is never refused early."""
    from batchuq.jobs.score.plan import ScoreOptions, prepare_run
    from batchuq.model_files import model_paths

    request = RunRequest(models=[model], passes=100, tta=1)
    check_before_loading(DIGITS, request)  # the classes, the model: nothing to refuse
    paths = model_paths([model])
    early = run_predictor([read_model_facts(p) for p in paths], request)
    plan = prepare_run(DIGITS, ScoreOptions(model=model, passes=100))
    loaded = predictor_from_metadata(plan.metadata)
    assert predictor_from_metadata(early) == {k: loaded[k] for k in predictor_from_metadata(early)}
    assert {"method", "passes", "rescale", "logits"} <= set(early)


@pytest.mark.parametrize("rule", ["median", "confidence", "risk"])
def test_adaptive_predictor_read_from_files_is_the_loaded_runs(rule: str) -> None:
    """With --passes auto the early check compares the adaptive settings and the stopping
    (``adaptive``) as the loaded run records them, so an adaptive calibration that fits the run
    is never refused early. A risk run stops as a ``none`` run does (once pred is settled)."""
    from batchuq.jobs.score.plan import ScoreOptions, prepare_run
    from batchuq.postprocess.rules import DecisionRule

    request = RunRequest(models=[BUNDLED], passes="auto", min_passes=5, max_passes=40, rule=rule)
    early = predictor_from_metadata(run_predictor([read_model_facts(BUNDLED)], request))
    options = ScoreOptions(
        model=BUNDLED,
        passes="auto",
        min_passes=5,
        max_passes=40,
        rule=DecisionRule("none" if rule == "risk" else rule),
    )
    loaded = predictor_from_metadata(prepare_run(DIGITS, options).metadata)
    assert early["adaptive"] == loaded["adaptive"]
    assert early["adaptive"]["max_passes"] == 40 and early["passes"] == loaded["passes"] == "auto"
