"""Display of explanations: overlays, figures and reports. Never imported by methods."""

from .overlay import normalize_map, overlay, to_image_array
from .plots import comparison_figure, explanation_figure

__all__ = ["comparison_figure", "explanation_figure", "normalize_map", "overlay", "to_image_array"]
