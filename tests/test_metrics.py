"""batchuq.metrics against plain-loop implementations of docs/methods.md, and references;
the input checks it shares with batchuq.postprocess."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from batchuq import metrics
from batchuq.errors import UsageError
from batchuq.postprocess.conformal import conformal_quantiles, conformal_scores
from batchuq.postprocess.temperature import apply_temperature, fit_temperature

# ------------------------------------------------------------------------------------------
# Direct implementations of the docs/methods.md definitions (plain Python loops).
# ------------------------------------------------------------------------------------------


def ece_loop(confidence, correct, n_bins=15):
    """ECE: equal-width bins over [0, 1], left-closed, 1.0 in the last bin."""
    confidence = [float(c) for c in confidence]
    n = len(confidence)
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        members = [
            i for i, c in enumerate(confidence) if low <= c < high or (b == n_bins - 1 and c == 1.0)
        ]
        if members:
            acc = sum(bool(correct[i]) for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def aurc_loop(confidence, correct):
    """AURC: sort by confidence descending, risk_k = errors in top k / k, trapezoid over k/N."""
    n = len(confidence)
    order = sorted(range(n), key=lambda i: float(confidence[i]), reverse=True)  # stable
    risks, errors = [], 0
    for k, i in enumerate(order, start=1):
        errors += not bool(correct[i])
        risks.append(errors / k)
    return sum((risks[k] + risks[k + 1]) / 2 / n for k in range(n - 1))


# ------------------------------------------------------------------------------------------
# ECE
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_ece_equals_loop_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    confidence = rng.uniform(0, 1, n)
    correct = rng.uniform(0, 1, n) < confidence**2
    assert metrics.ece(confidence, correct) == pytest.approx(
        ece_loop(confidence, correct), abs=1e-12
    )


def test_ece_bin_edges_and_one():
    # Every edge k/15 starts bin k (left-closed); 1.0 goes into the last bin.
    confidence = np.array([k / 15 for k in range(16)] + [1.0, 0.0])
    correct = np.array([True, False] * 9)
    bins = metrics.reliability_bins(confidence, correct)
    assert bins.counts.tolist() == [2] + [1] * 13 + [3]
    np.testing.assert_array_equal(bins.edges, np.linspace(0, 1, 16))
    assert metrics.ece(confidence, correct) == pytest.approx(
        ece_loop(confidence, correct), abs=1e-12
    )


def test_ece_just_below_edges():
    edges = [k / 15 for k in range(1, 16)]
    below = np.nextafter(np.array(edges), 0.0)
    confidence = np.concatenate([below, edges])
    correct = np.arange(len(confidence)) % 3 == 0
    bins = metrics.reliability_bins(confidence, correct)
    # The value one ulp below edge k/15 is in bin k-1; the edge itself in bin k.
    assert bins.counts.tolist() == [1] + [2] * 13 + [3]
    assert metrics.ece(confidence, correct) == pytest.approx(
        ece_loop(confidence, correct), abs=1e-12
    )


def test_ece_hand_computed():
    # Bin 12 holds 0.8 and 0.82 (both right): |1 - 0.81| = 0.19 with weight 2/4;
    # 0.5 (wrong) and 0.4 (wrong) are alone in their bins.
    confidence = [0.8, 0.82, 0.5, 0.4]
    correct = [True, True, False, False]
    expected = 0.5 * 0.19 + 0.25 * 0.5 + 0.25 * 0.4
    assert metrics.ece(confidence, correct) == pytest.approx(expected, abs=1e-12)


def test_ece_all_ones_and_perfect_calibration():
    assert metrics.ece([1.0, 1.0, 1.0], [True, True, True]) == 0.0
    assert metrics.ece([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert metrics.ece([0.0], [False]) == 0.0


def test_ece_float32_input():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0, 1, 300).astype(np.float32)
    confidence[:16] = np.float32(np.arange(16) / 15)
    correct = rng.uniform(0, 1, 300) < 0.7
    assert metrics.ece(confidence, correct) == pytest.approx(
        ece_loop(confidence, correct), abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.floats(0, 1, allow_nan=False),
                st.sampled_from([k / 15 for k in range(16)]),
            ),
            st.booleans(),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_ece_equals_loop_property(pairs):
    confidence = [c for c, _ in pairs]
    correct = [ok for _, ok in pairs]
    assert metrics.ece(confidence, correct) == pytest.approx(
        ece_loop(confidence, correct), abs=1e-12
    )


def test_ece_matches_netcal():
    # netcal (https://github.com/EFS-OpenSource/calibration-framework) bins with
    # np.linspace(0, 1, bins + 1) edges through np.histogramdd / scipy binned_statistic_dd,
    # i.e. left-closed bins with the right edge 1.0 in the last bin: the same convention.
    # Differences, none of which changes the result beyond 1e-12 here:
    # * netcal clips confidences to [eps, 1 - eps] (eps of the input dtype, so pass float64;
    #   with float32 input 1.0 would become 1 - 1.2e-7 and shift conf_b a little).
    # * Given a 1-D X and a 0/1 y, netcal treats X as the probability of the positive class
    #   and y as the outcome, which is exactly top-label ECE when X = confidence and
    #   y = correct. (Passing (n, classes) probabilities with only one or two distinct labels
    #   would switch netcal to its binary mode and compute something else.)
    netcal_metrics = pytest.importorskip("netcal.metrics")
    rng = np.random.default_rng(11)
    for n in (1, 7, 50, 500):
        confidence = rng.uniform(0, 1, n)
        confidence[: min(n, 4)] = [1.0, 1 / 15, 0.2, 14 / 15][: min(n, 4)]
        correct = rng.uniform(0, 1, n) < confidence
        reference = netcal_metrics.ECE(bins=15).measure(confidence, correct.astype(np.int64))
        assert metrics.ece(confidence, correct) == pytest.approx(float(reference), abs=1e-12)


# ------------------------------------------------------------------------------------------
# AUROC
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    scores = np.round(rng.normal(size=n), 1)  # many ties
    positives = rng.uniform(size=n) < 0.3
    positives[0], positives[1] = True, False
    assert metrics.auroc(scores, positives) == pytest.approx(
        roc_auc_score(positives, scores), abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40).filter(
        lambda pairs: len({p for _, p in pairs}) == 2
    )
)
def test_auroc_equals_sklearn_property(pairs):
    scores = np.array([s for s, _ in pairs], dtype=np.float64)
    positives = np.array([p for _, p in pairs])
    assert metrics.auroc(scores, positives) == pytest.approx(
        roc_auc_score(positives, scores), abs=1e-12
    )


def test_auroc_hand_values():
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert metrics.auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    # One tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert metrics.auroc([0.2, 0.5, 0.5], [False, True, False]) == 0.75


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match=r"both positives and negatives.*Received: positives="):
        metrics.auroc([0.1, 0.2], [True, True])


# ------------------------------------------------------------------------------------------
# NLL, Brier, AURC, accuracy, coverage
# ------------------------------------------------------------------------------------------

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
LABELS = np.array([0, 1])


def test_nll_hand_computed():
    assert metrics.nll(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)


def test_nll_clips_zero_probability():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    expected = (-math.log(1e-12) - math.log(0.5)) / 2
    assert metrics.nll(probs, [1, 0]) == pytest.approx(expected)


def test_brier_hand_computed():
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.1^2 + 0.7^2 + 0.6^2) / 2 = (0.14 + 0.86) / 2
    assert metrics.brier(PROBS, LABELS) == pytest.approx(0.5)
    assert metrics.brier([[1.0, 0.0]], [0]) == 0.0
    assert metrics.brier([[1.0, 0.0]], [1]) == 2.0


def test_aurc_hand_computed():
    # risks 0, 1/2, 1/3, 2/4 at coverage 1/4..1: area = 1/4 * (1/4 + 5/12 + 5/12) = 13/48
    assert metrics.aurc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(13 / 48)
    assert metrics.aurc([0.3], [False]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_aurc_equals_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    confidence = np.round(rng.uniform(size=n), 2)  # ties keep their input order
    correct = rng.uniform(size=n) < confidence
    assert metrics.aurc(confidence, correct) == pytest.approx(
        aurc_loop(confidence, correct), abs=1e-12
    )


def test_risk_coverage_curve():
    coverage, risk = metrics.risk_coverage_curve([0.6, 0.9, 0.7], [False, True, False])
    np.testing.assert_allclose(coverage, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 2 / 3])


def test_accuracy_coverage_selective_accuracy():
    assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert metrics.coverage([True, False, True, True]) == 0.75
    assert metrics.selective_accuracy([1, 0, 0, 1], [True, True, False, True]) == pytest.approx(
        2 / 3
    )
    assert math.isnan(metrics.selective_accuracy([True, False], [False, False]))


# ------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: metrics.ece([0.5, 1.5], [True, False]), r"\[0, 1\].*Received: confidence="),
        (lambda: metrics.ece([0.5, np.nan], [True, False]), r"finite.*Received: confidence="),
        (lambda: metrics.ece([], []), r"must not be empty\. Received: confidence="),
        (lambda: metrics.ece([[0.5]], [True]), r"1-D.*Received: confidence="),
        (lambda: metrics.ece([0.5], [2]), r"booleans.*Received: correct="),
        (lambda: metrics.ece([0.5], [True], n_bins=0), r"Received: n_bins=0"),
        (lambda: metrics.ece([0.5, 0.6], [True]), r"same length\. Received: confidence.shape="),
        (lambda: metrics.nll([0.5, 0.5], [0]), r"\(n, classes\).*Received: probs="),
        (lambda: metrics.nll([[0.5, 0.5]], [2]), r"class indices in \[0, 2\).*Received: labels="),
        (lambda: metrics.brier([[0.5, 0.5]], [0.5]), r"integer.*Received: labels="),
        (lambda: metrics.brier([[0.5, -0.5]], [0]), r"probabilities.*Received: probs="),
        (lambda: metrics.auroc(["a", "b"], [True, False]), r"real numbers.*Received: scores="),
        (lambda: metrics.aurc([0.5], [True, False]), r"same length"),
        (lambda: metrics.accuracy([0, 1], [0]), r"same length\. Received: pred.shape="),
    ],
)
def test_bad_input_raises_value_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ------------------------------------------------------------------------------------------
# One set of input checks (batchuq.checks), shared with the post-processing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric_call", "postprocess_call", "pattern"),
    [
        (
            lambda: metrics.nll([[0.5, 1.5]], [0]),
            lambda: conformal_scores(np.array([[0.5, 1.5]]), [0]),
            r"^`(probs|mean_probs)` must hold probabilities in \[0, 1\], but "
            r"\1\[0, 1\] = 1\.5\. Received: \1=array\(",
        ),
        (
            lambda: metrics.brier([[0.5, 0.5]], [2]),
            lambda: fit_temperature(np.array([[0.5, 0.5]]), [2]),
            r"^`labels` must be class indices in \[0, 2\), but labels\[0\] = 2\. "
            r"Received: labels=array\(",
        ),
        (
            lambda: metrics.nll([[0.5, 0.5]], [0.5]),
            lambda: conformal_quantiles(np.array([[0.5, 0.5]]), [0.5]),
            r"^`labels` must hold integer class indices, but labels\[0\] = 0\.5\. "
            r"Received: labels=array\(",
        ),
    ],
)
def test_metrics_and_postprocess_share_their_input_checks(metric_call, postprocess_call, pattern):
    for call in (metric_call, postprocess_call):
        with pytest.raises(UsageError, match=pattern) as caught:
            call()
        assert isinstance(caught.value, ValueError)  # still a ValueError for Python callers


def test_float32_rounding_above_one_is_clipped_not_refused():
    probs = np.array([[1.0000001, 0.0]], np.float32)  # float32 MC means may overshoot by rounding
    assert metrics.nll(probs, [0]) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), [[1.0, 0.0]], atol=1e-11)
    with pytest.raises(UsageError, match=r"probs\[0, 0\] = 1\.01"):
        apply_temperature(np.array([[1.01, 0.0]]), 1.0)
