"""Input checks shared by ``batchuq.metrics`` and ``batchuq.postprocess``.

Every check turns a caller's argument into the NumPy array or number the maths needs, or raises
``UsageError`` (a ``ValueError``) naming the argument, in the Keras style
``... Received: name=...``. A message shows the offending element where there is one
(``probs[3, 1] = 1.5``) and a short view of the whole value, with its shape and dtype.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from batchuq.errors import UsageError

# Float32 probabilities may overshoot [0, 1] by rounding (an MC mean of softmax outputs can sum
# to 1.0000001); values this close are clipped, not rejected.
PROB_TOLERANCE = 1e-6

__all__ = [
    "PROB_TOLERANCE",
    "as_array",
    "bool_vector",
    "float_vector",
    "fraction",
    "in_range",
    "int_vector",
    "labels",
    "one_of",
    "positive",
    "positive_int",
    "probabilities",
    "same_length",
    "show",
    "vector",
]


def show(value: object) -> str:
    """A short repr of ``value`` for error messages.

    Args:
        value: Anything; arrays are shown on one line with at most 8 elements, their shape
            and dtype.

    Returns:
        The text, at most about 200 characters.
    """
    if isinstance(value, np.ndarray):
        with np.printoptions(threshold=8, edgeitems=3, precision=6):
            text = np.array2string(value, separator=", ")
        # On one line, so that a log line holds the whole message.
        text = " ".join(text.split())
        return f"array({text}, shape={value.shape}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first true element of ``mask`` (any number of axes)."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _element(name: str, index: tuple[int, ...]) -> str:
    """``name[i, j]`` for the messages."""
    return f"{name}[{', '.join(str(i) for i in index)}]"


def _real(array: np.ndarray, name: str) -> None:
    """Refuse booleans, strings, objects and complex numbers."""
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise UsageError(f"`{name}` must hold real numbers. Received: {name}={show(array)}")


# --------------------------------------------------------------------------------------------
# Arrays.


def as_array(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a NumPy array (no copy when it is one).

    Raises:
        UsageError: If NumPy cannot make an array of it (e.g. ragged lists).
    """
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"`{name}` must be array-like ({exc}). Received: {name}={show(value)}"
        ) from None


def vector(value: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``value`` as a 1-D array, shape ``(n,)``, non-empty unless ``allow_empty``.

    Raises:
        UsageError: If it is not 1-D, or empty when that is not allowed.
    """
    array = as_array(value, name)
    if array.ndim != 1:
        raise UsageError(
            f"`{name}` must be a 1-D array of shape (n,). Received: {name}={show(array)}"
        )
    if not allow_empty and array.size == 0:
        raise UsageError(f"`{name}` must not be empty. Received: {name}={show(array)}")
    return array


def float_vector(
    value: ArrayLike,
    name: str,
    *,
    unit_interval: bool = False,
    allow_empty: bool = False,
    allow_nan: bool = False,
) -> np.ndarray:
    """A 1-D float64 array ``(n,)`` of finite real numbers.

    Args:
        value: The argument.
        name: Its name, for the messages.
        unit_interval: Require values in ``[0, 1]`` (within ``PROB_TOLERANCE``, then clipped).
        allow_empty: Accept ``n = 0``.
        allow_nan: Accept ``NaN`` (a missing value, e.g. "no threshold"); infinities are still
            refused.

    Returns:
        The float64 copy.

    Raises:
        UsageError: If it is not 1-D, empty, not real, not finite or outside ``[0, 1]``.
    """
    array = vector(value, name, allow_empty=allow_empty)
    _real(array, name)
    out = array.astype(np.float64)
    bad = np.isinf(out) if allow_nan else ~np.isfinite(out)
    if bad.any():
        i = _first(bad)[0]
        raise UsageError(
            f"`{name}` must hold finite numbers, but {name}[{i}] = {out[i]}. "
            f"Received: {name}={show(array)}"
        )
    if unit_interval:
        outside = (out < -PROB_TOLERANCE) | (out > 1.0 + PROB_TOLERANCE)
        if outside.any():
            i = _first(outside)[0]
            raise UsageError(
                f"`{name}` must hold values in [0, 1], but {name}[{i}] = {out[i]}. "
                f"Received: {name}={show(array)}"
            )
        out = np.clip(out, 0.0, 1.0)
    return out


def bool_vector(value: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """A 1-D bool array ``(n,)`` from booleans or the numbers 0 and 1.

    Raises:
        UsageError: If it is not 1-D, empty, or holds other values.
    """
    array = vector(value, name, allow_empty=allow_empty)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise UsageError(
            f"`{name}` must hold booleans (or 0 and 1). Received: {name}={show(array)}"
        )
    not_binary = ~np.isin(array, (0, 1))
    if not_binary.any():
        i = _first(not_binary)[0]
        raise UsageError(
            f"`{name}` must hold booleans (or 0 and 1), but {name}[{i}] = {array[i]}. "
            f"Received: {name}={show(array)}"
        )
    return array.astype(bool)


def int_vector(value: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """A 1-D int64 array ``(n,)`` of class indices (floats are accepted when whole numbers).

    Raises:
        UsageError: If it is not 1-D, empty, or holds anything but whole numbers.
    """
    array = vector(value, name, allow_empty=allow_empty)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        whole = np.isfinite(array) & (np.floor(array) == array)
        if whole.all():
            return array.astype(np.int64)
        i = _first(~whole)[0]
        raise UsageError(
            f"`{name}` must hold integer class indices, but {name}[{i}] = {array[i]}. "
            f"Received: {name}={show(array)}"
        )
    raise UsageError(f"`{name}` must hold integer class indices. Received: {name}={show(array)}")


def same_length(**arrays: np.ndarray) -> None:
    """Refuse arrays whose first axes differ (named in the order given).

    Raises:
        UsageError: If the lengths differ.
    """
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        names = ", ".join(lengths)
        shown = ", ".join(f"{name}.shape={array.shape}" for name, array in arrays.items())
        raise UsageError(f"{names} must have the same length. Received: {shown}")


def probabilities(
    value: ArrayLike,
    name: str,
    *,
    axes: Sequence[str] | None = None,
    allow_empty: bool = True,
) -> np.ndarray:
    """Probabilities as float64, classes on the last axis, clipped to ``[0, 1]``.

    Args:
        value: The argument.
        name: Its name, for the messages.
        axes: Names of the axes it must have, e.g. ``("n", "classes")`` for ``(n, classes)``;
            ``None`` accepts any shape ``(..., classes)``.
        allow_empty: Accept zero rows (first axis of length 0); never zero classes.

    Returns:
        The float64 copy, values within ``PROB_TOLERANCE`` of ``[0, 1]`` clipped into it.

    Raises:
        UsageError: If the shape is wrong, there is no class (or no row), or a value is not a
            real, finite number in ``[0, 1]``.
    """
    array = as_array(value, name)
    fits = array.ndim >= 1 and array.shape[-1] > 0
    fits = fits and (axes is None or array.ndim == len(axes))
    fits = fits and (allow_empty or array.shape[0] > 0)
    if not fits:
        kind = "an array of shape (..., classes)"
        if axes is not None:
            kind = f"a {len(axes)}-D array of shape ({', '.join(axes)})"
        need = "class" if allow_empty else "row and class"
        raise UsageError(
            f"`{name}` must be {kind} with at least one {need}. Received: {name}={show(array)}"
        )
    _real(array, name)
    out = array.astype(np.float64)
    bad = ~np.isfinite(out) | (out < -PROB_TOLERANCE) | (out > 1.0 + PROB_TOLERANCE)
    if bad.any():
        index = _first(bad)
        raise UsageError(
            f"`{name}` must hold probabilities in [0, 1], but {_element(name, index)} = "
            f"{out[index]}. Received: {name}={show(array)}"
        )
    return np.clip(out, 0.0, 1.0)


def labels(
    value: ArrayLike,
    classes: int,
    name: str = "labels",
    *,
    rows: int | None = None,
    rows_of: str = "probs",
    allow_empty: bool = False,
) -> np.ndarray:
    """Class indices in ``[0, classes)``, shape ``(n,)`` int64.

    Args:
        value: The argument.
        classes: Number of classes ``C``.
        name: Its name, for the messages.
        rows: The length it must have (one index per row of ``rows_of``), if any.
        rows_of: Name of the array whose rows the indices label, for the message.
        allow_empty: Accept ``n = 0``.

    Returns:
        The int64 indices.

    Raises:
        UsageError: If they are not whole numbers, not ``rows`` of them, or out of range.
    """
    array = int_vector(value, name, allow_empty=allow_empty)
    if rows is not None and len(array) != rows:
        raise UsageError(
            f"`{name}` must have shape ({rows},), one class index per row of `{rows_of}`. "
            f"Received: {name}.shape={array.shape}"
        )
    outside = (array < 0) | (array >= classes)
    if outside.any():
        i = _first(outside)[0]
        raise UsageError(
            f"`{name}` must be class indices in [0, {classes}), but {name}[{i}] = {array[i]}. "
            f"Received: {name}={show(array)}"
        )
    return array


# --------------------------------------------------------------------------------------------
# Numbers and choices.


def _number(value: object, name: str) -> float:
    """``value`` as a float, refusing what is not a real number."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise UsageError(f"`{name}` must be a number. Received: {name}={value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"`{name}` must be a number. Received: {name}={show(value)}") from None


def in_range(value: object, name: str, low: float, high: float) -> float:
    """A number in the closed interval ``[low, high]`` (``NaN`` is refused).

    Raises:
        UsageError: If it is not a number in ``[low, high]``.
    """
    number = _number(value, name)
    if not low <= number <= high:
        raise UsageError(f"`{name}` must be in [{low:g}, {high:g}]. Received: {name}={number}")
    return number


def fraction(value: object, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """A number in the open interval ``(low, high)``, by default a fraction such as ``alpha``.

    Raises:
        UsageError: If it is not a number strictly between ``low`` and ``high``.
    """
    number = _number(value, name)
    if not low < number < high:
        raise UsageError(f"`{name}` must be in ({low}, {high}). Received: {name}={number}")
    return number


def positive(value: object, name: str) -> float:
    """A finite number ``> 0``.

    Raises:
        UsageError: If it is not one.
    """
    number = _number(value, name)
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"`{name}` must be a finite number > 0. Received: {name}={number}")
    return number


def positive_int(value: object, name: str) -> int:
    """An integer ``>= 1`` (a Python or NumPy integer; not a bool or a float).

    Raises:
        UsageError: If it is not one.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def one_of(value: str, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        UsageError: If it is not.
    """
    if value not in choices:
        raise UsageError(f"`{name}` must be one of {tuple(choices)}. Received: {name}={value!r}")
    return value
