"""The calibration file: what ``batchuq calibrate`` fitted, for ``batchuq score`` to use.

One JSON file (format ``CALIBRATION_FORMAT``) holds the per-class validation thresholds
(``batchuq.postprocess.thresholds``), the temperature (``batchuq.postprocess.temperature``) and
the conformal quantiles (``batchuq.postprocess.conformal``), with the model's sha256 and the
predictors they were fitted on:

* ``predictor``: the *scoring predictor* (``--score-passes``, ``--score-tta``, ...), on whose
  per-image MC means the temperature and the conformal quantiles were fitted;
* ``threshold_predictor``: the predictor of the thresholds (``--tta`` copies, ``--passes``).

A conformal set covers the true class only when the calibration and the test images are scored
by the same predictor (docs/methods.md, "Conformal prediction sets"), so ``score
--calibration`` compares its own settings (``PREDICTOR_KEYS``, read by
``predictor_from_metadata``) with ``predictor`` and refuses a run that differs
(``PredictorMismatchError``) unless it is told to allow it. A file that cannot be read, is not
of this format, or was made for another model raises ``CalibrationError``.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from batchuq._version import __version__
from batchuq.defaults import DEFAULT_CONFORMAL, DEFAULT_METHOD
from batchuq.errors import CalibrationError, PredictorMismatchError, UsageError
from batchuq.postprocess.conformal import (
    RANDOMISED_METHODS,
    check_method,
    prediction_sets,
    set_uniforms,
)
from batchuq.postprocess.ood import KnnIndex, load_knn, save_knn
from batchuq.postprocess.rules import RISK_SCORES, SelectiveRule

__all__ = [
    "CALIBRATION_FORMAT",
    "PREDICTOR_KEYS",
    "Calibration",
    "CalibrationWarning",
    "PredictorMismatchError",
    "format_summary",
    "predictor_differences",
    "predictor_from_metadata",
    "predictor_mismatch_message",
]

CALIBRATION_FORMAT = "batchuq-calibration/2"
# What decides the per-image MC-mean probabilities of `batchuq score` for a given model file and
# image, as recorded in its Parquet metadata (see ``predictor_from_metadata``). The seed is not
# one of them: another seed is another draw of the same random predictor (every image gets its
# own random stream either way). Batch size and memory budget do not change the results.
PREDICTOR_KEYS = (
    "method",
    "passes",
    "tta",
    "augmentation",
    "rescale",
    "precision",
    "sampled_layers",
    "logits",
    "exif_transpose",
    "adaptive",
)
# What of a run's ``adaptive`` metadata (``--passes auto``) decides its samples: the rounds,
# the error level and how the decision rule stops (``rules.stopping_record``).
ADAPTIVE_KEYS = ("min_passes", "max_passes", "alpha", "stopping")


# --------------------------------------------------------------------------------------------
# The predictor a calibration was fitted on.


def predictor_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``PREDICTOR_KEYS`` from a ``score`` run's Parquet metadata.

    ``augmentation`` is ``None`` with one TTA copy (the image is used as it is, so the
    augmentation settings change nothing), else the settings without ``copies``. A
    ``rescale`` given as ``{"value": ...}`` is reduced to its value. ``adaptive`` is kept
    only for a ``--passes auto`` run, as its ``ADAPTIVE_KEYS``. Keys that the metadata does
    not record are left out.
    """
    predictor = {key: metadata[key] for key in PREDICTOR_KEYS if key in metadata}
    adaptive = predictor.pop("adaptive", None)
    if isinstance(adaptive, dict):
        predictor["adaptive"] = {k: adaptive.get(k, _NOT_RECORDED) for k in ADAPTIVE_KEYS}
    predictor.setdefault("method", DEFAULT_METHOD)  # runs before methods were recorded
    rescale = predictor.get("rescale")
    if isinstance(rescale, dict):
        predictor["rescale"] = rescale.get("value")
    augmentation = predictor.get("augmentation")
    if predictor.get("tta") == 1 or not isinstance(augmentation, dict):
        predictor["augmentation"] = None
    else:
        predictor["augmentation"] = {k: v for k, v in augmentation.items() if k != "copies"}
    return predictor


# The score (and calibrate) option that sets each predictor setting, for messages.
_OPTION_OF = {
    "method": "--model (the method follows the model)",
    "passes": "--passes",
    "tta": "--tta",
    "rescale": "--rescale",
    "precision": "--precision",
    "sampled_layers": "--sample-layers",
    "logits": "--logits",
    "exif_transpose": "--exif-transpose",
    "adaptive.min_passes": "--min-passes",
    "adaptive.max_passes": "--max-passes",
    "adaptive.alpha": "--adaptive-alpha",
    "adaptive.stopping": "score --rule, --min-median, --min-confidence, --temperature; "
    "calibrate --score-rule",
}
_NOT_RECORDED = "<not recorded>"


def _same(a: Any, b: Any) -> bool:
    """Whether two predictor settings agree (numbers up to rounding, bools only with bools)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def predictor_differences(
    calibrated: dict[str, Any], run: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """The settings in which two predictors differ: ``(name, calibrated value, run value)``.

    Augmentation settings are compared one by one (``augmentation.rotation``, ...) when both
    predictors augment; when only one does, ``tta`` already differs. The adaptive settings
    likewise (``adaptive.max_passes``, ...) when both runs are ``--passes auto``.
    """
    differences = []
    for key in PREDICTOR_KEYS:
        if key not in calibrated and key not in run:
            continue
        missing = DEFAULT_METHOD if key == "method" else _NOT_RECORDED  # older files
        a, b = calibrated.get(key, missing), run.get(key, missing)
        if key in ("augmentation", "adaptive"):
            # When only one side augments (is adaptive), tta (passes) already differs.
            if isinstance(a, dict) and isinstance(b, dict):
                for name in sorted(set(a) | set(b)):
                    x, y = a.get(name, _NOT_RECORDED), b.get(name, _NOT_RECORDED)
                    if not _same(x, y):
                        differences.append((f"{key}.{name}", x, y))
            continue
        if not _same(a, b):
            differences.append((key, a, b))
    return differences


def _show(value: Any) -> str:
    """A predictor setting as the mismatch message shows it."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _option(name: str) -> str:
    """The option(s) that set predictor setting ``name``, for messages."""
    if name.startswith("augmentation."):
        return f"--tta-{name.split('.', 1)[1]}"
    if name in ("passes", "tta"):  # calibrate's --passes/--tta are the thresholds' predictor
        return f"score {_OPTION_OF[name]}, calibrate --score-{name}"
    if name.startswith("adaptive.") and name != "adaptive.stopping":
        return f"score {_OPTION_OF[name]}, calibrate {_OPTION_OF[name]}"
    return _OPTION_OF.get(name, name)


class CalibrationWarning(UserWarning):
    """Something weak in a calibration that the user should know (printed by the CLI)."""


def predictor_mismatch_message(differences: list[tuple[str, Any, Any]]) -> str:
    """One sentence naming each differing setting, its option and both values."""
    listed = "; ".join(
        f"{name} ({_option(name)}): {_show(a)} in the calibration, {_show(b)} in this run"
        for name, a, b in differences
    )
    adaptive = any(name == "passes" and "auto" in (a, b) for name, a, b in differences)
    hint = (
        " (a calibration for --passes auto is fitted with `batchuq calibrate --score-passes "
        "auto` and the same --min-passes, --max-passes, --adaptive-alpha and rule)"
        if adaptive
        else ""
    )
    return (
        "The calibration was fitted on another predictor than this run's, so its conformal sets, "
        f"temperature and risk threshold do not apply here: {listed}{hint}"
    )


# --------------------------------------------------------------------------------------------
# The calibration file.


def _json_floats(values: np.ndarray) -> list[float | None]:
    """Floats for JSON, non-finite ones as ``None``."""
    # Full precision: rounding a quantile or threshold would move borderline decisions.
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values)]


def _array(values: list[float | None], missing: float) -> np.ndarray:
    """JSON numbers as float64, ``None`` read as ``missing``."""
    return np.array([missing if v is None else float(v) for v in values], dtype=np.float64)


def _optional_array(values: list[float | None] | None) -> np.ndarray | None:
    """Thresholds that a file may lack (``None``), ``None`` entries read as ``NaN``."""
    return None if values is None else _array(values, np.nan)


def _selective(data: dict[str, Any] | None) -> SelectiveRule | None:
    """The ``selective`` entry of a calibration file (``None``: not fitted)."""
    if data is None:
        return None
    score = str(data["score"])
    if score not in RISK_SCORES:
        raise ValueError(f"selective.score {score!r} is not one of {RISK_SCORES}")
    return SelectiveRule(
        score=score,
        threshold=float(data["threshold"]),
        statement=str(data["statement"]),
        certificate=dict(data["certificate"]),
    )


def _knn(entry: Any, path: str | os.PathLike[str], model_sha256: str) -> KnnIndex:
    """The kNN index a calibration file's ``knn`` entry names (``postprocess.ood.load_knn``).

    Raises:
        CalibrationError: If the entry is malformed or its side file missing or altered.
    """
    try:
        return load_knn(dict(entry), path, model_sha256)
    except (KeyError, TypeError, OSError) as exc:
        raise CalibrationError(
            f"The calibration's knn entry or its side file is malformed ({exc}). "
            f"Received: path={str(path)!r}"
        ) from exc


@dataclass
class Calibration:
    """Everything ``batchuq calibrate`` fits, with what it was fitted on.

    Attributes:
        class_names: The model's class names (``C``).
        thresholds: ``(C,)`` validation thresholds; ``NaN`` = no threshold (JSON ``null``).
        temperature: Fitted temperature ``T``.
        conformal_quantiles: Quantiles of ``conformal_scores`` of the MC mean (no
            temperature): shape ``(1,)`` for ``lac`` and ``aps``, ``(C,)`` for ``class``;
            ``inf`` = every class in the set (JSON ``null``).
        model_sha256: sha256 of the ``.keras`` file calibrated.
        conformal_method: ``lac``, ``class`` or ``aps`` (see ``prediction_sets``).
        predictor: The scoring predictor that the temperature and the conformal quantiles were
            fitted on, as ``predictor_from_metadata`` describes a ``score`` run (``passes``,
            ``tta``, ``augmentation``, ``rescale``, ``precision``, ``sampled_layers``,
            ``logits``). ``score`` refuses a run whose predictor differs.
        threshold_predictor: The same for the predictor the thresholds were fitted on.
        model_path: Where the model file was.
        settings: ``tta``, ``passes``, ``score_passes``, ``score_tta``, ``percentile``,
            ``alpha``, ``conformal``, ``seed``, ``augmentation``, ``rescale``,
            ``sample_layers``, the temperature bounds and, from the CLI, ``options``: every
            option's value and source.
        stats: Figures on the validation set: ``images``, ``skipped``, ``accuracy``,
            ``nll_before``, ``nll_after``, ``temperature_at_bound``, per-class
            ``copies_predicted`` and ``images_per_class``,
            ``threshold_coverage``/``threshold_accuracy`` (image level, scoring predictor's MC
            mean), ``conformal_coverage`` and ``mean_set_size`` (in-sample), ``runs`` (1 when
            one run served both predictors, else 2) and ``warnings``.
        created: ISO time of the run (UTC).
        batchuq_version: Version that wrote the file.
        selective: The selective threshold of ``score --rule risk`` and its certificate
            (``calibrate --target-risk``), fitted on the scoring predictor's MC mean; ``None``
            when not fitted (files written before it existed have none and still load).
        tempered_thresholds: ``(C,)`` the thresholds of ``score --rule threshold
            --temperature``: per predicted class, the ``percentile`` of the confidences of the
            *tempered* MC means of the scoring predictor (the values that rule compares), not
            of the threshold predictor's copies; ``None`` in files written before they existed
            (such a file is refused for that pair of options).
        knn: The kNN OOD score's normalised calibration features (``postprocess.ood``),
            fitted on the scoring predictor; ``None`` when the model's penultimate features
            were not found. Stored in a side file ``<name>.knn.npz`` next to the JSON.

    Raises:
        CalibrationError: If ``thresholds`` or ``conformal_quantiles`` do not fit the classes
            and the conformal method.
        UsageError: If ``conformal_method`` is not one of ``CONFORMAL_METHODS``.
    """

    class_names: list[str]
    thresholds: np.ndarray
    temperature: float
    conformal_quantiles: np.ndarray
    model_sha256: str
    conformal_method: str = DEFAULT_CONFORMAL
    predictor: dict[str, Any] = field(default_factory=dict)
    threshold_predictor: dict[str, Any] = field(default_factory=dict)
    model_path: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    batchuq_version: str = __version__
    selective: SelectiveRule | None = None
    tempered_thresholds: np.ndarray | None = None
    knn: KnnIndex | None = None

    def __post_init__(self) -> None:
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        if self.tempered_thresholds is not None:
            self.tempered_thresholds = np.asarray(self.tempered_thresholds, dtype=np.float64)
        self.conformal_quantiles = np.atleast_1d(
            np.asarray(self.conformal_quantiles, dtype=np.float64)
        )
        check_method(self.conformal_method)
        classes = len(self.class_names)
        for name in ("thresholds", "tempered_thresholds"):
            values = getattr(self, name)
            if values is not None and values.shape != (classes,):
                raise CalibrationError(
                    f"`{name}` must have one value per class ({classes}). Received: "
                    f"{name}.shape={values.shape}"
                )
        expected = (classes,) if self.conformal_method == "class" else (1,)
        if self.conformal_quantiles.shape != expected:
            raise CalibrationError(
                f"`conformal_quantiles` must have shape {expected} for conformal method "
                f"{self.conformal_method!r}. Received: conformal_quantiles.shape="
                f"{self.conformal_quantiles.shape}"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``NaN`` thresholds and ``inf`` quantiles become ``None``)."""
        data = asdict(replace(self, knn=None))  # not the features: the side file holds them
        data["knn"] = None if self.knn is None else self.knn.describe()
        data["thresholds"] = _json_floats(self.thresholds)
        if self.tempered_thresholds is not None:
            data["tempered_thresholds"] = _json_floats(self.tempered_thresholds)
        data["conformal_quantiles"] = _json_floats(self.conformal_quantiles)
        return {"format": CALIBRATION_FORMAT, **data}

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration to ``path`` (through a temporary file renamed into place); a kNN
        index goes to its side file first (``postprocess.ood.save_knn``)."""
        out = Path(path)
        data = self.as_dict()
        if self.knn is not None:
            data["knn"] = save_knn(self.knn, out)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        handle, temp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(temp, out)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a file written by ``to_json``.

        Raises:
            CalibrationError: If the file is unreadable, incomplete, or not a batchuq
                calibration file of this format (a file of the first format, which recorded no
                predictor, is refused with a request to run ``batchuq calibrate`` again).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(
                f"Could not read the calibration file: {exc}. Received: path={str(path)!r}"
            ) from exc
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found == "batchuq-calibration/1":
            raise CalibrationError(
                "This calibration file was written by an older batchuq: it does not record the "
                "predictor its conformal sets were fitted on (and fitted them on 100 augmented "
                "copies, not on what `batchuq score` computes). Run `batchuq calibrate` again. "
                f"Received: path={str(path)!r}, format={found!r}"
            )
        if found != CALIBRATION_FORMAT:
            raise CalibrationError(
                f"Not a batchuq calibration file (expected format {CALIBRATION_FORMAT!r}). "
                f"Received: path={str(path)!r}, format={found!r}"
            )
        try:
            calibration = cls(
                class_names=list(data["class_names"]),
                thresholds=_array(data["thresholds"], np.nan),
                temperature=float(data["temperature"]),
                conformal_quantiles=_array(data["conformal_quantiles"], np.inf),
                model_sha256=str(data["model_sha256"]),
                conformal_method=str(data["conformal_method"]),
                predictor=dict(data["predictor"]),
                threshold_predictor=dict(data.get("threshold_predictor") or {}),
                model_path=str(data.get("model_path", "")),
                settings=dict(data.get("settings", {})),
                stats=dict(data.get("stats", {})),
                created=str(data.get("created", "")),
                batchuq_version=str(data.get("batchuq_version", "")),
                selective=_selective(data.get("selective")),
                tempered_thresholds=_optional_array(data.get("tempered_thresholds")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"The calibration file is incomplete or malformed ({exc}). "
                f"Received: path={str(path)!r}"
            ) from exc
        if data.get("knn") is not None:
            calibration.knn = _knn(data["knn"], path, calibration.model_sha256)
        return calibration

    @property
    def alpha(self) -> float | None:
        """The conformal miscoverage the quantiles were fitted for."""
        return self.settings.get("alpha")

    def prediction_sets(
        self,
        mean_probs: np.ndarray,
        relative_paths: list[str] | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Conformal sets (``(b, C)`` bool) for the scoring predictor's MC mean ``mean_probs``
        (without temperature).

        Args:
            mean_probs: ``(b, C)`` MC means.
            relative_paths: The images' relative paths; the randomised methods
                (``aps-random``, ``raps``) draw each image's ``U`` from it and ``seed``.
            seed: The run seed (the calibration's own seed when ``None``).

        Returns:
            ``(b, C)`` bool set membership.

        Raises:
            UsageError: If a randomised method gets no paths.
        """
        probs = np.clip(np.asarray(mean_probs, dtype=np.float64), 0.0, 1.0)  # as calibrated
        method = self.conformal_method
        if method not in RANDOMISED_METHODS:
            return prediction_sets(probs, self.conformal_quantiles, method)
        if relative_paths is None:
            raise UsageError(
                f"Conformal method {method!r} is randomised per image and needs the images' "
                "relative paths. Received: relative_paths=None"
            )
        seed = int(self.settings.get("seed", 0)) if seed is None else int(seed)
        params = self.settings.get("conformal_params") or {}
        raps = (int(params["k_reg"]), float(params["lambda"])) if method == "raps" else None
        uniforms = set_uniforms(seed, list(relative_paths))
        return prediction_sets(probs, self.conformal_quantiles, method, uniforms, raps)

    def rule_thresholds(self, temperature: bool) -> np.ndarray:
        """The per-class thresholds of ``score --rule threshold``, with or without
        ``--temperature``: each fitted on what the rule then compares.

        Raises:
            CalibrationError: With ``temperature``, for a file written before tempered
                thresholds were fitted.
        """
        if not temperature:
            return self.thresholds
        if self.tempered_thresholds is None:
            raise CalibrationError(
                "This calibration file has no thresholds for the tempered MC mean (it was "
                "written before they were fitted): --rule threshold --temperature would compare "
                "a tempered mean with untempered thresholds. Run `batchuq calibrate` again, or "
                "drop --temperature. Received: temperature=True, tempered_thresholds=None"
            )
        return self.tempered_thresholds

    def check_model(self, sha256: str) -> None:
        """Refuse to use the calibration with a model other than the one it was fitted on.

        Raises:
            CalibrationError: If ``sha256`` differs from ``model_sha256``.
        """
        if sha256 != self.model_sha256:
            raise CalibrationError(
                "calibration.json was made for another model (sha256 "
                f"{self.model_sha256[:12] or '<unknown>'}...); run `batchuq calibrate` with this "
                f"model. Received: model_sha256={sha256!r}"
            )

    def check_predictor(
        self,
        run_metadata: dict[str, Any],
        allow: bool = False,
        only: Collection[str] | None = None,
    ) -> list[tuple[str, Any, Any]]:
        """Compare the calibration's predictor with a ``score`` run's.

        Args:
            run_metadata: The run's Parquet metadata (or a ``predictor_from_metadata`` dict).
            allow: Return the differences instead of raising (``--allow-predictor-mismatch``).
            only: Compare these settings only (those known before the model is loaded);
                default: all of ``PREDICTOR_KEYS``.

        Returns:
            The differences, ``(name, calibrated value, run value)``; empty when they agree.

        Raises:
            PredictorMismatchError: If they differ and ``allow`` is false.
        """
        calibrated, run = self.predictor, predictor_from_metadata(run_metadata)
        if only is not None:
            keys = set(only) & set(calibrated) & set(run)
            calibrated = {k: v for k, v in calibrated.items() if k in keys}
            run = {k: v for k, v in run.items() if k in keys}
        differences = predictor_differences(calibrated, run)
        if differences and not allow:
            raise PredictorMismatchError(
                f"{predictor_mismatch_message(differences)}. Run `batchuq calibrate` again with "
                "this run's settings (the options named; they default to the [score] table of "
                "the config file), score with the calibration's settings, or pass "
                "--allow-predictor-mismatch to score anyway. "
                f"Received: allow_predictor_mismatch={allow}"
            )
        return differences


def _quantile_text(q: float) -> str:
    """A conformal quantile for the summary."""
    return "inf" if np.isinf(q) else f"{q:.4f}"


def _skipped_text(stats: dict[str, Any]) -> str:
    """``N skipped``, and why: unreadable (named in the log) or no label among the classes."""
    skipped, unreadable = stats["skipped"], stats.get("unreadable")
    if not skipped or unreadable is None:  # files written before the count was kept
        return f"{skipped} skipped"
    parts = [f"{unreadable} unreadable"] if unreadable else []
    if skipped > unreadable:
        parts.append(f"{skipped - unreadable} with no label among the model's classes")
    return f"{skipped} skipped: {', '.join(parts)}"


def _predictor_text(predictor: dict[str, Any]) -> str:
    """The scoring predictor's passes and copies (and adaptive settings), for the summary."""
    text = f"--passes {predictor.get('passes')} --tta {predictor.get('tta')}"
    adaptive = predictor.get("adaptive")
    if isinstance(adaptive, dict):
        text += (
            f" (adaptive: --min-passes {adaptive['min_passes']} --max-passes "
            f"{adaptive['max_passes']} --adaptive-alpha {adaptive['alpha']}, stopping "
            f"{_show(adaptive['stopping'])})"
        )
    return text


def format_summary(calibration: Calibration) -> str:
    """A short human-readable summary of a calibration."""
    stats = calibration.stats
    per_class = calibration.conformal_method == "class"
    width = max(len(name) for name in calibration.class_names)
    tempered = calibration.tempered_thresholds
    lines = [
        f"{'class':<{width}}  threshold"
        + ("   tempered" if tempered is not None else "")
        + ("  conformal q" if per_class else "")
        + "  copies  images",
    ]
    copies = stats.get("copies_predicted") or [None] * len(calibration.class_names)
    images = stats.get("images_per_class") or [None] * len(calibration.class_names)
    for i, name in enumerate(calibration.class_names):
        t = calibration.thresholds[i]
        t_text = "none" if np.isnan(t) else f"{t:.4f}"
        q_text = f"  {_quantile_text(calibration.conformal_quantiles[i]):>11}" if per_class else ""
        if tempered is not None:
            t_text += "  " + ("none" if np.isnan(tempered[i]) else f"{tempered[i]:.4f}").rjust(9)
        lines.append(f"{name:<{width}}  {t_text:>9}{q_text}  {copies[i]!s:>6}  {images[i]!s:>6}")
    lines.append(
        f"temperature {calibration.temperature:.4f}: NLL {stats.get('nll_before', math.nan):.4f}"
        f" -> {stats.get('nll_after', math.nan):.4f}"
        + (
            " (at the search bound: the validation set is too easy or too small)"
            if stats.get("temperature_at_bound")
            else ""
        )
    )
    quantile = (
        "one quantile per class"
        if per_class
        else f"quantile {_quantile_text(calibration.conformal_quantiles[0])}"
    )
    raps = calibration.settings.get("conformal_params") or {}
    if "k_reg" in raps:
        quantile += (
            f" (k_reg {raps['k_reg']}, lambda {raps['lambda']:g}, tuned on "
            f"{raps['tuning_images']} images, quantile on {raps['quantile_images']})"
        )
    lines.append(
        f"conformal {calibration.conformal_method} at alpha {calibration.alpha}: {quantile}; "
        f"fitted with the scoring predictor {_predictor_text(calibration.predictor)}"
    )
    if "accuracy" in stats:
        coverage, sel = stats.get("threshold_coverage"), stats.get("threshold_accuracy")
        sel_text = "n/a" if sel is None else f"{sel:.4f}"
        lines.append(
            f"validation: {stats['images']} images ({_skipped_text(stats)}), accuracy "
            f"{stats['accuracy']:.4f}; thresholds accept {coverage:.1%} (accuracy {sel_text}); "
            f"conformal coverage {stats['conformal_coverage']:.1%}, mean set size "
            f"{stats['mean_set_size']:.2f}"
        )
    selective = calibration.selective
    if selective is not None:
        lines.append(
            f"risk rule: accept {selective.score} >= {selective.threshold:.6g}; "
            f"{selective.statement}"
        )
    return "\n".join(lines)
