"""Two-sample tests of one night's scores against a reference, with effect sizes (``monitor``).

Every test compares the rows of tonight with the (pooled) rows of the reference:

* a continuous column (``confidence``, ``entropy``, ...): the two-sample Kolmogorov-Smirnov
  test (``scipy.stats.ks_2samp``, exact below 10,000 rows a side), with the PSI and the
  1-Wasserstein distance (``scipy.stats.wasserstein_distance``) as effect sizes. KS is
  conservative on a column with ties (the set size): its false-alarm rate stays below the level.
* the predicted-class mix: Pearson's chi-square test of the 2 x classes table of counts
  (``scipy.stats.chi2_contingency``; classes that neither side predicts are left out), with the
  PSI of the class shares.
* a rate (unclassified images, error rows): Fisher's exact test of the 2 x 2 table
  (``scipy.stats.fisher_exact``), statistic the odds ratio, with the PSI of the two shares.

**PSI** (population stability index), ``sum_b (t_b - r_b) ln(t_b / r_b)`` over bins ``b`` where
``r_b`` and ``t_b`` are the reference's and tonight's shares of rows in the bin. The bins of a
continuous column are fixed by the reference alone: its ``bins``-quantiles (deciles by default,
``np.quantile``'s linear interpolation) are the inner edges, duplicates dropped (a column with
a mass of equal values, such as a confidence of 1.0, gets fewer bins), and the outer bins are
open; bin ``b`` holds ``edge[b-1] < x <= edge[b]``. A share is floored at ``PSI_EPSILON``
(1e-4) before the logarithm, so that a bin empty on one side gives a large, finite PSI. The
classes of the class mix and the two outcomes of a rate are its bins. Rules of thumb read 0.1
as a moderate and 0.25 as a major shift; PSI grows with the bins and shrinks with the rows, and
on a few hundred rows a side is about 0.05 by chance alone.

**Holm** (1979) step-down correction over every test of the night (``holm``): the ``k``-th
smallest of ``m`` p-values is multiplied by ``m - k + 1``, made non-decreasing and capped at 1;
the probability of any false alarm over the night's tests is then at most the level, whatever
their dependence. **Alert rule** (``decide``): a test alerts when its Holm-adjusted p-value is
below ``alpha`` and, if ``min_psi`` > 0, its PSI is at least ``min_psi``. A test that cannot run
(no row on a side) has no p-value and never alerts.

NumPy and SciPy only: nothing here imports TensorFlow or pandas.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from batchuq.defaults import DEFAULT_MIN_PSI, DEFAULT_MONITOR_ALPHA, DEFAULT_PSI_BINS, PSI_EPSILON
from batchuq.errors import UsageError

__all__ = [
    "DriftTest",
    "class_mix_test",
    "continuous_test",
    "decide",
    "holm",
    "psi",
    "psi_edges",
    "psi_of_counts",
    "rate_test",
]


@dataclass(frozen=True)
class DriftTest:
    """One two-sample test of tonight against the reference.

    Attributes:
        name: What is tested: a column (``confidence``, ...), ``class_mix`` or a rate
            (``unclassified_rate``, ``error_rate``).
        test: ``ks``, ``chi2`` or ``fisher``.
        statistic: The KS distance, the chi-square statistic or the odds ratio (tonight's odds
            over the reference's; NaN when undefined).
        p_value: The test's p-value; NaN when it could not run.
        psi: The PSI of tonight against the reference (module docstring).
        wasserstein: The 1-Wasserstein distance, for a continuous column; else ``None``.
        reference: The reference's mean (a column) or rate; ``None`` for the class mix.
        tonight: Tonight's mean or rate; ``None`` for the class mix.
        n_reference: Rows of the reference in the test.
        n_tonight: Rows of tonight in the test.
        p_adjusted: The Holm-adjusted p-value (``decide``); NaN until then.
        alert: Whether the test alerts (``decide``).
    """

    name: str
    test: str
    statistic: float
    p_value: float
    psi: float
    wasserstein: float | None
    reference: float | None
    tonight: float | None
    n_reference: int
    n_tonight: int
    p_adjusted: float = math.nan
    alert: bool = False

    def as_json(self) -> dict:
        """The test as JSON values (NaN and infinities as ``None``)."""
        return {key: _json_number(value) for key, value in dataclasses.asdict(self).items()}


def _json_number(value: object) -> object:
    """A float as itself if finite, else ``None``; other values unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _values(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.isfinite(array).all():
        raise UsageError(
            f"`{name}` must be a 1-D array of finite numbers. Received: {name}.shape="
            f"{array.shape}, non-finite={int((~np.isfinite(array)).sum())}"
        )
    return array


def psi_edges(reference: ArrayLike, bins: int = DEFAULT_PSI_BINS) -> np.ndarray:
    """The inner bin edges of the PSI of a continuous column: the reference's quantiles.

    Args:
        reference: The reference's values (at least one).
        bins: Bins before duplicate edges are dropped (quantiles at ``k / bins``).

    Returns:
        The sorted, distinct inner edges (at most ``bins - 1``).

    Raises:
        UsageError: If ``bins`` < 2 or ``reference`` is empty.
    """
    if int(bins) < 2:
        raise UsageError(f"PSI needs at least 2 bins. Received: bins={bins!r}")
    reference = _values(reference, "reference")
    if reference.size == 0:
        raise UsageError("PSI needs reference values to fix its bins. Received: reference=[]")
    return np.unique(np.quantile(reference, np.arange(1, bins) / bins))


def psi_of_counts(reference: ArrayLike, tonight: ArrayLike, eps: float = PSI_EPSILON) -> float:
    """The PSI of two histograms over the same bins.

    Args:
        reference: The reference's counts per bin.
        tonight: Tonight's counts per bin.
        eps: Floor of each share before the logarithm.

    Returns:
        ``sum_b (t_b - r_b) ln(t_b / r_b)`` over the floored shares; NaN if a side is empty.
    """
    ref = np.asarray(reference, dtype=np.float64)
    now = np.asarray(tonight, dtype=np.float64)
    if ref.sum() <= 0 or now.sum() <= 0:
        return math.nan
    r = np.maximum(ref / ref.sum(), eps)
    t = np.maximum(now / now.sum(), eps)
    return float(np.sum((t - r) * np.log(t / r)))


def psi(
    reference: ArrayLike,
    tonight: ArrayLike,
    bins: int = DEFAULT_PSI_BINS,
    eps: float = PSI_EPSILON,
) -> float:
    """The PSI of a continuous column, in bins fixed by the reference's quantiles.

    Args:
        reference: The reference's values.
        tonight: Tonight's values.
        bins: Quantile bins of the reference (``psi_edges``).
        eps: Floor of each share before the logarithm.

    Returns:
        The PSI (module docstring); NaN if tonight is empty.
    """
    reference = _values(reference, "reference")
    tonight = _values(tonight, "tonight")
    edges = psi_edges(reference, bins)
    size = edges.size + 1
    # side="left": the index of the first edge >= x, i.e. edge[b-1] < x <= edge[b].
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=size)
    now_counts = np.bincount(np.searchsorted(edges, tonight, side="left"), minlength=size)
    return psi_of_counts(ref_counts, now_counts, eps)


def continuous_test(
    name: str, reference: ArrayLike, tonight: ArrayLike, bins: int = DEFAULT_PSI_BINS
) -> DriftTest:
    """Two-sample KS test of a continuous column, with its PSI and Wasserstein distance.

    Args:
        name: The column's name.
        reference: The reference's values (finite).
        tonight: Tonight's values (finite).
        bins: Quantile bins of the PSI.

    Returns:
        The test; with no row on a side, p-value and effect sizes NaN.
    """
    reference = _values(reference, "reference")
    tonight = _values(tonight, "tonight")
    sizes = {"n_reference": int(reference.size), "n_tonight": int(tonight.size)}
    if reference.size == 0 or tonight.size == 0:
        nan = math.nan
        return DriftTest(name, "ks", nan, nan, nan, None, _mean(reference), _mean(tonight), **sizes)
    result = stats.ks_2samp(reference, tonight)
    return DriftTest(
        name=name,
        test="ks",
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        psi=psi(reference, tonight, bins),
        wasserstein=float(stats.wasserstein_distance(reference, tonight)),
        reference=_mean(reference),
        tonight=_mean(tonight),
        **sizes,
    )


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def class_mix_test(reference: ArrayLike, tonight: ArrayLike) -> DriftTest:
    """Chi-square test of the predicted-class mix, with the PSI of the class shares.

    Args:
        reference: The reference's count of rows per predicted class, in class order.
        tonight: Tonight's counts, in the same order.

    Returns:
        The test. Classes neither side predicts are left out; with one class left the mixes are
        equal (statistic 0, p-value 1); with no row on a side, p-value NaN.
    """
    ref = np.asarray(reference, dtype=np.int64)
    now = np.asarray(tonight, dtype=np.int64)
    if ref.shape != now.shape or ref.ndim != 1:
        raise UsageError(
            f"Class counts must be two 1-D arrays of one length. Received: reference.shape="
            f"{ref.shape}, tonight.shape={now.shape}"
        )
    sizes = {"n_reference": int(ref.sum()), "n_tonight": int(now.sum())}
    if ref.sum() == 0 or now.sum() == 0:
        return DriftTest(
            "class_mix", "chi2", math.nan, math.nan, math.nan, None, None, None, **sizes
        )
    used = (ref + now) > 0
    if used.sum() < 2:
        statistic, p_value = 0.0, 1.0
    else:
        result = stats.chi2_contingency(np.stack([ref[used], now[used]]), correction=False)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return DriftTest(
        "class_mix", "chi2", statistic, p_value, psi_of_counts(ref, now), None, None, None, **sizes
    )


def rate_test(name: str, reference: tuple[int, int], tonight: tuple[int, int]) -> DriftTest:
    """Fisher's exact test of a rate, with the PSI of its two shares.

    Args:
        name: The rate's name, e.g. ``unclassified_rate``.
        reference: ``(rows counted, rows)`` of the reference.
        tonight: ``(rows counted, rows)`` of tonight.

    Returns:
        The test: statistic the odds ratio of tonight to the reference; with no row on a side,
        p-value NaN.
    """
    (ref_hits, ref_n), (now_hits, now_n) = (map(int, reference), map(int, tonight))
    for side, (hits, n) in (("reference", (ref_hits, ref_n)), ("tonight", (now_hits, now_n))):
        if not 0 <= hits <= n:
            raise UsageError(f"A rate needs 0 <= counted <= rows. Received: {side}={(hits, n)}")
    sizes = {"n_reference": ref_n, "n_tonight": now_n}
    ref_rate = ref_hits / ref_n if ref_n else None
    now_rate = now_hits / now_n if now_n else None
    if not ref_n or not now_n:
        return DriftTest(
            name, "fisher", math.nan, math.nan, math.nan, None, ref_rate, now_rate, **sizes
        )
    table = [[now_hits, now_n - now_hits], [ref_hits, ref_n - ref_hits]]
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.fisher_exact(table)
    effect = psi_of_counts([ref_hits, ref_n - ref_hits], [now_hits, now_n - now_hits])
    return DriftTest(
        name,
        "fisher",
        float(result.statistic),
        float(result.pvalue),
        effect,
        None,
        ref_rate,
        now_rate,
        **sizes,
    )


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries are left out and stay NaN).

    Args:
        p_values: The p-values of the family of tests.

    Returns:
        The adjusted p-values, in the input order: the ``k``-th smallest of ``m`` is
        ``max_{j <= k} min(1, (m - j + 1) p_(j))``.
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, math.nan)
    defined = np.flatnonzero(~np.isnan(p))
    m = defined.size
    if m == 0:
        return adjusted
    order = defined[np.argsort(p[defined], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def decide(
    tests: list[DriftTest],
    alpha: float = DEFAULT_MONITOR_ALPHA,
    min_psi: float = DEFAULT_MIN_PSI,
) -> list[DriftTest]:
    """Holm-adjust the night's p-values and decide which tests alert.

    Args:
        tests: Every test of the night.
        alpha: The family-wise level, in (0, 1).
        min_psi: The PSI an alert also needs; 0: none.

    Returns:
        The tests with ``p_adjusted`` and ``alert`` filled in, in the same order.

    Raises:
        UsageError: If ``alpha`` is not in (0, 1) or ``min_psi`` is negative.
    """
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1). Received: alpha={alpha!r}")
    if not min_psi >= 0:
        raise UsageError(f"min_psi must be >= 0. Received: min_psi={min_psi!r}")
    adjusted = holm([t.p_value for t in tests])
    decided = []
    for test, p_adj in zip(tests, adjusted, strict=True):
        large = min_psi <= 0 or (math.isfinite(test.psi) and test.psi >= min_psi)
        alert = bool(not math.isnan(p_adj) and p_adj < alpha and large)
        decided.append(dataclasses.replace(test, p_adjusted=float(p_adj), alert=alert))
    return decided
