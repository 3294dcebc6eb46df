"""Adaptive passes: stop sampling an image once more passes could not change its decision.

``--passes auto`` draws passes in rounds of ``min_passes`` up to ``max_passes``. After every
round but the last (a *look*), each image still sampling gets confidence bounds on what its
decision rule reads, and stops when the decision is the same anywhere within them:

* median rule: distribution-free bounds on each class's median from the order statistics of
  the samples (a binomial bound on a quantile), with ``alpha`` spent over the looks: half at
  the first (where most images stop), the other half shared equally by the rest;
* mean-based rules (``threshold``, ``confidence``, ``none``): a betting confidence sequence for
  each class's mean (Waudby-Smith & Ramdas 2024, the hedged capital process with predictable
  plug-in bets), which holds at every look at once and so needs no spending; carried through
  the temperature if any.

What is guaranteed, for each image: the probability that it stops before ``max_passes`` with
another decision than its *population decision* (the rule applied to the population mean or
median of its samples: the limit that the fixed-T statistic tends to as T grows, over its
fixed TTA copies and members) is at most ``alpha``. This assumes the passes are independent
draws (the dropout masks of different passes and copies independent) and each copy's passes
identically distributed, and a population statistic not exactly on a decision boundary. An
image that never settles gets exactly the ``--passes max_passes`` samples and decision, which
is *not* covered: it may differ from the population decision. docs/methods.md, "Adaptive
passes", gives the bounds and the proof. NumPy only: the sampling itself is a ``draw``
callable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from batchuq import checks
from batchuq.defaults import DEFAULT_ADAPTIVE_ALPHA, DEFAULT_MAX_PASSES, DEFAULT_MIN_PASSES
from batchuq.errors import UsageError


@runtime_checkable
class StoppingRule(Protocol):
    """What stopping reads of the run's decision rule (``batchuq.postprocess.rules.DecisionRule``).

    Stopping controls sampling and sits below post-processing, so it names the four fields it
    reads instead of importing the rule; the rule satisfies this protocol as it is.

    Attributes:
        name: ``median``, ``threshold``, ``confidence`` or ``none``.
        min_median: Threshold of the median rule.
        min_confidence: Threshold of the confidence rule.
        thresholds: ``(classes,)`` per-class thresholds of the threshold rule, or ``None``.
    """

    @property
    def name(self) -> str: ...

    @property
    def min_median(self) -> float: ...

    @property
    def min_confidence(self) -> float: ...

    @property
    def thresholds(self) -> np.ndarray | None: ...


#: ``draw(images, first_pass, passes)``: passes ``first_pass ..`` of the given images, float32
#: ``(len(images), groups, passes, classes)`` (groups: TTA copies x ensemble members).
Draw = Callable[[np.ndarray, int, int], np.ndarray]


@dataclass(frozen=True)
class AdaptivePasses:
    """The settings of ``--passes auto``.

    Attributes:
        min_passes: Passes every image gets, and the size of every later round.
        max_passes: Passes an image gets at most (its decision then is the fixed-T one).
        alpha: Bound on each image's probability of stopping before ``max_passes`` with
            another decision than its population decision (module docstring;
            docs/methods.md, "Adaptive passes").

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
        """The error level the median rule spends at look ``look`` (0-based): half of
        ``alpha`` at the first, the other half shared by the rest; the levels of all looks
        sum to ``alpha``."""
        if self.looks <= 1:
            return self.alpha
        return self.alpha / 2 if look == 0 else self.alpha / 2 / (self.looks - 1)

    def level(self, rule: StoppingRule, look: int) -> float:
        """The error level of the bounds at look ``look``: the median rule's share of
        ``alpha`` (``look_alpha``); all of ``alpha`` for the mean-based rules, whose
        confidence sequence holds at every look at once."""
        return self.look_alpha(look) if rule.name == "median" else self.alpha

    def as_metadata(self) -> dict[str, Any]:
        """The settings, for the Parquet metadata."""
        return {
            "min_passes": self.min_passes,
            "max_passes": self.max_passes,
            "alpha": self.alpha,
            "round_passes": self.min_passes,
            "looks": self.looks,
            "tests": {
                "median": "binomial order-statistic bound, alpha spent over the looks",
                "mean": "betting confidence sequence (Waudby-Smith & Ramdas 2024), anytime-valid",
            },
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


#: The largest bet against a candidate mean ``m``, as a share of the bet ``1/m`` that could
#: lose everything (Waudby-Smith & Ramdas's truncation ``c``; they suggest 1/2 or 3/4). With
#: 3/4 a wealth factor is at least 1/4, and 20 passes of a sure class can reach the
#: ``1/level`` of 10 classes at alpha 0.01 (1.75^20 > 2000); 1/2 needs 30 (1.5^20 < 2000).
BET_TRUNCATION = 0.75
#: Bisection steps of ``mean_bounds`` (the bounds are exact to 2^-24, rounded outwards).
_BISECTIONS = 24


def mean_bounds(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided anytime-valid bounds on every class's mean, each at error ``level``.

    The betting confidence sequence of Waudby-Smith & Ramdas (2024, JRSS-B, "Estimating means
    of bounded random variables by betting"), its positive and negative capital processes
    each at ``level``, with predictable plug-in bets, for values in ``[0, 1]``. Pass ``t`` of
    all ``G`` groups is one bet: the wealth against a candidate mean ``m`` is

        K_t(m) = prod_{s <= t} prod_g (1 + lambda_s(m) (x_{g,s} - m)),
        lambda_s(m) = min(sqrt(2 ln(1/level) / (v_{s-1} n_s ln(1 + n_s))), c / m),

    with ``n_s = G s`` samples so far, ``v_{s-1}`` the regularised variance of the passes
    before ``s`` and ``c = BET_TRUNCATION``. If the groups' means average at most ``m`` and
    the draws are independent, ``E prod_g (1 + lambda (x_g - m)) <= 1`` (the arithmetic-
    geometric mean inequality), so ``K`` is a nonnegative supermartingale over passes and
    ``P(K_t(mean) >= 1/level for some t) <= level`` (Ville). ``K_t(m)`` falls as ``m``
    grows, so the values ``m`` it does not reject form ``(lower, 1]``; the upper bound is the
    mirror image on ``1 - x``. Both hold at every pass at once: no spending over looks.

    Args:
        samples: ``(images, groups, passes, classes)`` probabilities; ``groups`` are the TTA
            copies (and ensemble members), every one with the same passes.
        level: Error level of each one-sided bound, over all passes at once.

    Returns:
        ``lower``, ``upper``: ``(images, classes)`` in ``[0, 1]``.
    """
    values = np.clip(samples.astype(np.float64), 0.0, 1.0)
    return _betting_lower(values, level), 1.0 - _betting_lower(1.0 - values, level)


def betting_log_wealth(samples: np.ndarray, m: np.ndarray, level: float) -> np.ndarray:
    """``ln K_t(m)`` of ``mean_bounds``'s positive capital process after every pass.

    Args:
        samples: ``(images, groups, passes, classes)`` values in ``[0, 1]``.
        m: ``(images, classes)`` candidate means in ``(0, 1]``.
        level: Error level of the bound the bets are tuned for.

    Returns:
        ``(images, passes, classes)``: the bound rejects ``m`` (the mean is above it) once
        this reaches ``ln(1 / level)``.
    """
    values = np.clip(samples.astype(np.float64), 0.0, 1.0)
    m = np.asarray(m, dtype=np.float64)[:, None, None]
    bet = np.minimum(_plug_in_bets(values, level), BET_TRUNCATION / m)
    return np.cumsum(np.log1p(bet * (values - m)).sum(axis=1), axis=1)


def _plug_in_bets(values: np.ndarray, level: float) -> np.ndarray:
    """``(images, 1, T, C)``: the bet of every pass before truncation, from the passes before
    it (Waudby-Smith & Ramdas's predictable plug-in, regularised by one fake sample of mean
    1/2 and variance 1/4); the same for ``values`` and ``1 - values``."""
    images, groups, passes, classes = values.shape
    counts = groups * np.arange(1, passes + 1, dtype=np.float64)[:, None]  # (T, 1)
    running_mean = (0.5 + np.cumsum(values.sum(axis=1), axis=1)) / (counts + 1)  # (n, T, C)
    squares = ((values - running_mean[:, None]) ** 2).sum(axis=1)
    running_var = (0.25 + np.cumsum(squares, axis=1)) / (counts + 1)
    before = np.concatenate([np.full((images, 1, classes), 0.25), running_var[:, :-1]], axis=1)
    return np.sqrt(2.0 * math.log(1.0 / level) / (before * counts * np.log1p(counts)))[:, None]


def _betting_lower(values: np.ndarray, level: float) -> np.ndarray:
    """The lower bound of ``mean_bounds``: ``(images, classes)`` for ``(images, G, T, C)``.

    Bisection on ``m``, keeping ``low`` a rejected value (or 0): rounded outwards."""
    images, _, _, classes = values.shape
    log_level = math.log(1.0 / level)
    bets = _plug_in_bets(values, level)
    low, high = np.zeros((images, classes)), np.ones((images, classes))
    for _ in range(_BISECTIONS):
        m = (low + high) / 2
        bet = np.minimum(bets, BET_TRUNCATION / m[:, None, None])
        wealth = np.log1p(bet * (values - m[:, None, None])).sum(axis=(1, 2))
        rejected = wealth >= log_level  # the mean is above m
        low, high = np.where(rejected, m, low), np.where(rejected, high, m)
    return low


#: How far model outputs may sum from 1 (``jobs.batches.check_probabilities`` refuses more).
_SUM_TOLERANCE = 1e-3


def _on_the_simplex(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tighten a box of bounds on means that sum to 1: each class's mean is at most 1 minus
    the other classes' lower bounds, and at least 1 minus their upper bounds."""
    low_sum, high_sum = lower.sum(axis=1, keepdims=True), upper.sum(axis=1, keepdims=True)
    upper = np.minimum(upper, 1.0 + _SUM_TOLERANCE - (low_sum - lower))
    lower = np.maximum(lower, 1.0 - _SUM_TOLERANCE - (high_sum - upper))
    return lower, upper


def settled(
    samples: np.ndarray, rule: StoppingRule, level: float, temperature: float | None = None
) -> np.ndarray:
    """Which images' decisions more samples could not change, at error ``level``.

    An image is settled when its decision is the same for every statistic within the bounds
    and for the statistic of the samples so far (the decision it would get now).

    Args:
        samples: ``(images, groups, passes, classes)`` probabilities drawn so far.
        rule: The run's decision rule.
        level: The error level of this look (``AdaptivePasses.level``): the median rule's
            share of ``alpha``, or all of it for the mean-based rules.
        temperature: The temperature applied to the mean before a mean-based rule, if any.

    Returns:
        ``(images,)`` bool.
    """
    images, groups, passes, classes = samples.shape
    if rule.name == "median":
        pooled = samples.reshape(images, groups * passes, classes)
        if rule.min_median >= 0.5:
            # At most one class can hold a median above 1/2; three one-sided bounds cover
            # every way to be wrong (docs/methods.md, "Adaptive passes").
            lower, upper = median_bounds(pooled, level / 3)
            limit = max(rule.min_median, np.nextafter(0.5, 1.0))
            return (lower >= limit).any(axis=1) | (upper < rule.min_median).all(axis=1)
        lower, upper = median_bounds(pooled, level / (2 * classes))
        limits = np.full(classes, rule.min_median)
        return _stable(lower, upper, limits, strict_top=True)
    lower, upper = _on_the_simplex(*mean_bounds(samples, level / (2 * classes)))
    # The decision is taken on the samples' mean: keep it inside the box.
    mean = samples.astype(np.float64).mean(axis=(1, 2))
    lower, upper = np.minimum(lower, mean), np.maximum(upper, mean)
    if temperature is not None:
        lower, upper = _tempered_bounds(lower, upper, temperature)
    return _stable(lower, upper, _mean_rule_limits(rule, classes), strict_top=False)


def _mean_rule_limits(rule: StoppingRule, classes: int) -> np.ndarray:
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
    rule: StoppingRule,
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
        stop = settled(so_far, rule, adaptive.level(rule, look), temperature)
        if look == 0 and stop_after_first is not None:
            stop |= stop_after_first[active]
        active = active[~stop]
        if active.size == 0:
            break
    return _result(drawn)


def _stacked(drawn: list[list[np.ndarray]], active: np.ndarray) -> np.ndarray:
    """``(active, groups, passes, classes)``: the active images' samples so far (they all
    have had the same rounds)."""
    return np.stack([np.concatenate(drawn[i], axis=1) for i in active])


def _result(drawn: list[list[np.ndarray]]) -> AdaptiveResult:
    samples, passes = [], []
    for rounds in drawn:
        joined = np.concatenate(rounds, axis=1)  # (groups, passes, classes)
        samples.append(joined.reshape(-1, joined.shape[2]))
        passes.append(joined.shape[1])
    return AdaptiveResult(samples, np.asarray(passes, dtype=np.int64))
