"""DeepLIFT (Rescale, RevealCancel) and DeepSHAP at the operation level: closed forms,
summation-to-delta on ReLU/residual/transformer nets and the bundled model, Captum as oracle
where it is right and as a counter-example where it is not (reused modules, functional ops)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import hook_report
from test_lrp import Block, ResNet, assert_restored, randn, seeded, snapshot
from torch import nn

import perspicio
from perspicio.errors import ModelError, OptionError
from perspicio.methods.propagation import DeepLift, DeepShap, conservation, make_baseline


def delta_error(e) -> float:
    return conservation(e).max_rel_error


def captum_delta_error(attr: torch.Tensor, model: nn.Module, x: torch.Tensor, x0: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        delta = model(x)[:, target] - model(x0)[:, target]
    total = attr.reshape(len(x), -1).sum(1)
    return float(((total - delta).abs() / delta.abs()).max())


def unit(w: list[float], b: float) -> nn.Module:
    lin = nn.Linear(len(w), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.fill_(b)
    return nn.Sequential(lin, nn.ReLU()).eval()


# ------------------------------------------------------------------ closed forms


def test_rescale_closed_form() -> None:
    # z = 2 x1 + x2 - 1: z(x) = 2, z(x0) = -1; m = (2 - 0) / (2 + 1) = 2/3
    e = DeepLift(unit([2.0, 1.0], -1.0), baseline=0.0)(torch.tensor([[1.0, 1.0]]), target=0)
    torch.testing.assert_close(e.attributions, torch.tensor([[4 / 3, 2 / 3]]))
    assert float(e.base_value[0]) == 0.0 and float(e.scores[0]) == 2.0


def test_reveal_cancel_closed_form() -> None:
    # z = 3 x1 - x2, x = (1, 1), x0 = 0: dz+ = 3, dz- = -1, y = 2, y0 = 0
    # RevealCancel: dy+ = (relu(3) + relu(2) - relu(-1)) / 2 = 2.5, dy- = (relu(-1) + relu(2) - relu(3)) / 2 = -0.5
    net = unit([3.0, -1.0], 0.0)
    x = torch.tensor([[1.0, 1.0]])
    rc = DeepLift(net, rule="reveal_cancel")(x, target=0)
    torch.testing.assert_close(rc.attributions, torch.tensor([[2.5, -0.5]]))
    rescale = DeepLift(net, rule="rescale")(x, target=0)  # m = 2 / 2 = 1
    torch.testing.assert_close(rescale.attributions, torch.tensor([[3.0, -1.0]]))


def test_product_division_softmax_and_maxpool_rules_are_exact() -> None:
    class Ops(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = x[:, :3], x[:, 3:6]
            p = a * b + a / (b.abs() + 1.0)  # product and division of input-dependent tensors
            s = torch.softmax(p, dim=1)
            m = F.max_pool1d(x[:, None, 6:], 2)[:, 0]
            return torch.stack([(s * p).sum(1) + m.sum(1), p.sum(1)], dim=1)

    x, x0 = randn(3, 10, seed=2), randn(3, 10, seed=3)
    e = DeepLift(Ops(), baseline=x0)(x, target=0)
    assert delta_error(e) < 1e-5


# ------------------------------------------------------------------ summation-to-delta


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_summation_to_delta_resnet_with_functional_relu_and_skips(rule: str) -> None:
    net = seeded(ResNet(bn=True))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(4))
    x = randn(2, 3, 8, 8)
    e = DeepLift(net, baseline="blur", rule=rule)(x)
    assert delta_error(e) < 1e-5
    torch.testing.assert_close(e.base_value, net(make_baseline("blur", x))[torch.arange(2), e.targets])
    # the rules are exact: in float64 only rounding of 1e-16 remains
    e64 = DeepLift(net.double(), baseline="blur", rule=rule)(x.double())
    assert delta_error(e64) < 1e-10


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_summation_to_delta_torchvision_resnet18(rule: str) -> None:
    """In-place ReLU modules used twice per block, `out += identity`, downsampling, max pooling."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(p[0].numel(), 1)) ** 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    e = DeepLift(net.eval(), baseline="blur", rule=rule)(randn(1, 3, 32, 32))
    assert delta_error(e) < 5e-5


def test_summation_to_delta_mlp_tabular() -> None:
    mlp = seeded(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)))
    x = randn(5, 6)
    for rule in ("rescale", "reveal_cancel"):
        assert delta_error(DeepLift(mlp, baseline="mean", rule=rule)(x, target=2)) < 1e-5


@pytest.mark.parametrize("sdpa", [False, True])
def test_summation_to_delta_transformer_block(sdpa: bool) -> None:
    net = seeded(Block(sdpa=sdpa)).double()
    x = randn(2, 5, 8).double()
    e = DeepLift(net, baseline=randn(1, 5, 8, seed=9))(x)
    assert delta_error(e) < 1e-10  # LayerNorm, softmax, matmuls, GELU: all rules exact
    e32 = DeepLift(net.float(), baseline=randn(1, 5, 8, seed=9))(x.float())
    assert delta_error(e32) < 1e-4


def test_reveal_cancel_without_rule_raises_or_falls_back() -> None:
    net = seeded(Block())
    x = randn(1, 5, 8)
    with pytest.raises(ModelError, match="layer_norm.*module 'ln1'"):
        DeepLift(net, rule="reveal_cancel")(x)
    e = DeepLift(net, rule="reveal_cancel", gradient_fallback=True)(x)
    assert any("softmax" in f for f in e.provenance["gradient_fallback"])


def test_efficientnet_lite0_summation_to_delta(zoo_model, chelsea_batch) -> None:
    x = F.interpolate(chelsea_batch, size=(96, 96), mode="bilinear", align_corners=False)
    before = snapshot(zoo_model.model)
    e = perspicio.explain(zoo_model, x, method="deeplift", baseline="blur")
    assert delta_error(e) < 1e-5
    assert e.target_names is not None
    after = snapshot(zoo_model.model)
    assert before["params"] == after["params"] and not hook_report(zoo_model.model)


# ------------------------------------------------------------------ Captum: oracle where right, counter-example where wrong


def cnn(pool: type[nn.Module] = nn.AvgPool2d) -> nn.Sequential:
    return seeded(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), pool(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10), nn.Sigmoid(), nn.Linear(10, 4),
    ))


def test_matches_captum_deeplift_and_deepliftshap() -> None:
    from captum.attr import DeepLift as CaptumDeepLift
    from captum.attr import DeepLiftShap

    net = cnn()
    x, x0 = randn(2, 3, 8, 8), randn(2, 3, 8, 8, seed=4) * 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = CaptumDeepLift(net).attribute(x.clone(), baselines=x0, target=3)
        bg = randn(4, 3, 8, 8, seed=5)
        theirs_shap = DeepLiftShap(net).attribute(x.clone(), baselines=bg, target=3)
    ours = DeepLift(net, baseline=x0)(x, target=3).attributions
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-6)
    e = DeepShap(net, background=bg)(x, target=3)
    torch.testing.assert_close(e.attributions, theirs_shap.detach(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(e.base_value, net(bg)[:, 3].mean().expand(2))
    assert delta_error(e) < 1e-5


class Reused(nn.Module):
    """One ReLU module applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


class Functional(Reused):
    """F.relu and torch.tanh in forward: no modules to hook."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(F.relu(self.l1(x)))))


def test_reused_module_ours_exact_captum_refuses() -> None:
    from captum.attr import DeepLift as CaptumDeepLift

    net = seeded(Reused(), scale=1.0)
    x, x0 = randn(4, 4), randn(4, 4, seed=7)
    assert delta_error(DeepLift(net, baseline=x0)(x, target=1)) < 1e-5
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="more than once"):
        warnings.simplefilter("ignore")
        CaptumDeepLift(net).attribute(x.clone(), baselines=x0, target=1)


def test_functional_nonlinearities_ours_exact_captum_not() -> None:
    from captum.attr import DeepLift as CaptumDeepLift

    net = seeded(Functional(), scale=1.0)
    x, x0 = randn(4, 4), randn(4, 4, seed=7)
    assert delta_error(DeepLift(net, baseline=x0)(x, target=1)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = CaptumDeepLift(net).attribute(x.clone(), baselines=x0, target=1).detach()
    assert captum_delta_error(theirs, net, x, x0, 1) > 1e-2  # plain gradients through F.relu/tanh


def test_maxpool_rule_exact_captum_not() -> None:
    """Our max-pool split is exact for any baseline; Captum's is not once the argmax moves."""
    from captum.attr import DeepLift as CaptumDeepLift

    net = cnn(nn.MaxPool2d)
    x, x0 = randn(2, 3, 8, 8), randn(2, 3, 8, 8, seed=4)
    assert delta_error(DeepLift(net, baseline=x0)(x, target=1)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = CaptumDeepLift(net).attribute(x.clone(), baselines=x0, target=1).detach()
    assert captum_delta_error(theirs, net, x, x0, 1) > 1e-2


# ------------------------------------------------------------------ DeepSHAP


def test_deep_shap_is_the_mean_of_deeplift_over_the_background() -> None:
    net = cnn()
    x, bg = randn(2, 3, 8, 8), randn(3, 3, 8, 8, seed=8)
    e = DeepShap(net, background=bg, batch_size=4)(x, target=[0, 2])  # chunks cut across samples
    singles = torch.stack([DeepLift(net, baseline=b[None])(x, target=[0, 2]).attributions for b in bg]).mean(0)
    torch.testing.assert_close(e.attributions, singles, rtol=1e-5, atol=1e-7)
    assert e.provenance["background_size"] == 3
    assert delta_error(e) < 1e-4


def test_deep_shap_default_background_is_seeded() -> None:
    net = cnn()
    x = randn(1, 3, 8, 8)
    a = DeepShap(net, samples=3, seed=1)(x).attributions
    b = DeepShap(net, samples=3, seed=1)(x).attributions
    c = DeepShap(net, samples=3, seed=2)(x).attributions
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ bad input, control flow, lifecycle


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "revealcancel"}, "rule must be one of"),
    ({"baseline": "gray"}, "unknown baseline"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        DeepLift(cnn(), **kwargs)


def test_black_baseline_is_the_shared_vocabulary() -> None:
    # "black" means what it means for every method (perspicio.core.baselines): the model's black
    # image when its preprocessing is known, otherwise each channel's minimum over the batch
    x = randn(2, 3, 8, 8)
    e = DeepLift(cnn(), baseline="black")(x)
    torch.testing.assert_close(e.extras["baseline"], x.amin(dim=(0, 2, 3), keepdim=True).expand_as(x))


def test_bad_baseline_and_background_shapes() -> None:
    x = randn(2, 3, 8, 8)
    with pytest.raises(OptionError, match="does not broadcast"):
        DeepLift(cnn(), baseline=torch.zeros(3, 4, 4))(x)
    with pytest.raises(OptionError, match="background must have shape"):
        DeepShap(cnn(), background=torch.zeros(2, 3, 4, 4))(x)
    with pytest.raises(OptionError, match="samples"):
        DeepShap(cnn(), samples=0)


def test_input_dependent_control_flow_is_an_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(torch.tanh(x))
            return self.fc(x)

    with pytest.raises(ModelError, match="control flow"):
        DeepLift(seeded(Branchy()), baseline=-1.0)(torch.ones(1, 3))


def test_lifecycle_after_success_and_exception() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.fail = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x))
            if self.fail:
                raise RuntimeError("model failed")
            return h

    net = seeded(Failing()).train()
    net.fc.bias.grad = torch.ones(3)
    x = randn(2, 4)
    x_before = x.clone()
    before = snapshot(net)
    for method in (DeepLift(net, rule="rescale"), DeepLift(net, rule="reveal_cancel"), DeepShap(net, samples=2)):
        method(x)
        net.fail = True
        with pytest.raises(RuntimeError, match="model failed"):
            method(x)
        net.fail = False
        after = snapshot(net)
        assert after["params"] == before["params"] and after["training"] == before["training"]
        assert torch._C._len_torch_function_stack() == 0 and not hook_report(net)
        assert torch.equal(x, x_before)


@pytest.mark.parametrize("func, args, kwargs", [
    (torch.relu, (), {}), (F.relu6, (), {}), (F.hardtanh, (), {}), (F.hardtanh, (0.0, 6.0), {}),
    (torch.clamp, (0.0, 6.0), {}), (torch.clamp, (), {"min": -1.0}), (torch.clamp_max, (1.0,), {}),
])
def test_analytic_clamp_derivative_matches_autograd(func, args, kwargs) -> None:
    # DeepLIFT-Rescale takes the derivative where x == x0; for clamps it is computed without autograd
    from perspicio.methods.propagation.deeplift_multipliers import (
        clamp_bounds,
        clamp_derivative,
        derivative,
    )
    from perspicio.methods.propagation.engine import Call, op_name

    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 6.0, 7.0])
    call = Call(func, (x, *args), kwargs, op_name(func), "activation")
    bounds = clamp_bounds(call)
    assert bounds is not None
    expected = derivative(lambda t: func(t, *args, **kwargs), x)
    assert torch.equal(clamp_derivative(bounds, x), expected)


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("func, args", [
    (torch.relu, ()), (F.relu6, ()), (F.hardtanh, (-0.5, 0.5)), (torch.clamp_min, (0.2,)), (torch.clamp_max, (0.3,)),
])
def test_clamp_rescale_fast_path_equals_general_multiplier(func, args, flush) -> None:
    # the fused backward of clamp-type activations (one quotient buffer, gradient at x == x0)
    # equals m * the general Rescale multiplier with the autograd derivative at x == x0
    from perspicio.methods.propagation.deeplift_multipliers import (
        clamp_bounds,
        clamp_rescale_backward,
        rescale_multiplier,
    )
    from perspicio.methods.propagation.engine import Call, op_name

    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(4, 3, 5, 5, generator=gen) * 4
    x = torch.randn(4, 3, 5, 5, generator=gen) * 4
    same = torch.rand(x.shape, generator=gen) < 0.3
    x = torch.where(same, x0, x)  # many x == x0 entries, inside and outside the bounds
    x[0, 0, 0, :3] = x0[0, 0, 0, :3] = torch.tensor([0.0, 6.0, 0.5])  # kinks
    # differences of one subnormal step, and signed zeros: only x == x0 takes the gradient
    x[1, 0, 0, :2] = torch.tensor([1e-45, -1e-45])
    x0[1, 0, 0, :2] = 0.0
    x[1, 0, 1, 0], x0[1, 0, 1, 0] = -0.0, 0.0
    m = torch.randn(x.shape, generator=gen)
    call = Call(func, (x, *args), {}, op_name(func), "activation")
    bounds = clamp_bounds(call)
    fn = lambda t: func(t, *args)  # noqa: E731
    y, y0 = fn(x), fn(x0)
    torch.set_flush_denormal(flush)
    try:
        fast = clamp_rescale_backward(bounds, x, x0, y, y0, m)
        general = m * rescale_multiplier(fn, x, x0, y, y0)  # no bounds: autograd derivative
    finally:
        torch.set_flush_denormal(False)
    assert same.any() and torch.equal(fast, general)


@pytest.mark.parametrize("net, x", [
    (lambda: seeded(ResNet()), lambda: randn(2, 3, 8, 8)),
    (lambda: seeded(Block(sdpa=True)), lambda: randn(2, 5, 8)),
])
def test_linear_fast_path_equals_general_dispatch(monkeypatch, net, x) -> None:
    # DeepLIFT runs linear operations (views, conv/linear, pooling averages) without the general
    # dispatch; the attributions, scores and base values equal those of the general dispatch
    from perspicio.methods.propagation.deeplift import DeepLiftPropagator

    model, inputs = net(), x()
    fast = DeepLift(model, baseline="mean")(inputs, target=1)
    fast_shap = DeepShap(model, samples=2)(inputs, target=1)
    monkeypatch.setattr(DeepLiftPropagator, "linear_fast_path", False)
    general = DeepLift(model, baseline="mean")(inputs, target=1)
    general_shap = DeepShap(model, samples=2)(inputs, target=1)
    assert torch.equal(fast.attributions, general.attributions) and torch.equal(fast.base_value, general.base_value)
    assert torch.equal(fast_shap.attributions, general_shap.attributions)
    assert delta_error(fast) < 1e-4


def test_reveal_cancel_stacked_linear_rule_equals_separate_maps() -> None:
    # W+ P + W- N and W- P + W+ N as one map of [P, N] stacked along the input channels
    from perspicio.methods.propagation.derived import neg as _neg
    from perspicio.methods.propagation.derived import pos as _pos

    conv = seeded(nn.Conv2d(4, 6, 3, padding=1), seed=2)
    w = conv.weight.detach()
    d = randn(2, 4, 5, 5, seed=3)
    P, N = d.clamp(min=0), d.clamp(max=0)
    both = torch.cat([P, N], dim=1)
    stacked_p = F.conv2d(both, torch.cat([_pos(w), _neg(w)], dim=1), padding=1)
    stacked_n = F.conv2d(both, torch.cat([_neg(w), _pos(w)], dim=1), padding=1)
    torch.testing.assert_close(stacked_p, F.conv2d(P, _pos(w), padding=1) + F.conv2d(N, _neg(w), padding=1))
    torch.testing.assert_close(stacked_n, F.conv2d(P, _neg(w), padding=1) + F.conv2d(N, _pos(w), padding=1))
    assert not torch.allclose(stacked_p, stacked_n)


# ------------------------------------------------------------------ reference cache, folded twin


def bn_cnn() -> nn.Module:
    from test_fold import ConvBN

    return ConvBN().eval()


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_reference_cache_reuses_and_equals_a_fresh_pass(rule: str) -> None:
    perspicio.clear_caches()  # no reference pass recorded yet
    net, x = bn_cnn(), randn(2, 3, 8, 8)
    cold = DeepLift(net, rule=rule, cache_reference=False)(x, target=1)
    first = DeepLift(net, rule=rule)(x, target=1)
    second = DeepLift(net, rule=rule)(randn(2, 3, 8, 8, seed=5), target=1)
    again = DeepLift(net, rule=rule)(x, target=1)
    assert cold.provenance["cached_references"] == 0 and first.provenance["cached_references"] == 0
    assert second.provenance["cached_references"] == 1 and again.provenance["cached_references"] == 1
    assert torch.equal(again.attributions, cold.attributions) and torch.equal(first.attributions, cold.attributions)
    assert delta_error(second) < 1e-4


def test_reference_cache_sees_weight_attribute_baseline_and_mode_changes() -> None:
    perspicio.clear_caches()  # no reference pass recorded yet
    net, x = bn_cnn(), randn(1, 3, 8, 8)

    def run(**kw):
        e = DeepLift(net, **kw)(x, target=0)
        fresh = DeepLift(net, cache_reference=False, **kw)(x, target=0)
        torch.testing.assert_close(e.attributions, fresh.attributions, rtol=0, atol=0)
        return e.provenance["cached_references"]

    assert run() == 0 and run() == 1
    with torch.no_grad():
        net.bn1.running_var.data.mul_(2.0)  # through .data: the version counter does not move
    assert run() == 0 and run() == 1
    net.head.weight = nn.Parameter(net.head.weight.detach() * 2)  # replaced
    assert run() == 0
    assert run(baseline=0.5) == 0 and run(baseline=0.5) == 1 and run() == 1
    handle = net.head.register_forward_hook(lambda m, i, o: o * 2)  # the function changed
    try:
        assert run() == 0 and run() == 1
    finally:
        handle.remove()
    assert run() == 0 and run() == 1  # back to the hook-free model: recorded again (a new state evicts the old)


def test_deep_shap_chunks_hold_whole_backgrounds_and_reuse_the_reference() -> None:
    perspicio.clear_caches()  # no reference pass recorded yet
    net = bn_cnn()
    x, bg = randn(4, 3, 8, 8), randn(3, 3, 8, 8, seed=8)
    e = DeepShap(net, background=bg, batch_size=7)(x, target=0)  # 12 pairs in chunks of 6
    assert e.provenance["cached_references"] == 1
    cold = DeepShap(net, background=bg, batch_size=7, cache_reference=False)(x, target=0)
    torch.testing.assert_close(e.attributions, cold.attributions, rtol=1e-6, atol=1e-7)
    assert delta_error(e) < 1e-4


def test_propagation_leaves_the_model_untouched_and_runs_on_the_folded_twin() -> None:
    from perspicio.methods.propagation import LRP

    net, x = bn_cnn(), randn(2, 3, 8, 8)
    before = snapshot(net)
    twin_lrp = LRP(net, composite="epsilon_plus_flat")(x, target=2)
    twin_dl = DeepLift(net)(x, target=2)
    assert twin_lrp.provenance["batchnorm_merged"] == 2
    handle = net.register_forward_pre_hook(lambda m, i: None)  # hooks: the model itself, BatchNorms merged
    try:
        merged_lrp = LRP(net, composite="epsilon_plus_flat")(x, target=2)
        merged_dl = DeepLift(net)(x, target=2)
    finally:
        handle.remove()
    torch.testing.assert_close(twin_lrp.attributions, merged_lrp.attributions, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin_dl.attributions, merged_dl.attributions, rtol=1e-5, atol=1e-6)
    assert_restored(net, before)


def test_no_twin_is_copied_while_the_weights_change_every_call() -> None:
    from perspicio.core import caches

    net, x = bn_cnn(), randn(1, 3, 8, 8)
    for _ in range(3):  # a training loop explaining after every optimizer step
        with torch.no_grad():
            net.conv1.weight.mul_(1.01)
        e = DeepLift(net)(x, target=0)
        assert caches.entry("inference twins", net) is None  # merged in place for the call, restored, nothing copied
        assert delta_error(e) < 1e-4
    DeepLift(net)(x, target=0)  # the same weights twice: a sweep, worth a twin
    twin = caches.entry("inference twins", net)
    assert twin is not None and twin.module is not None
