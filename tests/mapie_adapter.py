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


def mapie_randomised(
    cal_probs: np.ndarray,
    cal_labels: np.ndarray,
    alpha: float,
    method: str,
    test_probs: np.ndarray,
    seed: int,
) -> dict:
    """MAPIE's randomised APS or RAPS, with the uniforms and the RAPS split it drew.

    MAPIE draws with ``check_random_state(seed)``: a fresh ``RandomState(seed)`` at each use,
    so its calibration uniforms are ``RandomState(seed).uniform(size=n)`` (in the order of the
    images it calibrates on) and its prediction uniforms ``RandomState(seed).uniform(size=m)``;
    RAPS first holds out a ``StratifiedShuffleSplit(test_size=0.2, random_state=seed)`` share.

    Args:
        cal_probs: Calibration probabilities, shape (n, classes).
        cal_labels: Their true classes, shape (n,).
        alpha: Miscoverage; MAPIE's ``confidence_level`` is ``1 - alpha``.
        method: ``"aps-random"`` (``APSConformityScore``) or ``"raps"``
            (``RAPSConformityScore``), both with ``include_last_label="randomized"``.
        test_probs: Probabilities to make sets for, shape (m, classes).
        seed: MAPIE's ``random_state``.

    Returns:
        ``quantile``, ``sets`` (m, classes), ``cal_index`` (the rows of ``cal_probs`` the
        quantile was fitted on, in MAPIE's order), ``cal_uniforms``, ``test_uniforms``, and for
        RAPS ``tune_index``, ``k_star`` and ``lambda_star``.
    """
    from mapie.conformity_scores import RAPSConformityScore
    from sklearn.model_selection import StratifiedShuffleSplit

    score = {"aps-random": APSConformityScore, "raps": RAPSConformityScore}[method]()
    mapie = SplitConformalClassifier(
        estimator=GivenProbabilities().fit(cal_probs),
        confidence_level=1 - alpha,
        conformity_score=score,
        prefit=True,
        random_state=seed,
    ).conformalize(cal_probs, cal_labels)
    params = {"include_last_label": "randomized"}
    _, sets = mapie.predict_set(test_probs, conformity_score_params=params)
    fitted = mapie._mapie_classifier.conformity_score_function_
    out = {"quantile": float(np.asarray(fitted.quantiles_)[0]), "sets": sets[:, :, 0]}
    cal_index = np.arange(len(cal_probs))
    if method == "raps":
        split = StratifiedShuffleSplit(n_splits=1, test_size=fitted.size_raps, random_state=seed)
        cal_index, tune_index = next(split.split(cal_probs, cal_labels))
        out |= {
            "tune_index": tune_index,
            "k_star": int(np.asarray(fitted.k_star).ravel()[0]),
            "lambda_star": float(np.asarray(fitted.lambda_star).ravel()[0]),
        }
    out["cal_index"] = cal_index
    out["cal_uniforms"] = np.random.RandomState(seed).uniform(size=len(cal_index))
    out["test_uniforms"] = np.random.RandomState(seed).uniform(size=len(test_probs))
    return out
