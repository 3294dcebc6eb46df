"""The stopping rule of ``--passes auto`` (postprocess/stopping.py), on synthetic samples whose
population decision is known: its error stays within ``alpha``, and a naive rule's does not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from batchuq.errors import UsageError
from batchuq.postprocess.rules import DecisionRule, median_rule
from batchuq.postprocess.stopping import (
    AdaptivePasses,
    mean_bounds,
    median_bounds,
    order_statistic_rank,
    sample_adaptively,
    settled,
)
from batchuq.summarise import summarise_images


@pytest.mark.parametrize("samples", [5, 10, 20, 37, 100, 400])
@pytest.mark.parametrize("level", [0.05, 0.00167, 1e-4])
def test_order_statistic_rank_is_the_binomial_quantile(samples: int, level: float) -> None:
    rank = order_statistic_rank(samples, level)
    cdf = stats.binom.cdf(np.arange(samples + 1), samples, 0.5)
    if rank:
        assert cdf[rank - 1] <= level  # P(Bin <= rank - 1)
    assert rank == samples // 2 or cdf[rank] > level  # the next rank would exceed it


def test_median_bounds_miss_the_median_exactly_as_often_as_the_binomial_tail_says() -> None:
    rng = np.random.default_rng(0)
    level, n, trials = 0.05, 30, 20000
    draws = rng.exponential(size=(trials, n, 1))  # median ln 2
    lower, upper = median_bounds(draws, level)
    # For a continuous distribution the miss rate is exactly P(Bin(30, 1/2) <= rank - 1).
    exact = stats.binom.cdf(order_statistic_rank(n, level) - 1, n, 0.5)
    assert exact <= level
    noise = 4 * np.sqrt(exact * (1 - exact) / trials)
    assert abs((lower[:, 0] > np.log(2)).mean() - exact) < noise
    assert abs((upper[:, 0] < np.log(2)).mean() - exact) < noise


def test_mean_bounds_cover_the_mean_as_often_as_promised() -> None:
    rng = np.random.default_rng(1)
    level = 0.05
    draws = rng.beta(0.5, 2.0, size=(20000, 40, 1))  # mean 0.2
    lower, upper = mean_bounds(draws, level)
    assert (lower[:, 0] > 0.2).mean() <= level and (upper[:, 0] < 0.2).mean() <= level
    assert (upper - lower).mean() < 0.8  # informative at n = 40


def test_adaptive_settings_are_checked_and_spend_alpha_exactly() -> None:
    adaptive = AdaptivePasses(10, 100, 0.01)
    assert adaptive.rounds() == [(s, 10) for s in range(0, 100, 10)]
    assert AdaptivePasses(30, 100).rounds()[-1] == (90, 10)
    assert adaptive.looks == 9
    assert sum(adaptive.look_alpha(i) for i in range(adaptive.looks)) == pytest.approx(0.01)
    for bad in [(0, 10, 0.01), (20, 10, 0.01), (10, 100, 0.0), (10, 100, 1.0)]:
        with pytest.raises(UsageError, match="Received"):
            AdaptivePasses(*bad)


# ---------------------------------------------------------------------------------------------
# Synthetic images with a known population decision
# ---------------------------------------------------------------------------------------------

MAX_PASSES = 100


def _synthetic(
    images: int, seed: int, spread: float = 1.0, low: float = 0.3, high: float = 0.7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``images`` images of 3 classes, each with its 100 passes drawn up front.

    Class 0's probability is ``sigmoid(logit(m) + Z)``, Z standard normal, so its median is
    exactly ``m`` (a monotone map of a symmetric variable); the rest is split at random
    between classes 1 and 2. ``m`` is uniform on [low, high]: by default many images sit near
    the median rule's threshold 0.5, where deciding early is risky.

    Returns:
        ``passes`` (images, 1, 100, 3), the true medians ``m`` and the true means of class 0.
    """
    rng = np.random.default_rng(seed)
    m = rng.uniform(low, high, images)
    logit = np.log(m / (1 - m))
    noise = spread * rng.standard_normal((images, MAX_PASSES))
    top = 1 / (1 + np.exp(-(logit[:, None] + noise)))
    split = rng.uniform(size=(images, MAX_PASSES))
    probs = np.stack([top, (1 - top) * split, (1 - top) * (1 - split)], axis=-1)
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)  # E over Z ~ N(0, 1)
    curve = 1 / (1 + np.exp(-(logit[:, None] + spread * nodes)))
    mean = (weights / weights.sum() * curve).sum(axis=1)
    return probs[:, None].astype(np.float32), m, mean


def _run(passes: np.ndarray, rule: DecisionRule, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive decisions and passes for pre-drawn ``passes``."""

    def draw(images: np.ndarray, first: int, count: int) -> np.ndarray:
        return passes[images, :, first : first + count]

    adaptive = AdaptivePasses(10, MAX_PASSES, alpha)
    result = sample_adaptively(draw, len(passes), adaptive, rule)
    summary = summarise_images(result.samples)
    if rule.name == "median":
        return median_rule(summary.median, rule.min_median), result.passes
    return np.where(summary.confidence >= rule.min_confidence, summary.pred, -1), result.passes


def test_adaptive_median_rule_errs_less_than_alpha_where_a_naive_rule_does_not() -> None:
    passes, m, _ = _synthetic(6000, seed=2)
    alpha = 0.01
    truth = np.where(m > 0.5, 0, -1)
    decisions, used = _run(passes, DecisionRule("median"), alpha)
    fixed = median_rule(np.median(passes[:, 0], axis=1), 0.5)
    stopped = used < MAX_PASSES
    # What the bound promises: wrong decisions taken early stay within alpha ...
    assert (stopped & (decisions != truth)).mean() <= alpha
    # ... and so does the share of decisions that differ from the fixed T = 100 run.
    assert (decisions != fixed).mean() <= alpha
    # Images that never settle get the fixed run's samples, hence its decision exactly.
    assert (decisions[~stopped] == fixed[~stopped]).all()
    assert stopped.mean() > 0.3  # measured: 84 passes on average, a third stop early
    # Deciding on the first 10 passes with no bound errs far more often than alpha: the
    # synthetic set can catch a stopping rule that is not calibrated.
    naive = median_rule(np.median(passes[:, 0, :10], axis=1), 0.5)
    assert (naive != truth).mean() > 5 * alpha


def test_adaptive_mean_rule_errs_less_than_alpha() -> None:
    # Empirical Bernstein needs tens of samples even for a tight spread.
    passes, _, mean = _synthetic(3000, seed=3, spread=0.3, low=0.2, high=0.9)
    alpha = 0.05
    rule = DecisionRule("confidence", min_confidence=0.5)
    decisions, used = _run(passes, rule, alpha)
    stopped = used < MAX_PASSES
    # Class 0 is the argmax whenever its mean is >= 0.5, and images with a mean below 0.5
    # whose argmax is another class are unclassified too.
    truth = np.where(mean >= 0.5, 0, -1)
    assert (stopped & (decisions != truth)).mean() <= alpha
    assert stopped.mean() > 0.2  # measured: 24% stop early


def test_settled_needs_every_class_out_of_reach() -> None:
    rule = DecisionRule("median")
    sure = np.tile([0.9, 0.05, 0.05], (1, 20, 1))
    doubtful = np.concatenate([np.tile([0.9, 0.05, 0.05], (1, 10, 1))] * 2, axis=1)
    doubtful[0, :5] = [0.1, 0.85, 0.05]  # 5 of 20 samples say class 1
    nothing = np.tile([0.4, 0.3, 0.3], (1, 20, 1))
    out = settled(np.concatenate([sure, doubtful, nothing]), rule, look_alpha=0.01)
    assert out.tolist() == [True, False, True]
    # The none rule can never settle on "unclassified"; a clear argmax settles.
    none = DecisionRule("none")
    assert settled(np.tile([0.34, 0.33, 0.33], (1, 40, 1)), none, 0.01).tolist() == [False]
    assert settled(np.tile([0.98, 0.01, 0.01], (1, 100, 1)), none, 0.01).tolist() == [True]
