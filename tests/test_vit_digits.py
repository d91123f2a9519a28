"""The tiny ViT trained on scikit-learn's digits (zoo/vit.py): training, cache, and explanations
whose behaviour needs a trained transformer (maps on the strokes, deletion better than random)."""

from __future__ import annotations

import pytest
import torch

import perspicio
from perspicio import metrics, zoo
from perspicio.zoo import vit as zvit

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits_vit():
    from perspicio.zoo.digits import digits_data

    demo = zoo.load("digits_vit")  # trained once per cache directory (seconds), then loaded
    x, y = digits_data("test")
    px, _ = digits_data("test", pixels=True)
    return demo, x[:48], y[:48], px[:48]


@pytest.mark.slow
def test_training_is_deterministic_and_leaves_global_state(monkeypatch) -> None:
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    a = zvit.train_digits_vit(seed=3, epochs=1)
    b = zvit.train_digits_vit(seed=3, epochs=1)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not a.training and all(p.grad is None for p in a.parameters())
    c = zvit.train_digits_vit(seed=4, epochs=1)
    assert not torch.equal(c.head.weight, a.head.weight)


def test_cache_round_trip_and_corrupt_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path))
    real, calls = zvit.train_digits_vit, []

    def quick(seed: int = 0, epochs: int = 30):
        calls.append(seed)
        return real(seed, epochs=1)

    monkeypatch.setattr(zvit, "train_digits_vit", quick)
    first = zvit.load_digits_vit(seed=5)
    path = tmp_path / "digits" / f"digits_vit_v{zvit.VERSION}_seed5.pt"
    assert path.is_file() and calls == [5]
    again = zvit.load_digits_vit(seed=5)
    assert calls == [5]  # read from the cache, not trained again
    assert torch.equal(again.model.head.weight, first.model.head.weight)
    path.write_bytes(b"not a state dict")
    rebuilt = zvit.load_digits_vit(seed=5)
    assert calls == [5, 5] and torch.equal(rebuilt.model.head.weight, first.model.head.weight)
    untrained = zoo.load("digits_vit", pretrained=False)
    assert calls == [5, 5] and untrained.name == "digits_vit" and untrained.labels[3] == "3"
    assert "digits_vit" in zoo.models()


@pytest.mark.slow
def test_the_trained_vit_is_accurate(digits_vit) -> None:
    from perspicio.zoo.digits import accuracy

    assert accuracy(digits_vit[0]) > 0.93


def _ink_vs_empty(a: torch.Tensor, px: torch.Tensor) -> tuple[float, float, float]:
    """Mean max-normalised relevance on stroke pixels (> 0.5) and on empty pixels (== 0), and the
    fraction of images where the strokes get more."""
    a = a.sum(1, keepdim=True)
    a = a / a.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    ink, empty = (px > 0.5).float(), (px == 0).float()
    on = (a * ink).flatten(1).sum(1) / ink.flatten(1).sum(1)
    off = (a * empty).flatten(1).sum(1) / empty.flatten(1).sum(1).clamp_min(1)
    return float(on.mean()), float(off.mean()), float((on > off).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "attention_rollout", "transformer_attribution"])
def test_maps_concentrate_on_the_strokes_and_are_faithful(digits_vit, method: str) -> None:
    demo, x, y, px = digits_vit
    e = perspicio.explain(demo, x, method=method, target=y)
    assert e.attributions.shape == (len(x), 1, 8, 8)
    if method == "gradcam":
        assert e.layer == "blocks.0" and e.raw.shape == (
            len(x),
            1,
            4,
            4,
        )  # class-token model: the last block's input
    on, off, frac = _ink_vs_empty(e.attributions, px)
    assert on > 1.4 * off and frac >= 0.7, (on, off, frac)
    # deletion (most relevant pixels first, replaced by zero): the score drops faster than for random maps
    deletion = metrics.Deletion(steps=16)
    ours = float(deletion(demo, x, e).scores.mean())
    gen = torch.Generator().manual_seed(0)
    rand = [
        float(deletion(demo, x, torch.rand(x.shape, generator=gen), target=y).scores.mean())
        for _ in range(2)
    ]
    assert ours < 0.85 * min(rand), (ours, rand)
