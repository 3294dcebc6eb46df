"""``batchuq train``: fit the reference CNN of the 10-monkey-species post on class folders.

Architecture (Keras defaults: 3x3 kernels, valid padding, 2x2 pooling)::

    Conv32-Pool-Conv32-Pool-Dropout0.5-Conv64-Pool-Conv64-Pool-Dropout0.5-
    Flatten-Dense512-Dropout0.3-Dense(classes, softmax)

trained with Adam on categorical cross-entropy. The class-name sidecar written beside the model
lets ``batchuq score`` name the output columns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from batchuq.decode import ImageSpec, describe_error, load_image
from batchuq.defaults import (
    DEFAULT_EPOCHS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_INDUCING,
    DEFAULT_RESCALE,
    DEFAULT_SEED,
    DEFAULT_TRAIN_BATCH_SIZE,
    DEFAULT_VAL_SPLIT,
)
from batchuq.discover import discover_images
from batchuq.errors import UsageError
from batchuq.models import write_ensemble_manifest, write_sidecar
from batchuq.sngp import SNGPCallback, sngp_cnn

logger = logging.getLogger("batchuq")


def reference_cnn(spec: ImageSpec, num_classes: int) -> keras.Model:
    """Build the reference CNN (uncompiled).

    Args:
        spec: Input height, width and channels.
        num_classes: Size of the softmax output.

    Returns:
        A functional Keras model mapping ``(batch, H, W, C)`` to ``(batch, num_classes)``.
    """
    layers = keras.layers
    inputs = keras.Input((spec.height, spec.width, spec.channels), name="image")
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Dropout(0.5, name="dropout1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(name="pool3")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv4")(x)
    x = layers.MaxPooling2D(name="pool4")(x)
    x = layers.Dropout(0.5, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    x = layers.Dropout(0.3, name="dropout3")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="reference_cnn")


#: The networks ``batchuq train`` can build, by ``--method``.
ARCHITECTURES = {"reference": reference_cnn, "sngp": sngp_cnn}


@dataclass(frozen=True)
class TrainReport:
    """What ``train_directory`` did."""

    model_path: Path
    class_names: list[str]
    train_images: int
    val_images: int
    val_accuracy: float | None


def _load_arrays(
    files: list, spec: ImageSpec, classes: list[str], exif_transpose: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        try:
            images.append(load_image(f.path, spec, exif_transpose=exif_transpose))
        except Exception as exc:  # noqa: BLE001 - skip unreadable training images
            logger.warning("skipping %s: %s", f.relative_path, describe_error(exc))
            continue
        labels.append(classes.index(f.folder_label))
    return np.stack(images), np.asarray(labels, np.int64)


@dataclass(frozen=True)
class TrainOptions:
    """How ``batchuq train`` fits a network.

    Attributes:
        epochs: Training epochs.
        image_size: ``(height, width)`` of the model input (a number: a square).
        channels: 1 (grayscale) or 3 (RGB).
        val_split: Fraction of images held out (stratified) to report validation accuracy.
        batch_size: Training batch size.
        learning_rate: Adam learning rate.
        augment: Random rotation/zoom/translation of training images.
        rescale: Factor applied to pixel values ``0..255``; stored in the sidecar.
        seed: Seed for the split, initial weights, shuffling and augmentation (member ``i`` of
            an ensemble: ``seed + i``).
        verbose: Keras ``fit`` verbosity.
        exif_transpose: Turn training images upright by their EXIF orientation; recorded in
            the sidecar, so that ``batchuq score`` reads images the same way.
        method: ``reference`` (the reference CNN, scored with MC dropout) or ``sngp`` (a
            spectral-normalised residual CNN with a GP head, ``batchuq.sngp.sngp_cnn``; it
            outputs logits and ``score`` detects it from its GP layer).
        num_inducing: SNGP: random Fourier features of the GP head (its precision matrix,
            saved in the file, has ``num_inducing**2`` entries).

    Raises:
        UsageError: For a value out of range or an unknown method.
    """

    epochs: int = DEFAULT_EPOCHS
    image_size: tuple[int, int] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    channels: int = 3
    val_split: float = DEFAULT_VAL_SPLIT
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE
    learning_rate: float = 1e-3
    augment: bool = True
    rescale: float = DEFAULT_RESCALE
    seed: int = DEFAULT_SEED
    verbose: int = 2
    exif_transpose: bool = False
    method: str = "reference"
    num_inducing: int = DEFAULT_NUM_INDUCING

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        else:
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if not 0.0 <= self.val_split < 1.0:
            raise UsageError(f"`val_split` must be in [0, 1). Received: val_split={self.val_split}")
        if self.epochs < 1:
            raise UsageError(f"`epochs` must be at least 1. Received: epochs={self.epochs}")
        if self.channels not in (1, 3):
            raise UsageError(f"`channels` must be 1 or 3. Received: channels={self.channels}")
        if self.method not in ARCHITECTURES:
            raise UsageError(
                f"`method` must be one of {sorted(ARCHITECTURES)}. Received: method={self.method!r}"
            )


def train_directory(
    images: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    options: TrainOptions | None = None,
) -> TrainReport:
    """Train the reference CNN (or an SNGP network) on a class-folder tree and save it with its
    sidecar.

    Args:
        images: Folder with one subfolder per class.
        model_path: Where to write the ``.keras`` model.
        options: How to train (default: ``TrainOptions()``).

    Returns:
        A ``TrainReport``.

    Raises:
        UsageError: If the folder has fewer than two classes or the model path does not end in
            ``.keras``.
    """
    options = options if options is not None else TrainOptions()
    if not str(model_path).endswith(".keras"):
        raise UsageError(f"The model path must end in .keras. Received: model={str(model_path)!r}")
    discovery = discover_images(images)
    classes = discovery.class_folders
    if len(classes) < 2:
        raise UsageError(
            "Training needs a folder with at least two class subfolders. "
            f"Received: images={str(images)!r} with classes={classes}"
        )
    o = options
    spec = ImageSpec(o.image_size[0], o.image_size[1], o.channels)
    labelled = [f for f in discovery.files if f.folder_label is not None]
    x, y = _load_arrays(labelled, spec, classes, o.exif_transpose)
    keras.utils.set_random_seed(o.seed)
    val_mask = _stratified_holdout(y, len(classes), o.val_split, o.seed)
    train_ds, val_ds = _datasets(
        x, y, val_mask, len(classes), o.batch_size, augment=o.augment, rescale=o.rescale,
        seed=o.seed,
    )  # fmt: skip
    build = ARCHITECTURES[o.method]
    if o.method == "sngp":
        build = functools.partial(sngp_cnn, num_inducing=o.num_inducing)
    model = build(spec, len(classes))
    sngp = o.method == "sngp"  # its head outputs logits, and its GP precision needs a callback
    model.compile(
        optimizer=keras.optimizers.Adam(o.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(from_logits=sngp),
        metrics=["accuracy"],
    )
    # shuffle=False: train_ds shuffles itself (Keras ignores, and warns about, shuffle=True here).
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=o.epochs,
        verbose=o.verbose,
        shuffle=False,
        callbacks=[SNGPCallback()] if sngp else None,
    )
    val_accuracy = history.history.get("val_accuracy", [None])[-1]

    # Save an uncompiled copy: no optimizer state, a smaller file, nothing to trust but weights
    # (and, for SNGP, the GP precision of the last epoch, a non-trainable weight).
    export = build(spec, len(classes))
    export.set_weights(model.get_weights())
    export.save(model_path)
    write_sidecar(
        model_path,
        classes,
        method=o.method,
        rescale=o.rescale,
        exif_transpose=o.exif_transpose,
        image_size=[spec.height, spec.width],
        channels=spec.channels,
        trained_on=str(images),
        val_accuracy=val_accuracy,
    )
    n_val = int(val_mask.sum())
    return TrainReport(Path(model_path), classes, len(y) - n_val, n_val, val_accuracy)


def _stratified_holdout(y: np.ndarray, classes: int, val_split: float, seed: int) -> np.ndarray:
    """``(images,)`` bool: the images held out for validation, ``val_split`` of each class."""
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(len(y), bool)
    for c in range(classes):
        members = rng.permutation(np.flatnonzero(y == c))
        val_mask[members[: int(round(len(members) * val_split))]] = True
    return val_mask


def _datasets(
    x: np.ndarray,
    y: np.ndarray,
    val_mask: np.ndarray,
    classes: int,
    batch_size: int,
    *,
    augment: bool,
    rescale: float,
    seed: int,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    """The shuffled, augmented training dataset and the validation one (None if empty)."""
    augmenter = keras.Sequential(
        [
            keras.layers.RandomRotation(15 / 360, fill_mode="reflect", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 2),
        ]
    )

    def prepare(image: tf.Tensor, label: tf.Tensor, training: bool) -> tuple:
        image = tf.cast(image, tf.float32)
        if training and augment:
            image = augmenter(image, training=True)
        return image * rescale, tf.one_hot(label, classes)

    x_train, y_train = x[~val_mask], y[~val_mask]
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(y_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(lambda a, b: prepare(a, b, True), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    if not val_mask.any():
        return train_ds, None
    val_ds = (
        tf.data.Dataset.from_tensor_slices((x[val_mask], y[val_mask]))
        .batch(batch_size)
        .map(lambda a, b: prepare(a, b, False))
    )
    return train_ds, val_ds


@dataclass
class EnsembleReport:
    """What ``train_ensemble`` did: one ``TrainReport`` per member and the manifest."""

    folder: Path
    members: list[TrainReport]
    manifest: Path


def train_ensemble(
    images: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    members: int,
    options: TrainOptions | None = None,
) -> EnsembleReport:
    """Train a deep ensemble: ``members`` reference CNNs that differ in seed, hence in initial
    weights, data order, augmentation and validation split.

    Writes ``folder/member-0.keras`` ... (each with its sidecar) and ``folder/ensemble.json``
    (the members in order with their sha256, the class names and rescale), which
    ``batchuq score --model folder`` reads.

    Args:
        images: Folder with one subfolder per class.
        folder: The ensemble folder (created; must not hold another ensemble's files).
        members: M, at least 2.
        options: How to train each member; member ``i`` is trained with seed
            ``options.seed + i``.

    Returns:
        An ``EnsembleReport``.

    Raises:
        UsageError: If ``members`` < 2, ``folder`` is a file, or the training arguments are bad.
    """
    options = options if options is not None else TrainOptions()
    if members < 2:
        raise UsageError(f"An ensemble needs at least 2 members. Received: members={members}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"With --members, MODEL is the ensemble's folder. Received: model={str(folder)!r}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    seeds = [options.seed + i for i in range(members)]
    reports = []
    for i, seed in enumerate(seeds):
        logger.info("training ensemble member %d of %d", i + 1, members)
        path = folder / f"member-{i}.keras"
        reports.append(train_directory(images, path, dataclasses.replace(options, seed=seed)))
    manifest = write_ensemble_manifest(
        folder,
        [r.model_path for r in reports],
        class_names=reports[0].class_names,
        rescale=options.rescale,
        seeds=seeds,
        trained_on=str(images),
    )
    return EnsembleReport(folder, reports, manifest)
