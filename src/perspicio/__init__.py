"""perspicio - see through your model.

The public surface is small: :func:`explain`, :class:`Explanation`, the method
registry (:mod:`perspicio.methods`) and the bundled models (:mod:`perspicio.zoo`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .core.allocator import tune_allocator
from .core.caches import cache_info, clear_caches
from .core.explanation import Explanation
from .core.explanation import set_display as _set_display
from .core.outputs import detections
from .core.targets import BoxScoreTarget, EmbeddingSimilarity, RegionTarget
from .errors import PerspicioError


class _VizDisplay:
    """``perspicio.viz`` as the display layer of :class:`Explanation` (core never imports viz);
    each call imports the drawing code lazily so ``import perspicio`` stays light."""

    @staticmethod
    def normalize_map(attributions: Any, *, positive: bool = True) -> Any:
        from .viz.overlay import normalize_map

        return normalize_map(attributions, positive=positive)

    @staticmethod
    def overlay(attributions: Any, image: Any, *, cmap: str | None, alpha: float) -> Any:
        from .viz.overlay import overlay

        return overlay(attributions, image, cmap=cmap, alpha=alpha)

    @staticmethod
    def explanation_figure(explanation: Any, *, image: Any, index: int, **kw: Any) -> Any:
        from .viz.plots import explanation_figure

        return explanation_figure(explanation, image=image, index=index, **kw)

    @staticmethod
    def method_figure(explanation: Any, *, image: Any, index: int) -> Any:
        from .viz.plots import method_figure

        return method_figure(explanation, image=image, index=index)

    @staticmethod
    def explanation_html(explanation: Any) -> str:
        from .viz.notebook import explanation_html

        return explanation_html(explanation)

    @staticmethod
    def comparison_html(comparison: Any) -> str:
        from .viz.notebook import comparison_html

        return comparison_html(comparison)


_set_display(_VizDisplay())


def explain(
    model: Any,
    inputs: Any,
    method: str = "gradcam",
    target: Any = None,
    layer: Any = None,
    **options: Any,
) -> Explanation:
    """Explain ``model``'s output on ``inputs`` with a registered ``method``.

    Args:
        model: an ``nn.Module`` (or a bundled model from :func:`perspicio.zoo.load`); model-agnostic
            methods (occlusion, rise, lime, Shapley values) also take any black-box callable on numpy
            arrays or tensors, e.g. ``clf.predict_proba`` or an ONNX Runtime session.
        inputs: a batch tensor (N, C, H, W); for model-agnostic methods also tabular rows (N, F)
            (tensor, numpy array or DataFrame) or text (a string or a list of strings). Text (or a
            dict with ``input_ids``) for a torch model goes to :func:`perspicio.text.explain_text`
            (tokenized, one attribution per token).
        method: registry name, see :func:`perspicio.methods.names`.
        target: None (predicted class), an int, a list of ints, a class name, or a callable
            mapping the output to one score per sample (e.g. :class:`BoxScoreTarget` for detections).
        layer: for layer methods (CAMs): None/"auto", a dotted module name, a module, or a list.
        **options: method options (e.g. ``relu``, ``upsample``, ``batch_size``); ``output=`` selects the
            tensor to explain when the model returns a dict, tuple or ``ModelOutput``: a key, an index
            or a callable (``output=perspicio.detections`` for torchvision detectors).
    """
    from .core.blackbox import unwrap_model
    from .core.guard import shared_walk
    from .core.registry import METHODS
    from .methods.base import build

    if _text_model_input(model, inputs):  # strings or token dicts for a torch model: perspicio.text
        from .text import explain_text

        return explain_text(model, inputs, method=method, target=target, layer=layer, **options)
    cls = METHODS.get(method).cls
    if layer is not None:
        options["layer"] = layer
    with shared_walk(unwrap_model(model)[0]):  # the method's construction and call walk the model once
        return build(cls, model, **options)(inputs, target=target)


def _text_model_input(model: Any, inputs: Any) -> bool:
    """Text (a string, a list of strings, a dict with ``input_ids``) for a torch model; black-box
    callables on strings stay with the model-agnostic methods."""
    from collections.abc import Mapping

    from torch import nn

    from .core.blackbox import unwrap_model

    text = isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(s, str) for s in inputs)
    )
    if not (text or (isinstance(inputs, Mapping) and "input_ids" in inputs)):
        return False
    inner, _ = unwrap_model(model)
    return isinstance(inner, nn.Module) and not getattr(inner, "is_black_box", False)


def evaluate(
    model: Any,
    inputs: Any,
    methods: Any = "family:cam",
    metrics: Any = "default",
    target: Any = None,
    **kwargs: Any,
) -> Any:
    """Score explanation ``methods`` on ``inputs`` with ``metrics``; return the methods x metrics table.

    A :class:`~perspicio.metrics.evaluate.Table`: one record per method, best first (iterate
    it, index it by method name, ``.to_pandas()`` for a DataFrame). See
    :func:`perspicio.metrics.evaluate` (options) and :func:`perspicio.metrics.compare`
    (the full result with per-sample scores and curves).
    """
    from .metrics.evaluate import evaluate as _evaluate

    return _evaluate(model, inputs, methods=methods, metrics=metrics, target=target, **kwargs)


def __getattr__(name: str) -> Any:  # lazy submodules keep `import perspicio` light
    import importlib

    if name in ("methods", "zoo", "viz", "core", "metrics", "featurevis", "text"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'perspicio' has no attribute {name!r}")


__all__ = [
    "BoxScoreTarget", "EmbeddingSimilarity", "Explanation", "PerspicioError", "RegionTarget", "__version__", "cache_info", "clear_caches", "detections", "evaluate", "explain",
    "tune_allocator",
]
