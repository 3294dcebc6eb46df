"""The batch job: discover -> decode/augment -> sample -> summarise -> decide -> write.

``score_directory`` is the library entry point used by the CLI, notebooks and Airflow tasks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from batchuq._version import __version__
from batchuq.augment import CopyMaker, TTAConfig
from batchuq.postprocess.calibration import (
    Calibration,
    apply_temperature,
    predictor_mismatch_message,
)
from batchuq.postprocess.rules import UNCLASSIFIED, UNCLASSIFIED_NAME, DecisionRule, decide
from batchuq.decode import OK, make_dataset
from batchuq.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_PASSES,
    DEFAULT_RESCALE,
)
from batchuq.discover import IMAGE_EXTENSIONS, Discovery, discover_images, read_labels_file
from batchuq.models import (
    LoadedModel,
    ModelError,
    as_loaded_model,
    read_sidecar,
    resolve_class_names,
    resolve_rescale,
)
from batchuq.sample import MCSampler, cpu_has_bf16
from batchuq.seeds import image_keys, mix
from batchuq.summarise import Summary, mean_statistics, summarise
from batchuq.write import (
    SCORE_COLUMNS,
    AtomicParquetWriter,
    CheckpointedParquetWriter,
    check_output_path,
    output_schema,
)

logger = logging.getLogger("batchuq")


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
        demo_model: Whether the run used the bundled demo model because none was given.
        skipped: Files left out because their extension is not an image's (see
            ``include_all``).
    """

    output: Path
    images: int = 0
    errors: int = 0
    unclassified: int = 0
    seconds: float = 0.0
    error_paths: list[str] = field(default_factory=list)
    demo_model: bool = False
    skipped: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput of the run."""
        return self.images / self.seconds if self.seconds > 0 else math.inf

    @property
    def error_rate(self) -> float:
        """Share of images that could not be read."""
        return self.errors / self.images if self.images else 0.0

    def summary_line(self) -> str:
        """One line for the end of a run; says so when the bundled demo model was used."""
        demo = " (bundled demo model)" if self.demo_model else ""
        return (
            f"{self.images} images, {self.unclassified} unclassified, {self.errors} errors, "
            f"{self.skipped} skipped, {self.seconds:.1f} s, {self.images_per_second:.1f} "
            f"images/s -> {self.output}{demo}"
        )


def _as_loaded(model: str | os.PathLike[str] | keras.Model | LoadedModel | None) -> LoadedModel:
    loaded = as_loaded_model(model)
    if loaded.bundled:
        logger.warning(
            "No --model given (nor BATCHUQ_MODEL, nor model in batchuq.toml): using the bundled "
            "demo digits model (%s), which knows only handwritten digits.",
            loaded.path,
        )
    return loaded


def _rows(
    positions: list[int],
    status: np.ndarray,
    summary: Summary,
    decisions: np.ndarray,
    relative_paths: list[str],
    labels: list[str | None],
    label_indices: list[int | None],
    class_names: list[str],
    samples: np.ndarray | None = None,
) -> list[dict]:
    rows = []
    for i, index in enumerate(positions):
        row: dict = {
            "path": relative_paths[index],
            "label": labels[index],
            "label_index": label_indices[index],
            "status": status[i].decode(),
        }
        if row["status"] == OK:
            pred = int(summary.pred[i])
            row["pred"] = class_names[pred]
            row["pred_index"] = pred
            decision = int(decisions[i])
            row["decision"] = (
                UNCLASSIFIED_NAME if decision == UNCLASSIFIED else class_names[decision]
            )
            for column in SCORE_COLUMNS:
                row[column] = float(getattr(summary, column)[i])
            for stat in ("mean", "median", "std"):
                values = getattr(summary, stat)[i]
                for c, name in enumerate(class_names):
                    row[f"{stat}_{name}"] = float(values[c])
            if samples is not None:
                row["samples"] = list(samples[i])  # S float32 arrays: Arrow converts them fast
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
    logits: bool = False,
    resume: bool = False,
    checkpoint_rows: int = 1024,
    follow_symlinks: bool = False,
    on_samples: Callable[[list[int], np.ndarray], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    save_samples: bool = False,
    calibration: str | os.PathLike[str] | Calibration | None = None,
    temperature: bool = False,
    allow_predictor_mismatch: bool = False,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
    include_all: bool = False,
    exif_transpose: bool | None = None,
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
        class_names: Names of the model outputs; they override the model's sidecar (with a
            warning).
        labels: A ``monkey_labels.txt``-style file (or dict) mapping folder ids to names.
        rescale: Factor applied to pixel values ``0..255``; ``None`` takes the value stored
            by ``batchuq train``, else 1 when the model starts with its own ``Rescaling`` or
            ``Normalization`` layer, else ``1/255`` (the metadata's ``rescale_source`` says).
        sample_layers: Name patterns of the dropout layers to sample (default: all).
        memory_budget_mb: Memory budget for one chunk of rows (images x TTA copies) and its tiled
            passes; peak memory grows with neither T nor K.
        max_pixels: Images with more pixels are refused (error row) before decoding.
        precision: ``float32``, or ``bfloat16`` for the sampled part of the network. On a
            CPU whose flags show no native bfloat16, ``bfloat16`` falls back to ``float32``
            with a warning (the metadata keeps both ``precision`` and ``precision_requested``).
        logits: The model outputs logits; apply a softmax to each pass.
        resume: Keep finished rows in ``OUTPUT.checkpoint/`` and, when it exists from an
            interrupted run with the same settings, skip the images already scored there.
        checkpoint_rows: With ``resume``, rows per checkpoint part.
        follow_symlinks: Follow symlinked folders and files that point outside ``images``
            (by default such files become error rows).
        on_samples: Called once per batch with the positions of its images (indices into
            the discovered, natural-sorted file list) and their raw samples, shape
            ``(batch, passes * tta, classes)``, ordered copy-major (all passes of copy 0, then
            copy 1, ...). Used by ``calibrate``.
        should_stop: Polled before and after each batch's sampling; when it returns True the
            run raises ``StopRequested`` there, leaving no output (with ``resume``, finished
            rows stay in the checkpoint). The CLI's SIGTERM/SIGINT handlers use it, because
            an exception raised from a signal handler inside TensorFlow's C++ code can crash
            the process.
        save_samples: Add a ``samples`` column with each image's raw samples, shape
            ``(passes * tta, classes)`` in the same copy-major order (null for error rows);
            ``batchuq evaluate --report`` then draws their distribution per class. About
            ``4 * passes * tta * classes`` bytes per image before compression.
        calibration: A ``batchuq calibrate`` JSON (or ``Calibration``) made for this model:
            gives the ``threshold`` rule its thresholds and adds the conformal ``pred_set``.
        temperature: Rescale the MC mean with the calibration's temperature (``mean_*``,
            ``pred``, ``confidence``, ``margin``, ``entropy``); median, std, mutual information
            and variation ratio always describe the raw samples.
        allow_predictor_mismatch: Use a calibration fitted on another predictor (passes, TTA,
            augmentation, rescale, precision, sampled layers, logits, EXIF) than this run's,
            with a warning; by default that is a ``PredictorMismatchError`` (a ValueError).
        progress: Show a tqdm progress bar on stderr.
        settings: Where each setting came from, stored as the metadata's ``settings`` (the CLI
            passes ``{option: {"value": ..., "source": ...}}``; see ``config.settings_provenance``).
        include_all: Try every file, not only those with an image extension; files that are
            not images become error rows. Otherwise such files are counted as skipped.
        exif_transpose: Turn images upright by their EXIF orientation; ``None`` follows the
            model's sidecar (``batchuq train`` records its choice), else off, as Keras's loader.

    Returns:
        A ``ScoreReport``.

    Raises:
        NotADirectoryError, NoImagesFoundError: If there is nothing to score.
        ModelError, NoDropoutError, ValueError: For unusable models or arguments.
    """
    started = time.perf_counter()
    out_path = check_output_path(output)
    if out_path.suffix.lower() != ".parquet":
        raise ValueError(
            "The output must end in .parquet: batchuq writes Parquet. "
            f"Received: output={str(output)!r}"
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1. Received: batch_size={batch_size}")
    tta_config = tta if isinstance(tta, TTAConfig) else TTAConfig(copies=int(tta))
    rule = rule or DecisionRule()
    discovery = discover_images(
        images, None if include_all else IMAGE_EXTENSIONS, follow_symlinks=follow_symlinks
    )
    _log_discovery(discovery)
    loaded = _as_loaded(model)
    spec = loaded.image_spec  # refuses a model without one image input before any work
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.from_json(calibration)
    if calibration is not None:
        calibration.check_model(loaded.sha256)
    if temperature and calibration is None:
        raise ValueError("--temperature needs --calibration. Received: calibration=None")
    rule = rule.with_thresholds(None if calibration is None else calibration.thresholds)
    names, names_source = resolve_class_names(loaded, class_names, discovery.class_folders)
    label_map = read_labels_file(labels) if isinstance(labels, (str, os.PathLike)) else labels
    label_map = label_map or {}
    check_labels_match(label_map, discovery.class_folders or names)
    display = [label_map.get(name, name) for name in names]
    index_of = {name: i for i, name in enumerate(names)} | {n: i for i, n in enumerate(display)}
    file_labels = [f.folder_label for f in discovery.files]
    labels_out = [None if lab is None else label_map.get(lab, lab) for lab in file_labels]
    label_indices = [index_of.get(lab) if lab is not None else None for lab in file_labels]
    rescale, rescale_source = resolve_rescale(loaded, rescale, DEFAULT_RESCALE)
    if rescale_source.startswith("model layer"):
        logger.warning(
            "The model scales pixels itself (%s): using --rescale 1, pixels 0..255. "
            "Pass --rescale to override.",
            rescale_source,
            extra={"event": "notice"},
        )
    if exif_transpose is None:
        exif_transpose = bool(read_sidecar(loaded.path).get("exif_transpose", False))

    requested_precision = precision
    if precision == "bfloat16" and cpu_has_bf16() is False:
        logger.warning(
            "--precision bfloat16: this CPU has no native bfloat16 (AVX512-BF16, AMX or Arm "
            "BF16), where it would be emulated and slower; using float32."
        )
        precision = "float32"
    sampler = MCSampler(
        loaded.model,
        passes,
        sample_layers,
        memory_budget_mb,
        precision=precision,
        logits=logits,
    )
    relative_paths = [f.relative_path for f in discovery.files]
    metadata = {
        "batchuq_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "images": str(images),
        "model_path": str(loaded.path),
        "model_sha256": loaded.sha256,
        "demo_model": loaded.bundled,
        "class_names": display,
        "class_names_source": names_source,
        "passes": passes,
        "tta": tta_config.copies,
        "augmentation": tta_config.as_metadata(),
        "seed": seed,
        "rescale": rescale,
        "rescale_source": rescale_source,
        "exif_transpose": exif_transpose,
        "images_root": discovery.root,
        "skipped_files": len(discovery.skipped),
        "include_all": include_all,
        "precision": precision,
        "precision_requested": requested_precision,
        "sampled_layers": [layer.name for layer in sampler.dropout_layers],
        "decision_rule": rule.as_metadata(),
        "samples_per_image": passes * tta_config.copies,
        "logits": logits,
        "samples_saved": save_samples,
        "calibration": None
        if calibration is None
        else {
            "temperature": calibration.temperature if temperature else None,
            "fitted_temperature": calibration.temperature,
            "conformal_alpha": calibration.settings.get("alpha"),
            "conformal_method": calibration.conformal_method,
            "created": calibration.created,
        },
        "settings": settings,
    }
    if calibration is not None:  # conformal sets and temperature hold for one predictor only
        mismatch = calibration.check_predictor(metadata, allow=allow_predictor_mismatch)
        if mismatch:
            logger.warning("%s (--allow-predictor-mismatch).", predictor_mismatch_message(mismatch))
        metadata["calibration"]["predictor_mismatch"] = [
            {"setting": name, "calibration": a, "run": b} for name, a, b in mismatch
        ] or None
    report = ScoreReport(
        output=out_path,
        images=len(discovery.files),
        demo_model=loaded.bundled,
        skipped=len(discovery.skipped),
    )
    schema = output_schema(
        display,
        metadata,
        pred_set=calibration is not None,
        samples_per_image=passes * tta_config.copies if save_samples else None,
    )
    # Rows wait in memory until a row group is full; with raw samples, cap a group at ~64 MiB.
    row_bytes = 4 * passes * tta_config.copies * len(display) if save_samples else 0
    group_rows = max(16, min(4096, (64 << 20) // row_bytes)) if row_bytes else 4096
    if resume:
        # What decides the rows; not when the run started or where each setting came from.
        fingerprint = {k: v for k, v in metadata.items() if k not in ("created", "settings")}
        fingerprint["files"] = hashlib.sha256("\0".join(relative_paths).encode()).hexdigest()
        writer = CheckpointedParquetWriter(
            out_path, schema, fingerprint, min(checkpoint_rows, group_rows)
        )
    else:
        writer = AtomicParquetWriter(out_path, schema, row_group_size=group_rows)
    logger.info(
        "scoring %d images from %s",
        len(discovery.files),
        images,
        extra={
            "event": "start",
            "data": {
                "images": len(discovery.files),
                "output": str(output),
                "model": str(loaded.path),
                "passes": passes,
                "tta": tta_config.copies,
                "seed": seed,
            },
        },
    )
    copies = tta_config.copies
    copy_index = tf.cast(tf.range(copies), tf.uint32)
    with writer:
        done = getattr(writer, "done_paths", set())
        # Rows kept from an interrupted run count towards this run's report.
        _count(report, getattr(writer, "done_statuses", []), getattr(writer, "done_decisions", []))
        todo = [i for i, path in enumerate(relative_paths) if path not in done]
        if done:
            logger.info("resuming: %d of %d images already scored", len(done), report.images)
        # The pipeline decodes; the test-time copies are made below a chunk of rows at a time
        # (augment.CopyMaker), so that memory stays within the budget however large K is.
        dataset = make_dataset(
            [discovery.files[i].path for i in todo],
            image_keys(seed, [relative_paths[i] for i in todo]),
            spec,
            TTAConfig(copies=1),
            batch_size,
            rescale=1.0,
            max_pixels=max_pixels,
            problems=[discovery.files[i].problem for i in todo],
            exif_transpose=exif_transpose,
        )
        bar = tqdm(
            total=report.images,
            initial=report.images - len(todo),
            unit="img",
            disable=not progress,
            desc="scoring",
            leave=False,
        )
        copy_maker = CopyMaker(tta_config, tuple(dataset.element_spec["images"].shape[2:]), rescale)
        batches = iter(dataset)
        try:
            with bar:
                for batch in batches:
                    _stop_if_asked(should_stop)
                    stack = batch["images"][:, 0]  # (B, H, W, C), pixel values 0..255
                    b = int(tf.shape(stack)[0])
                    rows_keys = tf.reshape(mix(batch["keys"][:, None], copy_index[None, :]), [-1])
                    # Row r is copy r % K of image r // K. Each chunk of rows is augmented, then
                    # sampled, so neither the copies nor their activations grow with K.
                    parts = []
                    for start, stop in sampler.row_chunks(b * copies):
                        chunk = copy_maker.rows(stack, batch["keys"], start, stop)
                        if not spec.channel_axis:  # an (H, W) model: drop the one channel
                            chunk = chunk[..., 0]
                        parts.append(sampler.sample(chunk, rows_keys[start:stop]))
                        del chunk
                    samples = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
                    del parts  # samples: (T, B*K, C)
                    _stop_if_asked(should_stop)
                    samples = samples.reshape(passes, b, copies, -1).transpose(1, 2, 0, 3)
                    samples = samples.reshape(b, copies * passes, -1)
                    status = batch["status"].numpy()
                    check_probabilities(samples[status == OK.encode()], loaded.path)
                    summary = summarise(samples)
                    # Conformal sets from the MC mean before any temperature, as calibrated.
                    sets = calibration.prediction_sets(summary.mean) if calibration else None
                    if temperature:
                        summary = _with_temperature(summary, calibration.temperature)
                    decisions = decide(summary, rule)
                    positions = [todo[int(i)] for i in batch["index"].numpy()]
                    if on_samples is not None:
                        on_samples(positions, samples)
                    rows = _rows(
                        positions,
                        status,
                        summary,
                        decisions,
                        relative_paths,
                        labels_out,
                        label_indices,
                        display,
                        samples if save_samples else None,
                    )
                    if sets is not None:
                        _add_prediction_sets(rows, sets, display)
                    _count(report, [r["status"] for r in rows], [r.get("decision") for r in rows])
                    for row in rows:
                        if row["status"] != OK:
                            _log_error(report, row)
                    writer.write_rows(rows)
                    bar.update(b)
        finally:
            # Stop the input pipeline here, while Python is fully alive. Left to the traceback
            # of an interrupt, it would be torn down at interpreter exit, where its decode
            # threads calling back into Python can crash the process.
            del batches
    report.seconds = time.perf_counter() - started
    logger.info(
        report.summary_line(),
        extra={
            "event": "summary",
            "data": {
                "images": report.images,
                "errors": report.errors,
                "unclassified": report.unclassified,
                "seconds": round(report.seconds, 3),
                "images_per_second": round(report.images_per_second, 3),
                "output": str(out_path),
                "demo_model": report.demo_model,
                "skipped": report.skipped,
            },
        },
    )
    return report


def _log_discovery(discovery: Discovery) -> None:
    """Say what discovery decided about the layout, and what it left out."""
    for notice in discovery.notices:
        logger.warning(notice, extra={"event": "notice"})
    if discovery.skipped:
        examples = ", ".join(discovery.skipped[:3])
        count = len(discovery.skipped)
        logger.warning(
            "skipped %d %s whose extension is not an image's (e.g. %s); --include-all tries "
            "every file",
            count,
            "file" if count == 1 else "files",
            examples,
            extra={"event": "skipped", "data": {"skipped": len(discovery.skipped)}},
        )


def check_labels_match(label_map: dict[str, str], class_folders: list[str]) -> None:
    """Refuse a labels file that names none of the classes; warn when it misses some.

    Args:
        label_map: Folder id -> readable name, from ``--labels``.
        class_folders: The class folders found (or the model's class names when unlabelled).

    Raises:
        ValueError: If ``label_map`` is not empty and matches none of ``class_folders``.
    """
    if not label_map or not class_folders:
        return
    missing = [name for name in class_folders if name not in label_map]
    if len(missing) == len(class_folders):
        raise ValueError(
            "The labels file names none of the class folders "
            f"({', '.join(class_folders[:5])}{', ...' if len(class_folders) > 5 else ''}); "
            f"it names {', '.join(list(label_map)[:5])}. Received: labels with "
            f"{len(label_map)} entries"
        )
    if missing:
        logger.warning(
            "The labels file does not name %d class folders, which keep their folder names: %s",
            len(missing),
            ", ".join(missing),
        )


class StopRequested(BaseException):
    """Raised by ``score_directory`` when ``should_stop`` asks it to stop (a BaseException, like
    KeyboardInterrupt, so that ``except Exception`` does not swallow it)."""


def _stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise StopRequested()


def _with_temperature(summary: Summary, temperature: float) -> Summary:
    """The summary with its mean-based fields recomputed from the temperature-scaled mean."""
    mean = apply_temperature(summary.mean.astype(np.float64), temperature)
    return dataclasses.replace(summary, mean=mean.astype(np.float32), **mean_statistics(mean))


def _add_prediction_sets(rows: list[dict], sets: np.ndarray, class_names: list[str]) -> None:
    """Add the conformal sets (``(batch, classes)`` membership) to the readable rows."""
    for i, row in enumerate(rows):
        if row["status"] == OK:
            row["pred_set"] = [class_names[c] for c in np.flatnonzero(sets[i])]


def _count(report: ScoreReport, statuses: list[str], decisions: list[str | None]) -> None:
    """Add rows to the report's error and unclassified counts."""
    report.errors += sum(1 for status in statuses if status != OK)
    report.unclassified += sum(1 for decision in decisions if decision == UNCLASSIFIED_NAME)


def _log_error(report: ScoreReport, row: dict) -> None:
    if len(report.error_paths) < 1000:
        report.error_paths.append(row["path"])
    logger.warning(
        "%s: %s",
        row["path"],
        row["status"],
        extra={"event": "image_error", "data": {"path": row["path"], "status": row["status"]}},
    )


def check_probabilities(samples: np.ndarray, model_path: Path) -> None:
    """Refuse model outputs that are not probability vectors.

    Args:
        samples: ``(batch, samples, classes)`` model outputs of readable images.
        model_path: For the message.

    Raises:
        ModelError: If values leave ``[0, 1]`` or do not sum to 1.
    """
    if samples.size == 0:
        return
    sums = samples.sum(axis=-1)
    if samples.min() < -1e-4 or samples.max() > 1 + 1e-4 or np.abs(sums - 1).max() > 1e-3:
        raise ModelError(
            "The model's outputs are not probabilities (values outside [0, 1] or rows not "
            "summing to 1); if it ends in logits, pass --logits to apply a softmax. "
            f"Received: model={str(model_path)!r}, output range=[{samples.min():.3g}, "
            f"{samples.max():.3g}]"
        )
