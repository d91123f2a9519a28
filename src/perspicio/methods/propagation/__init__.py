"""Propagation methods at the operation level: LRP, DeepLIFT, DeepSHAP."""

from .canonizers import MergeBatchNorm, find_batchnorm_pairs
from .checks import ConservationReport, conservation
from .composites import PRESETS, Composite, make_composite, single_rule
from .lrp import LRP, LRPPropagator  # registered before DeepLIFT: the order of the methods table

# isort: split
from .deeplift import DeepLift, DeepLiftPropagator, DeepShap, RevealCancelPropagator, make_baseline
from .rules import LRP0, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus, make_rule

__all__ = [
    "DeepLift", "DeepLiftPropagator", "DeepShap", "LRP", "LRP0", "RevealCancelPropagator", "make_baseline", "PRESETS", "AlphaBeta", "Composite", "Epsilon", "Flat", "Gamma", "LRPPropagator",
    "MergeBatchNorm", "Rule", "WSquare", "ZBox", "ZPlus", "find_batchnorm_pairs", "make_composite", "make_rule",
    "single_rule", "ConservationReport", "conservation",
]
