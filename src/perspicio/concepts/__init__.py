"""Concept-based explanations: what a layer's directions mean to humans, and which matter.

:func:`tcav` tests user-given concepts (sets of images) with concept activation vectors and the
significance test of Kim et al. (ICML 2018); :func:`discover` finds concepts without labels by
non-negative factorisation of a layer's activations over image crops (CRAFT, Fel et al., CVPR
2023), ranks them by their importance for a class and maps where each is present
(:func:`concept_maps`). Hooks live for one call, the model's state is restored, randomness comes
from ``seed``. scikit-learn (the ``concepts`` extra) fits the classifiers and the factorisation.
"""

from ._common import MIN_SET_SIZE
from .cav import CAV, fit_cav
from .discovery import ConceptDiscovery, concept_maps, discover
from .tcav import TCAVResult, tcav

__all__ = [
    "CAV",
    "MIN_SET_SIZE",
    "ConceptDiscovery",
    "TCAVResult",
    "concept_maps",
    "discover",
    "fit_cav",
    "tcav",
]
