"""AttnLRP (Achtibat et al., ICML 2024): the rules for transformers and where their relevance goes.

``composite="attnlrp"`` (:mod:`.composites`) applies, operation by operation:

* **linear layers, convolutions, matmuls with a weight**: epsilon, ``R_x = x * W^T (R / (z + eps sign z))``;
  the bias ``b`` keeps ``sum_j b_j R_j / z_j`` (it is a constant input of the layer).
* **LayerNorm / RMSNorm**: the standard deviation is held constant, which makes the layer the linear
  map ``y = w * (x - mean(x)) / std + b`` (the paper's identity rule on ``1 / std``, epsilon on the
  centring, identity on the scale ``w``, epsilon on the shift ``b`` - composed, that is the epsilon
  rule of this one linear map); the shift keeps ``sum_j b_j R_j / y_j``.
* **GELU and other element-wise nonlinearities**: identity, ``R_x = R_y``.
* **F.normalize** (a sentence embedding's L2 normalisation): the norm is held constant like the
  LayerNorm's standard deviation, so ``y = x * (1 / ||x||)`` is a multiplication by a constant and
  the identity rule passes relevance through, ``R_x = R_y`` (conserved; in every composite).
* **products of two input-dependent tensors** (``q @ k^T``, ``A @ v``, gates): epsilon over the
  inner sum, then half of each term's relevance to each operand - ``R_a = 1/2 a * ((R / z) b^T)``,
  ``R_b = 1/2 b * (a^T (R / z))`` (the paper's uniform rule); conserving up to epsilon.
* **softmax** ``s = softmax(x)``: the first-order Taylor expansion of ``s_j`` at the point ``x``
  itself, ``s_j = sum_i J_ji x_i + b_j`` with ``J_ji = s_j (delta_ij - s_i)``, gives
  ``sum_i J_ji x_i = s_j (x_j - xbar)`` (``xbar = sum_i s_i x_i``) and the bias
  ``b_j = s_j (1 - x_j + xbar)``. Distributing ``R_j`` in proportion to the terms ``J_ji x_i / s_j``
  (the z-rule with the bias as an extra input) gives ``R_i = x_i (R_i - s_i sum_j R_j)``. The bias
  keeps ``sum_j R_j b_j / s_j = sum_j R_j (1 - x_j + xbar)``: the rule does not conserve, and the
  part that stays behind is exactly that sum (it is not an approximation error, and it does not
  depend on adding a constant to ``x``: both sums shift by the same amount). Inputs equal to
  ``-inf`` (masked positions) get no relevance.
* sums (residual adds), means, reshapes, concatenation: proportional, as for any network.

So the relevance reaching the input equals the target score minus what the biases of the affine
layers and norms, the constants added to the input's path (position embeddings, masks), the
softmax bias terms and the stabilisers keep. :func:`relevance_budget` lists those amounts per kind
of operation for an explanation made with ``record_layers=True``; they add up to the target score
to float rounding (``residual``). On a model without biases and constants, every operation but the
softmax conserves (up to epsilon).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.explanation import Explanation
from ...errors import OptionError

__all__ = [
    "RelevanceBudget",
    "module_substitute",
    "relevance_budget",
    "softmax_bias_relevance",
]

#: activation modules written out element by element (``0.5 x (1 + tanh(...))``) that compute the
#: tanh approximation of GELU: Hugging Face's GPT-2 / ALBERT ``gelu_new`` and its aliases
_GELU_TANH_MODULES = frozenset(
    {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "GELUPytorchTanh"}
)


def module_substitute(module: torch.nn.Module) -> Any:
    """The one torch function that a hand-written transformer module computes, or None.

    Hugging Face writes some element-wise activations and norms out operation by operation
    (``gelu_new``: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``; Llama's
    RMSNorm: ``w * x * rsqrt(mean(x**2) + eps)``). Their pieces (a power, a product of two
    input-dependent tensors, ``rsqrt``) are not the operations AttnLRP has rules for - the paper
    (and lxt, which patches these modules) treats the whole module as one GELU (identity rule) or
    one RMSNorm (standard deviation held constant). The propagators run such a module as the
    function returned here (``F.gelu(x, approximate="tanh")``, ``F.rms_norm(x, (d,), w, eps)``),
    checked against the module's own output."""
    name = type(module).__name__
    if name in _GELU_TANH_MODULES:
        return lambda x: F.gelu(x, approximate="tanh")
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (
        name.endswith("RMSNorm")
        and isinstance(weight, torch.nn.Parameter)
        and weight.ndim == 1
        and isinstance(eps, float)
    ):
        return lambda x: F.rms_norm(x, (weight.shape[0],), weight, eps)
    return None


def softmax_bias_relevance(x: Tensor, R: Tensor, dim: int = -1) -> Tensor:
    """The relevance AttnLRP's softmax rule leaves in the Taylor bias: ``sum_j R_j (1 - x_j + xbar)``
    over ``dim`` (``xbar = sum_i s_i x_i``, masked ``-inf`` entries excluded), for logits ``x`` and
    the relevance ``R`` of the softmax output."""
    finite = torch.isfinite(x)
    xs = torch.where(finite, x, torch.zeros_like(x))
    s = torch.softmax(x, dim=dim)
    xbar = (s * xs).sum(dim=dim, keepdim=True)
    return (R * (1 - xs + xbar) * finite).sum(dim=dim)


@dataclass(frozen=True)
class RelevanceBudget:
    """Where the output relevance of an LRP explanation went, per sample (N,): ``input`` (the sum of
    the attributions), ``absorbed[kind]`` (what operations of that kind kept: biases, constants, the
    softmax bias term, stabilisers; negative when they gave relevance out) and ``output`` (the
    relevance at the output, the target score). ``residual = output - input - sum(absorbed)``
    is float rounding."""

    output: Tensor
    input: Tensor
    absorbed: dict[str, Tensor] = field(default_factory=dict)

    @property
    def residual(self) -> Tensor:
        total = self.input.clone()
        for v in self.absorbed.values():
            total = total + v
        return self.output - total

    def table(self, index: int = 0) -> str:
        """Sample ``index``'s budget as text: output, what each kind of operation kept, input."""
        out = float(self.output[index])
        scale = abs(out) if out != 0 else 1.0
        lines = [
            f"{'':<22} {'relevance':>12} {'of output':>10}",
            f"{'output (target)':<22} {out:12.5g} {1:10.1%}",
        ]
        for kind, v in sorted(self.absorbed.items(), key=lambda kv: -abs(float(kv[1][index]))):
            lines.append(
                f"{'kept by ' + kind:<22} {float(v[index]):12.5g} {float(v[index]) / scale:10.1%}"
            )
        lines.append(
            f"{'input (attributions)':<22} {float(self.input[index]):12.5g} {float(self.input[index]) / scale:10.1%}"
        )
        lines.append(f"{'residual':<22} {float(self.residual[index]):12.3g}")
        return "\n".join(lines)


def relevance_budget(explanation: Explanation) -> RelevanceBudget:
    """Group an LRP explanation's per-operation records (``record_layers=True``) by operation kind:
    how much relevance each kind kept between the output and the input (see the module docstring)."""
    if not isinstance(explanation, Explanation) or explanation.method != "lrp":
        raise OptionError("relevance_budget() takes an LRP explanation.")
    records = explanation.extras.get("layer_relevance", ())
    output = explanation.extras.get("output_relevance")
    if not records or output is None:
        raise OptionError(
            "the explanation has no per-operation records: explain with record_layers=True."
        )
    absorbed: dict[str, Tensor] = {}
    for rec in records:
        kind = rec["op"].split(" @ ", 1)[0].rsplit(".", 1)[-1]
        kept = rec["output"].double() - rec["input"].double()
        absorbed[kind] = absorbed[kind] + kept if kind in absorbed else kept
    a = explanation.attributions
    return RelevanceBudget(
        output=output.double(), input=a.reshape(a.shape[0], -1).double().sum(1), absorbed=absorbed
    )
