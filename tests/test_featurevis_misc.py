"""Kernels, feature maps, projections, transform sensitivity, the digits demo, figures, CLI and
lifecycle of the feature-visualisation tools."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from perspicio import featurevis as fv
from perspicio.errors import LayerError, OptionError


@pytest.fixture(scope="module")
def digits():
    from perspicio.zoo.digits import digits_data, load_digits_cnn

    x, y = digits_data("test")
    return load_digits_cnn(), x, y


# ----------------------------------------------------------------------------- kernels


def test_kernels_exact_scaling() -> None:
    m = nn.Sequential(nn.Conv2d(3, 2, 2, bias=False), nn.Conv2d(2, 1, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.arange(24, dtype=torch.float).view(2, 3, 2, 2) - 12)
        m[1].weight.copy_(torch.tensor([[[[2.0]], [[-1.0]]]]))
    k = fv.kernels(m)
    assert k.layer == "0" and k.rgb and k.tiles.shape == (2, 2, 2, 3)
    w = m[0].weight.detach()
    torch.testing.assert_close(k.tiles, (w / 12 * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    assert float(k.tiles[0, 0, 0, 0]) == 0.0  # -12 -> 0; zero -> 0.5
    per = fv.kernels(m, "0", per_filter=True)
    torch.testing.assert_close(per.scale, torch.tensor([12.0, 11.0]))
    deep = fv.kernels(m, "1")
    assert not deep.rgb and deep.tiles.shape == (1, 2, 1, 1)
    torch.testing.assert_close(deep.tiles.flatten(), torch.tensor([1.0, 0.25]))
    with pytest.raises(LayerError, match="Conv2d"):
        fv.kernels(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(OptionError):
        fv.kernels(m, "1", rgb=True)


# ----------------------------------------------------------------------------- feature maps


def test_feature_maps_top_k_and_placement(digits, assert_no_hooks) -> None:
    demo, x, _ = digits
    fm = fv.feature_maps(demo, x[:3], "act1", top_k=4, index=1)
    with torch.no_grad():
        a = demo.model.act1(demo.model.conv1(x[1:2]))[0]
    torch.testing.assert_close(fm.activations, a)
    expected = torch.sort(a.mean(dim=(1, 2)), descending=True, stable=True).indices[:4]
    assert torch.equal(fm.channels, expected)
    # conv 3x3 pad 1 keeps the grid: each cell's field is centred on its own pixel
    torch.testing.assert_close(fm.placed, fm.maps)
    chosen = fv.feature_maps(demo, x[:1], "act2", channels=[0, 5])
    assert chosen.channels.tolist() == [0, 5]
    with pytest.raises(OptionError, match="channel 40 is out of range"):
        fv.feature_maps(demo, x[:1], "act2", channels=[40])
    with pytest.raises(LayerError, match="spatial|feature maps"):
        fv.feature_maps(demo, x[:1], "fc")
    assert_no_hooks(demo.model)


def test_place_on_input_uses_field_centres() -> None:
    rf = fv.ReceptiveField("l", start=(-1.0, -1.0), jump=(2.0, 2.0), size=(4.0, 4.0), grid=(3, 3), input_size=(6, 6))
    maps = torch.arange(9, dtype=torch.float).view(1, 3, 3)
    placed = fv.place_on_input(maps, rf, (6, 6))
    # cell i's centre is at pixel 2i + 0.5: pixels 0..1 around cell 0 mix cells 0 and 1 equally at 1.5
    torch.testing.assert_close(placed[0, 0, :], torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.0]))


# ----------------------------------------------------------------------------- projection


def test_pca_matches_sklearn_and_projection(digits) -> None:
    from sklearn.decomposition import PCA

    demo, x, y = digits
    p = fv.project(demo, x, "act3", labels=y, thumbnails=8, batch_size=64)
    assert p.coords.shape == (len(x), 2) and p.thumbnails.shape == (len(x), 1, 8, 8)
    with torch.no_grad():
        feats = demo.model.act3(demo.model.conv3(demo.model.pool(demo.model.act2(demo.model.conv2(
            demo.model.act1(demo.model.conv1(x))))))).mean(dim=(2, 3))
    torch.testing.assert_close(p.features, feats, atol=1e-5, rtol=1e-5)
    ref = PCA(n_components=2).fit(feats.double().numpy())
    scores = torch.from_numpy(ref.transform(feats.double().numpy())).float()
    for c in range(2):  # equal up to the sign of each component
        s = math.copysign(1.0, float((scores[:, c] * p.coords[:, c]).sum()))
        torch.testing.assert_close(p.coords[:, c], s * scores[:, c], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(p.explained_variance, torch.from_numpy(ref.explained_variance_ratio_).float())
    assert torch.equal(p.labels, y)
    assert float((p.predictions == y).float().mean()) > 0.9
    # digits cluster by class: nearest neighbour in 2-D PCA of the last conv layer
    d = torch.cdist(p.coords, p.coords) + torch.eye(len(x)) * 1e9
    assert float((y[d.argmin(1)] == y).float().mean()) > 0.5


def test_tsne_from_dataloader_and_errors(digits) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    demo, x, y = digits
    loader = DataLoader(TensorDataset(x[:60], y[:60]), batch_size=16)
    p = fv.project(demo, loader, "act3", method="tsne", predict=False, seed=0)
    q = fv.project(demo, loader, "act3", method="tsne", predict=False, seed=0)
    assert p.coords.shape == (60, 2) and torch.equal(p.labels, y[:60]) and p.predictions is None
    torch.testing.assert_close(p.coords, q.coords)  # seeded
    with pytest.raises(OptionError, match="method"):
        fv.project(demo, x, "act3", method="mds")
    with pytest.raises(OptionError, match="pool"):
        fv.project(demo, x, "act3", pool="median")


# ----------------------------------------------------------------------------- sensitivity


class SumModel(nn.Module):
    """Output (N, 2): [sum of pixels, -sum of pixels]."""

    def __init__(self) -> None:
        super().__init__()
        self.id = nn.Identity()

    def forward(self, x):
        s = self.id(x).flatten(1).sum(1)
        return torch.stack([s, -s], dim=1)


def test_occlusion_map_exact_and_curves() -> None:
    x = torch.ones(1, 1, 6, 6)
    s = fv.sensitivity(SumModel(), x, 0, window=2, stride=2, scales=(1.0, 2.0), shifts=(0.0, 0.5), angles=(0.0, 90.0))
    assert s.base_score == 36.0
    torch.testing.assert_close(s.occlusion.scores, torch.full((3, 3), 32.0))
    torch.testing.assert_close(s.occlusion.placed, torch.full((6, 6), 32.0))
    sc = s.curves["scale"].scores
    torch.testing.assert_close(sc[0], torch.tensor(36.0), atol=1e-4, rtol=0)
    assert float(sc[1]) == pytest.approx(36.0, abs=1e-4)  # zooming in keeps the image full of ones
    tr = s.curves["translation"].scores
    assert float(tr[1]) == pytest.approx(18.0, abs=1e-4)  # half the image shifted out, zero fill
    rot = s.curves["rotation"].scores
    assert float(rot[1]) == pytest.approx(36.0, abs=1e-3)  # a square rotated by 90 degrees
    prob = s.curves["rotation"].probabilities
    assert prob is not None and float(prob[0]) == pytest.approx(1.0)


def test_affine_geometry() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 5] = 1.0
    r = fv.affine(x, shift=(0.25, 0.0))  # 2 pixels to the right
    assert tuple(torch.nonzero(r[0, 0] > 0.99)[0].tolist()) == (2, 7)
    torch.testing.assert_close(fv.affine(x), x)


def test_sensitivity_on_digits_and_errors(digits) -> None:
    demo, x, y = digits
    s = fv.sensitivity(demo, x[:1], window=3, stride=1)
    assert s.occlusion.scores.shape == (6, 6)
    assert s.target_index == int(y[0])
    assert int(s.curves["scale"].predictions[4]) == int(y[0])  # scale 1.0 is the input itself
    with pytest.raises(OptionError, match="window"):
        fv.sensitivity(demo, x[:1], window=9)


# ----------------------------------------------------------------------------- digits demo


def test_digits_demo_deterministic_and_accurate(digits, tmp_path, monkeypatch) -> None:
    from perspicio.zoo import digits as dg

    state = torch.get_rng_state()
    a = dg.train_digits_cnn(seed=3, epochs=1)
    b = dg.train_digits_cnn(seed=3, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)  # local generators only
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    demo = digits[0]
    assert dg.accuracy(demo) > 0.93
    # cache round trip under $PERSPICIO_CACHE
    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path))
    path = tmp_path / "digits" / f"digits_cnn_v{dg.VERSION}_seed0.pt"
    path.parent.mkdir(parents=True)
    torch.save(demo.model.state_dict(), path)
    again = dg.load_digits_cnn()
    for va, vb in zip(demo.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(va, vb)
    assert torch.equal(torch.get_rng_state(), state)
    x, y = dg.digits_data("test")
    assert x.shape == (297, 1, 8, 8) and len(y) == 297
    px = dg.digits_data("all", pixels=True)[0]
    assert float(px.min()) == 0.0 and float(px.max()) == 1.0


# ----------------------------------------------------------------------------- figures, lifecycle, CLI


def test_figures_build(digits) -> None:
    from perspicio.viz import featurevis_plots as fp

    demo, x, y = digits
    figs = [
        fp.kernels_figure(fv.kernels(demo)),
        fp.kernels_figure(fv.kernels(demo, "conv2")),
        fp.feature_maps_figure(fv.feature_maps(demo, x[:1], "act1", top_k=3)),
        fp.top_activating_figure(fv.top_activating(demo, x[:40], "act2", 1, k=3)),
        fp.projection_figure(fv.project(demo, x[:40], "act3", labels=y[:40], thumbnails=8)),
        fp.sensitivity_figure(fv.sensitivity(demo, x[:1], window=3, stride=2)),
    ]
    res = fv.attack(demo, x[:1], epsilon=0.2, steps=3)
    figs.append(fp.adversarial_figure(res, fv.explanation_change(demo, res), demo.labels))
    figs.append(fp.maximize_figure(fv.maximize(demo, [1, 2], batch=2, shape=(1, 8, 8), steps=3), demo.labels))
    figs.append(fp.inversion_figure(fv.invert(demo, x[:1], "act1", steps=3)))
    assert all(len(f.axes) > 0 for f in figs)


def test_lifecycle_after_exception(digits, assert_no_hooks) -> None:
    demo, x, _ = digits
    model = demo.model
    x0 = x.clone()
    model.train()
    try:
        for call in (
            lambda: fv.top_activating(demo, x, "act2", 77),
            lambda: fv.feature_maps(demo, x, "act2", channels=[77]),
            lambda: fv.invert(demo, x[:1], "act2", steps=0),
            lambda: fv.project(demo, x[:2], "act3"),
        ):
            with pytest.raises((OptionError, LayerError)):
                call()
            assert_no_hooks(model)
            assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert torch.equal(x, x0)
    finally:
        model.eval()


def test_cli_digits(tmp_path) -> None:
    from perspicio.cli import main

    out = tmp_path / "o"
    assert main(["features", "kernels", "-m", "digits", "-o", str(out)]) == 0
    assert main(["features", "top", "-m", "digits", "--target", "3", "--k", "4", "-o", str(out), "--no-progress"]) == 0
    top = json.loads((out / "top.json").read_text())
    assert top["scanned"] == 297 and len(top["values"]) == 4
    assert main(["features", "maximize", "-m", "digits", "--target", "4", "--steps", "30", "-o", str(out), "--no-progress"]) == 0
    mx = json.loads((out / "maximize.json").read_text())
    assert mx["target"] == [4] and 0 <= mx["target_probability"][0] <= 1
    assert (out / "maximize_0.png").is_file()
    assert main(["features", "attack", "digit:3", "-m", "digits", "--epsilon", "0.3", "-o", str(out)]) == 0
    at = json.loads((out / "digit3_attack.json").read_text())
    assert at["linf"] <= 0.3 and "explanation" in at
    assert main(["features", "project", "-m", "digits", "-o", str(out), "--no-progress"]) == 0
    assert main(["features", "sensitivity", "digit:1", "-m", "digits", "-o", str(out), "--no-progress"]) == 0
    assert main(["features", "invert", "digit:1", "-m", "digits", "--steps", "5", "-o", str(out), "--no-progress"]) == 0
    assert main(["features", "maps", "digit:1", "-m", "digits", "--channels", "1,2", "-o", str(out)]) == 0
    for name in ("kernels", "top", "maximize", "digit3_attack", "projection_pca", "digit1_sensitivity", "digit1_invert", "digit1_maps"):
        assert (out / f"{name}.png").is_file() and (out / f"{name}.json").is_file(), name
    # bad input: one-line error, exit status 2
    assert main(["features", "top", "-m", "digits", "--target", "99", "-o", str(out), "--no-progress"]) == 2
    assert main(["features", "top", str(tmp_path / "empty"), "-m", "digits", "-o", str(out)]) == 2
    assert main(["features", "attack", "-m", "digits", "--epsilon", "two", "-o", str(out)]) == 2


def test_cli_bundled_kernels_and_maps(tmp_path) -> None:
    from perspicio.cli import main

    assert main(["features", "kernels", "-o", str(tmp_path)]) == 0
    k = json.loads((tmp_path / "kernels.json").read_text())
    assert k["layer"] == "_conv_stem" and k["rgb"] and k["shape"] == [32, 3, 3, 3]
    assert main(["features", "maps", "chelsea", "--layer", "_blocks.2", "--top-k", "4", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "chelsea_maps.png").is_file()
