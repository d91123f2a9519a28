"""A bundled demo for feature visualisation: scikit-learn's 8 x 8 digits and a small CNN.

The data ship with scikit-learn (1797 grey 8 x 8 images, values 0..16, ten classes).
The CNN is trained on first use in a few seconds, deterministically from ``seed``
(local generators only; the global RNG is untouched), and cached under
``$PERSPICIO_CACHE`` (default ``$XDG_CACHE_HOME/perspicio`` or ``~/.cache/perspicio``) in
``digits/``. Nothing downloads.

    from perspicio.zoo.digits import load_digits_cnn, digits_data
    demo = load_digits_cnn()                   # ZooModel: .model, .preprocess, .labels
    x, y = digits_data("test")                 # (297, 1, 8, 8) model inputs, (297,) labels
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, ModelError, OptionError
from .registry import ZooModel

#: bump when the architecture or the training recipe changes (invalidates the cache)
VERSION = 1
N_TRAIN = 1500
MEAN = (0.3,)  # pixel statistics of the digits in [0, 1] (rounded), used for normalisation
STD = (0.4,)


def cache_dir() -> Path:
    """$PERSPICIO_CACHE, else $XDG_CACHE_HOME/perspicio, else ~/.cache/perspicio."""
    env = os.environ.get("PERSPICIO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "perspicio"


class DigitsCNN(nn.Module):
    """conv3x3(16) -> ReLU -> conv3x3(32) -> ReLU -> maxpool 2 -> conv3x3(32) -> ReLU ->
    global average pool -> linear(10). Input (N, 1, 8, 8); every activation is its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.act3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        x = self.act3(self.conv3(x))
        return self.fc(self.flatten(self.gap(x)))


@dataclass(frozen=True)
class DigitsPreprocess:
    """Images -> (N, 1, 8, 8) normalised inputs: greyscale, resized to 8 x 8, in [0, 1], then
    ``(x - mean) / std``. Accepts what :func:`perspicio.zoo.load_image` accepts, or a float
    tensor in [0, 1] of shape (1, H, W) / (N, 1, H, W)."""

    size: tuple[int, int] = (8, 8)
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __call__(self, images: Any) -> Tensor:
        return self.normalize(self.to_unit_tensor(images))

    def to_unit_tensor(self, images: Any) -> Tensor:
        if isinstance(images, Tensor):
            t = images.detach().float()
            t = t[None] if t.ndim == 3 else t
            if t.ndim != 4 or t.shape[1] != 1:
                raise InputError(f"expected a (N, 1, H, W) tensor; got {tuple(images.shape)}.")
        else:
            from .images import load_image

            items = list(images) if isinstance(images, (list, tuple)) else [images]
            arrs = [np.asarray(load_image(i).convert("L"), dtype=np.float32) / 255.0 for i in items]
            t = torch.cat([torch.from_numpy(a)[None, None] for a in arrs]) if len({a.shape for a in arrs}) == 1 else \
                torch.cat([F.interpolate(torch.from_numpy(a)[None, None], size=self.size, mode="area") for a in arrs])
        if tuple(t.shape[-2:]) != self.size:
            t = F.interpolate(t, size=self.size, mode="area")
        return t.clamp(0, 1)

    def normalize(self, t: Tensor) -> Tensor:
        return (t - self.mean[0]) / self.std[0]

    def denormalize(self, t: Tensor) -> Tensor:
        return (t * self.std[0] + self.mean[0]).clamp(0, 1)


def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModelError("the digits demo needs scikit-learn: pip install scikit-learn (or 'perspicio[tabular]').") from exc
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, _ = _raw()
    perm = np.random.default_rng(seed).permutation(len(images))
    return perm[:N_TRAIN], perm[N_TRAIN:]


def digits_data(split: str = "test", seed: int = 0, *, pixels: bool = False) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of the ``"train"``, ``"test"`` or ``"all"`` split (deterministic from
    ``seed``). Inputs are normalised model inputs (N, 1, 8, 8), or pixels in [0, 1] with
    ``pixels=True``."""
    images, target = _raw()
    if split not in ("train", "test", "all"):
        raise OptionError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    if split == "all":
        idx = np.arange(len(images))
    else:
        train, test = _split(seed)
        idx = train if split == "train" else test
    x = torch.from_numpy(images[idx])[:, None]
    y = torch.from_numpy(target[idx])
    return (x if pixels else DigitsPreprocess().normalize(x)), y


def _fresh() -> DigitsCNN:
    """A new DigitsCNN; torch's default initialisation draws from the global RNG, so its
    state is restored afterwards (our weights come from a local generator anyway)."""
    with torch.random.fork_rng(devices=[]):
        return DigitsCNN()


def train_digits_cnn(seed: int = 0, epochs: int = 10) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the train split (Adam, batch 64), deterministically."""
    g = torch.Generator().manual_seed(seed)
    model = _fresh()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                bound = (6.0 / fan_in) ** 0.5
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.zero_()
    x, y = digits_data("train", seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            b = perm[start:start + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def load_digits_cnn(seed: int = 0, *, device: str = "cpu", retrain: bool = False) -> ZooModel:
    """The digits CNN as a :class:`~perspicio.zoo.ZooModel` (trained and cached on first use)."""
    path = cache_dir() / "digits" / f"digits_cnn_v{VERSION}_seed{seed}.pt"
    model = cached_weights(path, _fresh(), lambda: train_digits_cnn(seed), retrain=retrain)
    return ZooModel(model=model.to(device).eval(), preprocess=DigitsPreprocess(), labels=[str(i) for i in range(10)],  # type: ignore[arg-type]
                    name="digits_cnn")


def cached_weights(path: Path, model: nn.Module, train: Callable[[], nn.Module], *, retrain: bool = False) -> nn.Module:
    """``model`` with the weights cached at ``path`` (plain tensors, ``weights_only`` loading), or
    ``train()``'s model, whose weights are then written atomically; a corrupt or stale cache file is
    rebuilt and a read-only cache keeps the model in memory."""
    if path.is_file() and not retrain:
        try:
            model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=True)
            return model
        except Exception:  # a corrupt or stale cache file is simply rebuilt
            pass
    model = train()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    except OSError:
        pass  # read-only cache: keep the model in memory
    return model


def accuracy(demo: ZooModel, split: str = "test", seed: int = 0) -> float:
    """Top-1 accuracy of ``demo`` on a split."""
    x, y = digits_data(split, seed)
    with torch.no_grad():
        return float((demo.model(x).argmax(1) == y).float().mean())


__all__ = ["DigitsCNN", "DigitsPreprocess", "accuracy", "cache_dir", "digits_data", "load_digits_cnn", "train_digits_cnn"]
