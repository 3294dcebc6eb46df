"""What a scoring run is asked: three objects, each built once and handed down as it is.

* ``ScoreOptions``: what decides the rows (model, passes, TTA, seed, rule, classes, method, ...);
* ``RunControl``: how the run is driven, not what it computes (resume, stop requests, progress,
  where each setting came from);
* ``RaySettings``: where and how wide the Ray engine runs (its presence picks that engine).

The command line builds them from its options; from Python::

    score_directory("imgs", "out.parquet", ScoreOptions(passes=50, tta=TTAConfig(copies=10)))

Each checks its own values when built (``UsageError``, a ``ValueError``, naming the argument).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from batchuq.augment import TTAConfig
from batchuq.classes import DEFAULT_CLASS_ORDER
from batchuq.defaults import (
    DEFAULT_ADAPTIVE_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_ROWS,
    DEFAULT_CPUS_PER_WORKER,
    DEFAULT_MAX_PASSES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_MIN_PASSES,
    DEFAULT_PASSES,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
)
from batchuq.discover import CLASS_ORDERS
from batchuq.errors import UsageError
from batchuq.methods.base import MethodFactory, UncertaintyMethod
from batchuq.methods.registry import MethodSettings, method_named
from batchuq.models import LoadedModel
from batchuq.postprocess.calibration_file import Calibration
from batchuq.postprocess.rules import DecisionRule
from batchuq.sampling.precision import PRECISIONS
from batchuq.sampling.stopping import AdaptivePasses

ModelArg = str | os.PathLike[str] | keras.Model | LoadedModel | None
# One model, an ensemble folder, or several models (the members of a deep ensemble, in order).
ModelsArg = ModelArg | Sequence[ModelArg]
MethodArg = str | UncertaintyMethod | MethodFactory | None


@dataclass(frozen=True)
class ScoreOptions:
    """What decides a scoring run's rows.

    Attributes:
        model: ``.keras`` path, a Keras model, a ``LoadedModel``, an ensemble folder, a list of
            models (a deep ensemble's members), or ``None`` for ``$BATCHUQ_MODEL`` or the
            bundled demo model.
        passes: MC dropout passes T per augmented copy (1 = deterministic), or ``"auto"``:
            rounds of ``min_passes`` per image until its decision is settled, at most
            ``max_passes`` (docs/methods.md, "Adaptive passes"); the ``passes`` column says
            how many each image got.
        tta: Test-time augmentation settings (a ``TTAConfig``; a number is the copies K with
            the default augmentation).
        seed: Seed of all randomness; the same seed gives the same output.
        batch_size: Images per batch (results do not depend on it).
        rule: Decision rule (default: the MC median rule with ``min_median=0.5``).
        class_names: Names of the model outputs; they override the model's sidecar (with a
            warning). Precedence: ``class_names``, the sidecar, the class folders when as many
            as outputs (numbered in ``class_order``), ``0 .. C-1`` (``batchuq.classes``).
        labels: A ``monkey_labels.txt``-style file (or dict) mapping folder ids to names; it
            renames classes and fixes no order.
        class_order: How class folders are numbered when they give the class names: ``keras``
            (``sorted()``, as ``keras.utils.image_dataset_from_directory``) or ``natural``
            (``n2`` before ``n10``). A notice says which when the two differ.
        allow_class_mismatch: Score labelled class folders that nothing maps onto the model's
            outputs (a folder of other classes, for OOD); by default that is a
            ``ClassMismatchError``.
        rescale: Factor applied to pixel values ``0..255``; ``None`` takes the value stored
            by ``batchuq train``, else 1 when the model starts with its own ``Rescaling`` or
            ``Normalization`` layer, else ``1/255`` (the metadata's ``rescale_source`` says).
        sample_layers: Name patterns of the dropout layers to sample (default: all).
        memory_budget_mb: Memory budget for one chunk of rows (images x TTA copies) and its
            tiled passes; peak memory grows with neither T nor K.
        max_pixels: Images with more pixels are refused (error row) before decoding.
        precision: ``float32``, or ``bfloat16`` for the sampled part of the network. Where
            bfloat16 is not native (the CPU's flags, oneDNN's ``ONEDNN_MAX_CPU_ISA`` cap) or a
            bfloat16 probe fails, it falls back to ``float32`` with a warning (the metadata
            keeps both ``precision`` and ``precision_requested``).
        logits: The model outputs logits; apply a softmax to each pass.
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
        include_all: Try every file, not only those with an image extension; files that are
            not images become error rows. Otherwise such files are counted as skipped.
        exif_transpose: Turn images upright by their EXIF orientation; ``None`` follows the
            model's sidecar (``batchuq train`` records its choice), else off, as Keras's loader.
        follow_symlinks: Follow symlinked folders and files that point outside the images
            folder (by default such files become error rows).
        method: The uncertainty method: the name of a registered one
            (``batchuq.methods.registered_methods()``), a built ``UncertaintyMethod``, or a
            factory building it from the loaded model. Default: the registry's choice for the
            model (a deep ensemble for several models, SNGP for a model with a GP head, else
            MC dropout) with ``passes``, ``sample_layers``, ``memory_budget_mb``,
            ``precision`` and ``logits``. With the Ray engine, a name or a factory (each worker
            builds its own method), not a built method.
        min_passes: With ``passes="auto"``, passes every image gets and the size of a round.
        max_passes: With ``passes="auto"``, the most passes an image gets; an image that
            never settles gets the samples and decision of ``passes=max_passes``.
        adaptive_alpha: With ``passes="auto"``, the bound on each image's probability of
            stopping before ``max_passes`` with another decision than unlimited passes would
            give (assuming independent passes; docs/methods.md, "Adaptive passes"). Images
            that reach ``max_passes`` are not covered: their fixed-T decision may differ.

    Raises:
        UsageError: For a value out of range (the message names it).
    """

    model: ModelsArg = None
    passes: int | str = DEFAULT_PASSES
    tta: TTAConfig = field(default_factory=TTAConfig)
    seed: int = DEFAULT_SEED
    batch_size: int = DEFAULT_BATCH_SIZE
    rule: DecisionRule | None = None
    class_names: list[str] | None = None
    labels: str | os.PathLike[str] | dict[str, str] | None = None
    class_order: str = DEFAULT_CLASS_ORDER
    allow_class_mismatch: bool = False
    rescale: float | None = None
    sample_layers: list[str] | None = None
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = DEFAULT_PRECISION
    logits: bool = False
    save_samples: bool = False
    calibration: str | os.PathLike[str] | Calibration | None = None
    temperature: bool = False
    allow_predictor_mismatch: bool = False
    include_all: bool = False
    exif_transpose: bool | None = None
    follow_symlinks: bool = False
    method: MethodArg = None
    min_passes: int = DEFAULT_MIN_PASSES
    max_passes: int = DEFAULT_MAX_PASSES
    adaptive_alpha: float = DEFAULT_ADAPTIVE_ALPHA

    def __post_init__(self) -> None:
        if not isinstance(self.tta, TTAConfig):  # just the copies: the default augmentation
            object.__setattr__(self, "tta", TTAConfig(copies=int(self.tta)))
        _check_passes(self.passes)
        for name in ("batch_size", "max_pixels", "min_passes"):
            if getattr(self, name) < 1:
                raise UsageError(
                    f"`{name}` must be at least 1. Received: {name}={getattr(self, name)}"
                )
        if self.passes == "auto" and self.max_passes < 2:
            raise UsageError(
                "--passes auto needs max_passes of at least 2. "
                f"Received: max_passes={self.max_passes}"
            )
        if not 0.0 < self.adaptive_alpha < 1.0:
            raise UsageError(
                "`adaptive_alpha` must be in (0, 1). "
                f"Received: adaptive_alpha={self.adaptive_alpha}"
            )
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("class_order", self.class_order, CLASS_ORDERS)
        if not self.memory_budget_mb > 0:
            raise UsageError(
                "`memory_budget_mb` must be positive. "
                f"Received: memory_budget_mb={self.memory_budget_mb}"
            )
        if isinstance(self.method, str):
            method_named(self.method)  # refuses a name nothing registered

    @property
    def adaptive(self) -> AdaptivePasses | None:
        """The adaptive-passes settings with ``passes='auto'``, else None."""
        if self.passes != "auto":
            return None
        return AdaptivePasses(self.min_passes, self.max_passes, self.adaptive_alpha)

    @property
    def fixed_passes(self) -> int:
        """Passes the method is built for: ``passes``, or ``max_passes`` with ``'auto'``."""
        return self.max_passes if self.passes == "auto" else int(self.passes)

    @property
    def method_settings(self) -> MethodSettings:
        """What these options say to the method (``batchuq.methods.registry``)."""
        return MethodSettings(
            passes=self.fixed_passes,
            sample_layers=self.sample_layers,
            memory_budget_mb=self.memory_budget_mb,
            precision=self.precision,
            logits=self.logits,
        )


def _check_passes(passes: int | str) -> None:
    if isinstance(passes, str):
        if passes != "auto":
            raise UsageError(f"`passes` must be a number or 'auto'. Received: passes={passes!r}")
        return
    if passes < 1:
        raise UsageError(f"`passes` must be at least 1. Received: passes={passes}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")


@dataclass(frozen=True)
class RunControl:
    """How a scoring run is driven, apart from what decides its rows (``ScoreOptions``).

    Attributes:
        resume: Keep finished rows in ``OUTPUT.checkpoint/`` and, when it exists from an
            interrupted run with the same settings, skip the images already scored there.
        checkpoint_rows: With ``resume``, rows per checkpoint part; with the Ray engine, the
            most images per unit of work.
        should_stop: Polled before and after each batch's sampling (or between the Ray
            engine's parts); when it returns True the run raises ``StopRequested`` there,
            leaving no output (with ``resume``, finished rows stay in the checkpoint). The
            CLI's SIGTERM/SIGINT handlers use it, because an exception raised from a signal
            handler inside TensorFlow's C++ code can crash the process.
        progress: Show a tqdm progress bar on stderr.
        settings: Where each setting came from, stored as the metadata's ``settings`` (the CLI
            passes ``{option: {"value": ..., "source": ...}}``; see
            ``config.settings_provenance``).
        started: ``time.perf_counter()`` when the run was asked for.

    Raises:
        UsageError: If ``checkpoint_rows`` is below 1.
    """

    resume: bool = False
    checkpoint_rows: int = DEFAULT_CHECKPOINT_ROWS
    should_stop: Callable[[], bool] | None = None
    progress: bool = False
    settings: dict[str, Any] | None = None
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.checkpoint_rows < 1:
            raise UsageError(
                "`checkpoint_rows` must be at least 1. "
                f"Received: checkpoint_rows={self.checkpoint_rows}"
            )


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the Ray engine runs (``score_directory(..., ray=RaySettings())``).

    Attributes:
        address: The cluster (``host:port`` or ``ray://host:port``); ``None`` takes
            ``$RAY_ADDRESS``, else starts a Ray on this machine for the run. A Ray already
            initialised in this process is used as it is.
        workers: Actors in the pool, each loading the model once; ``None``: one per CPU of the
            cluster.
        cpus_per_worker: CPUs Ray books for each actor (TensorFlow runs on that many threads,
            rounded up). Below 1, actors never book every CPU, which keeps CPUs for Ray's own
            tasks and other jobs on the cluster.
        imports: Modules (names or ``.py`` paths) each worker imports before loading the model,
            so that custom layers and methods registered there exist in the workers too (the
            CLI passes its ``--import``).

    Raises:
        UsageError: If ``workers`` is below 1 or ``cpus_per_worker`` not above 0.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER
    imports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "imports", tuple(self.imports))
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"`workers` must be at least 1. Received: workers={self.workers}")
        if not self.cpus_per_worker > 0:
            raise UsageError(
                "`cpus_per_worker` must be above 0 (fractions such as 0.5 are fine). "
                f"Received: cpus_per_worker={self.cpus_per_worker}"
            )
