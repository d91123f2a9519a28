"""LRP at the operation level: closed forms per rule, conservation, Zennit as oracle, canonizers,
errors for operations without a rule, and lifecycle (no hooks, modes or rewrites left behind)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import hook_report
from torch import nn

import perspicio
from perspicio.errors import ModelError, OptionError
from perspicio.methods.propagation import (
    LRP,
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    MergeBatchNorm,
    ZPlus,
    conservation,
    find_batchnorm_pairs,
)


def seeded(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
        "forward": [m.forward for m in model.modules()],
        "bias_none": [getattr(m, "bias", 0) is None for m in model.modules()],
    }


def assert_restored(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert before["params"] == after["params"]
    assert before["training"] == after["training"]
    assert before["bias_none"] == after["bias_none"]
    assert before["forward"] == after["forward"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    assert torch._C._len_torch_function_stack() == 0
    assert not hook_report(model)


# ------------------------------------------------------------------ closed forms, one rule at a time

# one dense unit: w = (2, -1, 3), b = 1, x = (1, 2, -1): contributions (2, -2, -3), z = -2 = R
CLOSED_FORMS = {
    "lrp0": [2.0, -2.0, -3.0],
    "epsilon": [1.6, -1.6, -2.4],  # epsilon = 0.5: R_i = c_i * z / (z - 0.5)
    "alpha2_beta1": [-8 / 3, 0.8, 1.2],  # z+ = 2 + b = 3, z- = -5
    "zplus": [-4 / 3, 0.0, 0.0],
    "gamma": [8 / 9, -4 / 3, -2.0],  # gamma = 0.5, z < 0: negative contributions boosted, z' = -4.5
    "flat": [-2 / 3, -2 / 3, -2 / 3],
    "wsquare": [-8 / 14, -2 / 14, -18 / 14],
    "zbox": [-2.0, 0.0, 0.0],  # low = -1, high = 2: (4, 0, 0) / 4
}


@pytest.mark.parametrize("rule", sorted(CLOSED_FORMS))
def test_closed_form_single_dense_unit(rule: str) -> None:
    lin = nn.Linear(3, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0, 3.0]]))
        lin.bias.fill_(1.0)
    x = torch.tensor([[1.0, 2.0, -1.0]])
    e = LRP(lin.eval(), rule=rule, epsilon=0.5 if rule == "epsilon" else 1e-6, gamma=0.5, low=-1.0, high=2.0)(x, target=0)
    torch.testing.assert_close(e.attributions, torch.tensor([CLOSED_FORMS[rule]]), rtol=1e-5, atol=1e-6)
    assert float(e.extras["output_relevance"][0]) == pytest.approx(-2.0)


def test_closed_form_two_layers_relu_sum_and_maxpool() -> None:
    """x -> W1 -> ReLU -> (h + h) -> max over 2 -> W2, no biases: LRP-0 = hand computation."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(2, 2, bias=False)
            self.l2 = nn.Linear(1, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.l1(x))
            h = torch.add(h, h * 0.5)  # sum of a tensor with a scaled copy of itself
            return self.l2(F.max_pool1d(h[:, None], 2)[:, 0])

    net = Net().eval()
    with torch.no_grad():
        net.l1.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        net.l2.weight.fill_(2.0)
    x = torch.tensor([[1.0, 1.0]])  # h = relu(3, 2) = (3, 2); *1.5 = (4.5, 3); max = 4.5 (unit 0); out = 9
    e = LRP(net, rule="lrp0")(x, target=0)
    # all relevance (9) reaches unit 0, whose input contributions are 1*1 and 2*1
    torch.testing.assert_close(e.attributions, torch.tensor([[3.0, 6.0]]))


# ------------------------------------------------------------------ conservation (LRP-0, no biases)


class ResBlock(nn.Module):
    def __init__(self, c: int, bn: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)  # functional relu, `x + y` skip


class ResNet(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = ResBlock(8, bn)
        self.block2 = ResBlock(8, bn)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_lrp0_conserves_through_residual_adds() -> None:
    net = seeded(ResNet())
    x = randn(2, 3, 8, 8)
    e = LRP(net, rule="lrp0", record_layers=True)(x)
    report = conservation(e)
    assert report.ok, report.table()
    assert report.max_rel_error < 1e-5
    adds = [d for d in report.layers if d["op"].startswith("add")]
    assert len(adds) == 2 and all(float(d["rel_error"].max()) < 1e-5 for d in adds)
    assert report.explanation.provenance["conservation"]["ok"] is True
    # the skip path really carries relevance: without it the conv branch alone would have it all
    assert float(e.extras["output_relevance"].abs().min()) > 0


def test_lrp0_conserves_with_batchnorm_merged() -> None:
    net = seeded(ResNet(bn=True))
    with torch.no_grad():  # no shift, so the merged convolutions stay bias-free
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
                m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
    x = randn(1, 3, 8, 8)
    e = LRP(net, rule="lrp0")(x)
    assert e.provenance["batchnorm_merged"] == 4
    assert conservation(e).max_rel_error < 1e-5


class Block(nn.Module):
    """Pre-norm transformer block without biases: LayerNorm, softmax attention, matmuls, GELU."""

    def __init__(self, d: int = 8, heads: int = 2, sdpa: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.head = nn.Linear(d, 3, bias=False)
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (s.reshape(n, t, self.heads, -1).transpose(1, 2) for s in self.qkv(self.ln1(x)).chunk(3, -1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("norm", ["identity", "linear"])
def test_transformer_block_conserves(sdpa: bool, norm: str) -> None:
    net = seeded(Block(sdpa=sdpa))
    with torch.no_grad():  # no biases anywhere (a LayerNorm shift absorbs relevance under norm="linear")
        net.ln1.bias.zero_()
        net.ln2.bias.zero_()
    x = randn(2, 5, 8)
    e = LRP(net, rule="lrp0", norm=norm, attention="constant")(x)
    assert conservation(e).max_rel_error < 1e-5
    assert e.attributions.shape == x.shape


def test_attention_uniform_differs_from_constant() -> None:
    net = seeded(Block())
    x = randn(1, 5, 8)
    const = LRP(net, rule="lrp0", attention="constant")(x).attributions
    uni = LRP(net, rule="lrp0", attention="uniform")(x).attributions
    assert not torch.allclose(const, uni)


def test_mlp_epsilon_equals_gradient_times_input_without_bias() -> None:
    mlp = seeded(nn.Sequential(nn.Linear(6, 10, bias=False), nn.ReLU(), nn.Linear(10, 10, bias=False), nn.ReLU(),
                               nn.Linear(10, 3, bias=False)))
    x = randn(4, 6)
    e = LRP(mlp, rule="lrp0")(x, target=1)
    xi = x.clone().requires_grad_(True)
    g = torch.autograd.grad(mlp(xi)[:, 1].sum(), xi)[0]
    torch.testing.assert_close(e.attributions, g * x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Zennit as oracle


def zennit_lrp(model: nn.Module, x: torch.Tensor, composite, target: torch.Tensor) -> torch.Tensor:
    from zennit.attribution import Gradient

    with torch.no_grad():
        out = model(x)
    seed = torch.zeros_like(out)
    seed[torch.arange(len(x)), target] = out[torch.arange(len(x)), target]
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x, seed)
    return rel


def zennit_composite(name: str, canonizers: list) -> object:
    from zennit import composites as zc

    return {
        "epsilon_plus_flat": lambda: zc.EpsilonPlusFlat(canonizers=canonizers),
        "epsilon_gamma_box": lambda: zc.EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canonizers),
        "epsilon_alpha2_beta1": lambda: zc.EpsilonAlpha2Beta1(canonizers=canonizers),
        "epsilon_plus": lambda: zc.EpsilonPlus(canonizers=canonizers),
    }[name]()


def cnn() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5),
    )
    seeded(net)
    with torch.no_grad():
        net[1].running_mean.copy_(randn(8, seed=5) * 0.3)
        net[1].running_var.copy_(randn(8, seed=6).abs() + 0.5)
    return net


@pytest.mark.parametrize("name", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus"])
def test_matches_zennit_on_sequential_cnn(name: str) -> None:
    from zennit.canonizers import SequentialMergeBatchNorm

    net = cnn()
    x = randn(2, 3, 8, 8)
    target = torch.tensor([1, 3])
    ours = LRP(net, composite=name, low=-3.0, high=3.0)(x, target=target)
    theirs = zennit_lrp(net, x, zennit_composite(name, [SequentialMergeBatchNorm()]), target)
    assert ours.provenance["batchnorm_merged"] == 1
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))


class ZennitResBlock(ResBlock):
    """Every operation a module zennit can see: ReLU modules, the residual sum through its Sum layer."""

    def __init__(self, c: int) -> None:
        super().__init__(c, bn=True)
        from zennit.layer import Sum

        self.sum, self.act1, self.act2 = Sum(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(self.act1(self.b1(self.c1(x)))))
        return self.act2(self.sum(torch.stack([y, x], dim=-1)))


class ZennitResNet(ResNet):
    def __init__(self) -> None:
        super().__init__(bn=True)
        self.block1, self.block2 = ZennitResBlock(8), ZennitResBlock(8)
        self.act, self.pool, self.flat = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.block2(self.block1(self.act(self.stem(x)))))))


def zennit_resnet() -> nn.Module:
    net = ZennitResNet()
    seeded(net)
    with torch.no_grad():
        for i, m in enumerate(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            m.running_mean.copy_(randn(8, seed=10 + i) * 0.2)
            m.running_var.copy_(randn(8, seed=20 + i).abs() + 0.5)
    return net.eval()


@pytest.mark.parametrize("name", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_matches_zennit_on_resnet_with_batchnorm_merged(name: str) -> None:
    from zennit.canonizers import NamedMergeBatchNorm

    net = zennit_resnet()
    x = randn(2, 3, 8, 8)
    target = torch.tensor([0, 2])
    pairs = [([f"{b}.c1"], f"{b}.b1") for b in ("block1", "block2")] + [([f"{b}.c2"], f"{b}.b2") for b in ("block1", "block2")]
    ours = LRP(net, composite=name, low=-3.0, high=3.0)(x, target=target)
    assert ours.provenance["batchnorm_merged"] == 4
    theirs = zennit_lrp(net, x, zennit_composite(name, [NamedMergeBatchNorm(pairs)]), target)
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))


def test_zennit_misses_functional_residual_add_ours_conserves() -> None:
    """With a plain `x + y` and F.relu zennit cannot see the sum: relevance is not conserved."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon as ZEpsilon
    from zennit.rules import Pass
    from zennit.types import Activation, Convolution, Linear

    net = seeded(ResNet())
    x = randn(1, 3, 8, 8)
    ours = LRP(net, rule="lrp0")(x, target=0)
    assert conservation(ours).max_rel_error < 1e-5
    comp = LayerMapComposite([(Activation, Pass()), (Convolution, ZEpsilon(1e-9)), (Linear, ZEpsilon(1e-9))])
    theirs = zennit_lrp(net, x, comp, torch.tensor([0]))
    expected = float(ours.extras["output_relevance"][0])
    assert abs(float(theirs.sum()) - expected) / abs(expected) > 1e-2


# ------------------------------------------------------------------ composites, rules, options


def test_custom_composite_and_layer_override() -> None:
    net = cnn()
    x = randn(1, 3, 8, 8)
    comp = Composite(conv=Gamma(0.5), linear=Epsilon(0.1), first=Flat(), layers={"8": ZPlus()}, name="mine")
    e = perspicio.explain(net, x, method="lrp", composite=comp, target=2)
    rules = e.extras["rules"]
    assert rules["conv2d @ 0"].startswith("Flat") and rules["conv2d @ 4"].startswith("Gamma")
    assert rules["linear @ 8"].startswith("ZPlus") and rules["linear @ 10"].startswith("Epsilon")
    assert e.provenance["composite"]["name"] == "mine"
    ab = LRP(net, rule=AlphaBeta(2, 1))(x, target=2).attributions
    assert torch.isfinite(ab).all()


def test_first_layer_flat_ignores_padding_positions() -> None:
    """F.pad before the first conv (TF 'same'): the flat rule spreads relevance over real pixels only."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, stride=2)
            self.fc = nn.Linear(2, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.conv(F.pad(x, (0, 1, 0, 1)))).mean((2, 3)))

    net = seeded(Padded(), scale=1.0)
    with torch.no_grad():
        net.conv.bias.zero_()
    x = randn(1, 1, 4, 4).abs()
    e = LRP(net, composite=Composite(first=Flat(), stabilizer=0.0))(x, target=0)
    assert conservation(e).max_rel_error < 1e-5


@pytest.mark.parametrize("rule", ["flat", "wsquare"])
def test_flat_and_wsquare_give_zero_padding_no_relevance_in_any_layer(rule: str) -> None:
    """Padding is not an input: F.pad before an inner conv gets no share, as a conv's own padding
    (and the fused twin, which folds the F.pad into the conv) - so relevance is conserved."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(2, 2, 3, stride=2, bias=False)
            self.fc = nn.Linear(2, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.conv1(x))
            return self.fc(F.relu(self.conv2(F.pad(h, (0, 1, 0, 1)))).sum((2, 3)))

    net = seeded(Padded(), scale=1.0)
    x = randn(1, 1, 6, 6)
    e = LRP(net, rule=rule, record_layers=True)(x, target=0)
    assert conservation(e).max_rel_error < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    ({"composite": "epsilon_plus_flatt"}, "did you mean"),
    ({"rule": "epsilonn"}, "unknown LRP rule"),
    ({"rule": "epsilon", "composite": "epsilon_plus"}, "either composite"),
    ({"norm": "batch"}, "norm must be"),
    ({"attention": "none"}, "attention must be"),
    ({"rule": "alpha1_beta1"}, "alpha - beta = 1"),
    ({"epsilon": -1, "rule": "epsilon"}, "epsilon must be"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(OptionError, match=f"(?i){match}"):
        LRP(cnn(), **kwargs)


def test_unknown_option_suggests() -> None:
    with pytest.raises(OptionError, match="composite"):
        perspicio.explain(cnn(), randn(1, 3, 8, 8), method="lrp", compsite="epsilon")


# ------------------------------------------------------------------ operations without a rule


class Cumulative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.log1p(F.relu(self.fc(x))))  # log1p: no LRP rule


def test_operation_without_rule_names_op_module_and_line() -> None:
    net = seeded(Cumulative())
    before = snapshot(net)
    with pytest.raises(ModelError) as info:
        LRP(net, rule="epsilon")(randn(2, 4))
    msg = str(info.value)
    assert "log1p" in msg and "test_lrp.py:" in msg and "gradient_fallback=True" in msg
    assert_restored(net, before)


def test_gradient_fallback_is_recorded() -> None:
    net = seeded(Cumulative())
    e = LRP(net, rule="epsilon", gradient_fallback=True)(randn(2, 4))
    assert any("log1p" in f for f in e.provenance["gradient_fallback"])
    assert torch.isfinite(e.attributions).all()


# ------------------------------------------------------------------ canonizer


def test_merge_batchnorm_restores_exactly_also_after_exception() -> None:
    net = cnn()
    net[4] = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    net.insert(5, nn.BatchNorm2d(16))
    seeded(net)
    x = randn(2, 3, 8, 8)
    before = snapshot(net)
    ref = net(x)
    with MergeBatchNorm()(net, x) as merged:
        assert merged == [("0", "1"), ("4", "5")]
        assert net[4].bias is not None
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    assert_restored(net, before)
    with pytest.raises(RuntimeError, match="boom"):
        with MergeBatchNorm()(net, x):
            raise RuntimeError("boom")
    assert_restored(net, before)


def test_batchnorm_pairs_need_an_exclusive_affine_output() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return (self.bn(y) + y).mean((2, 3))  # the conv output also feeds the sum: not mergeable

    assert find_batchnorm_pairs(seeded(Shared()), randn(1, 3, 4, 4)) == []


# ------------------------------------------------------------------ lifecycle


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("model failed")
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_lifecycle_after_success_and_after_exception() -> None:
    net = seeded(Exploding()).train()
    net.fc.weight.grad = torch.ones_like(net.fc.weight)
    net.conv.weight.requires_grad_(False)
    x = randn(1, 3, 6, 6)
    x_before = x.clone()
    before = snapshot(net)
    e = LRP(net, composite="epsilon_plus_flat")(x)
    assert e.provenance["batchnorm_merged"] == 1
    assert_restored(net, before)
    net.fail = True  # raises in the middle of the propagated forward (BatchNorm pairs are cached)
    with pytest.raises(RuntimeError, match="model failed"):
        LRP(net, composite="epsilon_plus_flat")(x)
    assert_restored(net, before)
    assert torch.equal(x, x_before)
    assert net.fc.weight.grad is before["params"][-2][3]


# ------------------------------------------------------------------ bundled EfficientNet-Lite0


def test_efficientnet_lite0_composites(zoo_model, chelsea_batch) -> None:
    model = zoo_model.model
    before = snapshot(model)
    x = F.interpolate(chelsea_batch, size=(96, 96), mode="bilinear", align_corners=False)
    e = perspicio.explain(zoo_model, x, method="lrp", composite="epsilon_plus_flat")
    assert e.provenance["batchnorm_merged"] == 49  # every BatchNorm, including the depthwise ones
    assert e.target_names is not None and torch.isfinite(e.attributions).all()
    assert float(e.attributions.abs().sum()) > 0
    # LRP-epsilon with every bias switched off conserves through depthwise convs, ReLU6 and residual adds
    nobias = copy.deepcopy(model)
    with torch.no_grad():
        for m in nobias.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
        nobias._fc.bias.zero_()
    r = conservation(LRP(nobias, rule="lrp0", record_layers=True)(x[:, :, :64, :64], target=285))
    assert r.max_rel_error < 1e-4, r.table()
    assert_restored(model, before)


def test_ops_without_lrp_rule_give_clear_error_or_recorded_fallback():
    """Division and element-wise ops have no LRP rule: a ModelError naming the op, never a bare traceback."""
    import perspicio
    from perspicio.errors import ModelError

    class DivNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x / (1 + x.abs()))

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match="Tensor.abs.*no propagation rule"):
        perspicio.explain(DivNet(), x, "lrp", rule="epsilon")
    e = perspicio.explain(DivNet(), x, "lrp", rule="epsilon", gradient_fallback=True)
    recorded = " ".join(e.provenance["gradient_fallback"])
    assert "Tensor.abs" in recorded and "div" in recorded


@pytest.mark.parametrize("rule", [ZPlus(), AlphaBeta(2.0, 1.0), Gamma(0.25)])
def test_nonnegative_fast_paths_equal_the_general_rule(rule) -> None:
    # inputs proved non-negative in the forward pass skip the sign check and x- terms; gamma derives
    # z_dn from the forward output: the same relevance as the general rule evaluated with both signs
    from perspicio.methods.propagation.affine import AffineOp
    from perspicio.methods.propagation.rules import RuleContext

    conv = seeded(nn.Conv2d(4, 5, 3, padding=1), seed=3)
    x = randn(2, 4, 6, 6, seed=4).clamp(min=0)
    op = AffineOp("conv2d", lambda x_, w_, b_: F.conv2d(x_, w_, b_, 1, 1), conv.weight.detach(), conv.bias.detach(),
                  conv={"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1})
    z = op(x, None, op.bias)  # the forward output W x + b
    R = z * (1.0 + 0.5 * torch.rand(z.shape, generator=torch.Generator().manual_seed(5)))  # relevance ~ z, as in LRP
    fast = rule.relevance(op, x, z, R, RuleContext(nonneg=True))
    xs = x.clone()
    xs[0, 0, 0, 0] = -1e-30  # forces the general (signed) path; the contribution changes by ~1e-30
    general = rule.relevance(op, xs, op(xs, None, op.bias), R, RuleContext())
    assert torch.allclose(fast, general, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fast, torch.zeros_like(fast))


def test_parameter_memo_sees_in_place_weight_updates() -> None:
    # W+ / b+ are memoised across calls only for the canonizer's merged tensors (keyed by them and
    # their version); other parameters are recomputed every call, so in-place updates - also through
    # .data, which bypasses the version counter - and .data swaps are always seen
    from perspicio.methods.propagation.derived import pos as _pos

    a, b = cnn().eval(), cnn().eval()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-0.5).add_(0.1)
    x = randn(2, 3, 8, 8, seed=7)
    lrp = perspicio.methods.propagation.LRP
    w = a[4].weight.detach()  # a conv without a BatchNorm after it: never merged
    assert _pos(w) is not _pos(w)
    with MergeBatchNorm()(a, x):
        merged = a[0].weight.detach()
        assert _pos(merged) is _pos(merged)  # memoised while it holds the merged tensor
    first = lrp(a, composite="epsilon_plus")(x, target=1).attributions
    expected = lrp(b, composite="epsilon_plus")(x, target=1).attributions
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.copy_(pb)  # in place: version counters move
    after_copy = lrp(a, composite="epsilon_plus")(x, target=1).attributions
    assert not torch.allclose(first, expected)
    torch.testing.assert_close(after_copy, expected, rtol=0, atol=0)
    c = cnn().eval()
    torch.testing.assert_close(lrp(c, composite="epsilon_plus")(x, target=1).attributions, first, rtol=0, atol=0)
    for pc, pb in zip(c.parameters(), b.parameters()):
        pc.data = pb.detach().clone()  # a storage swap: the data pointer moves, the version does not
    torch.testing.assert_close(lrp(c, composite="epsilon_plus")(x, target=1).attributions, expected, rtol=0, atol=0)
    d, e = cnn().eval(), cnn().eval()
    with torch.no_grad():
        e[4].weight.copy_(b[4].weight)
    lrp(d, composite="epsilon_plus")(x, target=1)
    d[4].weight.data.copy_(b[4].weight)  # through .data: neither pointer nor version moves (unmerged layer)
    torch.testing.assert_close(lrp(d, composite="epsilon_plus")(x, target=1).attributions,
                               lrp(e, composite="epsilon_plus")(x, target=1).attributions, rtol=0, atol=0)
    # a merged layer (conv + BatchNorm) written through .data: the canonizer's cache sees the new norm
    f, g = cnn().eval(), cnn().eval()
    with torch.no_grad():
        g[0].weight.mul_(3.0)
    lrp(f, composite="epsilon_plus")(x, target=1)
    f[0].weight.data.mul_(3.0)
    torch.testing.assert_close(lrp(f, composite="epsilon_plus")(x, target=1).attributions,
                               lrp(g, composite="epsilon_plus")(x, target=1).attributions, rtol=0, atol=0)


def test_memoised_operation_table_equals_the_uncached_lookup() -> None:
    # op_kind / op_name / out_of_place memoise per function; the answers equal the uncached ones
    from perspicio.core import ops
    from perspicio.methods.propagation import engine as E
    from perspicio.methods.propagation import operations as O

    funcs = [F.conv2d, F.relu, F.relu6, torch.add, torch.Tensor.__add__, torch.Tensor.add_, torch.cat,
             torch.Tensor.__getitem__, F.hardtanh, torch.Tensor.T.__get__, torch.log1p, F.max_pool2d]
    for _ in range(2):
        for f in funcs:
            assert E.op_kind(f) == ops.KINDS.get(f)
            assert E.op_name(f) == O._op_name(f)
    t = torch.ones(2)
    assert E.out_of_place(F.relu, (t,), {"inplace": True})[2] == {"inplace": False}
    assert E.out_of_place(F.hardtanh, (t, -1.0, 1.0, True), {})[1] == (t, -1.0, 1.0, False)
    assert E.out_of_place(torch.Tensor.add_, (t, t), {})[0] is torch.add
    assert E.op_kind(torch.log1p) is None or E.op_kind(torch.log1p) == E.ELEMWISE


def test_float_mask_helpers_equal_boolean_masks() -> None:
    # gamma selects R where z > 0 / z < 0 with threshold_backward instead of boolean masks
    from perspicio.methods.propagation.rules import RuleContext
    from perspicio.methods.propagation.rules_fast import signed, where_neg, where_pos

    z = randn(3, 4, 5, seed=8)
    z[0, 0, :2] = 0.0
    R = randn(3, 4, 5, seed=9)
    assert torch.equal(where_pos(R, z), R * (z > 0)) and torch.equal(where_neg(R, z), R * (z < 0))
    assert not torch.equal(where_pos(R, z), where_neg(R, z))
    assert signed(z, RuleContext()) and not signed(z.abs(), RuleContext()) and not signed(z, RuleContext(nonneg=True))


def test_call_sites_found_on_the_stack_equal_the_module_hooks() -> None:
    # without record_layers the module of an operation is looked up on the Python stack instead of
    # with hooks on every module: the recorded call sites are the same
    net = seeded(Cumulative())
    x = randn(2, 4)
    lazy = LRP(net, rule="epsilon", gradient_fallback=True)(x).provenance["gradient_fallback"]
    hooked = LRP(net, rule="epsilon", gradient_fallback=True, record_layers=True)(x).provenance["gradient_fallback"]
    assert lazy == hooked and "module" not in lazy[0]  # log1p is called in the top-level forward

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Cumulative()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t)

    nested = seeded(Nested())
    lazy = LRP(nested, rule="epsilon", gradient_fallback=True)(x).provenance["gradient_fallback"]
    hooked = LRP(nested, rule="epsilon", gradient_fallback=True, record_layers=True)(x).provenance["gradient_fallback"]
    assert lazy == hooked and "module 'inner' (Cumulative)" in lazy[0]


def test_merge_batchnorm_reuses_the_added_bias_parameter_not_the_identity_statistics() -> None:
    # the Parameter holding a merged bias is reused across merges (the same function, exact restore);
    # the identity statistics are fresh each time, so a write into them cannot leak into the next call
    net = cnn().eval()
    net[4] = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    net.insert(5, nn.BatchNorm2d(16))
    seeded(net)
    net.eval()
    x = randn(2, 3, 8, 8)
    before = snapshot(net)
    ref = net(x)
    with MergeBatchNorm()(net, x):
        first_bias, first_mean = net[4].bias, net[5].running_mean.clone()
        out1 = net(x)
        net[5].running_var.data.fill_(2.0)  # a write into the identity tensor (through its storage)
    assert_restored(net, before)
    with MergeBatchNorm()(net, x):
        assert net[4].bias is first_bias  # the same Parameter object for the merged bias
        assert torch.equal(net[5].running_mean, first_mean) and torch.equal(net[5].running_var, torch.ones(16))
        torch.testing.assert_close(net(x), out1, rtol=0, atol=0)
    assert_restored(net, before)
    torch.testing.assert_close(out1, ref, rtol=1e-5, atol=1e-5)


def test_weight_memo_is_not_fooled_by_a_transposed_view() -> None:
    # a square merged weight and its transpose share storage pointer, shape and dtype
    from perspicio.methods.propagation.derived import pos as _pos

    lin, bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
    net = seeded(nn.Sequential(lin, bn)).eval()
    with MergeBatchNorm()(net, randn(2, 4)):
        w = lin.weight.detach()
        assert torch.equal(_pos(w), w.clamp(min=0)) and _pos(w) is _pos(w)
        assert torch.equal(_pos(w.t()), w.t().clamp(min=0))


@pytest.mark.parametrize("rule, alpha, beta", [("zplus", 1.0, 0.0), ("alpha2_beta1", 2.0, 1.0)])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_alpha_beta_on_inputs_of_both_signs_closed_form(rule: str, alpha: float, beta: float, layer: str) -> None:
    # inputs of both signs run as one map of [x+, x-] with stacked weights; the closed form keeps them apart
    torch.manual_seed(3)
    mod = nn.Conv2d(3, 4, 3) if layer == "conv" else nn.Linear(5, 4)
    net = nn.Sequential(mod, nn.Flatten()).eval()
    x = torch.randn(2, 3, 5, 5) if layer == "conv" else torch.randn(2, 5)
    target = 7 if layer == "conv" else 2
    e = LRP(net, rule=rule)(x, target=target)
    fn = (lambda t, w, b: F.conv2d(t, w, b)) if layer == "conv" else (lambda t, w, b: F.linear(t, w, b))
    w, b = mod.weight.detach(), mod.bias.detach()
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    with torch.no_grad():
        out = net(x)
    R = torch.zeros_like(out)
    R[:, target] = out[:, target]
    expected = torch.zeros_like(x)
    for coef, wa, wb, bias, eps in ((alpha, w.clamp(min=0), w.clamp(max=0), b.clamp(min=0), 1e-6),
                                    (-beta, w.clamp(max=0), w.clamp(min=0), b.clamp(max=0), -1e-6)):
        if coef == 0:
            continue
        xa, xb = xp.clone().requires_grad_(True), xn.clone().requires_grad_(True)
        z = (fn(xa, wa, bias) + fn(xb, wb, None)).flatten(1) + eps
        ga, gb = torch.autograd.grad((z * (coef * R / z).detach()).sum(), [xa, xb])
        expected += xp * ga + xn * gb
    torch.testing.assert_close(e.attributions, expected, rtol=1e-5, atol=1e-6)


def test_forward_without_backward_frees_its_tensors_without_the_garbage_collector() -> None:
    """The pass's autograd nodes hold their rules and the rules the propagator; a propagator that
    kept the pass's tensors after the pass would form a cycle that only ``gc`` frees (an error
    between the forward and the backward would keep every feature map alive)."""
    import gc
    import weakref

    from perspicio.methods.propagation.engine import propagating
    from perspicio.methods.propagation.lrp import LRPPropagator, default_bounds

    class Keep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            self.refs: list = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.a(x))
            self.refs.append(weakref.ref(h))
            return self.b(h) + self.b(h)

    net = seeded(Keep()).requires_grad_(False)
    x = randn(3, 4).requires_grad_(True)
    low, high = default_bounds(x)
    composite = LRP(net, composite="epsilon_plus_flat").composite
    gc.collect()
    gc.disable()
    try:
        prop = LRPPropagator(net, composite, x, low=low, high=high)
        with propagating(net, prop):
            out = net(x)
        assert net.refs[-1]() is not None
        del out
        assert net.refs[-1]() is None
    finally:
        gc.enable()


CONV_CONFIGS = [  # (in, out, kernel, stride, padding, dilation, groups)
    (4, 6, 1, 1, 0, 1, 1), (4, 6, 3, 1, 1, 1, 1), (6, 6, 3, 1, 1, 1, 6), (6, 6, 5, 1, 2, 1, 6),
    (4, 6, 3, 1, 2, 2, 2), (4, 6, 3, 2, 1, 1, 1), (6, 6, 3, 1, 0, 1, 3), (4, 4, 3, 1, 3, 1, 1),
]


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=[str(c) for c in CONV_CONFIGS])
def test_packed_convolutions_equal_the_plain_ones(cfg: tuple) -> None:
    """Rules run memoised weights' convolutions on pre-packed oneDNN weights, and a stride-1 vjp as
    the convolution with the transposed, mirrored kernel: the same numbers as the plain ops (or the
    plain ops themselves where that does not apply: stride 2, padding wider than the kernel)."""
    from perspicio.methods.propagation import affine, derived
    from perspicio.methods.propagation.affine import affine_op
    from perspicio.methods.propagation.canonizers import _own_tensor
    from perspicio.methods.propagation.engine import AFFINE, Call

    cin, cout, k, stride, padding, dilation, groups = cfg
    g = torch.Generator().manual_seed(5)
    w = torch.randn(cout, cin // groups, k, k, generator=g)
    b = torch.randn(cout, generator=g)
    _own_tensor(w)
    _own_tensor(b)
    x = torch.randn(2, cin, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    op = affine_op(Call(F.conv2d, (x, w, b, stride, padding, dilation, groups), {}, "conv2d", AFFINE),
                   lambda t: t is x)
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    with torch.no_grad():
        got = op.map(x, w, b)
        s = torch.randn(ref.shape, generator=g)
        gv = op.adjoint(x, w, s)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    xi = x.detach().clone().requires_grad_(True)
    expected = torch.autograd.grad(F.conv2d(xi, w, None, stride, padding, dilation, groups), xi, s)[0]
    torch.testing.assert_close(gv, expected, rtol=1e-5, atol=1e-5)
    if affine.USE_PACKED:
        memo = derived.derived_tags(derived.derived_owner(w))
        assert any(isinstance(key, tuple) and key[0] == "packed" for key in memo)
        applies = stride == 1 and padding <= dilation * (k - 1)
        assert any(isinstance(key, tuple) and key[0] == "vjp_packed" for key in memo) == applies


def test_lrp_with_and_without_packed_weights_agree(zoo_model, chelsea_batch, monkeypatch) -> None:
    from perspicio.methods.propagation import affine

    x = chelsea_batch[:1]
    lrp = LRP(zoo_model.model, composite="epsilon_plus_flat")
    lrp(x)
    packed = lrp(x).attributions
    monkeypatch.setattr(affine, "USE_PACKED", False)
    plain = lrp(x).attributions
    scale = plain.abs().max()
    torch.testing.assert_close(packed / scale, plain / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", ["conv", "linear"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mask_negative", [False, True])
def test_gamma_closed_form_with_and_without_relevance_on_negative_outputs(layer: str, signed: bool,
                                                                         mask_negative: bool) -> None:
    """Gamma against its definition; with no relevance on outputs z < 0 (a layer feeding a ReLU)
    the rule skips its "down" half - the same numbers."""
    from perspicio.methods.propagation import Gamma
    from perspicio.methods.propagation.affine import affine_op
    from perspicio.methods.propagation.engine import AFFINE, Call
    from perspicio.methods.propagation.rules import RuleContext

    g_ = torch.Generator().manual_seed(12)
    if layer == "conv":
        w, b = torch.randn(5, 3, 3, 3, generator=g_), torch.randn(5, generator=g_)
        x = torch.randn(2, 3, 6, 6, generator=g_)

        def fn(t: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor | None) -> torch.Tensor:
            return F.conv2d(t, wt, bt, 1, 1)

        call = Call(F.conv2d, (x, w, b, 1, 1, 1, 1), {}, "torch.nn.functional.conv2d", AFFINE)
    else:
        w, b = torch.randn(5, 4, generator=g_), torch.randn(5, generator=g_)
        x = torch.randn(3, 4, generator=g_)

        def fn(t: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor | None) -> torch.Tensor:
            return F.linear(t, wt, bt)

        call = Call(F.linear, (x, w, b), {}, "torch.nn.functional.linear", AFFINE)
    if not signed:
        x = x.abs()
    op = affine_op(call, lambda t: t is x)
    z = fn(x, w, b)
    R = torch.randn(z.shape, generator=g_)
    if mask_negative:
        R = R * (z > 0)
    gamma, eps = 0.25, 1e-6
    got = Gamma(gamma, eps).relevance(op, x, z, R, RuleContext(nonneg=not signed))

    def stab(t: torch.Tensor) -> torch.Tensor:
        return t + eps * torch.where(t >= 0, 1.0, -1.0)

    wu, wd = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
    bu, bd = b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s_up = R * (z > 0) / stab(fn(xp, wu, bu) + fn(xn, wd, None))
    s_dn = R * (z < 0) / stab(fn(xp, wd, bd) + fn(xn, wu, None))
    expected = torch.zeros_like(x)
    for xa, wa, s in ((xp, wu, s_up), (xp, wd, s_dn), (xn, wd, s_up), (xn, wu, s_dn)):
        xi = xa.clone().requires_grad_(True)
        expected += xa * torch.autograd.grad(fn(xi, wa, None), xi, s)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
