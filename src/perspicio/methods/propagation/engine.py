"""Operation-level propagation: the public entry of the propagation machinery.

LRP and DeepLIFT see every torch operation of the forward pass, not only module calls. The
machinery is split by the question each file answers:

=================  ==========================================================================
``operations.py``  which operation is this torch function? (the table of operation kinds,
                   :class:`Call`, :class:`Arith`)
``tracing.py``     how does a forward pass reach the rules? (:class:`Propagator`: one override
                   point per kind; :class:`PropagationMode`; :func:`propagating`)
``nodes.py``       how does a rule become the backward pass? (:class:`Node`, :func:`apply_node`,
                   :func:`safe_div`, :func:`sum_to`)
``fused.py``       how are a fused twin's convolution + activation calls seen? (:func:`fused_call`)
``affine.py``      what does an affine rule evaluate? (:class:`~.affine.AffineOp` on packed kernels)
``rules.py``       the LRP rules of affine operations; ``lrp_nodes.py`` LRP's rules of the other
                   kinds (pass-through, proportional, sums, products, softmax); ``lrp.py`` the
                   LRP propagator (which rule each call gets) and the method;
                   ``deeplift_*.py`` DeepLIFT's
=================  ==========================================================================

This module re-exports the names a propagator is written with.
"""

from __future__ import annotations

from ...core.calls import out_of_place
from .fused import fused_call, split_fused
from .nodes import Node, apply_node, safe_div, sum_to
from .operations import (
    ACT,
    AFFINE,
    ARITH,
    DIV,
    ELEMWISE,
    FUSED,
    MAXPOOL,
    NORM,
    PRODUCT,
    REDUCE,
    SCALE,
    SDPA,
    SOFTMAX,
    STRUCT,
    SUM,
    Arith,
    Call,
    iter_tensors,
    op_kind,
    op_name,
    parse_arith,
)
from .tracing import PropagationMode, Propagator, Site, freeze_index, propagating, source_line

__all__ = [
    "ACT",
    "AFFINE",
    "ARITH",
    "DIV",
    "ELEMWISE",
    "FUSED",
    "MAXPOOL",
    "NORM",
    "PRODUCT",
    "REDUCE",
    "SCALE",
    "SDPA",
    "SOFTMAX",
    "STRUCT",
    "SUM",
    "Arith",
    "Call",
    "Node",
    "PropagationMode",
    "Propagator",
    "Site",
    "apply_node",
    "freeze_index",
    "fused_call",
    "iter_tensors",
    "op_kind",
    "op_name",
    "out_of_place",
    "parse_arith",
    "propagating",
    "safe_div",
    "source_line",
    "split_fused",
    "sum_to",
]
