"""batchuq.postprocess.selective: the certified selective threshold, Geifman & El-Yaniv's SGR
(docs/methods.md, "Selective risk with a guarantee").

* The guarantee, by simulation (issue 22, must-show 1): over 1000 calibration sets drawn from a
  synthetic overconfident classifier whose selective risk is known in closed form, the share of
  calibration sets whose threshold has a true selective risk above its bound b* (the theorem),
  and above the target, is at most delta (within Monte-Carlo error), while the naive threshold
  (empirical risk <= target) breaches far more often under the same assertion; mean coverage
  against the oracle's.
* Independent cross-checks: the binomial tail and the bound B* against SciPy; the whole search
  against a transcription of the paper's Algorithm 1 with SciPy's binomial (B* by root finding)
  on random inputs (hypothesis); the same with each step decided by MAPIE's binomial p-value.
* The certificate, ties, the infeasible targets and the input checks.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
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
    search_steps,
)

# ------------------------------------------------------------------------------------------
# A synthetic overconfident classifier with a closed-form selective risk.
#
# Confidence S ~ Beta(a, 1) on (0, 1) (density a s^(a-1), most mass near 1); the prediction is
# right with probability c(s) = h(s) s^g < s (g > 1: overconfident), where h = 1 below `knee`
# and h = `top` above it. top < 1 makes the most confident images worse than their neighbours,
# so that the selective risk first falls, then rises as the threshold comes down: a risk that
# is not monotone, and the image at a threshold is less often wrong than those above it.
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


def certified(scores: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(threshold, b*), or (+inf, 0) (accept nothing: no error) where none is certified."""
    try:
        _, certificate = fit_selective_threshold(scores, correct, TARGET, DELTA)
    except UsageError:
        return math.inf, 0.0
    return certificate.threshold, certificate.risk_bound


@pytest.mark.parametrize("model", [MONOTONE, NON_MONOTONE], ids=["monotone", "non_monotone"])
def test_selective_risk_exceeds_its_bound_in_at_most_delta_of_calibration_sets(model) -> None:
    rng = np.random.default_rng(20260522)
    scores, correct = model.draw(rng, (SPLITS, N_CAL))
    chosen, bound = np.array([certified(s, c) for s, c in zip(scores, correct, strict=True)]).T
    naive = naive_thresholds(scores, correct, TARGET)

    # Three standard errors of a binomial share at delta over SPLITS calibration sets.
    allowed = DELTA + 3.0 * math.sqrt(DELTA * (1 - DELTA) / SPLITS)
    # A refusal accepts nothing, so it makes no error.
    risk = np.where(np.isfinite(chosen), model.risk(chosen), 0.0)
    above_bound = float(np.mean(risk > bound))  # the theorem: R(θ) < b* w.p. >= 1 - delta
    above_target = float(np.mean(risk > TARGET))
    naive_breached = float(np.mean(model.risk(naive) > TARGET))
    coverage = float(np.mean(model.accepted(chosen)))
    oracle = model.oracle_coverage(TARGET)
    print(
        f"\n{SPLITS} calibration sets of {N_CAL}, target {TARGET}, delta {DELTA}: risk above "
        f"b* {above_bound:.3f}, above target {above_target:.3f} (allowed {allowed:.3f}); naive "
        f"above target {naive_breached:.3f}; mean coverage {coverage:.3f}, naive "
        f"{np.mean(model.accepted(naive)):.3f}, oracle {oracle:.3f}; "
        f"{np.mean(np.isinf(chosen)):.3f} refused"
    )
    assert np.all(bound[np.isfinite(chosen)] < TARGET)
    assert above_bound <= allowed
    assert above_target <= above_bound
    # The same assertion bites: the threshold without a bound breaches it.
    assert naive_breached > allowed
    # Certified coverage is below the oracle's (it has to be). SGR's first step tests the more
    # confident half; each failure moves the search to fewer images, where the bound at
    # delta/k is looser, so many sets refuse: measured 0.41 of the oracle with 30% refused
    # (monotone), 0.14 with 78% refused (non-monotone: the most confident images are wrong
    # nearly as often as the target allows).
    assert coverage < oracle
    assert coverage > (0.3 if model is MONOTONE else 0.05) * oracle


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


def b_star(errors: int, accepted: int, level: float) -> float:
    """The paper's eq. (4): sup {b : P(Binomial(accepted, b) <= errors) >= level}, by root
    finding on SciPy's binomial tail."""
    if errors >= accepted:
        return 1.0
    return brentq(lambda b: binom.cdf(errors, accepted, b) - level, 0.0, 1.0, xtol=1e-15)


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 2000), data=st.data(), delta=st.floats(1e-4, 0.5))
def test_binomial_upper_bound_is_b_star_and_clopper_pearson(m: int, data, delta: float) -> None:
    k = data.draw(st.integers(0, m - 1))
    bound = binomial_upper_bound(k, m, delta)
    assert bound == pytest.approx(b_star(k, m, delta), rel=1e-7, abs=1e-12)
    # Clopper-Pearson's one-sided upper bound: the 1 - delta quantile of Beta(k + 1, m - k).
    assert bound == pytest.approx(beta_dist.ppf(1 - delta, k + 1, m - k), rel=1e-7, abs=1e-12)
    assert binomial_upper_bound(m, m, delta) == 1.0


def sgr_by_transcription(scores, correct, r_star, delta, certifies):
    """Algorithm 1 of Geifman & El-Yaniv (2017), line by line, 1-based as in the paper.

    `certifies(errors, accepted, level)` decides "b*_i < r*". Returns ((θ, accepted, errors) of
    the last step that certified, or None) and the steps' (errors, accepted, level).
    """
    m = len(scores)
    ascending = sorted(range(m), key=lambda i: scores[i])  # sort S_m by kappa
    k = math.ceil(math.log2(m)) if m > 1 else 1
    z_min, z_max = 1, m
    chosen, steps = None, []
    for _ in range(k):
        z = math.ceil((z_min + z_max) / 2)
        theta = scores[ascending[z - 1]]
        accept = scores >= theta  # g_θ(x) = 1 iff kappa(x) >= θ
        accepted, errors = int(accept.sum()), int((~correct[accept]).sum())
        steps.append((errors, accepted, delta / k))
        if certifies(errors, accepted, delta / k):
            z_max = z
            chosen = (float(theta), accepted, errors)
        else:
            z_min = z
    return chosen, steps


def check_against(scores, correct, target, delta, certifies) -> None:
    expected, steps = sgr_by_transcription(scores, correct, target, delta, certifies)
    if expected is None:
        with pytest.raises(UsageError, match="cannot be certified"):
            fit_selective_threshold(scores, correct, target, delta)
        return
    threshold, certificate = fit_selective_threshold(scores, correct, target, delta)
    assert (threshold, certificate.accepted, certificate.errors) == expected
    level = delta / search_steps(len(scores))
    assert certificate.risk_bound == pytest.approx(
        b_star(certificate.errors, certificate.accepted, level), rel=1e-7, abs=1e-12
    )


def random_calibration(n, seed, levels, error_rate):
    rng = np.random.default_rng(seed)
    scores = rng.random(n) if levels == 0 else rng.integers(0, levels, n).astype(float)
    # Errors likelier at low scores, so that some targets are feasible.
    correct = rng.random(n) >= error_rate * 2 * (1 - scores / max(scores.max(), 1e-9))
    return scores, correct


CALIBRATION_SETS = {
    "n": st.integers(1, 400),
    "seed": st.integers(0, 2**32 - 1),
    "levels": st.sampled_from([0, 5, 50]),  # 0: continuous scores; else that many values
    "error_rate": st.floats(0.0, 0.3),
    "target": st.sampled_from([0.02, 0.05, 0.1, 0.2, 0.3]),
    "delta": st.sampled_from([0.01, 0.05, 0.1, 0.2]),
}


@settings(max_examples=200, deadline=None)
@given(**CALIBRATION_SETS)
def test_threshold_matches_a_transcription_of_algorithm_1(
    n, seed, levels, error_rate, target, delta
):
    scores, correct = random_calibration(n, seed, levels, error_rate)

    def paper(errors, accepted, level):
        bound = b_star(errors, accepted, level)
        # A bound within root-finding error of r* is a coin flip for either implementation.
        assume(abs(bound - target) > 1e-9)
        return bound < target

    check_against(scores, correct, target, delta, paper)


@settings(max_examples=100, deadline=None)
@given(**CALIBRATION_SETS)
def test_steps_decided_by_mapie_binomial_p_values(n, seed, levels, error_rate, target, delta):
    """b* < r* is the binomial test of H: R > r* rejecting at delta/k: MAPIE's binary
    Learn-then-Test p-value (``binom.cdf(ceil(n r_hat), n, alpha)``) with n = accepted,
    r_hat = errors / accepted, alpha = r*, below delta/k, gives the same search."""
    pytest.importorskip("mapie", minversion="1.0")
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    scores, correct = random_calibration(n, seed, levels, error_rate)

    def mapie(errors, accepted, level):
        r_hat = errors / accepted
        # MAPIE takes ceil(n r_hat) as the count: nudge r_hat down where it rounds above.
        if math.ceil(accepted * r_hat) > errors:
            r_hat = np.nextafter(r_hat, 0.0)
        p_value = compute_hoeffding_bentkus_p_value(
            np.array([r_hat]), np.array([accepted]), target, binary=True
        )[0, 0]
        assert p_value == pytest.approx(binomial_cdf(errors, accepted, target)[()], rel=1e-9)
        assume(abs(p_value - level) > 1e-9 * level)
        return p_value < level

    check_against(scores, correct, target, delta, mapie)


# ------------------------------------------------------------------------------------------
# The certificate, ties, infeasible targets, input checks.
# ------------------------------------------------------------------------------------------


def test_certificate_counts_what_the_threshold_accepts() -> None:
    scores, correct = MONOTONE.draw(np.random.default_rng(3), (20_000,))
    threshold, cert = fit_selective_threshold(scores, correct, 0.05, 0.1)
    accept = scores >= threshold
    assert isinstance(cert, SelectiveCertificate)
    assert (cert.threshold, cert.n, cert.method) == (threshold, 20_000, SELECTIVE_METHOD)
    assert (cert.accepted, cert.errors) == (int(accept.sum()), int((~correct[accept]).sum()))
    assert cert.coverage == pytest.approx(accept.mean())
    # b* = B*(K/M, delta/k, M), k = ceil(log2 20000) = 15: below the target.
    assert search_steps(20_000) == 15
    assert cert.risk_bound < 0.05
    assert binom.cdf(cert.errors, cert.accepted, cert.risk_bound) == pytest.approx(0.1 / 15)
    assert "selective risk <= 5% (bound " in cert.statement()
    assert "with probability >= 90% for images i.i.d." in cert.statement()
    with pytest.raises(AttributeError):
        cert.threshold = 0.0  # frozen


def test_tied_scores_are_accepted_or_refused_together() -> None:
    # 300 images at 0.9 (3 wrong), 300 at 0.8 (60 wrong): 0.9 is certified at 5%, 0.8 is not.
    # The search's midpoints at 0.8 (positions 151, 226, …) accept all 600 images, not 450 or
    # 375: a threshold accepts every image with score >= it.
    scores = np.repeat([0.9, 0.8], 300)
    correct = np.ones(600, dtype=bool)
    correct[[0, 1, 2]] = False
    correct[300:360] = False
    threshold, cert = fit_selective_threshold(scores, correct, 0.05, 0.1)
    assert threshold == 0.9
    assert (cert.accepted, cert.errors) == (300, 3)
    # 300 images at 0.8 with 14 wrong (4.7%) would pass at 450 accepted (17 of 450 = 3.8%)
    # if the tie were split; accepted together (600, 17 wrong: 2.8%) they pass as well.
    correct[300:360] = True
    correct[300:314] = False
    threshold, cert = fit_selective_threshold(scores, correct, 0.05, 0.1)
    assert (threshold, cert.accepted, cert.errors) == (0.8, 600, 17)


def test_too_few_images_says_how_many_it_needs() -> None:
    # n = 230: k = 8 steps, each at 0.1 / 8; no error needs 0.99^m < 0.0125, m >= 437.
    needed = min_accepted(230, 0.01, 0.1)
    assert needed == math.floor(math.log(0.1 / 8) / math.log(0.99)) + 1 == 437
    assert 0.99**needed < 0.1 / 8 <= 0.99 ** (needed - 1)
    with pytest.raises(UsageError, match=r"at least 437 images") as info:
        fit_selective_threshold(np.linspace(0, 1, 230), np.ones(230, bool), 0.01, 0.1)
    message = str(info.value)
    assert message.endswith("Received: target_risk=0.01, delta=0.1, len(scores)=230")
    total = int(message.split("About ")[1].split()[0])
    # The number the message gives is exact: with every image right, `total` certify, one fewer
    # does not (the search's first step accepts the more confident half; it must pass).
    _, cert = fit_selective_threshold(np.linspace(0, 1, total), np.ones(total, bool), 0.01, 0.1)
    assert cert.errors == 0
    with pytest.raises(UsageError, match="cannot be certified"):
        fit_selective_threshold(np.linspace(0, 1, total - 1), np.ones(total - 1, bool), 0.01, 0.1)


def test_errors_among_the_most_confident_say_so() -> None:
    scores = np.linspace(1, 0, 1000)
    correct = np.ones(1000, dtype=bool)
    assert min_accepted(1000, 0.05, 0.1) == 90  # 0.95^m < 0.01
    correct[:40] = False  # the 40 most confident are wrong
    with pytest.raises(UsageError, match=r"500 with 40 wrong, 250 with 40 wrong") as info:
        fit_selective_threshold(scores, correct, 0.05, 0.1)
    assert "no number of images would certify it" in str(info.value)
    correct[:40] = True
    correct[::30] = False  # one in 30 wrong (3.3%): below 5%, but too few images for it
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
