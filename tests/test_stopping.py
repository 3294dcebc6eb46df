"""The stopping rule of ``--passes auto`` (sampling/stopping.py), on synthetic samples whose
population decision is known: the bounds hold as often as their proofs say, and images at the
decision boundary stop early with a wrong decision at most ``alpha`` of the time, where a naive
rule errs far more often."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from batchuq.errors import UsageError
from batchuq.postprocess.rules import DecisionRule, median_rule
from batchuq.sampling.stopping import (
    AdaptivePasses,
    StoppingRule,
    betting_log_wealth,
    mean_bounds,
    median_bounds,
    order_statistic_rank,
    sample_adaptively,
    settled,
)
from batchuq.summarise import summarise_images


def test_the_decision_rule_is_what_stopping_reads() -> None:
    """Stopping sits below post-processing and names the fields it reads of the rule in a
    protocol; every rule satisfies it, and an object missing a field does not."""
    for name in ("median", "threshold", "confidence", "none"):
        assert isinstance(DecisionRule(name), StoppingRule)
    assert not isinstance(AdaptivePasses(), StoppingRule)


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


def _bernoulli_copies(images: int, passes: int, shifts: list[float], seed: int):
    """0/1 samples (the largest variance a mean in [0, 1] can have) of ``len(shifts)`` TTA
    copies whose means differ by ``shifts`` around an image mean uniform on [0.3, 0.7].

    Returns:
        ``(images, copies, passes, 1)`` samples and the image means ``(images, 1)``.
    """
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.3, 0.7, (images, 1))
    copy_means = mean + np.asarray(shifts)[None, :]
    draws = rng.uniform(size=(images, len(shifts), passes)) < copy_means[:, :, None]
    return draws[..., None].astype(np.float32), mean


@pytest.mark.parametrize("shifts", [[0.0], [-0.2, 0.05, 0.15]], ids=["one copy", "3 copies"])
def test_betting_wealth_at_the_true_mean_reaches_one_over_level_at_most_level_of_the_time(
    shifts: list[float],
) -> None:
    # Ville: the wealth against the true mean is a nonnegative supermartingale over passes,
    # so P(it ever reaches 1/level) <= level, at every pass at once, also when the copies
    # have different means (their average is the mean). Measured at level 0.05: 0.037 and
    # 0.033 (lower, upper) with one copy, 0.017 and 0.023 with three (sd 0.003 with 4000
    # images); a bound that rejected at 1/(2 level), one copy: 0.076 and 0.073.
    level = 0.05
    draws, mean = _bernoulli_copies(4000, 100, shifts, seed=len(shifts))
    lower_side = betting_log_wealth(draws, mean, level)
    upper_side = betting_log_wealth(1 - draws, 1 - mean, level)  # the mirrored process
    for wealth in (lower_side, upper_side):
        assert (wealth >= np.log(1 / level)).any(axis=(1, 2)).mean() <= level


def test_mean_bounds_are_where_the_wealth_crosses_one_over_level() -> None:
    level = 0.01
    draws, mean = _bernoulli_copies(500, 40, [-0.1, 0.1], seed=7)
    lower, upper = mean_bounds(draws, level)
    assert ((lower >= 0) & (lower <= upper) & (upper <= 1)).all()
    threshold = np.log(1 / level)
    final = betting_log_wealth(draws, np.maximum(lower, 1e-9), level)[:, -1]
    inside = lower > 0
    assert inside.mean() > 0.9 and (final[inside] >= threshold).all()  # lower is rejected
    above = betting_log_wealth(draws, np.minimum(lower + 1e-6, 1.0), level)[:, -1]
    assert (above < threshold).all()  # ... and nothing much above it is
    # Every miss of the bounds at the last pass is a crossing of the wealth.
    missed_low = lower[:, 0] > mean[:, 0]
    assert (final[missed_low, 0] >= threshold).all()
    assert (upper - lower).mean() < 0.5  # informative at 80 samples


def test_adaptive_settings_are_checked_and_spend_alpha_exactly() -> None:
    adaptive = AdaptivePasses(10, 100, 0.01)
    assert adaptive.rounds() == [(s, 10) for s in range(0, 100, 10)]
    assert AdaptivePasses(30, 100).rounds()[-1] == (90, 10)
    assert adaptive.looks == 9
    assert sum(adaptive.look_alpha(i) for i in range(adaptive.looks)) == pytest.approx(0.01)
    # The median rule spends alpha over the looks; the mean rules' confidence sequence holds
    # at every look at once.
    median, confidence = DecisionRule("median"), DecisionRule("confidence")
    assert [adaptive.level(median, i) for i in range(9)] == [0.005] + [0.005 / 8] * 8
    assert {adaptive.level(confidence, i) for i in range(9)} == {0.01}
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
    # What the bound promises: wrong decisions taken early stay within alpha.
    assert (stopped & (decisions != truth)).mean() <= alpha
    # Not promised, but measured here: few decisions differ from the fixed T = 100 run's.
    assert (decisions != fixed).mean() <= alpha
    # Images that never settle get the fixed run's samples, hence its decision exactly.
    assert (decisions[~stopped] == fixed[~stopped]).all()
    assert stopped.mean() > 0.3  # measured: 84 passes on average, a third stop early
    # Deciding on the first 10 passes with no bound errs far more often than alpha: the
    # synthetic set can catch a stopping rule that is not calibrated.
    naive = median_rule(np.median(passes[:, 0, :10], axis=1), 0.5)
    assert (naive != truth).mean() > 5 * alpha


def test_adaptive_mean_rule_errs_less_than_alpha_and_stops_most_images_early() -> None:
    passes, _, mean = _synthetic(3000, seed=3, spread=0.3, low=0.2, high=0.9)
    alpha = 0.05
    rule = DecisionRule("confidence", min_confidence=0.5)
    decisions, used = _run(passes, rule, alpha)
    stopped = used < MAX_PASSES
    # Class 0 is the argmax whenever its mean is >= 0.5, and images with a mean below 0.5
    # whose argmax is another class are unclassified too.
    truth = np.where(mean >= 0.5, 0, -1)
    assert (stopped & (decisions != truth)).mean() <= alpha
    # Measured: 87% stop early, 45.6 passes on average (the empirical-Bernstein test this
    # bound replaced stopped 24%).
    assert stopped.mean() > 0.75 and used.mean() < 55


# ---------------------------------------------------------------------------------------------
# At the decision boundary: the worst case for stopping early
# ---------------------------------------------------------------------------------------------


def _boundary_means(images: int, seed: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class-0 mean is uniform on ``0.5 +- delta``, each pass 0/1 for class 0
    (the largest variance such a mean can have), the rest split at random between classes 1
    and 2; with the confidence rule at 0.5 the population decision is class 0 when its mean
    is at least 0.5 and ``unclassified`` otherwise.

    Returns:
        ``passes`` (images, 1, 100, 3) and the population decisions.
    """
    rng = np.random.default_rng(seed)
    mean = 0.5 + rng.uniform(-delta, delta, images)
    top = (rng.uniform(size=(images, MAX_PASSES)) < mean[:, None]).astype(np.float32)
    split = rng.uniform(size=(images, MAX_PASSES)).astype(np.float32)
    probs = np.stack([top, (1 - top) * split, (1 - top) * (1 - split)], axis=-1)
    return probs[:, None], np.where(mean >= 0.5, 0, -1)


def test_mean_rule_at_the_boundary_stops_early_with_a_wrong_decision_at_most_alpha() -> None:
    # alpha 0.2 so that errors are frequent enough to count. Measured: 0.8% of images stop
    # early with a wrong decision (1.6% stop early); bounds at 6 times their level (no
    # union over the classes) 3.5%, at 20 times 17.5%; deciding on the first 10 passes 49%.
    alpha = 0.2
    passes, truth = _boundary_means(2000, seed=11, delta=0.02)
    decisions, used = _run(passes, DecisionRule("confidence", min_confidence=0.5), alpha)
    stopped = used < MAX_PASSES
    assert (stopped & (decisions != truth)).mean() <= alpha
    assert stopped.any()  # some do stop: the test is not vacuous
    first = passes[:, 0, :10].mean(axis=1)
    naive = np.where(first[:, 0] >= 0.5, 0, -1)
    assert (naive != truth).mean() > 2 * alpha


def test_median_rule_at_the_boundary_stops_early_with_a_wrong_decision_at_most_alpha() -> None:
    # Medians uniform on 0.5 +- 0.01. Measured: 0.8% of images stop early with a wrong
    # decision (2.5% stop early); with alpha at every look instead of spent, 6.2%; with
    # that and without the 3-way split, 16.7%; deciding on the first 10 passes 47%.
    alpha = 0.1
    passes, m, _ = _synthetic(4000, seed=12, low=0.49, high=0.51)
    truth = np.where(m > 0.5, 0, -1)
    decisions, used = _run(passes, DecisionRule("median"), alpha)
    stopped = used < MAX_PASSES
    assert (stopped & (decisions != truth)).mean() <= alpha
    assert stopped.any()
    naive = median_rule(np.median(passes[:, 0, :10], axis=1), 0.5)
    assert (naive != truth).mean() > 2 * alpha


def test_settled_needs_every_class_out_of_reach() -> None:
    rule = DecisionRule("median")
    sure = np.tile([0.9, 0.05, 0.05], (1, 1, 20, 1))  # (images, copies, passes, classes)
    doubtful = np.tile([0.9, 0.05, 0.05], (1, 1, 20, 1))
    doubtful[0, 0, :5] = [0.1, 0.85, 0.05]  # 5 of 20 samples say class 1
    nothing = np.tile([0.4, 0.3, 0.3], (1, 1, 20, 1))
    out = settled(np.concatenate([sure, doubtful, nothing]), rule, level=0.01)
    assert out.tolist() == [True, False, True]
    # The none rule can never settle on "unclassified"; a clear argmax settles.
    none = DecisionRule("none")
    assert settled(np.tile([0.34, 0.33, 0.33], (1, 1, 40, 1)), none, 0.01).tolist() == [False]
    assert settled(np.tile([0.98, 0.01, 0.01], (1, 1, 100, 1)), none, 0.01).tolist() == [True]


def test_mean_rules_settle_sure_images_after_20_passes_and_pool_the_copies() -> None:
    # 10 classes at alpha 0.01: each bound at 0.0005. No valid bound can settle on 10 samples
    # (a mean just below 0.5 gives 10 ones with probability 2^-10 > 0.0005); the betting
    # bound settles on 20, and on 10 passes of 2 copies.
    sure = np.full((1, 1, 20, 10), 0.001, np.float32)
    sure[..., 3] = 0.991
    rule = DecisionRule("confidence", min_confidence=0.5)
    assert settled(sure[:, :, :10], rule, 0.01).tolist() == [False]
    assert settled(sure, rule, 0.01).tolist() == [True]
    assert settled(sure.reshape(1, 2, 10, 10), rule, 0.01).tolist() == [True]
