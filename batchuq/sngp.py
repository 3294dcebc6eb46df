"""SNGP layers for Keras 3: spectral normalisation with a bound, and a random-feature GP head.

The spectral-normalised neural Gaussian process (SNGP; Liu et al. 2020, and the TensorFlow
tutorial "Uncertainty-aware deep learning with SNGP") has four parts:

1. a distance-preserving feature map: residual blocks ``s(x) + f(x)`` whose branch ``f`` has
   its operator norm bounded by ``c < 1`` (``BoundedSpectralNormalizationConv2D`` for a
   convolution, as an operator on its input shape; ``BoundedSpectralNormalization`` for a
   dense layer) and whose shortcut ``s`` is an isometry (``ZeroPadShortcut``), so that
   distances between inputs survive into the hidden features (``sngp_cnn``: the reference
   CNN's backbone built that way);
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
import tensorflow as tf
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

    #: Relative margin ``enforce_bound`` leaves under the bound.
    bound_margin = 1e-6

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
        if sigma > self.norm_multiplier * (1.0 - self.bound_margin):
            # A hair under the bound, so that rounding (and for a convolution, what power
            # iteration has left) cannot land just above it.
            scale = self.norm_multiplier / sigma * (1.0 - self.bound_margin)
            self.kernel.assign(self.kernel.numpy() * np.float32(scale))

    def get_config(self) -> dict:
        """The wrapper's config plus ``norm_multiplier``."""
        return {**super().get_config(), "norm_multiplier": self.norm_multiplier}


@keras.saving.register_keras_serializable(package="batchuq")
class BoundedSpectralNormalizationConv2D(BoundedSpectralNormalization):
    """Spectral normalisation of a ``Conv2D`` as the linear operator it is, with a bound ``c``.

    The operator norm of a convolution is not the spectral norm of its kernel reshaped to
    ``(fan_in, units)``: every input pixel is read by up to ``kh * kw`` output positions, so
    the operator norm can be several times larger (it was 2.3 against a reshaped norm of 0.9
    on the previous bundled model). Here ``sigma`` is the largest singular value of the map
    ``x -> conv(x, kernel)`` on the layer's own input shape, with its strides, padding and
    dilation: power iteration through the convolution (``tf.nn.conv2d``) and its adjoint
    (``tf.nn.conv2d_transpose``), on a persistent input-shaped vector ``u (1, H, W, C_in)``,
    as in Miyato et al. 2018 and edward2's ``SpectralNormalizationConv2D`` (Gouk et al. 2021).
    The kernel is rescaled by ``c / sigma`` when ``sigma > c`` (the bias adds a constant, so
    it does not change the Lipschitz constant). ``enforce_bound`` runs the iteration to
    convergence at the end of training.

    Args:
        layer: A ``keras.layers.Conv2D`` (channels last, one group).
        norm_multiplier: The bound ``c`` on the operator norm.
        power_iterations: Power iterations per training step.
        **kwargs: Base wrapper keyword arguments.

    Raises:
        ValueError: If ``layer`` is not a channels-last, one-group ``Conv2D``, or (at build)
            the input's height and width are unknown.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        norm_multiplier: float = DEFAULT_NORM_MULTIPLIER,
        power_iterations: int = 1,
        **kwargs: object,
    ) -> None:
        if not isinstance(layer, keras.layers.Conv2D) or isinstance(
            layer, keras.layers.Conv2DTranspose
        ):
            raise ValueError(f"`layer` must be a keras.layers.Conv2D. Received: layer={layer!r}")
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise ValueError(
                "`layer` must be a channels-last Conv2D with one group. Received: "
                f"layer={layer.name!r} with data_format={layer.data_format!r}, "
                f"groups={layer.groups}"
            )
        super().__init__(layer, norm_multiplier, power_iterations, **kwargs)

    # Power iteration approaches sigma from below; 1e-4 covers what 3000 float64 iterations
    # can leave when the two largest singular values are close.
    bound_margin = 1e-4

    def build(self, input_shape: tuple) -> None:
        """Build the wrapped convolution and the input-shaped vector ``u (1, H, W, C_in)``."""
        height, width, channels = input_shape[1:]
        if height is None or width is None:
            raise ValueError(
                "The operator norm of a convolution depends on its input's height and width, "
                f"which must be known when the layer is built. Received: input_shape={input_shape}"
            )
        keras.layers.Wrapper.build(self, input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})
        self.kernel_shape = self.kernel.shape
        self.operator_input_shape = (1, int(height), int(width), int(channels))
        self.vector_u = self.add_weight(
            shape=self.operator_input_shape,
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            trainable=False,
            name="vector_u",
            dtype=self.kernel.dtype,
        )

    def _conv(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(
            x,
            kernel,
            strides=self.layer.strides,
            padding=self.layer.padding.upper(),
            dilations=self.layer.dilation_rate,
        )

    def _conv_adjoint(self, y: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d_transpose(
            y,
            kernel,
            output_shape=self.operator_input_shape,
            strides=self.layer.strides,
            padding=self.layer.padding.upper(),
            dilations=self.layer.dilation_rate,
        )

    def _power_step(self, vector_u: tf.Tensor, kernel: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One step: ``u <- A^T A u / ||A^T A u||``, and ``sigma = ||A u||`` at the new ``u``."""
        vector_v = _l2_normalize(self._conv(vector_u, kernel))
        vector_u = _l2_normalize(self._conv_adjoint(vector_v, kernel))
        return vector_u, tf.norm(self._conv(vector_u, kernel))

    def normalized_weights(self) -> tuple[object, object]:
        """The updated vector ``u (1, H, W, C_in)`` and the kernel bounded to ``c``."""
        kernel = tf.convert_to_tensor(self.kernel)
        vector_u = tf.convert_to_tensor(self.vector_u)
        for _ in range(self.power_iterations):
            vector_u, sigma = self._power_step(vector_u, kernel)
        vector_u, sigma = tf.stop_gradient(vector_u), tf.stop_gradient(sigma)
        factor = tf.minimum(1.0, self.norm_multiplier / tf.maximum(sigma, _EPSILON))
        return tf.cast(vector_u, self.vector_u.dtype), tf.cast(kernel * factor, self.kernel.dtype)

    def spectral_norm(self, max_iterations: int = 3000, rtol: float = 1e-9) -> float:
        """The operator norm of the convolution on its input shape: power iteration in float64
        from the persistent ``u`` until ``sigma`` changes by less than ``rtol`` over 50 steps.

        Power iteration approaches the largest singular value from below; ``enforce_bound``
        leaves a margin (``bound_margin``) for what is left.
        """
        kernel = tf.constant(self.kernel.numpy(), tf.float64)
        vector_u = _l2_normalize(tf.constant(self.vector_u.numpy(), tf.float64))
        run = tf.function(self._power_steps, reduce_retracing=True)
        previous = 0.0
        for _ in range(0, max_iterations, 50):
            vector_u, sigma = run(vector_u, kernel, tf.constant(50))
            sigma = float(sigma)
            if abs(sigma - previous) <= rtol * sigma:
                break
            previous = sigma
        return sigma

    def _power_steps(
        self, vector_u: tf.Tensor, kernel: tf.Tensor, steps: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        sigma = tf.constant(0.0, kernel.dtype)
        for _ in tf.range(steps):
            vector_u, sigma = self._power_step(vector_u, kernel)
        return vector_u, sigma


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


@keras.saving.register_keras_serializable(package="batchuq")
class ZeroPadShortcut(keras.layers.Layer):
    """The shortcut of a residual block whose branch changes the shape: crop, then zero-pad.

    ``crop`` pixels come off each side of an ``(H, W, C)`` map (the border a 3x3 convolution
    with valid padding drops), and zero channels (or features, for ``(d,)`` inputs) are
    appended up to ``units``. So the shortcut is an isometry from the cropped input into the
    branch's output space (ResNet's parameter-free "option A" shortcut): ``||s(x) - s(x')||``
    is exactly the distance of the cropped inputs, and a block ``s(x) + f(x)`` with a
    ``c``-Lipschitz branch keeps distances within ``(1 - c)`` and ``(1 + c)`` of it.

    Args:
        units: Channels (features) of the output; at least the input's.
        crop: Pixels cropped from each side of a 4-D input (0 for none; 2-D inputs need 0).
        **kwargs: Base layer keyword arguments.
    """

    def __init__(self, units: int, crop: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if crop < 0:
            raise ValueError(f"`crop` must be at least 0. Received: crop={crop}")
        self.units = int(units)
        self.crop = int(crop)

    def build(self, input_shape: tuple) -> None:
        """Check that the input fits: no more channels than ``units``, crop only on maps."""
        if input_shape[-1] > self.units:
            raise ValueError(
                f"`units` must be at least the input's {input_shape[-1]} channels. "
                f"Received: units={self.units}"
            )
        if self.crop and len(input_shape) != 4:
            raise ValueError(
                f"`crop` needs (batch, H, W, C) inputs. Received: input_shape={input_shape}"
            )

    def call(self, inputs: object) -> object:
        """Crop, then append zero channels."""
        if self.crop:
            inputs = inputs[:, self.crop : -self.crop, self.crop : -self.crop, :]
        missing = self.units - inputs.shape[-1]
        if missing:
            pad = [[0, 0]] * (len(inputs.shape) - 1) + [[0, missing]]
            inputs = ops.pad(inputs, pad)
        return inputs

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """The cropped spatial size and ``units`` channels."""
        shape = list(input_shape)
        for axis in (1, 2) if self.crop else ():
            if shape[axis] is not None:
                shape[axis] -= 2 * self.crop
        return (*shape[:-1], self.units)

    def get_config(self) -> dict:
        """``units`` and ``crop``."""
        return {**super().get_config(), "units": self.units, "crop": self.crop}


#: ``sngp_cnn``'s GP length scale: its features are not layer-normalised, and test digits sit
#: about 0.4-1 from their nearest training digit in them (photo crops 1.4 and more).
SNGP_CNN_LENGTH_SCALE = 1.0
#: ``sngp_cnn``'s bound on the stem's operator norm (the residual branches have ``c < 1``).
SNGP_CNN_STEM_BOUND = 4.0


def _residual_conv_block(x: object, filters: int, name: str, norm_multiplier: float) -> object:
    """``shortcut(x) + relu(SN(conv3x3, valid)(x))``: the reference CNN's convolution, with a
    ``c``-Lipschitz branch and an isometric shortcut (crop 1, zero channels up to ``filters``)."""
    conv = keras.layers.Conv2D(filters, 3, activation="relu", name=f"{name}_kernel")
    branch = BoundedSpectralNormalizationConv2D(conv, norm_multiplier, name=name)(x)
    shortcut = ZeroPadShortcut(filters, crop=1, name=f"{name}_shortcut")(x)
    return keras.layers.Add(name=f"{name}_add")([shortcut, branch])


def sngp_cnn(
    spec: ImageSpec,
    classes: int,
    width: int = 32,
    hidden: int = 512,
    num_inducing: int = DEFAULT_NUM_INDUCING,
    norm_multiplier: float = DEFAULT_NORM_MULTIPLIER,
    ridge_penalty: float = DEFAULT_RIDGE_PENALTY,
    length_scale: float = SNGP_CNN_LENGTH_SCALE,
    normalize_input: bool = False,
    stem_bound: float = SNGP_CNN_STEM_BOUND,
) -> keras.Model:
    """Build SNGP on the reference CNN's backbone (uncompiled; train it with ``SNGPCallback``).

    The reference CNN of ``batchuq train`` (``Conv32-Pool-Conv32-Pool-Conv64-Pool-Conv64-Pool-
    Flatten-Dense512``, 3x3 valid convolutions, 2x2 max pooling), with the same layer shapes,
    made distance-preserving:

    * the first convolution (the stem, image to ``width`` channels) is spectrally normalised
      as an operator with its own bound ``stem_bound`` and is not residual: a residual stem
      carries the raw image on and adds at most ``c`` times it, and left the network less
      accurate (93.3% test accuracy against 95.8%, one 100-epoch run each; the bundled
      model's stem ends at 2.3, under its bound of 4);
    * every other convolution is the branch of a residual block ``s(x) + relu(SN(conv)(x))``,
      its operator norm bounded by ``norm_multiplier`` (``BoundedSpectralNormalizationConv2D``),
      and ``s`` the isometric ``ZeroPadShortcut`` (crop the 1-pixel border the valid
      convolution drops, zero channels where the width grows);
    * the dense layer likewise: ``s(h) + relu(SN(dense)(h))`` with zero features appended;
    * nothing else sits in a branch: no batch normalisation (its ``gamma / sqrt(var)`` scales
      the branch by an unbounded factor) and no dropout (the GP precision of the last epoch
      would then be accumulated from features the scorer never sees);
    * max pooling between the blocks, as in the reference (1-Lipschitz);
    * the softmax layer is replaced by the GP output layer.

    Args:
        spec: Input height, width and channels (``channel_axis=False``: ``(H, W)`` inputs).
        classes: Output logits.
        width: Filters of the first two convolutions (``2 width`` for the last two).
        hidden: Units of the dense layer (the GP's input dimension d).
        num_inducing: Random Fourier features of the GP layer.
        norm_multiplier: Bound c on each branch's operator norm (below 1).
        ridge_penalty: The GP layer's ridge penalty.
        length_scale: The GP kernel's length scale, in the units of the dense layer's output.
        normalize_input: Layer-normalise the GP's input (off by default: it throws the
            features' norm away, and with it the distance of inputs that only differ by it).
        stem_bound: Bound on the first convolution's operator norm.

    Returns:
        A functional model mapping images ``(batch, H, W, C)`` to MAP logits
        ``(batch, classes)``; its last layer is the ``RandomFeatureGaussianProcess`` "gp".

    Raises:
        ValueError: If ``norm_multiplier`` is not below 1 (a residual block then no longer
            keeps distances from below), the input is too small for four valid 3x3
            convolutions and poolings (as for the reference CNN), or ``hidden`` is smaller
            than the flattened last map.
    """
    if not 0 < norm_multiplier < 1:
        raise ValueError(
            "`norm_multiplier` must be in (0, 1) for residual blocks that keep distances. "
            f"Received: norm_multiplier={norm_multiplier}"
        )
    if spec.channel_axis:
        inputs = keras.Input((spec.height, spec.width, spec.channels), name="image")
        x = inputs
    else:  # an (H, W) model: give the convolutions their one channel
        inputs = keras.Input((spec.height, spec.width), name="image")
        x = keras.layers.Reshape((spec.height, spec.width, 1), name="channel")(inputs)
    for index, filters in enumerate((width, width, 2 * width, 2 * width), start=1):
        if min(x.shape[1:3]) < 4:
            raise ValueError(
                "The input is too small for the reference CNN's four 3x3 convolutions and "
                f"2x2 poolings. Received: spec={spec}"
            )
        if index == 1:  # the stem: bounded, not residual (see above)
            conv = keras.layers.Conv2D(filters, 3, activation="relu", name="conv1_kernel")
            x = BoundedSpectralNormalizationConv2D(conv, stem_bound, name="conv1")(x)
        else:
            x = _residual_conv_block(x, filters, f"conv{index}", norm_multiplier)
        x = keras.layers.MaxPooling2D(name=f"pool{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if hidden < x.shape[-1]:
        raise ValueError(
            f"`hidden` must be at least the {x.shape[-1]} values of the flattened last map "
            f"(the dense block's shortcut keeps them all). Received: hidden={hidden}"
        )
    dense = keras.layers.Dense(hidden, activation="relu", name="dense_kernel")
    branch = BoundedSpectralNormalization(dense, norm_multiplier, name="dense")(x)
    shortcut = ZeroPadShortcut(hidden, name="dense_shortcut")(x)
    x = keras.layers.Add(name="dense_add")([shortcut, branch])
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
