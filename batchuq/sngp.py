"""SNGP layers for Keras 3: spectral normalisation with a bound, and a random-feature GP head.

The spectral-normalised neural Gaussian process (SNGP; Liu et al. 2020, and the TensorFlow
tutorial "Uncertainty-aware deep learning with SNGP") has four parts:

1. spectral normalisation of the hidden layers (``BoundedSpectralNormalization``), so that
   distances between inputs survive into the hidden features;
2. a Gaussian-process output layer approximated by random Fourier features
   (``RandomFeatureGaussianProcess``): ``phi(h) = sqrt(2 / M) cos(h W + b)`` with
   ``W ~ N(0, 1 / l^2)`` and ``b ~ U(0, 2 pi)`` fixed, and trainable output weights ``beta``,
   so the MAP logits are ``phi(h) beta``;
3. a Laplace posterior: the precision ``P = ridge I + sum phi phi^T`` over the last training
   epoch (reset at each epoch start by ``SNGPCallback``), and the posterior variance
   ``var(h) = ridge * phi(h)^T P^-1 phi(h)`` per example, shared across classes;
4. mean-field probabilities ``softmax(logits / sqrt(1 + lambda var))`` (``mean_field_logits``).

Design: the GP layer's ``call`` always returns the MAP logits ``(batch, units)`` (training and
inference alike, so the model's output shape never changes and ``fit`` trains it with a
from-logits loss); with ``training=True`` it also adds the batch's ``phi phi^T`` to the
precision. The variance is a separate step, ``mean_and_variance(h, covariance)``, on the GP
layer's *input* ``h``: a scorer runs the network up to ``h`` once per row and then only the head
(``batchuq.methods.sngp``). Every weight (random features, output weights, precision) is a
layer weight, so a ``.keras`` file holds the last epoch's precision and loads with
``safe_mode=True`` in any process that has imported this module (the layers register
themselves under the package name ``batchuq``).

Keras 2 implementations (edward2, TF Model Garden) were a reference for the maths only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

from batchuq.decode import ImageSpec
from batchuq.defaults import (
    DEFAULT_LENGTH_SCALE,
    DEFAULT_MEAN_FIELD_LAMBDA,
    DEFAULT_NORM_MULTIPLIER,
    DEFAULT_NUM_INDUCING,
    DEFAULT_RIDGE_PENALTY,
)
from batchuq.keras_private import flatten_layers

_EPSILON = 1e-12


def _l2_normalize(x: object) -> object:
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x)), _EPSILON))


@keras.saving.register_keras_serializable(package="batchuq")
class BoundedSpectralNormalization(keras.layers.SpectralNormalization):
    """Keras's ``SpectralNormalization`` with a bound ``c``: ``W / max(1, sigma(W) / c)``.

    Keras 3's wrapper always rescales the kernel to spectral norm 1 and has no
    ``norm_multiplier``; SNGP's residual blocks ``x + f(x)`` want ``||f|| <= c < 1`` so that
    they keep distances from both sides (the tutorial uses ``c = 0.9``), and a kernel already
    below the bound is left alone. ``sigma`` is the largest singular value of the kernel
    reshaped to ``(fan_in, units)``, estimated by power iteration during training (as in
    Keras). The optimizer's last step can move the kernel past the bound after the last
    normalisation: ``enforce_bound`` (called by ``SNGPCallback`` at the end of training)
    rescales it by the exact singular value.

    Args:
        layer: A layer with a ``kernel`` (``Dense``, ``Conv2D``, ...).
        norm_multiplier: The bound ``c`` on the spectral norm.
        power_iterations: Power iterations per training step.
        **kwargs: Base wrapper keyword arguments.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        norm_multiplier: float = DEFAULT_NORM_MULTIPLIER,
        power_iterations: int = 1,
        **kwargs: object,
    ) -> None:
        super().__init__(layer, power_iterations=power_iterations, **kwargs)
        if norm_multiplier <= 0:
            raise ValueError(
                f"`norm_multiplier` must be positive. Received: norm_multiplier={norm_multiplier}"
            )
        self.norm_multiplier = float(norm_multiplier)

    @property
    def kernel(self) -> keras.Variable:
        """The wrapped layer's kernel (a property, so that only that layer saves it)."""
        return self.layer.kernel

    def build(self, input_shape: tuple) -> None:
        """Build the wrapped layer and the power-iteration vector ``u (1, units)``.

        Keras's own ``build`` also tracks the wrapped kernel as a weight of the wrapper, so a
        ``.keras`` file holds every normalised kernel twice; here the wrapper only owns ``u``.
        """
        keras.layers.Wrapper.build(self, input_shape)
        self.input_spec = keras.layers.InputSpec(min_ndim=1, axes={-1: input_shape[-1]})
        self.kernel_shape = self.kernel.shape
        self.vector_u = self.add_weight(
            shape=(1, self.kernel_shape[-1]),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            trainable=False,
            name="vector_u",
            dtype=self.kernel.dtype,
        )

    def normalized_weights(self) -> tuple[object, object]:
        """The updated power-iteration vector ``(1, units)`` and the bounded kernel."""
        weights = ops.reshape(self.kernel, [-1, self.kernel_shape[-1]])  # (fan_in, units)
        vector_u = self.vector_u.value
        for _ in range(self.power_iterations):
            vector_v = _l2_normalize(ops.matmul(vector_u, ops.transpose(weights)))
            vector_u = _l2_normalize(ops.matmul(vector_v, weights))
        vector_u = ops.stop_gradient(vector_u)
        vector_v = ops.stop_gradient(vector_v)
        sigma = ops.matmul(ops.matmul(vector_v, weights), ops.transpose(vector_u))  # (1, 1)
        factor = ops.minimum(1.0, self.norm_multiplier / ops.maximum(sigma, _EPSILON))
        kernel = ops.reshape(self.kernel * factor, self.kernel_shape)
        return ops.cast(vector_u, self.vector_u.dtype), ops.cast(kernel, self.kernel.dtype)

    def spectral_norm(self) -> float:
        """The exact largest singular value of the kernel reshaped to ``(fan_in, units)``."""
        weights = np.asarray(self.kernel.numpy(), np.float64).reshape(-1, self.kernel_shape[-1])
        return float(np.linalg.norm(weights, 2))

    def enforce_bound(self) -> None:
        """Rescale the kernel so that its exact spectral norm is at most ``norm_multiplier``."""
        sigma = self.spectral_norm()
        if sigma > self.norm_multiplier:
            # A hair under the bound, so float32 rounding cannot land just above it.
            scale = self.norm_multiplier / sigma * (1.0 - 1e-6)
            self.kernel.assign(self.kernel.numpy() * np.float32(scale))

    def get_config(self) -> dict:
        """The wrapper's config plus ``norm_multiplier``."""
        return {**super().get_config(), "norm_multiplier": self.norm_multiplier}


@keras.saving.register_keras_serializable(package="batchuq")
class RandomFeatureGaussianProcess(keras.layers.Layer):
    """GP output layer: random Fourier features, trainable output weights, Laplace precision.

    Args:
        units: Output logits (classes).
        num_inducing: M, random Fourier features.
        ridge_penalty: The prior precision of the output weights: ``P`` starts at
            ``ridge_penalty * I``, and the covariance is ``ridge_penalty * P^-1``.
        length_scale: l of the RBF kernel: ``W ~ N(0, 1 / l^2)``.
        l2_regularization: L2 penalty on the output weights (0 for none).
        normalize_input: Layer-normalise the inputs first (edward2's default): the kernel then
            sees features of a known scale, whatever the scale the network learns.
        **kwargs: Base layer keyword arguments.

    Call args:
        inputs: Hidden features ``(batch, d)``.
        training: With ``True``, ``phi^T phi`` of the batch is added to the precision.

    Returns (call):
        MAP logits ``(batch, units)``.
    """

    def __init__(
        self,
        units: int,
        num_inducing: int = DEFAULT_NUM_INDUCING,
        ridge_penalty: float = DEFAULT_RIDGE_PENALTY,
        length_scale: float = DEFAULT_LENGTH_SCALE,
        l2_regularization: float = 1e-6,
        normalize_input: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("units", units), ("num_inducing", num_inducing)):
            if value < 1:
                raise ValueError(f"`{name}` must be at least 1. Received: {name}={value}")
        for name, value in (("ridge_penalty", ridge_penalty), ("length_scale", length_scale)):
            if value <= 0:
                raise ValueError(f"`{name}` must be positive. Received: {name}={value}")
        self.units = int(units)
        self.num_inducing = int(num_inducing)
        self.ridge_penalty = float(ridge_penalty)
        self.length_scale = float(length_scale)
        self.l2_regularization = float(l2_regularization)
        self.normalize_input = bool(normalize_input)
        self.input_norm = (
            keras.layers.LayerNormalization(name="input_norm") if normalize_input else None
        )
        regularizer = keras.regularizers.L2(l2_regularization) if l2_regularization else None
        self.output_dense = keras.layers.Dense(
            units, use_bias=False, kernel_regularizer=regularizer, name="output_dense"
        )

    def build(self, input_shape: tuple) -> None:
        """Create the fixed features ``W (d, M)``, ``b (M,)``, the output and the precision."""
        m = self.num_inducing
        self.feature_kernel = self.add_weight(
            shape=(input_shape[-1], m),
            initializer=keras.initializers.RandomNormal(stddev=1.0 / self.length_scale),
            trainable=False,
            name="feature_kernel",
        )
        self.feature_bias = self.add_weight(
            shape=(m,),
            initializer=keras.initializers.RandomUniform(0.0, 2.0 * math.pi),
            trainable=False,
            name="feature_bias",
        )
        self.output_dense.build((None, m))
        if self.input_norm is not None:
            self.input_norm.build(input_shape)
        # Always float32: it sums thousands of outer products.
        self.precision = self.add_weight(
            shape=(m, m),
            initializer=keras.initializers.Identity(gain=self.ridge_penalty),
            trainable=False,
            name="precision",
            dtype="float32",
        )

    def random_features(self, inputs: object) -> object:
        """``phi = sqrt(2 / M) cos(h W + b)``: ``(batch, d)`` to ``(batch, M)``."""
        if self.input_norm is not None:
            inputs = self.input_norm(inputs)
        projection = ops.matmul(inputs, self.feature_kernel) + self.feature_bias
        return math.sqrt(2.0 / self.num_inducing) * ops.cos(projection)

    def call(self, inputs: object, training: bool | None = None) -> object:
        """MAP logits ``(batch, units)``; in training also accumulate the precision."""
        features = self.random_features(inputs)
        if training:
            phi = ops.cast(ops.stop_gradient(features), "float32")
            self.precision.assign_add(ops.matmul(ops.transpose(phi), phi))
        return self.output_dense(features)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """``(..., units)``."""
        return (*input_shape[:-1], self.units)

    def reset_precision(self) -> None:
        """Set the precision back to the prior ``ridge_penalty * I`` (at each epoch start)."""
        self.precision.assign(np.eye(self.num_inducing, dtype=np.float32) * self.ridge_penalty)

    def covariance(self) -> np.ndarray:
        """The posterior covariance of the output weights, ``ridge * P^-1``, ``(M, M)`` float32.

        Inverted once in float64 (the precision's condition number grows with the data), so a
        scorer computes it once and passes it to ``mean_and_variance`` for every batch.
        """
        precision = np.asarray(self.precision.numpy(), np.float64)
        precision = 0.5 * (precision + precision.T)  # exactly symmetric for the solve
        identity = np.eye(self.num_inducing)
        covariance = np.linalg.solve(precision, identity) * self.ridge_penalty
        return covariance.astype(np.float32)

    def mean_and_variance(
        self, inputs: object, covariance: object | None = None
    ) -> tuple[object, object]:
        """MAP logits and posterior variance of hidden features, in inference mode.

        Args:
            inputs: Hidden features ``(batch, d)`` (this layer's input).
            covariance: ``covariance()``, computed once by the caller; ``None`` computes it.

        Returns:
            float32 logits ``(batch, units)`` and variance ``(batch,)``:
            ``var = phi^T (ridge P^-1) phi``, shared by every class.
        """
        if covariance is None:
            covariance = self.covariance()
        features = ops.cast(self.random_features(inputs), "float32")
        logits = ops.cast(self.output_dense(features), "float32")
        variance = ops.sum(ops.matmul(features, covariance) * features, axis=-1)
        return logits, variance

    def get_config(self) -> dict:
        """Constructor arguments (the weights are saved separately)."""
        return {
            **super().get_config(),
            "units": self.units,
            "num_inducing": self.num_inducing,
            "ridge_penalty": self.ridge_penalty,
            "length_scale": self.length_scale,
            "l2_regularization": self.l2_regularization,
            "normalize_input": self.normalize_input,
        }


def mean_field_logits(
    logits: object, variance: object, lambda_: float = DEFAULT_MEAN_FIELD_LAMBDA
) -> object:
    """Mean-field logits ``logits / sqrt(1 + lambda var)``; their softmax approximates E[softmax].

    Args:
        logits: ``(batch, classes)``.
        variance: ``(batch,)`` posterior variance, shared across classes.
        lambda_: The mean-field factor (pi / 8 is the probit approximation's).

    Returns:
        ``(batch, classes)``.
    """
    return logits / ops.sqrt(1.0 + lambda_ * variance)[:, None]


def gp_layers(model: keras.layers.Layer) -> list[RandomFeatureGaussianProcess]:
    """Every ``RandomFeatureGaussianProcess`` inside ``model`` (nested models too)."""
    return [
        layer
        for layer in flatten_layers(model, include_self=True)
        if isinstance(layer, RandomFeatureGaussianProcess)
    ]


def spectral_layers(model: keras.layers.Layer) -> list[BoundedSpectralNormalization]:
    """Every ``BoundedSpectralNormalization`` wrapper inside ``model``."""
    return [
        layer
        for layer in flatten_layers(model, include_self=True)
        if isinstance(layer, BoundedSpectralNormalization)
    ]


def is_sngp_model(model: keras.layers.Layer) -> bool:
    """Whether the model has a GP output layer (detected from the layer, not from a flag)."""
    return bool(gp_layers(model))


class SNGPCallback(keras.callbacks.Callback):
    """What ``fit`` must do for SNGP: reset every GP precision at each epoch start, and bound
    every spectral norm at the end of training.

    So the trained model keeps the precision of its last epoch only (the Laplace
    approximation at the final weights, as near as one epoch of changing weights allows).
    """

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Reset the precision of every GP layer to ``ridge * I``."""
        for layer in gp_layers(self.model):
            layer.reset_precision()

    def on_train_end(self, logs: dict | None = None) -> None:
        """Rescale every kernel the optimizer's last steps moved past its bound."""
        for layer in spectral_layers(self.model):
            layer.enforce_bound()


def _residual_block(x: object, filters: int, name: str, norm_multiplier: float) -> object:
    """``x + relu(SN(conv3x3)(x))``: a block that keeps distances (its branch is c-Lipschitz)."""
    conv = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")
    branch = BoundedSpectralNormalization(conv, norm_multiplier, name=f"{name}_conv")(x)
    return keras.layers.Add(name=f"{name}_add")([x, branch])


def _sn_conv(x: object, filters: int, name: str, norm_multiplier: float) -> object:
    """A spectral-normalised 3x3 convolution with stride 2 (halves height and width)."""
    conv = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")
    return BoundedSpectralNormalization(conv, norm_multiplier, name=name)(x)


def sngp_cnn(
    spec: ImageSpec,
    classes: int,
    width: int = 32,
    hidden: int = 128,
    num_inducing: int = DEFAULT_NUM_INDUCING,
    norm_multiplier: float = DEFAULT_NORM_MULTIPLIER,
    ridge_penalty: float = DEFAULT_RIDGE_PENALTY,
    length_scale: float = DEFAULT_LENGTH_SCALE,
    normalize_input: bool = True,
) -> keras.Model:
    """Build a small residual SNGP CNN (uncompiled; train it with ``SNGPCallback``).

    An unnormalised stem (convolution and 2x2 max pooling), then spectral-normalised layers:
    a residual block, a stride-2 convolution to ``2 width`` filters, a residual block, and two
    stride-2 convolutions (``2 width``, then ``width // 2`` filters); the
    ``(H / 16, W / 16, width // 2)`` map is flattened (not averaged) into a spectral-normalised
    dense layer of ``hidden`` units, and the GP output layer. Every hidden kernel has spectral
    norm at most ``norm_multiplier``.

    Why flatten: global average pooling of these small bounded maps keeps little more than the
    amount of ink per channel; the hidden features of different digits then differ by a tiny
    fraction of their norm, and the model (GP head or plain dense head alike) stayed at chance.
    Flattening a 4x4 map keeps where the strokes are, and distances between digits with it.

    Args:
        spec: Input height, width and channels (``channel_axis=False``: ``(H, W)`` inputs).
        classes: Output logits.
        width: Filters of the stem (``2 width`` in the middle, ``width // 2`` at the end).
        hidden: Units of the last hidden layer (the GP's input dimension d).
        num_inducing: Random Fourier features of the GP layer.
        norm_multiplier: Bound on each hidden layer's spectral norm.
        ridge_penalty: The GP layer's ridge penalty.
        length_scale: The GP kernel's length scale (on layer-normalised features, whose norm
            is about ``sqrt(hidden)``, with ``normalize_input``).
        normalize_input: Layer-normalise the GP's input (the bounded layers shrink features
            to a scale the kernel cannot tell apart).

    Returns:
        A functional model mapping images ``(batch, H, W, C)`` to MAP logits
        ``(batch, classes)``; its last layer is the ``RandomFeatureGaussianProcess`` "gp".
    """
    if spec.channel_axis:
        inputs = keras.Input((spec.height, spec.width, spec.channels), name="image")
        x = inputs
    else:  # an (H, W) model: give the convolutions their one channel
        inputs = keras.Input((spec.height, spec.width), name="image")
        x = keras.layers.Reshape((spec.height, spec.width, 1), name="channel")(inputs)
    # The stem is not normalised, like the tutorial's input layer: it sets the scale of the
    # features, which the bounded layers after it then keep (residual blocks) or shrink.
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="stem")(x)
    x = keras.layers.MaxPooling2D(name="stem_pool")(x)
    x = _residual_block(x, width, "block1", norm_multiplier)
    x = _sn_conv(x, 2 * width, "conv2", norm_multiplier)
    x = _residual_block(x, 2 * width, "block2", norm_multiplier)
    x = _sn_conv(x, 2 * width, "conv3", norm_multiplier)
    # Few filters at 4x4: the flattened map, hence the dense layer, stays small.
    x = _sn_conv(x, max(1, width // 2), "conv4", norm_multiplier)
    x = keras.layers.Flatten(name="flatten")(x)
    dense = keras.layers.Dense(hidden, activation="relu")
    x = BoundedSpectralNormalization(dense, norm_multiplier, name="hidden")(x)
    outputs = RandomFeatureGaussianProcess(
        classes,
        num_inducing=num_inducing,
        ridge_penalty=ridge_penalty,
        length_scale=length_scale,
        normalize_input=normalize_input,
        name="gp",
    )(x)
    return keras.Model(inputs, outputs, name="sngp_cnn")


def iter_spectral_norms(model: keras.Model) -> Iterator[tuple[str, float, float]]:
    """``(layer name, exact spectral norm, bound)`` of every bounded layer (for checks)."""
    for layer in spectral_layers(model):
        yield layer.name, layer.spectral_norm(), layer.norm_multiplier
