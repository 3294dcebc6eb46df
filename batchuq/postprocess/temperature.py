"""Temperature scaling of the MC-mean probabilities.

One scalar ``T > 0`` rescales a mean probability vector ``p̄``, read as logits:
``p_T ∝ exp(log p̄ / T)`` (docs/methods.md, "Calibration"). ``batchuq calibrate`` fits ``T``
to minimise the negative log-likelihood (NLL) of the true labels under the *scoring
predictor's* MC means of the validation images, the same ``p̄`` that ``batchuq score``
computes; ``score --temperature`` applies it.

The NLL is convex in ``1/T``, hence unimodal in ``log T``, so a golden-section search on
``log T`` over ``TEMPERATURE_BOUNDS`` finds its minimum without SciPy.

NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from batchuq import checks
from batchuq.errors import UsageError

__all__ = ["TEMPERATURE_BOUNDS", "apply_temperature", "fit_temperature"]

TEMPERATURE_BOUNDS = (0.05, 20.0)
_EPS = 1e-12  # probabilities are clipped here before the log
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities by a temperature: ``softmax(log(max(p, 1e-12)) / T)``.

    Args:
        probs: ``(..., C)`` probabilities (zeros are clipped to ``1e-12`` before the log).
        temperature: ``T > 0``; ``T > 1`` softens, ``T < 1`` sharpens, ``T = 1`` keeps
            ``probs`` (renormalised).

    Returns:
        ``(..., C)`` float64 probabilities summing to 1 on the last axis.

    Raises:
        UsageError: If ``temperature`` is not a finite positive number or ``probs`` are not
            probabilities.
    """
    temperature = checks.positive(temperature, "temperature")
    logits = np.log(np.clip(checks.probabilities(probs, "probs"), _EPS, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def _golden_section(
    f: Callable[[float], float], low: float, high: float, tol: float = 1e-7
) -> float:
    """Minimiser of a unimodal ``f`` on ``[low, high]`` (compares the ends too)."""
    a, b = low, high
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    candidates = [(f(low), low), (fc, c), (fd, d), (f(high), high)]
    return min(candidates)[1]


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """``bounds`` as ``(low, high)`` floats with ``0 < low < high < inf``."""
    try:
        low, high = (float(v) for v in bounds)
    except (TypeError, ValueError):
        low = high = math.nan
    if not 0 < low < high < math.inf:
        raise UsageError(f"`bounds` must satisfy 0 < low < high. Received: bounds={bounds}")
    return low, high


def fit_temperature(
    mean_probs: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Temperature that minimises the NLL of ``apply_temperature(mean_probs, T)``.

    ``log mean_probs`` are treated as logits (``p_T ∝ exp(log p̄ / T)``). The NLL is convex in
    ``1/T``, so a golden-section search on ``log T`` over ``bounds`` finds the global minimum
    (or the bound it is pinned to, e.g. when every image is already right with probability 1).

    Args:
        mean_probs: ``(n, C)`` MC-mean probabilities of the validation images, ``n >= 1``.
        labels: ``(n,)`` true class indices.
        bounds: ``(low, high)`` range of ``T``, ``0 < low < high``.

    Returns:
        The fitted temperature ``T`` (float in ``bounds``).

    Raises:
        UsageError: For empty or mismatched inputs or bad bounds.
    """
    probs = checks.probabilities(mean_probs, "mean_probs", axes=("n", "classes"), allow_empty=False)
    labels = checks.labels(labels, probs.shape[1], rows=len(probs), rows_of="mean_probs")
    low, high = _check_bounds(bounds)
    logits = np.log(np.clip(probs, _EPS, None))
    logits -= logits.max(axis=1, keepdims=True)
    true_logit = logits[np.arange(len(logits)), labels]

    def objective(log_t: float) -> float:
        z = logits * math.exp(-log_t)
        top = z.max(axis=1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        return float(np.mean(lse - true_logit * math.exp(-log_t)))

    return float(math.exp(_golden_section(objective, math.log(low), math.log(high))))
