"""What TCAV and concept discovery share: the model bundle, image sets, and one pass of a
layer's activations (and, for the explained inputs, the gradient of the target there).

Image sets come from tensors (already model inputs), folders of image files, or lists of
images (paths, PIL images, arrays), turned into model inputs by the bundled model's
``preprocess`` (or one passed as ``preprocess=``). Activations are computed once per image
and layer, in chunks, with the forward pass stopped after the layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.capture import Capture, resolve_layer, run_until
from ..core.guard import model_device, model_guard
from ..core.inputs import as_batch, expected_input
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


def image_set(
    spec: Any,
    bundle: Bundle,
    what: str,
    *,
    minimum: int = MIN_SET_SIZE,
    ndim: int | None = None,
) -> Tensor:
    """One set of images (or any model inputs) as a batch (N, ...), at least ``minimum`` of them.

    ``spec`` is a tensor or numpy array of model inputs, a data loader (or any iterable of batches,
    or an object holding one as ``data_iter``, such as a ``captum.concept.Concept``;
    a batch that is a tuple/list, such as ``(inputs, labels)``, contributes its first tensor), a
    list of tensors (single inputs are stacked, batches concatenated), a folder, or a list of
    images/paths for ``preprocess``. ``ndim`` is the rank of one batch of model inputs when known
    (the explained inputs'): it decides whether listed tensors are single inputs or batches.
    """
    if isinstance(getattr(spec, "data_iter", None), Iterable):
        spec = spec.data_iter  # a captum.concept.Concept: its batches (a loader or a list)
    if isinstance(spec, (Tensor, np.ndarray)):
        x = _checked_batch(spec, bundle, what)
    elif _is_batch_iterable(spec):
        x = _checked_batch(_collect_batches(spec, what), bundle, what)
    elif isinstance(spec, Sequence) and spec and all(isinstance(s, Tensor) for s in spec):
        x = _checked_batch(_join_tensors(list(spec), what, ndim), bundle, what)
    else:
        if not isinstance(spec, (str, os.PathLike, Sequence)) or isinstance(spec, bytes):
            raise InputError(
                f"{what}: expected a tensor of model inputs, a data loader, a folder or a list of "
                f"images; got {type(spec).__name__}."
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
        x = _checked_batch(x, bundle, what)
    if x.shape[0] < minimum:
        note = f" (MIN_SET_SIZE = {MIN_SET_SIZE})" if minimum == MIN_SET_SIZE else ""
        raise InputError(f"{what} has {x.shape[0]} image(s); at least {minimum} are needed{note}.")
    return x


def _checked_batch(x: Any, bundle: Bundle, what: str) -> Tensor:
    """``as_batch`` for inputs of any rank (images, feature rows, ...), errors naming the set; a
    model that starts with a convolution fixes the rank (an image without its batch dimension is
    refused here, not deep inside the model)."""
    exp = expected_input(bundle.model)
    try:
        return as_batch(x, bundle.model, ndim=None if exp is None else exp[1])
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def _is_batch_iterable(spec: Any) -> bool:
    """A data loader or another iterable of batches (not a list, string, path or mapping)."""
    if isinstance(spec, (str, bytes, os.PathLike, Sequence, Mapping, Tensor, np.ndarray)):
        return False
    return isinstance(spec, Iterable)


def _collect_batches(spec: Any, what: str) -> Tensor:
    parts: list[Tensor] = []
    for i, batch in enumerate(spec):
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]  # (inputs, labels, ...) as a TensorDataset or ImageFolder gives
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if not isinstance(batch, Tensor):
            raise InputError(
                f"{what}: batch {i} of the data loader is a {type(batch).__name__}; expected a tensor "
                "of model inputs (or a tuple whose first item is one)."
            )
        if parts and batch.shape[1:] != parts[0].shape[1:]:
            raise InputError(
                f"{what}: batch {i} of the data loader has inputs of shape {tuple(batch.shape[1:])}, "
                f"batch 0 {tuple(parts[0].shape[1:])}; every input of a set must have the same shape."
            )
        parts.append(batch.detach())
    if not parts:
        raise InputError(f"{what}: the data loader yielded no batches.")
    return torch.cat(parts)


def _join_tensors(items: list[Tensor], what: str, ndim: int | None) -> Tensor:
    """Listed tensors: single inputs (one rank below a batch) are stacked, batches concatenated."""
    ranks = {t.ndim for t in items}
    (rank,) = ranks if len(ranks) == 1 else (-1,)
    single = rank == ndim - 1 if ndim is not None else rank in (1, 3)
    shapes = {tuple(t.shape) if single else tuple(t.shape[1:]) for t in items}
    if rank < 1 or len(shapes) > 1:
        raise InputError(
            f"{what}: the listed tensors have different shapes "
            f"({', '.join(str(tuple(t.shape)) for t in items[:4])}{', ...' if len(items) > 4 else ''}); "
            "every input of a set must have the same shape."
        )
    parts = [t.detach() for t in items]
    return torch.stack(parts) if single else torch.cat(parts)


def layer_module(model: nn.Module, layer: Any) -> tuple[str, nn.Module]:
    if layer is None:
        raise OptionError(
            "layer= is required: the name of the layer whose activations hold the concepts."
        )
    return resolve_layer(model, layer)


def activations(model: nn.Module, module: nn.Module, x: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """The layer's activations for every row of ``x`` (no gradients).

    A module the forward pass calls several times (a ResNet block's shared ``relu``) gives the
    output of its last call - the one the gradients of :func:`activations_and_gradients` are
    taken at. The forward pass stops after the layer once the first chunk has shown that the
    module is called only once.
    """
    device = model_device(model)
    parts = []
    calls = 0
    with model_guard(model), torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            with Capture([module], stop_after=module if calls == 1 else None) as cap:
                run_until(model, _fast_layout(x[start : start + chunk].to(device)), cap)
            calls = calls or len(cap.outputs[0])
            parts.append(cap.last().detach())
    return torch.cat(parts)


def count_calls(model: nn.Module, module: nn.Module, x: Tensor) -> int:
    """How many times one forward pass of ``x[:1]`` calls ``module`` (a shared ReLU: several)."""
    with model_guard(model), torch.no_grad(), Capture([module]) as cap:
        model(_fast_layout(x[:1].to(model_device(model))))
    return len(cap.outputs[0])


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
                resolved = resolve_target(
                    slice_target(target, start, start + xb.shape[0], x.shape[0]), out, labels
                )
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
