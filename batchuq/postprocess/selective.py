"""Selective classification with a guaranteed risk: a confidence threshold and its certificate.

``fit_selective_threshold(scores, correct, target_risk, delta)`` runs Geifman & El-Yaniv's
*selection with guaranteed risk* (SGR; "Selective Classification for Deep Neural Networks",
NeurIPS 2017, Algorithm 1): a binary search over the calibration images sorted by score, with
``k = ⌈log2 n⌉`` steps. At each step the threshold ``θ`` is the score at the midpoint, the images
with ``score >= θ`` are accepted (``M`` of them, ``K`` wrong), and the risk bound is

    b* = B*(K / M, delta / k, M) = sup {b : P(Binomial(M, b) <= K) >= delta / k},

the inverse binomial tail of Gascuel & Caraux (1992), the paper's eq. (4). The search accepts
more images after a step with ``b* < target_risk`` and fewer otherwise. The paper's theorem: for
calibration images drawn i.i.d., with probability at least ``1 - delta`` the selective risk
``P(wrong | score >= θ)`` of the classifier it returns is below its bound ``b*``. Here the
returned threshold is the last step with ``b* < target_risk`` (the one that accepts the most of
those), so the risk is below ``target_risk`` too. docs/methods.md ("Selective risk with a
guarantee") states the algorithm, the guarantee, its assumptions and what it does not cover.

``b* < target_risk`` holds exactly when ``P(Binomial(M, target_risk) <= K) < delta / k`` (the
tail falls as ``b`` grows), so each step costs one binomial tail; ``b*`` itself is computed
once, for the certificate. The tails are exact sums of probabilities in log space
(``math.lgamma``): NumPy only, no SciPy, nothing here imports TensorFlow.
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
    "clopper_pearson",
    "fit_selective_threshold",
    "min_accepted",
    "search_steps",
]

SELECTIVE_METHOD = "sgr-geifman-el-yaniv-2017"


def _percent(share: float) -> str:
    """``0.05`` as ``5%``, ``0.999`` as ``99.9%``: four significant digits, no trailing zeros."""
    return f"{100 * share:.4g}%"


@dataclass(frozen=True)
class SelectiveCertificate:
    """What ``fit_selective_threshold`` certifies, and on what.

    Attributes:
        threshold: ``θ``; accept an image when ``score >= threshold``.
        target_risk: ``r*``; the certified selective risk is below ``risk_bound < r*``.
        delta: The certificate fails with probability at most ``delta`` over calibration sets.
        n: Calibration images.
        accepted: ``M``, calibration images with ``score >= threshold``.
        errors: ``K``, wrong predictions among them.
        risk_bound: ``b* = B*(K / M, delta / k, M)``, ``k = search_steps(n)``: the ``b`` with
            ``P(Binomial(M, b) <= K) = delta / k`` (a one-sided Clopper–Pearson bound at level
            ``1 - delta / k``); below ``target_risk``.
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
            f"selective risk <= {_percent(self.target_risk)} (bound "
            f"{_percent(self.risk_bound)}) with probability >= {_percent(1 - self.delta)} for "
            f"images i.i.d. like the calibration set; certified by SGR on {self.n} images "
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
    """``B*(k / m, delta, m)``: the one-sided ``1 - delta`` upper confidence bound on a
    binomial rate (Clopper–Pearson; Gascuel & Caraux 1992; Geifman & El-Yaniv's eq. (4)).

    Args:
        k: Observed successes (errors), ``0 <= k``.
        m: Trials ``>= 1``.
        delta: Miscoverage in ``(0, 1)``.

    Returns:
        ``sup {b : P(Binomial(m, b) <= k) >= delta}``: the ``b`` where the tail equals
        ``delta`` (1.0 when ``k >= m``), to about ``1e-15``.
    """
    if k >= m:
        return 1.0
    # The tail falls continuously from 1 at b = 0 to 0 at b = 1: bisect for where it is delta.
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (low + high)
        if binomial_cdf(k, m, mid) >= delta:
            low = mid
        else:
            high = mid
    return high


def clopper_pearson(k: int, m: int, level: float = 0.95) -> tuple[float, float]:
    """The two-sided Clopper–Pearson interval of a binomial rate, at confidence ``level``.

    Each end leaves ``(1 - level) / 2`` in its tail: the upper end is
    ``binomial_upper_bound(k, m, (1 - level) / 2)``, the lower one ``1 -`` the same bound for the
    ``m - k`` failures (0 when ``k = 0``, 1 when ``k = m``). They equal the Beta quantiles
    ``Beta((1 - level) / 2; k, m - k + 1)`` and ``Beta((1 + level) / 2; k + 1, m - k)``.

    Args:
        k: Observed successes, ``0 <= k <= m``.
        m: Trials ``>= 1``.
        level: Confidence level in ``(0, 1)``.

    Returns:
        ``(lower, upper)``.

    Raises:
        UsageError: If ``m < 1``, ``k`` is outside ``[0, m]`` or ``level`` outside ``(0, 1)``.
    """
    m = checks.positive_int(m, "m")
    level = checks.fraction(level, "level")
    if int(k) != k or not 0 <= k <= m:
        raise UsageError(f"`k` must be an integer in [0, m={m}]. Received: k={k}")
    tail = (1.0 - level) / 2.0
    k = int(k)
    upper = binomial_upper_bound(k, m, tail)
    lower = 0.0 if k == 0 else 1.0 - binomial_upper_bound(m - k, m, tail)
    return lower, upper


def search_steps(n: int) -> int:
    """``k = ⌈log2 n⌉``, the steps of the binary search over ``n`` calibration images (at
    least 1, so that one image still gets one test); each bound is taken at ``delta / k``."""
    return max(1, math.ceil(math.log2(n)))


def min_accepted(n: int, target_risk: float, delta: float) -> int:
    """Fewest accepted images that can certify ``target_risk`` on ``n`` calibration images.

    With ``m`` accepted images and no error, ``B*(0, delta / k, m) = 1 - (delta / k)^(1/m)``;
    this is the smallest ``m`` with ``B* < target_risk``, i.e. ``(1 - target_risk)^m <
    delta / k``, ``k = search_steps(n)``.

    Raises:
        UsageError: If ``n`` is not a positive integer, or ``target_risk`` or ``delta`` is not
            in ``(0, 1)``.
    """
    n = checks.positive_int(n, "n")
    target_risk = checks.fraction(target_risk, "target_risk")
    delta = checks.fraction(delta, "delta")
    log_level = math.log(delta / search_steps(n))
    log_q = math.log1p(-target_risk)
    m = max(1, math.floor(log_level / log_q))
    # Settle the float rounding of the ratio on the exact condition m ln(1 - r*) < ln(delta/k).
    while m * log_q >= log_level:
        m += 1
    while m > 1 and (m - 1) * log_q < log_level:
        m -= 1
    return m


# --------------------------------------------------------------------------------------------
# The search.


@dataclass(frozen=True)
class _Step:
    """One step of the binary search: threshold, accepted count, errors, bound below r*?"""

    threshold: float
    accepted: int
    errors: int
    certified: bool


def _search(
    scores: np.ndarray, correct: np.ndarray, target_risk: float, delta: float
) -> list[_Step]:
    """The ``k`` steps of Algorithm 1 (SGR), in order.

    Positions ``z = 1 … n`` index the scores sorted ascending; ``z_min = 1``, ``z_max = n``; at
    each step ``z = ⌈(z_min + z_max) / 2⌉``, ``θ`` = the ``z``-th smallest score, accept
    ``score >= θ`` (ties with ``θ`` below position ``z`` included); ``b* < r*`` sets
    ``z_max = z`` (accept more next), otherwise ``z_min = z``.
    """
    n = len(scores)
    k = search_steps(n)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    # wrong_from[i]: errors among ranked[i:].
    wrong_from = np.append(np.cumsum((~correct[order])[::-1])[::-1], 0)
    steps = []
    z_min, z_max = 1, n
    for _ in range(k):
        z = (z_min + z_max + 1) // 2
        theta = ranked[z - 1]
        first = int(np.searchsorted(ranked, theta, side="left"))
        accepted, errors = n - first, int(wrong_from[first])
        # b* < r*  <=>  P(Binomial(M, r*) <= K) < delta / k.
        certified = bool(binomial_cdf(errors, accepted, target_risk)[()] < delta / k)
        steps.append(_Step(float(theta), accepted, errors, certified))
        if certified:
            z_max = z
        else:
            z_min = z
    return steps


def _needed_at_rate(accepted: int, rate: float, target_risk: float, level: float) -> int | None:
    """About how many accepted images, more than ``accepted``, with an error share of ``rate``
    have ``B* < target_risk`` at ``level`` (``None`` if no number does, or more than ``10**9``)."""
    if rate >= target_risk:
        return None

    def certifies(m: int) -> bool:
        errors = math.ceil(rate * m - 1e-9)
        return bool(binomial_cdf(errors, m, target_risk)[()] < level)

    low, high = accepted, 2 * accepted
    while not certifies(high):
        if high > 10**9:
            return None
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certifies(mid) else (mid, high)
    return high


def _first_step_accepts(n: int) -> int:
    """Images the first step accepts when scores have no ties: ``n - ⌈(1 + n) / 2⌉ + 1``."""
    return n - (n + 2) // 2 + 1


def _infeasible(n: int, steps: list[_Step], target_risk: float, delta: float) -> str:
    """Why no step of the search certified ``target_risk``, and how many images it would take."""
    k = search_steps(n)
    needed = min_accepted(n, target_risk, delta)
    need = (
        f"even with no error a threshold must accept at least {needed} images "
        f"(B*(0, delta/k, m) = 1 - (delta/k)^(1/m) < target_risk needs m >= {needed}, "
        f"k = ceil(log2 n) = {k} steps)"
    )
    large = [step for step in steps if step.accepted >= needed]
    if not large:
        # Every step after a failure accepts fewer than it: the first step must pass. It
        # accepts the more confident half, so look for the smallest set whose half is enough.
        total = n
        while _first_step_accepts(total) < min_accepted(total, target_risk, delta):
            total = max(total + 1, 2 * min_accepted(total, target_risk, delta) - 1)
        return (
            f"`target_risk` cannot be certified on {n} calibration images: {need}, and the "
            f"binary search first tests the {steps[0].accepted} most confident (about half). "
            f"About {total} labelled calibration images would be needed if their more "
            "confident half were all right. Label more images, or raise target_risk or delta. "
        )
    tested = ", ".join(f"{step.accepted} with {step.errors} wrong" for step in large)
    best = min(large, key=lambda step: step.errors / step.accepted)
    rate = best.errors / best.accepted
    at_rate = _needed_at_rate(best.accepted, rate, target_risk, delta / k)
    more = (
        f"at their best error share ({rate:.2%}) about {at_rate} accepted images would certify it"
        if at_rate is not None
        else f"at their best error share ({rate:.2%}) no number of images would certify it"
    )
    return (
        f"`target_risk` cannot be certified: {need}. The binary search tested the most "
        f"confident {tested}, and every bound B*(K/M, delta/k, M) was >= target_risk. The "
        f"limit is the errors among the most confident images, not their number: {more}. "
        "Raise target_risk or delta, or use a score that ranks the errors lower. "
    )


def fit_selective_threshold(
    scores: ArrayLike, correct: ArrayLike, target_risk: float, delta: float
) -> tuple[float, SelectiveCertificate]:
    """A score threshold whose selective risk is certified below ``target_risk``.

    Geifman & El-Yaniv's selection with guaranteed risk (SGR, NeurIPS 2017, Algorithm 1): a
    binary search over the calibration images sorted by score, ``k = ⌈log2 n⌉`` steps, each
    with the bound ``b* = B*(K/M, delta/k, M)`` (the ``b`` with ``P(Binomial(M, b) <= K) =
    delta/k``) on the ``M`` images with ``score >= θ``, ``K`` of them wrong. The threshold
    returned is the last step with ``b* < target_risk``. Their theorem: if the calibration
    images are drawn i.i.d. from a distribution, then with probability at least ``1 - delta``
    over them the selective risk ``P(wrong | score >= threshold)`` of a new image from that
    distribution is below ``b*`` (so below ``target_risk``). That is the *population*
    selective risk; the error share among the images a given night accepts scatters around it.
    See docs/methods.md ("Selective risk with a guarantee").

    Args:
        scores: ``(n,)`` confidence scores of the calibration images, higher = more confident.
        correct: ``(n,)`` whether each image's prediction was right (booleans or 0/1).
        target_risk: ``r*``, the bound on the selective risk to certify, in ``(0, 1)``.
        delta: Allowed probability that the certificate is wrong, in ``(0, 1)``.

    Returns:
        ``(threshold, certificate)``: accept an image when ``score >= threshold``; the
        ``SelectiveCertificate`` holds the counts and the bound ``b*``.

    Raises:
        UsageError: (a ``ValueError``) if an argument is malformed, or if no step of the search
            certifies ``target_risk``; the message says how many accepted images it would take.
    """
    scores = checks.float_vector(scores, "scores")
    correct = checks.bool_vector(correct, "correct")
    checks.same_length(scores=scores, correct=correct)
    target_risk = checks.fraction(target_risk, "target_risk")
    delta = checks.fraction(delta, "delta")
    n = len(scores)

    steps = _search(scores, correct, target_risk, delta)
    certified = [step for step in steps if step.certified]
    if not certified:
        received = f"Received: target_risk={target_risk}, delta={delta}, len(scores)={n}"
        raise UsageError(_infeasible(n, steps, target_risk, delta) + received)
    # Algorithm 1 outputs its last step whether or not b* < r*; its proof bounds the risk at
    # every step at once (a union bound over the k steps), so the last certified step, which
    # accepts more than any certified before it, carries the same guarantee with b* < r*.
    chosen = certified[-1]
    certificate = SelectiveCertificate(
        threshold=chosen.threshold,
        target_risk=target_risk,
        delta=delta,
        n=n,
        accepted=chosen.accepted,
        errors=chosen.errors,
        risk_bound=binomial_upper_bound(chosen.errors, chosen.accepted, delta / search_steps(n)),
    )
    return certificate.threshold, certificate
