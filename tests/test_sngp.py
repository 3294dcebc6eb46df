"""SNGP: the Keras 3 GP and spectral-normalisation layers, and the SNGP method behind the seam."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import REPO, ROUNDING, SAMPLE_TEST
from scipy.sparse.linalg import LinearOperator, svds

from batchuq import score_directory
from batchuq.decode import ImageSpec, load_image
from batchuq.errors import ModelError, UsageError
from batchuq.jobs.score import ScoreOptions
from batchuq.methods.sngp import SNGP, standard_normal_from_keys
from batchuq.output.schema import read_metadata
from batchuq.sngp import (
    BoundedSpectralNormalization,
    BoundedSpectralNormalizationConv2D,
    RandomFeatureGaussianProcess,
    SNGPCallback,
    ZeroPadShortcut,
    is_sngp_model,
    iter_spectral_norms,
    mean_field_logits,
    sngp_cnn,
    spectral_layers,
)

SPEC = ImageSpec(64, 64, 1)
RIDGE = 1.0


def operator_norm(layer: BoundedSpectralNormalization) -> float:
    """The largest singular value of a spectral layer's linear map, computed independently of
    batchuq: for a dense layer the kernel's 2-norm; for a convolution, ARPACK (``svds``) on a
    ``LinearOperator`` whose matvec is the convolution written here in numpy (zero padding as
    TensorFlow's "same" pads, then a strided sliding window) and whose rmatvec is its adjoint
    (each output scattered back through the kernel)."""
    kernel = np.asarray(layer.kernel.numpy(), np.float64)
    if not isinstance(layer, BoundedSpectralNormalizationConv2D):
        return float(np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), 2))
    conv = layer.layer
    assert conv.dilation_rate == (1, 1)
    kh, kw, cin, cout = kernel.shape
    (sh, sw), (h, w) = conv.strides, layer.input.shape[1:3]
    if conv.padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        pad_h, pad_w = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
        top, left = pad_h // 2, pad_w // 2
    else:
        oh, ow, pad_h, pad_w, top, left = (h - kh) // sh + 1, (w - kw) // sw + 1, 0, 0, 0, 0
    padded = (h + pad_h, w + pad_w, cin)

    def matvec(x: np.ndarray) -> np.ndarray:
        full = np.zeros(padded)
        full[top : top + h, left : left + w] = np.reshape(x, (h, w, cin))
        windows = np.lib.stride_tricks.sliding_window_view(full, (kh, kw), axis=(0, 1))
        windows = windows[: (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw]
        return np.einsum("abcij,ijcd->abd", windows, kernel).ravel()

    def rmatvec(y: np.ndarray) -> np.ndarray:
        y = np.reshape(y, (oh, ow, cout))
        full = np.zeros(padded)
        for i in range(kh):
            for j in range(kw):
                full[i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw] += (
                    y @ kernel[i, j].T
                )
        return full[top : top + h, left : left + w].ravel()

    shape = (oh * ow * cout, h * w * cin)
    operator = LinearOperator(shape, matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    return float(svds(operator, k=1, return_singular_vectors=False, random_state=0)[0])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _gp_only_model(d: int = 4, classes: int = 3, inducing: int = 64) -> keras.Model:
    """The GP layer straight on the inputs: its random features never change during fit."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((d,))
    outputs = RandomFeatureGaussianProcess(
        classes, num_inducing=inducing, ridge_penalty=RIDGE, name="gp"
    )(inputs)
    return keras.Model(inputs, outputs)


def _features(gp: RandomFeatureGaussianProcess, x: np.ndarray) -> np.ndarray:
    w, b = gp.feature_kernel.numpy().astype(np.float64), gp.feature_bias.numpy()
    return math.sqrt(2.0 / gp.num_inducing) * np.cos(x.astype(np.float64) @ w + b)


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=epochs, batch_size=32, callbacks=[SNGPCallback()], verbose=0)


@pytest.fixture(scope="module")
def tiny() -> tuple[keras.Model, np.ndarray]:
    """A GP-only model fitted 3 epochs on 100 points of 3 blobs; returns it and the points."""
    rng = np.random.default_rng(0)
    y = np.arange(100) % 3
    x = (rng.normal(size=(100, 4)) * 0.3 + np.eye(3, 4)[y]).astype(np.float32)
    model = _gp_only_model()
    _fit(model, x, y, epochs=3)
    return model, x


def _digits(root: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each digit folder, scaled to [0, 1], and labels."""
    images, labels = [], []
    for label, folder in enumerate(sorted(root.iterdir())):
        for path in sorted(folder.iterdir())[:per_class]:
            images.append(load_image(str(path), SPEC).astype(np.float32) / 255.0)
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path]:
    """A narrow ``sngp_cnn`` fitted on 30 training digits per class, saved as ``.keras``."""
    keras.utils.set_random_seed(0)
    x, y = _digits(REPO / "sample_data" / "digits" / "train", 30)
    model = sngp_cnn(SPEC, 10, width=8, hidden=64, num_inducing=256)
    _fit(model, x, y, epochs=4)
    path = tmp_path_factory.mktemp("sngp") / "sngp.keras"
    model.save(path)
    return model, path


def test_precision_is_reset_each_epoch_and_equals_the_numpy_laplace_computation(tiny) -> None:
    model, x = tiny
    gp = model.get_layer("gp")
    phi = _features(gp, x)  # (100, M): fixed, as the GP layer is the first layer
    # One epoch's sum of phi phi^T, not three: reset at each epoch start, then accumulated.
    precision = RIDGE * np.eye(gp.num_inducing) + phi.T @ phi
    np.testing.assert_allclose(gp.precision.numpy(), precision, rtol=1e-4, atol=1e-5)

    covariance = RIDGE * np.linalg.inv(precision)
    np.testing.assert_allclose(gp.covariance(), covariance, rtol=1e-4, atol=1e-6)
    probe = np.concatenate([x[:5], x[:5] + 3.0]).astype(np.float32)
    logits, variance = gp.mean_and_variance(probe)
    phi_probe = _features(gp, probe)
    expected = np.einsum("ri,ij,rj->r", phi_probe, covariance, phi_probe)
    np.testing.assert_allclose(np.asarray(variance), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(probe)), **ROUNDING)
    # Far from the data the posterior variance goes back towards the prior's.
    assert np.asarray(variance)[5:].mean() > 3 * np.asarray(variance)[:5].mean()


def test_inference_leaves_the_precision_alone(tiny) -> None:
    model, x = tiny
    before = model.get_layer("gp").precision.numpy().copy()
    model.predict(x, verbose=0)
    model(x, training=False)
    np.testing.assert_array_equal(model.get_layer("gp").precision.numpy(), before)


def test_mean_field_probabilities_match_the_formula_and_are_deterministic(tiny) -> None:
    model, x = tiny
    method = SNGP(model, passes=1)
    keys = tf.constant(np.arange(10), tf.uint32)
    first, second = method.sample(x[:10], keys), method.sample(x[:10], keys)
    assert first.shape == (10, 1, 3)
    np.testing.assert_array_equal(first, second)  # bitwise: nothing random

    logits, variance = model.get_layer("gp").mean_and_variance(x[:10])
    logits, variance = np.asarray(logits, np.float64), np.asarray(variance, np.float64)
    by_hand = _softmax(logits / np.sqrt(1.0 + math.pi / 8 * variance)[:, None])
    np.testing.assert_allclose(first[:, 0], by_hand, **ROUNDING)
    np.testing.assert_allclose(
        np.asarray(mean_field_logits(logits, variance, 0.5)),
        logits / np.sqrt(1 + 0.5 * variance)[:, None],
    )
    # The variance comes out of the same pass, and alone: the GP head's, clamped at 0.
    probs, row_variance = method.sample_and_variance(x[:10], keys)
    np.testing.assert_array_equal(probs, first)
    np.testing.assert_allclose(row_variance, np.maximum(variance, 0), **ROUNDING)
    np.testing.assert_allclose(method.variance(x[:10]), row_variance, **ROUNDING)


def test_posterior_samples_are_softmaxes_of_normal_logits(tiny) -> None:
    model, x = tiny
    probe = (x[:2] + np.float32(2.0)).astype(np.float32)  # off the data: a visible variance
    passes = 4000
    samples = SNGP(model, passes=passes).sample(probe, tf.constant([7, 8], tf.uint32))
    assert samples.shape == (2, passes, 3)
    logits, variance = model.get_layer("gp").mean_and_variance(probe)
    logits, variance = np.asarray(logits), np.asarray(variance)
    # log p_c - log p_0 = (mu_c - mu_0) + sqrt(var) (z_c - z_0), z ~ N(0, 1) independent.
    differences = np.log(samples[..., 1:]) - np.log(samples[..., :1])
    expected_mean = logits[:, 1:] - logits[:, :1]
    expected_std = np.sqrt(2 * variance)[:, None]
    # 0.1 std is about 6 standard errors of a mean over 4000 draws.
    assert (np.abs(differences.mean(axis=1) - expected_mean) < 0.1 * expected_std).all()
    np.testing.assert_allclose(
        differences.std(axis=1), np.broadcast_to(expected_std, (2, 2)), rtol=0.05
    )


def test_normal_draws_depend_only_on_the_row_key_and_the_pass() -> None:
    draws = standard_normal_from_keys(tf.constant([11, 22, 33], tf.uint32), 10, 4).numpy()
    moved = standard_normal_from_keys(tf.constant([33, 11], tf.uint32), 25, 4).numpy()
    np.testing.assert_array_equal(moved[1, :10], draws[0])  # other position, other T
    np.testing.assert_array_equal(moved[0, :10], draws[2])
    assert not np.array_equal(draws[0], draws[1])
    many = standard_normal_from_keys(tf.fill([2000], tf.constant(5, tf.uint32)), 1, 1)
    assert np.unique(many.numpy()).size == 1  # one key, one draw
    wide = standard_normal_from_keys(tf.constant([1], tf.uint32), 20000, 1).numpy().ravel()
    assert abs(wide.mean()) < 0.03 and abs(wide.std() - 1) < 0.03


def test_samples_of_a_row_do_not_depend_on_its_batch(tiny) -> None:
    model, x = tiny
    method = SNGP(model, passes=6)
    keys = np.arange(100, 108, dtype=np.uint32)
    together = method.sample(x[:8], keys)
    order = np.array([5, 2, 7])
    apart = method.sample(x[:8][order], keys[order])
    np.testing.assert_allclose(apart, together[order], **ROUNDING)
    assert together.std(axis=1).max() > 0


def _wrapped_conv(input_shape: tuple, filters: int, scale: float, **conv_kwargs: object):
    """A ``BoundedSpectralNormalizationConv2D`` built on ``input_shape``, its kernel random
    with entries of standard deviation ``scale`` (so far above the bound)."""
    keras.utils.set_random_seed(3)
    conv = keras.layers.Conv2D(filters, 3, **conv_kwargs)
    layer = BoundedSpectralNormalizationConv2D(conv, norm_multiplier=0.9)
    keras.Model(inputs := keras.Input(input_shape), layer(inputs))
    kernel = np.random.default_rng(1).normal(scale=scale, size=conv.kernel.shape)
    conv.kernel.assign(kernel.astype(np.float32))
    return layer


@pytest.mark.parametrize(
    "input_shape, filters, conv_kwargs",
    [
        ((12, 12, 3), 5, {}),  # the bundled model's kind: stride 1, valid padding
        ((11, 9, 3), 4, {"strides": 2, "padding": "same"}),  # odd sizes, uneven "same" padding
        ((10, 10, 2), 3, {"strides": 2}),
    ],
)
def test_a_convolution_is_bounded_as_an_operator_with_its_strides_and_padding(
    input_shape: tuple, filters: int, conv_kwargs: dict
) -> None:
    layer = _wrapped_conv(input_shape, filters, 0.5, **conv_kwargs)
    exact = operator_norm(layer)
    assert layer.spectral_norm() == pytest.approx(exact, rel=1e-5)
    # The norm of the kernel reshaped to (fan_in, units), what was bounded before, is smaller
    # than the operator's: bounding it left the convolution itself unbounded.
    reshaped = np.linalg.norm(layer.kernel.numpy().reshape(-1, filters), 2)
    assert reshaped < exact
    # Training steps (one power iteration each) bring the operator norm near the bound (power
    # iteration approaches it from below, so not under it)...
    for _ in range(30):
        layer(np.zeros((1, *input_shape), np.float32), training=True)
    assert 0.9 * (1 - 1e-6) <= operator_norm(layer) < 0.9 * 1.03
    # ...and the end of training puts it under the bound exactly.
    layer.enforce_bound()
    assert 0.9 * (1 - 2e-4) < operator_norm(layer) <= 0.9


def test_a_residual_block_keeps_distances_within_one_plus_and_minus_the_bound() -> None:
    """``shortcut(x) + relu(SN(conv)(x))``: for inputs that differ away from the border the
    valid convolution drops, ``(1 - c) |dx| <= |dy| <= (1 + c) |dx|``."""
    layer = _wrapped_conv((10, 10, 4), 8, 0.5, activation="relu")
    layer.enforce_bound()
    shortcut = ZeroPadShortcut(8, crop=1)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, 10, 10, 4)).astype(np.float32)
    step = np.zeros_like(x)
    step[:, 1:-1, 1:-1] = rng.normal(size=(200, 8, 8, 4)) * rng.uniform(0.01, 2, (200, 1, 1, 1))
    block = lambda z: np.asarray(shortcut(z)) + np.asarray(layer(z))  # noqa: E731
    dx = np.linalg.norm(step.reshape(200, -1), axis=1)
    dy = np.linalg.norm((block(x + step) - block(x)).reshape(200, -1), axis=1)
    assert (dy >= 0.1 * dx * (1 - 1e-4)).all() and (dy <= 1.9 * dx * (1 + 1e-4)).all()
    # The shortcut alone is an isometry of the cropped input, zero channels appended.
    moved = np.asarray(shortcut(x + step)) - np.asarray(shortcut(x))
    np.testing.assert_allclose(np.linalg.norm(moved.reshape(200, -1), axis=1), dx, rtol=1e-5)
    assert not moved[..., 4:].any()


def test_spectral_norms_are_within_their_bounds_after_training(trained) -> None:
    model, _ = trained
    layers = spectral_layers(model)
    assert [layer.name for layer in layers] == ["conv1", "conv2", "conv3", "conv4", "dense"]
    for layer in layers:
        assert operator_norm(layer) <= layer.norm_multiplier * (1 + 1e-6), layer.name
    for name, norm, bound in iter_spectral_norms(model):
        assert norm <= bound, name


def test_posterior_variance_is_larger_out_of_distribution_on_average(trained) -> None:
    """The 40 photo crops of ``sample_data/ood`` (read as one-channel digits) sit further from
    the training digits, in the hidden features, than the test digits do."""
    model, _ = trained
    method = SNGP(model)
    test, _ = _digits(SAMPLE_TEST, 10)
    ood = np.stack(
        [
            load_image(str(path), SPEC).astype(np.float32) / 255.0
            for path in sorted((REPO / "sample_data" / "ood").iterdir())
        ]
    )
    variances = [
        np.asarray(method.head.mean_and_variance(method.features(x), method.covariance)[1])
        for x in (test, ood)
    ]
    assert variances[1].mean() > variances[0].mean()


def test_a_saved_sngp_model_loads_in_safe_mode_in_a_fresh_process(trained, tmp_path) -> None:
    model, path = trained
    assert is_sngp_model(model)
    images, _ = _digits(SAMPLE_TEST, 1)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, tensorflow as tf
        import batchuq.sngp  # registers the layers
        from batchuq.methods.sngp import SNGP
        model = keras.saving.load_model({str(path)!r}, safe_mode=True)
        assert batchuq.sngp.is_sngp_model(model)
        images = np.load({str(tmp_path / "images.npy")!r})
        keys = tf.constant(np.arange(len(images)), tf.uint32)
        np.save({str(tmp_path / "logits.npy")!r}, np.asarray(model(images)))
        np.save({str(tmp_path / "probs.npy")!r}, SNGP(model, passes=3).sample(images, keys))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    keys = tf.constant(np.arange(len(images)), tf.uint32)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.asarray(model(images)))
    expected = SNGP(model, passes=3).sample(images, keys)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected, **ROUNDING)


def test_sngp_runs_through_score_directory(trained, digits_subset: Path, tmp_path: Path) -> None:
    _, path = trained
    out = tmp_path / "sngp.parquet"
    report = score_directory(
        digits_subset,
        out,
        ScoreOptions(model=path, method=lambda loaded: SNGP(loaded.model), rescale=1 / 255),
    )
    assert report.images == 30 and report.errors == 0
    frame = pd.read_parquet(out)
    assert (frame[[f"std_n{i}" for i in range(10)]].to_numpy() == 0).all()  # mean field: S = 1
    metadata = read_metadata(out)
    assert metadata["method"] == "sngp" and metadata["passes"] == 1
    assert metadata["lambda"] == pytest.approx(math.pi / 8)
    assert metadata["num_inducing"] == 256 and metadata["sampled_layers"] == []

    sampled = tmp_path / "sngp_t5.parquet"
    score_directory(
        digits_subset,
        sampled,
        ScoreOptions(
            model=path, method=lambda loaded: SNGP(loaded.model, passes=5), rescale=1 / 255
        ),
    )
    assert read_metadata(sampled)["samples_per_image"] == 5
    assert pd.read_parquet(sampled)[[f"std_n{i}" for i in range(10)]].to_numpy().max() > 0


def test_sngp_refuses_models_without_a_gp_head_and_bad_settings(tiny, bn_model) -> None:
    assert not is_sngp_model(bn_model)
    with pytest.raises(ModelError, match="RandomFeatureGaussianProcess"):
        SNGP(bn_model)
    with pytest.raises(UsageError, match="Received: passes=0"):
        SNGP(tiny[0], passes=0)


def test_every_spectral_layer_of_the_bundled_model_is_within_its_bound_as_an_operator() -> None:
    """Measured independently (``operator_norm``), not by the layers' own power iteration."""
    from batchuq.models import load_models

    (loaded,) = load_models(REPO / "batchuq" / "data" / "digits_sngp.keras")
    layers = spectral_layers(loaded.model)
    # Every convolution and dense layer of the backbone is wrapped, so none escapes a bound.
    assert [layer.name for layer in layers] == ["conv1", "conv2", "conv3", "conv4", "dense"]
    for layer in layers:
        assert operator_norm(layer) <= layer.norm_multiplier * (1 + 1e-6), layer.name
