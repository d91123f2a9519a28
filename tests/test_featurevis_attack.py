"""Adversarial examples: FGSM exact on a linear model, PGD respects its norm ball exactly,
flips the bundled model on chelsea at 2/255, explanation change; lifecycle and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perspicio.errors import OptionError, TargetError
from perspicio.featurevis import attack, explanation_change, minimal_epsilon


@pytest.fixture(scope="module")
def digits():
    from perspicio.zoo.digits import digits_data, load_digits_cnn

    x, y = digits_data("test")
    return load_digits_cnn(), x[:6], y[:6]


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 48, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_fgsm_exact_on_linear_model() -> None:
    model = Linear().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 4, 4, generator=g) * 0.8 + 0.1
    eps = 0.05
    res = attack(model, x, method="fgsm", epsilon=eps)
    with torch.no_grad():
        p = model(x).softmax(1)
    y = p.argmax(1)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    grad = ((p - onehot) @ model.fc.weight).view_as(x)  # d CE / dx for a linear model
    expected = (x + eps * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(res.adversarial, expected, atol=1e-7, rtol=0)
    assert torch.equal(res.label, y)
    torch.testing.assert_close(res.linf, torch.full((2,), eps))


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("linf", 0.2), ("l2", 0.5), ("l2", 2.0)])
def test_pgd_respects_norm_ball_exactly(digits, norm: str, eps: float) -> None:
    demo, x, _ = digits
    x0 = x.clone()
    for seed in range(3):
        res = attack(demo, x, method="pgd", norm=norm, epsilon=eps, steps=8, seed=seed, step_size=eps)
        d = res.adversarial - res.pixels
        if norm == "linf":
            assert float(d.abs().max()) <= eps
        else:
            assert float(d.flatten(1).norm(dim=1).max()) <= eps
        assert float(res.adversarial.min()) >= 0 and float(res.adversarial.max()) <= 1
        torch.testing.assert_close(demo.preprocess.normalize(res.adversarial), res.inputs)
    assert torch.equal(x, x0)


def test_pgd_untargeted_and_targeted_succeed(digits) -> None:
    demo, x, y = digits
    res = attack(demo, x, epsilon=0.25, steps=10)
    assert bool(res.success.all())
    assert bool((res.after != res.before).all())
    tgt = attack(demo, x, epsilon=0.4, steps=20, target=3, targeted=True)
    assert bool((tgt.after == 3).float().mean() >= 0.8)
    assert bool((tgt.success == (tgt.after == 3)).all())
    eps, best = minimal_epsilon(demo, x[:2], [0.4, 0.01, 0.1], steps=5)
    assert eps in (0.1, 0.4) and best is not None and bool(best.success.all())


def test_flips_bundled_model_on_chelsea_at_2_over_255(zoo_model, chelsea_batch, assert_no_hooks) -> None:
    x0 = chelsea_batch.clone()
    res = attack(zoo_model, chelsea_batch, method="pgd", norm="linf", epsilon=2 / 255, steps=10, seed=0)
    assert bool(res.success[0]), (int(res.before[0]), int(res.after[0]))
    assert float(res.linf[0]) <= 2 / 255
    assert int(res.before[0]) in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
    assert torch.equal(chelsea_batch, x0)
    assert_no_hooks(zoo_model.model)


def test_explanation_change_uses_registered_method(digits) -> None:
    import perspicio

    demo, x, _ = digits
    res = attack(demo, x[:1], epsilon=0.3, steps=10)
    ch = explanation_change(demo, res, "gradcam")
    direct = perspicio.explain(demo, demo.preprocess.normalize(res.pixels), method="gradcam", target=int(res.before[0]))
    torch.testing.assert_close(ch.clean.attributions, direct.attributions)
    assert int(ch.adversarial_new.targets[0]) == int(res.after[0])
    # the correlations are Pearson's r of the flattened maps, recomputed independently
    import numpy as np

    clean = ch.clean.attributions.flatten().double().numpy()
    for exp, r in ((ch.adversarial_new, ch.correlation_new), (ch.adversarial_same, ch.correlation_same)):
        expected = np.corrcoef(clean, exp.attributions.flatten().double().numpy())[0, 1]
        assert abs(r - expected) < 1e-6, (r, expected)
    assert int(ch.adversarial_same.targets[0]) == int(res.before[0])


def test_errors(digits) -> None:
    demo, x, _ = digits
    with pytest.raises(OptionError, match="norm"):
        attack(demo, x, norm="l1")
    with pytest.raises(OptionError, match="method"):
        attack(demo, x, method="cw")
    with pytest.raises(TargetError, match="targeted"):
        attack(demo, x, targeted=True)
    with pytest.raises(OptionError, match="epsilon"):
        attack(demo, x, epsilon=-0.1)
    with pytest.raises(OptionError, match=r"\[0, 1\]"):
        attack(Linear(), torch.full((1, 3, 4, 4), 3.0))
    with pytest.raises(TargetError, match="out of range"):
        attack(demo, x, target=12)
