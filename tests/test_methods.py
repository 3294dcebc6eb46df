"""The method seam: a second uncertainty method runs through the score job unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import ROUNDING, assert_frames_equal_to_rounding

from batchuq import score_directory
from batchuq.decode import load_image
from batchuq.errors import UsageError
from batchuq.jobs.score.batches import iter_sampled_batches
from batchuq.jobs.score.plan import ScoreOptions, prepare_run
from batchuq.methods import UncertaintyMethod
from batchuq.methods.mc_dropout import MCDropout
from batchuq.models import BUNDLED_MODEL, LoadedModel, load_model
from batchuq.output.schema import read_metadata
from batchuq.postprocess.rules import UNCLASSIFIED, median_rule


class OnePassSoftmax(UncertaintyMethod):
    """The tiny deterministic method: the softmax output of one pass, dropout off."""

    samples_per_row = 1

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.rows_seen = 0

    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        self.rows_seen += int(rows.shape[0])
        probs = self.model(rows, training=False)  # (rows, classes)
        return np.asarray(probs, dtype=np.float32)[:, None, :]  # (rows, 1, classes)

    def metadata(self) -> dict[str, Any]:
        return {"method": "one_pass_softmax", "passes": 1}


def _reference_probs(folder: Path, loaded: LoadedModel) -> pd.DataFrame:
    """The model's softmax for every image, decoded and scaled independently of the job."""
    rows = {}
    spec = loaded.image_spec
    for path in sorted(folder.rglob("*.png")):
        pixels = load_image(str(path), spec).astype(np.float32) * loaded.sidecar["rescale"]
        if not spec.channel_axis:
            pixels = pixels[..., 0]
        rows[f"{path.parent.name}/{path.name}"] = np.asarray(
            loaded.model(pixels[None], training=False)
        )[0]
    return pd.DataFrame.from_dict(rows, orient="index")


def test_a_second_method_runs_through_score_directory(digits_subset: Path, tmp_path: Path) -> None:
    loaded = load_model(BUNDLED_MODEL)
    built: list[OnePassSoftmax] = []

    def factory(model: LoadedModel) -> OnePassSoftmax:
        built.append(OnePassSoftmax(model))
        return built[-1]

    out = tmp_path / "one_pass.parquet"
    report = score_directory(
        digits_subset, out, ScoreOptions(model=loaded, method=factory, batch_size=7)
    )
    assert report.images == 30 and report.errors == 0
    assert built[0].rows_seen == 30  # one row per image: TTA K = 1, S = 1

    frame = pd.read_parquet(out).set_index("path")
    names = [f"n{i}" for i in range(10)]
    mean = frame[[f"mean_{n}" for n in names]].to_numpy()
    median = frame[[f"median_{n}" for n in names]].to_numpy()
    std = frame[[f"std_{n}" for n in names]].to_numpy()
    assert (std == 0).all()  # one sample per image: no spread
    np.testing.assert_array_equal(mean, median)
    reference = _reference_probs(digits_subset, loaded).loc[frame.index].to_numpy()
    np.testing.assert_allclose(mean, reference, **ROUNDING)
    decisions = median_rule(reference, 0.5)
    expected = ["unclassified" if d == UNCLASSIFIED else names[d] for d in decisions]
    assert frame["decision"].tolist() == expected

    metadata = read_metadata(out)
    assert metadata["method"] == "one_pass_softmax"
    assert metadata["samples_per_image"] == 1


def test_one_pass_of_mc_dropout_equals_the_one_pass_method(
    digits_subset: Path, tmp_path: Path
) -> None:
    """passes=1 of the default method is the deterministic softmax too: same rows."""
    loaded = load_model(BUNDLED_MODEL)
    a, b = tmp_path / "mc.parquet", tmp_path / "one.parquet"
    score_directory(
        digits_subset, a, ScoreOptions(model=loaded, passes=1, tta=2, save_samples=True, seed=3)
    )
    score_directory(
        digits_subset,
        b,
        ScoreOptions(model=loaded, method=OnePassSoftmax, tta=2, save_samples=True, seed=3),
    )
    frame_a, frame_b = pd.read_parquet(a), pd.read_parquet(b)
    samples_a = np.stack([np.stack(s) for s in frame_a.pop("samples")])
    samples_b = np.stack([np.stack(s) for s in frame_b.pop("samples")])
    assert samples_a.shape == samples_b.shape == (30, 2, 10)  # K x S = 2 x 1, copy-major
    np.testing.assert_allclose(samples_a, samples_b, **ROUNDING)
    # A method with no extras writes no OOD columns; MC dropout writes the logits' two.
    assert set(frame_a.columns) - set(frame_b.columns) == {"max_logit", "energy"}
    assert_frames_equal_to_rounding(frame_a.drop(columns=["max_logit", "energy"]), frame_b)
    # TTA stayed the job's business: the two copies of an image differ.
    assert np.abs(samples_a[:, 0] - samples_a[:, 1]).max() > 1e-3


def test_mc_dropout_method_returns_rows_by_passes_by_classes() -> None:
    loaded = load_model(BUNDLED_MODEL)
    method = MCDropout(loaded.model, passes=5)
    spec = loaded.image_spec
    shape = (3, spec.height, spec.width) + ((spec.channels,) if spec.channel_axis else ())
    rows = tf.random.stateless_uniform(shape, seed=(1, 2))
    samples = method.sample(rows, tf.constant([1, 2, 3], tf.uint32))
    assert samples.shape == (3, 5, 10)
    assert samples.std(axis=1).max() > 0  # dropout sampled: passes differ
    assert method.metadata()["passes"] == 5
    assert method.metadata()["sampled_layers"]


def test_a_bfloat16_fallback_is_noticed_once_however_many_predictors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """calibrate builds two predictors, an ensemble one per member: one notice, not one each.
    Where bf16 runs here (a native CPU without a cap), there is nothing to notice."""
    import logging

    import batchuq.methods.mc_dropout as mc_dropout

    monkeypatch.setattr(mc_dropout, "_NOTICES_GIVEN", set())  # as in a fresh process
    # A handler of the test's own on the batchuq logger: caplog's depends on whether an earlier
    # CLI test made the logger stop propagating (pytest then attaches it there as well).
    records: list[logging.LogRecord] = []
    collect = logging.Handler(logging.WARNING)
    collect.emit = records.append  # type: ignore[method-assign]
    batchuq_logger = logging.getLogger("batchuq")
    monkeypatch.setattr(batchuq_logger, "level", logging.WARNING)
    batchuq_logger.addHandler(collect)
    try:
        loaded = load_model(BUNDLED_MODEL)
        methods = [MCDropout(loaded.model, passes=2, precision="bfloat16") for _ in range(3)]
    finally:
        batchuq_logger.removeHandler(collect)
    fell_back = methods[0].metadata()["precision"] == "float32"
    assert {m.metadata()["precision"] for m in methods} == {methods[0].metadata()["precision"]}
    assert all(m.metadata()["precision_requested"] == "bfloat16" for m in methods)
    notices = [r.getMessage() for r in records if "--precision bfloat16" in r.getMessage()]
    assert len(notices) == (1 if fell_back else 0), notices


def test_prepare_run_reads_the_sidecar_once_and_iter_sampled_batches_covers_every_image(
    digits_subset: Path,
) -> None:
    loaded = load_model(BUNDLED_MODEL)
    assert loaded.sidecar["class_names"] == [f"n{i}" for i in range(10)]
    plan = prepare_run(digits_subset, ScoreOptions(model=loaded, passes=4, tta=3, batch_size=8))
    assert plan.rescale == pytest.approx(1 / 255)
    assert plan.metadata["rescale_source"] == "sidecar"
    assert plan.samples_per_image == 12
    positions = []
    for batch in iter_sampled_batches(plan):
        assert batch.samples.shape == (len(batch.positions), 12, 10)
        assert batch.ok.all()
        positions.extend(batch.positions)
    assert positions == list(range(30))  # every image once, in discovery order


# --- a method from outside the package, chosen by the registry ------------------------------------

# Two samples per row, known exactly: sample 0 gives class 3 a quarter and class 4 a quarter more
# than the other classes; sample 1 gives class 3 three quarters. Their mean favours class 3 (0.5).
_TOY_SAMPLES = np.empty((2, 10), dtype=np.float32)
_TOY_SAMPLES[0] = 0.5 / 9
_TOY_SAMPLES[0, 3], _TOY_SAMPLES[0, 4] = 0.25, 0.25 + 0.5 / 9
_TOY_SAMPLES[1] = 0.25 / 9
_TOY_SAMPLES[1, 3] = 0.75


class FixedProbabilities(UncertaintyMethod):
    """A toy method that ignores the images: every row gets the same two known samples."""

    samples_per_row = 2

    def __init__(self, passes: int) -> None:
        self.passes = passes  # what the run's options asked for, recorded to show it arrived

    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        return np.broadcast_to(_TOY_SAMPLES, (int(rows.shape[0]), 2, 10)).copy()

    def metadata(self) -> dict[str, Any]:
        return {"method": "fixed_probabilities", "passes": 2, "asked_passes": self.passes}


@pytest.fixture
def toy_method() -> Any:
    """``fixed_probabilities`` in the registry, claiming model files named ``toy*.keras``."""
    from batchuq.methods import register_method, registered_methods, unregister_method

    def build(models: Any, settings: Any) -> FixedProbabilities:
        return FixedProbabilities(settings.passes)

    register_method(
        "fixed_probabilities", build, detect=lambda models: models[0].path.name.startswith("toy")
    )
    assert "fixed_probabilities" in registered_methods()
    yield
    unregister_method("fixed_probabilities")


def _assert_toy_rows(out: Path) -> None:
    frame = pd.read_parquet(out)
    names = [f"n{i}" for i in range(10)]
    mean = frame[[f"mean_{n}" for n in names]].to_numpy()
    expected = _TOY_SAMPLES.astype(np.float64).mean(axis=0).astype(np.float32)
    np.testing.assert_array_equal(mean, np.broadcast_to(expected, mean.shape))
    assert (frame["std_n3"] > 0).all()  # the two samples really were both summarised
    assert (frame["pred"] == "n3").all()


def test_a_registered_method_is_detected_from_the_model_and_scores_through_the_job(
    toy_method: None, digits_subset: Path, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "toy_digits.keras"  # the toy method's detector claims this file
    shutil.copy(BUNDLED_MODEL, model)
    out = tmp_path / "toy.parquet"
    report = score_directory(digits_subset, out, ScoreOptions(model=model, passes=7, seed=1))
    assert report.images == 30 and report.errors == 0
    _assert_toy_rows(out)
    metadata = read_metadata(out)
    assert metadata["method"] == "fixed_probabilities"
    assert metadata["asked_passes"] == 7 and metadata["samples_per_image"] == 2


def test_a_registered_method_is_chosen_by_name(
    toy_method: None, digits_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "toy.parquet"
    score_directory(digits_subset, out, ScoreOptions(method="fixed_probabilities", passes=3))
    _assert_toy_rows(out)
    assert read_metadata(out)["method"] == "fixed_probabilities"
    # Without the name, the bundled model is MC dropout's, as before.
    score_directory(digits_subset, out, ScoreOptions(passes=3))
    assert read_metadata(out)["method"] == "mc_dropout"


def test_an_unregistered_method_name_is_a_usage_error() -> None:
    with pytest.raises(
        UsageError, match=r"registered: deep_ensemble, mc_dropout, sngp .*Received: method='nope'"
    ):
        ScoreOptions(method="nope")
