"""The "how to add X" recipes of docs/architecture.md, followed literally.

Each test does what a recipe says - subclass the family's base, override its one function,
register it - and checks that the new entry computes what it should and appears everywhere the
registry feeds: ``names()``, ``perspicio methods`` / ``perspicio metrics`` (plain and the README's
Markdown table) and ``perspicio.explain`` / ``metrics.get``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from conftest import TinyCNN
from torch import Tensor

import perspicio
from perspicio import metrics
from perspicio.cli import main
from perspicio.core.registry import METHODS, METRICS, register_method, register_metric
from perspicio.methods import names


@contextmanager
def temporary(registry, name: str) -> Iterator[None]:
    try:
        yield
    finally:
        if name in registry:
            registry.unregister(name)


def _cli(args: list[str], capsys) -> str:
    assert main(args) == 0
    return capsys.readouterr().out


def test_recipe_add_a_cam(capsys) -> None:
    """Recipe "add a CAM": subclass CAMBase in methods/cam.py, override channel_weights."""
    from perspicio.methods.cam import CAMBase

    with temporary(METHODS, "maxgradcam"):
        @register_method("maxgradcam", family="cam", needs_gradients=True, needs_layer=True,
                         summary="Max-Grad-CAM: channels weighted by their largest gradient", paper="(test)")
        class MaxGradCAM(CAMBase):
            """w_k = max_ij dS/dA_kij."""

            def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx) -> Tensor:
                return grads.amax(dim=(2, 3))

        assert "maxgradcam" in names("cam")
        model = TinyCNN()
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        e = perspicio.explain(model, x, method="maxgradcam", layer="act2", target=2)
        # by hand: the activation of act2 and the gradient of logit 2 with respect to it
        acts = model.act2(model.conv2(model.act1(model.conv1(x)))).detach().requires_grad_(True)
        score = model.fc(model.pool(acts).flatten(1))[0, 2]
        (g,) = torch.autograd.grad(score, acts)
        expected = (g.amax(dim=(2, 3))[:, :, None, None] * acts).sum(1, keepdim=True).clamp_min(0).detach()
        torch.testing.assert_close(e.attributions, expected)
        assert e.method == "maxgradcam"
        listing = _cli(["methods", "--family", "cam"], capsys)
        assert any(line.split()[:2] == ["maxgradcam", "cam"] for line in listing.splitlines())
        table = _cli(["methods", "--markdown"], capsys)
        assert "| `maxgradcam` | cam |" in table and "Max-Grad-CAM" in table
    assert "maxgradcam" not in names()


def test_recipe_add_a_gradient_method(capsys) -> None:
    """Recipe "add a gradient method": subclass GradientBase in methods/gradient.py, override finish."""
    from perspicio.methods.gradient import GradientBase

    with temporary(METHODS, "gradient_squared"):
        @register_method("gradient_squared", family="gradient", needs_gradients=True,
                         summary="Squared gradient of the target score", paper="(test)")
        class GradientSquared(GradientBase):
            """(dS/dx)^2."""

            def finish(self, x: Tensor, grads: Tensor) -> Tensor:
                return grads.pow(2)

        model = TinyCNN()
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        e = perspicio.explain(model, x, method="gradient_squared", target=[1, 4])
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        (g,) = torch.autograd.grad(out[0, 1] + out[1, 4], xr)
        torch.testing.assert_close(e.attributions, g.pow(2))
        # one forward and one backward pass per sample, like every gradient method
        assert e.provenance["forward_samples"] == 2 and e.provenance["backward_samples"] == 2
        assert "| `gradient_squared` | gradient |" in _cli(["methods", "--markdown"], capsys)


def test_recipe_add_a_metric(capsys) -> None:
    """Recipe "add a metric": subclass Metric in metrics/<family>.py, override _compute."""
    from perspicio.metrics.base import Context, Metric, MetricResult

    with temporary(METRICS, "max_share"):
        @register_metric("max_share", family="complexity", higher_is_better=True, needs=(),
                         summary="Share of the total |relevance| carried by the largest pixel", paper="(test)")
        class MaxShare(Metric):
            """max_i |a_i| / sum_i |a_i| of the per-pixel relevance."""

            def _compute(self, ctx: Context) -> MetricResult:
                a = ctx.relevance.abs().flatten(1)
                return MetricResult(self.name, a.amax(1) / a.sum(1), self.higher_is_better, {})

        # the decorator is the one statement of the metadata: the class carries it too
        assert (MaxShare.family, MaxShare.higher_is_better, MaxShare.needs) == ("complexity", True, ())
        model = TinyCNN()
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        e = perspicio.explain(model, x, method="saliency", target=0)
        r = metrics.get("max_share")()(model, x, e)
        rel = e.attributions.abs().sum(1).flatten(1)
        torch.testing.assert_close(r.scores.double(), (rel.amax(1) / rel.sum(1)).double())
        assert "max_share" in _cli(["metrics"], capsys)


def test_recipe_add_an_lrp_rule() -> None:
    """Recipe "add an LRP rule for a new operation": a function the table does not know is registered
    with its kind in core/ops.py; an affine rule is a Rule subclass in methods/propagation/rules.py,
    evaluated with the AffineOp it is given and registered by name in RULES."""
    import pytest
    import torch.nn.functional as F
    from torch import nn

    from perspicio.core import ops
    from perspicio.errors import ModelError
    from perspicio.methods.propagation import rules
    from perspicio.methods.propagation.nodes import safe_div
    from perspicio.methods.propagation.rules import Rule

    class AbsZ(Rule):
        """R_i = sum_j |x_i w_ji| / sum_i' |x_i' w_ji'| R_j: shares of the absolute contributions."""

        name = "absz"

        def relevance(self, op, x, z, R, ctx):
            xa, wa = x.abs(), op.weight.abs()
            return xa * op.adjoint(xa, wa, safe_div(R, op.map(xa, wa, None), 0.0))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, 2, bias=False)
            self.fc2 = nn.Linear(2, 2, bias=False)
            with torch.no_grad():
                self.fc1.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]))
                self.fc2.weight.copy_(torch.tensor([[2.0, 1.0], [-1.0, 1.0]]))

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(F.hardshrink(self.fc1(x), 0.1))

    model = Net()
    x = torch.tensor([[1.0, 0.5, -2.0]])
    assert ops.kind(F.hardshrink) is None
    with pytest.raises(ModelError, match="hardshrink"):  # no kind, no rule: a clear error naming it
        perspicio.explain(model, x, method="lrp", rule="epsilon", target=0)
    try:
        ops.register_operation(F.hardshrink, ops.ACT)  # an activation: LRP passes relevance through
        rules.RULES["absz"] = AbsZ
        e = perspicio.explain(model, x, method="lrp", rule="absz", target=0)
    finally:
        ops.KINDS.pop(F.hardshrink, None)
        rules.RULES.pop("absz", None)
    # by hand: h = fc1(x) = (-1, -1.5), hardshrink keeps it, out_0 = 2 h_0 + h_1 = -3.5 = R
    # fc2: |contributions| (2, 1.5) -> R_h = (-2, -1.5); fc1 row 0: |x w| = (1, 1, 1) -> R_h0 / 3 each;
    # row 1: |x w| = (0, 0.5, 2) -> R_h1 * (0, 0.2, 0.8)
    expected = torch.tensor([[-2 / 3, -2 / 3 - 0.3, -2 / 3 - 1.2]])
    torch.testing.assert_close(e.attributions, expected)
    assert set(e.extras["rules"].values()) == {"AbsZ()"}  # both affine operations used the new rule


def test_all_means_every_method_for_networks_and_tree_methods_are_chosen_by_name() -> None:
    chosen = METHODS.select("all")
    assert "gradcam" in chosen and "kernel_shap" in chosen
    assert "tree_shap" not in chosen and "linear_shap" not in chosen  # they read tree/linear models
    assert METHODS.select("family:tree") == ["tree_shap", "linear_shap"]
    assert METHODS.select("tree_shap,gradcam") == ["tree_shap", "gradcam"]
