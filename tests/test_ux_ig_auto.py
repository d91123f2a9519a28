"""Integrated Gradients' ``steps="auto"`` default and where its convergence is reported (issue 19).

The default refines the adaptive rule until the completeness error is within the tolerance, so a
default call on a kinked ReLU network resolves its path and does not warn; the warning is kept for
the user's own call when the cap is reached, once, with the remedy; metrics that re-run the method
record the re-explanations' completeness errors instead of warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import perspicio
from perspicio.errors import ConvergenceWarning, OptionError
from perspicio.methods.path import AUTO_MAX_STEPS

# adaptive rounds on a kinked MLP: seconds per test on a loaded 2-core VM
pytestmark = pytest.mark.slow


def kinked_net() -> nn.Module:
    """A ReLU MLP with large biases: its IG integrand jumps many times along the path."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(3 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


def x_in() -> torch.Tensor:
    return torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(4)) * 3


def test_default_steps_auto_resolves_the_path_without_warning() -> None:
    net, x = kinked_net(), x_in()
    with warnings.catch_warnings(record=True) as fixed:
        warnings.simplefilter("always")
        old = perspicio.explain(
            net, x, method="integrated_gradients", steps=8, quadrature="gauss_legendre", target=0
        )
    assert (
        max(old.provenance["relative_completeness_error"]) > 0.01
    )  # a fixed rule misses on this network
    assert any(
        issubclass(w.category, ConvergenceWarning) and "steps='auto'" in str(w.message)
        for w in fixed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        e = perspicio.explain(net, x, method="integrated_gradients", target=0)
    prov = e.provenance
    assert (
        prov["steps"] == "auto"
        and prov["quadrature"] == "adaptive"
        and prov["max_steps"] == AUTO_MAX_STEPS
    )
    assert max(prov["relative_completeness_error"]) <= 0.01
    assert all(5 <= n < AUTO_MAX_STEPS for n in prov["nodes_used"])
    # the recorded error is the attributions' own: sum IG = f(x) - f(x') to 1%
    gap = (e.scores - e.base_value).double()
    total = e.attributions.reshape(2, -1).sum(1).double()
    assert torch.all((total - gap).abs() <= 0.01 * gap.abs() + 1e-6)


def test_tighter_tolerance_spends_more_nodes() -> None:
    net, x = kinked_net(), x_in()
    loose = perspicio.explain(net, x, method="integrated_gradients", target=0, tolerance=0.05)
    tight = perspicio.explain(net, x, method="integrated_gradients", target=0, tolerance=1e-3)
    assert sum(tight.provenance["nodes_used"]) > sum(loose.provenance["nodes_used"])
    assert max(tight.provenance["relative_completeness_error"]) <= 1e-3


def test_cap_reached_warns_once_with_the_remedy() -> None:
    net, x = kinked_net(), x_in()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        perspicio.explain(net, x, method="integrated_gradients", target=0, tolerance=0.0)
    conv = [w for w in got if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1
    assert "cap" in str(conv[0].message) and "steps=1024" in str(conv[0].message)


def test_auto_with_a_fixed_rule_or_bad_value_is_refused() -> None:
    net = kinked_net()
    with pytest.raises(OptionError, match="adaptive"):
        perspicio.explain(net, x_in(), method="integrated_gradients", quadrature="left")
    with pytest.raises(OptionError, match="'auto'"):
        perspicio.explain(net, x_in(), method="integrated_gradients", steps="many")
    with pytest.raises(OptionError):
        perspicio.explain(net, x_in(), method="integrated_gradients", tolerance=-1)


def test_metric_re_explanations_record_convergence_instead_of_warning() -> None:
    from perspicio.metrics import get as get_metric

    net, x = kinked_net(), x_in()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        exp = perspicio.explain(
            net, x, method="integrated_gradients", steps=4, quadrature="left", target=0
        )
    assert sum(issubclass(w.category, ConvergenceWarning) for w in got) == 1  # the user's own call
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = get_metric("max_sensitivity")(samples=3)(net, x, exp)
    assert res.details["re_explanation_completeness_error"] > 0.01
