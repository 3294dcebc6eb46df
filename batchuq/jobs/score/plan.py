"""Step 0 of a job: resolve every setting of a run into one frozen ``RunPlan``.

``prepare_run`` turns what the caller gave (a folder, a model path or ``None``, class names,
labels, rescale, calibration file, method settings) into what the other steps need: the
discovered files, the loaded model, the class names and each file's label, the pixel scale, the
calibration, the uncertainty method and the Parquet metadata. The model's sidecar is read once
(``LoadedModel.sidecar``) and a discovery can be shared by several plans (``calibrate`` runs
two predictors over one folder).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from batchuq._version import __version__
from batchuq.augment import TTAConfig
from batchuq.classes import check_folders_match, labels_name_some
from batchuq.decode import ImageSpec
from batchuq.defaults import (
    DEFAULT_RESCALE,
)
from batchuq.discover import IMAGE_EXTENSIONS, Discovery, discover_images, read_labels_file
from batchuq.errors import UsageError
from batchuq.jobs.score.options import ModelsArg, ScoreOptions
from batchuq.methods.base import UncertaintyMethod
from batchuq.methods.registry import choose_method
from batchuq.models import (
    LoadedModel,
    combined_sha256,
    load_models,
    resolve_class_names,
    resolve_rescale,
)
from batchuq.postprocess.calibration_file import Calibration, predictor_mismatch_message
from batchuq.postprocess.rules import (
    DecisionRule,
    check_risk_options,
    stopping_record,
    stopping_temperature,
)
from batchuq.sampling.stopping import AdaptivePasses

logger = logging.getLogger("batchuq")


@dataclass(frozen=True)
class FileLabels:
    """Class names as written and every file's label.

    Attributes:
        class_names: Display names of the model outputs (``--labels`` applied).
        texts: Per discovered file, its label as written to the ``label`` column, or None.
        indices: Per discovered file, the index of its label among the classes, or None.
    """

    class_names: list[str]
    texts: list[str | None]
    indices: list[int | None]


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, resolved once; the steps only read it.

    Attributes:
        images: The images folder as given.
        discovery: The files to score, natural-sorted, with layout notices.
        loaded: The model and where it came from (member 0 of an ensemble: its input size,
            class names, rescale and sidecar are every member's).
        members: Every model of the run, in order (one unless a deep ensemble).
        spec: The model's input size and channels.
        labels: Class names and each file's label.
        class_names_source: Where the class names came from.
        tta: Test-time augmentation settings.
        seed: Seed of all randomness.
        batch_size: Images decoded per batch.
        max_pixels: Larger images become error rows.
        rescale: Factor applied to pixel values 0..255.
        exif_transpose: Whether images are turned upright by their EXIF orientation.
        rule: The decision rule, with calibration thresholds filled in.
        calibration: The calibration, when one was given.
        temperature: Whether the MC mean is temperature-scaled.
        method: The uncertainty method.
        save_samples: Whether rows keep their raw samples.
        metadata: The Parquet metadata of the run.
        adaptive: The ``--passes auto`` settings, or None for a fixed number of passes.
    """

    images: str
    discovery: Discovery
    loaded: LoadedModel
    members: tuple[LoadedModel, ...]
    spec: ImageSpec
    labels: FileLabels
    class_names_source: str
    tta: TTAConfig
    seed: int
    batch_size: int
    max_pixels: int
    rescale: float
    exif_transpose: bool
    rule: DecisionRule
    calibration: Calibration | None
    temperature: bool
    method: UncertaintyMethod
    save_samples: bool
    metadata: dict[str, Any] = field(repr=False)
    adaptive: AdaptivePasses | None = None

    @property
    def relative_paths(self) -> list[str]:
        """Each discovered file's path relative to the images folder."""
        return [f.relative_path for f in self.discovery.files]

    @property
    def samples_per_image(self) -> int:
        """S x K: the method's samples per row times the TTA copies (with adaptive passes,
        the most an image can get)."""
        return self.method.samples_per_row * self.tta.copies

    @property
    def decision_temperature(self) -> float | None:
        """The temperature adaptive stopping reads the mean with, or None: the calibration's
        with ``--temperature`` under the threshold and confidence rules (``stopping_temperature``:
        the others' stopping does not depend on it)."""
        temperature = self.calibration.temperature if self.temperature else None
        return stopping_temperature(self.rule.name, temperature)


def load_for_run(model: ModelsArg) -> tuple[LoadedModel, ...]:
    """Load the model (or ensemble members) of a run; warn when it is the bundled demo model
    because none was given."""
    members = tuple(load_models(model))
    if members[0].bundled:
        logger.warning(
            "No --model given (nor BATCHUQ_MODEL, nor model in batchuq.toml): using the bundled "
            "demo digits model (%s), which knows only handwritten digits.",
            members[0].path,
        )
    return members


def discover(images: str | os.PathLike[str], options: ScoreOptions) -> Discovery:
    """Find the images to score and say what discovery decided (layout notices, skipped files).

    Raises:
        ImagesFolderError, NoImagesFoundError, LayoutError: If there is nothing to score.
    """
    extensions = None if options.include_all else IMAGE_EXTENSIONS
    discovery = discover_images(images, extensions, follow_symlinks=options.follow_symlinks)
    for notice in discovery.notices:
        logger.warning(notice, extra={"event": "notice"})
    if discovery.skipped:
        count = len(discovery.skipped)
        logger.warning(
            "skipped %d %s whose extension is not an image's (e.g. %s); --include-all tries "
            "every file",
            count,
            "file" if count == 1 else "files",
            ", ".join(discovery.skipped[:3]),
            extra={"event": "skipped", "data": {"skipped": count}},
        )
    return discovery


def prepare_run(
    images: str | os.PathLike[str],
    options: ScoreOptions,
    *,
    settings: dict[str, Any] | None = None,
    discovery: Discovery | None = None,
    models: Sequence[LoadedModel] | None = None,
    announce: bool = True,
) -> RunPlan:
    """Resolve a run's settings into a ``RunPlan``.

    Args:
        images: The images folder.
        options: The run's options.
        settings: Where each setting came from, for the metadata (``RunControl.settings``).
        discovery: Files already discovered in ``images`` (default: discover them now).
        models: The model (or ensemble members) already loaded (default: load
            ``options.model``).
        announce: Log the class-order notice (a second plan over the same folder need not).

    Returns:
        The frozen plan.

    Raises:
        UsageError: For unusable options, models, class names, labels or calibrations, and
            class folders that nothing maps onto the model's outputs (``ClassMismatchError``).
    """
    discovery = discovery if discovery is not None else discover(images, options)
    members = tuple(models) if models else load_for_run(options.model)
    loaded = members[0]
    spec = loaded.image_spec  # refuses a model without one image input before any work
    calibration = _calibration(options, combined_sha256(members))
    rule = options.rule or DecisionRule()
    if rule.name == "risk":
        check_risk_options(calibration=calibration is not None, temperature=options.temperature)
    rule = rule.with_thresholds(
        # With --temperature, the thresholds fitted on the tempered mean the rule compares.
        None
        if calibration is None
        else calibration.rule_thresholds(options.temperature and rule.name == "threshold"),
        None if calibration is None else calibration.selective,
    )
    resolved = resolve_class_names(
        loaded, options.class_names, discovery.class_folders, options.class_order
    )
    names, names_source = resolved.names, resolved.source
    if resolved.order_notice and announce:
        logger.warning(resolved.order_notice, extra={"event": "notice"})
    check_folders_match(
        loaded.num_classes, resolved, discovery.class_folders, options.allow_class_mismatch
    )
    labels = resolve_labels(discovery, names, options.labels)
    rescale, rescale_source = _rescale(loaded, options.rescale)
    exif = options.exif_transpose
    if exif is None:  # follow the model's sidecar: `batchuq train` records its choice
        exif = bool(loaded.sidecar.get("exif_transpose", False))
    method = _method(options, members)
    _check_adaptive(options, method)
    plan = RunPlan(
        images=str(images),
        discovery=discovery,
        loaded=loaded,
        members=members,
        spec=spec,
        labels=labels,
        class_names_source=names_source,
        tta=options.tta,
        seed=options.seed,
        batch_size=options.batch_size,
        max_pixels=options.max_pixels,
        rescale=rescale,
        exif_transpose=exif,
        rule=rule,
        calibration=calibration,
        temperature=options.temperature,
        method=method,
        save_samples=options.save_samples,
        metadata={},
        adaptive=options.adaptive,
    )
    plan.metadata.update(run_metadata(plan, options, rescale_source, settings))
    _check_predictor(plan, options.allow_predictor_mismatch)
    return plan


def _check_adaptive(options: ScoreOptions, method: UncertaintyMethod) -> None:
    """Refuse ``--passes auto`` for a method that cannot draw passes on demand."""
    if options.adaptive is not None and not method.supports_adaptive:
        raise UsageError(
            "--passes auto draws MC-dropout passes on demand: it needs MC dropout or a deep "
            "ensemble with dropout, not this method (use a number of passes). "
            f"Received: passes='auto', method={method.metadata().get('method')!r}"
        )


def _calibration(options: ScoreOptions, model_sha256: str) -> Calibration | None:
    """The run's calibration, checked against the model; None without one."""
    calibration = options.calibration
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.from_json(calibration)
    if calibration is not None:
        calibration.check_model(model_sha256)
    if options.temperature and calibration is None:
        raise UsageError("--temperature needs --calibration. Received: calibration=None")
    return calibration


def _rescale(loaded: LoadedModel, rescale: float | None) -> tuple[float, str]:
    """The pixel scale and its source; says so when the model scales pixels itself."""
    rescale, source = resolve_rescale(loaded, rescale, DEFAULT_RESCALE)
    if source.startswith("model layer"):
        logger.warning(
            "The model scales pixels itself (%s): using --rescale 1, pixels 0..255. "
            "Pass --rescale to override.",
            source,
            extra={"event": "notice"},
        )
    return rescale, source


def _method(options: ScoreOptions, members: Sequence[LoadedModel]) -> UncertaintyMethod:
    """The uncertainty method: the one given (or built by the factory given), else the one the
    registry names or detects for the models (``batchuq.methods.registry``)."""
    if isinstance(options.method, UncertaintyMethod):
        return options.method
    if callable(options.method):
        return options.method(members[0])
    return choose_method(members, options.method_settings, options.method)


def resolve_labels(
    discovery: Discovery,
    class_names: list[str],
    labels: str | os.PathLike[str] | dict[str, str] | None,
) -> FileLabels:
    """Apply a labels file (folder id -> readable name) to the class names and file labels.

    Args:
        discovery: The discovered files (a file's label is its class folder).
        class_names: The model's class names.
        labels: A ``monkey_labels.txt``-style file, a dict, or None.

    Returns:
        The display class names and every file's label text and class index.

    Raises:
        UsageError: If the labels file names none of the classes.
    """
    label_map = _label_map(labels)
    check_labels_match(label_map, discovery.class_folders or class_names)
    display = [label_map.get(name, name) for name in class_names]
    index_of = {name: i for i, name in enumerate(class_names)}
    index_of |= {name: i for i, name in enumerate(display)}
    folders = [f.folder_label for f in discovery.files]
    return FileLabels(
        class_names=display,
        texts=[None if lab is None else label_map.get(lab, lab) for lab in folders],
        indices=[None if lab is None else index_of.get(lab) for lab in folders],
    )


def _label_map(labels: str | os.PathLike[str] | dict[str, str] | None) -> dict[str, str]:
    """``--labels`` as a mapping: read from its file, or as given; empty without one."""
    if isinstance(labels, (str, os.PathLike)):
        return read_labels_file(labels)
    return dict(labels or {})


def check_labels_match(label_map: dict[str, str], class_folders: list[str]) -> None:
    """Refuse a labels file that names none of the classes; warn when it misses some.

    Args:
        label_map: Folder id -> readable name, from ``--labels``.
        class_folders: The class folders found (or the model's class names when unlabelled).

    Raises:
        UsageError: If ``label_map`` is not empty and matches none of ``class_folders``.
    """
    missing = labels_name_some(label_map, class_folders)
    if missing:
        logger.warning(
            "The labels file does not name %d class folders, which keep their folder names: %s",
            len(missing),
            ", ".join(missing),
        )


def run_metadata(
    plan: RunPlan,
    options: ScoreOptions,
    rescale_source: str,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Parquet metadata of a run: versions, inputs, every setting and the method's own."""
    return {
        "batchuq_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "images": plan.images,
        "model_path": _model_path(plan.members),
        "model_sha256": combined_sha256(plan.members),
        "demo_model": plan.loaded.bundled,
        "class_names": plan.labels.class_names,
        "class_names_source": plan.class_names_source,
        "tta": plan.tta.copies,
        "augmentation": plan.tta.as_metadata(),
        "seed": plan.seed,
        "rescale": plan.rescale,
        "rescale_source": rescale_source,
        "exif_transpose": plan.exif_transpose,
        "images_root": plan.discovery.root,
        "skipped_files": len(plan.discovery.skipped),
        "include_all": options.include_all,
        "decision_rule": plan.rule.as_metadata(),
        "samples_per_image": plan.samples_per_image,
        "samples_saved": plan.save_samples,
        "calibration": _calibration_metadata(plan),
        "settings": settings,
        **plan.method.metadata(),
        **_adaptive_metadata(plan),
    }


def _adaptive_metadata(plan: RunPlan) -> dict[str, Any]:
    """With adaptive passes: ``passes`` is ``"auto"`` and ``adaptive`` holds the settings."""
    if plan.adaptive is None:
        return {"adaptive": None}
    rule = plan.rule
    stopping = stopping_record(
        rule.name, rule.min_median, rule.min_confidence, plan.decision_temperature
    )
    return {"passes": "auto", "adaptive": {**plan.adaptive.as_metadata(), "stopping": stopping}}


def _model_path(members: Sequence[LoadedModel]) -> str:
    """The model file, or for an ensemble the folder its members share (each is listed in the
    method's ``members``)."""
    if len(members) == 1:
        return str(members[0].path)
    return os.path.commonpath([str(m.path.parent) for m in members])


def _calibration_metadata(plan: RunPlan) -> dict[str, Any] | None:
    calibration = plan.calibration
    if calibration is None:
        return None
    return {
        "temperature": calibration.temperature if plan.temperature else None,
        "fitted_temperature": calibration.temperature,
        "conformal_alpha": calibration.settings.get("alpha"),
        "conformal_method": calibration.conformal_method,
        # RAPS's k_reg and lambda; randomised sets draw U from this run's seed and each path.
        "conformal_params": calibration.settings.get("conformal_params"),
        "created": calibration.created,
    }


def _check_predictor(plan: RunPlan, allow: bool) -> None:
    """Refuse (or, if allowed, record) a calibration fitted on another predictor.

    Conformal sets and the temperature hold for the predictor they were fitted on only.
    """
    if plan.calibration is None:
        return
    mismatch = plan.calibration.check_predictor(plan.metadata, allow=allow)
    if mismatch:
        logger.warning("%s (--allow-predictor-mismatch).", predictor_mismatch_message(mismatch))
    plan.metadata["calibration"]["predictor_mismatch"] = [
        {"setting": name, "calibration": a, "run": b} for name, a, b in mismatch
    ] or None
