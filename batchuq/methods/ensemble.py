"""Deep ensembles (docs/methods.md): M independently trained members, each sampled like MC dropout.

Every member is wrapped in its own ``MCDropout``, so the numerics (prefix run once, passes tiled,
masks drawn from per-row keys, bfloat16, logits) are those of the one sampler batchuq has. With
``passes=1`` a member's single pass is its deterministic softmax (no dropout is sampled, so a
member needs no dropout layer): the classic deep ensemble. With ``passes=T`` each member draws T
MC-dropout passes: an ensemble of MC-dropout members.

The job decodes and augments a chunk of rows once and hands the same rows to every member.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from batchuq.defaults import DEFAULT_MEMORY_BUDGET_MB, DEFAULT_PRECISION
from batchuq.errors import ModelError, UsageError
from batchuq.methods.base import UncertaintyMethod
from batchuq.methods.mc_dropout import MCDropout
from batchuq.methods.registry import MethodSettings, register_method
from batchuq.models import LoadedModel, as_loaded_model
from batchuq.seeds import mix

#: The ``method`` recorded in the Parquet metadata of an ensemble run.
METHOD_NAME = "deep_ensemble"

MemberArg = LoadedModel | keras.Model | str | os.PathLike[str]


class DeepEnsemble(UncertaintyMethod):
    """M members, each drawing T passes per row; ``samples_per_row`` is M x T.

    Order of the samples. ``sample`` returns, per row, the T passes of member 0, then the T
    passes of member 1, ... (member-major): sample ``m * T + t`` of a row is pass ``t`` of
    member ``m``. The job groups a row per TTA copy (copy-major), so an image's
    S = K x M x T samples are ordered copy, member, pass: sample ``(k * M + m) * T + t`` is
    pass ``t`` of member ``m`` on copy ``k``.

    Randomness. Member ``m`` samples a row with the key ``mix(row_key, m)`` (``seeds.mix``),
    every member alike, member 0 included: members are symmetric, each stream depends only on
    the row key, the member index and the pass index (``MCDropout`` mixes the pass in), and no
    member reuses the stream that plain MC dropout draws from the row key itself. Hence a
    one-member ensemble equals ``MCDropout`` of that member bitwise with ``passes=1`` (nothing
    is random), and with ``passes=T`` it equals ``MCDropout`` sampled with the keys
    ``mix(row_keys, 0)``: the same distribution, other masks.

    Args:
        members: The members: ``LoadedModel``s (as ``models.load_model`` returns), Keras models
            or ``.keras`` paths, in a fixed order (the order of the samples).
        passes: T, passes per member and row (1 = each member's deterministic softmax).
        sample_layers: Name patterns of the dropout layers to sample, in every member.
        memory_budget_mb: Bound on the activations of one chunk of rows in one member; the
            members run one after the other.
        precision: ``float32`` or ``bfloat16`` (see ``MCDropout``), the same for every member.
        logits: The members output logits: apply a softmax to every pass.
        names: One display name per member, for messages and the metadata (default: the
            member's file name, or ``member-<index>`` for an in-memory Keras model).

    Raises:
        UsageError: If there is no member, ``names`` does not match ``members``, or the members
            disagree on input shape, number of classes, or (as written in their sidecars)
            class names or rescale; the message names the member.
        ModelError: If a member is not a one-input, one-output image classifier.
        NoDropoutError: If ``passes > 1`` and a member has no dropout layer to sample.
    """

    def __init__(
        self,
        members: Sequence[MemberArg],
        passes: int = 1,
        sample_layers: list[str] | None = None,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        precision: str = DEFAULT_PRECISION,
        logits: bool = False,
        names: Sequence[str] | None = None,
    ) -> None:
        if not members:
            raise UsageError("A deep ensemble needs at least one member. Received: members=[]")
        self.members = [as_loaded_model(member) for member in members]
        self.names = _member_names(self.members, names)
        check_members_agree(self.members, self.names)
        self.methods = _member_methods(
            self.members, passes, sample_layers, memory_budget_mb, precision, logits
        )
        self.passes = passes
        self.precision_requested = precision
        self.samples_per_row = len(self.members) * passes
        self.pass_groups = len(self.members)
        self.supports_adaptive = passes > 1
        # The extras every member gives (``combine_member_extras``).
        self.extras = tuple(
            name
            for name in self.methods[0].extras
            if all(name in method.extras for method in self.methods)
        )

    @property
    def class_names(self) -> list[str] | None:
        """The class names the members' sidecars agree on, or None when none records them."""
        return _agreed(self.members, "class_names")

    @property
    def rescale(self) -> float | None:
        """The rescale the members' sidecars agree on, or None when none records it."""
        value = _agreed(self.members, "rescale")
        return None if value is None else float(value)

    def row_chunks(self, rows: int) -> list[tuple[int, int]]:
        """Chunks that fit every member's memory budget: the finest of the members' chunkings.

        Each member cuts rows into balanced chunks of at most its own largest chunk; the member
        that needs the most chunks has the smallest largest chunk, and its chunks fit every
        other member in one call.
        """
        return max((method.row_chunks(rows) for method in self.methods), key=len)

    def sample(self, rows: tf.Tensor, row_keys: tf.Tensor) -> np.ndarray:
        """``(rows, members * passes, classes)`` probabilities, member-major.

        Args:
            rows: float32 images after rescaling, ``(rows, H, W, C)`` (or ``(rows, H, W)``).
            row_keys: uint32 keys, ``(rows,)``.

        Returns:
            float32 ``(rows, M * T, classes)``: the T passes of member 0, then of member 1, ...
        """
        rows = tf.convert_to_tensor(rows, tf.float32)  # once, not once per member
        row_keys = tf.convert_to_tensor(row_keys, tf.uint32)
        parts = [
            method.sample(rows, mix(row_keys, index))  # (rows, T, classes)
            for index, method in enumerate(self.methods)
        ]
        return np.concatenate(parts, axis=1)

    def sample_with_extras(
        self, rows: tf.Tensor, row_keys: tf.Tensor
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``sample`` and the members' extras combined (``combine_member_extras``)."""
        rows = tf.convert_to_tensor(rows, tf.float32)
        row_keys = tf.convert_to_tensor(row_keys, tf.uint32)
        drawn = [
            method.sample_with_extras(rows, mix(row_keys, index))
            for index, method in enumerate(self.methods)
        ]
        probs = np.concatenate([part for part, _ in drawn], axis=1)
        return probs, combine_member_extras([extras for _, extras in drawn], self.extras)

    def prepared_extras(self, prepared: list[Any]) -> dict[str, np.ndarray]:
        """The members' extras of prepared rows, combined (``combine_member_extras``)."""
        parts = [
            method.prepared_extras(member_rows)
            for method, member_rows in zip(self.methods, prepared, strict=True)
        ]
        return combine_member_extras(parts, self.extras)

    def prepare(self, rows: tf.Tensor, row_keys: tf.Tensor) -> list[Any]:
        """Every member's prepared rows, each with the member's keys ``mix(row_key, m)``."""
        rows = tf.convert_to_tensor(rows, tf.float32)
        row_keys = tf.convert_to_tensor(row_keys, tf.uint32)
        return [
            method.prepare(rows, mix(row_keys, index)) for index, method in enumerate(self.methods)
        ]

    def join_prepared(self, parts: list[tuple[list[Any], np.ndarray]]) -> list[Any]:
        """Every member's rows of several prepared chunks, each joined by the member."""
        return [
            method.join_prepared([(prepared[m], index) for prepared, index in parts])
            for m, method in enumerate(self.methods)
        ]

    def sample_passes(
        self, prepared: list[Any], index: np.ndarray, first_pass: int | np.ndarray, passes: int
    ) -> np.ndarray:
        """``(n, members, passes, classes)``: the passes of member 0, then of member 1, ..."""
        parts = [
            method.sample_passes(member_rows, index, first_pass, passes)[:, 0]
            for method, member_rows in zip(self.methods, prepared, strict=True)
        ]
        return np.stack(parts, axis=1)

    def metadata(self) -> dict[str, Any]:
        """The method, its members, and the sampling settings every member shares.

        ``sampled_layers`` is always a list with one entry per member (that member's sampled
        dropout layer names, empty with ``passes=1``), so that its shape does not depend on
        whether the members happen to share layer names.
        """
        first = self.methods[0].sampler
        return {
            "method": METHOD_NAME,
            "members": [
                {
                    "index": index,
                    "name": name,
                    "path": str(member.path),
                    "sha256": member.sha256,
                }
                for index, (member, name) in enumerate(zip(self.members, self.names, strict=True))
            ],
            "passes": self.passes,
            "precision": first.precision,
            "precision_requested": self.precision_requested,
            "sampled_layers": [
                [layer.name for layer in method.sampler.dropout_layers] for method in self.methods
            ],
            "logits": first.logits,
        }


def combine_member_extras(
    parts: Sequence[dict[str, np.ndarray]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The ensemble's extras from its members': scalars averaged, features concatenated.

    Each member's features live in their own space, so they are not averaged: each row's
    features of member ``m`` are L2-normalised, the M vectors concatenated and divided by
    ``sqrt(M)`` (a unit vector whose squared distance to another is the mean of the members'
    squared distances between normalised features).

    Args:
        parts: Per member, its extras (``MCDropout.sample_with_extras``).
        names: The extras every member gives.

    Returns:
        float32 ``(rows,)`` per scalar, ``(rows, M * D)`` for ``features``.
    """
    combined = {}
    for name in names:
        values = [part[name] for part in parts]
        if name == "features":
            unit = [v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in values]
            combined[name] = (np.concatenate(unit, axis=1) / math.sqrt(len(unit))).astype(
                np.float32
            )
        else:
            combined[name] = np.mean(values, axis=0, dtype=np.float64).astype(np.float32)
    return combined


def _member_names(members: list[LoadedModel], names: Sequence[str] | None) -> list[str]:
    """The members' display names: those given, else file names (``member-i`` in memory)."""
    if names is None:
        return [
            f"member-{i}" if str(m.path) == "<in-memory>" else m.path.name
            for i, m in enumerate(members)
        ]
    if len(names) != len(members):
        raise UsageError(
            f"`names` must give one name per member ({len(members)}). Received: names={names!r}"
        )
    return [str(name) for name in names]


def _member_methods(
    members: list[LoadedModel],
    passes: int,
    sample_layers: list[str] | None,
    memory_budget_mb: float,
    precision: str,
    logits: bool,
) -> list[MCDropout]:
    """One ``MCDropout`` per member, with the precision the first one settled on.

    The first member resolves ``precision`` (and warns once if bfloat16 falls back to
    float32); the others get its outcome, so the warning is not repeated M times.
    """
    methods: list[MCDropout] = []
    for index, member in enumerate(members):
        resolved = methods[0].sampler.precision if methods else precision
        try:
            methods.append(
                MCDropout(member.model, passes, sample_layers, memory_budget_mb, resolved, logits)
            )
        except ModelError as exc:  # e.g. no dropout layer: say which member
            raise type(exc)(f"Ensemble member {index} ({str(member.path)!r}): {exc}") from exc
    return methods


def check_members_agree(members: list[LoadedModel], names: list[str] | None = None) -> None:
    """Refuse members that could not be averaged: other inputs, classes, class names or rescale.

    Every member is compared with member 0 on its input shape and number of outputs. Class
    names and rescale are compared among the members whose sidecar records them (an in-memory
    Keras model has no sidecar and is not checked on them).

    Args:
        members: The loaded members, in ensemble order.
        names: Their display names, for messages (default: none).

    Raises:
        UsageError: Naming the first member that disagrees (index, name and path).
        ModelError: If a member is not a one-input, one-output image classifier.
    """
    shapes = [_member_property(i, m, "input shape", _input_shape) for i, m in enumerate(members)]
    classes = [_member_property(i, m, "classes", _classes) for i, m in enumerate(members)]
    _check_equal(members, names, "input shape", "input_shape", shapes)
    _check_equal(members, names, "number of classes", "classes", classes)
    for key, what in (("class_names", "class names"), ("rescale", "rescale")):
        recorded = [m.sidecar.get(key) for m in members]
        _check_equal(members, names, f"{what} (from its sidecar)", key, recorded, skip_none=True)


def _input_shape(member: LoadedModel) -> tuple[int, ...]:
    """The input shape without the batch axis (via ``image_spec``, which checks it)."""
    spec = member.image_spec
    return (spec.height, spec.width) + ((spec.channels,) if spec.channel_axis else ())


def _classes(member: LoadedModel) -> int:
    return member.num_classes


def _member_property(index: int, member: LoadedModel, what: str, read: Any) -> Any:
    """``read(member)``, its ``ModelError`` prefixed with the member that caused it."""
    try:
        return read(member)
    except ModelError as exc:
        raise ModelError(
            f"Ensemble member {index} ({str(member.path)!r}), reading its {what}: {exc}"
        ) from exc


def _check_equal(
    members: list[LoadedModel],
    names: list[str] | None,
    what: str,
    key: str,
    values: list[Any],
    skip_none: bool = False,
) -> None:
    """Raise ``UsageError`` for the first member whose value differs from the reference.

    The reference is member 0's value (with ``skip_none``: the first value that is not None,
    and None values are not compared).
    """
    present = [(i, v) for i, v in enumerate(values) if not (skip_none and v is None)]
    if not present:
        return
    first, reference = present[0]
    for index, value in present[1:]:
        if _same(value, reference):
            continue
        label = f" {names[index]!r}" if names else ""
        raise UsageError(
            f"All members of an ensemble must agree on their {what}: member {index}{label} "
            f"({str(members[index].path)!r}) has {value!r}, member {first} "
            f"({str(members[first].path)!r}) has {reference!r}. "
            f"Received: member={index}, path={str(members[index].path)!r}, {key}={value!r}"
        )


def _same(a: Any, b: Any) -> bool:
    """Equal, numbers up to float rounding (a rescale of 1/255 written by two processes)."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return [str(x) for x in a] == [str(x) for x in b]
    return a == b


def _agreed(members: list[LoadedModel], key: str) -> Any:
    """The first sidecar value of ``key`` among the members (they agree: checked), or None."""
    return next((m.sidecar[key] for m in members if m.sidecar.get(key) is not None), None)


def build_deep_ensemble(models: Sequence[LoadedModel], settings: MethodSettings) -> DeepEnsemble:
    """The deep ensemble of a run's models, as its settings ask (the registry's builder)."""
    return DeepEnsemble(
        list(models),
        settings.passes,
        settings.sample_layers,
        settings.memory_budget_mb,
        precision=settings.precision,
        logits=settings.logits,
    )


def _several_models(models: Sequence[LoadedModel]) -> bool:
    return len(models) > 1


register_method(METHOD_NAME, build_deep_ensemble, detect=_several_models)
