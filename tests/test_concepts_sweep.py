"""perspicio.concepts on configurations test_concepts.py does not cover: modules called several
times per forward pass (ResNet's shared ReLU), 2-D (Linear) activations and non-image inputs,
several layers, set kinds (data loaders, lists of tensors, numpy), sets of other image sizes,
directional derivatives and the magnitude score, CRAFT importance in closed form, global RNG
untouched, and bad input. Captum is the oracle in the slow tests (same CAVs fed to both)."""

from __future__ import annotations

import copy
import itertools
import random
import warnings
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TinyCNN, hook_report
from torch import nn

pytest.importorskip("sklearn")

from perspicio.concepts import MIN_SET_SIZE, discover, fit_cav, tcav  # noqa: E402
from perspicio.errors import InputError, LayerError, OptionError  # noqa: E402


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class SharedReLU(nn.Module):
    """conv1 -> act -> conv2 -> act -> GAP -> fc: ``act`` is called twice per forward pass
    (as torchvision's BasicBlock.relu); a BatchNorm makes train/eval mode matter."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn(self.conv1(x)))
        b = self.act(self.conv2(a) + 0.5)
        return self.fc(self.pool(b).flatten(1))


def _second_call(model: SharedReLU, x: torch.Tensor, grad_target: int | None = None):
    """The activations of ``act``'s second call (and the gradient of ``grad_target`` there), by hand."""
    with torch.enable_grad():
        a = model.act(model.bn(model.conv1(x)))
        b = model.act(model.conv2(a) + 0.5)
        if grad_target is None:
            return b.detach(), None
        b = b.detach().requires_grad_(True)
        out = model.fc(model.pool(b).flatten(1))
        (g,) = torch.autograd.grad(out[:, grad_target].sum(), b)
    return b.detach(), g


# ----------------------------------------------------------------------------- shared modules


def test_module_called_twice_uses_its_last_call_like_captum() -> None:
    """Activations (for the CAVs) and gradients (for the derivatives) both come from the module's
    last call. Before the fix the CAVs were fitted on the first call's output (the forward pass
    stopped there) while the gradient was taken at the last: silently wrong scores."""
    model = SharedReLU().eval()
    x = _randn(7, 3, 8, 8, seed=0)
    concept = _randn(6, 3, 8, 8, seed=1) + 0.7
    randoms = [_randn(6, 3, 8, 8, seed=10 + i) for i in range(3)]
    r = tcav(model, x, layer="act", concepts={"c": concept}, target=2, random_sets=randoms)
    with torch.no_grad():
        acts_c, _ = _second_call(model, concept)
        acts_r = [_second_call(model, v)[0] for v in randoms]
    _, grads = _second_call(model, x, grad_target=2)
    for i, ar in enumerate(acts_r):
        want = fit_cav(acts_c, ar)
        assert torch.allclose(r.cavs["c"][i].vector, want.vector, atol=1e-7)
        deriv = grads.flatten(1).double() @ want.vector
        assert np.allclose(r.derivatives["c"][i], deriv.numpy(), rtol=1e-5, atol=1e-9)
        assert r.concept_scores["c"][i] == float((deriv > 0).double().mean())


def test_discovery_on_a_module_called_twice_maps_its_last_call() -> None:
    from scipy.optimize import nnls

    model = SharedReLU().eval()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    d = discover(
        model,
        x,
        layer="act",
        target=1,
        n_concepts=3,
        crops_per_image=6,
        importance="gradient_input",
    )
    acts, _ = _second_call(model, x)
    rows = acts.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    # each position's coefficients: the exact non-negative least squares on the basis (before the
    # fix: the first call's activations, and a coordinate descent stopped 3% off the optimum)
    u = np.stack([nnls(d.basis.numpy().T, r)[0] for r in rows])
    want = torch.from_numpy(u).reshape(4, 12, 12, 3).permute(0, 3, 1, 2)
    assert torch.allclose(d.maps, want, rtol=1e-9, atol=1e-12)
    # the target is linear after ``act``: gradient x coefficient is exact (replacement at the last call)
    c = torch.einsum("nkhw,kc,c->nk", d.maps, d.basis, model.fc.weight[1].double().detach()) / 144
    assert np.allclose(d.importance.numpy(), c.mean(0).numpy(), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- derivatives, magnitude


def test_directional_derivatives_and_magnitude_by_hand() -> None:
    model = TinyCNN().eval()
    x = _randn(9, 3, 8, 8, seed=0)
    concepts = {"a": _randn(6, 3, 8, 8, seed=1) + 1, "b": _randn(7, 3, 8, 8, seed=2) - 1}
    randoms = [_randn(6, 3, 8, 8, seed=20 + i) for i in range(3)]
    r = tcav(model, x, layer="conv2", concepts=concepts, target=4, random_sets=randoms)
    xg = x.clone().requires_grad_(False)
    with torch.enable_grad():
        h = model.conv2(model.act1(model.conv1(xg))).detach().requires_grad_(True)
        out = model.fc(model.pool(model.act2(h)).flatten(1))
        (g,) = torch.autograd.grad(out[:, 4].sum(), h)
    for c in concepts:
        vecs = torch.stack([v.vector for v in r.cavs[c]])
        want = (vecs @ g.flatten(1).double().T).numpy()
        assert np.allclose(r.derivatives[c], want, rtol=1e-6, atol=1e-10)
        assert np.array_equal(r.concept_scores[c], (want > 0).mean(axis=1))
        pos, tot = np.clip(want, 0, None).sum(1), np.abs(want).sum(1)
        assert np.allclose(r.concept_magnitudes[c], pos / tot, rtol=1e-9)
        assert r.magnitudes[c] == pytest.approx(float(np.mean(pos / tot)), rel=1e-9)
    assert r.random_derivatives.shape == (3 * 2, 9)  # exchangeable test: N (N - 1) random CAVs
    d = r.to_dict()["concepts"]["a"]
    assert d["magnitude"] == r.magnitudes["a"]
    assert d["mean_derivative_per_random_set"] == pytest.approx(r.derivatives["a"].mean(1).tolist())


def test_linear_layer_of_an_mlp_on_feature_rows() -> None:
    """Inputs that are not images (an MLP on 2-D rows) and a 2-D activation: the score's gradient at
    ``feat`` (identity) is the head's row, so every derivative is head . CAV."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(5, 8), act=nn.ReLU(), feat=nn.Identity(), head=nn.Linear(8, 3))
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = _randn(10, 5, seed=1)
    concepts = {"up": _randn(6, 5, seed=2) + 1.5}
    pool = _randn(40, 5, seed=3)
    r = tcav(model, x, layer="feat", concepts=concepts, target=1, random_sets=3, random=pool)
    head = model.head.weight[1].detach().double()
    for i, cav in enumerate(r.cavs["up"]):
        want = float(head @ cav.vector)
        assert np.allclose(r.derivatives["up"][i], want, rtol=1e-6)
        assert r.concept_scores["up"][i] == float(want > 0)


def test_custom_classifier_may_return_its_intercept() -> None:
    """A callable classifier returning (weights, intercept): the reported training accuracy is the
    classifier's own (scikit-learn's score); with weights only, the intercept is taken as 0."""
    from sklearn.linear_model import LogisticRegression

    a, b = _randn(10, 4, seed=0) + 3, _randn(10, 4, seed=1) + 2.5
    X, y = torch.cat([a, b]).double().numpy(), np.r_[np.ones(10), np.zeros(10)]
    ref = LogisticRegression().fit(X, y)

    def fit(X, y, seed):
        m = LogisticRegression().fit(X, y)
        return m.coef_[0], m.intercept_[0]

    cav = fit_cav(a, b, classifier=fit)
    assert cav.accuracy == ref.score(X, y) == 0.75 and cav.intercept == ref.intercept_[0]
    assert torch.allclose(cav.vector, torch.from_numpy(ref.coef_[0] / np.linalg.norm(ref.coef_[0])))
    assert fit_cav(a, b, classifier=lambda X, y, s: fit(X, y, s)[0]).accuracy == 0.5


# ----------------------------------------------------------------------------- several layers


def test_a_list_of_layers_gives_one_result_per_layer_equal_to_single_calls() -> None:
    model = TinyCNN().eval()
    x, pool = _randn(6, 3, 8, 8, seed=0), _randn(40, 3, 8, 8, seed=1)
    kw = dict(
        concepts={"a": pool[:6] + 1, "b": pool[6:12] * 2}, target=3, random_sets=4, random=pool
    )
    several = tcav(model, x, layer=["conv1", "act2", "fc"], seed=2, **kw)
    assert list(several) == ["conv1", "act2", "fc"]
    for name, res in several.items():
        one = tcav(model, x, layer=name, seed=2, **kw)
        assert res.layer == name and res.p_values == one.p_values
        for c in ("a", "b"):
            assert np.array_equal(res.derivatives[c], one.derivatives[c])
    # a module object in the list, and the errors
    assert list(tcav(model, x, layer=[model.act1], seed=2, **kw)) == ["act1"]
    with pytest.raises(LayerError, match=r"pass them as a list \(layer=\['act1', 'act2'\]\)"):
        tcav(model, x, layer="act1,act2", **kw)
    with pytest.raises(LayerError, match="'act3' not found.*Did you mean: act2"):
        tcav(model, x, layer=["act1", "act3"], **kw)
    with pytest.raises(LayerError, match="more than once"):
        tcav(model, x, layer=["act1", "act1"], **kw)
    with pytest.raises(LayerError, match="empty list"):
        tcav(model, x, layer=[], **kw)


# ----------------------------------------------------------------------------- set kinds and sizes


def test_data_loaders_lists_of_tensors_and_numpy_give_the_same_result() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model = TinyCNN().eval()
    x, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    concept = pool[:7] + 1
    randoms = [pool[7:13], pool[13:19], pool[19:25]]
    ref = tcav(model, x, layer="act2", concepts={"c": concept}, target=1, random_sets=randoms)
    variants = [
        (
            DataLoader(x, batch_size=4),
            DataLoader(TensorDataset(concept, torch.zeros(7)), batch_size=3),
        ),
        (list(x), list(concept)),  # single inputs, stacked
        ([x[:2], x[2:]], [concept[:3], concept[3:]]),  # batches, concatenated
        (x.numpy(), concept.numpy()),
        # objects holding their batches as data_iter, as captum.concept.Concept does
        (SimpleNamespace(data_iter=[x[:2], x[2:]]), SimpleNamespace(data_iter=[concept])),
    ]
    for inputs, c in variants:
        r = tcav(
            model,
            inputs,
            layer="act2",
            concepts={"c": c},
            target=1,
            random_sets=[DataLoader(v, batch_size=5) for v in randoms],
        )
        assert np.array_equal(r.derivatives["c"], ref.derivatives["c"])
        assert r.p_values == ref.p_values


def test_image_files_folders_and_pil_images_with_preprocess(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        p = tmp_path / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
        paths.append(p)

    def preprocess(items):
        def one(it):
            im = it if isinstance(it, Image.Image) else Image.open(it)
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            return torch.from_numpy(arr).permute(2, 0, 1)

        return torch.stack([one(it) for it in items])

    model = TinyCNN().eval()
    x = _randn(5, 3, 8, 8, seed=0)
    kw = dict(layer="act2", target=0, preprocess=preprocess)
    r1 = tcav(model, x, concepts={"c": paths[:6]}, random_sets=[paths[6:], str(tmp_path)], **kw)
    pil = [Image.open(p) for p in paths[:6]]
    r2 = tcav(
        model, x, concepts={"c": pil}, random_sets=[preprocess(paths[6:]), preprocess(paths)], **kw
    )
    assert np.allclose(r1.derivatives["c"], r2.derivatives["c"], rtol=1e-9, atol=1e-15)
    assert r1.set_sizes == {"c": 6} and r1.options["random_set_sizes"] == [6, 12]


def test_sets_of_another_image_size() -> None:
    """At a convolutional layer a concept of 12 x 12 images cannot share a CAV with 8 x 8 inputs (a
    clear error saying so); after global pooling it can, and the CAV is the one of its pooled
    activations."""
    model = TinyCNN().eval()
    x, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    big = _randn(6, 3, 12, 12, seed=2) + 1
    with pytest.raises(InputError, match=r"concept 'big'.*\(3, 12, 12\).*\(3, 8, 8\).*resize"):
        tcav(model, x, layer="act2", concepts={"big": big}, random_sets=3, random=pool)
    with pytest.raises(InputError, match=r"random_sets\[1\].*\(8, 10, 10\)"):
        tcav(
            model,
            x,
            layer="conv2",
            concepts={"a": pool[:6]},
            random_sets=[pool[6:12], _randn(6, 3, 10, 10, seed=3)],
        )
    r = tcav(
        model, x, layer="pool", concepts={"big": big}, target=0, random_sets=[pool[:6], pool[6:12]]
    )
    with torch.no_grad():
        acts = model.pool(model.act2(model.conv2(model.act1(model.conv1(big)))))
        rnd = model.pool(model.act2(model.conv2(model.act1(model.conv1(pool[:6])))))
    assert torch.allclose(r.cavs["big"][0].vector, fit_cav(acts, rnd).vector, atol=1e-7)
    # a model that cannot take the other size says which set
    flat = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 2, 3), act=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(72, 2))
    )
    with pytest.raises(InputError, match=r"model failed on concept 'big'.*\(3, 12, 12\)"):
        tcav(flat, x, layer="fc", concepts={"big": big}, random_sets=3, random=pool)


# ----------------------------------------------------------------------------- CRAFT closed form


def _linear_head_model() -> nn.Module:
    """conv -> ReLU (``act``) -> GAP -> Linear: the target is linear in the layer, so with the
    reconstruction (U * m) W the score is sum_k m_k c_k + b."""
    g = torch.Generator().manual_seed(0)
    conv, fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.rand(6, generator=g))
        fc.weight.copy_(torch.randn(2, 6, generator=g))
        fc.bias.zero_()
    return nn.Sequential(
        OrderedDict(
            conv=conv, act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=fc
        )
    ).eval()


def test_craft_importance_closed_form_sobol_and_gradient_input() -> None:
    """For f(m) = sum_k m_k c_k (c_k = concept k's share of the class logit in one image), the total
    Sobol index with independent uniform masks is c_k^2 / sum_j c_j^2 and gradient x input is c_k;
    both averaged over the images, as in CRAFT."""
    model = _linear_head_model()
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(layer="act", target=0, n_concepts=3, crops_per_image=8, seed=0)
    grad = discover(model, x, importance="gradient_input", **kw)
    sob = discover(model, x, importance="sobol", designs=256, **kw)
    w = model.fc.weight[0].detach().double()

    def shares(d):  # (images, k): c_k per image, in the result's (importance) order
        return (torch.einsum("nkhw,kc,c->nk", d.maps, d.basis, w) / 256).numpy()

    c = shares(grad)
    assert np.allclose(grad.importance.numpy(), c.mean(0), rtol=1e-5, atol=1e-8)
    assert list(grad.importance.numpy()) == sorted(grad.importance.numpy(), reverse=True)
    c = shares(sob)  # the same concepts, ranked by their Sobol index
    st = (c**2 / (c**2).sum(1, keepdims=True)).mean(0)
    assert np.abs(sob.importance.numpy() - st).max() < 1e-3  # quasi-Monte Carlo error (2.5e-5 here)
    # non-negative factorisation and maps; maps at the layer's resolution
    assert float(sob.basis.min()) >= 0 and float(sob.crop_coefficients.min()) >= 0
    assert float(sob.maps.min()) >= 0 and sob.maps.shape == (5, 3, 16, 16)
    assert sob.upsampled_maps().shape == (5, 3, 16, 16)
    a = sob.crop_coefficients @ sob.basis  # reconstruction of the crops' activations
    assert float(a.min()) >= 0 and sob.reconstruction_error < 0.1


def test_discovery_bad_input() -> None:
    model = TinyCNN().eval()
    x = _randn(6, 3, 8, 8, seed=0)
    with pytest.raises(
        OptionError, match="n_concepts=9 is more than the 8 channels of layer 'act2'"
    ):
        discover(model, x, layer="act2", n_concepts=9, crops_per_image=4)
    with pytest.raises(InputError, match=r"4 dimensions.*unsqueeze"):
        discover(model, x[0], layer="act2", n_concepts=2)
    with pytest.raises(InputError, match="images: inputs contain .* NaN"):
        discover(model, x * float("nan"), layer="act2", n_concepts=2)
    dead = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1))
    )
    with torch.no_grad():
        dead.conv.weight.zero_()
        dead.conv.bias.fill_(-1.0)
    with pytest.raises(LayerError, match="zero on every crop"):
        discover(dead, x, layer="act", target=lambda o: o.sum((1, 2, 3)), n_concepts=2)


# ----------------------------------------------------------------------------- state and randomness


def test_seeded_no_global_rng_and_state_restored_with_a_shared_module() -> None:
    import scipy.stats  # noqa: F401 - imports may draw from the global generators; ours may not
    import sklearn.decomposition  # noqa: F401
    import sklearn.linear_model  # noqa: F401

    model = SharedReLU().train()
    model.conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = copy.deepcopy(model.state_dict())  # BatchNorm running statistics included
    x, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    kw = dict(concepts={"a": pool[:6] + 1}, target=0, random_sets=3, random=pool, classifier="sgd")
    r1 = tcav(model, x, layer=["conv1", "act"], seed=4, **kw)
    d1 = discover(model, x, layer="act", n_concepts=2, crops_per_image=3, designs=4, seed=4)
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    r2 = tcav(model, x, layer=["conv1", "act"], seed=4, **kw)
    d2 = discover(model, x, layer="act", n_concepts=2, crops_per_image=3, designs=4, seed=4)
    for name in r1:
        assert np.array_equal(r1[name].derivatives["a"], r2[name].derivatives["a"])
        assert r1[name].p_values == r2[name].p_values
    assert torch.equal(d1.importance, d2.importance) and torch.equal(d1.maps, d2.maps)
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert model.conv2.weight.grad is None and hook_report(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- bad input


def test_tcav_bad_input_names_the_set() -> None:
    from torch.utils.data import DataLoader

    model = TinyCNN().eval()
    x, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    kw = dict(layer="act2", target=0, random_sets=3, random=pool)
    with pytest.raises(InputError, match=f"at least {MIN_SET_SIZE} are needed \\(MIN_SET_SIZE"):
        tcav(model, x, concepts={"tiny": DataLoader(pool[:3], batch_size=2)}, **kw)
    with pytest.raises(
        OptionError, match=r"set_size must be an integer >= 5 \(images, MIN_SET_SIZE\)"
    ):
        tcav(model, x, concepts={"a": pool[:6]}, set_size=3, **kw)
    with pytest.raises(InputError, match=r"random_sets\[1\] has 4 image"):
        tcav(model, x, layer="act2", concepts={"a": pool[:6]}, random_sets=[pool[:6], pool[:4]])
    with pytest.raises(InputError, match="concept 'n': inputs contain .* NaN"):
        tcav(model, x, concepts={"n": pool[:6] * float("nan")}, **kw)
    with pytest.raises(InputError, match=r"inputs: inputs must have 4 dimensions.*unsqueeze"):
        tcav(model, x[0], concepts={"a": pool[:6]}, **kw)
    with pytest.raises(InputError, match="batch 0 of the data loader is a str"):
        tcav(model, x, concepts={"s": DataLoader(["a", "b"])}, **kw)
    with pytest.raises(InputError, match="listed tensors have different shapes"):
        tcav(model, x, concepts={"m": [pool[0], pool[1, :, :4]]}, **kw)
    with pytest.raises(OptionError, match="concept 'same' vs random set 0: .*zero weight vector"):
        tcav(
            model, x, layer="act2", concepts={"same": pool[:6]}, random_sets=[pool[:6], pool[6:12]]
        )
    with pytest.raises(OptionError, match="distinct"):
        tcav(model, x, concepts={0: pool[:6], "0": pool[6:12]}, **kw)


# ----------------------------------------------------------------------------- Captum oracle


def _same_cav_classifier():
    from captum.concept._utils.classifier import Classifier

    class SameCAV(Classifier):
        """Captum classifier returning perspicio's CAV (fit_cav on Captum's own activations)."""

        def __init__(self) -> None:
            self._w, self._c = None, None

        def train_and_eval(self, dataloader, **kwargs):
            xs, ys = zip(*dataloader)
            x, y = torch.cat(xs), torch.cat(ys)
            first = int(y[0])
            cav = fit_cav(x[y == first], x[y != first])
            self._w = torch.stack([cav.vector, -cav.vector]).float()
            self._c = [first, int(y[y != first][0])]
            return {"accs": torch.tensor(cav.accuracy)}

        def weights(self):
            return self._w

        def classes(self):
            return self._c

    return SameCAV()


@pytest.mark.slow  # captum import and a ResNet-18 at five layers: about 20 s
def test_resnet18_several_layers_equal_captum(tmp_path) -> None:
    """Random-init torchvision ResNet-18 at a 4-D block output, a shared ReLU called twice per
    block (last call, as Captum's hook keeps), 1x1 pooled maps and the 2-D Linear output;
    two concepts, three random sets, target a class index. Same CAVs in both: identical sign
    counts; Captum's 'magnitude' (the mean directional derivative) and each input's derivative
    agree to float32 precision."""
    captum_concept = pytest.importorskip("captum.concept")
    from captum.attr import LayerGradientXActivation
    from scipy import stats

    torchvision = pytest.importorskip("torchvision")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = _randn(6, 3, 32, 32, seed=1)
    concepts = {
        "bright": _randn(6, 3, 32, 32, seed=2) + 0.8,
        "dark": _randn(6, 3, 32, 32, seed=3) - 0.5,
    }
    randoms = [_randn(6, 3, 32, 32, seed=20 + i) for i in range(3)]
    layers = ["layer3", "layer4.1.relu", "layer1.0.relu", "avgpool", "fc"]
    ours = tcav(
        model, x, layer=layers, concepts=concepts, target=3, random_sets=randoms, test="paper"
    )

    ids = itertools.count()
    cc = {n: captum_concept.Concept(next(ids), n, [v]) for n, v in concepts.items()}
    rc = [captum_concept.Concept(next(ids), f"r{i}", [v]) for i, v in enumerate(randoms)]
    n = len(rc)
    sets = [[cc[c], r] for c in concepts for r in rc] + [[rc[i], rc[(i + 1) % n]] for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_concept.TCAV(
            model, layers=layers, classifier=_same_cav_classifier(), save_path=str(tmp_path)
        )
        out = ref.interpret(x, sets, target=3)
    modules = dict(model.named_modules())
    some_fraction = False
    for layer in layers:
        res = ours[layer]
        grads = LayerGradientXActivation(model, modules[layer], multiply_by_inputs=False).attribute(
            x, target=3
        )
        grads = grads.reshape(len(x), -1).double()
        for c in concepts:
            for i, r in enumerate(rc):
                key = f"{cc[c].id}-{r.id}"
                got = out[key][layer]
                count = round(float(got["sign_count"][0]) * len(x))
                assert count == round(res.concept_scores[c][i] * len(x)), (layer, c, i)
                scale = np.abs(res.derivatives[c][i]).max()
                assert (
                    abs(float(got["magnitude"][0]) - res.derivatives[c][i].mean()) <= 1e-3 * scale
                )
                theirs = (grads @ ref.cavs[key][layer].stats["weights"][0].double()).numpy()
                assert np.abs(theirs - res.derivatives[c][i]).max() <= 1e-3 * scale, (layer, c)
                some_fraction |= 0 < res.concept_scores[c][i] < 1
        pairs = [out[f"{rc[i].id}-{rc[(i + 1) % n].id}"][layer]["sign_count"][0] for i in range(n)]
        assert [round(float(p) * len(x)) for p in pairs] == [
            round(s * len(x)) for s in res.random_scores
        ]
        # the paper's test on Captum's scores: scipy's pooled two-sample t-test, two-sided
        null = np.round(np.array([float(p) for p in pairs]) * len(x)) / len(x)
        for c in concepts:
            theirs = [float(out[f"{cc[c].id}-{r.id}"][layer]["sign_count"][0]) for r in rc]
            sc = np.round(np.array(theirs) * len(x)) / len(x)
            if np.ptp(sc) or np.ptp(null):
                want = stats.ttest_ind(sc, null, equal_var=True).pvalue
            else:
                want = float(sc[0] == null[0])
            assert res.p_values[c] == pytest.approx(want, rel=1e-9, abs=1e-12), (layer, c)
    assert some_fraction  # not only all-or-none scores


# ----------------------------------------------------------------------------- figure


def test_tcav_figure_keeps_long_names_apart_and_p_values_above_the_error_bars() -> None:
    """Six concepts sharing a long prefix: before, every name was cut to the same 'a rather long
    c...' and a p-value could sit across its error bar; now the names are wrapped and distinct,
    each p-value is above its bar's error bar and no text leaves the figure or overlaps another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = TinyCNN().eval()
    x, pool = _randn(8, 3, 8, 8, seed=0), _randn(60, 3, 8, 8, seed=1)
    concepts = {
        f"a rather long concept name number {i}": _randn(6, 3, 8, 8, seed=10 + i) + 0.3 * i
        for i in range(6)
    }
    r = tcav(model, x, layer="act2", concepts=concepts, target=1, random_sets=4, random=pool)
    fig = r.figure()
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert [t.replace("\n", " ") for t in ticks] == [*concepts, "random"]
        w, h = fig.bbox.width, fig.bbox.height
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
        boxes += [t.get_window_extent(renderer) for t in ax.texts]
        boxes += [ax.xaxis.label.get_window_extent(renderer), ax.title.get_window_extent(renderer)]
        for b in boxes:
            assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= w and b.y1 <= h
        overlaps = [
            (i, j)
            for i in range(len(boxes))
            for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])
        ]
        assert overlaps == []
        to_data = ax.transData.inverted()
        for i, c in enumerate(concepts):
            bottom = to_data.transform((0, ax.texts[i].get_window_extent(renderer).y0))[1]
            assert bottom >= r.scores[c] + np.std(r.concept_scores[c]), c
    finally:
        plt.close(fig)
