"""Selective classification with a guaranteed risk: a confidence threshold and its certificate.

``fit_selective_threshold(scores, correct, target_risk, delta)`` picks the lowest threshold
``λ̂`` among the calibration scores such that, with probability at least ``1 - delta`` over
the calibration set, the *population selective risk* of the rule "accept when
``score >= λ̂``",

    R(λ) = P(wrong | score >= λ)

for a new image drawn from the same distribution as the calibration images, is at most
``target_risk``. Method: Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021) with
fixed-sequence testing over the distinct calibration scores, from the highest down, and the
binomial p-value of ``H_λ: R(λ) > target_risk`` given the number of accepted images:

    p(λ) = P(Binomial(M(λ) - 1, target_risk) <= K(λ)),

``M(λ)`` accepted calibration images, ``K(λ)`` errors among them. One trial is dropped: the
data choose where the walk starts, and the image at that threshold is where they chose it. The
walk starts at the highest score with ``M >= start_count(n, target_risk, delta)`` (a count fixed
before looking at the data) and stops at the first ``p > delta``. docs/methods.md ("Selective
risk with a guarantee") states the algorithm, the guarantee and its assumptions (i.i.d. or
exchangeable images, no ties in the score distribution) and the outline of its proof.

The binomial tails are exact sums of probabilities in log space (``math.lgamma``): NumPy only,
no SciPy, nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from batchuq import checks
from batchuq.errors import UsageError

__all__ = [
    "SELECTIVE_METHOD",
    "SelectiveCertificate",
    "binomial_cdf",
    "binomial_upper_bound",
    "fit_selective_threshold",
    "min_accepted",
    "start_count",
]

SELECTIVE_METHOD = "ltt-fixed-sequence-binomial"

# Binomial terms summed in one NumPy call of the fixed-sequence walk (memory: 8 bytes each, a few
# arrays of them).
_MAX_TERMS = 1 << 20


@dataclass(frozen=True)
class SelectiveCertificate:
    """What ``fit_selective_threshold`` certifies, and on what.

    Attributes:
        threshold: ``λ̂``; accept an image when ``score >= threshold``.
        target_risk: The certified bound on the selective risk ``P(wrong | score >= λ̂)``.
        delta: The certificate fails with probability at most ``delta`` over calibration sets.
        n: Calibration images.
        accepted: Calibration images with ``score >= threshold``.
        errors: Wrong predictions among them.
        risk_bound: The ``1 - delta`` upper confidence bound on the selective risk at
            ``threshold`` (the ``r`` with ``P(Binomial(accepted - 1, r) <= errors) = delta``);
            at most ``target_risk``.
        method: ``SELECTIVE_METHOD``.
    """

    threshold: float
    target_risk: float
    delta: float
    n: int
    accepted: int
    errors: int
    risk_bound: float
    method: str = SELECTIVE_METHOD

    @property
    def coverage(self) -> float:
        """Share of the calibration images accepted."""
        return self.accepted / self.n

    def statement(self) -> str:
        """The guarantee in one sentence, for summaries and metadata."""
        return (
            f"selective risk <= {self.target_risk:.1%} with probability >= {1 - self.delta:.0%} "
            f"under exchangeability; certified on {self.n} images "
            f"({self.accepted} accepted, {self.errors} wrong)"
        )


# --------------------------------------------------------------------------------------------
# Binomial tails.


_log_fact = np.zeros(1)  # ln k! for k = 0 … len - 1, grown on demand by _log_factorials


def _log_factorials(n: int) -> np.ndarray:
    """``ln k!`` for ``k = 0 … n`` at least (a shared table, grown on demand, never shrunk)."""
    global _log_fact
    if len(_log_fact) <= n:
        size = max(n + 1, 2 * len(_log_fact))
        more = [math.lgamma(k + 1.0) for k in range(len(_log_fact), size)]
        _log_fact = np.concatenate((_log_fact, more))
    return _log_fact


def binomial_cdf(k: ArrayLike, m: ArrayLike, p: float) -> np.ndarray:
    """Exact ``P(Binomial(m, p) <= k)``, elementwise over ``k`` and ``m``.

    The probabilities of ``0 … k`` are summed in log space (log-sum-exp), so that tails as
    small as ``1e-300`` keep their relative precision.

    Args:
        k: Integer counts (negative gives 0; ``k >= m`` gives 1).
        m: Integer numbers of trials ``>= 0``, broadcast with ``k``.
        p: Success probability in ``(0, 1)``.

    Returns:
        The float64 probabilities, shape of ``k`` and ``m`` broadcast.
    """
    k, m = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(m, dtype=np.int64))
    shape = k.shape
    k, m = k.ravel(), m.ravel()
    out = np.where(k >= m, 1.0, 0.0)
    todo = np.flatnonzero((k >= 0) & (k < m))
    if todo.size == 0:
        return out.reshape(shape)
    kk, mm = k[todo], m[todo]
    log_fact = _log_factorials(int(mm.max()))
    # One row of terms i = 0 … k per element, flattened: `group` is the element of each term.
    sizes = kk + 1
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    group = np.repeat(np.arange(todo.size), sizes)
    i = np.arange(int(sizes.sum())) - starts[group]
    trials = mm[group]
    log_terms = (
        log_fact[trials]
        - log_fact[i]
        - log_fact[trials - i]
        + i * math.log(p)
        + (trials - i) * math.log1p(-p)
    )
    peak = np.maximum.reduceat(log_terms, starts)
    sums = np.add.reduceat(np.exp(log_terms - peak[group]), starts)
    out[todo] = np.minimum(np.exp(peak + np.log(sums)), 1.0)
    return out.reshape(shape)


def binomial_upper_bound(k: int, m: int, delta: float) -> float:
    """One-sided ``1 - delta`` upper confidence bound on a binomial rate (Clopper–Pearson).

    Args:
        k: Observed successes (errors), ``0 <= k``.
        m: Trials ``>= 1``.
        delta: Miscoverage in ``(0, 1)``.

    Returns:
        The ``r`` with ``P(Binomial(m, r) <= k) = delta`` (1.0 when ``k >= m``), to about
        ``1e-12``.
    """
    if k >= m:
        return 1.0
    # The tail falls from 1 at r = 0 to 0 at r = 1: bisect for where it crosses delta.
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (low + high)
        if binomial_cdf(k, m, mid) > delta:
            low = mid
        else:
            high = mid
    return high


def min_accepted(target_risk: float, delta: float) -> int:
    """Fewest accepted calibration images that can certify ``target_risk`` at all.

    With ``m`` accepted images and no error, the p-value is ``(1 - target_risk)^(m - 1)``;
    this is the smallest ``m`` for which it is ``<= delta``.

    Raises:
        UsageError: If ``target_risk`` or ``delta`` is not in ``(0, 1)``.
    """
    target_risk = checks.fraction(target_risk, "target_risk")
    delta = checks.fraction(delta, "delta")
    log_q = math.log1p(-target_risk)
    m = max(1, math.ceil(math.log(delta) / log_q) + 1)
    # Settle the float rounding of the ratio on the exact condition.
    while (m - 1) * log_q > math.log(delta):
        m += 1
    while m > 1 and (m - 2) * log_q <= math.log(delta):
        m -= 1
    return m


def start_count(n: int, target_risk: float, delta: float) -> int:
    """Accepted count at which fixed-sequence testing starts: the smallest ``m`` whose test
    rejects with an error share of half the target, ``P(Binomial(m - 1, target_risk) <=
    ⌊m target_risk / 2⌋) <= delta``, but at most ``n`` and at least ``min_accepted``.

    It depends on ``n``, ``target_risk`` and ``delta`` only, never on the data. Starting at the
    fewest images that could be certified with no error at all would let one early error stop
    the walk; starting here leaves room for errors at half the target.
    """
    low = min_accepted(target_risk, delta)
    while low <= n:
        ms = np.arange(low, min(2 * low, n + 1))
        ok = binomial_cdf(np.floor(ms * target_risk / 2), ms - 1, target_risk) <= delta
        if ok.any():
            return int(ms[np.argmax(ok)])
        low = 2 * low
    return max(n, min_accepted(target_risk, delta))


# --------------------------------------------------------------------------------------------
# The threshold.


def _candidates(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct scores from the highest down, with the accepted count and the errors among
    them at each (``score >= value``); all three ``(d,)``, the counts increasing."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    # The last position of each run of equal scores: ties are accepted or refused together.
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    errors = np.cumsum(~correct[order])[ends]
    return ranked[ends], ends + 1, errors


def _rejected(accepted: np.ndarray, errors: np.ndarray, target_risk: float, delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects, in order, before its first
    ``p > delta`` (all of them if none).

    ``p = P(Binomial(accepted - 1, target_risk) <= errors)`` falls as ``accepted`` grows with
    ``errors`` fixed, so only the first candidate of each run of equal ``errors`` can be the
    first failure: the p-values are computed there only, in blocks of at most ``_MAX_TERMS``
    binomial terms.
    """
    firsts = np.flatnonzero(np.append(True, errors[1:] != errors[:-1]))
    done = 0
    while done < len(firsts):
        cost = np.cumsum(errors[firsts[done:]] + 1)
        stop = done + max(1, int(np.searchsorted(cost, _MAX_TERMS, side="right")))
        at = firsts[done:stop]
        fails = np.flatnonzero(binomial_cdf(errors[at], accepted[at] - 1, target_risk) > delta)
        if fails.size:
            return int(at[fails[0]])
        done = stop
    return len(accepted)


def _needed_at_rate(accepted: int, rate: float, target_risk: float, delta: float) -> int | None:
    """About how many accepted images, more than ``accepted``, with an error share of ``rate``
    certify ``target_risk`` (``None`` if no number does, or more than ``10**9``)."""
    if rate >= target_risk:
        return None

    def certifies(m: int) -> bool:
        errors = math.ceil(rate * m - 1e-9)
        return bool(binomial_cdf(errors, m - 1, target_risk)[()] <= delta)

    low, high = accepted, 2 * accepted
    while not certifies(high):
        if high > 10**9:
            return None
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certifies(mid) else (mid, high)
    return high


def _infeasible(n: int, accepted: int, errors: int, target_risk: float, delta: float) -> str:
    """Why ``target_risk`` cannot be certified, and how many accepted images it would take;
    ``accepted == 0`` when even the whole set is too small."""
    m_start = min_accepted(target_risk, delta)
    need = (
        f"a threshold must accept at least {m_start} calibration images even if none of them "
        f"is wrong ((1 - target_risk)^(m - 1) <= delta needs m >= {m_start})"
    )
    if accepted == 0:
        return (
            f"`target_risk` cannot be certified on {n} calibration images: {need}. Label more "
            "images (the threshold accepts only a share of them), or raise target_risk or delta. "
        )
    p_value = float(binomial_cdf(errors, accepted - 1, target_risk)[()])
    rate = errors / accepted
    at_rate = _needed_at_rate(accepted, rate, target_risk, delta)
    more = (
        f"at that error share about {at_rate} accepted images would certify it"
        if at_rate is not None
        else "no number of images at that error share would certify it"
    )
    return (
        f"`target_risk` cannot be certified: {need}, and the {accepted} most confident "
        f"calibration images hold {errors} errors ({rate:.2%}), p-value "
        f"P(Binomial({accepted - 1}, target_risk) <= {errors}) = {p_value:.3g} > delta, so "
        f"fixed-sequence testing stops at its first threshold. The limit is the errors among "
        f"the most confident images, not only their number: {more}. Raise target_risk or "
        "delta, or use a score that ranks the errors lower. "
    )


def fit_selective_threshold(
    scores: ArrayLike, correct: ArrayLike, target_risk: float, delta: float
) -> tuple[float, SelectiveCertificate]:
    """The lowest score threshold whose selective risk is certified ``<= target_risk``.

    Learn-then-Test with fixed-sequence testing over the distinct calibration scores, from the
    highest down (docs/methods.md, "Selective risk with a guarantee"). For calibration and new
    images drawn i.i.d. (or exchangeably) from one distribution in which the score has no ties,
    ``P(wrong | score >= threshold) <= target_risk`` for a new image, with probability at least
    ``1 - delta`` over the calibration set. That is the *population* selective risk; the error
    share among the images a given night accepts scatters around it.

    Args:
        scores: ``(n,)`` confidence scores of the calibration images, higher = more confident.
        correct: ``(n,)`` whether each image's prediction was right (booleans or 0/1).
        target_risk: Bound on the selective risk to certify, in ``(0, 1)``.
        delta: Allowed probability that the certificate is wrong, in ``(0, 1)``.

    Returns:
        ``(threshold, certificate)``: accept an image when ``score >= threshold``; the
        ``SelectiveCertificate`` holds the counts and the risk bound reached.

    Raises:
        UsageError: (a ``ValueError``) if an argument is malformed, or if no threshold can be
            certified; the message says how many accepted images it would take.
    """
    scores = checks.float_vector(scores, "scores")
    correct = checks.bool_vector(correct, "correct")
    checks.same_length(scores=scores, correct=correct)
    target_risk = checks.fraction(target_risk, "target_risk")
    delta = checks.fraction(delta, "delta")
    n = len(scores)
    received = f"Received: target_risk={target_risk}, delta={delta}, len(scores)={n}"

    values, accepted, errors = _candidates(scores, correct)
    start = int(np.searchsorted(accepted, start_count(n, target_risk, delta)))
    if start == len(values):
        raise UsageError(_infeasible(n, 0, 0, target_risk, delta) + received)
    rejected = _rejected(accepted[start:], errors[start:], target_risk, delta)
    if rejected == 0:
        first = int(accepted[start]), int(errors[start])
        raise UsageError(_infeasible(n, *first, target_risk, delta) + received)

    chosen = start + rejected - 1
    m, k = int(accepted[chosen]), int(errors[chosen])
    certificate = SelectiveCertificate(
        threshold=float(values[chosen]),
        target_risk=target_risk,
        delta=delta,
        n=n,
        accepted=m,
        errors=k,
        risk_bound=binomial_upper_bound(k, m - 1, delta),
    )
    return certificate.threshold, certificate
