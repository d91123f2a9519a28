"""SmoothGrad / SmoothGrad-squared / VarGrad as a wrapper of any method: exact values,
Captum NoiseTunnel agreement with the same noise, seeding, errors, lifecycle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perspicio import explain
from perspicio.errors import InputError, OptionError, UnknownNameError
from perspicio.methods import names
from perspicio.methods.noise import SmoothGrad


class Quad(nn.Module):
    """Two outputs: w.x and (w.x)^2 / 2 on a flattened input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w
        return torch.stack([s, s * s / 2], dim=1)


X = torch.tensor([1.0, 0.5, -2.0, 1.0]).view(1, 1, 2, 2)
W = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 1, 2, 2)


def test_registered() -> None:
    assert {"smoothgrad", "smoothgrad_sq", "vargrad"} <= set(names("noise"))


def test_exact_on_linear_and_quadratic() -> None:
    m = Quad()
    e = explain(m, X, method="smoothgrad", target=0, samples=8, noise=0.3)
    torch.testing.assert_close(e.attributions, W)  # constant gradient: noise does not matter
    torch.testing.assert_close(explain(m, X, method="smoothgrad_sq", target=0, samples=8).attributions, W * W)
    assert explain(m, X, method="vargrad", target=0, samples=8).attributions.abs().max() < 1e-6
    # quadratic: grad = (w.(x + e)) w, so SmoothGrad = mean_s (w.(x + e_s)) w, with the noise actually drawn
    sg = SmoothGrad(m, samples=16, noise=0.2, seed=4)
    sigma = 0.2 * (X.max() - X.min())
    eps = sg._noise(X, sigma.view(1), torch.Generator().manual_seed(4))
    proj = (X + eps).flatten(1) @ W.flatten()
    e = sg(X, target=1)
    torch.testing.assert_close(e.attributions[0], proj.mean() * W[0])
    assert e.scores.tolist() == [pytest.approx(2.0)]  # the clean score (w.x)^2 / 2
    v = explain(m, X, method="vargrad", target=1, samples=16, noise=0.2, seed=4)
    torch.testing.assert_close(v.attributions[0], proj.var(unbiased=False) * W[0] ** 2)
    assert abs(float(eps.std()) - float(sigma)) < 0.5 * float(sigma)


def test_noise_zero_equals_base(tiny_cnn, tiny_input) -> None:
    for base, opts in (("saliency", {"absolute": False}), ("integrated_gradients", {"steps": 4}), ("gradcam", {})):
        e = explain(tiny_cnn, tiny_input, method="smoothgrad", base=base, base_options=opts or None,
                    samples=3, noise=0.0, target=[1, 2])
        ref = explain(tiny_cnn, tiny_input, method=base, target=[1, 2], **opts)
        torch.testing.assert_close(e.attributions, ref.attributions, atol=1e-6, rtol=1e-5)
        assert e.provenance["base"] == base


def test_target_resolved_on_clean_input_and_seeding(tiny_cnn, tiny_input) -> None:
    clean = tiny_cnn(tiny_input).argmax(1)
    state = torch.random.get_rng_state()
    a = explain(tiny_cnn, tiny_input, method="smoothgrad", samples=4, noise=0.5, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert a.targets.tolist() == clean.tolist()
    assert a.provenance["backward_samples"] == 8 and a.provenance["forward_samples"] >= 10
    b = explain(tiny_cnn, tiny_input, method="smoothgrad", samples=4, noise=0.5, seed=1)
    c = explain(tiny_cnn, tiny_input, method="smoothgrad", samples=4, noise=0.5, seed=2)
    assert torch.equal(a.attributions, b.attributions) and not torch.equal(a.attributions, c.attributions)
    # chunking does not change the result
    d = explain(tiny_cnn, tiny_input, method="smoothgrad", samples=4, noise=0.5, seed=1, batch_size=3)
    torch.testing.assert_close(a.attributions, d.attributions)


def test_wraps_neuron_methods(tiny_cnn, tiny_input) -> None:
    e = explain(tiny_cnn, tiny_input, method="smoothgrad", base="neuron_gradient",
                base_options={"layer": "conv2", "neuron": 2}, samples=2, noise=0.0)
    ref = explain(tiny_cnn, tiny_input, method="neuron_gradient", layer="conv2", neuron=2)
    torch.testing.assert_close(e.attributions, ref.attributions)


def test_errors(tiny_cnn, tiny_input, assert_no_hooks) -> None:
    with pytest.raises(OptionError, match="noise must be a number >= 0"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", noise=-1)
    with pytest.raises(OptionError, match="samples must be an integer >= 1"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", samples=0)
    with pytest.raises(UnknownNameError, match="saliency"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base="salency")
    with pytest.raises(OptionError, match="noise wrapper"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base="vargrad")
    with pytest.raises(OptionError, match="variant"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", variant="median")
    with pytest.raises(OptionError, match="no option 'stepz'"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base="integrated_gradients", base_options={"stepz": 3})
    with pytest.raises(InputError):
        explain(tiny_cnn, tiny_input[0], method="smoothgrad")
    tiny_cnn.train()
    with pytest.raises(RuntimeError, match="boom"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base="guided_backprop", samples=2,
                target=lambda out: (_ for _ in ()).throw(RuntimeError("boom")))
    assert tiny_cnn.training and torch._C._len_torch_function_stack() == 0
    assert_no_hooks(tiny_cnn)


def test_agrees_with_captum_noise_tunnel(zoo_model, chelsea_batch, monkeypatch) -> None:
    from captum.attr import NoiseTunnel, Saliency

    x = chelsea_batch[..., 48:176, 48:176].clone()
    S, stdev = 3, 0.3
    refs, noises = {}, []
    with torch.random.fork_rng():
        for v in ("smoothgrad", "smoothgrad_sq", "vargrad"):
            torch.manual_seed(0)
            refs[v] = NoiseTunnel(Saliency(zoo_model.model)).attribute(
                x.clone().requires_grad_(), nt_type=v, nt_samples=S, stdevs=stdev, target=285, abs=False)
            torch.manual_seed(0)
            noises.append(torch.normal(0, torch.tensor(stdev).repeat((S, *x.shape[1:]))))
    rng = float(x.max() - x.min())
    for v, eps in zip(("smoothgrad", "smoothgrad_sq", "vargrad"), noises):
        monkeypatch.setattr(SmoothGrad, "_noise", lambda self, *a, eps=eps: eps)
        e = explain(zoo_model, x, method="smoothgrad", variant=v, samples=S, noise=stdev / rng, target=285)
        ref = refs[v].detach()
        # Captum's VarGrad is E[a^2] - E[a]^2 in float32: its rounding error scales with E[a^2]
        scale = (refs["smoothgrad_sq"] if v == "vargrad" else refs[v]).detach().abs().max()
        assert float((e.attributions - ref).abs().max() / scale) < 1e-5, v


@pytest.mark.parametrize(("method", "opts"), [
    ("smoothgrad", {}),
    ("vargrad", {"base": "integrated_gradients", "base_options": {"steps": 4}}),
    ("smoothgrad_sq", {"base": "occlusion", "base_options": {"window": 4, "stride": 4}}),
])
def test_multi_target_rows_equal_single_target_calls(tiny_cnn, tiny_input, method, opts) -> None:
    # one set of noisy copies per input serves all its targets (one forward per copy for gradient bases)
    shared = explain(tiny_cnn, tiny_input[:1], method=method, target=[[0, 3, 4]], samples=4, **opts)
    assert shared.attributions.shape[0] == 3 and shared.targets.tolist() == [0, 3, 4]
    for row, t in enumerate([0, 3, 4]):
        single = explain(tiny_cnn, tiny_input[:1], method=method, target=t, samples=4, **opts)
        if method == "smoothgrad_sq":  # occlusion shares nothing: its chunks differ, so float rounding may
            torch.testing.assert_close(shared.attributions[row], single.attributions[0], rtol=1e-5, atol=1e-7)
        else:  # one forward per noisy copy for all targets: bit-identical
            assert torch.equal(shared.attributions[row], single.attributions[0])
        assert torch.equal(shared.scores[row], single.scores[0])
    if method == "smoothgrad":
        assert shared.provenance["forward_samples"] == 1 + 4  # clean scores + 4 noisy copies, not 3x


def test_multi_target_two_inputs(tiny_cnn, tiny_input) -> None:
    e = explain(tiny_cnn, tiny_input, method="smoothgrad", target=[[0, 3], [1, 4]], samples=3)
    assert e.attributions.shape == (4, 3, 8, 8) and e.targets.tolist() == [0, 3, 1, 4]
    assert e.provenance["backward_samples"] == 2 * 3 * 2 and e.provenance["forward_samples"] == 2 + 2 * 3


def test_base_as_class_or_instance_equals_by_name(tiny_cnn, tiny_input) -> None:
    """``base`` composes by name, by Method class or with a constructed Method instance."""
    import json

    from perspicio.methods.path import IntegratedGradients

    common = dict(method="vargrad", samples=3, noise=0.1, seed=4, target=1)
    ref = explain(tiny_cnn, tiny_input, base="integrated_gradients", base_options={"steps": 4}, **common)
    by_class = explain(tiny_cnn, tiny_input, base=IntegratedGradients, base_options={"steps": 4}, **common)
    inst = IntegratedGradients(tiny_cnn, steps=4)
    by_instance = explain(tiny_cnn, tiny_input, base=inst, **common)
    for e in (by_class, by_instance):
        torch.testing.assert_close(e.attributions, ref.attributions, rtol=0, atol=0)
        torch.testing.assert_close(e.scores, ref.scores, rtol=0, atol=0)
        assert e.options["base"] == "integrated_gradients"
        assert e.provenance["base"] == "integrated_gradients"
        json.dumps({k: dict(v) if hasattr(v, "keys") else v for k, v in e.options.items()})  # JSON-ready
    assert by_instance.options["base_options"] == {"steps": 4}
    with pytest.raises(OptionError, match="already constructed"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base=inst, base_options={"steps": 2})
    with pytest.raises(OptionError, match="another model"):
        explain(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), tiny_input, method="smoothgrad", base=inst)
    with pytest.raises(OptionError, match="noise wrapper"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base=SmoothGrad)
    with pytest.raises(OptionError, match="method name, a Method class or a Method instance"):
        explain(tiny_cnn, tiny_input, method="smoothgrad", base=3)
