"""Conservation (LRP) and summation-to-delta (DeepLIFT, DeepSHAP) as their own call.

``conservation(explanation)`` compares the attribution total of each sample with
what it should equal - the output relevance for LRP, ``f(x) - base_value`` for
DeepLIFT/DeepSHAP - and, for LRP, the relevance entering and leaving every
operation (in backward order). The returned report carries the explanation with
the result recorded in its provenance (``provenance["conservation"]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...core.explanation import Explanation
from ...errors import OptionError

_TINY = 1e-12


def _rel(err: Tensor, ref: Tensor) -> Tensor:
    return err.abs() / ref.abs().clamp_min(_TINY)


@dataclass(frozen=True)
class ConservationReport:
    """Totals, expected totals and relative errors per sample, per-operation sums (LRP).

    ``layers``: one dict per propagated operation with ``op``, ``output`` and ``input``
    relevance sums per sample and ``rel_error`` (their relative difference; an
    operation with a bias or a stabiliser absorbs some relevance by design).
    """

    method: str
    total: Tensor
    expected: Tensor
    rel_error: Tensor
    max_rel_error: float
    rtol: float
    layers: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    explanation: Explanation | None = None

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.rtol

    def summary(self) -> dict[str, Any]:
        worst = max(self.layers, key=lambda d: float(d["rel_error"].max()), default=None)
        return {
            "what": "sum of relevance at the input vs output relevance" if self.method == "lrp"
            else "sum of contributions vs f(x) - base_value",
            "total": self.total.tolist(),
            "expected": self.expected.tolist(),
            "max_rel_error": self.max_rel_error,
            "rtol": self.rtol,
            "ok": self.ok,
            "worst_operation": None if worst is None else {"op": worst["op"], "rel_error": float(worst["rel_error"].max())},
        }

    def table(self) -> str:
        """Per-operation relevance sums of sample 0 as text (backward order)."""
        lines = [f"{'operation':<48} {'R out':>12} {'R in':>12} {'rel.err':>9}"]
        for d in self.layers:
            lines.append(f"{d['op'][:48]:<48} {float(d['output'][0]):12.5g} {float(d['input'][0]):12.5g} "
                         f"{float(d['rel_error'][0]):9.2e}")
        return "\n".join(lines)


def conservation(explanation: Explanation, *, rtol: float = 1e-5) -> ConservationReport:
    """Check conservation / summation-to-delta of an LRP, DeepLIFT or DeepSHAP explanation."""
    if not isinstance(explanation, Explanation):
        raise OptionError(f"conservation() takes an Explanation; got {type(explanation).__name__}.")
    a = explanation.attributions
    total = a.reshape(a.shape[0], -1).double().sum(1)
    if explanation.method == "lrp":
        expected = explanation.extras.get("output_relevance")
        if expected is None:
            raise OptionError("this LRP explanation carries no output relevance (extras['output_relevance']).")
        expected = expected.double()
    elif explanation.base_value is not None:
        expected = explanation.scores.double() - explanation.base_value.double()
    else:
        raise OptionError(f"method {explanation.method!r} defines no conservation property "
                          "(expected lrp, deeplift or deep_shap).")
    scale = expected.abs().clamp_min(_TINY)
    rel = (total - expected).abs() / scale
    layers = []
    for d in explanation.extras.get("layer_relevance", ()):
        layers.append({**d, "rel_error": _rel(d["input"].double() - d["output"].double(), d["output"].double())})
    report = ConservationReport(
        method=explanation.method, total=total, expected=expected, rel_error=rel,
        max_rel_error=float(rel.max()), rtol=float(rtol), layers=tuple(layers),
    )
    recorded = explanation.replace(provenance={**dict(explanation.provenance), "conservation": report.summary()})
    object.__setattr__(report, "explanation", recorded)
    return report
