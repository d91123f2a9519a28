"""Global surrogates: distil a model into a decision tree or a sparse linear model, with fidelity.

    from perspicio.surrogates import distill_tree
    s = distill_tree(model, X, max_depth=4, feature_names=names, labels=y)
    print(s.fidelity)            # agreement with the model on held-out rows, Wilson 95% interval
    print(s.rules_text())        # one rule per leaf, each with its own coverage and fidelity
    s.figure().savefig("tree.png"); s.to_json("tree.json")
    print(s.curve(range(1, 9)))  # depth/fidelity curve: pick the smallest faithful tree

Works on tabular data for torch models and any prediction callable, and on images through
interpretable features (:class:`SegmentPresence`, or a feature function such as concept scores).
Needs scikit-learn (``pip install 'perspicio[tabular]'``). See docs/surrogates.md.
"""

from __future__ import annotations

from ._design import SegmentPresence
from .fidelity import Fidelity, wilson
from .linear import LinearSurrogate, distill_linear
from .tree import (
    Condition,
    CurvePoint,
    FidelityCurve,
    Rule,
    TreeSurrogate,
    distill_tree,
    fidelity_curve,
)

__all__ = [
    "Condition",
    "CurvePoint",
    "Fidelity",
    "FidelityCurve",
    "LinearSurrogate",
    "Rule",
    "SegmentPresence",
    "TreeSurrogate",
    "distill_linear",
    "distill_tree",
    "fidelity_curve",
    "wilson",
]
