"""batchuq.postprocess.selective: the certified selective threshold (docs/methods.md,
"Selective risk with a guarantee").

* The guarantee, by simulation (issue 22, must-show 1): over 1000 calibration sets drawn from a
  synthetic overconfident classifier whose selective risk is known in closed form, the share of
  calibration sets whose chosen threshold has a true selective risk above the target is at most
  delta (within Monte-Carlo error), while the naive threshold (empirical risk <= target) breaches
  far more often under the same assertion; mean coverage against the oracle's.
* Independent cross-checks: the binomial tails and bound against SciPy, the whole walk against
  a direct SciPy transcription of the algorithm on random inputs (hypothesis), and the p-values
  and fixed-sequence procedure against MAPIE's Learn-then-Test (``mapie.risk_control``).
* The certificate, ties, the infeasible targets and the input checks.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from batchuq.errors import UsageError
from batchuq.postprocess.selective import (
    SELECTIVE_METHOD,
    SelectiveCertificate,
    binomial_cdf,
    binomial_upper_bound,
    fit_selective_threshold,
    min_accepted,
    start_count,
)

# ------------------------------------------------------------------------------------------
# A synthetic overconfident classifier with a closed-form selective risk.
#
# Confidence S ~ Beta(a, 1) on (0, 1) (density a s^(a-1), most mass near 1); the prediction is
# right with probability c(s) = h(s) s^g < s (g > 1: overconfident), where h = 1 below `knee`
# and h = `top` above it. top < 1 makes the most confident images worse than their neighbours,
# so that the selective risk first falls, then rises as the threshold comes down: a risk that
# is not monotone, where the data-chosen start of the walk matters.
# ------------------------------------------------------------------------------------------


class Overconfident:
    def __init__(self, a: float, g: float, knee: float = 1.0, top: float = 1.0) -> None:
        self.a, self.g, self.knee, self.top = a, g, knee, top

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]):
        scores = rng.random(shape) ** (1.0 / self.a)
        right = self.top * scores**self.g
        right = np.where(scores > self.knee, right, scores**self.g)
        return scores, rng.random(shape) < right

    def _wrong_mass(self, low: np.ndarray, high: np.ndarray, h: float) -> np.ndarray:
        """P(wrong, low <= S < high) where c(s) = h s^g."""
        a, g = self.a, self.g
        return (high**a - low**a) - h * a / (a + g) * (high ** (a + g) - low ** (a + g))

    def accepted(self, lam: np.ndarray) -> np.ndarray:
        """G(lam) = P(S >= lam)."""
        return 1.0 - np.clip(lam, 0.0, 1.0) ** self.a

    def risk(self, lam: np.ndarray) -> np.ndarray:
        """The selective risk P(wrong | S >= lam), exactly."""
        lam = np.clip(np.asarray(lam, dtype=float), 0.0, 1.0 - 1e-12)
        knee = np.full_like(lam, self.knee)
        upper = self._wrong_mass(np.maximum(lam, knee), np.ones_like(lam), self.top)
        lower = self._wrong_mass(np.minimum(lam, knee), knee, 1.0)
        return (upper + lower) / self.accepted(lam)

    def oracle_coverage(self, target: float) -> float:
        """The largest P(S >= lam) of any threshold whose selective risk is <= target."""
        lam = np.linspace(0.0, 1.0 - 1e-9, 400_001)
        ok = self.risk(lam) <= target
        return float(self.accepted(lam[ok]).max())


MONOTONE = Overconfident(a=8.0, g=2.0)  # 20% wrong overall; the risk falls to 0 at the top
# The top 1% of confidences (S > 0.99^(1/8)) are right only 85% of the time.
NON_MONOTONE = Overconfident(a=8.0, g=2.0, knee=0.99 ** (1 / 8), top=0.85)


def naive_thresholds(scores: np.ndarray, correct: np.ndarray, target: float) -> np.ndarray:
    """Per row: the lowest score whose empirical selective risk is <= target (no bound)."""
    order = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, order, axis=1)
    wrong = np.cumsum(~np.take_along_axis(correct, order, axis=1), axis=1)
    risk = wrong / np.arange(1, scores.shape[1] + 1)
    last = scores.shape[1] - 1 - np.argmax((risk <= target)[:, ::-1], axis=1)
    return ranked[np.arange(len(scores)), last]


SPLITS, N_CAL, TARGET, DELTA = 1000, 2000, 0.05, 0.1


def certified_threshold(scores: np.ndarray, correct: np.ndarray) -> float:
    """The fitted threshold, or +inf (accept nothing: no error) where none is certified."""
    try:
        return fit_selective_threshold(scores, correct, TARGET, DELTA)[0]
    except UsageError:
        return math.inf


@pytest.mark.parametrize("model", [MONOTONE, NON_MONOTONE], ids=["monotone", "non_monotone"])
def test_selective_risk_exceeds_target_in_at_most_delta_of_calibration_sets(model) -> None:
    rng = np.random.default_rng(20260522)
    scores, correct = model.draw(rng, (SPLITS, N_CAL))
    chosen = np.array([certified_threshold(s, c) for s, c in zip(scores, correct, strict=True)])
    naive = naive_thresholds(scores, correct, TARGET)

    # Three standard errors of a binomial share at delta over SPLITS calibration sets.
    allowed = DELTA + 3.0 * math.sqrt(DELTA * (1 - DELTA) / SPLITS)
    # A refusal accepts nothing, so it makes no error.
    breached = float(np.mean(np.isfinite(chosen) & (model.risk(chosen) > TARGET)))
    naive_breached = float(np.mean(model.risk(naive) > TARGET))
    coverage = float(np.mean(model.accepted(chosen)))
    oracle = model.oracle_coverage(TARGET)
    print(
        f"\n{SPLITS} calibration sets of {N_CAL}, target {TARGET}, delta {DELTA}: breached "
        f"{breached:.3f} (allowed {allowed:.3f}); naive breached {naive_breached:.3f}; "
        f"mean coverage {coverage:.3f}, naive {np.mean(model.accepted(naive)):.3f}, "
        f"oracle {oracle:.3f}; {np.mean(np.isinf(chosen)):.3f} refused"
    )
    assert breached <= allowed
    # The same assertion bites: the threshold without a bound breaches it.
    assert naive_breached > allowed
    # Certified coverage is below the oracle's (it has to be) but not vacuous where the walk
    # can start: in NON_MONOTONE the most confident images are wrong about as often as the
    # target allows, so most calibration sets refuse (honestly) rather than certify.
    assert coverage < oracle
    if model is MONOTONE:
        assert coverage > 0.5 * oracle


# ------------------------------------------------------------------------------------------
# Cross-checks.
# ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(0, 3000),
    k=st.integers(-2, 3000),
    p=st.floats(1e-4, 1 - 1e-4),
)
def test_binomial_cdf_matches_scipy(m: int, k: int, p: float) -> None:
    ours = float(binomial_cdf(k, m, p)[()])
    theirs = float(binom.cdf(k, m, p))
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-300)


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 2000), data=st.data(), delta=st.floats(1e-3, 0.5))
def test_binomial_upper_bound_is_clopper_pearson(m: int, data, delta: float) -> None:
    k = data.draw(st.integers(0, m - 1))
    bound = binomial_upper_bound(k, m, delta)
    # Clopper-Pearson's one-sided upper bound: the 1 - delta quantile of Beta(k + 1, m - k).
    assert bound == pytest.approx(beta_dist.ppf(1 - delta, k + 1, m - k), rel=1e-7, abs=1e-12)
    assert binomial_upper_bound(m, m, delta) == 1.0


def fit_by_transcription(scores, correct, target, delta):
    """The algorithm of docs/methods.md written out with plain loops and SciPy's binomial.

    Returns (threshold, accepted, errors), or None when no threshold is certified.
    """
    m_start = 1  # the fewest that can be certified at all: no error
    while binom.cdf(0, m_start - 1, target) > delta:
        m_start += 1
    # The walk starts where an error share of half the target passes, if n has that many.
    while m_start < len(scores) and binom.cdf(m_start * target // 2, m_start - 1, target) > delta:
        m_start += 1
    chosen = None
    for value in sorted(set(scores.tolist()), reverse=True):
        accept = scores >= value
        m, k = int(accept.sum()), int((~correct[accept]).sum())
        if m < m_start:
            continue  # too few accepted to be tested: the walk has not started
        if binom.cdf(k, m - 1, target) > delta:
            break  # fixed-sequence testing stops at its first failure
        chosen = (value, m, k)
    return chosen


def p_value_near(scores, correct, target, delta) -> bool:
    """Whether a candidate's p-value is within 1e-9 of delta (a coin flip for float sums)."""
    for value in set(scores.tolist()):
        accept = scores >= value
        m, k = int(accept.sum()), int((~correct[accept]).sum())
        if m >= 2 and abs(binom.cdf(k, m - 1, target) - delta) <= 1e-9 * delta:
            return True
    return False


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([0, 5, 50]),  # 0: continuous scores; else that many distinct values
    error_rate=st.floats(0.0, 0.3),
    target=st.sampled_from([0.02, 0.05, 0.1, 0.2, 0.3]),
    delta=st.sampled_from([0.01, 0.05, 0.1, 0.2]),
)
def test_threshold_matches_a_scipy_transcription(n, seed, levels, error_rate, target, delta):
    rng = np.random.default_rng(seed)
    scores = rng.random(n) if levels == 0 else rng.integers(0, levels, n).astype(float)
    # Errors likelier at low scores, so that some targets are feasible.
    correct = rng.random(n) >= error_rate * 2 * (1 - scores / max(scores.max(), 1e-9))
    if p_value_near(scores, correct, target, delta):
        return
    expected = fit_by_transcription(scores, correct, target, delta)
    if expected is None:
        with pytest.raises(UsageError, match="cannot be certified"):
            fit_selective_threshold(scores, correct, target, delta)
        return
    threshold, certificate = fit_selective_threshold(scores, correct, target, delta)
    assert (threshold, certificate.accepted, certificate.errors) == expected


def test_p_values_and_fixed_sequence_match_mapie() -> None:
    """MAPIE's Learn-then-Test pieces on the same candidates: its binary Bentkus p-value
    (``binom.cdf(ceil(n r_hat), n, alpha)``, at ``n = accepted - 1``, ``r_hat = errors / n``)
    and its fixed-sequence FWER procedure give our p-values and our threshold."""
    pytest.importorskip("mapie", minversion="1.0")
    from mapie.risk_control.fwer_control import control_fwer
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    rng = np.random.default_rng(7)
    compared = 0
    for model, target in [(MONOTONE, 0.05), (MONOTONE, 0.1), (NON_MONOTONE, 0.05)]:
        for _ in range(8):
            scores, correct = model.draw(rng, (600,))
            order = np.argsort(-scores)
            accepted = np.arange(1, 601)
            errors = np.cumsum(~correct[order])
            start = start_count(600, target, DELTA) - 1  # index of the first tested threshold
            n_obs = accepted[start:] - 1
            r_hat = errors[start:] / n_obs
            # MAPIE takes ceil(n_obs * r_hat) as the count: nudge r_hat down a ulp where the
            # product rounds above the whole number.
            slip = np.ceil(n_obs * r_hat) > errors[start:]
            r_hat[slip] = np.nextafter(r_hat[slip], 0.0)
            assert np.all(np.ceil(n_obs * r_hat) == errors[start:])
            theirs = compute_hoeffding_bentkus_p_value(r_hat, n_obs, target, binary=True)[:, 0]
            ours = binomial_cdf(errors[start:], n_obs, target)
            np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-300)

            rejected = control_fwer(theirs, DELTA, fwer_method="fixed_sequence")
            try:
                threshold, certificate = fit_selective_threshold(scores, correct, target, DELTA)
            except UsageError:
                assert rejected.size == 0
                continue
            assert np.array_equal(rejected, np.arange(rejected.size))
            assert threshold == scores[order][start + rejected[-1]]
            compared += 1
    assert compared >= 10


# ------------------------------------------------------------------------------------------
# The certificate, ties, infeasible targets, input checks.
# ------------------------------------------------------------------------------------------


def test_certificate_counts_what_the_threshold_accepts() -> None:
    scores, correct = MONOTONE.draw(np.random.default_rng(3), (3000,))
    threshold, cert = fit_selective_threshold(scores, correct, 0.05, 0.1)
    accept = scores >= threshold
    assert isinstance(cert, SelectiveCertificate)
    assert (cert.threshold, cert.n, cert.method) == (threshold, 3000, SELECTIVE_METHOD)
    assert (cert.accepted, cert.errors) == (int(accept.sum()), int((~correct[accept]).sum()))
    assert cert.coverage == pytest.approx(accept.mean())
    # The bound reached is the Clopper-Pearson bound on accepted - 1 trials, below the target.
    assert cert.risk_bound <= 0.05
    assert binom.cdf(cert.errors, cert.accepted - 1, cert.risk_bound) == pytest.approx(0.1)
    assert "selective risk <= 5.0% with probability >= 90%" in cert.statement()
    with pytest.raises(AttributeError):
        cert.threshold = 0.0  # frozen


def test_tied_scores_are_accepted_or_refused_together() -> None:
    # 300 images at 0.9 (3 wrong), 300 at 0.8 (60 wrong): 0.9 is certified at 5%, 0.8 is not.
    scores = np.repeat([0.9, 0.8], 300)
    correct = np.ones(600, dtype=bool)
    correct[[0, 1, 2]] = False
    correct[300:360] = False
    threshold, cert = fit_selective_threshold(scores, correct, 0.05, 0.1)
    assert threshold == 0.9
    assert (cert.accepted, cert.errors) == (300, 3)


def test_too_few_images_says_how_many_accepted_images_it_needs() -> None:
    needed = min_accepted(0.01, 0.1)
    # (1 - 0.01)^(m - 1) <= 0.1  <=>  m >= 1 + ln(0.1) / ln(0.99) = 230.1...
    assert needed == 1 + math.ceil(math.log(0.1) / math.log(0.99)) == 231
    assert 0.99 ** (needed - 1) <= 0.1 < 0.99 ** (needed - 2)
    with pytest.raises(UsageError, match=r"at least 231 calibration images") as info:
        fit_selective_threshold(np.linspace(0, 1, 230), np.ones(230, bool), 0.01, 0.1)
    assert str(info.value).endswith("Received: target_risk=0.01, delta=0.1, len(scores)=230")
    # 231 images all right: certified, accepting all of them.
    _, cert = fit_selective_threshold(np.linspace(0, 1, 231), np.ones(231, bool), 0.01, 0.1)
    assert (cert.accepted, cert.errors) == (231, 0)


def test_errors_among_the_most_confident_say_so() -> None:
    scores = np.linspace(1, 0, 1000)
    correct = np.ones(1000, dtype=bool)
    assert start_count(1000, 0.05, 0.1) == 78  # the walk starts at the 78 most confident
    correct[[0, 1, 2, 3]] = False  # four of the most confident are wrong: 5.1% of 78
    with pytest.raises(UsageError, match=r"78 most confident calibration images hold 4 errors"):
        fit_selective_threshold(scores, correct, 0.05, 0.1)
    with pytest.raises(UsageError, match="no number of images at that error share"):
        fit_selective_threshold(scores, correct, 0.05, 0.1)
    correct[[2, 3]] = True  # two: 2.6% of 78, fewer than 5%, but too many for 78 images
    with pytest.raises(UsageError, match=r"about \d+ accepted images would certify it"):
        fit_selective_threshold(scores, correct, 0.05, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": [0.5, 0.6], "correct": [True]}, r"scores, correct must have the same length"),
        ({"scores": [], "correct": []}, r"`scores` must not be empty"),
        ({"scores": [0.5, np.nan], "correct": [1, 0]}, r"`scores` must hold finite numbers"),
        ({"scores": [[0.5]], "correct": [1]}, r"`scores` must be a 1-D array"),
        ({"scores": [0.5], "correct": [2]}, r"`correct` must hold booleans"),
        ({"target_risk": 0.0}, r"`target_risk` must be in \(0.0, 1.0\). Received: target_risk=0"),
        ({"target_risk": 1.5}, r"Received: target_risk=1.5"),
        ({"delta": 1.0}, r"`delta` must be in \(0.0, 1.0\). Received: delta=1.0"),
        ({"delta": "0.1"}, r"`delta` must be a number"),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, match) -> None:
    args = {"scores": [0.9, 0.8], "correct": [True, False], "target_risk": 0.1, "delta": 0.1}
    with pytest.raises(ValueError, match=match):
        fit_selective_threshold(**{**args, **kwargs})


def test_import_batchuq_and_the_function_without_tensorflow() -> None:
    probe = (
        "import sys, batchuq; f = batchuq.fit_selective_threshold; "
        "print(f.__module__, 'tensorflow' in sys.modules, 'scipy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["batchuq.postprocess.selective", "False", "False"]
