"""``--passes auto`` end to end: an adaptive row's samples are the first passes of the fixed
run's, the compiled sampler never retraces, and the output says what was drawn."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import ROUNDING, assert_frames_equal_to_rounding
from PIL import Image

from batchuq.cli import cli
from batchuq.errors import StopRequested
from batchuq.jobs.score import RunControl, ScoreOptions, score_directory
from batchuq.jobs.score.pool import AdaptivePool
from batchuq.methods.mc_dropout import MCDropout
from batchuq.model_files import BUNDLED_MODEL as DEFAULT_MODEL_PATH
from batchuq.output.schema import read_metadata
from batchuq.postprocess.rules import DecisionRule
from batchuq.sampling.memory import bucket_rows
from batchuq.sampling.sampler import MCSampler
from batchuq.sampling.stopping import AdaptivePasses, sample_adaptively

DATA = Path(DEFAULT_MODEL_PATH).parent


def _samples(path: Path) -> tuple[pd.DataFrame, list[np.ndarray]]:
    frame = pd.read_parquet(path)
    return frame, [np.array([np.asarray(s) for s in row]) for row in frame["samples"]]


@pytest.mark.numerics
def test_adaptive_samples_are_the_first_passes_of_the_fixed_run(
    digits_subset: Path, tmp_path: Path
) -> None:
    common = {"tta": 2, "seed": 3, "save_samples": True, "batch_size": 7}
    auto, fixed = tmp_path / "auto.parquet", tmp_path / "fixed.parquet"
    score_directory(digits_subset, auto, ScoreOptions(passes="auto", max_passes=60, **common))
    score_directory(digits_subset, fixed, ScoreOptions(passes=60, **common))
    auto_rows, auto_samples = _samples(auto)
    fixed_rows, fixed_samples = _samples(fixed)
    assert auto_rows.path.tolist() == fixed_rows.path.tolist()
    assert set(auto_rows.passes) <= set(range(10, 61, 10)) and (fixed_rows.passes == 60).all()
    assert auto_rows.passes.min() == 10 and auto_rows.passes.mean() < 30
    for passes, adaptive, full in zip(auto_rows.passes, auto_samples, fixed_samples, strict=True):
        # Pass by pass, copy by copy: (copies, passes, classes), the adaptive one a prefix.
        adaptive = adaptive.reshape(2, passes, 10)
        prefix = full.reshape(2, 60, 10)[:, :passes]
        np.testing.assert_allclose(adaptive, prefix, **ROUNDING)
        assert (adaptive.argmax(-1) == prefix.argmax(-1)).all()
    assert (auto_rows.decision == fixed_rows.decision).all()


@pytest.mark.numerics
def test_sample_rows_equals_sample_bitwise_when_the_shapes_are_the_same() -> None:
    model = keras.saving.load_model(DEFAULT_MODEL_PATH)
    sampler = MCSampler(model, 30)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (8, *model.input_shape[1:])).astype(np.float32)
    keys = rng.integers(0, 2**32, 8, dtype=np.uint32)
    full = sampler.sample(images, keys)
    prepared = sampler.prepare(images, keys)
    np.testing.assert_array_equal(sampler.sample_rows(prepared, np.arange(8), 0, 30), full)
    # Later passes of some rows: the same draws, other shapes (float32 rounding at most).
    later = sampler.sample_rows(prepared, np.array([6, 1, 3]), 20, 10)
    np.testing.assert_allclose(later, full[20:30][:, [6, 1, 3]], **ROUNDING)
    assert (later.argmax(-1) == full[20:30][:, [6, 1, 3]].argmax(-1)).all()


def test_adaptive_run_on_the_bundled_test_set_keeps_the_fixed_decisions_and_compiles_once(
    tmp_path: Path,
) -> None:
    images = Path(__file__).resolve().parents[1] / "sample_data" / "digits" / "test"
    method = MCDropout(keras.saving.load_model(DEFAULT_MODEL_PATH), passes=100)
    out, fixed_out = tmp_path / "out.parquet", tmp_path / "fixed.parquet"
    score_directory(
        images, out, ScoreOptions(passes="auto", method=lambda loaded: method, batch_size=16)
    )
    score_directory(images, fixed_out, ScoreOptions(passes=100, batch_size=16))
    frame, fixed = pd.read_parquet(out), pd.read_parquet(fixed_out)
    # Not what --adaptive-alpha promises (that is about unlimited passes), but measured: the
    # decisions of T = 100 (450 of 450), with far fewer passes (17.0 on average).
    assert (frame.decision != fixed.decision).mean() <= 0.01
    assert frame.passes.mean() <= 30
    assert frame.passes.nunique() > 3  # batches of many different unsettled counts ran
    # The confidence rule's betting bound: 25.4 mean passes, 450 of 450 decisions of T = 100
    # (the empirical-Bernstein test it replaced needed 70.4); T = 100's confidence-rule
    # decisions follow from the fixed run's pred and confidence.
    confidence_out = tmp_path / "confidence.parquet"
    rule = DecisionRule("confidence", min_confidence=0.5)
    score_directory(images, confidence_out, ScoreOptions(passes="auto", rule=rule, batch_size=16))
    confident = pd.read_parquet(confidence_out)
    fixed_decision = fixed.pred.where(fixed.confidence >= 0.5, "unclassified")
    assert (confident.decision == fixed_decision).mean() >= 0.995
    assert confident.passes.mean() <= 40
    sampler = method.sampler
    assert sampler._prefix_function.experimental_get_tracing_count() == 1
    assert sampler._rows_function.experimental_get_tracing_count() == 1
    assert sorted({bucket_rows(n) for n in range(1, 17)}) == [1, 2, 3, 4, 6, 8, 12, 16]


def test_cli_passes_auto_records_its_settings_and_passes(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "n3"
    folder.mkdir(parents=True)
    source = sorted((Path(__file__).resolve().parents[1] / "sample_data/digits/test/n3").iterdir())
    for image in source[:12]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.parquet"
    args = ["score", str(tmp_path / "images"), str(out), "--passes", "auto", "--no-progress"]
    result = CliRunner().invoke(
        cli, [*args, "--min-passes", "5", "--max-passes", "40", "--max-error-rate", "0.5"]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out).set_index("path")
    assert pd.isna(frame.loc["n3/broken.png", "passes"])
    good = frame.drop("n3/broken.png")
    assert good.passes.between(5, 40).all() and (good.passes % 5 == 0).all()
    meta = read_metadata(out)
    assert meta["passes"] == "auto"
    assert meta["adaptive"]["min_passes"] == 5 and meta["adaptive"]["max_passes"] == 40
    assert meta["adaptive"]["alpha"] == 0.01 and meta["adaptive"]["looks"] == 7
    assert json.loads(json.dumps(meta["adaptive"])) == meta["adaptive"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--passes", "many"], "expected a whole number of at least 1 or 'auto'"),
        (["--passes", "0"], "expected a whole number of at least 1 or 'auto'"),
        (["--passes", "auto", "--min-passes", "50", "--max-passes", "20"], "min_passes"),
        (["--passes", "auto", "--model", str(DATA / "digits_sngp.keras")], "--passes auto"),
    ],
)
def test_cli_refuses_bad_adaptive_settings(tmp_path: Path, extra: list[str], message: str) -> None:
    images = Path(__file__).resolve().parents[1] / "sample_data" / "digits" / "test"
    args = ["score", str(images), str(tmp_path / "out.parquet"), *extra, "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.numerics
def test_adaptive_ensemble_keeps_the_copy_member_pass_order(
    digits_subset: Path, tmp_path: Path
) -> None:
    common = {"tta": 2, "seed": 5, "save_samples": True, "model": DATA / "digits_ensemble"}
    auto, fixed = tmp_path / "auto.parquet", tmp_path / "fixed.parquet"
    score_directory(digits_subset, auto, ScoreOptions(passes="auto", max_passes=20, **common))
    score_directory(digits_subset, fixed, ScoreOptions(passes=20, **common))
    auto_rows, auto_samples = _samples(auto)
    _, fixed_samples = _samples(fixed)
    members = 5
    for passes, adaptive, full in zip(auto_rows.passes, auto_samples, fixed_samples, strict=True):
        adaptive = adaptive.reshape(2, members, passes, 10)
        prefix = full.reshape(2, members, 20, 10)[:, :, :passes]
        np.testing.assert_allclose(adaptive, prefix, **ROUNDING)


@pytest.mark.numerics
def test_prepare_runs_the_prefix_in_chunks_within_the_memory_budget() -> None:
    model = keras.saving.load_model(DEFAULT_MODEL_PATH)
    sampler = MCSampler(model, 20, memory_budget_mb=0.3)  # one row per chunk
    assert len(sampler.row_chunks(8)) == 8
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (8, *model.input_shape[1:])).astype(np.float32)
    keys = rng.integers(0, 2**32, 8, dtype=np.uint32)
    prepared = sampler.prepare(images, keys)
    assert prepared.frontier[0].shape[0] == 8
    drawn = sampler.sample_rows(prepared, np.arange(8), 0, 20)
    np.testing.assert_allclose(drawn, sampler.sample(images, keys), **ROUNDING)


def _blended_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` blends of two bundled test digits (64x64x1, rescaled to 0..1), and keys."""
    root = Path(__file__).resolve().parents[1] / "sample_data" / "digits" / "test"
    files = [f for folder in sorted(root.iterdir()) for f in sorted(folder.iterdir())[:6]]
    digits = np.stack(
        [np.asarray(Image.open(f).convert("L").resize((64, 64)), np.float32) / 255 for f in files]
    )
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(files), (2, count))
    weight = rng.uniform(0.3, 0.7, (count, 1, 1))
    blends = weight * digits[first] + (1 - weight) * digits[second]
    return blends[..., None].astype(np.float32), rng.integers(0, 2**32, count, dtype=np.uint32)


@pytest.mark.numerics
def test_pool_gives_each_image_its_unpooled_samples_in_order_and_stays_bounded() -> None:
    # Blends of two digits: the digits CNN is unsure of many, so they stay for many rounds and
    # hold the images after them back: the worst case for the pool's size.
    method = MCDropout(keras.saving.load_model(DEFAULT_MODEL_PATH), passes=50)
    count, batch, copies = 60, 6, 2
    images, keys = _blended_digits(count * copies, seed=7)
    adaptive, rule = AdaptivePasses(min_passes=10, max_passes=50), DecisionRule()
    statuses = ["ok"] * count
    statuses[4] = "error: unreadable"  # stops after its first round, whatever its samples
    pool = AdaptivePool(method, copies, adaptive, rule, round_images=batch)
    released = []
    for start in range(0, count, batch):
        rows = slice(start * copies, (start + batch) * copies)
        pool.add(
            method.prepare(images[rows], keys[rows]),
            list(range(start, start + batch)),
            statuses[start : start + batch],
        )
        while pool.full:
            pool.run_round()
            released.append(pool.release())
    while pool.active:
        pool.run_round()
        released.append(pool.release())
    out = [r for r in released if r is not None]
    assert [p for r in out for p in r.positions] == list(range(count))  # in order
    passes = np.concatenate([r.passes for r in out])
    samples = [s for r in out for s in r.samples]
    # Without a pool: all images in one call per round, each round only the unsettled ones.
    prepared = method.prepare(images, keys)

    def draw(which: np.ndarray, first_pass: int, passes: int) -> np.ndarray:
        rows = (which[:, None] * copies + np.arange(copies)).reshape(-1)
        drawn = method.sample_passes(prepared, rows, first_pass, passes)
        return drawn.reshape(len(which), copies, passes, -1)

    unreadable = np.array([s != "ok" for s in statuses])
    reference = sample_adaptively(draw, count, adaptive, rule, stop_after_first=unreadable)
    np.testing.assert_array_equal(passes, reference.passes)
    assert passes[4] == 10 and passes.max() == 50 and (passes > 10).sum() > batch
    for pooled, alone in zip(samples, reference.samples, strict=True):
        np.testing.assert_allclose(pooled, alone, **ROUNDING)
    # Bounded: the oldest image is in every round until it settles, so at most one batch
    # comes in per round while it holds the others back.
    assert pool.peak_images <= len(adaptive.rounds()) * batch
    assert pool.peak_rows <= (2 * batch - 1) * copies
    assert len(pool) == 0 and pool.prepared is not None


@pytest.mark.numerics
def test_pooling_across_batches_gives_the_rows_of_batches_of_one(
    digits_subset: Path, tmp_path: Path
) -> None:
    common = {"passes": "auto", "max_passes": 40, "tta": 2, "seed": 3, "save_samples": True}
    one, pooled = tmp_path / "one.parquet", tmp_path / "pooled.parquet"
    score_directory(digits_subset, one, ScoreOptions(batch_size=1, **common))
    score_directory(digits_subset, pooled, ScoreOptions(batch_size=8, **common))
    one_rows, one_samples = _samples(one)
    pooled_rows, pooled_samples = _samples(pooled)
    assert pooled_rows.path.tolist() == one_rows.path.tolist() == sorted(one_rows.path)
    assert one_rows.passes.nunique() > 1 and "max_logit" in one_rows  # extras too
    # Every column (passes, decisions, statistics, OOD scores) the same, to float32 rounding.
    assert_frames_equal_to_rounding(
        pooled_rows.drop(columns="samples"), one_rows.drop(columns="samples")
    )
    for a, b in zip(pooled_samples, one_samples, strict=True):
        np.testing.assert_allclose(a, b, **ROUNDING)


def test_an_interrupted_adaptive_run_resumes_to_the_uninterrupted_rows(
    digits_subset: Path, tmp_path: Path
) -> None:
    options = ScoreOptions(passes="auto", max_passes=40, seed=2, batch_size=4)
    reference, out = tmp_path / "reference.parquet", tmp_path / "out.parquet"
    score_directory(digits_subset, reference, options)
    polls = iter(range(1000))
    control = RunControl(resume=True, checkpoint_rows=4, should_stop=lambda: next(polls) >= 8)
    with pytest.raises(StopRequested):
        score_directory(digits_subset, out, options, control)
    kept = pq.read_table(sorted((tmp_path / "out.parquet.checkpoint").glob("part-*"))[0])
    assert 0 < kept.num_rows < 30
    score_directory(digits_subset, out, options, RunControl(resume=True, checkpoint_rows=4))
    assert_frames_equal_to_rounding(pd.read_parquet(out), pd.read_parquet(reference))
