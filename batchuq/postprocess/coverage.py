"""Where conformal coverage holds: per true class and per set size, with intervals.

Marginal coverage (the share of images whose set holds the true class) can sit at ``1 - alpha``
while one class, or the images that got a single-class set, is covered far less. Two views show
it (Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", section 3):

* class-conditional coverage: the coverage among images of each true class;
* size-stratified coverage: the coverage among images whose set has ``k`` classes, for each
  ``k``. A good method covers about ``1 - alpha`` at every size; small sets that cover less are
  the ones to distrust.

Each coverage comes with its two-sided 95% Clopper–Pearson interval (``selective.clopper_pearson``),
so a small stratum reads as uncertain rather than as a failure. NumPy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchuq.errors import UsageError
from batchuq.postprocess.selective import clopper_pearson

__all__ = ["COVERAGE_LEVEL", "coverage_rows", "stratified_coverage"]

COVERAGE_LEVEL = 0.95  # of the Clopper–Pearson intervals


def _stratum(covered: list[bool], sizes: list[int], level: float) -> dict[str, Any]:
    """``n``, ``covered``, ``coverage``, its interval and the mean set size of one stratum."""
    n, k = len(covered), int(sum(covered))
    return {
        "n": n,
        "covered": k,
        "coverage": k / n if n else None,
        "interval": list(clopper_pearson(k, n, level)) if n else None,
        "mean_set_size": sum(sizes) / n if n else None,
    }


def stratified_coverage(
    sets: Sequence[Sequence[str]],
    labels: Sequence[str],
    class_names: Sequence[str],
    level: float = COVERAGE_LEVEL,
) -> dict[str, list[dict[str, Any]]]:
    """Coverage of prediction sets per true class and per set size.

    Args:
        sets: Each image's prediction set (class names).
        labels: Each image's true class name.
        class_names: The model's classes, in index order (one row each, even when empty).
        level: Confidence level of the Clopper–Pearson intervals.

    Returns:
        ``per_class``: one dict per class (``class``, ``n``, ``covered``, ``coverage``,
        ``interval``, ``mean_set_size``; ``None`` values for a class with no image);
        ``per_size``: the same per set size that occurs (``size`` instead of ``class``),
        smallest first.

    Raises:
        UsageError: If ``sets`` and ``labels`` differ in length.
    """
    if len(sets) != len(labels):
        raise UsageError(
            f"`sets` and `labels` must have one entry per image. Received: len(sets)={len(sets)}, "
            f"len(labels)={len(labels)}"
        )
    hit = [label in s for s, label in zip(sets, labels, strict=True)]
    size = [len(s) for s in sets]
    per_class = []
    for name in class_names:
        rows = [i for i, label in enumerate(labels) if label == name]
        stratum = _stratum([hit[i] for i in rows], [size[i] for i in rows], level)
        per_class.append({"class": str(name), **stratum})
    per_size = []
    for k in sorted(set(size)):
        rows = [i for i, s in enumerate(size) if s == k]
        per_size.append({"size": k, **_stratum([hit[i] for i in rows], [k] * len(rows), level)})
    return {"per_class": per_class, "per_size": per_size}


def coverage_rows(strata: list[dict[str, Any]], key: str) -> list[tuple[str, str]]:
    """One ``(name, "coverage (95% CI low-high), n = ...")`` row per stratum, for text and HTML.

    Args:
        strata: ``per_class`` or ``per_size`` of ``stratified_coverage``.
        key: ``"class"`` or ``"size"``.

    Returns:
        The rows; a stratum without images reads ``n/a, n = 0``.
    """
    rows = []
    for stratum in strata:
        name = f"{key} {stratum[key]}" if key == "size" else str(stratum[key])
        if not stratum["n"]:
            rows.append((name, "n/a, n = 0"))
            continue
        low, high = stratum["interval"]
        text = f"{stratum['coverage']:.4f} (95% CI {low:.4f}-{high:.4f}), n = {stratum['n']}"
        if key != "size":
            text += f", mean size {stratum['mean_set_size']:.2f}"
        rows.append((name, text))
    return rows
