"""Decision rules side by side at their operating points, for ``batchuq compare``.

A rule is an operating point: the share of images it accepts (coverage) and the share of those
it gets wrong (selective risk). Two files scored with different ``--rule`` are not better or
worse for accepting more; what matters is the pair, and for a ``--rule risk`` run whether the
realised risk stayed within its certified target. Every number here is ``evaluate``'s
(``selective_check`` for a risk rule); the selective risk of any rule gets the same two-sided
95% Clopper–Pearson interval. The rows go to ``--json``; ``batchuq.report.compare`` draws the
same table in HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchuq.jobs.evaluate import format_rule
from batchuq.postprocess.selective import clopper_pearson

__all__ = ["RULES_CAPTION", "RULE_COLUMNS", "format_rules", "rule_columns", "shown_rules"]

RULE_COLUMNS = (
    ("name", "name", None),
    ("rule", "rule", None),
    ("N", "n", None),
    ("accepted", "accepted", None),
    ("cov", "coverage", 4),
    ("sel.risk", "selective_risk", 4),
    ("95% CI", "risk_interval_text", None),
    ("target", "target_risk", 4),
    ("held", "target_held", None),
)


def rule_columns(results: dict[str, Any]) -> dict[str, Any]:
    """A file's rule and its operating point, from ``evaluate``'s results.

    Args:
        results: ``Evaluation.results`` of one file.

    Returns:
        ``rule`` (text, ``format_rule``), ``accepted``, ``selective_risk`` (wrong among the
        accepted labelled ok rows), ``risk_interval`` (95% Clopper–Pearson), and for a
        ``--rule risk`` run ``target_risk`` and ``target_held`` (``None`` otherwise).
    """
    accepted = results.get("accepted")
    accuracy = results.get("selective_accuracy")
    selective = results.get("selective") or {}
    risk = interval = None
    if accepted and accuracy is not None:
        errors = round(accepted * (1.0 - accuracy))
        risk, interval = errors / accepted, list(clopper_pearson(errors, accepted))
    return {
        "rule": format_rule(results.get("decision_rule")),
        "accepted": accepted,
        "selective_risk": risk,
        "risk_interval": interval,
        "target_risk": selective.get("target_risk"),
        "target_held": selective.get("target_held"),
    }


RULES_CAPTION = (
    "Decision rules at their operating points: coverage = accepted / N, selective risk = "
    "wrong among the accepted (95% Clopper-Pearson); a --rule risk run shows its certified "
    "target and whether the realised risk stayed at or below it."
)


def shown_rules(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The rows of the rules table, or ``None`` when the files share one uncertified rule.

    Args:
        rows: ``Comparison.rows`` (each with ``rule_columns``' entries).

    Returns:
        The rows with ``risk_interval_text`` and ``target_held`` as text, for ``RULE_COLUMNS``.
    """
    rules = {row.get("rule") for row in rows}
    if len(rules) < 2 and not any(row.get("target_risk") is not None for row in rows):
        return None
    shown = []
    for row in rows:
        interval = row.get("risk_interval")
        text = "n/a" if not interval else f"{interval[0]:.4f}-{interval[1]:.4f}"
        held = row.get("target_held")
        shown.append(
            {**row, "risk_interval_text": text, "target_held": None if held is None else str(held)}
        )
    return shown


def format_rules(rows: Sequence[dict[str, Any]], render: Any) -> list[str]:
    """The rules table for a terminal, when ``shown_rules`` shows one; else nothing.

    Args:
        rows: ``Comparison.rows``.
        render: ``compare._render`` (rows, columns) -> text.

    Returns:
        The caption and the table, or ``[]``.
    """
    shown = shown_rules(rows)
    return [] if shown is None else [RULES_CAPTION, render(shown, RULE_COLUMNS)]
