"""Feature visualisation and representation analysis.

What a CNN has learned, beyond one prediction's heatmap: its filters
(:func:`kernels`), a layer's feature maps for an input (:func:`feature_maps`), the
data-set items and patches a unit responds to most (:func:`top_activating`, patches
cropped to receptive fields computed from the layers by :func:`receptive_field`),
synthetic inputs that maximise a class/channel/neuron (:func:`maximize`), inputs
reconstructed from a layer's activations (:func:`invert`), 2-D projections of a layer's
features (:func:`project`), the score under occlusion/scale/shift/rotation
(:func:`sensitivity`) and adversarial examples (:func:`attack`) with the change they
cause in another method's explanation (:func:`explanation_change`).

Every function takes an ``nn.Module`` or a bundled zoo model; hooks live for one call,
the model's state is restored afterwards, inputs are never modified and randomness comes
from a local generator seeded by ``seed``. Figures are in :mod:`perspicio.viz.featurevis_plots`.
"""

from ._common import InputSpace, Unit
from .adversarial import (
    AttackResult,
    ExplanationChange,
    attack,
    explanation_change,
    minimal_epsilon,
)
from .feature_maps import FeatureMaps, feature_maps, place_on_input
from .inversion import InversionResult, invert
from .kernels import Kernels, conv_layers, first_conv, kernels
from .maximize import (
    Channel,
    ClassLogit,
    ClassLogProb,
    Custom,
    MaximizeResult,
    Neuron,
    Objective,
    maximize,
)
from .projection import Projection, pca, project
from .receptive_field import ReceptiveField, receptive_field
from .sensitivity import Curve, OcclusionMap, Sensitivity, affine, sensitivity
from .top_activating import TopActivating, top_activating

__all__ = [
    "AttackResult", "Channel", "ClassLogProb", "ClassLogit", "Curve", "Custom", "ExplanationChange", "FeatureMaps",
    "InputSpace", "InversionResult", "Kernels", "MaximizeResult", "Neuron", "Objective", "OcclusionMap", "Projection",
    "ReceptiveField", "Sensitivity", "TopActivating", "Unit", "affine", "attack", "conv_layers", "explanation_change",
    "feature_maps", "first_conv", "invert", "kernels", "maximize", "minimal_epsilon", "pca", "place_on_input",
    "project", "receptive_field", "sensitivity", "top_activating",
]
