"""Memory under test-time augmentation: the B x K rows of a batch are made and run a chunk at a
time, each chunk within --memory-budget, with the same results as running them all at once.
(Peak RSS figures come from benchmarks/memory_tta.py, not from a test.)"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import ROUNDING, assert_frames_equal_to_rounding, bn_dropout_model

from batchuq import score_directory
from batchuq.augment import CopyMaker, TTAConfig, augment_copies
from batchuq.jobs.score import ScoreOptions
from batchuq.sampling.sampler import MCSampler


def _row_bytes(shape: tuple) -> int:
    return 4 * int(np.prod([d for d in shape[1:]]))


@pytest.mark.numerics
def test_sampler_runs_many_rows_in_chunks_within_the_budget() -> None:
    model = bn_dropout_model()
    images = np.random.default_rng(0).random((8 * 60, 16, 16, 3), dtype=np.float32)
    keys = np.arange(7, 7 + len(images), dtype=np.uint32)
    budget_mb = 0.25
    small = MCSampler(model, passes=3, memory_budget_mb=budget_mb)
    # The estimate covers at least the input and the widest activation before the dropout.
    widest = _row_bytes(model.get_layer("conv_a").output.shape)
    assert small.split.prefix_bytes_per_row >= _row_bytes(model.inputs[0].shape) + widest
    assert small.max_chunk_rows * small.split.prefix_bytes_per_row <= budget_mb * 2**20
    assert small.max_chunk_rows * small.split.tail_bytes_per_row <= budget_mb * 2**20
    assert small.max_chunk_rows < len(images)

    plan = small.row_chunks(len(images))
    assert plan[0][0] == 0 and plan[-1][1] == len(images)
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:], strict=False))
    sizes = [stop - start for start, stop in plan]
    assert max(sizes) <= small.max_chunk_rows and max(sizes) - min(sizes) <= 1

    chunked = small.sample(images, keys)
    assert 0 < small.largest_chunk_rows <= small.max_chunk_rows
    whole = MCSampler(model, passes=3, memory_budget_mb=4096)
    at_once = whole.sample(images, keys)
    assert whole.largest_chunk_rows == len(images)
    assert chunked.shape == at_once.shape == (3, len(images), 3)
    np.testing.assert_allclose(chunked, at_once, **ROUNDING)
    np.testing.assert_array_equal(chunked.mean(0).argmax(-1), at_once.mean(0).argmax(-1))


@pytest.mark.numerics
@pytest.mark.parametrize("config", [TTAConfig(copies=30, flip=True), TTAConfig(copies=1)])
def test_copies_made_by_row_range_equal_augment_copies(config: TTAConfig) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 12, 10, 3)).astype(np.float32)
    keys = np.array([11, 2**32 - 1, 0, 12345, 777], np.uint32)
    # As make_dataset makes them: in a tf.data map, i.e. a graph (eager ops round the copies'
    # angles differently in the last bit).
    dataset = tf.data.Dataset.from_tensor_slices((images, keys)).map(
        lambda image, key: augment_copies(image, key, config) * tf.constant(0.5, tf.float32)
    )
    reference = np.concatenate([copies.numpy() for copies in dataset])
    maker = CopyMaker(config, (12, 10, 3), rescale=0.5)
    rows = len(images) * config.copies
    for step in (rows, 7, 30, 1):
        made = [
            maker.rows(images, keys, s, min(s + step, rows)).numpy() for s in range(0, rows, step)
        ]
        np.testing.assert_array_equal(np.concatenate(made), reference)


@pytest.mark.numerics
def test_score_bounds_rows_per_chunk_under_large_tta(
    digits_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With K = 40 and B = 16 a batch is 640 rows; a 16 MB budget lets ~27 through at once."""
    seen: list[tuple[int, int, int]] = []  # (rows made, rows sampled, the sampler's bound)
    original_rows, original_sample = CopyMaker.rows, MCSampler.sample_with_extras
    made: list[int] = []

    def rows(self, images, keys, start, stop):
        out = original_rows(self, images, keys, start, stop)
        made.append(int(out.shape[0]))
        return out

    def sample(self, images, keys):  # the score job's call: probabilities and OOD extras
        seen.append((made[-1], int(images.shape[0]), self.max_chunk_rows))
        return original_sample(self, images, keys)

    monkeypatch.setattr(CopyMaker, "rows", rows)
    monkeypatch.setattr(MCSampler, "sample_with_extras", sample)
    options = {"passes": 2, "tta": 40, "batch_size": 16, "seed": 5}
    score_directory(
        digits_subset, tmp_path / "small.parquet", ScoreOptions(memory_budget_mb=16, **options)
    )
    bound = seen[0][2]
    assert 1 <= bound < 16 * 40
    assert max(r for r, _, _ in seen) <= bound and max(s for _, s, _ in seen) <= bound
    assert sum(s for _, s, _ in seen) == 30 * 40  # every copy of every image, once

    seen.clear()
    made.clear()
    score_directory(
        digits_subset, tmp_path / "big.parquet", ScoreOptions(memory_budget_mb=4096, **options)
    )
    assert max(s for _, s, _ in seen) == 16 * 40  # a budget this large runs a batch at once
    small = pd.read_parquet(tmp_path / "small.parquet")
    big = pd.read_parquet(tmp_path / "big.parquet")
    assert_frames_equal_to_rounding(small, big)  # decisions and predictions exactly equal


def test_nested_model_counts_the_activations_inside_it() -> None:
    """A keras.applications-style base with its own dropout is one node of the outer graph; the
    tail's size per row must count what runs inside it, not just its small output."""
    inner_in = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same")(inner_in)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Conv2D(4, 3, strides=4)(x)
    base = keras.Model(inner_in, x, name="base")
    inputs = keras.Input((32, 32, 3))
    y = keras.layers.GlobalAveragePooling2D()(base(inputs))
    outputs = keras.layers.Dense(3, activation="softmax")(y)
    sampler = MCSampler(keras.Model(inputs, outputs), passes=4)
    assert sampler.split.tail_bytes_per_row >= 2 * _row_bytes((None, 32, 32, 16))
