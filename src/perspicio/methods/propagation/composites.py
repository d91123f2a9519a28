"""Composites: which LRP rule applies to which operation.

A :class:`Composite` maps operation kinds and positions to rules: the *first*
affine operation applied to the model input (possibly after padding/reshaping),
*convolutions*, and *dense* operations (``F.linear`` and matmuls with a constant
operand); ``layers`` overrides the rule for named modules (``fnmatch`` patterns
on the module owning the weight). It also fixes how the parameter-free
operations are treated:

* element-wise activations (ReLU, ReLU6, GELU, SiLU, ...): relevance passes through;
* sums (``x + y`` residuals, ``torch.add``/``sub``), ``sum``/``mean``, average pooling and
  interpolation: split in proportion to the contributions (``x_i / z``, stabilised);
* multiplication/division by constants: relevance passes through;
* concatenation, indexing, reshaping, padding: relevance moves with the values;
* max pooling: winner takes all;
* ``norm``: ``"identity"`` passes relevance through BatchNorm (when not merged),
  LayerNorm, GroupNorm and RMSNorm; ``"linear"`` treats the normalisation as the
  linear map it is for a frozen standard deviation and applies the epsilon rule
  (the shift and bias absorb their share);
* ``attention``: ``"constant"`` (Ali et al. 2022) treats softmax outputs as constant
  gates: a product with a softmax output gives all relevance to the other operand;
  ``"uniform"`` (Achtibat et al. 2024, AttnLRP) splits each product 50/50 and
  propagates through softmax with ``R_x = x (R - s sum(R))``. Products of two
  input-dependent tensors without a softmax operand always split 50/50.

Presets follow the usual recommendations (Montavon et al. 2019; Kohlbrenner et
al. 2020): epsilon for dense layers, z+ / alpha-beta / gamma for convolutions,
flat or z^B for the first layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import OptionError, suggest
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, ZBox, ZPlus, make_rule

NORM_MODES = ("identity", "linear")
ATTENTION_MODES = ("constant", "uniform")


@dataclass(frozen=True)
class Composite:
    """Rules by operation kind and position; see the module docstring.

    Args:
        conv: rule for convolutions.
        linear: rule for dense operations (``F.linear``, matmul/einsum with a constant).
        first: rule for the first affine operation on the input (None: use conv/linear).
        layers: ``{module-name pattern: rule}`` overrides (matched on the module that owns the weight).
        norm: ``"identity"`` or ``"linear"``, see above.
        attention: ``"constant"`` or ``"uniform"``, see above.
        stabilizer: epsilon of the proportional rule for sums, pooling and products.
        merge_batchnorm: merge BatchNorm into the preceding convolution/linear while explaining.
        name: shown in the explanation's options/provenance.
    """

    conv: Rule = field(default_factory=Epsilon)
    linear: Rule = field(default_factory=Epsilon)
    first: Rule | None = None
    layers: Mapping[str, Rule] = field(default_factory=dict)
    norm: str = "identity"
    attention: str = "constant"
    stabilizer: float = 1e-6
    merge_batchnorm: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.norm not in NORM_MODES:
            raise OptionError(f"norm must be one of {', '.join(NORM_MODES)}; got {self.norm!r}.")
        if self.attention not in ATTENTION_MODES:
            raise OptionError(f"attention must be one of {', '.join(ATTENTION_MODES)}; got {self.attention!r}.")
        for label, r in (("conv", self.conv), ("linear", self.linear), ("first", self.first), *self.layers.items()):
            if r is not None and not isinstance(r, Rule):
                raise OptionError(f"composite rule for {label!r} must be a Rule object; got {type(r).__name__}.")

    def rule_for(self, op_name: str, module: str, first: bool) -> Rule:
        """The rule of one affine operation (by its kind, owning module and position)."""
        for pattern, rule in self.layers.items():
            if fnmatch.fnmatchcase(module, pattern):
                return rule
        if first and self.first is not None:
            return self.first
        return self.conv if op_name.startswith("conv") else self.linear

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "first": repr(self.first), "conv": repr(self.conv), "linear": repr(self.linear),
            "layers": {k: repr(v) for k, v in self.layers.items()}, "norm": self.norm, "attention": self.attention,
            "stabilizer": self.stabilizer, "merge_batchnorm": self.merge_batchnorm,
        }


def _epsilon_plus(eps: float, gamma: float, low: Any, high: Any) -> Composite:
    return Composite(conv=ZPlus(), linear=Epsilon(eps), name="epsilon_plus")


def _epsilon_plus_flat(eps: float, gamma: float, low: Any, high: Any) -> Composite:
    return Composite(conv=ZPlus(), linear=Epsilon(eps), first=Flat(), name="epsilon_plus_flat")


def _epsilon_gamma_box(eps: float, gamma: float, low: Any, high: Any) -> Composite:
    return Composite(conv=Gamma(gamma), linear=Epsilon(eps), first=ZBox(low, high), name="epsilon_gamma_box")


def _epsilon_alpha2_beta1(eps: float, gamma: float, low: Any, high: Any) -> Composite:
    return Composite(conv=AlphaBeta(2, 1), linear=Epsilon(eps), name="epsilon_alpha2_beta1")


def _epsilon_alpha2_beta1_flat(eps: float, gamma: float, low: Any, high: Any) -> Composite:
    return Composite(conv=AlphaBeta(2, 1), linear=Epsilon(eps), first=Flat(), name="epsilon_alpha2_beta1_flat")


def _attnlrp(eps: float, gamma: float, low: Any, high: Any) -> Composite:
    """AttnLRP (Achtibat et al., ICML 2024): epsilon on every affine operation, LayerNorm with its
    standard deviation held constant, softmax ``R_x = x (R - s sum R)``, products split 50/50
    (derivations and the relevance the biases absorb: ``transformer_rules.py``, docs/propagation.md).
    Runs on the model itself, without the BatchNorm-merged twin: transformers have no BatchNorm to
    merge, and checking a large model's state for the twin cost more than the propagation (MiniLM:
    40 of 250 ms); a BatchNorm met anyway is a frozen linear map under ``norm="linear"``."""
    return Composite(conv=Epsilon(eps), linear=Epsilon(eps), norm="linear", attention="uniform",
                     stabilizer=eps, merge_batchnorm=False, name="attnlrp")


#: preset name -> factory(epsilon, gamma, low, high)
PRESETS: dict[str, Callable[[float, float, Any, Any], Composite]] = {
    "epsilon_plus": _epsilon_plus,
    "epsilon_plus_flat": _epsilon_plus_flat,
    "epsilon_gamma_box": _epsilon_gamma_box,
    "epsilon_alpha2_beta1": _epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": _epsilon_alpha2_beta1_flat,
    "attnlrp": _attnlrp,
}


def single_rule(rule: Rule, name: str | None = None, **kw: Any) -> Composite:
    """A composite applying one rule to every affine operation.

    For the epsilon rule (and LRP-0) the proportional rule of sums and pooling uses
    the same epsilon, so that LRP-0 conserves relevance exactly.
    """
    if isinstance(rule, Epsilon):
        kw.setdefault("stabilizer", rule.epsilon)
    return Composite(conv=rule, linear=rule, name=name or f"rule:{rule.name}", **kw)


def make_composite(
    composite: Any = None,
    rule: Any = None,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Any = None,
    high: Any = None,
    norm: str | None = None,
    attention: str | None = None,
) -> Composite:
    """Resolve the ``composite``/``rule`` options of :class:`~perspicio.methods.propagation.LRP`."""
    if composite is not None and rule is not None:
        raise OptionError("give either composite=... or rule=..., not both.")
    if rule is not None:
        comp = single_rule(make_rule(rule, epsilon=epsilon, gamma=gamma, low=low, high=high))
    elif composite is None or isinstance(composite, str):
        key = (composite or "epsilon_plus_flat").strip().lower().replace("-", "_")
        if key not in PRESETS:
            raise OptionError(
                f"unknown composite {composite!r}; expected one of: {', '.join(PRESETS)} (or a Composite object)."
                + suggest(key, PRESETS)
            )
        comp = PRESETS[key](epsilon, gamma, low, high)
    elif isinstance(composite, Composite):
        comp = composite
    else:
        raise OptionError(f"composite must be a preset name or a Composite; got {type(composite).__name__}.")
    changes = {k: v for k, v in (("norm", norm), ("attention", attention)) if v is not None}
    if changes:
        from dataclasses import replace

        comp = replace(comp, **changes)
    return comp
