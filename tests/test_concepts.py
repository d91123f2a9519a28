"""perspicio.concepts: TCAV (closed form, Captum oracle, significance test), CRAFT discovery
(synthetic textures), reproducibility, lifecycle and bad input. Tiny models throughout; one slow
test on the bundled model."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import TinyCNN, hook_report
from torch import nn

from perspicio.concepts import MIN_SET_SIZE, concept_maps, discover, fit_cav, tcav
from perspicio.concepts.discovery import jansen_total
from perspicio.concepts.tcav import prediction_t_test, t_test
from perspicio.errors import InputError, LayerError, OptionError

pytest.importorskip("sklearn")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- closed form


def _linear_model(v: torch.Tensor) -> nn.Module:
    """Inputs (N, D, 1, 1) -> layer ``feat`` (identity on the flattened vector) -> logits (v.h, -v.h)."""
    head = nn.Linear(v.numel(), 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.stack([v, -v]))
    return nn.Sequential(OrderedDict(flat=nn.Flatten(), feat=nn.Identity(), head=head)).eval()


def _mirror_sets(d: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept = {n_i + d}, random = {n_i - d} with n_i orthogonal to d: the reflection along d
    swaps the two sets, so the logistic-regression normal is exactly parallel to d."""
    noise = _randn(n, d.numel(), seed=seed)
    u = d / d.norm()
    noise = noise - (noise @ u)[:, None] * u[None]
    return (noise + d)[:, :, None, None], (noise - d)[:, :, None, None]


def test_cav_recovers_the_known_direction_and_tcav_is_one_or_zero() -> None:
    D = 16
    d = torch.zeros(D)
    d[3], d[7] = 0.6, -0.8  # the concept direction in the layer
    concept, rnd0 = _mirror_sets(d, 8, seed=1)
    _, rnd1 = _mirror_sets(d, 8, seed=2)
    cav = fit_cav(concept.flatten(1), rnd0.flatten(1))
    assert torch.allclose(cav.vector, d.double() / d.norm(), atol=1e-6), cav.vector
    assert abs(cav.intercept) < 1e-6 and cav.accuracy == 1.0

    inputs = _randn(10, D, 1, 1, seed=3)
    # target 0's score is v.h: its gradient at the layer is v for every input
    for v, expected in ((d + 0.3 * _randn(D, seed=4) * (d == 0), 1.0), (-d, 0.0)):
        model = _linear_model(v)
        r = tcav(
            model,
            inputs,
            layer="feat",
            concepts={"c": concept},
            target=0,
            random_sets=[rnd0, rnd1, rnd0 * 0.5, rnd1 * 0.5],
        )
        assert np.all(r.concept_scores["c"] == expected), r.concept_scores
        assert r.scores["c"] == expected


def test_t_test_and_jansen_estimator_closed_forms() -> None:
    from scipy import stats

    a, b = np.array([0.9, 0.8, 1.0, 0.7]), np.array([0.5, 0.4, 0.6, 0.3])
    assert t_test(a, b) == pytest.approx(stats.ttest_ind(a, b).pvalue, rel=1e-12)
    assert t_test(np.ones(4), np.ones(4)) == 1.0 and t_test(np.ones(4), np.zeros(4)) == 0.0
    # prediction interval: t = (x - mean) / (sd sqrt(1 + 1/n)), n - 1 dof
    sample = np.array([0.4, 0.5, 0.6, 0.5, 0.45])
    t = (0.9 - sample.mean()) / (sample.std(ddof=1) * np.sqrt(1 + 1 / 5))
    assert prediction_t_test(0.9, sample) == pytest.approx(2 * stats.t.sf(t, 4), rel=1e-12)
    # f(u) = u_0 on uniform inputs: total index 1 for u_0, 0 for u_1 (exact for the Jansen form)
    rng = np.random.default_rng(0)
    A, B = rng.random((4096, 2)), rng.random((4096, 2))
    f_ab = np.stack([np.where(np.arange(2)[:, None] == i, B.T, A.T)[0] for i in range(2)])
    st = jansen_total(A[:, 0], B[:, 0], f_ab)
    assert st[0] == pytest.approx(1.0, abs=0.05) and st[1] == 0.0


# ----------------------------------------------------------------------------- Captum oracle


def _captum_classifier():
    from captum.concept._utils.classifier import Classifier

    class SameCAV(Classifier):
        """Captum classifier that fits perspicio's CAV (concept = the first concept of the set)."""

        def __init__(self) -> None:
            self._w = None
            self._classes = None

        def train_and_eval(self, dataloader, **kwargs):
            xs, ys = zip(*dataloader)
            x, y = torch.cat(xs), torch.cat(ys)
            first = int(y[0])
            other = int(y[y != first][0])
            cav = fit_cav(x[y == first], x[y != first])
            self._w = torch.stack([cav.vector, -cav.vector]).float()
            self._classes = [first, other]
            return {"accs": torch.tensor(cav.accuracy)}

        def weights(self):
            return self._w

        def classes(self):
            return self._classes

    return SameCAV()


@pytest.mark.slow  # importing captum alone takes seconds
def test_tcav_scores_equal_captum(tmp_path) -> None:
    captum_tcav = pytest.importorskip("captum.concept")
    model = TinyCNN().eval()
    inputs = _randn(12, 3, 8, 8, seed=10)
    concepts = {
        "bright": _randn(8, 3, 8, 8, seed=11) + 0.8,
        "dark": _randn(8, 3, 8, 8, seed=12) - 0.5,
    }
    randoms = [_randn(8, 3, 8, 8, seed=20 + i) for i in range(5)]
    ours = tcav(
        model, inputs, layer="act1", concepts=concepts, target=2, random_sets=randoms, test="paper"
    )

    ids = itertools.count()
    cc = {n: captum_tcav.Concept(next(ids), n, [x]) for n, x in concepts.items()}
    rc = [captum_tcav.Concept(next(ids), f"random{i}", [x]) for i, x in enumerate(randoms)]
    n = len(rc)
    sets = [[cc[c], r] for c in concepts for r in rc] + [[rc[i], rc[(i + 1) % n]] for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_tcav.TCAV(
            model, layers=["act1"], classifier=_captum_classifier(), save_path=str(tmp_path)
        )
        out = ref.interpret(inputs, sets, target=2)

    def key(a, b):
        return f"{a.id}-{b.id}"

    def counts(fractions):  # inputs with a positive directional derivative
        return np.round(np.asarray(fractions, dtype=np.float64) * len(inputs)).astype(int).tolist()

    for c in concepts:
        theirs = [float(out[key(cc[c], r)]["act1"]["sign_count"][0]) for r in rc]
        assert counts(ours.concept_scores[c]) == counts(theirs), c  # Captum's fractions are float32
        vec = ref.cavs[key(cc[c], rc[0])]["act1"].stats["weights"][0].double()
        assert torch.allclose(vec, ours.cavs[c][0].vector, atol=1e-6)
    theirs = [float(out[key(rc[i], rc[(i + 1) % n])]["act1"]["sign_count"][0]) for i in range(n)]
    assert counts(ours.random_scores) == counts(theirs)
    every = np.concatenate([*ours.concept_scores.values(), ours.random_scores])
    assert np.any((every > 0) & (every < 1)), every  # not only all-or-none scores


# ----------------------------------------------------------------------------- significance test


@pytest.mark.slow
def test_false_positive_rate_of_random_concepts_near_nominal() -> None:
    """Random 'concepts' (drawn from the same pool as the random sets) are declared significant at
    about the nominal rate alpha = 0.05 by the default test; a real concept is."""
    model = TinyCNN().eval()
    inputs = _randn(40, 3, 6, 6, seed=0)
    pool = _randn(400, 3, 6, 6, seed=1)
    trials, hits = 100, 0
    for t in range(trials):
        g = np.random.default_rng(1000 + t)
        concept = pool[torch.from_numpy(g.choice(len(pool), 10, replace=False))]
        r = tcav(
            model,
            inputs,
            layer="act1",
            concepts={"r": concept},
            target=0,
            random_sets=6,
            random=pool,
            seed=t,
        )
        hits += r.significant["r"]
    # binomial(100, 0.05) exceeds 0.11 with probability 0.006; Kim et al.'s two-sample test on the
    # same simulation rejects about 25% (docs/concepts.md)
    assert hits / trials <= 0.11, hits / trials
    shifted = _randn(10, 3, 6, 6, seed=2) + torch.tensor([1.0, -1.0, 0.5])[:, None, None]
    r = tcav(
        model, inputs, layer="act1", concepts={"c": shifted}, target=0, random_sets=6, random=pool
    )
    assert r.significant["c"], (r.scores, r.p_values)


# ----------------------------------------------------------------------------- discovery


def _textures(size: int) -> list[np.ndarray]:
    """Three known textures: horizontal stripes, vertical stripes (period 4), flat bright."""
    yy, xx = np.mgrid[0:size, 0:size]
    return [
        ((yy // 2) % 2).astype(np.float32),
        ((xx // 2) % 2).astype(np.float32),
        np.full((size, size), 0.9, dtype=np.float32),
    ]


def _mosaics(n: int, tile: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` images of 2x2 tiles, each tile one texture; returns images and the texture map."""
    rng = np.random.default_rng(seed)
    tex = _textures(tile)
    imgs, labels = [], []
    for _ in range(n):
        lab = rng.integers(0, 3, size=(2, 2))
        img = np.block([[tex[lab[0, 0]], tex[lab[0, 1]]], [tex[lab[1, 0]], tex[lab[1, 1]]]])
        img = img + 0.05 * rng.standard_normal(img.shape).astype(np.float32)
        imgs.append(np.repeat(img[None], 3, axis=0))
        labels.append(np.kron(lab, np.ones((tile, tile), dtype=np.int64)))
    return torch.from_numpy(np.stack(imgs)), np.stack(labels)


def _texture_model() -> nn.Module:
    """Fixed filters that answer the three textures: horizontal edges (two signs), vertical
    edges (two signs), brightness above 0.6 - then ReLU."""
    conv = nn.Conv2d(3, 5, 3, padding=1)
    h = torch.tensor([[1.0, 1, 1], [0, 0, 0], [-1, -1, -1]]) / 3
    flat = torch.full((3, 3), 1.0 / 9)
    w = torch.stack([h, -h, h.T, -h.T, flat])[:, None].repeat(1, 3, 1, 1) / 3
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(torch.tensor([0.0, 0, 0, 0, -0.6]))
    layers = OrderedDict(
        conv=conv,
        act=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        fc=nn.Linear(5, 2),
    )
    return nn.Sequential(layers).eval()


def texture_matching(result, labels: np.ndarray) -> tuple[float, float]:
    """(crop accuracy, map accuracy) of the best one-to-one matching concepts <-> textures:
    each crop's largest coefficient against the texture covering most of the crop, and each
    map position's largest coefficient against the texture there."""
    boxes = result.crop_boxes.numpy()
    truth = []
    for i, t, left, s in boxes:
        truth.append(
            np.bincount(labels[i, t : t + s, left : left + s].ravel(), minlength=3).argmax()
        )
    truth = np.array(truth)
    pred = result.crop_coefficients.argmax(dim=1).numpy()
    n, _, h, w = result.maps.shape
    step = labels.shape[1] // h
    map_truth = labels[:, step // 2 :: step, step // 2 :: step]
    map_pred = result.maps.argmax(dim=1).numpy()
    best_crop = best_map = 0.0
    for perm in itertools.permutations(range(3)):
        p = np.array(perm)
        best_crop = max(best_crop, float(np.mean(p[pred] == truth)))
        best_map = max(best_map, float(np.mean(p[map_pred] == map_truth)))
    return best_crop, best_map


def test_discovery_recovers_known_textures() -> None:
    x, labels = _mosaics(12, tile=16, seed=0)
    model = _texture_model()
    r = discover(
        model,
        x,
        layer="act",
        target=0,
        n_concepts=3,
        crops_per_image=12,
        crop_size=8,
        importance="gradient_input",
        seed=0,
    )
    crop_acc, map_acc = texture_matching(r, labels)
    assert crop_acc >= 0.9, crop_acc
    assert map_acc >= 0.85, map_acc
    assert r.reconstruction_error < 0.2
    # the maps of new images use the same concepts
    maps = concept_maps(model, x[:2], r)
    assert torch.allclose(maps, r.maps[:2], rtol=1e-2, atol=1e-3)  # NNLS to solver tolerance


def test_sobol_importance_ranks_the_concept_the_class_reads() -> None:
    """The class score reads only the vertical-stripe filters: that texture's concept carries
    the largest total Sobol index; the others are near zero."""
    x, labels = _mosaics(4, tile=16, seed=1)
    model = _texture_model()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[0, 2:4] = 1.0
        model.fc.bias.zero_()
    r = discover(
        model,
        x,
        layer="act",
        target=0,
        n_concepts=3,
        crops_per_image=12,
        crop_size=8,
        designs=16,
        seed=0,
    )
    top = r.top_crops(10)[0]  # the most important concept's crops
    boxes = r.crop_boxes[top].numpy()
    tex = [
        np.bincount(labels[i, t : t + s, lf : lf + s].ravel(), minlength=3).argmax()
        for i, t, lf, s in boxes
    ]
    assert np.mean(np.array(tex) == 1) >= 0.9, tex
    assert float(r.importance[0]) > 0.5 and float(r.importance[1:].max()) < 0.1, r.importance


# ----------------------------------------------------------------------------- reproducibility


def test_seeded_runs_are_bit_reproducible() -> None:
    model = TinyCNN().eval()
    inputs, pool = _randn(8, 3, 8, 8, seed=0), _randn(40, 3, 8, 8, seed=1)
    concepts = {"a": _randn(6, 3, 8, 8, seed=2) + 1}
    kw = dict(layer="act2", concepts=concepts, target=1, random_sets=4, random=pool)
    r1, r2 = tcav(model, inputs, seed=3, **kw), tcav(model, inputs, seed=3, **kw)
    assert np.array_equal(r1.concept_scores["a"], r2.concept_scores["a"])
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(r1.cavs["a"], r2.cavs["a"]))
    assert r1.p_values == r2.p_values
    r3 = tcav(model, inputs, seed=4, **kw)
    assert not all(torch.equal(a.vector, b.vector) for a, b in zip(r1.cavs["a"], r3.cavs["a"]))

    x, _ = _mosaics(4, tile=8, seed=0)
    kw2 = dict(
        layer="act2", target=0, n_concepts=3, crops_per_image=6, crop_size=8, designs=8, seed=5
    )
    d1, d2 = discover(model, x, **kw2), discover(model, x, **kw2)
    for f in ("basis", "crop_coefficients", "crops", "maps", "importance"):
        assert torch.equal(getattr(d1, f), getattr(d2, f)), f


# ----------------------------------------------------------------------------- lifecycle


def test_model_state_restored_and_no_hooks_left() -> None:
    model = TinyCNN().train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv1.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    inputs, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    tcav(
        model,
        inputs,
        layer="act2",
        concepts={"a": pool[:6] + 1},
        target=0,
        random_sets=3,
        random=pool,
    )
    discover(model, inputs, layer="act2", target=0, n_concepts=2, crops_per_image=4, designs=4)

    def boom(out):
        raise RuntimeError("target failed")

    with pytest.raises(Exception, match="target failed"):
        tcav(
            model,
            inputs,
            layer="act2",
            concepts={"a": pool[:6]},
            target=boom,
            random_sets=3,
            random=pool,
        )
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert model.conv2.weight.grad is None
    assert hook_report(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_inputs_not_modified() -> None:
    model = TinyCNN().eval()
    inputs, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    copies = inputs.clone(), pool.clone()
    tcav(
        model, inputs, layer="act2", concepts={"a": pool[:6]}, target=0, random_sets=3, random=pool
    )
    discover(model, pool, layer="act2", target=0, n_concepts=2, crops_per_image=2, designs=4)
    assert torch.equal(inputs, copies[0]) and torch.equal(pool, copies[1])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(tmp_path) -> None:
    model = TinyCNN().eval()
    inputs, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    kw = dict(layer="act2", target=0, random_sets=3, random=pool)
    small = pool[: MIN_SET_SIZE - 1]
    with pytest.raises(
        InputError, match=f"concept 'tiny' has {MIN_SET_SIZE - 1} image.*at least {MIN_SET_SIZE}"
    ):
        tcav(model, inputs, concepts={"tiny": small}, **kw)
    with pytest.raises(OptionError, match="at least 2 random sets"):
        tcav(model, inputs, layer="act2", concepts={"a": pool[:6]}, random_sets=[pool[:6]])
    with pytest.raises(OptionError, match="random="):
        tcav(model, inputs, layer="act2", concepts={"a": pool[:6]}, random_sets=4)
    with pytest.raises(InputError, match="pool of at least 10"):
        tcav(
            model,
            inputs,
            layer="act2",
            concepts={"a": _randn(10, 3, 8, 8, seed=3)},
            random_sets=3,
            random=pool[:7],
        )
    with pytest.raises(OptionError, match="layer= is required"):
        tcav(model, inputs, layer=None, concepts={"a": pool[:6]}, random_sets=3, random=pool)
    with pytest.raises(LayerError, match="act2"):
        tcav(model, inputs, concepts={"a": pool[:6]}, **{**kw, "layer": "act_2"})
    with pytest.raises(OptionError, match="classifier"):
        tcav(model, inputs, concepts={"a": pool[:6]}, classifier="svm", **kw)
    with pytest.raises(OptionError, match="non-empty mapping"):
        tcav(model, inputs, concepts={}, **kw)
    with pytest.raises(InputError, match="holds no image files"):
        tcav(model, inputs, concepts={"a": str(tmp_path)}, preprocess=lambda x: x, **kw)
    with pytest.raises(OptionError, match="preprocess="):
        tcav(model, inputs, concepts={"a": str(tmp_path)}, **kw)
    with pytest.raises(LayerError, match="spatial dimensions"):
        discover(model, inputs, layer="fc", n_concepts=2)
    with pytest.raises(LayerError, match="negative activations"):
        discover(model, inputs, layer="conv2", n_concepts=2)
    with pytest.raises(OptionError, match="power of two"):
        discover(model, inputs, layer="act2", n_concepts=2, designs=12)
    with pytest.raises(OptionError, match="crop_size"):
        discover(model, inputs, layer="act2", n_concepts=2, crop_size=9)
    with pytest.raises(OptionError, match="importance"):
        discover(model, inputs, layer="act2", importance="shap")


# ----------------------------------------------------------------------------- figures and CLI


def test_figures_and_json(tmp_path) -> None:
    import json

    model = TinyCNN().eval()
    inputs, pool = _randn(6, 3, 8, 8, seed=0), _randn(30, 3, 8, 8, seed=1)
    r = tcav(
        model,
        inputs,
        layer="act2",
        concepts={"a": pool[:6] + 1, "b": pool[6:12]},
        target=0,
        random_sets=3,
        random=pool,
    )
    png, js = r.save(tmp_path, "t")
    data = json.loads(js.read_text())
    assert set(data["concepts"]) == {"a", "b"} and png.stat().st_size > 1000
    assert data["concepts"]["a"]["p_value_bonferroni"] == min(1.0, 2 * r.p_values["a"])
    d = discover(
        model, pool[:6], layer="act2", target=0, n_concepts=2, crops_per_image=2, designs=4
    )
    paths = d.save(tmp_path, "d")
    assert [p.name for p in paths] == ["d_gallery.png", "d_maps.png", "d.json"]
    assert len(json.loads(paths[2].read_text())["concepts"]) == 2


def _concept_folders(root, seed: int) -> None:
    """PNG folders for the TCAV CLI: 6 inputs, 'bright' and 'dark' concepts, a pool of 20 randoms."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def folder(path, n, shift=0):
        path.mkdir(parents=True)
        for i in range(n):
            arr = np.clip(rng.normal(128 + shift, 60, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(path / f"{i}.png")

    folder(root / "inputs", 6)
    folder(root / "concepts" / "bright", 6, 80)
    folder(root / "concepts" / "dark", 6, -80)
    folder(root / "random", 20)


@pytest.mark.slow
def test_cli_tcav_and_discover(tmp_path) -> None:
    from perspicio.cli import main

    _concept_folders(tmp_path, seed=0)
    out = tmp_path / "out"
    code = main(
        [
            "concepts",
            "tcav",
            str(tmp_path / "inputs"),
            "--model",
            "conftest:TinyCNN",
            "--concepts",
            str(tmp_path / "concepts"),
            "--random",
            str(tmp_path / "random"),
            "--target",
            "1",
            "--layer",
            "act2",
            "--random-sets",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and (out / "tcav.png").exists() and (out / "tcav.json").exists()
    code = main(
        [
            "concepts",
            "discover",
            str(tmp_path / "inputs"),
            "--model",
            "conftest:TinyCNN",
            "--target",
            "1",
            "--layer",
            "act2",
            "--concepts",
            "2",
            "--crops-per-image",
            "3",
            "--designs",
            "4",
            "--out",
            str(out),
        ]
    )
    assert (
        code == 0 and (out / "concepts_gallery.png").exists() and (out / "concepts.json").exists()
    )
    assert (
        main(
            [
                "concepts",
                "discover",
                str(tmp_path / "inputs"),
                "--model",
                "conftest:TinyCNN",
                "--layer",
                "fc",
                "--out",
                str(out),
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_cli_tcav_several_layers_one_chart_each_equal_to_single_runs(tmp_path) -> None:
    import json

    from perspicio.cli import main

    _concept_folders(tmp_path, seed=1)

    def run(layer, out):
        args = ["concepts", "tcav", str(tmp_path / "inputs"), "--model", "conftest:TinyCNN"]
        args += ["--concepts", str(tmp_path / "concepts"), "--random", str(tmp_path / "random")]
        args += ["--target", "1", "--layer", layer, "--random-sets", "3", "--out", str(out)]
        return main(args)

    assert run("act1, act2", tmp_path / "both") == 0
    names = sorted(p.name for p in (tmp_path / "both").iterdir())
    assert names == ["tcav_act1.json", "tcav_act1.png", "tcav_act2.json", "tcav_act2.png"]
    for layer in ("act1", "act2"):
        assert run(layer, tmp_path / layer) == 0
        one = json.loads((tmp_path / layer / "tcav.json").read_text())
        both = json.loads((tmp_path / "both" / f"tcav_{layer}.json").read_text())
        for data in (one, both):
            data.pop("timings_s")
        assert both["layer"] == layer and both == one
    assert run("act1,nope", tmp_path / "bad") == 2


# ----------------------------------------------------------------------------- bundled model


@pytest.mark.slow
def test_bundled_example_on_efficientnet(zoo_model) -> None:
    """The offline example as documented (12 inputs, 12 images per concept, 10 random sets from a
    pool of 60): gravel raises 'Egyptian cat' at _blocks.10, grass lowers it."""
    from perspicio.zoo.concept_sets import example_sets

    ex = example_sets()
    r = tcav(
        zoo_model,
        ex["inputs"],
        layer="_blocks.10",
        concepts=ex["concepts"],
        target=ex["target"],
        random_sets=10,
        random=ex["random"],
    )
    assert r.target == "285 (Egyptian cat)"
    assert r.scores["gravel"] > 0.9 and r.scores["grass"] < 0.1, r.scores
    # exchangeable test, 10 random sets: p = 0.034 (gravel), 0.043 (grass), 0.27 (brick); below 0.05
    # but not below the Bonferroni level 0.05 / 3
    assert (
        r.p_values["gravel"] < 0.05 and r.p_values["grass"] < 0.05 and r.p_values["brick"] > 0.05
    ), r.p_values


def test_concepts_package_layering() -> None:
    """concepts/ imports core, errors and viz only (no methods, metrics, cli, zoo, facade)."""
    import ast
    from pathlib import Path

    import perspicio.concepts

    root = Path(perspicio.concepts.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                top = (node.module or "").split(".")[0]
                assert top in ("core", "errors", "viz"), (path.name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("perspicio"), (path.name, node.module)
