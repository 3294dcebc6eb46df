"""Usage checks of a run that need the model, done before TensorFlow is imported.

``prepare_run`` checks a run's settings against the loaded model; loading TensorFlow and the
model takes seconds. The same checks are made here first, in a moment, from what the files say
(``batchuq.model_facts``: the model's ``config.json`` or ``.h5`` attributes, its sidecar; the
calibration JSON; the labels file; the folder listing): the model's inputs, outputs and Lambda
layers, a model with no dropout layer to sample, ``--class-names`` against the outputs, class
folders against the outputs (``--allow-class-mismatch``), a labels file naming no folder,
``--rule threshold`` or ``--temperature`` without a calibration, ``--rule risk`` without a
calibration that holds a selective threshold (or with ``--temperature``), ``--rule threshold
--temperature`` with a calibration that has no tempered thresholds, a calibration made for
another model or fitted on another predictor (``--allow-predictor-mismatch``; with ``--passes
auto`` that includes the adaptive settings and how the rule stops).

A check whose facts the files do not state plainly (a custom layer, a nested model, bfloat16
that may fall back) is left to ``prepare_run``: the run is then refused after the model loads,
as before, never refused here for what this module could not read. Nothing here imports
TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchuq.classes import (
    DEFAULT_CLASS_ORDER,
    check_folders_match,
    labels_name_some,
    resolve_names,
    sidecar_file,
)
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_MAX_PASSES,
    DEFAULT_METHOD,
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_MEDIAN,
    DEFAULT_MIN_PASSES,
    DEFAULT_PRECISION,
    DEFAULT_RESCALE,
    DEFAULT_RULE,
    DEFAULT_TTA,
)
from batchuq.discover import IMAGE_EXTENSIONS, class_folder_names, order_classes, read_labels_file
from batchuq.errors import ModelError, NoDropoutError, UsageError
from batchuq.model_facts import ModelFacts, read_model_facts
from batchuq.model_files import (
    combined_digest,
    file_sha256,
    input_shape_problem,
    inputs_message,
    lambda_layer_message,
    model_paths,
    outputs_message,
)
from batchuq.postprocess.calibration_file import Calibration
from batchuq.postprocess.rules import RISK_RULE_NEEDS, check_risk_options, stopping_record
from batchuq.storage import is_url

ENSEMBLE_METHOD = "deep_ensemble"  # methods.ensemble.METHOD_NAME (that module imports TF)


@dataclass(frozen=True)
class RunRequest:
    """What the command line asked for, as far as the checks here need it.

    Attributes mirror ``score``'s options (``calibrate`` leaves the calibration ones unset);
    ``passes`` is a number or ``"auto"``.
    """

    models: Sequence[str | os.PathLike[str]] = ()
    passes: int | str | None = None
    min_passes: int = DEFAULT_MIN_PASSES
    max_passes: int = DEFAULT_MAX_PASSES
    adaptive_alpha: float = DEFAULT_ADAPTIVE_ALPHA
    tta: int = DEFAULT_TTA
    augmentation: dict[str, Any] | None = None
    rule: str | None = None
    min_median: float = DEFAULT_MIN_MEDIAN
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    calibration: str | os.PathLike[str] | None = None
    temperature: bool = False
    allow_predictor_mismatch: bool = False
    class_names: list[str] | None = None
    class_order: str = DEFAULT_CLASS_ORDER
    labels: str | os.PathLike[str] | None = None
    allow_class_mismatch: bool = False
    rescale: float | None = None
    sample_layers: list[str] | None = None
    precision: str = DEFAULT_PRECISION
    logits: bool = False
    exif_transpose: bool | None = None
    include_all: bool = False
    follow_symlinks: bool = False

    @property
    def fixed_passes(self) -> int | None:
        """The passes the method is built for (``max_passes`` with ``auto``)."""
        if self.passes is None:
            return None
        return self.max_passes if self.passes == "auto" else int(self.passes)


def check_before_loading(images: str | os.PathLike[str], request: RunRequest) -> None:
    """Refuse, in a moment and without TensorFlow, a run that ``prepare_run`` would refuse.

    Args:
        images: The images folder (an object-storage URL is not listed here).
        request: The run's options.

    Raises:
        UsageError: The error ``prepare_run`` would raise (a ``ModelError``,
            ``ClassMismatchError``, ``CalibrationError`` ...), with the same message.
    """
    if request.rule == "threshold" and request.calibration is None:
        raise UsageError(
            "The threshold rule needs per-class thresholds: pass --calibration "
            "calibration.json (made by `batchuq calibrate`). Received: calibration=None"
        )
    if request.rule == "risk":
        check_risk_options(
            calibration=request.calibration is not None, temperature=request.temperature
        )
    if request.temperature and request.calibration is None:
        raise UsageError("--temperature needs --calibration. Received: calibration=None")
    order_classes([], request.class_order)  # refuses an unknown order
    label_map = read_labels_file(request.labels) if request.labels is not None else {}
    paths = model_paths(list(request.models))
    members = [read_model_facts(path) for path in paths]
    for facts in members:
        _check_model(facts, request)
    _check_classes(images, members[0], label_map, request)
    if request.calibration is not None:
        _check_calibration(paths, members, request)


def _check_model(facts: ModelFacts, request: RunRequest) -> None:
    """The model checks of loading, of ``image_spec``, ``num_classes`` and MC dropout."""
    if facts.has_lambda:
        raise ModelError(lambda_layer_message(facts.path))
    if facts.outputs is not None and facts.outputs != 1:
        raise ModelError(outputs_message(facts.outputs))
    if facts.inputs is not None and facts.inputs != 1:
        raise ModelError(inputs_message(facts.inputs))
    problem = None if facts.input_shape is None else input_shape_problem(facts.input_shape)
    if problem is not None:
        raise ModelError(problem)
    passes = request.fixed_passes
    if passes is None or facts.sngp is not False:
        if request.passes == "auto" and facts.sngp:
            raise UsageError(
                "--passes auto draws MC-dropout passes on demand: it needs MC dropout or a deep "
                "ensemble with dropout, not this method (use a number of passes). "
                "Received: passes='auto', method='sngp'"
            )
        return
    if passes > 1 and facts.dropout_layers(request.sample_layers) == []:
        which = f" matching {list(request.sample_layers)}" if request.sample_layers else ""
        raise NoDropoutError(
            f"The model has no dropout layer{which} to sample, so {passes} passes would all "
            "be identical. Use passes=1 (--passes 1) for the plain softmax, or a model with "
            f"Dropout layers. Received: passes={passes}"
        )


def _check_classes(
    images: str | os.PathLike[str],
    facts: ModelFacts,
    label_map: dict[str, str],
    request: RunRequest,
) -> None:
    """``--class-names`` against the outputs, the folders against the outputs, the labels file
    against the folders (or the class names of an unlabelled folder)."""
    folders = None
    if not is_url(images) and Path(images).is_dir():
        extensions = None if request.include_all else IMAGE_EXTENSIONS
        folders = class_folder_names(images, extensions, request.follow_symlinks)
    if facts.num_classes is None:
        if folders:
            labels_name_some(label_map, folders)
        return
    resolved = resolve_names(
        facts.num_classes,
        request.class_names,
        facts.sidecar.get("class_names"),
        folders,
        request.class_order,
        sidecar_file(facts.path),
    )
    if folders is None:
        return
    check_folders_match(facts.num_classes, resolved, folders, request.allow_class_mismatch)
    labels_name_some(label_map, folders or resolved.names)


def _check_calibration(paths: list[Path], members: list[ModelFacts], request: RunRequest) -> None:
    """The calibration file, its model's sha256, and the predictor settings known now."""
    calibration = Calibration.from_json(request.calibration)
    if request.rule == "risk" and calibration.selective is None:
        raise UsageError(
            f"{RISK_RULE_NEEDS} Received: calibration={str(request.calibration)!r}, selective=None"
        )
    calibration.rule_thresholds(request.temperature and request.rule == "threshold")
    calibration.check_model(combined_digest([file_sha256(path) for path in paths]))
    temperature = calibration.temperature if request.temperature else None
    run = run_predictor(members, request, temperature)
    calibration.check_predictor(run, allow=request.allow_predictor_mismatch, only=set(run))


def run_predictor(
    members: list[ModelFacts], request: RunRequest, temperature: float | None = None
) -> dict[str, Any]:
    """The run's predictor settings (of ``PREDICTOR_KEYS``) that the files and options fix.

    Settings that depend on what only the loaded model tells (the method of a model with
    custom layers, the pixel scale of a nested model, the layers sampled in an ensemble, a
    bfloat16 request that may fall back) are left out.

    Args:
        members: What the model files say, one per model.
        request: The run's options.
        temperature: The calibration's temperature when ``--temperature`` is on (adaptive
            stopping may read the tempered mean), else ``None``.

    Returns:
        Run metadata as ``predictor_from_metadata`` reads it, with those keys only.
    """
    first = members[0]
    run: dict[str, Any] = {}
    if len(members) > 1:
        run["method"] = ENSEMBLE_METHOD
    elif first.sngp is not None:
        run["method"] = "sngp" if first.sngp else DEFAULT_METHOD
    sngp = run.get("method") == "sngp"
    if request.passes is not None:
        auto = request.passes == "auto" and not sngp
        run["passes"] = "auto" if auto else request.fixed_passes
        if auto:
            run["adaptive"] = _adaptive(request, temperature)
    run["tta"] = int(request.tta)
    run["augmentation"] = {"copies": int(request.tta), **(request.augmentation or {})}
    rescale = _rescale(first, request.rescale)
    if rescale is not None:
        run["rescale"] = rescale
    if sngp or request.precision == "float32":
        run["precision"] = "float32"
    if sngp:
        run["sampled_layers"] = []
    elif run.get("method") == DEFAULT_METHOD and request.fixed_passes is not None:
        layers = [] if request.fixed_passes < 2 else first.dropout_layers(request.sample_layers)
        if layers is not None:
            run["sampled_layers"] = layers
    run["logits"] = False if sngp else bool(request.logits)
    exif = request.exif_transpose
    if exif is None:  # the sidecar's choice, as prepare_run
        exif = bool(first.sidecar.get("exif_transpose", False))
    run["exif_transpose"] = exif
    return run


def _adaptive(request: RunRequest, temperature: float | None) -> dict[str, Any]:
    """The ``adaptive`` metadata a ``--passes auto`` run records (``run_metadata``)."""
    rule = request.rule or DEFAULT_RULE
    stopping = stopping_record(rule, request.min_median, request.min_confidence, temperature)
    return {
        "min_passes": int(request.min_passes),
        "max_passes": int(request.max_passes),
        "alpha": float(request.adaptive_alpha),
        "stopping": stopping,
    }


def _rescale(facts: ModelFacts, rescale: float | None) -> float | None:
    """The pixel scale ``models.resolve_rescale`` will choose, or ``None`` if unknown yet."""
    if rescale is not None:
        return float(rescale)
    stored = facts.sidecar.get("rescale")
    if stored is not None:
        return float(stored)
    scales = facts.scales_pixels()
    if scales is None:
        return None
    return 1.0 if scales else DEFAULT_RESCALE
