"""Gradient, path and noise methods on tabular rows (N, F): a hand-set ReLU network with exact
values, completeness, clear refusals, and Captum on the bundled breast-cancer MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import perspicio
from perspicio.errors import InputError, LayerError, ModelError, OptionError


def hand_mlp() -> nn.Module:
    """h = relu(W1 x + b1), out = W2 h + b2 with W1 = [[1, 1, 0], [0, -1, 2]], b1 = [-1, 0],
    W2 = [[1, 3], [1, -1]], b2 = [0.5, 0]."""
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 2.0]]))
        m[0].bias.copy_(torch.tensor([-1.0, 0.0]))
        m[2].weight.copy_(torch.tensor([[1.0, 3.0], [1.0, -1.0]]))
        m[2].bias.copy_(torch.tensor([0.5, 0.0]))
    return m


# x1 = (1, 1, 1): pre-activations (1, 1), both units on; x2 = (2, 0, -1): (1, -2), unit 2 off
X = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])


def test_exact_values_on_rows() -> None:
    m = hand_mlp()
    sal = perspicio.explain(m, X, method="saliency", target=0, absolute=False)
    # d out0 / dx = W2[0] * relu'(pre) @ W1: (1, 1, 0) + 3 (0, -1, 2) = (1, -2, 6); row 2: (1, 1, 0)
    assert sal.attributions.tolist() == [[1.0, -2.0, 6.0], [1.0, 1.0, 0.0]]
    assert perspicio.explain(m, X, method="saliency", target=0).attributions.tolist() == [
        [1.0, 2.0, 6.0],
        [1.0, 1.0, 0.0],
    ]
    assert perspicio.explain(m, X, method="input_x_gradient", target=0).attributions.tolist() == [
        [1.0, -2.0, 6.0],
        [2.0, 0.0, 0.0],
    ]
    assert perspicio.explain(m, X, method="saliency", target=1, absolute=False).attributions[
        0
    ].tolist() == [1.0, 2.0, -2.0]
    # IG from 0 along a x: unit 1 is on for a > 1/2 (pre 2a - 1), unit 2 for a > 0 on row 1 and never on
    # row 2; right Riemann sums with 4 nodes (1/4, 1/2, 3/4, 1; relu'(0) = 0) integrate the step exactly
    ig = perspicio.explain(
        m, X, method="integrated_gradients", target=0, steps=4, quadrature="right"
    )
    assert torch.allclose(
        ig.attributions, torch.tensor([[0.5, -2.5, 6.0], [1.0, 0.0, 0.0]]), atol=1e-6
    )
    assert ig.scores.tolist() == [4.5, 1.5] and ig.base_value.tolist() == [0.5, 0.5]
    assert max(ig.provenance["completeness_error"]) < 1e-6  # 4 = 4.5 - 0.5 and 1 = 1.5 - 0.5
    # SmoothGrad without noise is the gradient; guided backprop equals it where no gradient is negative
    sg = perspicio.explain(m, X, method="smoothgrad", target=0, samples=3, noise=0.0)
    assert sg.attributions.tolist() == sal.attributions.tolist()
    gb = perspicio.explain(m, X, method="guided_backprop", target=0)
    assert gb.attributions.tolist() == [[1.0, -2.0, 6.0], [1.0, 1.0, 0.0]]
    dc = perspicio.explain(m, X, method="deconvnet", target=0)
    # deconvnet ignores the forward mask: W2[0] >= 0 passes to the inactive unit 2 of row 2 too
    assert dc.attributions.tolist() == [[1.0, -2.0, 6.0], [1.0, -2.0, 6.0]]
    gs = perspicio.explain(m, X, method="gradient_shap", target=0, samples=200)
    assert gs.attributions.shape == (2, 3)
    assert torch.allclose(
        gs.attributions.sum(1), gs.scores - gs.base_value, atol=0.3
    )  # in expectation


def test_refusals_on_rows() -> None:
    m = hand_mlp()
    with pytest.raises(OptionError, match="channels"):
        perspicio.explain(m, X, method="saliency", reduce="max", target=0)
    with pytest.raises(InputError, match="images"):
        perspicio.explain(m, X, method="guided_gradcam", target=0)
    with pytest.raises(InputError, match="batch dimension"):
        perspicio.explain(m, X[0], method="saliency", target=0)
    with pytest.raises(LayerError, match="layer="):
        perspicio.explain(m, X, method="neuron_gradient")
    n = perspicio.explain(m, X, method="neuron_gradient", layer="0", neuron=1)
    assert n.attributions.tolist() == [[0.0, -1.0, 2.0], [0.0, -1.0, 2.0]]  # d pre_2 / dx = W1[1]
    with pytest.raises(ModelError, match="rectifier"):
        perspicio.explain(
            nn.Sequential(nn.Linear(3, 2), nn.Tanh()), X, method="guided_backprop", target=0
        )
    emb = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(InputError, match="token ids"):
        perspicio.explain(emb, torch.tensor([[1, 2, 3]]), method="integrated_gradients", target=0)


def test_images_keep_their_rank_check() -> None:
    cnn = nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)
    )
    with pytest.raises(InputError, match=r"4 dimensions.*unsqueeze"):
        perspicio.explain(cnn, torch.rand(3, 8, 8), method="saliency", target=0)
    e = perspicio.explain(cnn, torch.rand(1, 3, 8, 8), method="saliency", target=0, reduce="max")
    assert e.attributions.shape == (1, 1, 8, 8)


def test_bundled_tabular_mlp_equals_captum() -> None:
    captum = pytest.importorskip("captum.attr")
    pytest.importorskip("sklearn")
    from perspicio.zoo.tabular import load_tabular

    demo = load_tabular("breast_cancer", "mlp")
    x = torch.as_tensor(demo.X_test[:4], dtype=torch.float32)
    model = demo.model
    sal = perspicio.explain(demo, x, method="saliency", target=1)
    assert torch.allclose(
        sal.attributions,
        captum.Saliency(model).attribute(x.clone(), target=1),
        rtol=1e-5,
        atol=1e-7,
    )
    ixg = perspicio.explain(demo, x, method="input_x_gradient", target=1)
    assert torch.allclose(
        ixg.attributions,
        captum.InputXGradient(model).attribute(x.clone(), target=1),
        rtol=1e-5,
        atol=1e-6,
    )
    base = torch.as_tensor(demo.X_train.mean(0), dtype=torch.float32)[None].expand_as(x)
    ig = perspicio.explain(
        demo, x, method="integrated_gradients", target=1, steps=32, baseline=base
    )
    ref = captum.IntegratedGradients(model).attribute(
        x, baselines=base, target=1, n_steps=32, method="gausslegendre"
    )
    assert torch.allclose(ig.attributions, ref, rtol=1e-4, atol=1e-5)
    assert ig.attributions.shape == (4, 30)
