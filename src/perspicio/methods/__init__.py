"""Attribution methods, one small class each, all registered in :data:`perspicio.core.registry.METHODS`."""

from __future__ import annotations

from ..core.registry import METHODS
from .base import Method
from .cam import (
    CAM,
    AblationCAM,
    CAMBase,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from .gradient import (
    Deconvnet,
    GuidedBackprop,
    GuidedGradCAM,
    InputXGradient,
    NeuronGradient,
    Saliency,
)
from .lime import LIME
from .noise import SmoothGrad, SmoothGradSquared, VarGrad
from .path import (
    GradientSHAP,
    IntegratedGradients,
    LayerIntegratedGradients,
    NeuronIntegratedGradients,
    completeness_error,
)
from .perturbation import RISE, FeatureAblation, FeatureMethod, Occlusion
from .propagation import LRP, Composite, DeepLift, DeepShap, conservation
from .shapley import KernelSHAP, ShapleyExact, ShapleySampling, efficiency_error
from .tree import LinearSHAP, TreeSHAP

# isort: split
# registered last: the README table keeps the order of registration
from .attention import AttentionFlow, AttentionRollout, RawAttention, TransformerAttribution


def names(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those of one family (e.g. "cam")."""
    return METHODS.names(family)


def get(name: str) -> type[Method]:
    """The method class registered under ``name`` (clear error with suggestions if unknown)."""
    return METHODS.get(name).cls


__all__ = [
    "CAM", "AblationCAM", "CAMBase", "EigenCAM", "EigenGradCAM", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM",
    "Method", "ScoreCAM", "XGradCAM", "get", "methods_table", "names",
    "Deconvnet", "GradientSHAP", "GuidedBackprop", "GuidedGradCAM", "InputXGradient", "IntegratedGradients",
    "LayerIntegratedGradients", "NeuronGradient", "NeuronIntegratedGradients", "Saliency", "SmoothGrad",
    "SmoothGradSquared", "VarGrad", "completeness_error",
    "LIME", "RISE", "FeatureAblation", "FeatureMethod", "KernelSHAP", "Occlusion", "ShapleyExact",
    "ShapleySampling", "efficiency_error",
    "LRP", "Composite", "DeepLift", "DeepShap", "conservation",
    "LinearSHAP", "TreeSHAP",
    "AttentionFlow", "AttentionRollout", "RawAttention", "TransformerAttribution",
]


def methods_table(family: str | None = None, *, markdown: bool = False) -> str:
    """A table of registered methods (generated from the registry: the README table comes from here)."""
    rows = [e for e in METHODS.entries() if family is None or e.family == family]
    if markdown:
        lines = ["| method | family | needs | what it computes | paper |", "|---|---|---|---|---|"]
        for e in rows:
            needs = e.extra.get("needs") or ", ".join(
                n for n, f in (("gradients", e.needs_gradients), ("layer", e.needs_layer)) if f) or "outputs only"
            lines.append(f"| `{e.name}` | {e.family} | {needs} | {e.summary} | {e.paper} |")
        return "\n".join(lines)
    import shutil
    import textwrap

    wn = max((len(e.name) for e in rows), default=0)  # columns as wide as the longest entry
    wf = max((len(e.family) for e in rows), default=0)
    width = max(40, shutil.get_terminal_size((120, 24)).columns - wn - wf - 2)
    indent = " " * (wn + wf + 2)
    return "\n".join(f"{e.name:<{wn}} {e.family:<{wf}} " + f"\n{indent}".join(textwrap.wrap(e.summary, width) or [""])
                     for e in rows)
