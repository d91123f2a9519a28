"""Resolve a model spec given on the command line to a :class:`ZooModel`.

Accepted specs, tried in this order:

``efficientnet_lite0``
    a bundled model (:func:`perspicio.zoo.models`).
``torchvision:NAME`` (or ``torchvision:NAME.WEIGHTS``, e.g. ``resnet50.IMAGENET1K_V2``)
    a torchvision classifier. Pretrained weights are used only if their file is
    already in the local torch hub cache (``torch.hub.get_dir()/checkpoints``);
    otherwise :class:`ModelError` explains where the file should be, and
    ``pretrained=False`` (``--random-init``) gives random weights. The file is read
    as plain tensors (``torch.load(weights_only=True)``), never as an arbitrary pickle.
``timm:NAME``
    a timm model, with the same rule: weights are taken from timm's caches (the
    Hugging Face hub cache or the torch hub cache) and loaded through timm's
    ``pretrained_cfg_overlay=dict(file=...)``, which reads the local file only;
    a file that is not safetensors must load with ``torch.load(weights_only=True)``.
a path to a TorchScript file
    anything ``torch.jit.load`` reads (usually ``.pt``/``.pth``/``.ts``). A TorchScript
    file is a program: loading and running it runs the code it contains.
``package.module:factory``
    imports ``package.module`` and calls ``factory()`` with no arguments; it must
    return a ``torch.nn.Module``. ``factory`` may also be an ``nn.Module`` subclass
    or instance. Importing the module runs its code.

Nothing is ever downloaded: pretrained weights that are not already on disk are an
error, never a download.

Models other than the bundled ones get :class:`ImagePreprocess` (ImageNet mean/std
and 224x224, or the input size/mean/std their torchvision weights or timm config
declare) and the ImageNet labels when they have 1000 outputs; otherwise generic
labels ``"class 0"``, ``"class 1"``, ... made on demand (:class:`ClassLabels`).
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ModelError, UnknownNameError, suggest
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from .registry import (
    ClassLabels,
    ZooModel,
    _bundled_key,
    labels,
    load,
    models,
    resolve_device,
)

__all__ = ["TORCHSCRIPT_SUFFIXES", "check_spec", "resolve_model"]

#: Suffixes treated as TorchScript files even when the file does not exist (to give
#: a "file not found" error instead of "unknown model").
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")

_FACTORY = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_FORMS = (
    "a bundled name ({bundled}), 'torchvision:NAME', 'timm:NAME', a TorchScript file path, "
    "or 'package.module:factory'"
)
_RANDOM_INIT_HINT = "use --random-init (pretrained=False) for random weights"


def resolve_model(
    spec: str, *, pretrained: bool = True, device: str | torch.device = "cpu"
) -> ZooModel:
    """Turn ``spec`` into a :class:`ZooModel` in eval mode on ``device``.

    See the module documentation for the accepted forms. Raises
    :class:`UnknownNameError` (with suggestions) for unknown names and
    :class:`ModelError` when a source exists but cannot be loaded, including
    pretrained weights missing from the local cache.
    """
    text, kind, rest = _classify(spec)
    dev = resolve_device(device)
    if kind == "bundled":
        return load(text, str(dev), pretrained=pretrained)
    if kind == "torchvision":
        return _from_torchvision(rest, pretrained, dev, text)
    if kind == "timm":
        return _from_timm(rest, pretrained, dev, text)
    if kind == "file":
        return _from_torchscript(Path(text).expanduser(), dev, text)
    module_name, attr_path = rest.split(":")
    return _from_factory(module_name, attr_path, dev, text)


def check_spec(spec: str | os.PathLike[str]) -> None:
    """Refuse, without loading anything, a ``spec`` :func:`resolve_model` could never load: an
    unknown name, a missing file, a folder, or a file that is not a TorchScript archive (a pickle,
    a ``torch.save()`` checkpoint, a truncated file; only its zip directory is read, nothing is
    unpickled). For servers that load their models on first use."""
    text, kind, _ = _classify(spec)
    if kind != "file":
        return
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(f"model file not found: '{path}'")
    if path.is_dir():
        raise ModelError(f"'{path}' is a directory; expected a TorchScript model file")
    why = _why_not_torchscript(path)
    if why is not None:
        raise ModelError(f"'{path}' is not a TorchScript model file: {why}")


def _classify(spec: Any) -> tuple[str, str, str]:
    """(stripped text, kind, rest) of a model spec; kind is bundled, torchvision, timm, file or
    factory (rest: the name after the prefix, or ``module:attr``). Unknown forms raise."""
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelError(f"a model spec must be a string: {_forms()}; got {type(spec).__name__}")
    text = os.fspath(spec)
    text = text.strip() if isinstance(text, str) else os.fsdecode(text).strip()
    if not text:
        raise UnknownNameError(f"empty model spec; expected {_forms()}")
    if isinstance(spec, str) and _bundled_key(text) is not None:
        return text, "bundled", text
    prefix, _, rest = text.partition(":")
    if isinstance(spec, str) and prefix.lower() in ("torchvision", "timm"):
        return text, prefix.lower(), rest.strip()
    path = Path(text).expanduser()
    if not isinstance(spec, str) or path.exists() or path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        return text, "file", text
    match = _FACTORY.match(text)
    if match:
        return text, "factory", f"{match.group(1)}:{match.group(2)}"
    raise UnknownNameError(f"unknown model {text!r}; expected {_forms()}." + _suggest_spec(text))


# --------------------------------------------------------------------------- helpers


def _forms() -> str:
    return _FORMS.format(bundled=", ".join(models()))


def _suggest_spec(text: str) -> str:
    candidates = list(models())
    try:
        import torchvision.models as tvm

        candidates += [f"torchvision:{name}" for name in tvm.list_models()]
    except Exception:  # torchvision is optional; suggestions are best-effort
        pass
    hint = suggest(text, candidates)
    if not hint and ":" not in text:
        hint = suggest(f"torchvision:{text}", candidates)
    return hint


def _finish(
    model: nn.Module,
    dev: torch.device,
    name: str,
    *,
    size: tuple[int, int] = (224, 224),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    categories: list[str] | None = None,
) -> ZooModel:
    """Move to ``dev``, eval mode, and attach preprocessing and labels."""
    try:
        model = model.to(dev).eval()
    except Exception as exc:
        raise ModelError(f"could not move model {name!r} to device {str(dev)!r}: {exc}") from exc
    preprocess = ImagePreprocess(size=size, mean=mean, std=std, device=str(dev))
    count = _num_outputs(model, preprocess, dev)
    if categories is not None and count in (None, len(categories)):
        names: Any = list(categories)
    elif count == 1000:
        names = labels("imagenet")
    else:
        names = ClassLabels(count)
    return ZooModel(model=model, preprocess=preprocess, labels=names, name=name)


def _num_outputs(model: nn.Module, preprocess: ImagePreprocess, dev: torch.device) -> int | None:
    """Classes the model predicts: from a dummy forward pass, else its last Linear."""
    try:
        dummy = torch.zeros(1, 3, *preprocess.size, device=dev)
        with torch.no_grad():
            out = model(dummy)
        if isinstance(out, torch.Tensor) and out.ndim >= 2 and out.shape[0] == 1:
            return int(out.shape[1])
    except Exception:  # not an image model, or another input size: fall back
        pass
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return int(last.out_features) if last is not None else None


# --------------------------------------------------------------------------- torchvision


def _from_torchvision(name: str, pretrained: bool, dev: torch.device, spec: str) -> ZooModel:
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ModelError(
            f"{spec!r} needs torchvision, which is not installed; install it with: "
            "pip install torchvision (or pip install 'perspicio[vision]')"
        ) from exc
    arch, _, weights_tag = name.partition(".")
    available = tvm.list_models()
    if arch not in available:
        raise UnknownNameError(
            f"unknown torchvision model {arch!r} in {spec!r}."
            + suggest(arch, available)
            + " (torchvision.models.list_models() lists them all)"
        )
    if not pretrained:
        if weights_tag:
            raise ModelError(
                f"{spec!r} names pretrained weights but pretrained=False was asked; "
                f"use 'torchvision:{arch}' for random weights"
            )
        return _finish(_build(tvm.get_model, arch, spec, weights=None), dev, spec)

    try:
        weights_enum = tvm.get_model_weights(arch)
    except Exception as exc:
        raise ModelError(
            f"torchvision has no pretrained weights for {arch!r}; {_RANDOM_INIT_HINT}"
        ) from exc
    tag = weights_tag or "DEFAULT"
    try:
        weights = weights_enum[tag]
    except KeyError as exc:
        options = [w.name for w in weights_enum]
        raise UnknownNameError(
            f"unknown weights {tag!r} for torchvision model {arch!r}; expected one of: "
            f"{', '.join(options)}." + suggest(tag, options)
        ) from exc

    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(urlparse(weights.url).path)
    if not (cache_dir / filename).is_file():
        raise ModelError(
            f"pretrained weights for {spec!r} ({weights}) are not in the local torch hub "
            f"cache: expected {cache_dir / filename}. perspicio never downloads; put the "
            f"file there (from {weights.url}) or {_RANDOM_INIT_HINT}"
        )
    state = _load_tensors(cache_dir / filename, spec)
    model = _build_torchvision_with(tvm, arch, spec, weights, state)
    meta = getattr(weights, "meta", {}) or {}
    size, mean, std = (224, 224), IMAGENET_MEAN, IMAGENET_STD
    try:
        transform = weights.transforms()
        crop = getattr(transform, "crop_size", None)
        if crop:
            size = (int(crop[0]), int(crop[-1]))
        mean = tuple(getattr(transform, "mean", mean))
        std = tuple(getattr(transform, "std", std))
    except Exception:  # transforms are metadata only; keep the ImageNet defaults
        pass
    return _finish(
        model, dev, spec, size=size, mean=mean, std=std, categories=meta.get("categories")
    )


#: serialises the brief substitution of torchvision's weight loader (_build_torchvision_with)
_TORCHVISION_LOADER_LOCK = threading.Lock()


def _load_tensors(path: Path, spec: str) -> Any:
    """A checkpoint read as plain tensors and containers (``torch.load(weights_only=True)``), or
    :class:`ModelError`: a checkpoint whose pickle wants to build other objects or call code is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"the cached weights {str(path)!r} for {spec!r} could not be read as plain tensors "
            f"(torch.load with weights_only=True: {first}). perspicio never unpickles code from a "
            "cache; delete the file and fetch it again from a trusted source"
        ) from exc


def _build_torchvision_with(tvm: Any, arch: str, spec: str, weights: Any, state: Any) -> nn.Module:
    """torchvision's own builder for ``weights`` (so every constructor argument its weights imply is
    set exactly as torchvision sets it), with the state dict we read ourselves: torchvision would
    read the hub file with ``torch.load(weights_only=False)``. Its loader is replaced for the call
    only, and only for this URL; any other URL goes to the original loader."""
    try:
        import torchvision.models._api as api

        original = api.load_state_dict_from_url
    except (ImportError, AttributeError):  # another torchvision layout: build bare, then load
        model = _build(tvm.get_model, arch, spec, weights=None,
                       num_classes=len((getattr(weights, "meta", {}) or {}).get("categories") or []) or 1000)
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise ModelError(f"the cached weights for {spec!r} do not fit the model: {exc}") from exc
        return model

    def local(url: str, *args: Any, **kwargs: Any) -> Any:
        return state if url == weights.url else original(url, *args, **kwargs)

    with _TORCHVISION_LOADER_LOCK:
        api.load_state_dict_from_url = local
        try:
            return _build(tvm.get_model, arch, spec, weights=weights)
        finally:
            api.load_state_dict_from_url = original


def _build(factory: Any, arch: str, spec: str, **kwargs: Any) -> nn.Module:
    try:
        return factory(arch, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not build {spec!r}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- timm


def _from_timm(name: str, pretrained: bool, dev: torch.device, spec: str) -> ZooModel:
    try:
        import timm
        import timm.models
    except ImportError as exc:
        raise ModelError(
            f"{spec!r} needs timm, which is not installed; install it with: "
            "pip install timm (or pip install 'perspicio[vision]')"
        ) from exc
    if not name or not timm.is_model(name):
        raise UnknownNameError(
            f"unknown timm model {name!r} in {spec!r}."
            + suggest(name, timm.list_models())
            + " (timm.list_models() lists them all)"
        )
    cfg_obj = timm.models.get_pretrained_cfg(name)
    cfg: dict[str, Any] = cfg_obj.to_dict() if cfg_obj is not None else {}

    if not pretrained:
        model = _build(timm.create_model, name, spec, pretrained=False)
    else:
        if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
            raise ModelError(f"timm has no pretrained weights for {name!r}; {_RANDOM_INIT_HINT}")
        local = _timm_cached_weights(cfg)
        if local is None:
            where = cfg.get("hf_hub_id") or cfg.get("url") or "its source"
            raise ModelError(
                f"pretrained weights for {spec!r} are not in the local Hugging Face hub or "
                f"torch hub cache (source: {where}). perspicio never downloads; fetch them "
                f"once with timm on a connected machine, or {_RANDOM_INIT_HINT}"
            )
        if local.suffix != ".safetensors":
            # timm >= 0.9.x reads these with weights_only=True itself; older releases did not
            _load_tensors(local, spec)
        model = _build(
            timm.create_model,
            name,
            spec,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(local)},
        )
    input_size = cfg.get("input_size") or (3, 224, 224)
    return _finish(
        model,
        dev,
        spec,
        size=(int(input_size[-2]), int(input_size[-1])),
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
    )


def _timm_cached_weights(cfg: dict[str, Any]) -> Path | None:
    """The local file timm would load for ``cfg``, if it is already cached."""
    file = cfg.get("file")
    if file and Path(file).is_file():
        return Path(file)
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = str(hub_id).partition("@")
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
            names += ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
            for filename in names:
                try:
                    found = try_to_load_from_cache(repo, filename, revision=revision or None)
                except Exception:
                    found = None
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = cfg.get("url")
    if url:
        try:
            from timm.models._hub import get_cache_dir

            cache_dir = Path(get_cache_dir())
        except Exception:
            cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        candidate = cache_dir / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- TorchScript


def _from_torchscript(path: Path, dev: torch.device, spec: str) -> ZooModel:
    if not path.exists():
        raise ModelError(f"model file not found: '{path}'")
    if path.is_dir():
        raise ModelError(f"'{path}' is a directory; expected a TorchScript model file")
    try:
        with warnings.catch_warnings():
            # torch.jit.load announces its deprecation on every call.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=dev)
    except Exception as exc:
        raise ModelError(
            f"'{path}' is not a TorchScript model file: {_why_not_torchscript(path, exc)}"
        ) from exc
    return _finish(model, dev, spec)


def _why_not_torchscript(path: Path, exc: Exception | None = None) -> str | None:
    """Why ``path`` is no TorchScript archive, read from its zip directory only (never unpickled);
    None if it looks like one. ``exc``: the loader's error, the reason when nothing else explains it."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "it is not a zip archive, and torch.jit.save always writes one"
    if not any(e.endswith("constants.pkl") for e in entries):
        if any(e.endswith("data.pkl") for e in entries):
            return (
                "it looks like a torch.save() checkpoint (a state dict or pickled module), which "
                "cannot be loaded without its architecture; save it with torch.jit.script(model)"
                ".save(path), or point to a factory that builds the model: "
                "'package.module:factory'"
            )
        if exc is None:
            return "it is a zip archive without TorchScript's constants"
    if exc is None:
        return None
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- factory


def _from_factory(module_name: str, attr_path: str, dev: torch.device, spec: str) -> ZooModel:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"cannot import module {module_name!r} for {spec!r}: {exc}; "
            "is it installed or on PYTHONPATH?"
        ) from exc
    except Exception as exc:
        raise ModelError(
            f"importing module {module_name!r} for {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise UnknownNameError(
                f"{module_name!r} has no attribute {attr_path!r} (looked up for {spec!r})."
                + suggest(part, names)
            )
        obj = getattr(obj, part)

    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as exc:
            raise ModelError(
                f"calling the factory {spec!r} with no arguments failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    else:
        raise ModelError(
            f"{spec!r} must name a callable that returns a torch.nn.Module, "
            f"got a {type(obj).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"the factory {spec!r} must return a torch.nn.Module, got {type(model).__name__}"
        )
    return _finish(model, dev, spec)
