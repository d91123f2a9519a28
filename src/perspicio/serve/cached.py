"""Pretrained ``torchvision:`` and ``timm:`` classifiers whose weights are already on this machine.

The app offers them in its model picker without anyone naming them: this module only looks at
files (it never downloads, never opens a checkpoint); loading one goes through
:func:`perspicio.zoo.sources.resolve_model`, which reads the file with
``torch.load(weights_only=True)`` (or as safetensors) - a checkpoint that is not plain tensors is
refused there, with a one-line error, and never unpickled.

* torchvision: every classification architecture's weights (``torchvision.models.list_models``
  of the top-level module: no detection, segmentation or video heads) whose file
  ``basename(weights.url)`` is in ``torch.hub.get_dir()/checkpoints``. The default weights are
  shown as ``torchvision:ARCH``, others as ``torchvision:ARCH.WEIGHTS``.
* timm: pretrained tags whose weights are in the Hugging Face hub cache (a ``models--timm--TAG``
  folder) or in timm's torch-hub checkpoint folder, checked with the zoo's own lookup
  (the file the loader would read).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["cached_models"]


def _hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_cached() -> dict[str, str]:
    """``torchvision:...`` id -> description, for weights whose file is in the torch hub cache."""
    if importlib.util.find_spec("torchvision") is None:
        return {}
    folder = _hub_checkpoints()
    if not folder.is_dir():
        return {}
    files = {p.name for p in folder.iterdir() if p.is_file()}
    if not files:
        return {}
    import torchvision.models as tvm

    out: dict[str, str] = {}
    for arch in tvm.list_models(module=tvm):
        try:
            enum = tvm.get_model_weights(arch)
            default = enum.DEFAULT
        except Exception:  # noqa: BLE001 - an architecture without weights
            continue
        for w in enum:
            if os.path.basename(urlparse(w.url).path) not in files:
                continue
            key = f"torchvision:{arch}" if w is default else f"torchvision:{arch}.{w.name}"
            out[key] = f"torchvision {arch} ({w.name} weights, cached)"
    return out


def timm_cached() -> dict[str, str]:
    """``timm:TAG`` id -> description, for pretrained tags whose weights are cached locally."""
    if importlib.util.find_spec("timm") is None:
        return {}
    candidates: set[str] = set()
    hub = _hf_hub_cache()
    if hub is not None and hub.is_dir():
        for d in hub.iterdir():
            if d.is_dir() and d.name.startswith("models--timm--"):
                candidates.add(d.name[len("models--timm--") :])
    folder = _timm_checkpoints()
    files = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    import timm
    import timm.models

    if files:
        for tag in timm.list_pretrained():
            cfg = timm.models.get_pretrained_cfg(tag)
            url = getattr(cfg, "url", None) if cfg is not None else None
            if url and os.path.basename(urlparse(url).path) in files:
                candidates.add(tag)
    if not candidates:
        return {}
    from ..zoo.sources import _timm_cached_weights  # the loader's own lookup of the file

    out: dict[str, str] = {}
    for tag in sorted(candidates):
        if not timm.is_model(tag):
            continue
        cfg = timm.models.get_pretrained_cfg(tag)
        if cfg is None or _timm_cached_weights(cfg.to_dict()) is None:
            continue
        out[f"timm:{tag}"] = f"timm {tag} (cached weights)"
    return out


def _hf_hub_cache() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


def _timm_checkpoints() -> Path:
    try:
        from timm.models._hub import get_cache_dir

        return Path(get_cache_dir())
    except Exception:  # noqa: BLE001 - another timm layout: torch's hub folder
        return _hub_checkpoints()


def cached_models() -> dict[str, Any]:
    """Every cached ``torchvision:``/``timm:`` classifier: id (the spec) -> description."""
    return {**torchvision_cached(), **timm_cached()}
