"""The batch job: discover -> decode/augment -> sample -> summarise -> decide -> write.

``score_directory`` is the library entry point used by the CLI, notebooks and Airflow tasks.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from batchuq import __version__
from batchuq.augment import TTAConfig
from batchuq.decide import UNCLASSIFIED, DecisionRule, decide
from batchuq.decode import DEFAULT_MAX_PIXELS, OK, make_dataset
from batchuq.discover import discover_images, read_labels_file
from batchuq.models import LoadedModel, load_model, read_sidecar, resolve_class_names
from batchuq.sample import DEFAULT_MEMORY_BUDGET_MB, MCSampler
from batchuq.seeds import image_keys, mix
from batchuq.summarise import Summary, summarise
from batchuq.write import SCORE_COLUMNS, AtomicParquetWriter, check_output_path, output_schema

logger = logging.getLogger("batchuq")

DEFAULT_PASSES = 100
DEFAULT_BATCH_SIZE = 32
DEFAULT_RESCALE = 1.0 / 255.0


@dataclass
class ScoreReport:
    """What a scoring run did.

    Attributes:
        output: The Parquet file written.
        images: Images found (= rows written).
        errors: Rows whose image could not be read (``status`` starts with ``error``).
        unclassified: Readable images the decision rule left unclassified.
        seconds: Wall time of the run.
        error_paths: Relative paths of the images that failed (first 1000).
    """

    output: Path
    images: int = 0
    errors: int = 0
    unclassified: int = 0
    seconds: float = 0.0
    error_paths: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Throughput of the run."""
        return self.images / self.seconds if self.seconds > 0 else math.inf

    @property
    def error_rate(self) -> float:
        """Share of images that could not be read."""
        return self.errors / self.images if self.images else 0.0

    def summary_line(self) -> str:
        """One line for the end of a run."""
        return (
            f"{self.images} images, {self.unclassified} unclassified, {self.errors} errors, "
            f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s -> {self.output}"
        )


def _as_loaded(model: str | os.PathLike[str] | keras.Model | LoadedModel | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, keras.Model):
        return LoadedModel(model, Path("<in-memory>"), "", False)
    loaded = load_model(model)
    if loaded.bundled:
        logger.warning("No --model given: using the bundled demo digits model (%s).", loaded.path)
    return loaded


def _rows(
    batch: dict[str, np.ndarray],
    summary: Summary,
    decisions: np.ndarray,
    relative_paths: list[str],
    labels: list[str | None],
    label_indices: list[int | None],
    class_names: list[str],
) -> list[dict]:
    rows = []
    for i, index in enumerate(batch["index"]):
        status = batch["status"][i].decode()
        row: dict = {
            "path": relative_paths[index],
            "label": labels[index],
            "label_index": label_indices[index],
            "status": status,
        }
        if status == OK:
            pred = int(summary.pred[i])
            row["pred"] = class_names[pred]
            row["pred_index"] = pred
            decision = int(decisions[i])
            row["decision"] = "unclassified" if decision == UNCLASSIFIED else class_names[decision]
            for column in SCORE_COLUMNS:
                row[column] = float(getattr(summary, column)[i])
            for stat in ("mean", "median", "std"):
                values = getattr(summary, stat)[i]
                for c, name in enumerate(class_names):
                    row[f"{stat}_{name}"] = float(values[c])
        rows.append(row)
    return rows


def score_directory(
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | keras.Model | LoadedModel | None = None,
    passes: int = DEFAULT_PASSES,
    tta: TTAConfig | int = 1,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rule: DecisionRule | None = None,
    class_names: list[str] | None = None,
    labels: str | os.PathLike[str] | dict[str, str] | None = None,
    rescale: float | None = None,
    sample_layers: list[str] | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    precision: str = "float32",
    progress: bool = False,
) -> ScoreReport:
    """Score every image in a folder and write one Parquet row per image.

    Args:
        images: Folder of images: class subfolders (labelled) or flat (unlabelled).
        output: Parquet file to write (replaced atomically when the run completes).
        model: ``.keras`` path, a Keras model, or ``None`` for ``$BATCHUQ_MODEL`` or the
            bundled demo model.
        passes: MC dropout passes T per augmented copy (1 = deterministic).
        tta: Test-time augmentation settings, or just the number of copies K.
        seed: Seed of all randomness; the same seed gives the same output.
        batch_size: Images per batch (results do not depend on it).
        rule: Decision rule (default: the MC median rule with ``min_median=0.5``).
        class_names: Names of the model outputs, when the model has no sidecar.
        labels: A ``monkey_labels.txt``-style file (or dict) mapping folder ids to names.
        rescale: Factor applied to pixel values ``0..255``; ``None`` takes the value stored
            by ``batchuq train`` or else ``1/255``.
        sample_layers: Name patterns of the dropout layers to sample (default: all).
        memory_budget_mb: Memory budget for one chunk of tiled passes.
        max_pixels: Images with more pixels are refused (error row) before decoding.
        precision: ``float32``, or ``bfloat16`` for the sampled part of the network.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        A ``ScoreReport``.

    Raises:
        NotADirectoryError, NoImagesFoundError: If there is nothing to score.
        ModelError, NoDropoutError, ValueError: For unusable models or arguments.
    """
    started = time.perf_counter()
    out_path = check_output_path(output)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1. Received: batch_size={batch_size}")
    tta_config = tta if isinstance(tta, TTAConfig) else TTAConfig(copies=int(tta))
    rule = rule or DecisionRule()
    discovery = discover_images(images)
    loaded = _as_loaded(model)
    names, names_source = resolve_class_names(loaded, class_names, discovery.class_folders)
    label_map = read_labels_file(labels) if isinstance(labels, (str, os.PathLike)) else labels
    label_map = label_map or {}
    display = [label_map.get(name, name) for name in names]
    index_of = {name: i for i, name in enumerate(names)} | {n: i for i, n in enumerate(display)}
    file_labels = [f.folder_label for f in discovery.files]
    labels_out = [None if lab is None else label_map.get(lab, lab) for lab in file_labels]
    label_indices = [index_of.get(lab) if lab is not None else None for lab in file_labels]
    if rescale is None:
        sidecar_rescale = read_sidecar(loaded.path).get("rescale")
        rescale = float(sidecar_rescale) if sidecar_rescale is not None else DEFAULT_RESCALE

    sampler = MCSampler(loaded.model, passes, sample_layers, memory_budget_mb, precision=precision)
    relative_paths = [f.relative_path for f in discovery.files]
    keys = image_keys(seed, relative_paths)
    dataset = make_dataset(
        [f.path for f in discovery.files],
        keys,
        loaded.image_spec,
        tta_config,
        batch_size,
        rescale=rescale,
        max_pixels=max_pixels,
    )
    metadata = {
        "batchuq_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "images": str(images),
        "model_path": str(loaded.path),
        "model_sha256": loaded.sha256,
        "class_names": display,
        "class_names_source": names_source,
        "passes": passes,
        "tta": tta_config.copies,
        "augmentation": tta_config.as_metadata(),
        "seed": seed,
        "rescale": rescale,
        "precision": precision,
        "sampled_layers": [layer.name for layer in sampler.dropout_layers],
        "decision_rule": rule.as_metadata(),
        "samples_per_image": passes * tta_config.copies,
    }
    report = ScoreReport(output=out_path, images=len(discovery.files))
    copies = tta_config.copies
    copy_index = tf.cast(tf.range(copies), tf.uint32)
    bar = tqdm(
        total=len(discovery.files), unit="img", disable=not progress, desc="scoring", leave=False
    )
    with bar, AtomicParquetWriter(out_path, output_schema(display, metadata)) as writer:
        for batch in dataset:
            stack = batch["images"]  # (B, K, H, W, C)
            b = int(tf.shape(stack)[0])
            rows_keys = tf.reshape(mix(batch["keys"][:, None], copy_index[None, :]), [-1])
            flat = tf.reshape(stack, tf.concat([[b * copies], tf.shape(stack)[2:]], 0))
            samples = sampler.sample(flat, rows_keys)  # (T, B*K, C)
            samples = samples.reshape(passes, b, copies, -1).transpose(1, 2, 0, 3)
            summary = summarise(samples.reshape(b, copies * passes, -1))
            decisions = decide(summary, rule)
            host = {"index": batch["index"].numpy(), "status": batch["status"].numpy()}
            rows = _rows(
                host, summary, decisions, relative_paths, labels_out, label_indices, display
            )
            for row in rows:
                if row["status"] != OK:
                    report.errors += 1
                    if len(report.error_paths) < 1000:
                        report.error_paths.append(row["path"])
                    logger.warning("%s: %s", row["path"], row["status"])
                elif row["decision"] == "unclassified":
                    report.unclassified += 1
            writer.write_rows(rows)
            bar.update(b)
    report.seconds = time.perf_counter() - started
    return report
