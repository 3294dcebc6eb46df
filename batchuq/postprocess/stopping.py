"""Adaptive passes: stop sampling an image once more passes could not change its decision.

``--passes auto`` draws passes in rounds of ``min_passes`` up to ``max_passes``. After every
round but the last (a *look*), each image still sampling gets confidence bounds on what its
decision rule reads, and stops when the decision is the same anywhere within them
(docs/methods.md, "Adaptive passes", gives the tests and why their error adds up to at most
``alpha``):

* median rule: distribution-free bounds on each class's median from the order statistics of
  the samples (a binomial bound on a quantile);
* mean-based rules (``threshold``, ``confidence``, ``none``): empirical-Bernstein bounds on each
  class's mean (Maurer & Pontil 2009, Theorem 4), carried through the temperature if any.

``alpha`` is spent over the looks: half at the first (where most images stop), the other half
shared equally by the rest. NumPy only: the sampling itself is a ``draw`` callable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchuq import checks
from batchuq.defaults import DEFAULT_ADAPTIVE_ALPHA, DEFAULT_MAX_PASSES, DEFAULT_MIN_PASSES
from batchuq.errors import UsageError
from batchuq.postprocess.rules import DecisionRule

#: ``draw(images, first_pass, passes)``: passes ``first_pass ..`` of the given images, float32
#: ``(len(images), groups, passes, classes)`` (groups: TTA copies x ensemble members).
Draw = Callable[[np.ndarray, int, int], np.ndarray]


@dataclass(frozen=True)
class AdaptivePasses:
    """The settings of ``--passes auto``.

    Attributes:
        min_passes: Passes every image gets, and the size of every later round.
        max_passes: Passes an image gets at most (its decision then is the fixed-T one).
        alpha: Bound on the share of images whose decision differs from the one their
            population of samples gives (see docs/methods.md, "Adaptive passes").

    Raises:
        UsageError: If ``1 <= min_passes <= max_passes`` or ``0 < alpha < 1`` does not hold.
    """

    min_passes: int = DEFAULT_MIN_PASSES
    max_passes: int = DEFAULT_MAX_PASSES
    alpha: float = DEFAULT_ADAPTIVE_ALPHA

    def __post_init__(self) -> None:
        if not 1 <= self.min_passes <= self.max_passes:
            raise UsageError(
                "`min_passes` must be at least 1 and at most `max_passes`. Received: "
                f"min_passes={self.min_passes}, max_passes={self.max_passes}"
            )
        if not 0.0 < self.alpha < 1.0:
            raise UsageError(f"`alpha` must be in (0, 1). Received: alpha={self.alpha}")

    def rounds(self) -> list[tuple[int, int]]:
        """``(first_pass, passes)`` of every round: ``min_passes`` each, the last cut at
        ``max_passes``."""
        starts = range(0, self.max_passes, self.min_passes)
        return [(s, min(self.min_passes, self.max_passes - s)) for s in starts]

    @property
    def looks(self) -> int:
        """Rounds after which an image may stop (all but the last)."""
        return len(self.rounds()) - 1

    def look_alpha(self, look: int) -> float:
        """The error level spent at look ``look`` (0-based): half of ``alpha`` at the first,
        the other half shared by the rest; the levels of all looks sum to ``alpha``."""
        if self.looks <= 1:
            return self.alpha
        return self.alpha / 2 if look == 0 else self.alpha / 2 / (self.looks - 1)

    def as_metadata(self) -> dict[str, Any]:
        """The settings, for the Parquet metadata."""
        return {
            "min_passes": self.min_passes,
            "max_passes": self.max_passes,
            "alpha": self.alpha,
            "round_passes": self.min_passes,
            "looks": self.looks,
            "tests": {"median": "binomial order-statistic bound", "mean": "empirical Bernstein"},
        }


@functools.lru_cache(maxsize=4096)
def order_statistic_rank(samples: int, level: float) -> int:
    """The largest ``r`` with ``P(Binomial(samples, 1/2) <= r - 1) <= level`` (0: none).

    The ``r``-th smallest of ``samples`` independent draws is then below the median with
    probability at least ``1 - level``; the ``r``-th largest above it likewise.
    """
    total, cumulative, rank = 2**samples, 0, 0
    for r in range(1, samples // 2 + 1):
        cumulative += math.comb(samples, r - 1)
        if cumulative > level * total:
            break
        rank = r
    return rank


def median_bounds(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided distribution-free bounds on every class's median, each at error ``level``.

    Args:
        samples: ``(images, S, classes)`` probabilities.
        level: Error level of each one-sided bound.

    Returns:
        ``lower``, ``upper``: ``(images, classes)``; ``-inf``/``inf`` when ``S`` samples are
        too few for ``level``.
    """
    count = samples.shape[1]
    rank = order_statistic_rank(count, level)
    if rank == 0:
        shape = (samples.shape[0], samples.shape[2])
        return np.full(shape, -np.inf), np.full(shape, np.inf)
    ordered = np.sort(samples, axis=1)
    return ordered[:, rank - 1, :], ordered[:, count - rank, :]


def mean_bounds(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided empirical-Bernstein bounds on every class's mean, each at error ``level``.

    Maurer & Pontil (2009), Theorem 4, for values in ``[0, 1]``: the mean lies below
    ``m + sqrt(2 V ln(1/level) / n) + 7 ln(1/level) / (3 (n - 1))`` with probability at least
    ``1 - level`` (V the unbiased sample variance), and above the mirrored bound likewise.

    Args:
        samples: ``(images, S, classes)`` probabilities, ``S >= 2``.
        level: Error level of each one-sided bound.

    Returns:
        ``lower``, ``upper``: ``(images, classes)``, clipped to ``[0, 1]``.
    """
    n = samples.shape[1]
    values = samples.astype(np.float64)
    mean = values.mean(axis=1)
    if n < 2:
        return np.zeros_like(mean), np.ones_like(mean)
    log_term = math.log(1.0 / level)
    spread = np.sqrt(2.0 * values.var(axis=1, ddof=1) * log_term / n)
    width = spread + 7.0 * log_term / (3.0 * (n - 1))
    return np.clip(mean - width, 0.0, 1.0), np.clip(mean + width, 0.0, 1.0)


def settled(
    samples: np.ndarray, rule: DecisionRule, look_alpha: float, temperature: float | None = None
) -> np.ndarray:
    """Which images' decisions more samples could not change, at error ``look_alpha``.

    Args:
        samples: ``(images, S, classes)`` probabilities drawn so far.
        rule: The run's decision rule.
        look_alpha: The error level spent at this look (``AdaptivePasses.look_alpha``).
        temperature: The temperature applied to the mean before a mean-based rule, if any.

    Returns:
        ``(images,)`` bool.
    """
    classes = samples.shape[2]
    if rule.name == "median" and rule.min_median >= 0.5:
        # At most one class can hold a median above 1/2; three one-sided bounds cover every
        # way to be wrong (docs/methods.md, "Adaptive passes").
        lower, upper = median_bounds(samples, look_alpha / 3)
        limit = max(rule.min_median, np.nextafter(0.5, 1.0))
        return (lower >= limit).any(axis=1) | (upper < rule.min_median).all(axis=1)
    if rule.name == "median":
        lower, upper = median_bounds(samples, look_alpha / (2 * classes))
        limits = np.full(classes, rule.min_median)
        return _stable(lower, upper, limits, strict_top=True)
    lower, upper = mean_bounds(samples, look_alpha / (2 * classes))
    if temperature is not None:
        lower, upper = _tempered_bounds(lower, upper, temperature)
    return _stable(lower, upper, _mean_rule_limits(rule, classes), strict_top=False)


def _mean_rule_limits(rule: DecisionRule, classes: int) -> np.ndarray:
    """Per class, the least mean its prediction needs to stand (``-inf``: always stands)."""
    if rule.name == "threshold":
        thresholds = checks.float_vector(rule.thresholds, "thresholds", allow_nan=True)
        return np.where(np.isnan(thresholds), -np.inf, thresholds)
    if rule.name == "confidence":
        return np.full(classes, rule.min_confidence)
    return np.full(classes, -np.inf)


def _stable(
    lower: np.ndarray, upper: np.ndarray, limits: np.ndarray, strict_top: bool
) -> np.ndarray:
    """Decisions the same for every statistic within ``[lower, upper]`` (all ``(n, C)``).

    Classified as ``c``: ``c`` is above every other class and its limit anywhere in the box.
    Unclassified: every class that could come out on top falls short of its limit.
    """
    classes = lower.shape[1]
    other_upper = _max_of_others(upper)
    other_lower = _max_of_others(lower)
    above_others = lower > other_upper if classes > 1 else np.ones_like(lower, bool)
    classified = (above_others & (lower >= limits)).any(axis=1)
    # Class c can come out on top unless another class is surely above (or, for the
    # median rule, surely at least as high: a tie leaves the image unclassified).
    beaten = upper <= other_lower if strict_top else upper < other_lower
    return classified | (beaten | (upper < limits)).all(axis=1)


def _max_of_others(values: np.ndarray) -> np.ndarray:
    """``(n, C)``: for each class, the largest value among the other classes."""
    if values.shape[1] == 1:
        return np.full_like(values, -np.inf)
    order = np.sort(values, axis=1)
    top, second = order[:, -1:], order[:, -2:-1]
    return np.where(values >= top, second, top)


def _tempered_bounds(
    lower: np.ndarray, upper: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the tempered mean ``w_c / sum_j w_j``, ``w = p^(1/T)``: it grows with ``p_c``
    and falls with every other ``p_j``, so the box's corners bound it."""
    w_low = np.clip(lower, 1e-12, 1.0) ** (1.0 / temperature)
    w_high = np.clip(upper, 1e-12, 1.0) ** (1.0 / temperature)
    others_high = w_high.sum(axis=1, keepdims=True) - w_high
    others_low = w_low.sum(axis=1, keepdims=True) - w_low
    return w_low / (w_low + others_high), w_high / (w_high + others_low)


@dataclass
class AdaptiveResult:
    """What adaptive sampling drew for a set of images.

    Attributes:
        samples: Per image, float32 ``(groups * passes_i, classes)``, group-major (all passes
            of group 0, then group 1, ...), like a fixed run's samples.
        passes: ``(images,)`` passes drawn per group for each image.
    """

    samples: list[np.ndarray]
    passes: np.ndarray


def sample_adaptively(
    draw: Draw,
    images: int,
    adaptive: AdaptivePasses,
    rule: DecisionRule,
    *,
    temperature: float | None = None,
    stop_after_first: np.ndarray | None = None,
) -> AdaptiveResult:
    """Draw rounds of passes, after each look keeping only the images not yet settled.

    Args:
        draw: Draws passes of some images (``Draw``).
        images: How many images (indices ``0 .. images - 1``).
        adaptive: The settings.
        rule: The run's decision rule.
        temperature: The temperature before a mean-based rule, if any.
        stop_after_first: ``(images,)`` bool: images that stop after the first round whatever
            their samples (unreadable images, whose samples mean nothing).

    Returns:
        Every image's samples and passes.
    """
    drawn: list[list[np.ndarray]] = [[] for _ in range(images)]
    active = np.arange(images)
    for look, (first, count) in enumerate(adaptive.rounds()):
        new = draw(active, first, count)  # (active, groups, count, classes)
        for row, image in enumerate(active):
            drawn[image].append(new[row])
        if look == adaptive.looks or active.size == 0:
            break
        so_far = _stacked(drawn, active)
        stop = settled(so_far, rule, adaptive.look_alpha(look), temperature)
        if look == 0 and stop_after_first is not None:
            stop |= stop_after_first[active]
        active = active[~stop]
        if active.size == 0:
            break
    return _result(drawn)


def _stacked(drawn: list[list[np.ndarray]], active: np.ndarray) -> np.ndarray:
    """``(active, groups * passes, classes)``: the active images' samples so far, group-major
    (they all have had the same rounds)."""
    per_image = np.stack([np.concatenate(drawn[i], axis=1) for i in active])
    a, groups, passes, classes = per_image.shape
    return per_image.reshape(a, groups * passes, classes)


def _result(drawn: list[list[np.ndarray]]) -> AdaptiveResult:
    samples, passes = [], []
    for rounds in drawn:
        joined = np.concatenate(rounds, axis=1)  # (groups, passes, classes)
        samples.append(joined.reshape(-1, joined.shape[2]))
        passes.append(joined.shape[1])
    return AdaptiveResult(samples, np.asarray(passes, dtype=np.int64))
