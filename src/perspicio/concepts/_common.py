"""What TCAV and concept discovery share: the model bundle, image sets, and one pass of a
layer's activations (and, for the explained inputs, the gradient of the target there).

Image sets come from tensors (already model inputs), folders of image files, or lists of
images (paths, PIL images, arrays), turned into model inputs by the bundled model's
``preprocess`` (or one passed as ``preprocess=``). Activations are computed once per image
and layer, in chunks, with the forward pass stopped after the layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.capture import Capture, resolve_layer, run_until
from ..core.guard import model_device, model_guard
from ..core.inputs import as_batch
from ..core.options import check_int
from ..core.targets import ResolvedTarget, resolve_target, slice_target, target_names
from ..errors import InputError, ModelError, OptionError

#: smallest concept or random set accepted (a linear classifier on fewer images is noise)
MIN_SET_SIZE = 5

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: images per chunk when activations/gradients are computed
CHUNK = 32


@dataclass(frozen=True)
class Bundle:
    """What the concept tools need from a model argument."""

    model: nn.Module
    labels: Sequence[str] | None
    preprocess: Callable[[Any], Tensor] | None
    name: str


def unwrap(model: Any, preprocess: Callable[[Any], Tensor] | None = None) -> Bundle:
    """Accept an ``nn.Module`` or a bundled zoo model (``.model``, ``.labels``, ``.preprocess``)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and not isinstance(model, nn.Module):
        pre = preprocess if preprocess is not None else getattr(model, "preprocess", None)
        return Bundle(
            inner,
            getattr(model, "labels", None),
            pre,
            str(getattr(model, "name", type(inner).__name__)),
        )
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"concept methods need a torch nn.Module (gradients at a layer) or a perspicio zoo model; "
            f"got {type(model).__name__}."
        )
    return Bundle(model, None, preprocess, type(model).__name__)


def check_seed(seed: Any) -> int:
    return check_int("seed", seed, minimum=0)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted by name)."""
    if not folder.is_dir():
        raise InputError(f"image folder '{folder}' does not exist or is not a directory.")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise InputError(
            f"image folder '{folder}' holds no image files ({', '.join(IMAGE_SUFFIXES)})."
        )
    return files


def image_set(spec: Any, bundle: Bundle, what: str, *, minimum: int = MIN_SET_SIZE) -> Tensor:
    """One set of images as a model-input batch (N, C, H, W), at least ``minimum`` images.

    ``spec`` is a tensor (model inputs), a folder, or a list of images/paths.
    """
    if isinstance(spec, Tensor):
        x = as_batch(spec, bundle.model)
    else:
        if not isinstance(spec, (str, os.PathLike, Sequence)) or isinstance(spec, bytes):
            raise InputError(
                f"{what}: expected a tensor of model inputs, a folder or a list of images; "
                f"got {type(spec).__name__}."
            )
        if bundle.preprocess is None:
            raise OptionError(
                f"{what} is given as image files; pass preprocess= (a callable from images to a "
                "model-input batch) or a bundled zoo model, which brings its own."
            )
        items: list[Any] = (
            list(list_images(Path(spec))) if isinstance(spec, (str, os.PathLike)) else list(spec)
        )
        if not items:
            raise InputError(f"{what} is empty.")
        try:
            x = bundle.preprocess(items)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from exc
        x = as_batch(x, bundle.model)
    if x.shape[0] < minimum:
        raise InputError(f"{what} has {x.shape[0]} image(s); at least {minimum} are needed.")
    return x


def layer_module(model: nn.Module, layer: Any) -> tuple[str, nn.Module]:
    if layer is None:
        raise OptionError(
            "layer= is required: the name of the layer whose activations hold the concepts."
        )
    return resolve_layer(model, layer)


def activations(model: nn.Module, module: nn.Module, x: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """The layer's activations for every row of ``x`` (no gradients; forward stopped after the layer)."""
    device = model_device(model)
    parts = []
    with model_guard(model), torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            with Capture([module], stop_after=module) as cap:
                run_until(model, _fast_layout(x[start : start + chunk].to(device)), cap)
            parts.append(cap.last().detach())
    return torch.cat(parts)


def activations_and_gradients(
    model: nn.Module,
    module: nn.Module,
    x: Tensor,
    target: Any,
    labels: Sequence[str] | None,
    *,
    chunk: int = CHUNK,
) -> tuple[Tensor, Tensor, ResolvedTarget]:
    """The layer's activations, the gradient of the target score with respect to them, and the
    resolved target (one class per input), for every row of ``x``."""
    device = model_device(model)
    acts, grads, fns = [], [], []
    with model_guard(model):
        for start in range(0, x.shape[0], chunk):
            xb = _fast_layout(x[start : start + chunk].to(device))
            with torch.enable_grad(), Capture([module], grad=True) as cap:
                out = model(xb)
                act = cap.last()
                resolved = resolve_target(slice_target(target, start, start + xb.shape[0], x.shape[0]), out, labels)
                score = resolved(out)
                (g,) = torch.autograd.grad(score.sum(), act)
            acts.append(act.detach())
            grads.append(g.detach())
            fns.append(resolved)
    idx = [r.indices for r in fns]
    indices = torch.cat(idx) if all(i is not None for i in idx) else None
    desc = fns[0].description if len(fns) == 1 else f"{len(x)} inputs"
    return (
        torch.cat(acts),
        torch.cat(grads),
        ResolvedTarget(fn=fns[0].fn, indices=indices, description=desc),
    )


def _fast_layout(x: Tensor) -> Tensor:
    """Images in channels-last memory (faster convolutions on CPU; values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@contextmanager
def small_blas() -> Iterator[None]:
    """One BLAS thread for the many small matrix problems (CAV fits, NMF on a few hundred rows):
    several threads on small matrices are slower, and much slower on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, run as configured
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def describe_target(bundle: Bundle, resolved: ResolvedTarget) -> str:
    """'285 (Egyptian cat)' when every input has the same class, else the target's description."""
    idx = resolved.indices
    if idx is not None and bool((idx == idx[0]).all()):
        names = target_names(bundle.labels, idx[:1])
        return f"{int(idx[0])}" + (f" ({names[0]})" if names else "")
    return resolved.description


def to_pixels(bundle: Bundle, x: Tensor) -> Tensor:
    """Model inputs -> displayable images in [0, 1] (the preprocess's inverse, else min-max)."""
    x = x.detach().float().cpu()
    denorm = getattr(bundle.preprocess, "denormalize", None)
    if callable(denorm) and x.shape[1] == 3:
        return denorm(x).clamp(0, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
