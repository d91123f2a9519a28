"""Evaluation metrics for explanations, one small class each, registered in
:data:`perspicio.core.registry.METRICS` with their family, direction and needs.

Every metric takes any explanation (of any registered method, or a raw attribution
tensor): ``Deletion(steps=50)(model, x, explanation)`` returns a
:class:`MetricResult`. :func:`evaluate` / :func:`compare` score several methods at once.
"""

from __future__ import annotations

from ..core.registry import METRICS
from .axiomatic import Completeness
from .base import Explainer, Metric, MetricResult, NotApplicable
from .complexity import Entropy, Sparseness
from .evaluate import DEFAULT_METRICS, Comparison, compare, evaluate, format_table
from .faithfulness import (
    ROAD,
    AverageDrop,
    Deletion,
    FaithfulnessCorrelation,
    Infidelity,
    Insertion,
)
from .localization import EnergyPointingGame, PointingGame, RelevanceMass, RelevanceRank
from .randomization import Randomization
from .robustness import AvgSensitivity, MaxSensitivity


def names(family: str | None = None) -> list[str]:
    """Registered metric names, optionally of one family (faithfulness, robustness, ...)."""
    return METRICS.names(family)


def get(name: str) -> type[Metric]:
    """The metric class registered under ``name`` (clear error with suggestions if unknown)."""
    return METRICS.get(name).cls


def metrics_table(family: str | None = None, *, markdown: bool = False) -> str:
    """A table of registered metrics, generated from the registry."""
    rows = [e for e in METRICS.entries() if family is None or e.family == family]
    if markdown:
        lines = ["| metric | family | better | needs | what it measures | paper |", "|---|---|---|---|---|---|"]
        for e in rows:
            better = "higher" if e.extra.get("higher_is_better") else "lower"
            needs = ", ".join(e.extra.get("needs", ())) or "attributions only"
            lines.append(f"| `{e.name}` | {e.family} | {better} | {needs} | {e.summary} | {e.paper} |")
        return "\n".join(lines)
    return "\n".join(
        f"{e.name:<26} {e.family:<14} {'higher' if e.extra.get('higher_is_better') else 'lower':<7} {e.summary}"
        for e in rows
    )


__all__ = [
    "DEFAULT_METRICS", "ROAD", "AverageDrop", "AvgSensitivity", "Comparison", "Completeness", "Deletion",
    "EnergyPointingGame", "Entropy", "Explainer", "FaithfulnessCorrelation", "Infidelity", "Insertion",
    "MaxSensitivity", "Metric", "MetricResult", "NotApplicable", "PointingGame", "Randomization",
    "RelevanceMass", "RelevanceRank", "Sparseness", "compare", "evaluate", "format_table", "get",
    "metrics_table", "names",
]
