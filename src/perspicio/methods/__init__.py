"""Attribution methods, one small class each, all registered in :data:`perspicio.core.registry.METHODS`."""

from __future__ import annotations

from ..core.registry import METHODS
from .base import Method
from .cam import CAM, AblationCAM, CAMBase, EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM


def names(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those of one family (e.g. "cam")."""
    return METHODS.names(family)


def get(name: str) -> type[Method]:
    """The method class registered under ``name`` (clear error with suggestions if unknown)."""
    return METHODS.get(name).cls


__all__ = [
    "CAM", "AblationCAM", "CAMBase", "EigenCAM", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM",
    "Method", "ScoreCAM", "XGradCAM", "get", "names",
]
