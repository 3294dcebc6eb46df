"""Deep ensembles behind the method seam: members' own samples, in the documented order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import ROUNDING, assert_parquet_bitwise_equal

from batchuq import score_directory
from batchuq.decode import load_image
from batchuq.errors import NoDropoutError, UsageError
from batchuq.jobs.score import ScoreOptions
from batchuq.methods import UncertaintyMethod
from batchuq.methods.ensemble import METHOD_NAME, DeepEnsemble
from batchuq.methods.mc_dropout import MCDropout
from batchuq.models import BUNDLED_MODEL, LoadedModel, load_model, read_sidecar, write_sidecar
from batchuq.output.schema import read_metadata
from batchuq.seeds import mix

CLASSES = 10
NAMES = [f"n{i}" for i in range(CLASSES)]


def _perturbed_copy(model: keras.Model, scale: float, seed: int) -> keras.Model:
    """The same architecture with every weight moved by noise (``scale`` x its own spread)."""
    rng = np.random.default_rng(seed)
    clone = keras.models.clone_model(model)
    clone.set_weights(
        [w + scale * (w.std() or 1.0) * rng.standard_normal(w.shape) for w in model.get_weights()]
    )
    return clone


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[LoadedModel]:
    """``ens/member-{0,1,2}.keras`` with sidecars: the bundled model and two perturbed copies."""
    folder = tmp_path_factory.mktemp("ens")
    bundled = load_model(BUNDLED_MODEL)
    sidecar = read_sidecar(BUNDLED_MODEL)
    paths = [folder / f"member-{i}.keras" for i in range(3)]
    shutil.copy(BUNDLED_MODEL, paths[0])
    for index, path in enumerate(paths[1:], start=1):
        _perturbed_copy(bundled.model, 0.3, seed=index).save(path)
    for path in paths:
        write_sidecar(path, sidecar["class_names"], rescale=sidecar["rescale"])
    return [load_model(path) for path in paths]


def _tiny(shape: tuple[int, ...] = (64, 64, 1), classes: int = CLASSES) -> keras.Model:
    """A small member without dropout: flatten, one dense softmax layer."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input(shape)
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(hidden))


def _rows(count: int = 4) -> tuple[tf.Tensor, tf.Tensor]:
    rows = tf.random.stateless_uniform((count, 64, 64, 1), seed=(3, 4))
    return rows, tf.constant(np.arange(11, 11 + count), tf.uint32)


def _samples(path: Path) -> np.ndarray:
    frame = pd.read_parquet(path)
    return np.stack([np.stack(s) for s in frame["samples"]]).astype(np.float32)


class KeyedMember(UncertaintyMethod):
    """One member alone, sampled with the keys the ensemble gives member ``index``."""

    def __init__(self, loaded: LoadedModel, index: int, passes: int) -> None:
        self.inner = MCDropout(loaded.model, passes)
        self.index = index
        self.samples_per_row = passes

    def row_chunks(self, rows: int) -> list[tuple[int, int]]:
        return self.inner.row_chunks(rows)

    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        return self.inner.sample(rows, mix(row_keys, self.index))

    def metadata(self) -> dict[str, Any]:
        return self.inner.metadata()


def test_samples_are_each_members_own_ordered_copy_member_pass(
    members: list[LoadedModel], digits_subset: Path, tmp_path: Path
) -> None:
    k, m, t = 2, len(members), 2
    out = tmp_path / "ens.parquet"
    report = score_directory(
        digits_subset,
        out,
        ScoreOptions(
            model=members[0],
            method=lambda loaded: DeepEnsemble(members, passes=t),
            tta=k,
            seed=5,
            batch_size=7,
            save_samples=True,
        ),
    )
    assert report.images == 30 and report.errors == 0
    metadata = read_metadata(out)
    assert metadata["samples_per_image"] == k * m * t
    ensemble = _samples(out)
    assert ensemble.shape == (30, k * m * t, CLASSES)
    ensemble = ensemble.reshape(30, k, m, t, CLASSES)  # copy, member, pass
    for index, member in enumerate(members):
        alone = tmp_path / f"member-{index}.parquet"
        score_directory(
            digits_subset,
            alone,
            ScoreOptions(
                model=member,
                method=lambda loaded, i=index: KeyedMember(loaded, i, t),
                tta=k,
                seed=5,
                batch_size=11,  # another batching: a row's samples do not depend on it
                save_samples=True,
            ),
        )
        own = _samples(alone).reshape(30, k, t, CLASSES)  # copy, pass
        np.testing.assert_allclose(ensemble[:, :, index], own, **ROUNDING)
    # The members really differ, and so do the passes and the copies.
    assert np.abs(ensemble[:, :, 0] - ensemble[:, :, 1]).max() > 1e-2
    assert np.abs(ensemble[:, :, :, 0] - ensemble[:, :, :, 1]).max() > 1e-3
    assert np.abs(ensemble[:, 0] - ensemble[:, 1]).max() > 1e-3


def _predict(folder: Path, member: LoadedModel) -> pd.DataFrame:
    """``model.predict`` of every image, decoded and scaled independently of the job."""
    paths = sorted(folder.rglob("*.png"))
    spec = member.image_spec
    pixels = np.stack([load_image(str(p), spec) for p in paths]).astype(np.float32)
    probs = member.model.predict(pixels * member.sidecar["rescale"], verbose=0)
    return pd.DataFrame(probs, index=[f"{p.parent.name}/{p.name}" for p in paths])


def test_one_pass_ensemble_is_the_mean_of_the_members_predictions(
    members: list[LoadedModel], digits_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "classic.parquet"
    score_directory(
        digits_subset,
        out,
        ScoreOptions(model=members[0], method=lambda loaded: DeepEnsemble(members)),
    )
    frame = pd.read_parquet(out).set_index("path")
    mean = frame[[f"mean_{n}" for n in NAMES]].to_numpy()
    std = frame[[f"std_{n}" for n in NAMES]].to_numpy()
    predictions = np.stack(
        [_predict(digits_subset, m).loc[frame.index].to_numpy() for m in members]
    )
    np.testing.assert_allclose(mean, predictions.mean(axis=0), **ROUNDING)
    # Deterministic members: the spread is the members' disagreement, and only that.
    disagree = np.abs(predictions - predictions[0]).max(axis=0) > 1e-4  # (images, classes)
    assert disagree.mean() > 0.5
    assert (std[disagree] > 0).all()
    assert read_metadata(out)["samples_per_image"] == len(members)


def test_one_member_ensemble_is_mc_dropout_of_that_member(
    members: list[LoadedModel], digits_subset: Path, tmp_path: Path
) -> None:
    """Bitwise with passes=1; with passes=T it is MC dropout under the keys mix(key, 0)."""
    a, b = tmp_path / "mc.parquet", tmp_path / "one.parquet"
    common = {"model": members[1], "passes": 1, "tta": 2, "seed": 3, "save_samples": True}
    score_directory(digits_subset, a, ScoreOptions(**common))
    score_directory(
        digits_subset, b, ScoreOptions(method=lambda loaded: DeepEnsemble([loaded]), **common)
    )
    assert_parquet_bitwise_equal(a, b)
    meta_a, meta_b = read_metadata(a), read_metadata(b)
    differ = {key for key in meta_a.keys() | meta_b.keys() if meta_a.get(key) != meta_b.get(key)}
    assert differ <= {"created", "run", "method", "members", "sampled_layers"}
    assert meta_b["sampled_layers"] == [meta_a["sampled_layers"]] == [[]]

    rows, keys = _rows()
    ensemble = DeepEnsemble([members[1]], passes=3).sample(rows, keys)
    mc = MCDropout(members[1].model, passes=3)
    np.testing.assert_array_equal(ensemble, mc.sample(rows, mix(keys, 0)))
    assert np.abs(ensemble - mc.sample(rows, keys)).max() > 1e-3  # members never reuse it


def test_member_streams_are_independent_and_follow_the_row_key(
    members: list[LoadedModel],
) -> None:
    rows, keys = _rows()
    ensemble = DeepEnsemble([members[0], members[0]], passes=3)  # one model, twice
    samples = ensemble.sample(rows, keys)
    assert samples.shape == (4, 6, CLASSES)
    assert np.abs(samples[:, :3] - samples[:, 3:]).max() > 1e-3  # member 1 is not member 0
    reversed_ = ensemble.sample(rows[::-1], keys[::-1])[::-1]
    np.testing.assert_allclose(reversed_, samples, **ROUNDING)


def test_row_chunks_fit_every_members_budget(members: list[LoadedModel]) -> None:
    ensemble = DeepEnsemble([members[0], _tiny()], passes=1, memory_budget_mb=1)
    limits = [method.sampler.max_chunk_rows for method in ensemble.methods]
    assert limits[0] != limits[1]
    chunks = ensemble.row_chunks(1000)
    assert chunks[0][0] == 0 and chunks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    assert max(stop - start for start, stop in chunks) <= min(limits)
    assert ensemble.row_chunks(0) == []


def _with_sidecar(member: LoadedModel, **changes: Any) -> LoadedModel:
    sidecar = {**member.sidecar, **changes}
    return LoadedModel(member.model, Path("other/member-1.keras"), "abc", False, sidecar)


@pytest.mark.parametrize(
    ("second", "received"),
    [
        (
            lambda m: LoadedModel(_tiny(classes=5), Path("ens/member-1.keras"), "", False),
            "classes=5",
        ),
        (lambda m: _tiny(shape=(32, 32, 1)), "input_shape=(32, 32, 1)"),
        (lambda m: _tiny(shape=(64, 64)), "input_shape=(64, 64)"),
        (lambda m: _with_sidecar(m, class_names=list("abcdefghij")), "class_names=["),
        (lambda m: _with_sidecar(m, rescale=1.0), "rescale=1.0"),
    ],
)
def test_members_that_disagree_are_a_usage_error_naming_the_member(
    members: list[LoadedModel], second: Any, received: str
) -> None:
    with pytest.raises(UsageError, match=r"member 1 .*Received: member=1, path=") as caught:
        DeepEnsemble([members[0], second(members[0]), members[2]])
    assert received in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_member_without_dropout_works_at_one_pass_only(members: list[LoadedModel]) -> None:
    tiny = _tiny()
    assert DeepEnsemble([members[0], tiny], passes=1).sample(*_rows(2)).shape == (2, 2, CLASSES)
    with pytest.raises(NoDropoutError, match=r"Ensemble member 1 \('<in-memory>'\).*Received"):
        DeepEnsemble([members[0], tiny], passes=2)
    with pytest.raises(UsageError, match=r"Received: members=\[\]"):
        DeepEnsemble([])
    with pytest.raises(UsageError, match=r"Received: names=\['a'\]"):
        DeepEnsemble([members[0], tiny], names=["a"])


def test_metadata_lists_the_members(members: list[LoadedModel]) -> None:
    ensemble = DeepEnsemble(members, passes=2)
    assert ensemble.samples_per_row == 6
    assert ensemble.class_names == NAMES
    assert ensemble.rescale == pytest.approx(1 / 255)
    metadata = json.loads(json.dumps(ensemble.metadata()))  # JSON-serialisable as it is
    assert metadata["method"] == METHOD_NAME == "deep_ensemble"
    assert metadata["members"] == [
        {"index": i, "name": f"member-{i}.keras", "path": str(m.path), "sha256": m.sha256}
        for i, m in enumerate(members)
    ]
    assert len({m["sha256"] for m in metadata["members"]}) == 3
    assert metadata["passes"] == 2
    assert metadata["precision"] == metadata["precision_requested"] == "float32"
    assert metadata["logits"] is False
    dropout = ["dropout1", "dropout2", "dropout3"]
    assert metadata["sampled_layers"] == [dropout, dropout, dropout]
