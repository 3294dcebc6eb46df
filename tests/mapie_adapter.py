"""MAPIE's split-conformal quantiles and sets on probabilities batchuq has already computed.

One adapter for the cross-checks: ``tests/test_calibrate.py`` compares batchuq's conformal
quantiles and sets with MAPIE's on random probabilities, and ``benchmarks/bench_digits.py`` on
the bundled digits' validation MC means. MAPIE is a test extra, never a runtime dependency of
batchuq: importing this module needs it (and scikit-learn).
"""

from __future__ import annotations

import numpy as np
from mapie.classification import SplitConformalClassifier
from mapie.conformity_scores import APSConformityScore
from sklearn.base import BaseEstimator, ClassifierMixin


class GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A fitted classifier whose features are its predicted probabilities."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> GivenProbabilities:
        self.classes_ = np.arange(np.asarray(X).shape[1])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X).argmax(axis=1)


class NonRandomisedAPS(APSConformityScore):
    """MAPIE's APS score without its random ``- u * p_y`` term: the running total of the sorted
    probabilities up to and including the true class (MAPIE's own
    ``get_true_label_cumsum_proba``); used with ``include_last_label=True`` at prediction."""

    def get_conformity_scores(self, y, y_pred, y_enc=None, **kwargs):
        scores, self.cutoff = self.get_true_label_cumsum_proba(y, y_pred, self.classes)
        return scores


def mapie_conformal(
    cal_probs: np.ndarray,
    cal_labels: np.ndarray,
    alpha: float,
    method: str,
    test_probs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MAPIE's conformal quantiles, and its prediction sets of ``test_probs``.

    Args:
        cal_probs: Calibration probabilities, shape (n, classes).
        cal_labels: True class indices of the calibration rows, shape (n,).
        alpha: Miscoverage level; MAPIE's ``confidence_level`` is ``1 - alpha``.
        method: ``"lac"`` (MAPIE's ``lac``) or ``"aps"`` (``NonRandomisedAPS``).
        test_probs: Probabilities to make sets for; by default ``cal_probs``.

    Returns:
        The fitted quantiles (one per alpha) and the boolean sets, shape (rows, classes).
    """
    if method not in ("lac", "aps"):
        raise ValueError(f"method must be 'lac' or 'aps'. Received: method={method!r}")
    score = "lac" if method == "lac" else NonRandomisedAPS()
    params = {"include_last_label": True} if method == "aps" else {}
    mapie = SplitConformalClassifier(
        estimator=GivenProbabilities().fit(cal_probs),
        confidence_level=1 - alpha,
        conformity_score=score,
        prefit=True,
    ).conformalize(cal_probs, cal_labels)
    probs = cal_probs if test_probs is None else test_probs
    _, sets = mapie.predict_set(probs, conformity_score_params=params)  # fits the quantile
    quantiles = mapie._mapie_classifier.conformity_score_function_.quantiles_
    return np.asarray(quantiles, dtype=np.float64), sets[:, :, 0]
